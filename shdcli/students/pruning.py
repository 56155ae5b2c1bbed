"""Structured-pruning importance: which layers, heads, MLP neurons and residual channels a student keeps.

Everything here is measured on the teacher alone, over a few calibration batches of training data
(never validation), in the spirit of NVIDIA Minitron / Model Optimizer's activation-based importance
and ShortGPT's layer ranking:

  - residual channels: mean |output| of every norm module of width D (LayerNorm / RMSNorm), summed
    over the norms: the channels the whole stack writes and reads the most;
  - MLP neurons: mean |input| of each layer's down projection (the activated neuron values);
  - attention heads: mean L2 norm of each head's contribution to the residual stream,
    ||x_h W_O[h]||, from the input of the output projection; a key/value group's importance is the
    sum over its query heads;
  - depth: a layer's importance is how far the teacher's output moves when that block is skipped
    (its input passed straight through), measured as the distance of the output to the full
    teacher's (causal LM: token KL of the next-token distributions; encoder: 1 - cosine of the
    mean-pooled embeddings; classifier: KL of the class distributions). Layers are removed
    iteratively on the first DEPTH_SEQUENCES calibration rows: each round re-measures the remaining
    layers with the removals so far applied and removes two thirds of what is still to go (at least
    one), so interactions between removed blocks count.

Functions take the model and batches and return plain tensors / lists, so tests can check them on
tiny models against brute force.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from shdcli.models.families import (
    ModelShape,
    attention_params,
    decoder_layers,
    default_kv_heads,
    mlp_down,
    model_shape,
)
from shdcli.tasks.base import Batch, model_inputs
from shdcli.tasks.registry import get as get_task


# --------------------------------------------------------------------------- outputs and distances
def _output(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """What the depth search compares: the task's output (logits, or the mean-pooled embedding)."""
    return get_task(task).output(model, batch)


def output_distance(reference: torch.Tensor, output: torch.Tensor, batch: Batch, task: str) -> float:
    """Mean distance of a pruned model's output to the full teacher's (see module docstring)."""
    return get_task(task).output_distance(reference, output, batch)


# --------------------------------------------------------------------------- depth
def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook that makes a block the identity: its output is its input hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def skipping(model: nn.Module, layers: set[int] | list[int]) -> Iterator[None]:
    """Run `model` with the given blocks skipped (each passes its input through unchanged)."""
    blocks = decoder_layers(model)
    handles = [blocks[i].register_forward_hook(_skip_hook, with_kwargs=True) for i in sorted(set(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


DEPTH_SEQUENCES = 4  # calibration rows the depth search runs on (each round costs one forward per remaining layer)
ROUND_FRACTION = 2 / 3  # share of the layers still to remove that one round removes (at least one)


@dataclass
class DepthChoice:
    kept: list[int]  # teacher layers the student keeps, ascending
    scores: dict[int, float]  # teacher layer -> distance when it was last measured (higher: more important)
    rounds: list[list[int]] = field(default_factory=list)  # layers removed in each round


@torch.no_grad()
def choose_layers(model: nn.Module, batches: list[Batch], keep: int, task: str,
                  device: torch.device | str = "cpu") -> DepthChoice:
    """Keep `keep` of the model's layers by iterative skip-distance (module docstring).

    Skipping layer i leaves everything before it unchanged, so each round records every block's
    output once (with that round's removals) and a candidate's forward replays the blocks before it
    from that record: a candidate costs the blocks from i on, not the whole model."""
    total = model_shape(model.config).layers
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be within 1..{total}, got {keep}")
    batches = [{k: v.to(device) for k, v in b.items()} for b in _first_rows(batches, DEPTH_SEQUENCES)]
    references = [_output(model, b, task) for b in batches]
    blocks = decoder_layers(model)

    removed: set[int] = set()
    scores: dict[int, float] = {}
    rounds: list[list[int]] = []
    while total - len(removed) > keep:
        outputs = [_block_outputs(model, b, task, removed) for b in batches]  # per batch: each block's output
        candidates = [i for i in range(total) if i not in removed]
        for i in candidates:
            dist = 0.0
            for ref, b, recorded in zip(references, batches, outputs):
                with skipping(model, removed | {i}), _replaying(blocks, recorded[:i]):
                    dist += output_distance(ref, _output(model, b, task), b, task)
            scores[i] = dist / len(batches)
        to_go = total - len(removed) - keep
        step = max(1, int(to_go * ROUND_FRACTION))
        ranked = sorted(candidates, key=lambda i: (scores[i], i))  # least important first
        rounds.append(sorted(ranked[:step]))
        removed |= set(ranked[:step])
    return DepthChoice(sorted(set(range(total)) - removed), scores, rounds)


def _block_outputs(model: nn.Module, batch: Batch, task: str, removed: set[int]) -> list:
    """What every block returns in a forward with `removed` skipped (the objects the next block reads)."""
    blocks = decoder_layers(model)
    seen: list = [None] * len(blocks)
    with skipping(model, removed):
        handles = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
                   for i, blk in enumerate(blocks)]
        try:
            _output(model, batch, task)
        finally:
            for h in handles:
                h.remove()
    return seen


@contextlib.contextmanager
def _replaying(blocks: nn.ModuleList, outputs: list) -> Iterator[None]:
    """The first len(outputs) blocks return their recorded outputs instead of computing them."""
    for blk, out in zip(blocks, outputs):
        blk.forward = lambda *args, _out=out, **kwargs: _out  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        for blk in blocks[: len(outputs)]:
            del blk.forward


def _first_rows(batches: list[Batch], rows: int) -> list[Batch]:
    """The first `rows` rows of a list of batches (whole batches, the last one cut)."""
    out = []
    for b in batches:
        if rows <= 0:
            break
        n = len(next(iter(b.values())))
        out.append({k: v[:rows] for k, v in b.items()})
        rows -= n
    return out


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Today's baseline: student layer i <- teacher layer ceil((i + 1) Lt / Ls) - 1 (last aligned)."""
    return [math.ceil((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


# --------------------------------------------------------------------------- width importance
def _is_norm(module: nn.Module, width: int) -> bool:
    """A norm over the model's width: with a [D] scale, or a LayerNorm without one (DiT's adaLN-Zero blocks)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm) and weight is None:
        return tuple(module.normalized_shape) == (width,)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and weight.numel() == width)


@dataclass
class WidthImportance:
    channels: torch.Tensor  # [D] residual-channel importance
    neurons: dict[int, torch.Tensor]  # teacher layer -> [I] MLP neuron importance
    heads: dict[int, torch.Tensor]  # teacher layer -> [H] head importance


@torch.no_grad()
def width_importance(model: nn.Module, batches: list[Batch], device: torch.device | str = "cpu") -> WidthImportance:
    """Activation-magnitude importance of channels, neurons and heads (module docstring), summed over valid tokens."""
    shape = model_shape(model.config)
    blocks = decoder_layers(model)
    sums: dict[str, torch.Tensor] = {}
    state = {"mask": None}

    def accumulate(key: str, values: torch.Tensor) -> None:  # values [B, N, C] (or [B, C])
        values = values.float()
        if values.dim() == 3 and state["mask"] is not None:
            values = values * state["mask"][:, :, None]
        total = values.reshape(-1, values.shape[-1]).sum(0)
        sums[key] = total if key not in sums else sums[key] + total

    handles = []
    for module in model.modules():
        if _is_norm(module, shape.hidden):
            handles.append(module.register_forward_hook(lambda m, a, out: accumulate("channels", out.abs())))
    for i, block in enumerate(blocks):
        if shape.intermediate:
            down = mlp_down(block, model.config)  # its input: the activated neurons
            handles.append(down.register_forward_pre_hook(
                lambda m, args, i=i: accumulate(f"neurons.{i}", args[0].abs())))
        attn = attention_params(block, model.config)
        w_o = _o_weight_xw(attn)  # [H d, D]

        def head_norms(m, args, i=i, w_o=w_o):
            x = args[0]  # [B, N, H d]
            per_head = x.float().unflatten(-1, (shape.heads, -1))  # [B, N, H, d]
            w = w_o.float().unflatten(0, (shape.heads, -1))  # [H, d, D]
            contrib = torch.einsum("bnhd,hde->bnhe", per_head, w).norm(dim=-1)  # [B, N, H]
            accumulate(f"heads.{i}", contrib)

        handles.append(attn.o.register_forward_pre_hook(head_norms))
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.float()  # images: every patch token counts
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    if "channels" not in sums:
        raise ValueError("width importance: no norm module of the model's width ran (empty calibration batches?)")
    # Sums over calibration tokens: only the ranking within each kind matters.
    return WidthImportance(
        channels=sums["channels"],
        neurons={i: sums[f"neurons.{i}"] for i in range(len(blocks)) if f"neurons.{i}" in sums},
        heads={i: sums[f"heads.{i}"] for i in range(len(blocks))},
    )


def _o_weight_xw(params) -> torch.Tensor:
    """W_O of a layer in x @ W orientation [H d, D]."""
    return params.o.weight if params.o_is_conv1d else params.o.weight.t()


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring indices, in ascending index order (ties: the lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


# --------------------------------------------------------------------------- heads and key/value groups
def kv_layout(teacher_heads: int, teacher_kv: int, student_heads: int, student_kv: int | None) -> tuple[int, int]:
    """(student KV heads, student query heads per KV head) such that every student KV head stands for
    exactly one teacher KV head (GQA teachers), or (H_s, 1)-style free layouts for MHA teachers.

    Raises ValueError with the counts that would work when the requested layout cannot pair queries
    with their own keys."""
    per_teacher_kv = teacher_heads // teacher_kv
    if per_teacher_kv == 1:  # MHA teacher: no key/value sharing to respect
        kv = student_kv or student_heads
        if student_heads % kv:
            raise ValueError(f"kv_heads {kv} must divide the student's {student_heads} heads")
        return kv, student_heads // kv
    kv = student_kv or default_kv_heads(ModelShape("", 1, teacher_heads, teacher_kv, 1, 1, None, None, None),
                                        student_heads)
    if student_heads % kv or kv > teacher_kv or student_heads // kv > per_teacher_kv:
        fits = [d for d in range(1, teacher_kv + 1) if student_heads % d == 0 and student_heads // d <= per_teacher_kv]
        raise ValueError(
            f"kv_heads {kv} with {student_heads} heads cannot keep each student head's queries with its own "
            f"teacher keys (the teacher has {teacher_kv} KV heads of {per_teacher_kv} query heads each); "
            + (f"use kv_heads {' or '.join(map(str, fits))}" if fits else "use fewer heads")
        )
    return kv, student_heads // kv


def kv_blocks(teacher_heads: int, teacher_kv: int) -> list[list[int]]:
    """Teacher query heads of each teacher KV head (GQA layout: contiguous blocks)."""
    r = teacher_heads // teacher_kv
    return [list(range(g * r, (g + 1) * r)) for g in range(teacher_kv)]


def choose_kv_groups(head_scores: torch.Tensor, teacher_kv: int, keep: int) -> list[int]:
    """The `keep` teacher KV heads with the largest summed query-head importance, ascending."""
    blocks = kv_blocks(head_scores.numel(), teacher_kv)
    totals = torch.stack([head_scores[b].sum() for b in blocks])
    return top_indices(totals, keep)


def split_contiguous(heads: list[int], parts: int) -> list[list[int]]:
    """Balanced contiguous split of a list of heads (larger parts first), like shd.group_heads."""
    base, extra = divmod(len(heads), parts)
    out, start = [], 0
    for j in range(parts):
        size = base + (1 if j < extra else 0)
        out.append(heads[start:start + size])
        start += size
    return out


def most_important(group: list[int], head_scores: torch.Tensor | None) -> int:
    if head_scores is None:
        return group[0]
    return max(group, key=lambda h: (float(head_scores[h]), -h))


# --------------------------------------------------------------------------- parameter counts
def count_config_params(config, build: Callable[[object], nn.Module]) -> int:
    """Parameters of a model built from `config`, on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        model = build(config)
    return sum(p.numel() for p in model.parameters())
