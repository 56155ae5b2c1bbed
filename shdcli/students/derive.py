"""Derive a student from its teacher: choose its shape, what it keeps, and initialise its weights.

A derived student is described by a `Derivation`: the teacher layer each student layer copies, the
residual channels and MLP neurons it keeps, and per student layer the teacher heads each student
head stands for (its SHD group) and the teacher key/value head each student KV head copies.
`prune: importance` (default) chooses all of these by measurement on calibration batches
(pruning.py); `prune: uniform` is the old baseline (uniformly spaced, last-aligned layers, leading
channels and neurons, contiguous head groups, first head as representative).

The weight init is consistent with the SHD squeeze (shd_method.md): the squeeze target of a group G
is T = sum_{h in G} A_h X_h with X_h = V_h W_O[h], and the merged head reads S = sum_{h in G} X_h,
so a student head starts as the group's merged head:
  - GQA teachers (heads that share a KV head form a group; head_dim fixed): the student KV head is
    its teacher KV head (K, V copied), the query is the group's mean query (scores = the mean of
    the group's scores, exact under RoPE because it is linear), and W_O is the SUM of the group's
    W_O blocks: A V sum_h W_O[h] = S's read. A group of identical heads is reproduced exactly.
  - MHA teachers without rotary positions (BERT, GPT-2, ViT; head_dim may grow): the best rank-d_s
    factorisation (SVD) of the group's mean QK circuit (1/k) sum_h W~q_h W~k_h^T (biases as an extra
    input row, rescaled for the student's 1/sqrt(d_s)) and of its summed OV circuit sum_h W_v,h W_O,h.
    When d_s >= k d_t this is exact: the old concatenation, with the sqrt(k)-too-sharp scores fixed.
    The value bias passes attention unchanged (rows sum to 1), so it folds into the output bias.
  - MHA teachers with rotary positions: q/k from the representative head (a rotary QK circuit is not
    one matrix), V/O from the OV-circuit SVD.
  - A teacher head kept alone (a group of one at the same head_dim) is copied as it is, so a student
    that keeps every head and layer is the teacher exactly (tests/test_families.py, every family).
Attention weights are read and written through models/families.py (read_attention / write_attention):
one canonical x @ W layout whatever the family fuses (GPT-2 c_attn, GPT-NeoX / Falcon query_key_value,
Phi-3 qkv_proj); Phi-3's fused [gate; up] MLP input keeps the same neurons in both halves.
Directions the factorisation leaves unused start with zero query / output weights and the student's
random key / value weights: the student computes exactly the factorised function at step 0 and the
spare directions can still learn.
Every other tensor copies the teacher's, indexed by the kept channels / neurons along each axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from rich.table import Table
from torch import nn

from shdcli.attention.shd import group_heads
from shdcli.errors import ShdError
from shdcli.models.families import (
    AttentionWeights,
    ModelShape,
    attention_params,
    decoder_layers,
    derive_student_config,
    embedding_scale,
    family_of,
    final_norm,
    is_rotary,
    mlp_in_fused,
    model_shape,
    read_attention,
    write_attention,
)
from shdcli.students.pruning import (
    choose_kv_groups,
    choose_layers,
    count_config_params,
    kv_blocks,
    kv_layout,
    most_important,
    split_contiguous,
    top_indices,
    uniform_layers,
    width_importance,
)
from shdcli.tasks.registry import build_model

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- what a student keeps
@dataclass
class StudentShape:
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int | None

    def text(self) -> str:
        mlp = f", MLP {self.intermediate}" if self.intermediate else ""
        return f"{self.layers}L x {self.heads}H (kv {self.kv_heads}), width {self.hidden}{mlp}"


@dataclass
class Derivation:
    """What a derived student keeps of its teacher (teacher indices throughout)."""

    shape: StudentShape
    prune: str  # importance | uniform
    layers: list[int]  # teacher layer copied by each student layer
    channels: list[int] | None  # kept residual channels (None: all)
    neurons: list[list[int] | None]  # per student layer, kept MLP neurons (None: all)
    groups: list[list[list[int]]]  # per student layer: teacher heads student head j stands for
    representatives: list[list[int]]  # per student layer: the teacher head each student head is named after
    kv_sources: list[list[int]] | None  # GQA teachers: per student layer, teacher KV head of each student KV head
    scores: dict = field(default_factory=dict)  # importance measurements, for the plan table and metrics.json
    # every teacher layer a head layout was made for: (groups, representatives, kept teacher KV heads)
    layouts: dict[int, tuple[list, list, list[int]]] = field(default_factory=dict)
    calibration: dict[int, dict] = field(default_factory=dict)  # calibrated grouping: error vs contiguous

    def to_dict(self) -> dict:
        return {"shape": self.shape.__dict__, "prune": self.prune, "layers": self.layers,
                "channels_kept": None if self.channels is None else len(self.channels),
                "neurons_kept": [None if n is None else len(n) for n in self.neurons],
                "groups": self.groups, "representatives": self.representatives, "kv_sources": self.kv_sources,
                "scores": self.scores}


# --------------------------------------------------------------------------- shape
def _round_to(value: float, multiple: int, lowest: int) -> int:
    return max(lowest, int(round(value / multiple)) * multiple)


def resolve_shape(t_shape: ModelShape, layers: int | None, heads: int | None, kv_heads: int | None,
                  hidden: int | None, intermediate: int | None, params: float | None,
                  count: Callable[[StudentShape], int], fixed_head_dim: bool) -> StudentShape:
    """The student's shape: given fields stay; with `params` (a fraction of the teacher's parameters)
    the free axes shrink in a fixed order until the student fits (README "Choosing a student size"):
      1. MLP width down to 1/2 of the teacher's, 2. depth down to 1/2, 3. width (residual channels)
      down to 1/2, 4. MLP down to 1/4, 5. depth down to 1/4.
    Each stage moves one axis in small steps and stops as soon as the budget is met, so the result
    is the largest shape along that path that fits. MLP first: it tolerates pruning best (Minitron)."""
    heads = heads or t_shape.heads
    try:
        kv, _ = kv_layout(t_shape.heads, t_shape.kv_heads, heads, kv_heads)
    except ValueError as exc:
        raise ShdError(f"student.from_teacher.kv_heads: {exc}") from None
    shape = StudentShape(layers or t_shape.layers, heads, kv, hidden or t_shape.hidden,
                         intermediate or t_shape.intermediate)
    if params is None:
        return shape
    budget = params * count(StudentShape(t_shape.layers, t_shape.heads, t_shape.kv_heads, t_shape.hidden,
                                         t_shape.intermediate))
    if count(shape) <= budget:
        return shape
    width_step = 32 if fixed_head_dim else heads * 8  # BERT-style widths must stay divisible by the heads
    stages = []
    if intermediate is None and t_shape.intermediate:
        stages.append(("intermediate", t_shape.intermediate // 2, 32))
    if layers is None:
        stages.append(("layers", max(1, t_shape.layers // 2), 1))
    if hidden is None:
        stages.append(("hidden", t_shape.hidden // 2, width_step))
    if intermediate is None and t_shape.intermediate:
        stages.append(("intermediate", t_shape.intermediate // 4, 32))
    if layers is None:
        stages.append(("layers", max(1, t_shape.layers // 4), 1))
    for axis, floor, step in stages:
        while count(shape) > budget:
            current = getattr(shape, axis)
            nxt = _round_to(current - step, step, step) if axis != "layers" else current - 1
            if nxt < floor or nxt >= current:
                break
            setattr(shape, axis, nxt)
        if count(shape) <= budget:
            return shape
    raise ShdError(
        f"student.from_teacher.params: no shape along the documented path fits {params:g} x the teacher's "
        f"parameters; the smallest it reaches is {shape.text()} at {count(shape) / (budget / params):.2f} x; "
        "raise params, or give layers / hidden_size / intermediate_size explicitly"
    )


def built_shape(teacher_config, shape: StudentShape) -> StudentShape:
    """The shape as the student's config builds it: an MLP tied to the width (a DiT's is 4 x its width)
    follows the width chosen, so what is printed and pruned is the MLP the student has."""
    config = student_config(teacher_config, uniform_layers(model_shape(teacher_config).layers, shape.layers), shape)
    return replace(shape, intermediate=model_shape(config).intermediate)


def student_config(teacher_config, teacher_layers: list[int], shape: StudentShape):
    t_shape = model_shape(teacher_config)
    return derive_student_config(
        teacher_config, list(enumerate(teacher_layers)), shape.heads, shape.kv_heads,
        shape.hidden if shape.hidden != t_shape.hidden else None,
        shape.intermediate if shape.intermediate != t_shape.intermediate else None,
    )


def build_student(teacher: nn.Module, config, task: str) -> nn.Module:
    """A freshly initialised student of `config` for `task`, in float32: the trained master weights, whatever
    dtype the teacher is loaded in (teacher.teacher_dtype; a bf16 teacher's values are copied exactly)."""
    return build_model(config, task)


def config_counter(teacher: nn.Module, task: str) -> Callable[[StudentShape], int]:
    """Parameter count of a student shape (built on the meta device)."""
    t_shape = model_shape(teacher.config)

    def count(shape: StudentShape) -> int:
        layers = uniform_layers(t_shape.layers, shape.layers)
        config = student_config(teacher.config, layers, shape)
        return count_config_params(config, lambda c: build_student(teacher, c, task))

    return count


# --------------------------------------------------------------------------- choosing what to keep
# Calibrated grouping: {teacher layer: (blocks, groups per block)} -> {teacher layer: (groups, reps, info)}.
LayoutChooser = Callable[[dict[int, tuple[list[list[int]], int]]], dict[int, tuple[list, list, object]]]


def derive(teacher: nn.Module, task: str, shape: StudentShape, prune: str, grouping: str,
           batches: list[Batch], device: torch.device | str = "cpu", choose: LayoutChooser | None = None,
           extra_layers: list[int] | None = None) -> Derivation:
    """Decide what the student keeps (module docstring), measuring the teacher (already on `device`,
    in eval mode) on calibration batches. Head layouts are made for every kept teacher layer and for
    `extra_layers` (teacher layers an explicit SHD plan maps to). `choose` replaces the contiguous
    split inside each key/value block (calibrated grouping)."""
    t_shape = model_shape(teacher.config)
    # ---- depth
    scores: dict = {}
    importance = None
    if prune == "importance":
        depth = choose_layers(teacher, batches, shape.layers, task, device)
        layers = depth.kept
        scores["layer_skip_distance"] = {str(k): v for k, v in sorted(depth.scores.items())}
        scores["layers_removed_per_round"] = depth.rounds
        importance = width_importance(teacher, batches, device)
    else:
        layers = uniform_layers(t_shape.layers, shape.layers)
    # ---- width
    channels = None
    if shape.hidden != t_shape.hidden:
        channels = (top_indices(importance.channels, shape.hidden) if importance is not None
                    else list(range(shape.hidden)))
    neurons: list[list[int] | None] = []
    for t in layers:
        if shape.intermediate is None or shape.intermediate == t_shape.intermediate:
            neurons.append(None)
        elif importance is not None:
            neurons.append(top_indices(importance.neurons[t], shape.intermediate))
        else:
            neurons.append(list(range(shape.intermediate)))
    # ---- heads: key/value blocks first, then the groups inside them
    wanted = sorted(set(layers) | set(extra_layers or []))
    head_scores = {t: None if importance is None else importance.heads[t] for t in wanted}
    blocks = {t: kv_plan(t_shape, shape, head_scores[t]) for t in wanted}
    calibration: dict[int, dict] = {}
    if choose is not None:
        chosen = choose({t: (b[1], b[2]) for t, b in blocks.items()})
        layouts = {t: (g, r, blocks[t][0]) for t, (g, r, _) in chosen.items()}
        calibration = {t: {"error": info.error, "contiguous_error": info.contiguous_error}
                       for t, (_, _, info) in chosen.items()}
    else:
        layouts = {t: contiguous_layout(t_shape, b, head_scores[t], grouping) for t, b in blocks.items()}
    if importance is not None:
        scores["head_importance"] = {str(t): [round(float(x), 4) for x in importance.heads[t]] for t in wanted}
    gqa = t_shape.heads // t_shape.kv_heads > 1
    return Derivation(
        shape, prune, layers, channels, neurons,
        groups=[layouts[t][0] for t in layers], representatives=[layouts[t][1] for t in layers],
        kv_sources=[layouts[t][2] for t in layers] if gqa else None,
        scores=scores, layouts=layouts, calibration=calibration,
    )


def kv_plan(t_shape: ModelShape, shape: StudentShape, head_scores: torch.Tensor | None
            ) -> tuple[list[int], list[list[int]], int]:
    """(teacher KV heads kept, their query-head blocks, student heads per block) of one layer.

    GQA teachers: keep the most important teacher KV heads (all of them when the student has as many
    KV heads); each block's query heads are split into the student's query heads per KV head, so every
    group stays inside one teacher KV head and each student head's queries meet their own keys.
    MHA teachers: one block of all heads split into the student's heads (no key/value constraint)."""
    if t_shape.heads // t_shape.kv_heads > 1:
        kept = (choose_kv_groups(head_scores, t_shape.kv_heads, shape.kv_heads) if head_scores is not None
                else list(range(shape.kv_heads)))
        return kept, [kv_blocks(t_shape.heads, t_shape.kv_heads)[g] for g in kept], shape.heads // shape.kv_heads
    return list(range(shape.kv_heads)), [list(range(t_shape.heads))], shape.heads


def contiguous_layout(t_shape: ModelShape, plan: tuple[list[int], list[list[int]], int],
                      head_scores: torch.Tensor | None, grouping: str) -> tuple[list, list, list[int]]:
    """(groups, representatives, kept teacher KV heads): contiguous groups inside each block (pairs
    mode for MHA teachers when asked); a group's representative is its most important head."""
    kept, blocks, per_block = plan
    groups: list[list[int]] = []
    for block in blocks:
        if len(blocks) > 1 or t_shape.heads // t_shape.kv_heads > 1:
            groups += split_contiguous(block, per_block)
        else:
            groups += group_heads(len(block), per_block, "pairs" if grouping == "pairs" else "balanced")
    return groups, [most_important(g, head_scores) for g in groups], kept


# --------------------------------------------------------------------------- weights
def init_from_teacher(student: nn.Module, teacher: nn.Module, d: Derivation) -> None:
    """Copy the teacher into the student along a Derivation (module docstring)."""
    t_shape, s_shape = model_shape(teacher.config), model_shape(student.config)
    if d.channels is not None and not family_of(teacher.config).width_copy:
        raise ShdError(f"student.from_teacher.hidden_size: {family_of(teacher.config).name} stacks several "
                       "width-sized chunks on one axis, so a narrower student cannot copy the teacher's channels; "
                       "set student.from_teacher.init: random, or keep the teacher's width")
    t_blocks, s_blocks = decoder_layers(teacher), decoder_layers(student)
    t_prefix, s_prefix = _module_name(teacher, t_blocks), _module_name(student, s_blocks)
    rotary = is_rotary(teacher.config)
    channels = None if d.channels is None else torch.tensor(d.channels, dtype=torch.long)
    handled: set[int] = set()  # ids of tensors written by the attention init
    with torch.no_grad():
        for i, t_idx in enumerate(d.layers):
            handled |= _init_attention(attention_params(s_blocks[i], student.config),
                                       attention_params(t_blocks[t_idx], teacher.config), d, i, t_shape, s_shape,
                                       channels, rotary)
            handled |= _init_fused_mlp_input(mlp_in_fused(s_blocks[i], student.config),
                                             mlp_in_fused(t_blocks[t_idx], teacher.config), d.neurons[i], channels)
        embedding_weights = {id(m.weight) for m in student.modules() if isinstance(m, nn.Embedding)}
        t_state = teacher.state_dict()
        pattern = re.compile(rf"^{re.escape(s_prefix)}\.(\d+)\.")
        for name, param in student.state_dict(keep_vars=True).items():
            if id(param) in handled:
                continue
            src_name, layer = name, None
            match = pattern.match(name)
            if match:
                layer = int(match.group(1))
                src_name = f"{t_prefix}.{d.layers[layer]}." + name[match.end():]
            if src_name not in t_state:
                continue
            neurons = None if layer is None or d.neurons[layer] is None else torch.tensor(d.neurons[layer])
            _copy_indexed(param.data, t_state[src_name], t_shape, channels, neurons,
                          skip_dim0=id(param) in embedding_weights)
        _match_embedding_scale(student, teacher)


def _match_embedding_scale(student: nn.Module, teacher: nn.Module) -> None:
    """Families that multiply token embeddings by a width-dependent constant (Gemma: sqrt(width)) would
    feed a narrower student embeddings sqrt(D_s / D_t) too small: the student's embedding rows are scaled
    by the ratio so each kept channel starts as the teacher's. A tied LM head reads the same rows, so the
    final norm's scale (offset + weight) is divided by the ratio: the logits of the normalised state stay."""
    ratio = embedding_scale(teacher) / embedding_scale(student)
    if ratio == 1.0:
        return
    emb = student.get_input_embeddings()
    emb.weight.mul_(ratio)
    head = student.get_output_embeddings()
    norm = final_norm(student)
    if head is not None and head.weight is emb.weight and norm is not None:
        module, offset = norm
        module.weight.copy_((offset + module.weight) / ratio - offset)


def _copy_indexed(dst: torch.Tensor, src: torch.Tensor, t_shape: ModelShape, channels: torch.Tensor | None,
                  neurons: torch.Tensor | None, skip_dim0: bool) -> None:
    """dst <- src, each axis indexed by its role: a teacher axis of the model's width takes the kept
    channels, one of the MLP width the kept neurons; other axes copy their leading overlap."""
    picked = src
    for dim in range(src.dim()):
        size = src.shape[dim]
        index = None
        if not (skip_dim0 and dim == 0):
            if channels is not None and size == t_shape.hidden and dst.shape[dim] == len(channels):
                index = channels
            elif neurons is not None and size == t_shape.intermediate and dst.shape[dim] == len(neurons):
                index = neurons
        if index is not None:
            picked = picked.index_select(dim, index.to(picked.device))
        else:
            picked = picked.narrow(dim, 0, min(size, dst.shape[dim]))
    region = tuple(slice(0, n) for n in picked.shape)
    dst[region] = picked.to(dst.dtype)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ShdError("internal: module not found")


def _init_fused_mlp_input(s_mod: nn.Module | None, t_mod: nn.Module | None, neurons: list[int] | None,
                          channels: torch.Tensor | None) -> set[int]:
    """An MLP input projection holding [gate; up] rows (Phi-3's gate_up_proj [2 I, D]): both halves take
    the kept neurons, the input axis the kept channels."""
    if s_mod is None or t_mod is None:
        return set()
    w = t_mod.weight  # [2 I, D]
    inter = w.shape[0] // 2
    rows = torch.arange(inter) if neurons is None else torch.tensor(neurons, dtype=torch.long)
    rows = torch.cat([rows, rows + inter]).to(w.device)
    picked = w.index_select(0, rows)
    if channels is not None:
        picked = picked.index_select(1, channels.to(w.device))
    s_mod.weight.copy_(picked.to(s_mod.weight.dtype))
    if s_mod.bias is not None and t_mod.bias is not None:
        s_mod.bias.copy_(t_mod.bias.index_select(0, rows).to(s_mod.bias.dtype))
    return {id(p) for p in s_mod.parameters(recurse=False)}


def _init_attention(s_params, t_params, d: Derivation, i: int, t_shape: ModelShape, s_shape: ModelShape,
                    channels: torch.Tensor | None, rotary: bool) -> set[int]:
    t: AttentionWeights = read_attention(t_params)
    s = read_attention(s_params)  # the student's random init: shapes, and spare directions
    if channels is not None:  # the input axis of q/k/v and the output axis of o follow the kept channels
        t.q, t.k, t.v, t.o = t.q[channels], t.k[channels], t.v[channels], t.o[:, channels]
        t.bo = None if t.bo is None else t.bo[channels]
    dt, ds = t_shape.head_dim, s_shape.head_dim
    groups, reps = d.groups[i], d.representatives[i]
    s_rep = s_shape.heads // s_shape.kv_heads

    def head(x: torch.Tensor, h: int, dim: int = 1) -> torch.Tensor:  # head h's slice along `dim`
        return x.narrow(dim, h * dt, dt)

    if d.kv_sources is not None and ds == dt:
        # ---- GQA: copy KV heads, mean query per group, summed W_O
        for m, g in enumerate(d.kv_sources[i]):
            s.k[:, m * ds:(m + 1) * ds], s.v[:, m * ds:(m + 1) * ds] = head(t.k, g), head(t.v, g)
            if s.bk is not None and t.bk is not None:
                s.bk[m * ds:(m + 1) * ds], s.bv[m * ds:(m + 1) * ds] = head(t.bk, g, 0), head(t.bv, g, 0)
        for j, group in enumerate(groups):
            s.q[:, j * ds:(j + 1) * ds] = torch.stack([head(t.q, h) for h in group]).mean(0)
            if s.bq is not None and t.bq is not None:
                s.bq[j * ds:(j + 1) * ds] = torch.stack([head(t.bq, h, 0) for h in group]).mean(0)
            s.o[j * ds:(j + 1) * ds] = torch.stack([head(t.o, h, 0) for h in group]).sum(0)
        s.bo = t.bo
        return write_attention(s_params, s)

    per_head_kv = s_shape.kv_heads == s_shape.heads and t_shape.kv_heads == t_shape.heads
    if not per_head_kv:  # MHA teacher -> GQA student: queries and keys from the representative heads
        for j, rep in enumerate(reps):
            s.q[:, j * ds:(j + 1) * ds] = _fit(head(t.q, rep), ds)
            s.o[j * ds:(j + 1) * ds] = _fit(head(t.o, rep, 0).t(), ds).t()
        t_rep = t_shape.heads // t_shape.kv_heads
        for m in range(s_shape.kv_heads):
            g = reps[m * s_rep] // t_rep  # the representative's own teacher KV head
            s.k[:, m * ds:(m + 1) * ds] = _fit(head(t.k, g), ds)
            s.v[:, m * ds:(m + 1) * ds] = _fit(head(t.v, g), ds)
        s.bo = t.bo
        return write_attention(s_params, s)

    # ---- MHA: circuits per student head; a teacher head kept as it is (a group of one, same head_dim) is copied
    bias_q = s.bq is not None and t.bq is not None
    copied = {j for j, g in enumerate(groups) if len(g) == 1 and ds == dt}
    bo = t.bo.clone() if t.bo is not None else None
    if bo is not None and t.bv is not None:  # value bias passes attention unchanged (rows sum to 1)
        for h in (h for j, g in enumerate(groups) if j not in copied for h in g):
            bo += head(t.bv, h, 0) @ head(t.o, h, 0)
    for j, group in enumerate(groups):
        cols = slice(j * ds, (j + 1) * ds)
        if j in copied:
            h = group[0]
            s.q[:, cols], s.k[:, cols], s.v[:, cols] = head(t.q, h), head(t.k, h), head(t.v, h)
            s.o[cols] = head(t.o, h, 0)
            for sb, tb in ((s.bq, t.bq), (s.bk, t.bk), (s.bv, t.bv)):
                if sb is not None:
                    sb[cols] = 0.0 if tb is None else head(tb, h, 0)
            continue
        if rotary:
            rep = reps[j]
            s.q[:, cols], s.k[:, cols] = _fit(head(t.q, rep), ds), _fit(head(t.k, rep), ds)
            if bias_q:
                s.bq[cols], s.bk[cols] = _fit(head(t.bq, rep, 0)[None], ds)[0], _fit(head(t.bk, rep, 0)[None], ds)[0]
        else:
            def aug(w, b, h):  # [D (+1), d]: the bias as an extra input row
                w = head(w, h)
                return torch.cat([w, head(b, h, 0)[None]]) if bias_q else w

            circuit = sum(aug(t.q, t.bq, h) @ aug(t.k, t.bk, h).t() for h in group)
            circuit = circuit * (math.sqrt(ds / dt) / len(group))  # mean score, at the student's 1/sqrt(d_s)
            spare = torch.cat([s.k[:, cols], s.bk[None, cols]]) if bias_q else s.k[:, cols]
            left, right = _factor(circuit, ds, spare)
            s.q[:, cols], s.k[:, cols] = left[: s.q.shape[0]], right[: s.k.shape[0]]
            if bias_q:
                s.bq[cols], s.bk[cols] = left[-1], right[-1]
        ov = sum(head(t.v, h) @ head(t.o, h, 0) for h in group)  # [D, D]
        left, right = _factor(ov.t(), ds, s.v[:, cols])  # factor the transpose: spare W_O rows 0, values random
        s.o[cols], s.v[:, cols] = left.t(), right
        if s.bv is not None:
            s.bv[cols] = 0.0
    s.bo = bo
    return write_attention(s_params, s)


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [D, d] cut or zero-padded to [D, width] along its last axis."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)


def _factor(circuit: torch.Tensor, rank: int, spare: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors L R^T of circuit [P, Q] (SVD, singular values split evenly).

    Directions beyond the circuit's rank get L = 0 and R = `spare` (the student's random init):
    L R^T equals the truncated circuit exactly, and those directions still get gradients."""
    u, sv, vh = torch.linalg.svd(circuit, full_matrices=False)
    r = min(rank, sv.numel())
    left = circuit.new_zeros(circuit.shape[0], rank)
    right = spare.double().clone()
    live = sv[:r] > sv[0] * 1e-6 if sv.numel() else sv[:r] > 0
    root = sv[:r].clamp_min(0).sqrt()
    left[:, :r] = torch.where(live, u[:, :r] * root, 0.0)
    right[:, :r] = torch.where(live, vh[:r].t() * root, spare.double()[:, :r])
    return left, right


# --------------------------------------------------------------------------- what the user sees
def size_warning(student_params: int, teacher_params: int) -> str | None:
    ratio = student_params / max(1, teacher_params)
    if ratio >= 0.95:
        return (f"warning: the student has {ratio:.2f} x the teacher's parameters, so it will be about as big and "
                "slow; shrink student.from_teacher (params: 0.5, or hidden_size / intermediate_size / layers)")
    return None


def derivation_table(d: Derivation, t_shape: ModelShape, student_params: int, teacher_params: int) -> Table:
    """What the student kept of the teacher, and the measurements behind it."""
    kept_width = "all" if d.channels is None else f"{len(d.channels)} of {t_shape.hidden}"
    table = Table(
        title=f"student: {d.shape.text()}, {student_params / max(1, teacher_params):.2f} x the teacher's "
        f"parameters ({d.prune} pruning; residual channels kept: {kept_width})",
        title_justify="left",
    )
    skip = d.scores.get("layer_skip_distance", {})
    for name in ("student layer", "teacher layer", "skip distance", "MLP neurons", "teacher KV heads",
                 "student head <- teacher heads (* named after)"):
        table.add_column(name, justify="right" if "layer" in name or "distance" in name else "left")
    for i, t in enumerate(d.layers):
        neurons = "all" if d.neurons[i] is None else f"{len(d.neurons[i])} of {t_shape.intermediate}"
        kv = "-" if d.kv_sources is None else ",".join(map(str, d.kv_sources[i]))
        heads = "  ".join(f"{j}<-{{" + ",".join(f"{h}*" if h == d.representatives[i][j] else str(h) for h in g) + "}"
                          for j, g in enumerate(d.groups[i]))
        dist = f"{skip[str(t)]:.4g}" if str(t) in skip else "-"
        table.add_row(str(i), str(t), dist, neurons, kv, heads)
    if skip:
        table.caption = ("skip distance: how far the teacher's output moves when that layer is skipped "
                         "(last measured round); layers not listed were removed")
    return table
