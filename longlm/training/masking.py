"""BERT's masked-LM corruption (Devlin et al. 2019): which tokens the model must predict, and what it sees.

Selection: every maskable token (any id outside the tokenizer's special ids, so never `<pad>`, `<s>`,
`</s>`, `<unk>` or `<mask>`) is selected with `probability` (0.15). With `whole_word`, the draw is made once
per word and all maskable tokens of a selected word are selected together. Of the selected tokens 80% are
replaced by `<mask>`, 10% by a random non-special token and 10% kept (so the model cannot learn that only
`<mask>` positions matter); `labels` hold the original id at the selected positions and -100 elsewhere.

Words. A word is a token that starts a word plus the continuation tokens after it. Which tokens start a
word is read once from the vocabulary, with one rule for every tokenizer that keeps whitespace: a token
starts a word when its text begins with whitespace, in the tokenizer's own spelling of whitespace:

* byte-level BPE (GPT-2/RoBERTa, our PG-19 BPE): `Ġ` (space), `Ċ` (newline), `ĉ` (tab), ...;
* SentencePiece: `▁` (space), or a byte-fallback piece of a whitespace byte (`<0x0A>`);
* the byte tokenizer (ByT5 ids, enwik8): a whitespace byte. So the space belongs to the word after it,
  exactly as `Ġ`/`▁` make it belong there in the subword tokenizers, and " the" is one word of 4 bytes.

WordPiece drops whitespace and spells continuations `##...`: there, every token but those starts a word.
Within a sequence, the first token and every token after a special token also start a word (so a word never
spans a document boundary). A word cut by a segment boundary is two words, one in each segment.

Randomness: `masker(input_ids, generator)` draws three (B, L) tensors from `generator`, or from torch's global
RNG when it is None, whatever the ids are, so the same RNG state always gives the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

MASK_FRACTION = 0.8  # of the selected tokens, replaced by <mask>
RANDOM_FRACTION = 0.1  # replaced by a random non-special token; the remaining 0.1 are kept

ASCII_WHITESPACE = " \t\n\r\x0b\x0c"
# byte-level BPE shows byte b < 33 as chr(256 + b) (GPT-2's printable alphabet), SentencePiece a space as ▁
WHITESPACE_SPELLINGS = tuple(ASCII_WHITESPACE) + tuple(chr(256 + ord(c)) for c in ASCII_WHITESPACE) + ("▁",)
BYTE_FALLBACK_WHITESPACE = {f"<0x{ord(c):02X}>" for c in ASCII_WHITESPACE}


@dataclass(frozen=True)
class MaskingOptions:
    """`model.masking` in the YAML: `probability` of selecting a token (or word), `whole_word` selection."""

    probability: float = 0.15
    whole_word: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)) or not 0 < self.probability < 1:
            raise ValueError(f"masking.probability must be a number in (0, 1), got {self.probability!r}.")
        if not isinstance(self.whole_word, bool):
            raise ValueError(f"masking.whole_word must be true or false, got {self.whole_word!r}.")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "MaskingOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"Unknown masking option(s) {unknown}; expected some of {sorted(known)}.")
        return cls(**options)


def _wordpiece_prefix(tokenizer) -> str | None:
    """The continuation prefix (`##`) of a fast WordPiece tokenizer, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ == "WordPiece":
        return model.continuing_subword_prefix
    return None


def word_start_table(tokenizer) -> torch.Tensor:
    """(len(tokenizer),) bool: does token id i start a word (see the module docstring); specials do."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    prefix = _wordpiece_prefix(tokenizer)
    if prefix is not None:
        starts = [not token.startswith(prefix) for token in tokens]
    else:
        starts = [token.startswith(WHITESPACE_SPELLINGS) or token in BYTE_FALLBACK_WHITESPACE for token in tokens]
    table = torch.tensor(starts, dtype=torch.bool)
    table[special_ids(tokenizer)] = True
    return table


def special_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


class TokenMasker:
    """`masker(input_ids, generator=None) -> (corrupted input_ids, labels)` for one tokenizer's ids."""

    def __init__(self, tokenizer, options: MaskingOptions = MaskingOptions()) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"Masked-LM training needs a tokenizer with a mask token, but {type(tokenizer).__name__} has none; "
                "expected one passed through longlm.data.encoder_tokens.with_encoder_tokens (the data module's "
                "encoder_tokens=True, which the CLI sets for model.task 'mlm')."
            )
        self.options = options
        self.mask_token_id = tokenizer.mask_token_id
        size = len(tokenizer)
        self.special = torch.zeros(size, dtype=torch.bool)
        self.special[special_ids(tokenizer)] = True
        self.replacements = (~self.special).nonzero().flatten()
        self.word_start = word_start_table(tokenizer)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(special, replacements, word_start) on `device`, copied there once."""
        if device not in self._on_device:
            self._on_device[device] = tuple(t.to(device) for t in (self.special, self.replacements, self.word_start))
        return self._on_device[device]

    def word_starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the positions that begin a word (by token, at the sequence start, after a special)."""
        special, _, word_start = self._tables(input_ids.device)
        starts = word_start[input_ids]
        starts[:, 0] = True
        starts[:, 1:] |= special[input_ids[:, :-1]]
        return starts

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        special, replacements, _ = self._tables(input_ids.device)
        shape, device = input_ids.shape, input_ids.device
        draw = torch.rand(shape, generator=generator, device=device)
        action = torch.rand(shape, generator=generator, device=device)
        random_ids = replacements[torch.randint(len(replacements), shape, generator=generator, device=device)]
        if self.options.whole_word:  # every token reads the draw of the first token of its word
            positions = torch.arange(shape[1], device=device).expand(shape)
            first = torch.where(self.word_starts(input_ids), positions, 0).cummax(dim=1).values
            draw = draw.gather(1, first)
        selected = (draw < self.options.probability) & ~special[input_ids]
        corrupted = torch.where(selected & (action < MASK_FRACTION), self.mask_token_id, input_ids)
        use_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
        corrupted = torch.where(use_random, random_ids, corrupted)
        labels = torch.where(selected, input_ids, -100)
        return corrupted, labels


__all__ = ["MaskingOptions", "TokenMasker", "word_start_table", "MASK_FRACTION", "RANDOM_FRACTION"]
