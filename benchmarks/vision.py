"""Vision benchmark (issue 8): no-KD vs logit KD vs logit KD + SHD, ViT 12 heads -> 4 heads on digits.

Runs recipes/vit_digits.yaml three ways and with three seeds each, in this process, and prints the
held-out top-1 accuracy per seed and as mean with a 95% confidence interval (Student t, n - 1 dof).
The teacher is trained first if its folder is missing (shd make-demo-teacher vit-digits).

    python benchmarks/vision.py [--steps 300] [--seeds 0 1 2] [--out runs/bench_vision]
    # or one variant per process (each single-threaded), then the table over all finished variants:
    python benchmarks/vision.py --variant kd_shd ... ; python benchmarks/vision.py --summarise
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from shdcli.demo import make_teacher  # noqa: E402
from shdcli.recipe import load_recipe  # noqa: E402
from shdcli.report import markdown_table, write_json_atomic  # noqa: E402
from shdcli.train import run_distillation  # noqa: E402

VARIANTS = {
    "no KD (labels only)": ["distill.logit=0", "distill.shd=0"],
    "logit KD": ["distill.logit=1", "distill.shd=0"],
    "logit KD + SHD": ["distill.logit=1", "distill.shd=1"],
}
SLUG = {"no KD (labels only)": "nokd", "logit KD": "kd", "logit KD + SHD": "kd_shd"}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student t interval (n - 1 degrees of freedom)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "vit_digits.yaml"))
    parser.add_argument("--teacher", default="runs/vit_digits_teacher")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_vision")
    parser.add_argument("--variant", choices=list(SLUG.values()), nargs="*", default=list(SLUG.values()))
    parser.add_argument("--summarise", action="store_true", help="only print the table of finished variants")
    args = parser.parse_args()
    out = Path(args.out)
    if not (Path(args.teacher) / "config.json").exists():
        print(f"training the teacher into {args.teacher}")
        make_teacher(args.teacher)
    teacher_info = json.loads((Path(args.teacher) / "shd_teacher.json").read_text())
    quiet = Console(quiet=True)
    for name, overrides in VARIANTS.items():
        if args.summarise or SLUG[name] not in args.variant:
            continue
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            recipe = load_recipe(args.recipe, [*overrides, f"teacher.path={args.teacher}", f"train.seed={seed}",
                                               f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                                               f"output_dir={out / SLUG[name]}_{seed}"])
            metrics = run_distillation(recipe, quiet)
            final = metrics["final_eval"]
            row = {"seed": seed, "top1": final["student_top1"], "top5": final["student_top5"],
                   "teacher_top1": final["teacher_top1"], "student_params": metrics["sizes"]["student_params"],
                   "teacher_params": metrics["sizes"]["teacher_params"], "wall_s": time.perf_counter() - t0}
            runs.append(row)
            print(f"{name:22s} seed {seed}: top-1 {row['top1']:.4f}  ({row['wall_s']:.0f} s)", flush=True)
        write_json_atomic(out / f"results_{SLUG[name]}.json", {"teacher": teacher_info, "steps": args.steps,
                                                             "variant": name, "runs": runs})
    results = {}
    for name in VARIANTS:
        file = out / f"results_{SLUG[name]}.json"
        if file.exists():
            data = json.loads(file.read_text())
            results[name], steps = data["runs"], data["steps"]
    if not results:
        return
    first = next(iter(results.values()))[0]
    rows = []
    for name, runs in results.items():
        mean, half = mean_ci([r["top1"] for r in runs])
        rows.append([name, " / ".join(f"{r['top1']:.4f}" for r in runs), f"{mean:.4f} ± {half:.4f}"])
    print(f"\nteacher: {first['teacher_params']:,} params, held-out top-1 {first['teacher_top1']:.4f} "
          f"({teacher_info['val_images']} images); student: {first['student_params']:,} params; "
          f"{steps} steps; seeds {[r['seed'] for r in first_runs(results)]}\n")
    print(markdown_table(["variant", "top-1 per seed", "mean ± 95% CI"], rows))


def first_runs(results: dict[str, list[dict]]) -> list[dict]:
    return next(iter(results.values()))


if __name__ == "__main__":
    main()
