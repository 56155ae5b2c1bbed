"""The distillation loop: teacher forward (captured), student forward (captured), losses, AdamW."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shdcli import capture
from shdcli.data import BatchStream, TokenBlocks, eval_batches, read_documents, split_documents, tokenize
from shdcli.errors import ShdError
from shdcli.losses import causal_lm_loss, embedding_loss, logit_kd_loss, shd_loss
from shdcli.mapping import Plan, layer_pairs, make_plan, plan_table
from shdcli.models import (
    CAUSAL_LM,
    build_student,
    count_parameters,
    derive_student_config,
    init_student_from_teacher,
    load_model,
    model_shape,
    output_projection,
    resolve_source,
    save_model_folder,
)
from shdcli.recipe import Recipe
from shdcli.report import render_report, write_json_atomic, write_text_atomic
from shdcli.shd import group_feature_bases, group_heads


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
    train_blocks: TokenBlocks
    val_batches: list[dict[str, torch.Tensor]]
    use_logit: bool
    teacher_recorder: capture.AttentionRecorder = field(init=False)
    student_recorder: capture.AttentionRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.teacher_recorder = capture.AttentionRecorder({t for _, t in self.plan.pairs}, keep_values=True)
        self.student_recorder = capture.AttentionRecorder({s for s, _ in self.plan.pairs})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ShdError("train.device: cuda was asked for but no CUDA GPU is visible; set train.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_teacher(recipe: Recipe) -> tuple[torch.nn.Module, object, str, Path]:
    folder = resolve_source(recipe.teacher.path, "teacher.path")
    teacher, tokenizer, task = load_model(
        folder, "teacher.path", allow_pickle=recipe.teacher.allow_pickle, trust_remote_code=recipe.teacher.trust_remote_code
    )
    if tokenizer is None:
        raise ShdError(f"teacher.path: {folder} has no tokenizer files; add tokenizer.json (or vocab files) to it")
    return teacher, tokenizer, task, folder


def make_student(recipe: Recipe, teacher: torch.nn.Module, tokenizer, task: str) -> tuple[torch.nn.Module, Plan]:
    t_shape = model_shape(teacher.config)
    spec = recipe.student
    if spec.path is not None:
        folder = resolve_source(spec.path, "student.path")
        student, s_tok, s_task = load_model(folder, "student.path", task=task, allow_pickle=spec.allow_pickle)
        if s_tok is not None and s_tok.get_vocab() != tokenizer.get_vocab():
            raise ShdError(
                "student.path: the student's tokenizer differs from the teacher's; SHD compares attention over the "
                "same tokens, so give a student that shares the teacher's tokenizer (or derive one: student.from_teacher)"
            )
        s_shape = model_shape(student.config)
        return student, make_plan(t_shape, s_shape, recipe.distill.layers, recipe.distill.grouping)
    ft = spec.from_teacher
    assert ft is not None
    layers = ft.layers or t_shape.layers
    heads = ft.heads or t_shape.heads
    if heads > t_shape.heads:
        raise ShdError(
            f"student.from_teacher.heads: {heads} is more than the teacher's {t_shape.heads} heads; "
            f"choose at most {t_shape.heads}"
        )
    if layers > t_shape.layers:
        raise ShdError(
            f"student.from_teacher.layers: {layers} is more than the teacher's {t_shape.layers} layers; "
            f"choose at most {t_shape.layers}"
        )
    if ft.kv_heads is not None and (heads % ft.kv_heads or ft.kv_heads > heads):
        raise ShdError(f"student.from_teacher.kv_heads: {ft.kv_heads} must divide the student's {heads} heads")
    init_pairs = layer_pairs(t_shape.layers, layers, "auto")
    config = derive_student_config(teacher.config, init_pairs, heads, ft.kv_heads, ft.hidden_size, ft.intermediate_size)
    student = build_student(teacher, config, task)
    plan = make_plan(t_shape, model_shape(student.config), recipe.distill.layers, recipe.distill.grouping)
    if ft.init == "teacher":
        by_layer = {s: (g, r) for (s, _), g, r in zip(plan.pairs, plan.groups, plan.representatives)}
        base = group_heads(t_shape.heads, heads, "balanced")
        groups = [by_layer.get(s, (base, None))[0] for s, _ in init_pairs]
        reps = [by_layer.get(s, (None, [g[0] for g in base]))[1] for s, _ in init_pairs]
        init_student_from_teacher(student, teacher, init_pairs, groups, reps)
    return student, plan


def prepare(recipe: Recipe, console: Console) -> Setup:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.train.seed)
    device = pick_device(recipe.train.device)
    amp_dtype = torch.bfloat16 if recipe.train.dtype == "bfloat16" else None

    teacher, tokenizer, task, _ = load_teacher(recipe)
    t_shape = model_shape(teacher.config)
    if t_shape.max_positions and recipe.data.seq_len > t_shape.max_positions:
        raise ShdError(
            f"data.seq_len: {recipe.data.seq_len} is longer than the teacher's {t_shape.max_positions} positions; "
            f"set data.seq_len <= {t_shape.max_positions}"
        )
    student, plan = make_student(recipe, teacher, tokenizer, task)
    s_shape = model_shape(student.config)
    use_logit = recipe.distill.logit > 0 and task == CAUSAL_LM
    if use_logit and s_shape.vocab != t_shape.vocab:
        raise ShdError(
            f"distill.logit: teacher vocabulary ({t_shape.vocab}) and student vocabulary ({s_shape.vocab}) differ, "
            "so logits cannot be compared; set distill.logit=0 to train without logit KD"
        )

    docs = read_documents(recipe.data.path, recipe.data.text_field)
    if recipe.data.max_documents:
        docs = docs[: recipe.data.max_documents]
    train_docs, val_docs = split_documents(docs, recipe.data.val_fraction, recipe.train.seed)
    packed = task == CAUSAL_LM
    train_blocks = tokenize(train_docs, tokenizer, recipe.data.seq_len, packed)
    try:
        val_blocks = tokenize(val_docs, tokenizer, recipe.data.seq_len, packed)
    except ShdError as exc:
        raise ShdError(f"data.val_fraction: the validation split is too small ({exc}); raise data.val_fraction") from None
    val = eval_batches(val_blocks, recipe.data.batch_size, recipe.data.val_batches)

    for model in (teacher, student):
        capture.enable(model)
    teacher.eval().requires_grad_(False)
    t_dtype = teacher_dtype(recipe, device)
    if t_dtype is not None:
        teacher.to(t_dtype)
    teacher.to(device)
    student.to(device).train()
    if recipe.train.compile:
        # In place (same module, same state_dict keys). Capture still works: dynamo runs the recorder's
        # Python side effects (tests/test_perf_quick.py); step_losses fails clearly if a layer goes missing.
        student.compile()
    bases = feature_bases(teacher, plan)
    return Setup(recipe, device, amp_dtype, teacher, student, tokenizer, task, plan, bases, train_blocks, val, use_logit)


def teacher_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """dtype for the teacher's weights (None: leave them). It only runs forward, under inference_mode:
    bfloat16 halves its memory and time on CUDA; auto picks it there (and keeps float32 on CPU)."""
    choice = recipe.train.teacher_dtype
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "float32":
        return torch.float32
    if device.type == "cuda" and (recipe.train.dtype == "bfloat16" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def feature_bases(teacher: torch.nn.Module, plan: Plan) -> dict[int, list[torch.Tensor] | None]:
    """Per mapped teacher layer, the groups' reduced W_O bases (X_h = V_h W_O[h], see shd.py)."""
    head_dim = model_shape(teacher.config).head_dim
    return {
        t: group_feature_bases(output_projection(teacher, t).detach().float(), groups, head_dim)
        for (_, t), groups in zip(plan.pairs, plan.groups)
    }


def autocast(setup: Setup):
    if setup.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=setup.device.type, dtype=setup.amp_dtype)


def teacher_forward(setup: Setup, batch: dict[str, torch.Tensor]):
    with torch.inference_mode(), setup.teacher_recorder.active(), autocast(setup):
        out = setup.teacher(**batch)
        records = dict(setup.teacher_recorder.records)
    return out, records


def step_losses(setup: Setup, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Total loss (with grad), its parts (detached) and the squeeze weights for one batch."""
    d = setup.recipe.distill
    mask = batch["attention_mask"]
    t_out, t_records = teacher_forward(setup, batch)
    with setup.student_recorder.active(), autocast(setup):
        s_out = setup.student(**batch)
        s_records = dict(setup.student_recorder.records)
    parts: dict[str, torch.Tensor] = {}
    if setup.task == CAUSAL_LM:
        parts["task"] = causal_lm_loss(s_out.logits, batch["input_ids"], mask)
        if setup.use_logit:
            parts["logit"] = logit_kd_loss(s_out.logits, t_out.logits, mask, d.logit_temperature)
    else:
        parts["task"] = embedding_loss(s_out.last_hidden_state, t_out.last_hidden_state, mask)
    weights = {}
    if d.shd > 0:
        missing = [i for i, _ in setup.plan.pairs if i not in s_records]
        if missing:
            raise ShdError(
                f"student layers {missing}: their attention was not captured, so SHD has no maps for them"
                + ("; set train.compile=false" if setup.recipe.train.compile else
                   "; the model must route attention through transformers' AttentionInterface")
            )
        result = shd_loss(
            t_records, s_records, setup.plan.pairs, setup.plan.groups, setup.bases, mask.bool(),
            alpha=d.alpha, kind=d.attn_loss, tau=d.temperature, impl=d.impl, chunk_rows=d.chunk_rows,
        )
        parts["shd"] = result.loss
        weights = result.weights
    coef = {"task": d.task, "logit": d.logit, "shd": d.shd}
    total = sum(coef[k] * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}, weights


@torch.no_grad()
def validate(setup: Setup) -> dict[str, float]:
    """Mean loss parts over the fixed validation batches (+ perplexity for causal LMs)."""
    setup.student.eval()
    sums: dict[str, float] = {}
    tokens = 0.0
    for batch in setup.val_batches:
        batch = {k: v.to(setup.device) for k, v in batch.items()}
        total, parts, _ = step_losses(setup, batch)
        n = float(batch["attention_mask"][:, 1:].sum()) if setup.task == CAUSAL_LM else float(len(batch["input_ids"]))
        for k, v in {**parts, "total": total.detach()}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        tokens += n
    setup.student.train()
    out = {f"val_{k}": v / max(tokens, 1.0) for k, v in sums.items()}
    if setup.task == CAUSAL_LM:
        out["val_perplexity"] = math.exp(min(out["val_task"], 700.0))
    return out


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


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.train.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = recipe.train.warmup_steps, recipe.train.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_distillation(recipe: Recipe, console: Console) -> dict:
    """`shd distill`: prepare, train, evaluate, write student/ + metrics.json + report.md."""
    t_start = time.perf_counter()
    out_dir = Path(recipe.output_dir)
    setup = prepare(recipe, console)
    console.print(plan_table(setup.plan))
    setup_s = time.perf_counter() - t_start

    stream = BatchStream(setup.train_blocks, recipe.data.batch_size, recipe.train.seed)
    optimizer = make_optimizer(setup.student, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    stats = WeightStats()
    history: list[dict] = []
    validation: list[dict] = [{"step": 0, **validate(setup)}]
    console.print("validation at step 0: " + _fmt_losses(validation[-1]))

    tokens_seen = 0
    t_train = time.perf_counter()
    with _progress(console) as progress:
        task_id = progress.add_task("distill", total=recipe.train.max_steps, losses="", speed="")
        for step in range(1, recipe.train.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            parts_sum: dict[str, float] = {}
            for _ in range(recipe.train.grad_accum):
                batch = {k: v.to(setup.device) for k, v in stream.next().items()}
                total, parts, weights = step_losses(setup, batch)
                for name, value in {**parts, "total": total.detach()}.items():
                    if not torch.isfinite(value):
                        raise ShdError(
                            f"loss part {name!r} became {float(value)} at step {step}; lower train.lr or "
                            "distill weights (the student in output_dir was not overwritten)"
                        )
                    parts_sum[name] = parts_sum.get(name, 0.0) + float(value) / recipe.train.grad_accum
                (total / recipe.train.grad_accum).backward()
                stats.add(weights)
                tokens_seen += int(batch["attention_mask"].sum())
            grad_norm = None
            if recipe.train.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.student.parameters(), recipe.train.grad_clip))
            optimizer.step()
            scheduler.step()
            elapsed = time.perf_counter() - t_train
            record = {"step": step, **parts_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "time_s": elapsed}
            history.append(record)
            progress.update(task_id, advance=1, losses=_fmt_losses(parts_sum), speed=f"{tokens_seen / elapsed:.0f} tok/s")
            if step % recipe.train.eval_every == 0 or step == recipe.train.max_steps:
                validation.append({"step": step, **validate(setup)})
                progress.console.print(f"validation at step {step}: " + _fmt_losses(validation[-1]))
    train_s = time.perf_counter() - t_train

    student_dir = out_dir / "student"
    plan_dict = setup.plan.to_dict()
    import json

    save_model_folder(setup.student, setup.tokenizer, student_dir, {"shd_plan.json": json.dumps(plan_dict, indent=2)})
    final = _final_eval(setup, validation[-1])
    metrics = {
        "recipe": recipe.resolved(),
        "plan": plan_dict,
        "student_dir": str(student_dir),
        "steps_done": recipe.train.max_steps,
        "history": history,
        "validation": validation,
        "final_eval": final,
        "alphas": stats.summary(),
        "sizes": {"teacher_params": count_parameters(setup.teacher), "student_params": count_parameters(setup.student)},
        "timings": {"setup_s": setup_s, "train_s": train_s, "tokens_per_s": tokens_seen / max(train_s, 1e-9),
                    "total_s": time.perf_counter() - t_start},
        "device": str(setup.device),
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "report.md", render_report(metrics))
    return metrics


def _final_eval(setup: Setup, last_val: dict[str, float]) -> dict[str, float]:
    from shdcli.evaluate import embedding_agreement, perplexity

    out = dict(last_val)
    if setup.task == CAUSAL_LM:
        out["teacher_val_perplexity"] = perplexity(setup.teacher, setup.val_batches, setup.device)["perplexity"]
    else:
        setup.student.eval()
        out.update(embedding_agreement(setup.student, setup.teacher, setup.val_batches, setup.device))
    return out


def _fmt_losses(parts: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in parts.items() if k != "step" and isinstance(v, float))
