"""The token-mixer plug point: what every mixer receives and must return."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.backends import implementation_of
from longlm.options import Option

if TYPE_CHECKING:
    from longlm.attention.kv_cache import CacheSlot
    from longlm.layers.positions import RotaryTable
    from longlm.configuration_longlm import LongLMConfig


@dataclass
class MixerInputs:
    """Everything beyond the segment's hidden states that a mixer may use.

    `memory` holds hidden states from earlier segments (B, M, D) to be attended as extra keys/values
    (the Transformer-XL way); `key_mask` (B, M + L) is True where a key may be attended (memory slots
    that are filled and not reset, non-padding tokens); `causal` says whether a query may see later keys.
    `payload` is whatever the model's memory hands this layer beyond hidden states (e.g. a kNN store for
    the `knn` mixer); mixers that do not know it ignore it.
    `global_mask` (B, L) marks the segment tokens with global attention (the model's
    `global_attention_mask`, Longformer's convention); `document_starts` (B, L) marks the tokens that
    begin a new document. Both are None when absent, and mixers that have no use for them ignore them.
    `documents` (B, M + L) long numbers the document of every key position of [memory; segment] (the
    queries are its last L positions): 0 for the memory and up to the first start inside the segment, +1
    at every start, so it never decreases along a row. A query may attend a key only when both carry the
    same number (block-diagonal by document); every mixer must honour it. None when no document starts
    inside the segment (then every key is in the query's document).
    `rotary` is the forward's shared table of rotary cos/sin (`longlm.layers.positions.RotaryTable`), or None.
    `cache` is this layer's `longlm.attention.kv_cache.CacheSlot` during a cached `generate()` (only for
    mixers that declare `supports_kv_cache`): with `cache.past` set, the mixer attends [cached; new] keys
    by `cache.mask(...)` instead of the fields above, and in every cached call it writes its keys back.
    """

    memory: torch.Tensor | None
    key_mask: torch.Tensor | None
    causal: bool
    payload: Any = None
    global_mask: torch.Tensor | None = None
    document_starts: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    cache: "CacheSlot | None" = None
    rotary: "RotaryTable | None" = None

    @property
    def memory_length(self) -> int:
        return 0 if self.memory is None else self.memory.shape[1]


@dataclass
class MixerOutput:
    """What a mixer that hands its memory something returns: the output (B, L, D) and `memory_write`, an
    instance of the mixer's declared `TokenMixer.writes` type (detached tensors of the segment, in the order
    the mixer saw it). The skeleton collects one write per layer into `SegmentPass.writes`; mixers that write
    nothing return the output tensor alone."""

    hidden: torch.Tensor
    memory_write: Any = None


@dataclass
class ContentProjections:
    """A layer's query/key/value projections as detached tensors: weights (H * Dh, D) and biases (H * Dh,) or
    None, so a memory can compute content attention softmax((h W_q)(m W_k)^T / sqrt(Dh)) (m W_v) through the
    layer's own projections (the Compressive Transformer's attention-reconstruction loss) without reaching
    into the mixer or training it."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, q_proj: nn.Linear, kv_proj: nn.Linear, num_heads: int, head_dim: int) -> "ContentProjections":
        """From a query projection and a fused key/value projection (keys first)."""
        k_weight, v_weight = kv_proj.weight.detach().chunk(2, dim=0)
        k_bias, v_bias = (None, None) if kv_proj.bias is None else kv_proj.bias.detach().chunk(2, dim=0)
        q_bias = None if q_proj.bias is None else q_proj.bias.detach()
        return cls(q_proj.weight.detach(), k_weight, v_weight, q_bias, k_bias, v_bias, num_heads, head_dim)

    def _heads(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        return F.linear(x, weight, bias).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        return self._heads(x, self.q_weight, self.q_bias)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(x, self.k_weight, self.k_bias), self._heads(x, self.v_weight, self.v_bias)


class TokenMixer(nn.Module):
    """Base class of the per-layer token mixers (registered in `longlm.attention.MIXERS`).

    `forward(hidden (B, L, D), inputs) -> (B, L, D)`, or a `MixerOutput` for a mixer that declares `writes`
    (what it hands the memory after the segment: the kNN pairs, the Infini-attention keys/values). Subclasses
    declare extra parameters they own through `init_extra_parameters`, which the model's `_init_weights`
    calls.
    """

    # q/k/v/o projections take `config.attention_bias` (BERT-family checkpoints have biases there)
    supports_attention_bias: bool = False
    # reads `inputs.global_mask`: question answering then puts the question tokens there automatically
    has_global_tokens: bool = False
    # attends its pattern from cached keys/values in generate() (`MixerInputs.cache`, `kv_cache.py`)
    supports_kv_cache: bool = False
    # the type of `MixerOutput.memory_write` this mixer returns (None: it writes nothing); a memory that reads
    # writes names the type it needs (`SegmentMemory.required_write`) and the config check enforces the match
    writes: type | None = None
    # the memory this mixer cannot work without (it reads that memory's payload), or None; the config check
    # refuses any other memory
    requires_memory: str | None = None
    # `content_projections()` gives plain q/k/v projections (memories that attend through them need it)
    provides_projections: bool = False
    # config options this mixer reads (name -> `longlm.options.Option`), set on every `LongLMConfig`
    options: dict[str, Option] = {}

    def __init__(self, config: "LongLMConfig", layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.inner_size = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta: float = config.rope_theta
        self.attention_dropout: float = config.attention_dropout
        self.configure(config)

    def configure(self, config: "LongLMConfig") -> None:
        """Read the settings an evaluation may change (`mem_len`, `clamp_len`, `same_length`): at construction
        and again through `model.with_memory(...)`, never during a forward."""
        window = config.mem_len if config.same_length and config.mem_len > 0 else None
        self.same_length_window: int | None = window

    @classmethod
    def check_config(cls, config: "LongLMConfig") -> None:
        """Validate the config fields this mixer reads (one clear sentence per bad field)."""

    def init_extra_parameters(self, init_normal) -> None:  # pragma: no cover - default has none
        """Initialise parameters that are not Linear/Embedding/LayerNorm weights."""

    def content_projections(self) -> ContentProjections | None:
        """The layer's query/key/value projections as detached tensors, for memories that attend through them
        (`SegmentMemory.needs_projections`); None for a mixer without them (`provides_projections` False)."""
        return None

    @property
    def attention_dropout_p(self) -> float:
        """The attention-probability dropout of this call: `config.attention_dropout` in training, else 0."""
        return self.attention_dropout if self.training else 0.0

    @property
    def attn_implementation(self) -> str:
        """The kernel family this mixer runs (`longlm.attention.backends`): Hugging Face's
        `config._attn_implementation`, read at every call as HF's own models do, so `set_attn_implementation`
        and `from_pretrained(attn_implementation=...)` apply."""
        return implementation_of(self.config)

    @staticmethod
    def project_with_memory(proj: nn.Module, hidden: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """proj([memory; hidden]) computed in two parts, so autograd never builds input gradients for the
        memory rows (they are detached) and no concatenated input is materialised."""
        out = proj(hidden)
        return out if memory is None else torch.cat([proj(memory), out], dim=1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H * Dh) -> (B, H, T, Dh)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) -> (B, T, H * Dh)."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.inner_size)
