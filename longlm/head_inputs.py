"""The backbone inputs every head passes through unchanged, named once.

A head's `forward` declares only what it reads itself (`input_ids`, `attention_mask`, its labels,
`return_dict`, ...) and takes the backbone's other inputs as `**inputs: Unpack[BackboneInputs]`, handed to
`LongLMModel.forward` as they are. Its public signature (what `inspect.signature`, the Trainer's column
filter and `generate`'s keyword check see) is the head's own parameters plus these, keyword-only, with the
backbone's annotations and defaults (`with_backbone_inputs`). Loss keywords the Trainer adds
(`num_items_in_batch`) are taken apart by `split_loss_kwargs`; any other name is refused, so a misspelt
input cannot be dropped silently.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, TypedDict

if TYPE_CHECKING:
    import torch

    from longlm.memory.base import MemoryState


class BackboneInputs(TypedDict, total=False):
    """`LongLMModel.forward`'s optional inputs (documented there), passed by every head unchanged."""

    memory: MemoryState | None
    inputs_embeds: torch.Tensor | None
    output_hidden_states: bool | None
    output_attentions: bool | None
    global_attention_mask: torch.Tensor | None
    document_starts: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    segment_continues: bool
    segment_ends: bool
    use_cache: bool | None


BACKBONE_INPUTS: tuple[str, ...] = tuple(BackboneInputs.__annotations__)
# keywords Hugging Face's Trainer passes to a forward that takes **kwargs (its gradient-accumulation-exact loss)
LOSS_KWARGS: tuple[str, ...] = ("num_items_in_batch",)


def split_loss_kwargs(head: str, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone inputs, loss keywords) of a head's `**inputs`; an unknown name raises a TypeError naming it."""
    unknown = sorted(set(inputs) - set(BACKBONE_INPUTS) - set(LOSS_KWARGS))
    if unknown:
        raise TypeError(
            f"{head}.forward() got unexpected keyword argument(s) {unknown}; expected the head's own arguments or "
            f"some of {list(BACKBONE_INPUTS + LOSS_KWARGS)}."
        )
    loss = {name: inputs.pop(name) for name in LOSS_KWARGS if name in inputs}
    return inputs, loss


def with_backbone_inputs(backbone_forward: Callable) -> Callable[[Callable], Callable]:
    """Give a head's `forward` the public signature: its own parameters, then `BACKBONE_INPUTS` keyword-only
    (annotations and defaults from `backbone_forward`), then its `**inputs`."""
    backbone = inspect.signature(backbone_forward).parameters

    def decorate(head_forward: Callable) -> Callable:
        head = inspect.signature(head_forward)
        own = [p for p in head.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        rest = [p for p in head.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        passed = [backbone[name].replace(kind=inspect.Parameter.KEYWORD_ONLY) for name in BACKBONE_INPUTS if name not in taken]
        head_forward.__signature__ = head.replace(parameters=own + passed + rest)
        return head_forward

    return decorate
