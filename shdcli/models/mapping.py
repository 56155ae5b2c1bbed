"""Which student layer learns from which teacher layer, and which teacher heads each student head squeezes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from rich.table import Table
from torch import nn

from shdcli.attention.shd import group_feature_bases, group_heads
from shdcli.errors import ShdError
from shdcli.models.families import ModelShape, model_shape, output_projection
from shdcli.recipe import LAYER_SUBSETS


def _auto_teacher_layer(i: int, teacher_layers: int, student_layers: int) -> int:
    return math.ceil((i + 1) * teacher_layers / student_layers) - 1


def _subset_spec(spec) -> tuple[str, object] | None:
    """{every: N} / {last: N} / {first: N} -> (form, N); None for the other forms."""
    if not isinstance(spec, dict):
        return None
    if len(spec) != 1 or next(iter(spec)) not in LAYER_SUBSETS:
        raise ShdError(f"distill.layers: {spec!r} is not a layer selection; write {{every: N}}, {{last: N}} or "
                       "{first: N} (or auto, last, or a list of [student, teacher] pairs)")
    return next(iter(spec.items()))


def layer_pairs(teacher_layers: int, student_layers: int, spec) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs.

    auto: student layer i of Ls learns from teacher layer ceil((i + 1) * Lt / Ls) - 1 (uniform,
          last layers aligned). last: only the final layers. A list: explicit [[s, t], ...].
    {every: N}: student layers Ls-1, Ls-1-N, Ls-1-2N, ... (the last layer and every N-th below it);
    {last: N}: the last N student layers; {first: N}: the first N (the last Ls - N left free, as attention
    transfer leaves the layers nearest the task loss); all three map each chosen layer by the auto rule.
    """
    if student_layers > teacher_layers:
        raise ShdError(
            f"student has more layers ({student_layers}) than the teacher ({teacher_layers}); "
            "give the student at most as many layers"
        )
    if spec == "auto":
        return [(i, _auto_teacher_layer(i, teacher_layers, student_layers)) for i in range(student_layers)]
    if spec == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    subset = _subset_spec(spec)
    if subset is not None:
        form, n = subset
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ShdError(f"distill.layers: {form}: {n!r} must be a whole number >= 1")
        if form in ("last", "first") and n > student_layers:
            raise ShdError(f"distill.layers: {form}: {n} is more than the student's {student_layers} layers; "
                           f"choose 1..{student_layers}")
        chosen = {"last": range(student_layers - n, student_layers), "first": range(n),
                  "every": range((student_layers - 1) % n, student_layers, n)}[form]
        return [(i, _auto_teacher_layer(i, teacher_layers, student_layers)) for i in chosen]
    pairs = []
    for item in spec:
        s, t = int(item[0]), int(item[1])
        if not 0 <= s < student_layers or not 0 <= t < teacher_layers:
            raise ShdError(
                f"distill.layers: pair [{s}, {t}] is out of range (student layers 0..{student_layers - 1}, "
                f"teacher layers 0..{teacher_layers - 1})"
            )
        pairs.append((s, t))
    if len({s for s, _ in pairs}) != len(pairs):
        raise ShdError("distill.layers: a student layer appears twice; give each student layer one teacher layer")
    return pairs


@dataclass
class Plan:
    """The distillation plan: mapped layer pairs and, for each pair, the head groups."""

    teacher: ModelShape
    student: ModelShape
    pairs: list[tuple[int, int]]
    groups: list[list[list[int]]]  # groups[i][j]: teacher heads squeezed into student head j of pair i
    grouping: str
    representatives: list[list[int]] = field(default_factory=list)  # teacher head a student head starts from
    calibration: list[dict] = field(default_factory=list)  # per pair: calibrated vs contiguous error (grouping.py)

    def to_dict(self) -> dict:
        out = {
            "teacher": asdict(self.teacher),
            "student": asdict(self.student),
            "layers": [list(p) for p in self.pairs],
            "groups": self.groups,
            "grouping": self.grouping,
            "representatives": self.representatives,
        }
        if self.calibration:
            out["calibration"] = self.calibration
        return out


def make_plan(teacher: ModelShape, student: ModelShape, layers_spec, grouping: str) -> Plan:
    if student.heads > teacher.heads:
        raise ShdError(
            f"student has more heads ({student.heads}) than the teacher ({teacher.heads}); SHD squeezes "
            "teacher heads, so set student heads <= teacher heads"
        )
    pairs = layer_pairs(teacher.layers, student.layers, layers_spec)
    # `calibrated` starts from balanced groups; the calibration step replaces them per layer.
    base = group_heads(teacher.heads, student.heads, "pairs" if grouping == "pairs" else "balanced")
    groups = [[list(g) for g in base] for _ in pairs]
    reps = [[g[0] for g in base] for _ in pairs]
    return Plan(teacher, student, pairs, groups, grouping, reps)


def format_groups(groups: list[list[int]]) -> str:
    return " ".join("{" + ",".join(str(h) for h in g) + "}" for g in groups)


def plan_table(plan: Plan) -> Table:
    t, s = plan.teacher, plan.student
    table = Table(
        title=f"SHD plan: teacher {t.layers}L x {t.heads}H (kv {t.kv_heads}) -> "
        f"student {s.layers}L x {s.heads}H (kv {s.kv_heads}), grouping {plan.grouping}",
        title_justify="left",
    )
    table.add_column("student layer", justify="right")
    table.add_column("teacher layer", justify="right")
    table.add_column("student head j <- teacher heads")
    if plan.calibration:
        table.add_column("squeeze error (contiguous)", justify="right")
        table.caption = "* representative: the teacher head a student head starts from"
    for i, ((si, ti), groups) in enumerate(zip(plan.pairs, plan.groups)):
        row = [str(si), str(ti), "  ".join(f"{j}<-{format_groups([g])}" for j, g in enumerate(groups))]
        if plan.calibration:  # calibrated: mark the head each student head starts from
            reps = plan.representatives[i]
            marked = [",".join(f"{h}*" if h == reps[j] else str(h) for h in g) for j, g in enumerate(groups)]
            row[2] = "  ".join(f"{j}<-{{{m}}}" for j, m in enumerate(marked))
            cal = plan.calibration[i]
            row.append(f"{cal['error']:.3f} ({cal['contiguous_error']:.3f})")
        table.add_row(*row)
    return table


def feature_bases(teacher: nn.Module, plan: Plan) -> dict[int, list[torch.Tensor] | None]:
    """Per mapped teacher layer, the groups' reduced W_O bases (X_h = V_h W_O[h], see shd.py)."""
    head_dim = model_shape(teacher.config).head_dim
    return {
        t: group_feature_bases(output_projection(teacher, t).detach().float(), groups, head_dim)
        for (_, t), groups in zip(plan.pairs, plan.groups)
    }
