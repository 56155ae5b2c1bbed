"""`shd inspect-heads` PNGs (matplotlib, the `plot` extra): head similarity grid, squeeze weights, maps."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from shdcli.errors import ShdError
from shdcli.heads.measure import LN2, HeadsReport


# --------------------------------------------------------------------------- plots (matplotlib: the `plot` extra)
def _save(fig, path: Path) -> Path:
    """Save through a temporary name so a crash never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _head_ticks(ax, heads: int) -> None:
    step = 1 if heads <= 9 else 2 if heads <= 24 else 4
    ticks = list(range(0, heads, step))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)


def plot_similarity_grid(report: HeadsReport, path: Path) -> Path:
    """heads.png: one head x head JS heatmap per layer, shared colour scale, target groups outlined."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = report.layers
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.2 * cols + 1.2, 2.2 * rows + 0.6), layout="constrained")
    vmax = max(max(max(r) for r in s.js) for s in report.layer_stats) or LN2
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    image = None
    for ax, s in zip(axes, report.layer_stats):
        image = ax.imshow(torch.tensor(s.js).numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        for g in s.groups:  # the target-K groups as boxes on the diagonal
            lo, k = g.heads[0], len(g.heads)
            if k > 1 and g.heads == list(range(lo, lo + k)):
                ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), k, k, fill=False, edgecolor="white", linewidth=1.2))
        ax.set_title(f"layer {s.layer}  red. {s.redundancy:.2f}", fontsize=9)
        _head_ticks(ax, report.heads)
    fig.colorbar(image, ax=axes, shrink=0.9, label="Jensen-Shannon divergence (nats)\n0 = identical maps")
    fig.suptitle(
        f"{report.model}: head-by-head attention divergence per layer ({report.samples} samples); "
        f"white boxes: groups for {report.target_heads} heads",
        fontsize=10,
    )
    return _save(fig, path)


def plot_alphas(report: HeadsReport, path: Path) -> Path:
    """alphas.png: distribution over samples of each layer's squeeze weight alpha (paper's Figure 3).

    alpha is the lsq weight of a group's first head (for a pair: A~ = alpha A_p + (1 - alpha) A_q);
    one violin per (layer, group) would be too many, so the groups of a layer are pooled.
    """
    from matplotlib.figure import Figure

    data, positions, sizes = [], [], set()
    for s in report.layer_stats:
        pooled = [a for g in s.groups if len(g.heads) > 1 for a in g.alpha]
        sizes |= {len(g.heads) for g in s.groups if len(g.heads) > 1}
        if pooled:
            data.append(pooled)
            positions.append(s.layer)
    fig = Figure(figsize=(max(6.5, 0.32 * report.layers + 2.5), 3.8), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if data:
        parts = ax.violinplot(data, positions=positions, widths=0.8, showmeans=True, showextrema=True)
        for body in parts["bodies"]:
            body.set_alpha(0.55)
        for k in sorted(sizes):
            ax.axhline(1.0 / k, color="grey", linestyle="--", linewidth=0.8)
            ax.text(1.005, 1.0 / k, f"1/{k}", fontsize=8, color="grey", va="center",
                    transform=ax.get_yaxis_transform())
    else:
        ax.text(0.5, 0.5, f"no group to squeeze: {report.target_heads} heads = the model's {report.heads}",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.7, report.layers - 0.3)
    ax.set_ylim(-0.03, 1.03)
    step = 1 if report.layers <= 16 else 2
    ax.set_xticks(list(range(0, report.layers, step)))
    ax.set_xlabel("layer")
    ax.set_ylabel("alpha (weight of the group's first head)")
    ax.set_title(
        f"{report.model}: squeeze weights per layer, {report.heads} -> {report.target_heads} heads "
        f"(lsq, {report.samples} samples, groups pooled)",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_attention_maps(report: HeadsReport, layer: int, path: Path, max_heads: int = 12) -> Path:
    """attention_layerL.png: the chosen sample's attention maps of a layer's heads side by side (Figure 1)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    if report.sample_maps is None:
        raise ShdError("internal: the report holds no sample attention maps")
    maps = report.sample_maps[layer]  # [H, n, n]
    heads = min(report.heads, max_heads)
    n = maps.shape[-1]
    rows = math.ceil(heads / 6)
    cols = math.ceil(heads / rows)
    size = 2.4 if n <= 24 else 3.0
    fig = Figure(figsize=(size * cols + 1.0, size * rows + 0.8), layout="constrained")
    group_of = {h: j for j, g in enumerate(report.layer_stats[layer].groups) for h in g.heads}
    labels = report.sample_tokens if len(report.sample_tokens) == n and n <= 40 else None
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(heads)]
    # Log scale: an attention sink (a first token taking most of the mass) would flatten a linear one.
    # Masked keys (weight exactly 0, e.g. the future under a causal mask) in grey.
    cmap = colormaps["magma"].with_extremes(bad="#c8c8c8")
    floor = 1e-3
    image = None
    for h, ax in enumerate(axes):
        shown = maps[h].clamp_min(floor).masked_fill(maps[h] <= 0, float("nan"))
        image = ax.imshow(shown.numpy(), cmap=cmap, norm=LogNorm(vmin=floor, vmax=1.0), interpolation="nearest")
        ax.set_title(f"head {h} (group {group_of.get(h, '-')})", fontsize=9)
        if labels is not None and h % cols == 0:
            ax.set_yticks(range(n), labels, fontsize=6)
        else:
            ax.set_yticks([])
        if labels is not None and h >= heads - cols:
            ax.set_xticks(range(n), labels, fontsize=6, rotation=90)
        else:
            ax.set_xticks([])
    fig.colorbar(image, ax=axes, shrink=0.9, label=f"attention weight (log scale, below {floor:g} shown as {floor:g})")
    more = f", first {heads} of {report.heads} heads" if heads < report.heads else ""
    fig.suptitle(
        f"{report.model}: layer {layer} attention maps, sample {report.sample_index} ({n} tokens{more}); "
        f"rows: queries, columns: keys" + ("; grey: masked" if bool((maps[:heads] <= 0).any()) else ""),
        fontsize=10,
    )
    return _save(fig, path)
