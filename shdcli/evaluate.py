"""Evaluation shared by `shd distill` (final evaluation) and `shd eval`: one loop over models that
asks each model's task for its held-out quality (tasks/*: perplexity for causal LMs, embedding
agreement for encoders) and adds what every task shares:
  - attention fidelity: the SHD KL (losses.shd_loss, tau = 1) of the student's maps to the squeezed
    teacher maps on held-out text, with the student's shd_plan.json or an inferred plan;
  - size (parameters, weight bytes on disk) and latency / throughput at batch 1 and 8, measured
    round-robin with the teacher in the same run so machine load hits every model alike.
Image classifiers are scored on images instead (tasks.image.evaluate_classifier, via eval_command).

`evaluate_models` returns one flat dict of numbers per model; the table (`eval_table`) and the
JSON are two renderings of the same dict.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.table import Table

from shdcli import distributed
from shdcli.attention import capture
from shdcli.attention.fused_logits import forward_in_row_chunks
from shdcli.attention.losses import shd_loss
from shdcli.distributed import unwrap
from shdcli.errors import ShdError, article
from shdcli.models.families import ModelShape, enable_capture, model_shape
from shdcli.models.mapping import Plan, feature_bases, make_plan
from shdcli.models.sources import count_parameters, resolve_source, run_info
from shdcli.tasks.base import HeldOut, QualityInputs
from shdcli.tasks.data import TokenBlocks, eval_batches, read_documents, same_tokens, tokenize
from shdcli.tasks.image import eval_hook, format_eval, is_image_classifier
from shdcli.tasks.registry import folder_config, load_model, task_of
from shdcli.tasks.registry import get as get_task

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# --------------------------------------------------------------------------- attention fidelity
@torch.no_grad()
def attention_fidelity(student, teacher, plan: Plan, batches: list[dict[str, torch.Tensor]],
                       device: torch.device | str, alpha: str = "lsq") -> float:
    """Mean SHD KL (tau = 1) of the student's attention to the squeezed teacher maps over the batches:
    over mapped layers, heads and valid query rows, weighted exactly as one big batch would be."""
    for model in (student, teacher):
        enable_capture(model)
    t_rec = capture.AttentionRecorder({t for _, t in plan.pairs}, keep_values=True)
    s_rec = capture.AttentionRecorder({s for s, _ in plan.pairs})
    bases = feature_bases(teacher, plan)
    total, rows = 0.0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with t_rec.active():
            teacher(**batch)
            t_records = dict(t_rec.records)
        with s_rec.active():
            student(**batch)
            s_records = dict(s_rec.records)
        mask = batch["attention_mask"].bool()
        # impl naive: whole maps of one layer at a time (no checkpointing, nothing needs a gradient).
        loss = shd_loss(t_records, s_records, plan.pairs, plan.groups, bases, mask, alpha=alpha, kind="kl",
                        tau=1.0, impl="naive").loss
        n = float(mask.sum())  # the loss is a mean over (layers x heads x) valid rows: weight by rows
        total += float(loss) * n
        rows += n
    return total / max(rows, 1.0)


def plan_from_file(path: Path, teacher: ModelShape, student: ModelShape) -> Plan:
    """The Plan a student was distilled with (student/shd_plan.json), checked against the models."""
    try:
        raw = json.loads(path.read_text())
        plan = Plan(ModelShape(**raw["teacher"]), ModelShape(**raw["student"]), [tuple(p) for p in raw["layers"]],
                    raw["groups"], raw.get("grouping", "balanced"), raw.get("representatives", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShdError(f"{path}: not a readable SHD plan ({exc}); delete it to use an inferred plan") from None
    for who, want, got in (("teacher", plan.teacher, teacher), ("student", plan.student, student)):
        if (want.layers, want.heads) != (got.layers, got.heads):
            raise ShdError(
                f"{path}: the plan is for a {who} with {want.layers} layers x {want.heads} heads, but the {who} "
                f"given has {got.layers} x {got.heads}; pass the teacher the student was distilled from (--teacher)"
            )
    return plan


# --------------------------------------------------------------------------- size and speed
def disk_bytes(folder: Path | None) -> int | None:
    """Bytes of the weight files in a model folder (what a user ships), or None without a folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


@torch.inference_mode()
def measure_speed(models: list[torch.nn.Module], input_ids: torch.Tensor, device: torch.device | str,
                  seconds: float = 2.0, min_reps: int = 3, max_reps: int = 50) -> list[dict[str, float]]:
    """Median latency (ms) and throughput (tokens/s) of one forward pass on input_ids [b, L], per model
    (causal LMs compute all b L logits in row chunks: fused_logits.forward_in_row_chunks).

    Models take turns, one pass each per round (after one warm-up pass each), until every model has
    min_reps passes and `seconds` have gone by: slow drifts in machine load then hit all models alike.
    """
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for model in models:
        model.eval()
        forward_in_row_chunks(model, batch)
    times: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    while _all_ranks_agree(len(times[0]) < min_reps or (time.perf_counter() - start < seconds
                                                        and len(times[0]) < max_reps), device):
        for i, model in enumerate(models):
            sync()
            t0 = time.perf_counter()
            forward_in_row_chunks(model, batch)  # all logits, a chunk of rows at a time (no [b, L, V] kept)
            sync()
            times[i].append(time.perf_counter() - t0)
    tokens = input_ids.numel()
    return [{"latency_ms": 1e3 * statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "reps": len(t)}
            for t in times]


def _all_ranks_agree(more: bool, device: torch.device | str) -> bool:
    """Another timing round only if every rank wants one: an FSDP student's forward is a collective, so
    ranks whose clocks disagree on the time budget must still run the same number of passes."""
    world = distributed.info().world
    return more if world == 1 else distributed.all_reduce_sum({"more": float(more)}, torch.device(device))[
        "more"] >= world


# --------------------------------------------------------------------------- one evaluation
@dataclass
class EvalOptions:
    seq_len: int = 128  # tokens per sequence (encoder / attention / latency); perplexity window
    stride: int | None = None  # perplexity window stride (default: seq_len // 2)
    # held-out tokens scored for perplexity (classifiers: held-out rows until they hold this many tokens);
    # None (shd eval): the run's data.eval_tokens, else 4096
    max_tokens: int | None = 4096
    samples: int = 64  # held-out sequences for embedding and attention metrics
    batch_size: int = 8
    speed: bool = True
    attention: bool = True  # attention fidelity (one teacher + student pass per mapped layer pair: the slow part)
    speed_batches: tuple[int, ...] = (1, 8)
    speed_seconds: float = 2.0  # per batch size, all models together
    similarity: str | None = None  # sentence-similarity TSV
    device: str = "cpu"
    out_dir: str | None = None  # where tasks write plots (a classifier's confusion_<model>.png); None: nowhere


@dataclass
class EvalModel:
    """A loaded model and what is known about where it came from."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    task: str
    folder: Path | None = None
    plan: Plan | None = None  # the student's distillation plan (None: infer one)
    plan_source: str = "inferred"
    alpha: str = "lsq"


def _shape_text(shape: ModelShape) -> str:
    kv = f" (kv {shape.kv_heads})" if shape.kv_heads != shape.heads else ""
    return f"{shape.layers}L x {shape.heads}H{kv}, width {shape.hidden}"


def evaluate_models(students: list[EvalModel], teacher: EvalModel | None, heldout: HeldOut,
                    options: EvalOptions, log: Callable[[str], None] = lambda _: None,
                    teacher_memo: dict | None = None) -> dict:
    """Every metric for every student (and the teacher), as flat dicts of numbers. See module docstring.

    teacher_memo: the teacher's held-out quality from an earlier call on the same text and options
    (filled here): `shd distill` scores its student twice (at init and at the end), the teacher once."""
    device = options.device
    task = teacher.task if teacher is not None else students[0].task
    tokenizer = teacher.tokenizer if teacher is not None else students[0].tokenizer
    notes: list[str] = []
    everyone = ([teacher] if teacher is not None else []) + students
    for m in everyone:
        m.model.eval().to(device)
        if m.task != task:
            raise ShdError(f"{m.name}: {article(m.task)} {m.task} model cannot be compared with {article(task)} {task} "
                              "model")
    limits = [model_shape(m.model.config).max_positions for m in everyone]
    max_pos = min([p for p in limits if p] or [options.seq_len])
    if options.seq_len > max_pos:
        raise ShdError(f"--seq-len: {options.seq_len} is longer than a model's {max_pos} positions")

    kind = get_task(task)
    blocks = tokenize(heldout.docs, tokenizer, options.seq_len, kind.packed)
    n = min(len(blocks), options.samples)
    batches = eval_batches(TokenBlocks(blocks.input_ids[:n], blocks.attention_mask[:n]), options.batch_size)
    entries = {id(m): _base_entry(m) for m in everyone}

    quality = QualityInputs(heldout.docs, tokenizer, options.seq_len, options.stride, options.max_tokens, batches,
                            options.similarity, options.batch_size, device, heldout.labels, heldout.pairs,
                            Path(options.out_dir) if options.out_dir else None)
    memo_key = (heldout.source, len(heldout.docs), options.seq_len, options.stride, options.max_tokens,
                options.samples, options.batch_size, options.similarity, str(device))
    for m in everyone:
        if m is teacher and teacher_memo is not None and memo_key in teacher_memo:
            entries[id(m)].update(teacher_memo[memo_key])
            continue
        log(f"quality: {m.name}")
        judge = None if m is teacher else (teacher.model if teacher is not None else None)
        entries[id(m)].update(kind.quality(m.model, m.tokenizer, judge, quality, notes, m.name))
        if m is teacher and teacher_memo is not None:
            teacher_memo[memo_key] = {k: v for k, v in entries[id(m)].items() if k not in _base_entry(m)}

    if teacher is not None and options.attention:
        t_shape = model_shape(teacher.model.config)
        for m in students:
            s_shape = model_shape(m.model.config)
            if not same_tokens(m.tokenizer, tokenizer):
                continue
            plan, source = m.plan, m.plan_source
            if plan is None:
                if s_shape.heads > t_shape.heads or s_shape.layers > t_shape.layers:
                    notes.append(f"{m.name}: more layers or heads than the teacher; no attention fidelity")
                    continue
                plan, source = make_plan(t_shape, s_shape, "auto", "balanced"), "inferred (auto layers, balanced)"
            log(f"attention fidelity: {m.name}")
            entries[id(m)]["shd_kl"] = attention_fidelity(m.model, teacher.model, plan, batches, device, m.alpha)
            entries[id(m)]["attention_plan"] = source

    if options.speed:
        pool = blocks.input_ids.flatten() if kind.packed else blocks.input_ids[blocks.attention_mask.bool()]
        for b in options.speed_batches:
            need = b * options.seq_len
            ids = pool.repeat(-(-need // max(1, pool.numel())))[:need].view(b, options.seq_len)
            log(f"speed at batch {b}")
            speeds = measure_speed([m.model for m in everyone], ids, device, options.speed_seconds)
            for m, sp in zip(everyone, speeds):
                entries[id(m)].update({f"latency_ms_b{b}": sp["latency_ms"], f"tokens_per_s_b{b}": sp["tokens_per_s"]})

    if teacher is not None:
        t = entries[id(teacher)]
        for m in students:
            e = entries[id(m)]
            e["params_ratio"] = e["params"] / t["params"]
            if e.get("disk_bytes") and t.get("disk_bytes"):
                e["disk_ratio"] = e["disk_bytes"] / t["disk_bytes"]
            for b in options.speed_batches:
                if f"latency_ms_b{b}" in e:
                    e[f"speedup_b{b}"] = t[f"latency_ms_b{b}"] / e[f"latency_ms_b{b}"]
    return {
        "task": task,
        "device": str(device),
        "data": {"source": heldout.source, "documents": len(heldout.docs), "sequences": n, "seq_len": options.seq_len},
        "options": asdict(options),
        "teacher": entries[id(teacher)] if teacher is not None else None,
        "students": [entries[id(m)] for m in students],
        "notes": notes,
    }


def _base_entry(m: EvalModel) -> dict:
    shape = model_shape(m.model.config)
    return {
        "name": m.name, "path": str(m.folder) if m.folder else None, "task": m.task, "shape": _shape_text(shape),
        "layers": shape.layers, "heads": shape.heads, "kv_heads": shape.kv_heads, "hidden": shape.hidden,
        "params": count_parameters(m.model), "disk_bytes": disk_bytes(m.folder),
    }


# --------------------------------------------------------------------------- CLI: loading
def heldout_from_recipe(recipe: dict, task: str, config) -> HeldOut:
    """The validation split of a run's recipe, as its task splits it: the documents its student never
    trained on (config: the model's, for a classifier's label ids)."""
    return get_task(task).heldout(recipe["data"], recipe.get("train", {}).get("seed", 0), config)


def same_source(data: str, run_path: str | None) -> bool:
    """Whether `shd eval --data` names the data the run trained on (the same builtin, or the same file however
    the path is spelt): the run's held-out split is scored then, never the rows the student trained on."""
    if run_path is None:
        return False
    if data == run_path:
        return True
    return Path(data).exists() and Path(run_path).exists() and Path(data).resolve() == Path(run_path).resolve()


def _load(spec: str, field_name: str, task: str | None = None) -> EvalModel:
    folder = resolve_source(spec, field_name)
    model, tokenizer, task = load_model(folder, field_name, task=task)
    if tokenizer is None:
        raise ShdError(f"{field_name}: {folder} has no tokenizer files; add tokenizer.json (or vocab files) to it")
    return EvalModel(spec, model, tokenizer, task, folder)


def run_defaults(options: EvalOptions, run_data: dict) -> EvalOptions:
    """Fill the options left None with what the run's final evaluation used (final_evaluation), else the
    stand-alone defaults (128 tokens, batch 8, 64 samples, 4096 tokens)."""
    batch = options.batch_size or run_data.get("batch_size", 8)
    samples = options.samples or (run_data["batch_size"] * run_data.get("val_batches", 8) if run_data.get("batch_size")
                                  else 64)
    return replace(options, seq_len=options.seq_len or run_data.get("seq_len", 128), batch_size=batch,
                   samples=samples, max_tokens=options.max_tokens or run_data.get("eval_tokens", 4096))


def _check_options(options: EvalOptions) -> None:
    for name, value, low in (("--seq-len", options.seq_len, 2), ("--batch-size", options.batch_size, 1),
                             ("--samples", options.samples, 1), ("--max-tokens", options.max_tokens, 2)):
        if value is not None and value < low:
            raise ShdError(f"{name}: {value} is too small; give at least {low}")
    if options.stride is not None and options.seq_len is not None and not 1 <= options.stride < options.seq_len:
        raise ShdError(f"--stride: {options.stride} must be between 1 and --seq-len - 1 ({options.seq_len - 1}): "
                       "windows must overlap so every token is scored with some context")


def run_eval(names: list[str], teacher_spec: str | None, data: str | None, options: EvalOptions,
             log: Callable[[str], None] = lambda _: None) -> dict:
    """`shd eval`: load the students (and teacher), pick held-out text, evaluate; returns the JSON dict.
    Options left None take the run's own values (data.seq_len, data.batch_size, batch_size x val_batches
    samples, data.eval_tokens), so `shd eval STUDENT` scores the rows the run's final evaluation scored,
    grouped the same way: one number for one student."""
    _check_options(options)
    notes = []
    students, infos = [], []
    for name in names:
        m = _load(name, "STUDENT")
        info = run_info(m.folder)
        m.alpha = info.recipe.get("distill", {}).get("alpha", "lsq")
        students.append(m)
        infos.append(info)
    teacher = None
    first = infos[0]
    if teacher_spec is None and first.recipe.get("teacher", {}).get("path"):
        teacher_spec = first.recipe["teacher"]["path"]
        notes.append(f"teacher {teacher_spec} taken from {first.metrics_file}")
    if teacher_spec is not None:
        log(f"loading teacher {teacher_spec}")
        teacher = _load(teacher_spec, "--teacher")
        t_shape = model_shape(teacher.model.config)
        for m, info in zip(students, infos):
            if info.plan_file is not None:
                m.plan = plan_from_file(info.plan_file, t_shape, model_shape(m.model.config))
                m.plan_source = str(info.plan_file)
    run_data = first.recipe.get("data", {})
    kind, config = get_task(students[0].task), students[0].model.config
    options = run_defaults(options, run_data)
    _check_options(options)
    if options.out_dir is None:  # plots (a classifier's confusion matrices) go next to the student
        base = Path.cwd() / students[0].folder.name if names[0].startswith("pkg://") else students[0].folder
        options = replace(options, out_dir=str(base.parent / f"{base.name}_eval"))
    if data is not None and not same_source(data, run_data.get("path")):
        heldout = kind.heldout({"path": data}, 0, config, whole=True, field="--data")
    elif run_data.get("path"):  # the run's own data (--data naming it too): only the rows it held out
        heldout = heldout_from_recipe(first.recipe, students[0].task, config)
    else:
        heldout = HeldOut(read_documents("builtin:sentences"), "builtin:sentences")
    if any(str(n).endswith(".gguf") for n in [*names, teacher_spec or ""]):
        notes.append("a .gguf model's size on disk is that of the float32 folder it was converted to (and run as)")
    result = evaluate_models(students, teacher, heldout, options, log)
    result["notes"] = notes + result["notes"]
    return result


# --------------------------------------------------------------------------- image classifiers
def eval_command(names: list[str], teacher: str | None, data: str | None, out: Path | None,
                 batch_size: int = 64, split: str = "val") -> dict | None:
    """`shd eval` for an image classifier; None when names[0] is not one (the text evaluation runs).

    Defaults come from the student's run (metrics.json next to its folder, as for text): data = the
    run's data.path and its held-out split (val_fraction), teacher = the run's teacher. eval.json and
    the confusion PNGs go to the folder of --out, else to <student>_eval next to the student folder.
    """
    folder = resolve_source(names[0], "STUDENT")
    own = folder_config(folder, "STUDENT")  # a folder its task reads itself (a diffusers DiT): that task scores it
    if own is not None:
        if len(names) > 1:
            raise ShdError("--compare: models of this kind are evaluated one at a time; run shd eval once per model")
        return get_task(task_of(own, "STUDENT")).evaluate_folder(folder, teacher, data, out.parent if out else None)
    if not is_image_classifier(folder):
        return None
    if len(names) > 1:
        raise ShdError("--compare: image classifiers are evaluated one at a time; run shd eval once per model")
    info = run_info(folder)
    run_data = info.recipe.get("data", {})
    notes = []
    if data is None and run_data.get("path"):
        data = run_data["path"]
        notes.append(f"data {data} (its held-out split) taken from {info.metrics_file}")
    if teacher is None and info.recipe.get("teacher", {}).get("path"):
        teacher = info.recipe["teacher"]["path"]
        notes.append(f"teacher {teacher} taken from {info.metrics_file}")
    same_data = data is not None and data == run_data.get("path")
    if out is not None:
        out_dir = Path(out).parent
    else:  # next to the student (a pkg:// folder lives in site-packages: use the working folder there)
        base = Path.cwd() / folder.name if names[0].startswith("pkg://") else folder
        out_dir = base.parent / f"{base.name}_eval"
    results = eval_hook(str(folder), data, out_dir, teacher_path=teacher, batch_size=batch_size, split=split,
                        val_fraction=run_data.get("val_fraction", 0.1) if same_data else 0.1,
                        image_field=run_data.get("image_field", "image") if same_data else "image",
                        label_field=run_data.get("label_field", "label") if same_data else "label")
    results["notes"] = notes
    return results


def format_folder_eval(result: dict) -> str:
    """The lines `shd eval` prints for a model scored by eval_command: its task's summary, else a classifier's."""
    return result["summary"] if "summary" in result else format_eval(result)


# --------------------------------------------------------------------------- rendering
def _num(fmt: str) -> Callable[[object], str]:
    return lambda v: format(v, fmt)


def _ratio(v) -> str:
    return f"{v:.3f}x"


def _mb(v) -> str:
    return f"{v / 1e6:.1f} MB"


# (key, label, formatter): the table shows exactly these keys of the JSON entries, formatted.
ROWS: list[tuple[str, str, Callable[[object], str]]] = [
    ("shape", "shape", str),
    ("params", "parameters", _num(",")),
    ("params_ratio", "parameters vs teacher", _ratio),
    ("disk_bytes", "weights on disk", _mb),
    ("disk_ratio", "disk vs teacher", _ratio),
    ("perplexity", "perplexity (sliding window)", _num(".3f")),
    ("ppl_tokens", "perplexity tokens", _num(",")),
    ("embedding_cosine", "embedding cosine to teacher", _num(".4f")),
    ("similarity_pearson", "similarity Pearson vs teacher", _num(".4f")),
    ("similarity_spearman", "similarity Spearman vs teacher", _num(".4f")),
    ("sts_spearman", "sentence-similarity Spearman", _num(".4f")),
    ("accuracy", "accuracy, held-out", _num(".4f")),
    ("macro_f1", "macro-F1, held-out", _num(".4f")),
    ("agreement", "agreement with the teacher", _num(".4f")),
    ("ece", "calibration error (ECE, 15 bins)", _num(".4f")),
    ("eval_rows", "held-out rows scored", _num(",")),
    ("confusion_png", "confusion matrix", str),
    ("shd_kl", "attention KL to teacher (SHD)", _num(".4f")),
    ("latency_ms_b1", "latency batch 1 (ms)", _num(".1f")),
    ("tokens_per_s_b1", "tokens/s batch 1", _num(",.0f")),
    ("speedup_b1", "speed-up batch 1", _ratio),
    ("latency_ms_b8", "latency batch 8 (ms)", _num(".1f")),
    ("tokens_per_s_b8", "tokens/s batch 8", _num(",.0f")),
    ("speedup_b8", "speed-up batch 8", _ratio),
]


def table_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """Column headers and rows (label, one cell per model) of the eval table, from the JSON dict."""
    entries = ([result["teacher"]] if result["teacher"] else []) + result["students"]
    headers = ["metric"] + [("teacher: " if e is result["teacher"] else "") + e["name"] for e in entries]
    rows = []
    for key, label, fmt in ROWS:
        if all(e.get(key) is None for e in entries):
            continue
        rows.append([label] + [fmt(e[key]) if e.get(key) is not None else "-" for e in entries])
    return headers, rows


def eval_table(result: dict) -> Table:
    headers, rows = table_cells(result)
    data = result["data"]
    table = Table(
        title=f"shd eval ({result['task']}, {result['device']}): {data['sequences']} sequences of {data['seq_len']} "
        f"tokens from {data['source']}",
        title_justify="left",
    )
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


# --------------------------------------------------------------------------- `shd distill`'s final evaluation
def final_evaluation(setup, student_dir: Path | None, speed: bool = True) -> dict[str, float]:
    """`shd eval student_dir --teacher <recipe teacher>` on the run's validation split, flattened:
    the student's numbers under their own names, the teacher's with a `teacher_` prefix; with
    data.ood_eval, the same quality metrics on that corpus under `ood_` (and `teacher_ood_`)."""
    recipe = setup.recipe
    try:
        heldout = heldout_from_recipe(recipe.resolved(), setup.task, setup.teacher.config)
    except ShdError:  # parquet / datasets folders / streamed text: decode the run's own validation blocks
        docs = [setup.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                for batch in setup.val_batches for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        heldout = HeldOut(docs, f"validation split of {recipe.data.path} (decoded validation blocks)")
    teacher = EvalModel("teacher", setup.teacher, setup.tokenizer, setup.task,
                        resolve_source(recipe.teacher.path, "teacher.path"))
    student = EvalModel("student", unwrap(setup.student), setup.tokenizer, setup.task, student_dir, setup.plan,
                        "distillation plan", recipe.distill.alpha)
    options = EvalOptions(seq_len=recipe.data.seq_len, samples=recipe.data.batch_size * recipe.data.val_batches,
                          max_tokens=recipe.data.eval_tokens, batch_size=recipe.data.batch_size, speed=speed,
                          speed_seconds=1.0, device=str(setup.device),
                          out_dir=str(student_dir.parent) if student_dir is not None else None)
    was_training = setup.student.training
    try:
        out = _flat(evaluate_models([student], teacher, heldout, options, teacher_memo=setup.teacher_eval_memo))
        ood = optional_ood(recipe.data.ood_eval)  # None: not on this machine (the report says why)
        if ood is not None:
            result = evaluate_models([student], teacher, ood, replace(options, speed=False, attention=False),
                                     teacher_memo=setup.teacher_eval_memo)
            out.update({_ood_key(k): v for k, v in _flat(result).items() if _is_quality(k)})
    finally:
        setup.student.train(was_training)
    return out


OOD_DOCUMENTS = 400  # documents of data.ood_eval scored (spread evenly over the corpus)


def ood_heldout(path: str) -> HeldOut:
    """An out-of-domain corpus for evaluation only: OOD_DOCUMENTS documents spread over it."""
    docs = read_documents(path, field="data.ood_eval")
    step = max(1, len(docs) // OOD_DOCUMENTS)
    return HeldOut(docs[::step][:OOD_DOCUMENTS], f"{path} (every {step}th document, never trained on)")


def optional_ood(path: str | None) -> HeldOut | None:
    """data.ood_eval's corpus, or None when it is not set or cannot be read here (an optional corpus, e.g.
    builtin:fortunes without Debian's package, must not stop a run: the plan warns, the report says why)."""
    return None if not path or ood_unavailable(path) else ood_heldout(path)


def ood_unavailable(path: str | None) -> str | None:
    """Why data.ood_eval cannot be scored on this machine (the reader's one-line error), or None."""
    if not path:
        return None
    try:
        ood_heldout(path)
    except ShdError as exc:
        return str(exc)
    return None


def _is_quality(key: str) -> bool:
    base = key.removeprefix("teacher_")
    return base in ("perplexity", "nll", "ppl_tokens", "shd_kl") or base.startswith(("embedding_", "similarity_"))


def _ood_key(key: str) -> str:
    return f"teacher_ood_{key.removeprefix('teacher_')}" if key.startswith("teacher_") else f"ood_{key}"


def _flat(result: dict) -> dict[str, float]:
    def numbers(entry: dict) -> dict:
        skip = ("layers", "heads", "kv_heads", "hidden")  # already in the plan
        return {k: v for k, v in entry.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}

    return {**numbers(result["students"][0]), **{f"teacher_{k}": v for k, v in numbers(result["teacher"]).items()}}
