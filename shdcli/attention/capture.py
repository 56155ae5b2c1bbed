"""Capture queries, keys and values of chosen layers through transformers' AttentionInterface.

transformers 5 runs SDPA by default and returns no attention maps. Instead of asking for maps
(`output_attentions=True` forces the slow eager path and keeps [B, H, N, N] for every layer), we
register an attention function, "shd_capture", that computes the layer's output with SDPA as usual
and, for the layers a recorder asks for, keeps q, k (and v for the teacher's per-head features).
q/k/v are [B, H, N, d]: O(N d) memory per layer instead of O(N^2). Maps are rebuilt from them by
the loss, one layer and one row chunk at a time.

The mask the model builds for SDPA (bool, True = may attend, [B or 1, 1, N, M]) is kept with the
record; when the model skipped it (pure causal, no padding) the record says `causal`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "shd_capture"


@dataclass
class LayerRecord:
    """What one attention layer saw in one forward pass."""

    query: torch.Tensor  # [B, H, N, d]
    key: torch.Tensor  # [B, Hkv, M, d]
    value: torch.Tensor | None  # [B, Hkv, M, d] (teacher only)
    allowed: torch.Tensor | None  # bool [B|1, 1, N, M], True = may attend; None = all (or causal)
    causal: bool  # apply a causal mask when `allowed` is None
    scaling: float

    @property
    def kv_repeat(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def keys_per_head(self) -> torch.Tensor:
        """Keys expanded to one per query head (GQA): [B, H, M, d]."""
        return self.key.repeat_interleave(self.kv_repeat, dim=1) if self.kv_repeat > 1 else self.key

    def values_per_head(self) -> torch.Tensor:
        assert self.value is not None, "values were not recorded for this model"
        return self.value.repeat_interleave(self.kv_repeat, dim=1) if self.kv_repeat > 1 else self.value

    def allowed_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """Mask for query rows [start, stop): bool [B|1, 1, c, M] or None when every key is allowed."""
        if self.allowed is not None:
            return self.allowed[:, :, start:stop]
        if not self.causal:
            return None
        keys = self.key.shape[2]
        queries = self.query.shape[2]
        offset = keys - queries  # queries are the last rows when a cache precedes them
        rows = torch.arange(start, stop, device=self.key.device)[:, None] + offset
        return (torch.arange(keys, device=self.key.device)[None, :] <= rows)[None, None]


class AttentionRecorder:
    """Collects LayerRecords for a set of layer indices during one forward pass."""

    def __init__(self, layers: set[int] | list[int], keep_values: bool = False) -> None:
        self.layers = set(layers)
        self.keep_values = keep_values
        self.records: dict[int, LayerRecord] = {}
        self._calls = 0

    def clear(self) -> None:
        self.records = {}
        self._calls = 0

    def _layer_index(self, module: torch.nn.Module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            # Families without layer_idx (ViT): layers are called in order, count them.
            idx = self._calls
        self._calls += 1
        return int(idx)

    def record(self, module, query, key, value, attention_mask, scaling, is_causal) -> None:
        idx = self._layer_index(module)
        if idx not in self.layers:
            return
        allowed = None
        if attention_mask is not None:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
                attention_mask.dtype
            ).min / 2
        self.records[idx] = LayerRecord(
            query=query,
            key=key,
            value=value if self.keep_values else None,
            allowed=allowed,
            causal=bool(is_causal) and allowed is None and query.shape[2] > 1,
            scaling=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[AttentionRecorder]:
        """Record the forward passes run inside this block."""
        self.clear()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar("shd_recorder", default=None)


def shd_capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA forward that also hands q/k/v of recorded layers to the active recorder."""
    recorder = _ACTIVE.get()
    if recorder is not None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        recorder.record(module, query, key, value, attention_mask, scaling, causal)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> str:
    """Register the capture function (and SDPA's mask builder for it). Idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, shd_capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def enable(model: torch.nn.Module) -> None:
    """Switch a loaded model to the capture attention (outputs unchanged: it is SDPA)."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


register()
