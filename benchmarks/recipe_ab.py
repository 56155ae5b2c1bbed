"""Does a recipe setting pay off? Run one recipe under two settings (arm A and arm B) on the same seeds
and compare the students it hands back, paired by seed. Issue 13 sets the shipped recipes' defaults
from this comparison:

    python benchmarks/recipe_ab.py recipes/minilm_12to4.yaml --a distill.shd=0 --b distill.shd=1.0
    python benchmarks/recipe_ab.py recipes/vit_digits.yaml --a distill.shd=0 --b distill.shd=1.0 --seeds 0,1,2,3,4

Each run is what a user runs: `python -m shdcli distill RECIPE --set <arm> --set train.seed=S --set
output_dir=RUNS/<a|b>_s<S>`. A finished run already in RUNS (the same resolved recipe, every step done)
is read, not run again, and a cut-short one resumes from its checkpoint, so a comparison can be
continued or split over processes (`--seeds 0` in one, `--seeds 1,2` in another, then all seeds).
Printed: each number of the final evaluation both arms have (mean, 95% interval, per seed), the paired
difference B - A with its interval and p (perplexities compared on log scale, as a ratio), and the
training seconds per step (a cost figure only when the runs did not share the machine unevenly).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import mean_ci, paired_t  # noqa: E402
from shdcli.errors import ShdError  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402
from shdcli.report import markdown_table, write_text_atomic  # noqa: E402

# final_eval key -> (label, compared on log scale). Shown when both arms' runs all have it.
METRICS: dict[str, tuple[str, bool]] = {
    "perplexity": ("perplexity, held-out", True),
    "ood_perplexity": ("perplexity, second corpus", True),
    "similarity_pearson": ("similarity Pearson, held-out", False),
    "similarity_spearman": ("similarity Spearman, held-out", False),
    "ood_similarity_pearson": ("similarity Pearson, second corpus", False),
    "student_top1": ("top-1, held-out", False),
    "accuracy": ("accuracy, held-out", False),
    "macro_f1": ("macro-F1, held-out", False),
    "agreement": ("agreement with the teacher, held-out", False),
    "ece": ("calibration error (ECE), held-out", False),
    "val_task": ("task loss, held-out", False),
    "val_logit": ("logit KD to the teacher, held-out", False),
    "shd_kl": ("attention fidelity KL", False),
}


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm}_s{seed}"


def finished_metrics(out: Path, expected: dict) -> dict | None:
    """The run's metrics.json when it holds this very recipe (where it was written aside: a run may be moved
    or linked into RUNS) with every step done, else None."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if {**metrics.get("recipe", {}), "output_dir": None} != {**expected, "output_dir": None}:
        raise ShdError(f"{out} holds a different run (its metrics.json has another recipe); give another --runs")
    return metrics if metrics.get("steps_done") == expected["train"]["max_steps"] else None


def run_arm(recipe: Path, overrides: list[str], out: Path, log: Path) -> None:
    """One `shd distill` in its own process; resumes from a checkpoint a cut-short run left."""
    resume = ["--resume"] if any((out / "checkpoints").glob("*")) else ["--overwrite"]
    command = [sys.executable, "-m", "shdcli", "distill", str(recipe), *(a for o in overrides for a in ("--set", o)),
               *resume]
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)  # cwd: where the recipe resolved
    if done.returncode != 0:
        raise ShdError(f"{' '.join(command)} exited with {done.returncode}; its output is in {log}")


def collect(recipe: Path, arms: dict[str, list[str]], seeds: list[int], runs: Path) -> dict[str, list[dict]]:
    """metrics.json of every (arm, seed), running the missing ones."""
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, settings in arms.items():
            out = run_dir(runs, arm, seed)
            overrides = [*settings, f"train.seed={seed}", f"output_dir={out}"]
            expected = load_recipe(recipe, overrides).resolved()
            metrics = finished_metrics(out, expected)
            if metrics is None:
                log = runs / f"{arm}_s{seed}.log"
                print(f"running {arm} seed {seed} -> {out}", flush=True)
                out.mkdir(parents=True, exist_ok=True)
                run_arm(recipe, overrides, out, log)
                metrics = finished_metrics(out, expected)
                if metrics is None:
                    raise ShdError(f"{out}: the run ended without finishing its steps; see {log}")
            results[arm].append(metrics)
    return results


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    """One row per metric: A and B as mean +- 95% half-width (per seed), and the paired B - A."""
    a_runs, b_runs = results["a"], results["b"]
    rows = []
    for key, (label, log_scale) in METRICS.items():
        if not all(key in m["final_eval"] for m in a_runs + b_runs):
            continue
        a = [float(m["final_eval"][key]) for m in a_runs]
        b = [float(m["final_eval"][key]) for m in b_runs]
        if log_scale:  # a ratio: mean of log(B / A), shown as a percentage
            diff, half, p = paired_t([math.log(x) for x in b], [math.log(x) for x in a])
            low, high = (100 * math.expm1(diff + sign * half) for sign in (-1, 1))
            paired = f"{100 * math.expm1(diff):+.1f}% [{low:+.1f}, {high:+.1f}]"
        else:
            diff, half, p = paired_t(b, a)
            paired = f"{diff:+.4f} +- {_fmt(half)}"
        cells = []
        for values in (a, b):
            mean, ci = mean_ci(values)
            cells.append(f"{_fmt(mean)} +- {_fmt(ci)} ({', '.join(_fmt(v) for v in values)})")
        rows.append([label, *cells, paired, _fmt(p)])
    step_s = {arm: [m["timings"]["train_s"] / max(1, m["steps_done"]) for m in runs] for arm, runs in results.items()}
    rows.append(["train s/step", *(f"{_fmt(mean_ci(v)[0])} ({', '.join(_fmt(x) for x in v)})" for v in step_s.values()),
                 f"{mean_ci([b / a for a, b in zip(step_s['a'], step_s['b'])])[0]:.2f} x", ""])
    header = ["metric (final evaluation)", "A", "B", "B - A (95% CI)", "p"]
    return f"Seeds {', '.join(map(str, seeds))}; mean +- 95% interval (per seed).\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--a", action="append", required=True, metavar="KEY=VALUE", help="arm A's --set (repeatable)")
    ap.add_argument("--b", action="append", required=True, metavar="KEY=VALUE", help="arm B's --set (repeatable)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs go (default runs/ab_<recipe name>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both arms (e.g. fewer steps)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table (with the command) here")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = (args.runs or ROOT / "runs" / f"ab_{args.recipe.stem}").resolve()
        results = collect(args.recipe, {"a": args.set + args.a, "b": args.set + args.b}, seeds, runs)
    except (ShdError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/recipe_ab.py", str(args.recipe), *(f"--a {a}" for a in args.a),
                        *(f"--b {b}" for b in args.b), *(f"--set {s}" for s in args.set), f"--seeds {args.seeds}"])
    text = (f"`{command}`\n\nA: {', '.join(args.set + args.a)}; B: {', '.join(args.set + args.b)}.\n"
            f"{table(results, seeds)}\n")
    print(text)
    if args.markdown is not None:
        write_text_atomic(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
