"""Capture queries, keys and values of chosen layers through transformers' AttentionInterface.

transformers 5 runs SDPA by default and returns no attention maps. Instead of asking for maps
(`output_attentions=True` forces the slow eager path and keeps [B, H, N, N] for every layer), we
register an attention function, "shd_capture", that computes the layer's output with SDPA as usual
and, for the layers a recorder asks for, keeps q, k (and v for the teacher's per-head features).
q/k/v are [B, H, N, d]: O(N d) memory per layer instead of O(N^2). Maps are rebuilt from them by
the loss, one layer and one row chunk at a time.

The mask the model builds for SDPA (bool, True = may attend, [B or 1, 1, N, M]) is kept with the
record; when the model skipped it (pure causal, no padding) the record says `causal`. Sliding-window
layers get their window through that mask, so maps rebuilt from the record have it too.

Attention variants SDPA cannot run are computed exactly as the family's eager code does, one block of
query rows at a time (`eager_attention`): logit soft-capping (Gemma-2: scores = c tanh(s / c), kept in
the record so maps are rebuilt with it) and attention sinks (GPT-OSS `s_aux`: an extra per-head logit
in the softmax). Maps of a layer with sinks are not rows of a distribution over keys, so such a layer
is refused when it is recorded (one line naming the family and the feature).

Families whose attention does not go through the interface (Falcon calls SDPA itself) are captured
with hooks instead (`enable_projections`): the fused q/k/v projection's output is split the way the
model splits it (models/families.py says how), so the model's own forward is untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from shdcli.errors import ShdError

ATTN_IMPLEMENTATION = "shd_capture"
EAGER_CHUNK_BYTES = 64 * 2**20  # scores of one block of query rows in the exact fallback


@dataclass
class LayerRecord:
    """What one attention layer saw in one forward pass."""

    query: torch.Tensor  # [B, H, N, d]
    key: torch.Tensor  # [B, Hkv, M, d]
    value: torch.Tensor | None  # [B, Hkv, M, d] (teacher only)
    allowed: torch.Tensor | None  # bool [B|1, 1, N, M], True = may attend; None = all (or causal)
    causal: bool  # apply a causal mask when `allowed` is None
    scaling: float
    softcap: float | None = None  # logit soft-capping: scores = softcap * tanh(q k^T scaling / softcap)

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

    def record(self, module, query, key, value, attention_mask, scaling, is_causal, softcap: float | None = None,
               sinks: torch.Tensor | None = None, layer: int | None = None) -> None:
        idx = self._layer_index(module) if layer is None else layer
        if idx not in self.layers:
            return
        if sinks is not None:
            raise ShdError(
                f"{type(module).__name__}: attention sinks (s_aux) take part of each row's softmax mass, so SHD "
                "cannot rebuild this family's attention maps from q and k; distil a family without sinks"
            )
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
            softcap=None if softcap is None else float(softcap),
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


def active_recorder() -> AttentionRecorder | None:
    """The recorder of the forward pass running now (None outside `AttentionRecorder.active`): what capture
    paths outside the AttentionInterface (attention/processors.py) hand their q/k/v to."""
    return _ACTIVE.get()


@functools.cache
def _hf():
    """transformers' attention registries and SDPA path, imported on first use: importing them pulls in
    transformers' modeling stack (seconds of CPU), which `shd --help` and recipe errors do not need."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    return SimpleNamespace(AttentionInterface=AttentionInterface, repeat_kv=repeat_kv,
                           sdpa_attention_forward=sdpa_attention_forward,
                           AttentionMaskInterface=AttentionMaskInterface, sdpa_mask=sdpa_mask)


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
    """SDPA forward (or the exact eager computation for soft-capping and sinks) that also hands q/k/v
    of recorded layers to the active recorder."""
    softcap, sinks = kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
    recorder = _ACTIVE.get()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if recorder is not None:
        recorder.record(module, query, key, value, attention_mask, scaling, causal, softcap, sinks)
    if softcap is None and sinks is None:
        return _hf().sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return eager_attention(module, query, key, value, attention_mask, dropout, scaling, bool(causal), softcap, sinks)


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_bytes: int = EAGER_CHUNK_BYTES,
) -> tuple[torch.Tensor, None]:
    """The eager attention of Gemma-2 (soft-capping) and GPT-OSS (sinks), in blocks of query rows.

    query [B, H, N, d], key/value [B, Hkv, M, d]; attention_mask bool [B|1, 1, N, M] (True = may attend),
    additive float, or None (causal when is_causal, as SDPA's is_causal: upper-left, keys cut to N).
    Per row the same operations as the eager code: scores = q k^T * scaling, softcap * tanh(scores / softcap),
    mask, softmax in float32 (with the sink logit appended and dropped again), times V. Returns
    ([B, N, H, d] like every attention function, None).
    """
    bsz, heads, n, d = query.shape
    scaling = d**-0.5 if scaling is None else scaling
    rep = heads // key.shape[1]
    key, value = _hf().repeat_kv(key, rep), _hf().repeat_kv(value, rep)  # [B, H, M, d]
    causal = is_causal and attention_mask is None and n > 1
    if causal and key.shape[2] > n:
        key, value = key[:, :, :n], value[:, :, :n]
    keys = key.shape[2]
    rows = max(1, chunk_bytes // max(1, bsz * heads * (keys + 1) * 4))
    low = torch.finfo(query.dtype).min
    outs = []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        scores = torch.matmul(query[:, :, a:b], key.transpose(2, 3)) * scaling  # [B, H, c, M]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            block = attention_mask[:, :, a:b, :keys]
            scores = scores.masked_fill(~block, low) if block.dtype == torch.bool else scores + block
        elif causal:
            future = torch.ones(b - a, keys, dtype=torch.bool, device=query.device).triu(a + 1)
            scores = scores.masked_fill(future, low)
        if sinks is not None:
            sink = sinks.reshape(1, -1, 1, 1).expand(bsz, -1, b - a, -1).to(scores.dtype)
            combined = torch.cat([scores, sink], dim=-1)
            combined = combined - combined.max(dim=-1, keepdim=True).values
            probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        probs = torch.nn.functional.dropout(probs.to(value.dtype), p=dropout, training=module.training)
        outs.append(torch.matmul(probs, value))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the capture function (and SDPA's mask builder for it). Idempotent."""
    hf = _hf()
    hf.AttentionInterface.register(ATTN_IMPLEMENTATION, shd_capture_attention)
    hf.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf.sdpa_mask)
    return ATTN_IMPLEMENTATION


def enable(model: torch.nn.Module) -> None:
    """Switch a loaded model to the capture attention (outputs unchanged: it is SDPA, or the eager
    computation where SDPA does not apply)."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


# --------------------------------------------------------------------------- families outside the interface
@dataclass
class ProjectionSite:
    """Where one layer of a family that calls SDPA itself forms q/k/v: its attention module (whose
    call's keyword arguments hold the mask and position embeddings) and fused projection, and how
    the projection's output [B, N, out] becomes the q [B, H, N, d], k, v [B, Hkv, N, d] SDPA gets."""

    layer: int
    attention: torch.nn.Module
    projection: torch.nn.Module
    split: Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scaling: float
    causal: bool


def enable_projections(model: torch.nn.Module, sites: list[ProjectionSite]) -> None:
    """Capture through hooks: the attention call's kwargs are kept by a pre-hook, and the projection's
    forward hook records the split q/k/v of the layers the active recorder asks for. Idempotent."""
    if getattr(model, "_shd_projection_hooks", None):
        return
    handles = []
    for site in sites:
        state: dict = {}

        def keep_kwargs(module, args, kwargs, state=state):
            state["kwargs"] = kwargs

        def record(module, args, output, site=site, state=state):
            recorder = _ACTIVE.get()
            if recorder is None or site.layer not in recorder.layers:
                return
            kwargs = state.get("kwargs", {})
            query, key, value = site.split(output, kwargs)
            recorder.record(site.attention, query, key, value, kwargs.get("attention_mask"), site.scaling,
                            site.causal, layer=site.layer)

        handles.append(site.attention.register_forward_pre_hook(keep_kwargs, with_kwargs=True))
        handles.append(site.projection.register_forward_hook(record))
    model._shd_projection_hooks = handles
