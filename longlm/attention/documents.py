"""Block-diagonal attention by document: the one rule every mixer applies to `MixerInputs.documents`."""
from __future__ import annotations

import torch


def document_numbers(document_starts: torch.Tensor | None, memory: torch.Tensor | None) -> torch.Tensor | None:
    """(B, M + L) long: the document of every key of [memory; segment] (memory slots belong to the document
    the segment starts in), or None when `document_starts` marks nothing."""
    if document_starts is None or not bool(document_starts.any()):
        return None
    numbers = document_starts.long().cumsum(dim=1)
    memory_length = 0 if memory is None else memory.shape[1]
    return torch.nn.functional.pad(numbers, (memory_length, 0), value=0)


def same_document(query_documents: torch.Tensor, key_documents: torch.Tensor) -> torch.Tensor:
    """(B, Lq, Lk) bool: True where query and key lie in the same document."""
    return query_documents[:, :, None] == key_documents[:, None, :]
