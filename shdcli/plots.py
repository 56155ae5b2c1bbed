"""Pictures of a run for report.md (output_dir/plots/*.png) and of several runs for `shd compare`.

matplotlib is the `plot` extra: without it nothing is drawn and the caller gets a note saying how to
get the pictures. Everything is drawn from metrics.json's content, so a finished run can be re-plotted.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shdcli.callbacks import LAYER_KL
from shdcli.report import make_readable

PLOTS = "plots"
NO_MATPLOTLIB = "pip install 'shd[plot]' (matplotlib) and run again to get the plots"


@dataclass
class Figures:
    """Written pictures as (caption, path relative to the run folder), or a note saying why there are none."""

    files: list[tuple[str, str]] = field(default_factory=list)
    note: str | None = None


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when the plot extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)  # no display needed (CI, ssh, containers)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomically, like every other output: a reader sees the old picture or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        make_readable(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def loss_parts(metrics: dict) -> list[str]:
    """The loss parts a run logged both in training and in validation (task, logit, shd, total, ...)."""
    history, validation = metrics.get("history") or [], metrics.get("validation") or []
    val_keys = {k for v in validation for k in v}
    train_keys = list(dict.fromkeys(k for h in history for k in h))
    return [k for k in train_keys if f"val_{k}" in val_keys]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _grid(plt, n: int, cols: int = 3, size: tuple[float, float] = (4.2, 3.0)):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _log_if_positive(ax, values: list[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def plot_losses(plt, metrics: dict, path: Path) -> bool:
    """One panel per loss part (training every step, validation dots) and one per other validation
    number (perplexity, ...)."""
    history, validation = metrics.get("history") or [], metrics.get("validation") or []
    parts = loss_parts(metrics)
    others = list(dict.fromkeys(k for v in validation for k in v
                                if k.startswith("val_") and k.removeprefix("val_") not in parts))
    if not parts and not others:
        return False
    fig, axes = _grid(plt, len(parts) + len(others))
    for ax, key in zip(axes, parts + others):
        if key in parts:
            xs, ys = _series(history, key)
            ax.plot(xs, ys, lw=0.9, alpha=0.8, label="training")
            vx, vy = _series(validation, f"val_{key}")
            ax.plot(vx, vy, "o-", ms=4, lw=1.4, label="validation")
            ax.set_title(f"loss: {key}")
            _log_if_positive(ax, ys + vy)
            ax.legend(fontsize=8)
        else:
            vx, vy = _series(validation, key)
            ax.plot(vx, vy, "o-", ms=4, lw=1.4, color="C1")
            ax.set_title(f"validation: {key.removeprefix('val_')}")
            _log_if_positive(ax, vy)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Training and validation losses")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_grad_norms(plt, metrics: dict, path: Path) -> bool:
    """The clipped-over total gradient norm every step, and each loss part's own norm where measured
    (train.grad_norms_every)."""
    history = metrics.get("history") or []
    keys = list(dict.fromkeys(k for h in history for k in h if k == "grad_norm" or k.startswith("grad_norm_")))
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    values: list[float] = []
    for key in keys:
        xs, ys = _series(history, key)
        values += ys
        label = "total (before clipping)" if key == "grad_norm" else key.removeprefix("grad_norm_")
        ax.plot(xs, ys, "-" if key == "grad_norm" else "o-", lw=0.9 if key == "grad_norm" else 1.3, ms=3,
                label=label)
    clip = (metrics.get("recipe") or {}).get("train", {}).get("grad_clip")
    if clip:
        ax.axhline(clip, color="grey", ls="--", lw=0.8, label=f"grad_clip {clip:g}")
    _log_if_positive(ax, values)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient norms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_squeeze_weights(plt, metrics: dict, path: Path) -> bool:
    """Per student layer, the mean squeeze weight (+- std over samples) of each teacher head in each group:
    how much of each teacher head the student head's target keeps (the paper's Fig. 3)."""
    alphas, plan = metrics.get("alphas") or {}, metrics.get("plan") or {}
    if not alphas:
        return False
    layers = sorted(alphas, key=int)
    pairs = {str(s): t for s, t in plan.get("layers", [])}
    groups_of = {str(s): g for (s, _), g in zip(plan.get("layers", []), plan.get("groups", []))}
    fig, axes = _grid(plt, len(layers), cols=2, size=(6.0, 2.8))
    for ax, layer in zip(axes, layers):
        x, ticks, labels = 0.0, [], []
        groups = groups_of.get(layer) or []
        for j, group in enumerate(alphas[layer]):
            heads = groups[j] if j < len(groups) else range(len(group["mean"]))
            for h, mean, std in zip(heads, group["mean"], group["std"]):
                ax.bar(x, mean, yerr=std, color=f"C{j % 10}", capsize=2, width=0.8)
                ticks.append(x)
                labels.append(str(h))
                x += 1
            x += 0.6  # a gap between groups
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        teacher = pairs.get(layer)
        ax.set_title(f"student layer {layer}" + (f" <- teacher layer {teacher}" if teacher is not None else ""),
                     fontsize=9)
        ax.set_xlabel("teacher head (colour: student head's group)", fontsize=8)
        ax.set_ylabel("squeeze weight", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Squeeze weights per layer: mean +- std over training samples")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_attention_fidelity(plt, metrics: dict, path: Path) -> bool:
    """Per student layer, the KL of its maps to their squeezed targets at every validation (one line each,
    dark to light as training goes): which layers the student has learned to attend like the teacher."""
    seen = [(v["step"], v[LAYER_KL]) for v in metrics.get("validation") or [] if v.get(LAYER_KL)]
    if not seen:
        return False
    pairs = {str(s): t for s, t in (metrics.get("plan") or {}).get("layers", [])}
    layers = sorted({int(layer) for _, by_layer in seen for layer in by_layer})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 3.0), 3.6))
    colours = plt.get_cmap("viridis")
    values: list[float] = []
    for i, (step, by_layer) in enumerate(seen):
        ys = [by_layer.get(str(layer), math.nan) for layer in layers]
        values += [y for y in ys if y == y]
        ax.plot(range(len(layers)), ys, "o-", ms=3, lw=1.2, color=colours(i / max(len(seen) - 1, 1)),
                label=f"step {step}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"{layer}\nfrom {pairs.get(str(layer), '?')}" for layer in layers], fontsize=7)
    ax.set_xlabel("student layer (the teacher layer it learns from)", fontsize=8)
    ax.set_ylabel("KL(squeezed target || student)", fontsize=8)
    _log_if_positive(ax, values)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Attention fidelity per layer at each validation (lower: closer to the teacher)", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return True


QUALITY_SKIP = ("params", "disk", "latency", "tokens_per_s", "speedup", "step", "val_")  # size, speed, losses


def plot_quality(plt, metrics: dict, path: Path) -> bool:
    """The final evaluation's quality numbers, one panel each: the student at init and after training as
    bars, the teacher as a line (where the evaluation scored it)."""
    init, final = metrics.get("init_eval") or {}, metrics.get("final_eval") or {}
    keys = [k for k, v in final.items() if isinstance(v, int | float) and not k.startswith("teacher_")
            and not any(k.startswith(p) or p in k for p in QUALITY_SKIP) and isinstance(init.get(k), int | float)]
    if not keys:
        return False
    fig, axes = _grid(plt, len(keys), cols=4, size=(3.2, 2.8))
    for ax, key in zip(axes, keys):
        ax.bar(["at init", "trained"], [init[key], final[key]], color=["C7", "C0"])
        name = key.removeprefix("student_")  # image classifiers: student_top1 beside teacher_top1
        teacher = final.get(f"teacher_{name}", init.get(f"teacher_{name}"))
        if isinstance(teacher, int | float):
            ax.axhline(teacher, color="C3", ls="--", lw=1.2, label=f"teacher {teacher:.3g}")
            ax.legend(fontsize=8)
        lower = any(w in key for w in ("kl", "perplexity", "nll", "loss", "ece"))
        ax.set_title(f"{key} ({'lower' if lower else 'higher'} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Student quality: at init, trained, and the teacher")
    _save(fig, path)
    plt.close(fig)
    return True


RUN_PLOTS = [
    ("Training and validation losses", "losses.png", plot_losses),
    ("Gradient norms", "grad_norms.png", plot_grad_norms),
    ("Squeeze weights per layer", "squeeze_weights.png", plot_squeeze_weights),
    ("Attention fidelity per layer", "attention_fidelity.png", plot_attention_fidelity),
    ("Student quality at init, trained, and the teacher", "quality.png", plot_quality),
]


def write_run_plots(metrics: dict, out_dir: Path) -> Figures:
    """The run's pictures in out_dir/plots (those its numbers allow: no SHD, no squeeze-weight plot)."""
    plt = _pyplot()
    if plt is None:
        return Figures(note=NO_MATPLOTLIB)
    figures = Figures()
    for caption, name, draw in RUN_PLOTS:
        if draw(plt, metrics, Path(out_dir) / PLOTS / name):
            figures.files.append((caption, f"{PLOTS}/{name}"))
    return figures


def plot_validation_overlay(runs: list[tuple[str, dict]], path: Path) -> str | None:
    """The validation curves of several runs, one panel per validation number they share; None when
    drawn, else a note saying why not."""
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    keys = [k for k in dict.fromkeys(k for _, m in runs for v in m.get("validation") or [] for k in v
                                     if isinstance(v[k], int | float))
            if k != "step" and all(any(k in v for v in m.get("validation") or []) for _, m in runs)]
    if not keys:
        return "the runs share no validation number to plot"
    fig, axes = _grid(plt, len(keys))
    for ax, key in zip(axes, keys):
        values: list[float] = []
        for i, (name, metrics) in enumerate(runs):
            xs, ys = _series(metrics.get("validation") or [], key)
            values += ys
            ax.plot(xs, ys, "o-", ms=3, lw=1.3, color=f"C{i % 10}", label=name)
        _log_if_positive(ax, values)
        ax.set_title(key.removeprefix("val_"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Validation curves")
    _save(fig, Path(path))
    plt.close(fig)
    return None
