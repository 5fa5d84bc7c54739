"""Convert a `transformers` Longformer or BigBird folder into a longlm folder (`scripts/convert_hf.py`).

Why: the pretrained long-document encoders people have on disk (allenai/longformer-base-4096,
google/bigbird-roberta-base) are post-LN BERT-family encoders. longlm expresses them exactly with
`pre_norm=False`, learned absolute positions (`position_offset`), token types, an embedding LayerNorm, biased
attention projections and the `sliding` (Longformer) or `block_sparse` (BigBird) mixer, so after conversion
they fine-tune with longlm's heads and training code.

Per family, `HF_FAMILIES` (keyed by the HF `model_type`) holds the config fields and the parameter names;
`convert_hf_folder` loads the HF weights with transformers (any checkpoint format it reads), renames them,
writes config + safetensors + remote code with our `save_pretrained`, and copies the tokenizer files.

Equal to HF's forward (eval mode), with these deliberate differences:
* positions count tokens by index from `position_offset`; Longformer (RoBERTa) counts non-padding tokens, which
  is the same for every real token when the padding is at the end (how tokenizers pad);
* BigBird's random blocks: ours are a fixed plan per layer (seeded), as in training and in the original code;
  HF in eval mode uses no random blocks (every random slot points at block 0), so block-sparse lengths match
  HF's training-mode forward given the same plan, not its eval forward. Short inputs use full attention in both;
* BigBird with `use_bias=False` gets zero q/k/v biases (its output projection has a bias, and ours are tied
  to one `attention_bias` flag); they become trainable;
* training only: BigBird applies embedding dropout before the LayerNorm, ours after; ours also applies
  dropout to the last hidden state;
* dropped: the pooler, BigBird's next-sentence head (`ForPreTraining`).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig

from longlm.attention.block_sparse import full_attention_threshold
from longlm.configuration_longlm import LongLMConfig
from longlm.modeling_longlm import LongLMForMaskedLM, LongLMModel, LongLMPreTrainedModel
from longlm.registry import Registry

# copied as they are when SRC has them (byte-level BPE, WordPiece and SentencePiece layouts)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)

# ours (in LongLMModel) -> HF (in the backbone): the same BERT embeddings in both families
EMBEDDINGS = {
    "embed_tokens.weight": "embeddings.word_embeddings.weight",
    "embed_positions.weight": "embeddings.position_embeddings.weight",
    "embed_token_types.weight": "embeddings.token_type_embeddings.weight",
    "embedding_norm.weight": "embeddings.LayerNorm.weight",
    "embedding_norm.bias": "embeddings.LayerNorm.bias",
}
# ours (under layers.{i}.block.) -> HF modules (under encoder.layer.{i}.); several: their rows stacked ([k; v])
BERT_LAYER = {
    "mixer.q_proj": ("attention.self.query",),
    "mixer.kv_proj": ("attention.self.key", "attention.self.value"),
    "mixer.o_proj": ("attention.output.dense",),
    "mixer_norm": ("attention.output.LayerNorm",),
    "feed_forward.up": ("intermediate.dense",),
    "feed_forward.down": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}
LONGFORMER_LAYER = {
    **BERT_LAYER,
    "mixer.q_global_proj": ("attention.self.query_global",),
    "mixer.kv_global_proj": ("attention.self.key_global", "attention.self.value_global"),
}


@dataclass(frozen=True)
class HFFamily:
    """How one transformers model family maps onto longlm: config fields and parameter names."""

    config_fields: Callable[[PretrainedConfig, str, bool], dict[str, Any]]  # (hf config, src, with MLM head)
    backbone: str  # the backbone's attribute in the MLM model: its parameters start with "{backbone}."
    layer: dict[str, tuple[str, ...]]
    mlm_head: dict[str, str]  # ours (under lm_head.) -> HF parameter of the MLM model
    dropped: tuple[str, ...]  # backbone parameter prefixes with no longlm counterpart (the pooler)
    dropped_head: tuple[str, ...] = ()  # MLM-model parameters with none (aliases of tied biases)
    zero_biases: Callable[[PretrainedConfig], bool] = field(default=lambda hf: False)  # absent biases are zero

    def sources(self, num_layers: int, with_head: bool) -> dict[str, tuple[str, ...]]:
        """Our parameter name -> the HF parameter names it is made of, for the model that is saved."""
        backbone = {ours: (theirs,) for ours, theirs in EMBEDDINGS.items()}
        for i in range(num_layers):
            for ours, theirs in self.layer.items():
                for kind in ("weight", "bias"):
                    backbone[f"layers.{i}.block.{ours}.{kind}"] = tuple(f"encoder.layer.{i}.{t}.{kind}" for t in theirs)
        if not with_head:
            return backbone
        names = {f"model.{ours}": tuple(f"{self.backbone}.{t}" for t in theirs) for ours, theirs in backbone.items()}
        names.update({f"lm_head.{ours}": (theirs,) for ours, theirs in self.mlm_head.items()})
        return names

    def ignored(self, with_head: bool) -> tuple[str, ...]:
        """HF parameter-name prefixes that are dropped on purpose."""
        if not with_head:
            return self.dropped
        return tuple(f"{self.backbone}.{p}" for p in self.dropped) + self.dropped_head


HF_FAMILIES: Registry[HFFamily] = Registry("Hugging Face model_type")


def _encoder_fields(hf: PretrainedConfig, src: str) -> dict[str, Any]:
    """The fields every supported family shares: a post-LN BERT encoder with absolute positions."""
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise ValueError(
            f"'{src}/config.json' describes a decoder (is_decoder or add_cross_attention is true); longlm converts "
            "bidirectional encoders only, expected both false."
        )
    position_type = getattr(hf, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"'{src}/config.json' has position_embedding_type '{position_type}'; longlm converts only 'absolute'."
        )
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        head_dim=hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        hidden_act=hf.hidden_act,
        hidden_dropout_prob=float(hf.hidden_dropout_prob),
        attention_dropout=float(hf.attention_probs_dropout_prob),
        layer_norm_eps=hf.layer_norm_eps,
        initializer_range=hf.initializer_range,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        position_embedding_type="absolute",
        embedding_norm=True,
        attention_bias=True,
        pre_norm=False,
        is_decoder=False,
        memory="none",
        mem_len=0,
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        sep_token_id=hf.sep_token_id,
        tie_word_embeddings=hf.tie_word_embeddings,
    )


def _longformer_fields(hf: PretrainedConfig, src: str, with_head: bool) -> dict[str, Any]:
    """Longformer = RoBERTa + sliding window with global tokens; positions start at padding_idx + 1."""
    if hf.pad_token_id is None:
        raise ValueError(
            f"'{src}/config.json' has no pad_token_id; Longformer numbers positions from pad_token_id + 1, "
            "so expected one."
        )
    if with_head and hf.hidden_act != "gelu":
        raise ValueError(
            f"'{src}/config.json' has hidden_act '{hf.hidden_act}', but Longformer's MLM head always applies gelu "
            "and longlm's uses hidden_act; expected hidden_act 'gelu'."
        )
    window = hf.attention_window
    return dict(
        _encoder_fields(hf, src),
        mixer="sliding",
        attention_window=window if isinstance(window, int) else list(window),
        attention_dilation=1,
        position_offset=hf.pad_token_id + 1,
        scale_embeddings=False,
    )


def _bigbird_fields(hf: PretrainedConfig, src: str, with_head: bool) -> dict[str, Any]:
    """BigBird = BERT + ITC block-sparse attention (full attention where HF always falls back to it)."""
    if hf.attention_type not in ("block_sparse", "original_full"):
        raise ValueError(
            f"'{src}/config.json' has attention_type '{hf.attention_type}'; expected 'block_sparse' or 'original_full'."
        )
    # HF falls back to full attention up to (5 + 2r) b tokens: past the position table, it always does
    threshold = full_attention_threshold(hf.block_size, hf.num_random_blocks, causal=False)
    sparse = hf.attention_type == "block_sparse" and threshold < hf.max_position_embeddings
    return dict(
        _encoder_fields(hf, src),
        mixer="block_sparse" if sparse else "full",
        block_size=hf.block_size,
        num_random_blocks=hf.num_random_blocks,
        position_offset=0,
        scale_embeddings=bool(hf.rescale_embeddings),  # both multiply the word embeddings by sqrt(hidden_size)
    )


HF_FAMILIES.register("longformer")(
    HFFamily(
        config_fields=_longformer_fields,
        backbone="longformer",
        layer=LONGFORMER_LAYER,
        mlm_head={
            "dense.weight": "lm_head.dense.weight",
            "dense.bias": "lm_head.dense.bias",
            "norm.weight": "lm_head.layer_norm.weight",
            "norm.bias": "lm_head.layer_norm.bias",
            "decoder.weight": "lm_head.decoder.weight",
            "decoder.bias": "lm_head.decoder.bias",
        },
        dropped=("pooler.",),
        dropped_head=("lm_head.bias",),  # the same tensor as lm_head.decoder.bias
    )
)
HF_FAMILIES.register("big_bird")(
    HFFamily(
        config_fields=_bigbird_fields,
        backbone="bert",
        layer=BERT_LAYER,
        mlm_head={
            "dense.weight": "cls.predictions.transform.dense.weight",
            "dense.bias": "cls.predictions.transform.dense.bias",
            "norm.weight": "cls.predictions.transform.LayerNorm.weight",
            "norm.bias": "cls.predictions.transform.LayerNorm.bias",
            "decoder.weight": "cls.predictions.decoder.weight",
            "decoder.bias": "cls.predictions.decoder.bias",
        },
        dropped=("pooler.",),
        dropped_head=("cls.predictions.bias",),  # the same tensor as cls.predictions.decoder.bias
        zero_biases=lambda hf: not hf.use_bias,  # q/k/v without biases; the output projection has one
    )
)


def _read_model_type(src: Path) -> str:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"'{src}' has no config.json; expected a folder written by transformers' save_pretrained "
            f"(a {' / '.join(HF_FAMILIES.names())} model)."
        )
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(
            f"'{config_file}' has model_type {model_type!r}; longlm converts only {HF_FAMILIES.names()}."
        )
    return model_type


def _has_mlm_head(hf: PretrainedConfig, src: Path) -> bool:
    """The backbone (`...Model`, or no architectures listed) or the masked-LM head (`...ForMaskedLM`, and
    `...ForPreTraining`, whose next-sentence head is dropped); other heads have no longlm counterpart here."""
    name = (hf.architectures or ["Model"])[0]
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        return True
    if name.endswith("Model"):
        return False
    raise ValueError(
        f"'{src}/config.json' names architecture '{name}'; longlm converts the backbone (...Model) and the masked-LM "
        "head (...ForMaskedLM, ...ForPreTraining) only."
    )


def _renamed_weights(
    family: HFFamily, hf: PretrainedConfig, hf_state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
    with_head: bool, src: Path,
) -> dict[str, torch.Tensor]:
    """Our state dict from HF's: every one of our parameters filled, every HF parameter used or dropped on purpose."""
    sources = family.sources(hf.num_hidden_layers, with_head)
    zero_biases = family.zero_biases(hf)
    out: dict[str, torch.Tensor] = {}
    for key, target in ours.items():
        names = sources[key]
        present = [name for name in names if name in hf_state]
        if len(present) == len(names):
            value = torch.cat([hf_state[name] for name in names]) if len(names) > 1 else hf_state[names[0]]
        elif not present and key.endswith(".bias") and zero_biases:
            value = torch.zeros_like(target)
        else:
            missing = [name for name in names if name not in hf_state]
            raise ValueError(f"The weights in '{src}' lack {missing}, which longlm's '{key}' is made of.")
        if value.shape != target.shape:
            raise ValueError(
                f"The weights in '{src}' give longlm's '{key}' shape {tuple(value.shape)}; "
                f"expected {tuple(target.shape)}."
            )
        out[key] = value
    used = {name for names in sources.values() for name in names}
    unused = sorted(k for k in hf_state if k not in used and not k.startswith(family.ignored(with_head)))
    if unused:
        raise ValueError(
            f"The weights in '{src}' hold {unused[:4]}, which longlm has no place for; expected a plain "
            f"{hf.model_type} encoder."
        )
    return out


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def convert_hf_folder(src: str | Path, dst: str | Path) -> Path:
    """A transformers Longformer / BigBird folder (backbone or masked-LM) -> a longlm folder at `dst`.

    The backbone becomes a `LongLMModel` folder, a masked-LM model a `LongLMForMaskedLM` one (its head mapped
    onto `MaskedLMHead`); both load in every longlm Auto class (a new head starts fresh). Tokenizer files in
    `src` are copied. Raises one sentence for anything longlm cannot express (module docstring).
    """
    src, dst = Path(src), Path(dst)
    family = HF_FAMILIES.get(_read_model_type(src))
    hf_config = AutoConfig.from_pretrained(src)
    with_head = _has_mlm_head(hf_config, src)
    config = LongLMConfig(**family.config_fields(hf_config, str(src), with_head))
    if dst.resolve() == src.resolve():
        raise ValueError(f"The destination '{dst}' is the source folder; expected a different folder.")

    auto = AutoModelForMaskedLM if with_head else AutoModel
    hf_model, info = auto.from_pretrained(src, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith(family.ignored(with_head))]
    if missing:
        raise ValueError(
            f"The weights in '{src}' lack {sorted(missing)[:4]}; expected a complete {hf_config.model_type} checkpoint."
        )
    hf_state = hf_model.state_dict()
    dtype = next(hf_model.parameters()).dtype
    del hf_model

    model: LongLMPreTrainedModel = (LongLMForMaskedLM if with_head else LongLMModel)(config).to(dtype)
    weights = _renamed_weights(family, hf_config, hf_state, model.state_dict(), with_head, src)
    model.load_state_dict(weights, strict=True)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    _copy_tokenizer(src, dst)
    return dst


__all__ = ["HF_FAMILIES", "TOKENIZER_FILES", "HFFamily", "convert_hf_folder"]
