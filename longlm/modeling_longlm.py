"""The Hugging Face face of longlm: `LongLMModel` and its heads (causal LM, masked LM, question answering).

The skeleton embeds tokens, runs the blocks (each with the mixer its config names) and lets the memory
module (the one its config names) read context before each layer and write the next state afterwards.
It never names a mechanism.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from longlm.attention.base import MixerInputs, TokenMixer
from longlm.attention.documents import document_numbers
from longlm.attention.kv_cache import KVCacheState, cached_call_slots
from longlm.configuration_longlm import LongLMConfig
from longlm.head_inputs import BackboneInputs, split_loss_kwargs, with_backbone_inputs
from longlm.layers.block import LongLMBlock
from longlm.layers.packing import PackedRows
from longlm.layers.positions import RotaryTable
from longlm.layers.recompute import flag_recomputation, recomputing
from longlm.layers.reversible import reversible_stack
from longlm.memory.base import MemoryState, SegmentMemory, SegmentPass
from longlm.memory.registry import MEMORIES
from longlm.outputs import LongLMCausalLMOutput, LongLMMaskedLMOutput, LongLMModelOutput, LongLMQuestionAnsweringOutput
from longlm.remote_code import AUTO_MAP, write_remote_code


# config fields every mixer and memory may read at construction that an evaluation may change afterwards
# (through `with_memory`); a memory adds its own `reconfigurable_options`
MEMORY_SETTINGS = ("mem_len", "clamp_len", "same_length")


class LongLMLayer(GradientCheckpointingLayer):
    """A block that HF's `gradient_checkpointing_enable()` can recompute in backward."""

    def __init__(self, config: LongLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.block = LongLMBlock(config, layer_idx)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> tuple[torch.Tensor, Any]:
        return self.block(hidden, inputs)


def _flag_second_run(checkpoint_func):
    """Reentrant checkpointing's rerun in backward is the second call of the wrapped function: flag it."""

    def run(function, *args: Any, **kwargs: Any):
        calls = 0

        def counted(*inner: Any, **inner_kwargs: Any):
            nonlocal calls
            calls += 1
            with recomputing() if calls > 1 else contextlib.nullcontext():
                return function(*inner, **inner_kwargs)

        return checkpoint_func(counted, *args, **kwargs)

    return run


class LongLMPreTrainedModel(PreTrainedModel):
    config_class = LongLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongLMLayer"]
    # the kernels `config._attn_implementation` may name (`longlm.attention.backends` runs them)
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TokenMixer):
            module.init_extra_parameters(lambda p: init.normal_(p, mean=0.0, std=self.config.initializer_range))

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args: Any, **kwargs: Any) -> None:
        """HF's checkpointing, with the recomputation flagged (`longlm.layers.recompute`) so that mixers with
        training side effects (centroid updates, `longlm.layers.recompute`) apply them once per step, as
        reversible blocks do.

        Non-reentrant checkpointing flags the rerun through `context_fn`; reentrant checkpointing (which takes
        no `context_fn`) runs the layer twice, so the second run of each call is the flagged one."""
        if self.config.reversible:
            raise ValueError(
                "Gradient checkpointing does not apply to reversible=True: reversible blocks already recompute "
                "their activations in backward; expected reversible=False to checkpoint layers."
            )
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if not options["use_reentrant"]:
            options.setdefault("context_fn", flag_recomputation)
        super()._activation_checkpointing_enable(options, *args, **kwargs)
        if options["use_reentrant"]:
            for module in self.modules():
                if isinstance(module, LongLMLayer) and module.gradient_checkpointing:
                    module._gradient_checkpointing_func = _flag_second_run(module._gradient_checkpointing_func)

    def with_memory(self, **settings: Any) -> "LongLMPreTrainedModel":
        """Change the memory an evaluation runs with (`mem_len`, `clamp_len`, `same_length`, and the memory's
        `reconfigurable_options`, e.g. `cmem_len`): the new values are validated as a whole config, then every
        mixer and memory reads them again (`configure`). Returns the model. The only way to change them after
        construction: setting `model.config.mem_len` directly is refused at the next forward."""
        base = self.base_model
        allowed = (*MEMORY_SETTINGS, *base.memory.reconfigurable_options)
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise ValueError(
                f"with_memory() cannot change {unknown}; expected some of {list(allowed)} (other fields change the "
                "architecture: build a new model from a new config)."
            )
        validated = type(self.config)(**{**self.config.to_dict(), **settings})
        try:
            for module in self.modules():
                if isinstance(module, (TokenMixer, SegmentMemory)):
                    module.configure(validated)
        except ValueError:
            for module in self.modules():
                if isinstance(module, (TokenMixer, SegmentMemory)):
                    module.configure(self.config)
            raise
        for name in settings:
            setattr(self.config, name, getattr(validated, name))
        base.configured_settings = base.memory_settings()
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save config + safetensors, plus the flat model code that `trust_remote_code=True` loads."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"Model folder '{path}' has no config.json; expected a folder written by save_pretrained "
                "or by scripts/export.py."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class LongLMModel(LongLMPreTrainedModel):
    """Embeddings -> blocks -> final norm; `forward(memory=...)` returns the next `.memory`."""

    def __init__(self, config: LongLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
        absolute = config.position_embedding_type == "absolute"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if absolute else None
        self.embed_token_types = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(LongLMLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.memory = MEMORIES.get(config.memory)(config)
        self.configured_settings = self.memory_settings()  # what the layers read; `with_memory` changes it
        self.gradient_checkpointing = False
        self.post_init()

    def memory_settings(self) -> dict[str, Any]:
        """The config values the layers read at construction that `with_memory` may change."""
        names = (*MEMORY_SETTINGS, *self.memory.reconfigurable_options)
        return {name: getattr(self.config, name) for name in names}

    def _check_settings_unchanged(self) -> None:
        """A memory setting changed on the config behind the layers' back would be silently ignored: refuse it."""
        for name, value in self.memory_settings().items():
            if value != self.configured_settings[name]:
                raise ValueError(
                    f"config.{name} was changed to {value!r} after the model was built (its layers run with "
                    f"{self.configured_settings[name]!r}); expected model.with_memory({name}={value!r}), which "
                    "validates the change and reconfigures every layer."
                )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(
        self,
        inputs_embeds: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        first_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (scaled) + absolute positions + token types, then the embedding norm: each part
        only when the config asks for it (BERT-family models have all three, the decoders none). Absolute
        positions count each row's real tokens (`attention_mask`), so left padding moves no position;
        `first_position` (B,) is where each row's tokens start (a cached generate() step)."""
        hidden = inputs_embeds * self.embed_scale
        length = hidden.shape[1]
        if self.embed_positions is not None:
            last = self.config.position_offset + length
            if last > self.config.max_position_embeddings:
                raise ValueError(
                    f"The sequence has {length} tokens but the absolute position table holds positions up to "
                    f"{self.config.max_position_embeddings - self.config.position_offset} "
                    f"(max_position_embeddings={self.config.max_position_embeddings}, "
                    f"position_offset={self.config.position_offset}); expected a shorter input."
                )
            positions = torch.arange(self.config.position_offset, last, device=hidden.device)[None]
            if attention_mask is not None and not bool(attention_mask.all()):
                positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0) + self.config.position_offset
            if first_position is not None:
                positions = positions + first_position[:, None]
                if int(positions.max()) >= self.config.max_position_embeddings:
                    raise ValueError(
                        f"Generation reached position {int(positions.max())} but the absolute position table holds "
                        f"{self.config.max_position_embeddings} positions; expected fewer new tokens."
                    )
            hidden = hidden + self.embed_positions(positions)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            hidden = hidden + self.embed_token_types(token_type_ids)
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        return self.dropout(hidden)

    def _key_mask(self, memory: MemoryState | None, attention_mask: torch.Tensor | None, batch: int, length: int, device):
        """(B, M + L) validity of [memory; segment] keys, or None when everything is valid.

        Training passes no attention_mask and a memory that knows on the host whether all its slots are
        valid, so this costs no device-to-host sync per segment.
        """
        context, _ = self.memory.context(memory, 0)
        memory_valid = self.memory.known_valid_mask(memory)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if memory_valid is None and attention_mask is None:
            return None
        memory_length = 0 if context is None else context.shape[1]
        parts = [
            torch.ones(batch, memory_length, dtype=torch.bool, device=device) if memory_valid is None else memory_valid.bool(),
            torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool(),
        ]
        return torch.cat(parts, dim=1)

    @property
    def supports_kv_cache(self) -> bool:
        """Whether generate() can cache keys/values (`longlm.attention.kv_cache`): the memory adds no state of
        its own and every layer's mixer attends its pattern from a cache."""
        mixers_cache = all(layer.block.mixer.supports_kv_cache for layer in self.layers)
        return bool(self.config.is_decoder) and self.memory.allows_kv_cache and mixers_cache

    def _check_kv_cache(self, memory: MemoryState | None) -> None:
        if isinstance(memory, KVCacheState) and not self.supports_kv_cache:
            raise ValueError(
                "memory is a KVCacheState but this model cannot attend from cached keys/values (its memory or a "
                "mixer does not support it); expected the memory this model returned."
            )
        if isinstance(memory, KVCacheState) and len(memory.keys) != len(self.layers):
            raise ValueError(
                f"memory is a KVCacheState of {len(memory.keys)} layers but the model has {len(self.layers)}; "
                "expected the cache this model returned."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory: MemoryState | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        global_attention_mask: torch.Tensor | None = None,
        document_starts: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        segment_continues: bool = False,
        segment_ends: bool = True,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> LongLMModelOutput:
        """`global_attention_mask` (B, L): 1 on tokens with global attention (Hugging Face's convention; read by
        the mixers that have global tokens). `document_starts` (B, L): True on tokens that begin a new
        document inside the segment (read by memories that must forget at document ends).
        `segment_continues` / `segment_ends` (generate sets them; one call is one segment otherwise): this
        call continues the previous call's segment / more tokens of this segment follow.
        `use_cache=True` on a model whose memory and mixers allow it (`supports_kv_cache`) returns the
        mixers' keys/values as `.memory` (a `KVCacheState`); passing that back as `memory` feeds only the new
        tokens (what `generate()` does)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        self._check_settings_unchanged()
        output_hidden_states = _flag(output_hidden_states, self.config.output_hidden_states)
        return_dict = _flag(return_dict, self.config.return_dict)
        if _flag(output_attentions, self.config.output_attentions):
            raise ValueError(
                "output_attentions=True is not available: longlm's mixers attend through fused kernels (SDPA, "
                "block-sparse, hashed, top-k retrieval) that never form the attention probabilities; expected "
                "output_attentions=False."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        tokens_shape = tuple(inputs_embeds.shape[:2])
        checked = {
            "attention_mask": attention_mask,
            "global_attention_mask": global_attention_mask,
            "document_starts": document_starts,
            "token_type_ids": token_type_ids,
        }
        for name, tensor in checked.items():
            if tensor is None or tuple(tensor.shape) == tokens_shape:
                continue
            if tensor.dim() == 2 and tensor.shape[0] == tokens_shape[0] and tensor.shape[1] > tokens_shape[1]:
                raise ValueError(
                    f"{name} covers {tensor.shape[1]} positions but the sequence has {tokens_shape[1]} tokens; "
                    f"expected the shape of input_ids, {tokens_shape}."
                )
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected the shape of input_ids, {tokens_shape}.")
        kv_cache = memory if isinstance(memory, KVCacheState) else None
        if kv_cache is not None or use_cache is True:
            self._check_kv_cache(memory)
        caching = kv_cache is not None or (use_cache is True and self.supports_kv_cache)
        memory = None if kv_cache is not None else memory
        hidden = self.embed(
            inputs_embeds, token_type_ids, attention_mask, None if kv_cache is None else kv_cache.next_position
        )
        if not segment_continues:
            memory = self.memory.begin_segment(memory)
        if memory is not None and document_starts is not None and bool(document_starts[:, 0].any()):
            memory = memory.reset_rows(document_starts[:, 0].bool())  # a document begun here reads nothing older
        hidden, before, after = self.memory.extend_inputs(memory, hidden, document_starts)
        batch, length = hidden.shape[:2]

        def extended(mask: torch.Tensor | None, fill: bool) -> torch.Tensor | None:
            """A (B, L) token mask over the extended sequence (tokens the memory added get `fill`)."""
            return mask if mask is None or not (before or after) else F.pad(mask.long(), (before, after), value=int(fill))

        token_mask = extended(attention_mask, True)
        global_mask = extended(global_attention_mask, False)
        starts = extended(document_starts, False)
        global_mask = None if global_mask is None or not bool(global_mask.any()) else global_mask.bool()
        starts = None if starts is None else starts.bool()
        if starts is not None and before:  # tokens the memory adds before a segment that begins a document belong to it
            starts = starts.clone()
            starts[:, 0] |= starts[:, before]
            starts[:, before] = False
        # padding after the real positions of every row, so patterns count positions from the first real token
        if token_mask is not None and not bool(token_mask.all()):
            self.memory.check_padding(memory, attention_mask)
        # a cached step masks by each slot's own position instead (`kv_cache.py`)
        layout = None if token_mask is None or kv_cache is not None else PackedRows.for_mask(token_mask)
        if layout is not None:
            hidden, token_mask = layout.pack(hidden), layout.pack(token_mask)
        packed_starts = starts if layout is None else layout.pack(starts)
        key_mask = self._key_mask(memory, token_mask, batch, length, hidden.device)
        slots: list = [None] * len(self.layers)
        if caching:
            slots, next_position, last_document = cached_call_slots(
                kv_cache, len(self.layers), token_mask, packed_starts, (batch, length), hidden.device
            )
        contexts = [self.memory.context(memory, layer_idx)[0] for layer_idx in range(len(self.layers))]
        rotary = None
        if self.config.position_embedding_type == "rotary":  # one table for every layer: [memory; segment] positions
            longest = length + max((0 if c is None else c.shape[1]) for c in contexts)
            rotary = RotaryTable(longest, self.config.head_dim, self.config.rope_theta, hidden.device)
        mixer_inputs = [
            MixerInputs(
                contexts[layer_idx],
                key_mask,
                causal=self.config.is_decoder,
                payload=self.memory.mixer_payload(memory, layer_idx),
                global_mask=global_mask if layout is None else layout.pack(global_mask),
                document_starts=packed_starts,
                documents=document_numbers(packed_starts, contexts[layer_idx]),
                cache=slots[layer_idx],
                rotary=rotary,
            )
            for layer_idx in range(len(self.layers))
        ]
        layer_inputs: list[torch.Tensor] = []
        writes: list[Any] = [None] * len(self.layers)  # what each layer's mixer hands the memory
        if self.config.reversible:  # no per-layer activations kept (the config allows no memory that reads them)
            hidden = reversible_stack([layer.block for layer in self.layers], hidden, mixer_inputs)
        else:
            for index, (layer, inputs) in enumerate(zip(self.layers, mixer_inputs)):
                layer_inputs.append(hidden)
                hidden, writes[index] = layer(hidden, inputs)
        hidden = self.dropout(self.final_norm(hidden))
        if layout is not None:
            hidden, layer_inputs = layout.unpack(hidden), [layout.unpack(h) for h in layer_inputs]
        projections = (
            [layer.block.mixer.content_projections() for layer in self.layers]
            if self.memory.needs_projections(self.config)
            else []
        )
        segment = SegmentPass(
            layer_inputs,
            hidden,
            attention_mask,
            writes=writes,
            projections=projections,
            document_starts=starts,
            segment_ends=segment_ends,
            layout=layout,
        )
        new_memory = self.memory.update(memory, segment)
        if caching:
            fed = tokens_shape[1] + (0 if kv_cache is None else kv_cache.num_tokens)
            new_memory = KVCacheState.from_slots(slots, next_position, last_document, fed)
        aux_losses = self.memory.auxiliary_losses(memory, segment) if self.training else {}
        if output_hidden_states and self.config.reversible:
            raise ValueError(
                "output_hidden_states is not available with reversible=True: reversible blocks keep no per-layer "
                "activations; expected output_hidden_states=False or a config with reversible=False."
            )
        tokens = slice(before, hidden.shape[1] - after)  # drop the positions the memory added (memory tokens)
        all_hidden = tuple(h[:, tokens] for h in (*layer_inputs, hidden)) if output_hidden_states else None
        output = LongLMModelOutput(
            last_hidden_state=hidden[:, tokens], hidden_states=all_hidden, memory=new_memory, aux_losses=aux_losses or None
        )
        return output if return_dict else output.to_tuple()


class LongLMForCausalLM(LongLMPreTrainedModel, GenerationMixin):
    """Decoder LM head (tied to the input embeddings by default).

    `labels` follow HF (the same ids as `input_ids`, shifted inside); `shift_labels` are targets already
    aligned with the inputs, which segment-recurrent training uses so that the last token of a segment
    is also trained (its target is the first token of the next segment).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLMConfig) -> None:
        super().__init__(config)
        self.model = LongLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @with_backbone_inputs(LongLMModel.forward)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **inputs: Unpack[BackboneInputs],
    ) -> LongLMCausalLMOutput:
        """Next-token logits; `labels` (B, L) are the input ids (shifted here, -100 ignored). `shift_labels`
        (already shifted targets) may be passed instead; it is not in the signature because the Trainer takes
        every `*label*` argument there as a required batch key. `num_items_in_batch` (the Trainer's count of
        targets over the accumulated batches) makes the loss a sum over that count, so gradient accumulation
        equals one large batch."""
        shift_labels = inputs.pop("shift_labels", None)
        inputs, loss_kwargs = split_loss_kwargs(type(self).__name__, inputs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **inputs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = None
        if labels is not None and shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        if shift_labels is not None:
            lm_loss, share = _token_loss(logits, shift_labels, **loss_kwargs)
            loss = _with_aux_losses(lm_loss, outputs.aux_losses, share)
        output = LongLMCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            memory=outputs.memory,
            lm_loss=lm_loss,
            aux_losses=outputs.aux_losses,
        )
        return output if _flag(return_dict, self.config.return_dict) else output.to_tuple()

    # --- generation: the memory is the cache -------------------------------------------------------
    # During generate() the memory travels in `model_kwargs[GENERATION_MEMORY_KEY]`, a name every
    # transformers 5.x generate loop treats as a model's own cache: beam search reorders it with the
    # beams (through `_reorder_cache`) and `return_dict_in_generate` returns it as the output's cache.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The memory is the cache: generate must not build a `DynamicCache` beside it."""
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the memory has not absorbed when the memory carries the context, or when the
        model caches keys/values instead (`LongLMModel.supports_kv_cache`); otherwise feed
        the whole sequence again, with what the memory says each step reads
        (`SegmentMemory.generation_memory`: nothing for most memories).

        The prompt and the generated tokens are one segment that no step ends (`segment_continues` /
        `segment_ends`), so each step sees what one forward over prompt + generated tokens would; a memory
        generate returned continues that segment in the next generate call, and the next plain forward
        (training, evaluation) ends it. With `use_cache=False` every step is one forward over the whole
        sequence after the memory the caller passed."""
        memory = generation_memory_from(kwargs)
        carries = self.model.memory.carries_context
        use_cache = kwargs.get("use_cache", self.config.use_cache) is not False
        document_starts = kwargs.get("document_starts")  # the prompt's; generated tokens begin no document
        if document_starts is not None:
            document_starts = F.pad(document_starts.bool(), (0, input_ids.shape[1] - document_starts.shape[1]))
        segment: dict[str, bool] = {}
        kv_cached = use_cache and not carries and self.model.supports_kv_cache
        if (carries or kv_cached) and use_cache:
            if memory is not None:  # the sequence so far: the memory has absorbed its first num_tokens
                seen = memory.num_tokens
                input_ids = input_ids[:, seen:]
                attention_mask = None if attention_mask is None else attention_mask[:, seen:]
                document_starts = None if document_starts is None else document_starts[:, seen:]
            # a memory passed to generate (one it returned) continues its text: its segment goes on
            segment = {"segment_continues": True, "segment_ends": False} if carries else {"use_cache": True}
        elif not carries:
            memory = self.model.memory.generation_memory(memory, input_ids.shape[0])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "memory": memory, **segment}
        if document_starts is not None and bool(document_starts.any()):
            inputs["document_starts"] = document_starts
        # generate's output switches (output_hidden_states / output_attentions with return_dict_in_generate)
        inputs.update({name: kwargs[name] for name in GENERATION_FLAGS if name in kwargs})
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if model_kwargs.get("use_cache", self.config.use_cache) is False and self.model.memory.carries_context:
            return model_kwargs  # no cache: every step starts again from the caller's memory
        for name in (*_USER_MEMORY_KEYS, GENERATION_MEMORY_KEY):
            model_kwargs.pop(name, None)
        model_kwargs[GENERATION_MEMORY_KEY] = outputs.memory
        return model_kwargs

    @staticmethod
    def _reorder_cache(memory: MemoryState | None, beam_idx: torch.LongTensor) -> MemoryState | None:
        return None if memory is None else memory.select_rows(beam_idx)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """HF repeats the tensors for beams / `num_return_sequences`; a memory passed in is repeated the same way."""
        memory = generation_memory_from(model_kwargs)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if memory is not None and expand_size > 1:
            for name in (*_USER_MEMORY_KEYS, GENERATION_MEMORY_KEY):
                model_kwargs.pop(name, None)
            rows = torch.arange(input_ids.shape[0] // expand_size, device=input_ids.device).repeat_interleave(expand_size)
            model_kwargs[GENERATION_MEMORY_KEY] = memory.select_rows(rows)
        return input_ids, model_kwargs


# The key under which generate() carries the memory between steps. transformers 5.23 names its own cache
# `past_key_values` and 5.24 `cache` (and gives both a `Cache` meaning: `DynamicCache`, `get_seq_length`);
# `mems` is the model-owned cache name both keep in `ALL_CACHE_NAMES`, so reordering and returning it work
# the same on each.
GENERATION_MEMORY_KEY = "mems"
# Per-call switches generate() puts in its model kwargs, forwarded to every step's forward.
GENERATION_FLAGS = ("output_hidden_states", "output_attentions", "return_dict")
# Names a user may pass a memory under: `memory` (forward's name) and the HF cache names.
_USER_MEMORY_KEYS = ("memory", "cache", "past_key_values")


def generation_memory_from(model_kwargs: dict[str, Any]) -> MemoryState | None:
    """The memory generate() is carrying, or the one the user passed to it, whichever key holds it."""
    for name in (GENERATION_MEMORY_KEY, *_USER_MEMORY_KEYS):
        if isinstance(model_kwargs.get(name), MemoryState):
            return model_kwargs[name]
    return None


def generated_memory(output: Any) -> MemoryState | None:
    """The memory at the end of `generate(..., return_dict_in_generate=True)` (`cache` from transformers
    5.24 on, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        if isinstance(getattr(output, name, None), MemoryState):
            return getattr(output, name)
    return None


def _flag(value: bool | None, default: bool | None) -> bool:
    """A per-call output switch, falling back to the config's (HF's convention for return_dict and friends)."""
    return bool(default) if value is None else bool(value)


def _token_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(cross-entropy over the targets that are not -100, this batch's share of the targets).

    Without `num_items_in_batch` the loss is the mean over this batch's targets (share 1). With it (the
    Trainer's count over every batch of one accumulated step) the loss is the sum over that count, as
    Hugging Face's own heads compute it, so accumulated batches of unequal target counts add up to the
    mean over all of them; the share (this batch's targets / the count) weights the auxiliary losses alike."""
    flat_logits, flat_targets = logits.float().flatten(0, 1), targets.flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100), 1.0
    total = torch.as_tensor(num_items_in_batch, device=logits.device)
    summed = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    return summed / total, (flat_targets != -100).sum() / total


def _with_aux_losses(
    loss: torch.Tensor | None, aux_losses: dict[str, torch.Tensor] | None, share: float | torch.Tensor = 1.0
) -> torch.Tensor | None:
    """The training loss: the head's loss plus the memory's auxiliary losses (which train only the memory),
    weighted by the batch's share of an accumulated step's targets (`_token_loss`)."""
    return loss + share * sum(aux_losses.values()) if loss is not None and aux_losses else loss


class MaskedLMHead(nn.Module):
    """BERT/RoBERTa's MLM head: dense -> activation -> LayerNorm -> vocabulary projection (tied to the input
    embeddings) with a bias. The same layout as theirs, so `scripts/convert_hf.py` can carry a pretrained
    head over."""

    def __init__(self, config: LongLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class LongLMForMaskedLM(LongLMPreTrainedModel):
    """Encoder (`is_decoder=False`) with an MLM head; `labels` hold the original ids at masked positions and
    -100 elsewhere (what `longlm.training.masking` produces). With a memory `.memory` goes to the
    next segment, as for the decoder."""

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLMConfig) -> None:
        if config.is_decoder:
            raise ValueError(
                "LongLMForMaskedLM needs a bidirectional encoder, but config.is_decoder is True; "
                "expected is_decoder=False."
            )
        super().__init__(config)
        self.model = LongLMModel(config)
        self.lm_head = MaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.decoder = value

    @with_backbone_inputs(LongLMModel.forward)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **inputs: Unpack[BackboneInputs],
    ) -> LongLMMaskedLMOutput:
        """Token logits; `labels` (B, L) hold the original id at masked positions and -100 elsewhere
        (`num_items_in_batch` as in the causal head)."""
        inputs, loss_kwargs = split_loss_kwargs(type(self).__name__, inputs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **inputs)
        logits = self.lm_head(outputs.last_hidden_state)
        mlm_loss, share = _token_loss(logits, labels, **loss_kwargs) if labels is not None else (None, 1.0)
        output = LongLMMaskedLMOutput(
            loss=_with_aux_losses(mlm_loss, outputs.aux_losses, share),
            logits=logits,
            hidden_states=outputs.hidden_states,
            memory=outputs.memory,
            lm_loss=mlm_loss,
            aux_losses=outputs.aux_losses,
        )
        return output if _flag(return_dict, self.config.return_dict) else output.to_tuple()


def question_global_mask(input_ids: torch.LongTensor, sep_token_id: int | None) -> torch.Tensor:
    """Hugging Face's convention for QA inputs `<s> question </s></s> context </s>`: global attention on every
    token before the first separator (the question and the `<s>` before it, whose logit is the null answer)."""
    if sep_token_id is None:
        raise ValueError(
            "Global attention on the question needs config.sep_token_id (the separator after the question); "
            "expected it set, as scripts/finetune_qa.py sets it from the tokenizer, or a global_attention_mask."
        )
    is_sep = input_ids == sep_token_id
    missing = (~is_sep.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"Row {missing[0]} of input_ids holds no sep_token_id ({sep_token_id}), so its question cannot be found; "
            "expected `<s> question </s></s> context </s>` as the tokenizer builds it for a (question, context) pair."
        )
    first_sep = is_sep.int().argmax(dim=1)
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < first_sep[:, None]


class LongLMForQuestionAnswering(LongLMPreTrainedModel):
    """Extractive QA: start/end logits per token (SQuAD v2's null answer is the first token, `<s>`).

    When a layer's mixer has global tokens (`TokenMixer.has_global_tokens`) and no `global_attention_mask` is given,
    the question tokens get global attention (`question_global_mask`), unless
    `config.question_global_attention` is False (then no token is global: window-only attention). Loads from any longlm folder,
    a decoder's too: the backbone weights carry over, the span head starts fresh.
    """

    def __init__(self, config: LongLMConfig) -> None:
        super().__init__(config)
        self.model = LongLMModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @property
    def uses_global_tokens(self) -> bool:
        return any(layer.block.mixer.has_global_tokens for layer in self.model.layers)

    @with_backbone_inputs(LongLMModel.forward)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **inputs: Unpack[BackboneInputs],
    ) -> LongLMQuestionAnsweringOutput:
        """Start/end logits; `start_positions` / `end_positions` (B,) train them. Without a
        `global_attention_mask`, mixers with global tokens attend globally from the question."""
        inputs, _ = split_loss_kwargs(type(self).__name__, inputs)  # the span loss is a mean over rows
        if global_attention_mask is None and input_ids is not None and self.uses_global_tokens:
            if self.config.question_global_attention:
                global_attention_mask = question_global_mask(input_ids, self.config.sep_token_id)
            else:
                global_attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            return_dict=True,
            **inputs,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).float().unbind(dim=-1)
        if attention_mask is not None:  # padding is never an answer
            start_logits = start_logits.masked_fill(~attention_mask.bool(), torch.finfo(start_logits.dtype).min)
            end_logits = end_logits.masked_fill(~attention_mask.bool(), torch.finfo(end_logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            # HF's convention: positions outside the sequence are ignored
            ignored = start_logits.shape[1]
            start = F.cross_entropy(start_logits, start_positions.clamp(0, ignored), ignore_index=ignored)
            end = F.cross_entropy(end_logits, end_positions.clamp(0, ignored), ignore_index=ignored)
            loss = _with_aux_losses((start + end) / 2, outputs.aux_losses)
        output = LongLMQuestionAnsweringOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            global_attention_mask=global_attention_mask,
            memory=outputs.memory,
        )
        return output if _flag(return_dict, self.config.return_dict) else output.to_tuple()


__all__ = [
    "LongLMPreTrainedModel",
    "LongLMModel",
    "LongLMForCausalLM",
    "LongLMForMaskedLM",
    "LongLMForQuestionAnswering",
    "question_global_mask",
]
