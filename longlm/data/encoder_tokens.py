"""Give a fast tokenizer what an encoder needs: `<s>`, `</s>`, `<mask>`, `<pad>` and the pair template.

Masked-LM pretraining needs a mask token; question answering needs the pair layout
`<s> question </s></s> context </s>` (RoBERTa's, which Longformer uses) with offsets that skip the space a
byte-level piece carries. Tokenizers that already have a pair template (a converted Longformer's or
BigBird's) keep theirs; ours (PG-19's BPE) get RoBERTa's post-processor from `tokenizers`.
"""
from __future__ import annotations

import copy

from tokenizers import pre_tokenizers, processors

ENCODER_SPECIAL_TOKENS = {"cls_token": "<s>", "bos_token": "<s>", "sep_token": "</s>", "eos_token": "</s>", "mask_token": "<mask>", "pad_token": "<pad>"}


def require_fast(tokenizer, purpose: str):
    """The tokenizer itself, or one clear sentence: offsets (and pair overflow) exist only in fast tokenizers."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{purpose} needs a fast tokenizer (one backed by `tokenizers`, for character offsets), "
            f"got {type(tokenizer).__name__}; expected e.g. a PreTrainedTokenizerFast or a tokenizer.json folder."
        )
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return isinstance(pre, pre_tokenizers.ByteLevel) or "ByteLevel" in repr(pre)


def with_encoder_tokens(tokenizer):
    """A copy of `tokenizer` with the encoder's special tokens (added where missing, at the end of the
    vocabulary) and, for a fast tokenizer without a pair template, RoBERTa's `<s> A </s></s> B </s>` with
    trimmed offsets. (A slow one, such as the byte tokenizer, gets the tokens: enough for masked LM.)"""
    tokenizer = copy.deepcopy(tokenizer)
    missing = {role: token for role, token in ENCODER_SPECIAL_TOKENS.items() if getattr(tokenizer, role, None) is None}
    if missing:
        tokenizer.add_special_tokens(missing)
    if getattr(tokenizer, "is_fast", False) and tokenizer.num_special_tokens_to_add(pair=True) == 0:  # no template (transformers 5 sets an empty one)
        sep, cls = tokenizer.sep_token, tokenizer.cls_token
        tokenizer.backend_tokenizer.post_processor = processors.RobertaProcessing(
            (sep, tokenizer.convert_tokens_to_ids(sep)),
            (cls, tokenizer.convert_tokens_to_ids(cls)),
            trim_offsets=_is_byte_level(tokenizer),
            add_prefix_space=False,
        )
        tokenizer._should_update_post_processor = False  # keep it: transformers would rebuild bos/eos-only ones
    return tokenizer
