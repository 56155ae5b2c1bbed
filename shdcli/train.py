"""The distillation loop: teacher forward (captured), student forward (captured), losses, AdamW.

Top to bottom: setup (prepare), step (step_losses, train_step), validation, loop, outputs. The student is
built in students/build.py, the optimizer and schedule in optim.py, the progress display in progress.py."""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from shdcli import checkpoint, distributed, plots, trackers
from shdcli.attention import balance, capture, fused_logits
from shdcli.attention import diagnostics as diag
from shdcli.attention.baselines import attention_target_loss, make_projector
from shdcli.attention.losses import shd_loss
from shdcli.attention.relations import relation_loss
from shdcli.callbacks import LAYER_KL, Callback, CallbackList
from shdcli.errors import ShdError
from shdcli.evaluate import final_evaluation, ood_unavailable
from shdcli.model_card import render_card
from shdcli.models import checks
from shdcli.models.families import decoder_layers, enable_capture, model_shape
from shdcli.models.lora import apply_lora, save_lora_student
from shdcli.models.mapping import Plan, feature_bases, plan_table
from shdcli.models.sources import count_parameters, resolve_source, save_model_folder, save_sharded_model_folder
from shdcli.models.st_modules import sentence_transformers_files
from shdcli.optim import make_optimizer, make_scheduler
from shdcli.progress import ProgressDisplay
from shdcli.recipe import Recipe
from shdcli.report import destination, render_report, write_json_atomic, write_text_atomic
from shdcli.students.build import calibration_batches, load_teacher, make_student
from shdcli.students.derive import Derivation, derivation_table, size_warning
from shdcli.tasks.base import Forwards, Task
from shdcli.tasks.data import BatchStream, TokenBlocks
from shdcli.tasks.registry import get as get_task
from shdcli.teacher import TeacherPass, teacher_dtype, teacher_forward
from shdcli.teacher import autocast as teacher_autocast


@dataclass
class Setup:
    """Everything a run needs, built once from the recipe."""

    recipe: Recipe
    device: torch.device
    amp_dtype: torch.dtype | None
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    task: str
    plan: Plan
    bases: dict[int, list[torch.Tensor] | None]  # teacher layer -> per-group feature bases
    train_blocks: TokenBlocks  # or any row set a BatchStream serves (tasks.image.ImageSet)
    val_batches: list[dict[str, torch.Tensor]]
    use_logit: bool
    # distill.target=projector: the trainable head-mixing matrices (baselines.py), dropped after training.
    projector: torch.nn.Module | None = None
    derivation: Derivation | None = None  # what a derived student kept of its teacher (students/derive.py)
    # Optional memo of teacher forwards keyed by batch content (teacher.py; benchmarks reuse one teacher pass
    # across runs).
    teacher_memo: dict | None = None
    # The teacher's held-out quality, kept from the init evaluation for the final one (evaluate.evaluate_models).
    teacher_eval_memo: dict = field(default_factory=dict)
    step: int = 0  # index of the optimizer step being taken (0-based): the SHD schedule reads it
    shd_grad_scale: float | None = None  # balance=grad|agreement: the last scale of the SHD gradient (balance.py)
    # balance=agreement: the running cos(g_shd, g_rest) that caps SHD's gradient (checkpointed with the run)
    agreement: balance.Agreement = field(default_factory=balance.Agreement)
    # the balance mode this run uses (distill.balance; auto resolved by balance.resolve_mode: none, or off = SHD
    # skipped in training steps)
    balance: str = "none"
    balance_note: str | None = None  # why auto chose it, for the plan
    teacher_recorder: capture.AttentionRecorder = field(init=False)
    student_recorder: capture.AttentionRecorder = field(init=False)

    def teacher_forward(self, batch: dict[str, torch.Tensor]) -> TeacherPass:
        """The teacher's output and the records of the layers the plan maps, through the memo if one is set."""
        return teacher_forward(self.teacher, self.teacher_recorder, batch, self.amp_dtype, self.teacher_memo)

    @property
    def kind(self) -> Task:
        """The task object of `task` (tasks.registry)."""
        return get_task(self.task)

    def __post_init__(self) -> None:
        self.teacher_recorder = capture.AttentionRecorder({t for _, t in self.plan.pairs}, keep_values=True)
        relations = self.recipe.distill.target == "relations"  # MiniLMv2 relations need the student's values
        self.student_recorder = capture.AttentionRecorder({s for s, _ in self.plan.pairs}, keep_values=relations)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ShdError("train.device: cuda was asked for but no CUDA GPU is visible; set train.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(recipe: Recipe, console: Console, loaded: tuple | None = None) -> Setup:
    """Build a run. `loaded` = (teacher, tokenizer, task) from load_teacher skips reloading it
    (benchmarks train many students from one teacher)."""
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.train.seed)
    device = distributed.local_device(pick_device(recipe.train.device))
    if device.type == "cpu":  # a resumed run must end bit-identical to an uninterrupted one
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp_dtype = torch.bfloat16 if recipe.train.dtype == "bfloat16" else None
    strategy = recipe.train.strategy if distributed.env_info().enabled else None
    balance.check_supported(recipe.distill.balance, strategy)

    t_dtype = teacher_dtype(recipe, device)
    teacher, tokenizer, task = loaded if loaded is not None else load_teacher(recipe, t_dtype)[:3]
    t_shape = model_shape(teacher.config)
    checks.check_positions(recipe.data.seq_len, t_shape, "teacher")

    kind = get_task(task)
    # Validation batches are global (batch_size * world rows); validate() gives each rank its share.
    train_blocks, val = kind.training_data(recipe, tokenizer, teacher.config, distributed.info().world)

    calibration = functools.cache(lambda: calibration_batches(train_blocks, recipe))
    student, plan, derivation = make_student(recipe, teacher, tokenizer, task, calibration, device, console)
    if recipe.student.lora is not None:
        if recipe.train.strategy == "fsdp" and distributed.env_info().enabled:
            raise ShdError("student.lora: LoRA students train with train.strategy=ddp (adapters are small); set it")
        student = apply_lora(student, recipe.student.lora)
    s_shape = model_shape(student.config)
    checks.check_positions(recipe.data.seq_len, s_shape, "student")
    use_logit = kind.uses_logit_kd(recipe.distill, teacher, student)

    for model in (teacher, student):
        enable_capture(model)
    teacher.eval().requires_grad_(False)
    teacher.to(device, t_dtype)  # loaded in t_dtype already (a benchmark's `loaded` teacher may not be)
    sharded = recipe.train.strategy == "fsdp" and distributed.env_info().enabled
    if not sharded:  # fully_shard moves an FSDP student to the device itself, one block at a time
        student.to(device)
    student.train()
    if recipe.train.compile:
        # In place (same module, same state_dict keys). Capture still works: dynamo runs the recorder's
        # Python side effects (tests/test_perf_quick.py); step_losses fails clearly if a layer goes missing.
        student.compile()
    blocks = list(decoder_layers(student)) if recipe.train.strategy == "fsdp" else None
    student = distributed.wrap_student(student, recipe.train.strategy, device, amp_dtype,
                                       encoder=kind.ddp_find_unused, blocks=blocks,
                                       from_rank0=recipe.student.path is not None)
    bases = feature_bases(teacher, plan)
    projector = None
    if recipe.distill.target == "projector" and recipe.distill.shd > 0:
        projector = make_projector(plan, model_shape(teacher.config).heads, s_shape.heads).to(device)
    setup = Setup(recipe, device, amp_dtype, teacher, student, tokenizer, task, plan, bases, train_blocks, val,
                  use_logit, projector, derivation)
    if recipe.distill.shd > 0:
        setup.balance, setup.balance_note = balance.resolve_mode(recipe.distill.balance, kind.regresses_teacher)
    return setup


def autocast(setup: Setup) -> AbstractContextManager:
    """The student's (and teacher's) autocast: train.dtype on the run's device."""
    return teacher_autocast(setup.device, setup.amp_dtype)


def step_losses(setup: Setup, batch: dict[str, torch.Tensor],
                terms_out: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Total loss (with grad), its parts (detached) and the squeeze weights for one batch.
    terms_out, if given, receives the weighted terms with grad (balance.weighted_terms) for train_step."""
    d = setup.recipe.distill
    fraction = shd_fraction(setup)
    # balance auto -> off: training steps skip the term (a KD-alone step); validation still measures it
    attend = d.shd > 0 and not (setup.balance == "off" and setup.student.training)
    kind = setup.kind
    # ---- forwards (both output heads skipped when the task computes them inside its loss)
    row_mask = kind.row_mask(batch)  # None: every row counts (images: no padding, CLS included)
    inputs = kind.inputs(batch)
    fused = kind.fuses_heads(d)
    with fused_logits.bypass_heads(setup.teacher, enabled=fused):
        t_out, t_records = setup.teacher_forward(inputs)
    with setup.student_recorder.active(), autocast(setup), fused_logits.bypass_heads(setup.student, enabled=fused):
        s_out = setup.student(**inputs)
        s_records = dict(setup.student_recorder.records)
    # ---- the task's parts (task loss, logit KD)
    channels = setup.derivation.channels if setup.derivation is not None else None
    parts = kind.losses(Forwards(setup.student, setup.teacher, s_out, t_out, batch, d, setup.use_logit, channels))
    # ---- the attention part
    weights = {}
    if attend:
        missing = [i for i, _ in setup.plan.pairs if i not in s_records]
        if missing:
            raise ShdError(
                f"student layers {missing}: their attention was not captured, so SHD has no maps for them"
                + ("; set train.compile=false" if setup.recipe.train.compile else
                   "; the model must route attention through transformers' AttentionInterface")
            )
    # A schedule at 0: the term is still measured, without a graph (nothing to back-propagate).
    with torch.no_grad() if fraction == 0 else nullcontext():
        if attend and d.target == "relations":
            parts["shd"] = relation_loss(t_records, s_records, setup.plan.pairs, row_mask, d.relation_heads,
                                         d.chunk_rows)
        elif attend and d.target != "squeeze":
            parts["shd"] = attention_target_loss(d.target, t_records, s_records, setup.plan.pairs, setup.plan.groups,
                                                 row_mask, d.temperature, d.attn_loss, setup.projector)
        elif attend:
            result = shd_loss(
                t_records, s_records, setup.plan.pairs, setup.plan.groups, setup.bases, row_mask,
                alpha=d.alpha, kind=d.attn_loss, tau=d.temperature, impl=d.impl, chunk_rows=d.chunk_rows,
                budget_bytes=d.chunk_memory_mb * 2**20,
            )
            parts["shd"] = result.loss
            weights = result.weights
    # ---- weighted (balance, schedule)
    terms = balance.weighted_terms(parts, {"task": d.task, "logit": d.logit}, fraction, setup.balance)
    shown = dict(terms)
    if setup.balance in ("grad", "agreement") and "shd" in terms:  # its real scale is set in backward: the last one
        default = fraction if setup.balance == "grad" else 1.0
        shown["shd"] = terms["shd"] * (default if setup.shd_grad_scale is None else setup.shd_grad_scale)
    if terms_out is not None:
        terms_out.update(terms)
    total = sum(shown.values())
    return total, {k: v.detach() for k, v in parts.items()}, weights


def shd_fraction(setup: Setup) -> float:
    """The SHD weight of the step being taken: distill.shd x its schedule, 0 when balance auto chose off."""
    if setup.balance == "off":
        return 0.0
    return balance.shd_fraction(setup.recipe.distill, setup.step, setup.recipe.train.max_steps)


class NonFinite(Exception):
    """A loss part or the gradient of a step is NaN/inf (raised before the optimizer moves)."""

    def __init__(self, part: str, value: float) -> None:
        super().__init__(part, value)
        self.part, self.value = part, value


def train_step(setup: Setup, stream: BatchStream, optimizer, scheduler) -> tuple[dict, float, list, int]:
    """One optimizer step over grad_accum micro-batches -> (mean loss parts, grad norm, squeeze weights, tokens)."""
    accum, clip = setup.recipe.train.grad_accum, setup.recipe.train.grad_clip
    d, every = setup.recipe.distill, setup.recipe.train.grad_norms_every
    # Per-part backward (balance grad/agreement/pcgrad always, norms every grad_norms_every-th step).
    # Under DDP each part's gradient is averaged over ranks by hand (distributed.average_grads) with DDP's own
    # all-reduce switched off for the step; FSDP's sharded gradients only come through its hooks: no per-part.
    sharded = distributed.is_sharded(setup.student)
    measure = not sharded and every > 0 and (setup.step + 1) % every == 0
    per_part = measure or (setup.balance in balance.PER_PART and not sharded)
    params = [p for p in setup.student.parameters() if p.requires_grad]
    n_student = len(params)
    if setup.projector is not None:
        params += list(setup.projector.parameters())
    fraction = shd_fraction(setup)
    optimizer.zero_grad(set_to_none=True)
    parts_sum: dict[str, float] = {}
    part_grads: dict[str, list] = {}  # grad_accum > 1: per-part sums, for norms of the whole step
    part_norms: dict[str, float] = {}
    weights, tokens = [], 0
    for micro in range(accum):
        batch = {k: v.to(setup.device) for k, v in stream.next().items()}
        # forward and backward inside: DDP/FSDP skip the gradient all-reduce until the last micro-step
        with distributed.grad_sync(setup.student, micro == accum - 1 and not per_part):
            terms: dict[str, torch.Tensor] = {}
            total, parts, w = step_losses(setup, batch, terms)
            for name, value in {**parts, "total": total.detach()}.items():
                value = float(value)
                if not math.isfinite(value):
                    raise NonFinite(name, value)
                parts_sum[name] = parts_sum.get(name, 0.0) + value / accum
            shd_coef = float(terms["shd"].detach() / parts["shd"]) if "shd" in parts and parts["shd"] > 0 else 0.0
            if per_part:
                # The fused logit loss holds one gradient for task + logit KD together: back-propagate them as
                # one term there (its norm is logged as grad_norm_rest).
                split = measure and not setup.kind.fuses_heads(d)
                result = balance.backward_terms(terms if split else balance.merge_rest(terms), params,
                                                n_student, setup.balance, fraction, accum,
                                                part_grads if accum > 1 and measure else None, setup.agreement,
                                                distributed.average_grads if distributed.env_info().enabled else None)
                if setup.balance in ("grad", "agreement") and "shd" in terms:  # the total with the scale applied
                    setup.shd_grad_scale = result.scale
                    shd_coef *= result.scale
                    value = sum(float(v.detach()) for k, v in terms.items() if k != "shd")
                    parts_sum["total"] += (value + result.scale * float(terms["shd"].detach())
                                           - float(total.detach())) / accum
                if measure:  # how SHD's gradient relates to the task's (issue 26's diagnostics)
                    for key, value in (("grad_cos_shd", result.cosine), ("grad_ratio_shd", result.ratio)):
                        if value is not None:
                            parts_sum[key] = parts_sum.get(key, 0.0) + value / accum
                if accum == 1 and measure:
                    part_norms = result.norms
            else:
                (total / accum).backward()
            if setup.balance not in ("none", "off") or d.shd_schedule != "constant" or d.shd_warmup_steps:
                parts_sum["shd_coef"] = parts_sum.get("shd_coef", 0.0) + shd_coef / accum
            if setup.balance == "agreement" and "shd" in parts:
                parts_sum["shd_agreement"] = setup.agreement.estimate
        weights.append(w)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
    parts_sum, tokens = distributed.reduce_metrics(parts_sum, tokens, setup.device)
    part_norms.update({name: float(balance.global_norm(gs)) for name, gs in part_grads.items()})
    for name, value in part_norms.items():  # of each weighted term's gradient, before clipping
        parts_sum[f"grad_norm_{name}"] = value
    # max_norm=inf measures without clipping (the scale factor clamps to exactly 1).
    grad_norm = distributed.as_float(
        torch.nn.utils.clip_grad_norm_(setup.student.parameters(), clip if clip > 0 else math.inf)
    )
    if not math.isfinite(grad_norm):
        raise NonFinite("gradient", grad_norm)
    optimizer.step()
    scheduler.step()
    return parts_sum, grad_norm, weights, tokens


@torch.no_grad()
def validate(setup: Setup) -> dict[str, float]:
    """Mean loss parts over the fixed validation batches (+ perplexity for causal LMs)."""
    setup.student.eval()
    sums: dict[str, float] = {}
    tokens = 0.0
    for batch in setup.val_batches:
        batch = {k: v.to(setup.device) for k, v in distributed.rank_rows(batch).items()}
        total, parts, _ = step_losses(setup, batch)
        n = setup.kind.batch_weight(batch)
        for k, v in {**parts, "total": total.detach()}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        tokens += n
    first = {k: v[:DIAGNOSTIC_ROWS].to(setup.device) for k, v in distributed.rank_rows(setup.val_batches[0]).items()}
    diagnostics = attention_report(setup, first)
    setup.student.train()
    world = distributed.info().world
    sums = distributed.all_reduce_sum({**sums, "_tokens": tokens, **{f"_diag_{k}": v / world
                                                                      for k, v in diagnostics.items()}}, setup.device)
    tokens = sums.pop("_tokens")
    out = {f"val_{k}": v / max(tokens, 1.0) for k, v in sums.items() if not k.startswith("_diag_")}
    diagnostics = {k.removeprefix("_diag_"): v for k, v in sums.items() if k.startswith("_diag_")}
    out.update({f"val_{k}": v for k, v in diagnostics.items() if not k.startswith(diag.LAYER_KL)})
    by_layer = {k.removeprefix(diag.LAYER_KL): v for k, v in diagnostics.items() if k.startswith(diag.LAYER_KL)}
    if by_layer:
        out[LAYER_KL] = by_layer
    out.update(setup.kind.validation_extras(setup.student, setup.val_batches, setup.device, out))
    return out


DIAGNOSTIC_ROWS = 4  # rows of the first validation batch the attention diagnostics read (whole maps per layer)


@torch.no_grad()
def attention_report(setup: Setup, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sink share of the SHD KL and row entropies of student maps and squeezed targets on one batch
    (attention/diagnostics.py); {} when the run has no squeeze target."""
    d, kind = setup.recipe.distill, setup.kind
    if d.shd == 0 or d.target != "squeeze":
        return {}
    inputs, fused = kind.inputs(batch), kind.fuses_heads(d)
    with fused_logits.bypass_heads(setup.teacher, enabled=fused):
        _, t_records = setup.teacher_forward(inputs)
    with setup.student_recorder.active(), autocast(setup), fused_logits.bypass_heads(setup.student, enabled=fused):
        setup.student(**inputs)
        s_records = dict(setup.student_recorder.records)
    return diag.attention_diagnostics(t_records, s_records, setup.plan.pairs, setup.plan.groups, setup.bases,
                                 kind.row_mask(batch), batch.get("attention_mask"), d.alpha, d.temperature)


class WeightStats:
    """Running mean / std of squeeze weights per (student layer, group)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.count: dict[tuple[int, int], int] = {}

    def add(self, weights: dict[int, list[torch.Tensor]]) -> None:
        for layer, groups in weights.items():
            for j, w in enumerate(groups):
                w = w.detach().double().cpu()
                key = (layer, j)
                s = self.sums.setdefault(key, [torch.zeros(w.shape[1], dtype=torch.float64)] * 2)
                self.sums[key] = [s[0] + w.sum(0), s[1] + (w * w).sum(0)]
                self.count[key] = self.count.get(key, 0) + w.shape[0]

    def summary(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for (layer, j), (s1, s2) in sorted(self.sums.items()):
            n = self.count[(layer, j)]
            mean = s1 / n
            std = (s2 / n - mean * mean).clamp_min(0).sqrt()
            out.setdefault(str(layer), []).append({"mean": mean.tolist(), "std": std.tolist(), "samples": n})
        return out


@dataclass
class RunState:
    """What the loop accumulates; every checkpoint stores it beside weights, optimizer, data and RNG."""

    step: int = 0
    tokens_seen: int = 0
    train_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    stats: WeightStats = field(default_factory=WeightStats)
    init_eval: dict = field(default_factory=dict)  # the final evaluation's metrics on the student at step 0

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "train_s": self.train_s, "history": self.history,
                "validation": self.validation, "alpha_sums": self.stats.sums, "alpha_count": self.stats.count,
                "init_eval": self.init_eval}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.train_s = state["step"], state["tokens_seen"], state["train_s"]
        self.history, self.validation = state["history"], state["validation"]
        self.stats.sums, self.stats.count = state["alpha_sums"], state["alpha_count"]
        self.init_eval = state.get("init_eval", {})


@dataclass
class Run:
    """A run between setup and outputs: the prepared Setup, its data stream, optimizer and schedule, the
    RunState the loop accumulates, and where checkpoints go."""

    setup: Setup
    stream: BatchStream
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: RunState
    root: Path  # checkpoints/
    fingerprint: str  # of the recipe fields a resumed run must share
    # DDP replicas are identical: rank 0 writes, every rank reads. An FSDP2 student is sharded: every rank
    # writes its own shards (checkpoint.save_sharded, torch.distributed.checkpoint), never the whole model.
    sharded: bool
    is_main: bool

    def save(self, where: dict | None = None) -> Path | None:
        """A checkpoint of the current step (stream position `where`, default: now); every rank waits."""
        where = where or checkpoint.position(self.stream)
        folder = None
        args = (self.root, self.state.step, self.fingerprint, distributed.unwrap(self.setup.student), self.optimizer,
                self.scheduler, where, {**self.state.state_dict(), "agreement": self.setup.agreement.state_dict()},
                self.setup.recipe.train.keep_checkpoints)
        # A full disk keeps the previous checkpoint (saves are atomic): say so and how to go on.
        with output_dir_writes(self.setup.recipe):
            if self.sharded:  # collective: every rank writes its shards
                folder = checkpoint.save_sharded(*args)
            elif self.is_main:
                folder = checkpoint.save(*args)
        distributed.barrier()
        return folder


def run_distillation(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False,
                     callbacks: Sequence[Callback] = ()) -> dict:
    """`shd distill`: prepare, train (from the newest checkpoint with resume), write student/ + metrics + report.

    `callbacks` (shdcli/callbacks.py) see the run after the built-in ones: the console display and, on
    rank 0, the trackers of train.report_to."""
    t_start = time.perf_counter()
    trackers.require(recipe.train.report_to)  # a missing tracker package fails before the slow setup
    dist_info = distributed.init(recipe.train.device)  # no-op outside torchrun
    if not dist_info.is_main:
        console = Console(quiet=True)
    builtin = [ProgressDisplay(console), *([trackers.tracking(recipe)] if dist_info.is_main else [])]
    hooks = CallbackList([*builtin, *callbacks])
    try:
        run = open_run(recipe, console, resume, overwrite, dist_info, hooks)
        setup_s = time.perf_counter() - t_start
        train_loop(run, console, hooks)
        metrics = write_outputs(run, setup_s, t_start, dist_info)
        hooks.on_end(metrics)
    except BaseException:
        with suppress(Exception):  # the run's own error is the one to report
            hooks.close()
        raise
    hooks.close()
    return metrics


def open_run(recipe: Recipe, console: Console, resume: bool, overwrite: bool, dist_info,
             hooks: Callback | None = None) -> Run:
    """Setup phase: check the output folder, prepare the models and plan, show them, claim the folder, and
    restore the newest checkpoint (resume) or measure the student at step 0."""
    hooks = hooks or Callback()
    resume_from = checkpoint.check_output_dir(recipe, resume, overwrite)  # before the slow part: fail fast
    setup = prepare(recipe, console)
    t_params, s_params = count_parameters(setup.teacher), count_parameters(distributed.unwrap(setup.student))
    if setup.derivation is not None:
        console.print(derivation_table(setup.derivation, model_shape(setup.teacher.config), s_params, t_params))
    warning = size_warning(s_params, t_params)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")
    console.print(plan_table(setup.plan))
    if setup.balance_note:
        console.print(setup.balance_note)
    missing = ood_unavailable(recipe.data.ood_eval)  # optional: the run goes on, the report says why
    if missing:
        console.print(f"[yellow]warning: data.ood_eval will not be measured: {escape(missing)}[/yellow]",
                      soft_wrap=True)
    if dist_info.is_main:
        with output_dir_writes(recipe):
            checkpoint.claim_output_dir(recipe, overwrite)
    distributed.barrier()

    # Text (TokenBlocks) and images (tasks.image.ImageSet) are both row sets a BatchStream serves.
    stream = BatchStream(setup.train_blocks, recipe.data.batch_size, recipe.train.seed, dist_info.rank, dist_info.world)
    optimizer = make_optimizer(setup.student, recipe, setup.projector)
    run = Run(setup, stream, optimizer, make_scheduler(optimizer, recipe), RunState(),
              checkpoint.checkpoint_root(recipe), recipe.fingerprint(), distributed.is_sharded(setup.student),
              dist_info.is_main)
    how = (f"sharded over {dist_info.world} ranks (torch.distributed.checkpoint)" if run.sharded
           else "whole (safetensors)")
    console.print(f"checkpoints: every {recipe.train.save_every} steps, at the end and on Ctrl-C, {how}, to "
                  f"{run.root} (the newest {recipe.train.keep_checkpoints} kept)", soft_wrap=True)
    if resume_from is not None:  # the one place a run is restored
        restored = checkpoint.load(resume_from, run.fingerprint, distributed.unwrap(setup.student), optimizer,
                                   run.scheduler, stream)
        distributed.allocate_unsharded(setup.student)
        run.state.load_state_dict(restored)
        if "agreement" in restored:  # balance=agreement's running cosine (older checkpoints lack it)
            setup.agreement.load_state_dict(restored["agreement"])
        console.print(f"resumed from {resume_from} (step {run.state.step} of {recipe.train.max_steps})")
        hooks.on_start(recipe, run.state)
        return run
    if resume:  # claimed by this recipe, stopped before its first checkpoint (check_output_dir refuses others)
        console.print(f"no checkpoint yet in {recipe.output_dir}: starting at step 0")
    hooks.on_start(recipe, run.state)
    run.state.validation.append({"step": 0, **validate(setup)})
    hooks.on_validation(run.state, run.state.validation[-1])
    # The student at init, scored like the final student (size and speed are the same: not re-timed).
    run.state.init_eval = evaluate_student(setup, run.state.validation[0], speed=False)
    return run


def train_loop(run: Run, console: Console, hooks: Callback | None = None) -> None:
    """Loop phase: optimizer steps to train.max_steps with callbacks (progress, logs), validation and
    checkpoints; a signal saves and raises checkpoint.Interrupted, a non-finite loss saves the last good
    state and stops."""
    setup, state, recipe = run.setup, run.state, run.setup.recipe
    hooks = hooks or Callback()
    t_train, train_s_before = time.perf_counter(), state.train_s
    max_steps = recipe.train.max_steps
    with checkpoint.StopOnSignal() as stop:
        while state.step < max_steps:
            before = checkpoint.position(run.stream)  # the state to save if this step goes bad
            setup.step = state.step
            try:
                parts, grad_norm, weights, tokens = train_step(setup, run.stream, run.optimizer, run.scheduler)
            except NonFinite as bad:
                folder = run.save(before)
                where = "the gradient" if bad.part == "gradient" else f"loss part {bad.part!r}"
                raise ShdError(
                    f"{where} became {bad.value} at step {state.step + 1}; stopped and saved the last good state "
                    f"(step {state.step}) to {folder}; lower train.lr (now {recipe.train.lr:g}) or the distill "
                    "weights, then run again with --overwrite"
                ) from None
            state.step += 1
            state.tokens_seen += tokens
            for w in weights:
                state.stats.add(w)
            state.train_s = train_s_before + time.perf_counter() - t_train
            state.history.append({"step": state.step, **parts, "lr": run.scheduler.get_last_lr()[0],
                                  "grad_norm": grad_norm, "time_s": state.train_s})
            hooks.on_step(state, {**state.history[-1], "tokens": tokens})
            if state.step % recipe.train.eval_every == 0 or state.step == max_steps:
                state.validation.append({"step": state.step, **validate(setup)})
                hooks.on_validation(state, state.validation[-1])
            if state.step % recipe.train.save_every == 0 or state.step == max_steps or stop.signum is not None:
                folder = run.save()
            if stop.signum is not None:
                raise checkpoint.Interrupted(stop.signum, state.step, folder)


def output_dir_writes(recipe: Recipe) -> AbstractContextManager[None]:
    """Writes into output_dir: a full or read-only disk becomes one exit-2 line naming output_dir."""
    return destination("output_dir", Path(recipe.output_dir),
                       ", then run again with --resume" if checkpoint.latest(checkpoint.checkpoint_root(recipe))
                       else ", then run again")


def write_outputs(run: Run, setup_s: float, t_start: float, dist_info) -> dict:
    """Output phase: the student folder (with its plan, sentence-transformers files, LoRA adapter), the
    final evaluation, metrics.json, report.md and the model card.

    Whole outputs or none: if anything stops this phase (Ctrl-C in the final evaluation, a full disk), what it
    wrote is removed again, so no student/ without its card and metrics stays behind; the final checkpoint
    is kept and --resume redoes this phase."""
    try:
        return _write_outputs(run, setup_s, t_start, dist_info)
    except BaseException:
        if dist_info.is_main:
            with suppress(OSError):  # a read-only disk: the error being raised is the one to report
                checkpoint.remove_outputs(Path(run.setup.recipe.output_dir))
        raise


def _write_outputs(run: Run, setup_s: float, t_start: float, dist_info) -> dict:
    setup, state, recipe = run.setup, run.state, run.setup.recipe
    out_dir = Path(recipe.output_dir)
    student_dir = out_dir / "student"
    plan_dict = setup.plan.to_dict()
    extra = {"shd_plan.json": json.dumps(plan_dict, indent=2)}
    # A sentence-transformers teacher's modules.json / pooling / normalize, adapted to the student's width.
    extra.update(sentence_transformers_files(resolve_source(recipe.teacher.path, "teacher.path"),
                                             distributed.unwrap(setup.student).config)[0])
    to_save = distributed.model_for_saving(setup.student)  # None off rank 0 and under FSDP
    with output_dir_writes(recipe):
        if distributed.is_sharded(setup.student):  # collective: streamed to rank 0 one safetensors file at a time
            save_sharded_model_folder(setup.student, setup.tokenizer, student_dir, extra)
        elif to_save is not None and recipe.student.lora is not None:
            save_lora_student(to_save, setup.tokenizer, student_dir, extra)  # merged + lora/adapter + lora/base
        elif to_save is not None:
            save_model_folder(to_save, setup.tokenizer, student_dir, extra)
    final = evaluate_student(setup, state.validation[-1], student_dir)
    metrics = {
        "recipe": recipe.resolved(),
        "balance": {"mode": setup.balance, "why": setup.balance_note},  # distill.balance as this run used it
        "plan": plan_dict,
        "student_dir": str(student_dir),
        "steps_done": state.step,
        "history": state.history,
        "validation": state.validation,
        "init_eval": state.init_eval,
        "final_eval": final,
        "derivation": setup.derivation.to_dict() if setup.derivation is not None else None,
        "alphas": state.stats.summary(),
        # optional evaluation corpora this machine lacks: {recipe field: why}, a "not measured" report row
        "not_measured": {"data.ood_eval": why} if (why := ood_unavailable(recipe.data.ood_eval)) else {},
        "sizes": {"teacher_params": count_parameters(setup.teacher),
                  "student_params": count_parameters(setup.student),
                  "student_trainable_params": sum(p.numel() for p in setup.student.parameters() if p.requires_grad)},
        "timings": {"setup_s": setup_s, "train_s": state.train_s,
                    "tokens_per_s": state.tokens_seen / max(state.train_s, 1e-9),
                    "total_s": time.perf_counter() - t_start},
        "device": str(setup.device),
        "distributed": {"world_size": dist_info.world,
                        "strategy": recipe.train.strategy if dist_info.enabled else None},
    }
    if dist_info.is_main:
        with output_dir_writes(recipe):
            write_json_atomic(out_dir / "metrics.json", metrics)
            figures = plots.write_run_plots(metrics, out_dir)  # before the report that embeds them
            write_text_atomic(out_dir / "report.md", render_report(metrics, figures.files, figures.note))
            if (student_dir / "config.json").exists():  # the card holds the final evaluation: after it
                write_text_atomic(student_dir / "README.md",
                                  render_card(metrics, setup.task, "modules.json" in extra))
    distributed.barrier()
    return metrics


def evaluate_student(setup: Setup, last_val: dict[str, float], student_dir: Path | None = None,
                     speed: bool = True) -> dict[str, float]:
    """The final evaluation of setup's student as it is now: the last validation, the task's numbers on the
    run's validation batches, and (text tasks) what `shd eval` reports for this student
    (evaluate.final_evaluation). The run scores the student at step 0 and at the end with it."""
    out = {k: v for k, v in last_val.items() if k != LAYER_KL}  # numbers only: per-layer KL is a plot
    was_training = setup.student.training
    setup.student.eval()
    try:
        out.update(setup.kind.run_metrics(setup.student, setup.teacher, setup.val_batches, setup.recipe,
                                             setup.device))
    finally:
        setup.student.train(was_training)
    if setup.kind.text:
        out.update(final_evaluation(setup, student_dir, speed))
    return out
