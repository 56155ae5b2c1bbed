"""Building the student: load the teacher, load or derive the student (students/derive.py) and make its SHD
plan (models/mapping.py), with the calibration batches that importance pruning and calibrated grouping
measure the teacher on. train.prepare calls these; benchmarks call them to train many students from one
teacher."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from shdcli import distributed
from shdcli.errors import ShdError
from shdcli.models import checks
from shdcli.models.families import has_fixed_head_dim, model_shape
from shdcli.models.grouping import calibrate_plan, calibrate_teacher
from shdcli.models.mapping import Plan, layer_pairs, make_plan
from shdcli.models.sources import resolve_source
from shdcli.recipe import Recipe
from shdcli.students.derive import (
    Derivation,
    build_student,
    built_shape,
    config_counter,
    derive,
    init_from_teacher,
    resolve_shape,
    student_config,
)
from shdcli.tasks.data import BatchStream
from shdcli.tasks.registry import load_model


def load_teacher(recipe: Recipe, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, str, Path]:
    """The teacher on the CPU in `dtype` (the run's teacher.teacher_dtype), its tokenizer (or image processor),
    task and folder. Under torchrun rank 0 alone reads the weights and broadcasts them: every rank holds
    one copy in `dtype`, never a float32 one first. Collective under torchrun."""
    folder = resolve_source(recipe.teacher.path, "teacher.path")
    teacher, tokenizer, task = load_model(
        folder, "teacher.path", task=None if recipe.task == "auto" else recipe.task,
        allow_pickle=recipe.teacher.allow_pickle, trust_remote_code=recipe.teacher.trust_remote_code,
        dtype=dtype, weights=not distributed.from_rank0(),
    )
    teacher = distributed.broadcast_replica(teacher)
    if tokenizer is None:  # image classifiers get their image processor here (tasks.image.load_processor)
        raise ShdError(f"teacher.path: {folder} has no tokenizer files; add tokenizer.json (or vocab files) to it")
    checks.check_tokenizer_fits(tokenizer, model_shape(teacher.config), "teacher.path")
    return teacher, tokenizer, task, folder


def make_student(
    recipe: Recipe, teacher: torch.nn.Module, tokenizer, task: str,
    batches: Callable[[], list[dict[str, torch.Tensor]]] | None = None, device: torch.device | str = "cpu",
    console: Console | None = None,
) -> tuple[torch.nn.Module, Plan, Derivation | None]:
    """Load or derive the student and make the SHD plan. `batches()` gives the calibration batches
    (training data) that calibrated grouping and importance pruning measure the teacher on."""
    t_shape = model_shape(teacher.config)
    spec, d = recipe.student, recipe.distill
    if spec.path is not None:
        folder = resolve_source(spec.path, "student.path")
        # Under torchrun rank 0 alone reads it (float32: the trained master weights). An FSDP student stays on
        # the meta device elsewhere until sharded (distributed.wrap_student receives the shards); others get
        # the whole model now.
        student, s_tok, s_task = load_model(folder, "student.path", task=task, allow_pickle=spec.allow_pickle,
                                            weights=not distributed.from_rank0())
        if recipe.train.strategy != "fsdp":
            student = distributed.broadcast_replica(student)
        s_shape = model_shape(student.config)
        checks.check_student_fits(t_shape, s_shape, tokenizer, s_tok)
        plan = make_plan(t_shape, s_shape, d.layers, d.grouping)
        if d.grouping == "calibrated":
            _announce_calibration(console, batches())
            calibrate_plan(plan, teacher, batches(), device, d.alpha, d.temperature, recipe.train.seed)
        return student, plan, None
    ft = spec.from_teacher
    assert ft is not None
    # ---- shape
    for name, value, limit in (("heads", ft.heads, t_shape.heads), ("layers", ft.layers, t_shape.layers)):
        if value is not None and value > limit:
            raise ShdError(f"student.from_teacher.{name}: {value} is more than the teacher's {limit} {name}; "
                           f"choose at most {limit}")
    if ft.kv_heads is not None and (ft.heads or t_shape.heads) % ft.kv_heads:
        raise ShdError(f"student.from_teacher.kv_heads: {ft.kv_heads} must divide the student's "
                       f"{ft.heads or t_shape.heads} heads")
    shape = resolve_shape(t_shape, ft.layers, ft.heads, ft.kv_heads, ft.hidden_size, ft.intermediate_size, ft.params,
                          config_counter(teacher, task), has_fixed_head_dim(teacher.config))
    shape = built_shape(teacher.config, shape)
    # ---- what to keep (measured on calibration batches) and the plan's layer pairs
    prune = ft.prune if ft.init == "teacher" else "uniform"
    needs_data = prune == "importance" or d.grouping == "calibrated"
    if needs_data and batches is None:
        raise ValueError("make_student: importance pruning and calibrated grouping need calibration batches")
    calib = batches() if needs_data else []
    if needs_data:
        what = " and ".join(w for w, on in (("measuring the teacher for pruning", prune == "importance"),
                                             ("calibrating head groups", d.grouping == "calibrated")) if on)
        _announce_calibration(console, calib, what)
    layouts_for = None
    if d.grouping == "calibrated" and shape.heads < t_shape.heads:
        def layouts_for(requests: dict[int, tuple[list[list[int]], int]]) -> dict[int, tuple[list, list]]:
            chosen = calibrate_teacher(teacher, list(requests), calib, next(iter(requests.values()))[1], device,
                                       d.alpha, d.temperature, recipe.train.seed,
                                       blocks={t: b for t, (b, _) in requests.items()})
            return {t: (c.groups, c.representatives, c) for t, c in chosen.items()}
    layer_pairs(t_shape.layers, shape.layers, d.layers)  # a bad distill.layers fails here, before any measuring
    explicit = [int(t) for _, t in d.layers] if isinstance(d.layers, list) else []
    home, was_training = next(teacher.parameters()).device, teacher.training
    teacher.eval().to(device)  # measured where it runs; the init below copies on the teacher's home device
    try:
        derivation = derive(teacher, task, shape, prune, d.grouping, calib, device, layouts_for,
                            extra_layers=explicit + ([t_shape.layers - 1] if d.layers == "last" else []))
    finally:
        teacher.to(home).train(was_training)
    config = student_config(teacher.config, derivation.layers, shape)
    student = build_student(teacher, config, task)
    s_shape = model_shape(student.config)
    pairs = derived_pairs(d.layers, derivation.layers, t_shape.layers)
    plan = Plan(t_shape, s_shape, pairs, [derivation.layouts[t][0] for _, t in pairs], d.grouping,
                [derivation.layouts[t][1] for _, t in pairs])
    if d.grouping == "calibrated" and derivation.calibration:
        plan.calibration = [{"teacher_layer": t, "samples": sum(len(next(iter(b.values()))) for b in calib),
                             **derivation.calibration[t]} for _, t in pairs]
    if ft.init == "teacher":
        init_from_teacher(student, teacher, derivation)
    return student, plan, derivation


def derived_pairs(spec, kept: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of a derived student: `auto` (and the student layers that
    {every: N} / {last: N} / {first: N} choose) map to the teacher layer each was copied from; `last` the final
    layers; explicit lists as given."""
    if spec == "auto":
        return list(enumerate(kept))
    if isinstance(spec, dict):
        return [(s, kept[s]) for s, _ in layer_pairs(teacher_layers, len(kept), spec)]
    return layer_pairs(teacher_layers, len(kept), spec)


def _announce_calibration(console: Console | None, batches: list[dict[str, torch.Tensor]], what: str | None = None):
    if console is not None:
        samples = sum(len(next(iter(b.values()))) for b in batches)
        console.print(f"{what or 'calibrating head groups'} on {samples} training samples")


def calibration_batches(blocks, recipe: Recipe) -> list[dict[str, torch.Tensor]]:
    """The first distill.calibration_batches training batches (a fixed, seeded draw; never validation),
    from TokenBlocks or, for image classifiers, a tasks.image.ImageSet (pixels only: labels are not inputs)."""
    stream = BatchStream(blocks, recipe.data.batch_size, recipe.train.seed)
    n = min(recipe.distill.calibration_batches, math.ceil(len(blocks) / recipe.data.batch_size))
    return [{k: v for k, v in stream.next().items() if k != "labels"} for _ in range(max(1, n))]
