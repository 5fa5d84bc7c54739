"""Reversible residual blocks (Gomez et al. 2017; Kitaev et al. 2020 use them for long inputs).

The hidden state is carried as two streams, both starting as the embeddings:
    y1 = x1 + F(x2)        F = the block's mixer branch   (dropout(mixer(norm(x))))
    y2 = x2 + G(y1)        G = the block's feed-forward branch
and the stack returns (y1 + y2) / 2 of the last block. Because each block can be inverted
(x2 = y2 - G(y1), x1 = y1 - F(x2)), the forward keeps no per-layer activations: backward recomputes
each block from the outputs of the one above, one block at a time, so activation memory does not grow
with depth. Dropout draws the same masks in the recomputation (the RNG state of each branch is saved),
and `longlm.layers.recompute.recomputing()` tells mixers with training side effects that a forward is a
rerun.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from longlm.attention.base import MixerInputs
from longlm.layers.recompute import recomputing


class _RngState:
    """The CPU (and current CUDA device's) RNG state at a point, to replay a branch's dropout exactly."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _two_streams(blocks, inputs, x1, x2, rng_states: list | None = None):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) through every block; records each branch's RNG state if asked."""
    for block, block_inputs in zip(blocks, inputs):
        f_state = _RngState(x2.device) if rng_states is not None else None
        x1 = x1 + block.mixer_branch(x2, block_inputs)
        g_state = _RngState(x1.device) if rng_states is not None else None
        x2 = x2 + block.feed_forward_branch(x1)
        if rng_states is not None:
            rng_states.append((f_state, g_state))
    return x1, x2


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks, inputs, *parameters):
        states: list[tuple[_RngState, _RngState]] = []
        with torch.no_grad():
            x1, x2 = _two_streams(blocks, inputs, x1, x2, states)
        ctx.blocks, ctx.inputs, ctx.states = blocks, inputs, states
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        y1, y2 = ctx.saved_tensors
        rng = torch.get_rng_state()
        try:
            for block, block_inputs, (f_state, g_state) in reversed(list(zip(ctx.blocks, ctx.inputs, ctx.states))):
                with torch.enable_grad(), recomputing():
                    y1 = y1.detach().requires_grad_(True)
                    g_state.restore()
                    g = block.feed_forward_branch(y1)
                    torch.autograd.backward(g, grad_y2)  # parameter grads of G; grad_y1 += dG/dy1
                    grad_y1 = grad_y1 + y1.grad
                    with torch.no_grad():
                        x2 = y2 - g
                    x2 = x2.detach().requires_grad_(True)
                    f_state.restore()
                    f = block.mixer_branch(x2, block_inputs)
                    torch.autograd.backward(f, grad_y1)
                    grad_y2 = grad_y2 + x2.grad
                    with torch.no_grad():
                        x1 = y1 - f
                y1, y2 = x1.detach(), x2.detach()
        finally:
            torch.set_rng_state(rng)
        return (grad_y1, grad_y2, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


def reversible_stack(blocks: Sequence[nn.Module], hidden: torch.Tensor, inputs: Sequence[MixerInputs]) -> torch.Tensor:
    """Run pre-norm `LongLMBlock`s reversibly over `hidden` (B, L, D); returns the mean of the two streams."""
    parameters = [p for block in blocks for p in block.parameters() if p.requires_grad]
    if not torch.is_grad_enabled():  # nothing to recompute: the plain two-stream forward
        y1, y2 = _two_streams(blocks, inputs, hidden, hidden)
        return (y1 + y2) / 2
    y1, y2 = _ReversibleStack.apply(hidden, hidden, list(blocks), list(inputs), *parameters)
    return (y1 + y2) / 2
