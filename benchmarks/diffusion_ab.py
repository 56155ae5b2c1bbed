"""Diffusion transformers (issue 30): does SHD help a DiT student? Three arms of recipes/dit_digits.yaml on the
same seeds, paired by seed:

    denoise  distill.logit=0 distill.shd=0   the denoising objective alone
    kd       distill.logit=1 distill.shd=0   + output KD (MSE to the teacher's noise prediction)
    kd_shd   distill.logit=1 distill.shd=1   + SHD on the squeezed attention maps

    python benchmarks/diffusion_ab.py --seeds 0,1,2 --set train.max_steps=600

Each run is `python -m shdcli distill recipes/dit_digits.yaml --set ...` (benchmarks/recipe_ab.collect: finished
runs are read, cut-short ones resume). Compared on the final evaluation (tasks/diffusion.py): the Frechet distance
of the student's samples to the held-out digits in the digits scorer's feature space, their class accuracy, and
the denoising MSE against the teacher and against the true noise; each as mean +- 95% interval, and the paired
differences kd - denoise, kd_shd - kd and kd_shd - denoise with their 95% interval and p (paired t).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import mean_ci, paired_t  # noqa: E402
from benchmarks.recipe_ab import collect  # noqa: E402
from shdcli.errors import ShdError  # noqa: E402
from shdcli.report import markdown_table, write_text_atomic  # noqa: E402

RECIPE = ROOT / "recipes" / "dit_digits.yaml"
ARMS: dict[str, list[str]] = {"denoise": ["distill.logit=0", "distill.shd=0"],
                              "kd": ["distill.logit=1.0", "distill.shd=0"],
                              "kd_shd": ["distill.logit=1.0", "distill.shd=1.0"]}
PAIRS = (("kd", "denoise"), ("kd_shd", "kd"), ("kd_shd", "denoise"))
# final_eval key -> label (lower is better for all but the accuracy)
METRICS = {"student_sample_fd": "Frechet distance of samples (scorer features)",
           "student_sample_accuracy": "class accuracy of samples",
           "denoise_mse_vs_teacher": "denoising MSE vs teacher",
           "student_denoise_mse": "denoising MSE vs true noise"}


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def tables(results: dict[str, list[dict]]) -> str:
    """Per metric: each arm's mean +- 95% half-width (per seed), then the paired differences."""
    rows, diffs = [], []
    for key, label in METRICS.items():
        values = {arm: [float(m["final_eval"][key]) for m in runs] for arm, runs in results.items()}
        rows.append([label, *(f"{_fmt(mean_ci(v)[0])} +- {_fmt(mean_ci(v)[1])} ({', '.join(_fmt(x) for x in v)})"
                              for v in values.values())])
        for b, a in PAIRS:
            diff, half, p = paired_t(values[b], values[a])
            diffs.append([label, f"{b} - {a}", f"{diff:+.4g} +- {_fmt(half)}", _fmt(p)])
    teacher = results["kd"][0]["final_eval"]
    step_s = {arm: mean_ci([m["timings"]["train_s"] / max(1, m["steps_done"]) for m in runs])[0]
              for arm, runs in results.items()}
    rows.append(["train s/step", *(_fmt(s) for s in step_s.values())])
    return (markdown_table(["metric (final evaluation)", *results], rows) + "\n\n"
            + markdown_table(["metric", "paired difference", "mean +- 95% CI", "p"], diffs) + "\n\n"
            + f"Teacher: samples' Frechet distance {teacher['teacher_sample_fd']:.4g}, class accuracy "
              f"{teacher['teacher_sample_accuracy']:.3f}; denoising MSE vs true noise "
              f"{teacher['teacher_denoise_mse']:.4g}; the scorer's accuracy on the held-out digits "
              f"{teacher['scorer_heldout_accuracy']:.3f}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ab_dit_digits")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every arm (e.g. fewer steps)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables (with the command) here")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        results = collect(RECIPE, {arm: args.set + o for arm, o in ARMS.items()}, seeds, args.runs.resolve())
    except (ShdError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/diffusion_ab.py", f"--seeds {args.seeds}",
                        *(f"--set {s}" for s in args.set)])
    text = f"`{command}`\n\nSeeds {args.seeds}; mean +- 95% interval (per seed).\n\n{tables(results)}\n"
    print(text)
    if args.markdown is not None:
        write_text_atomic(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
