"""The frozen teacher: the dtype it loads and runs in, and its forward with an optional memo keyed by batch content.

The teacher only runs forward, under inference_mode, with an AttentionRecorder collecting the q/k/v of
the layers the SHD plan maps. It is loaded directly in `teacher_dtype` (students/build.load_teacher), so
no float32 copy is made first. Benchmarks that train many students against one teacher hand a memo
(a dict) to `teacher_forward`: a batch seen before is served from it, bit-identical, without a forward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from shdcli.attention import fused_logits
from shdcli.attention.capture import AttentionRecorder, LayerRecord
from shdcli.recipe import Recipe

# (hidden states or logits bypassed, shape, input id bytes, mask bytes): what a teacher forward depends on
MemoKey = tuple[bool, tuple[int, ...], bytes, bytes]
TeacherPass = tuple[Any, dict[int, LayerRecord]]  # (the model's output, layer index -> its record)


def teacher_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """dtype the teacher's weights are loaded in and run in. It only runs forward, under inference_mode:
    bfloat16 halves its memory and time on CUDA; auto picks it there and keeps float32 on CPU."""
    choice = recipe.train.teacher_dtype
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "float32":
        return torch.float32
    if device.type == "cuda" and (recipe.train.dtype == "bfloat16" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager:
    """train.dtype's autocast on `device` (nothing for float32)."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def memo_key(batch: dict[str, torch.Tensor]) -> MemoKey:
    """A batch's memo key: its content. The fused logit path's bypassed forward holds hidden states, not
    logits, so the bypass is part of the key (the two are memoised apart)."""
    return (fused_logits.bypass_active(), tuple(batch["input_ids"].shape),
            batch["input_ids"].cpu().numpy().tobytes(), batch["attention_mask"].cpu().numpy().tobytes())


def teacher_forward(model: nn.Module, recorder: AttentionRecorder, batch: dict[str, torch.Tensor],
                    amp_dtype: torch.dtype | None, memo: dict | None = None) -> TeacherPass:
    """The teacher's output and the records of `recorder.layers` for one batch (on the batch's device).

    memo: batch content -> TeacherPass, filled and read here. A run that records other teacher layers
    (benchmarks share one memo across methods) may have made the entry: it serves only when it holds every
    layer this recorder needs, else the forward runs again and replaces it."""
    if memo is None:
        return _teacher_pass(model, recorder, batch, amp_dtype)
    key = memo_key(batch)
    if key not in memo or not recorder.layers <= memo[key][1].keys():
        memo[key] = _teacher_pass(model, recorder, batch, amp_dtype)
    return memo[key]


def _teacher_pass(model: nn.Module, recorder: AttentionRecorder, batch: dict[str, torch.Tensor],
                  amp_dtype: torch.dtype | None) -> TeacherPass:
    device = batch["input_ids"].device if "input_ids" in batch else next(iter(batch.values())).device
    with torch.inference_mode(), recorder.active(), autocast(device, amp_dtype):
        out = model(**batch)
        records = dict(recorder.records)
    return out, records
