"""`shd inspect-heads` output: the rich table and heat strip, heads.json and the PNGs (plots.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rich.table import Table
from rich.text import Text

from shdcli.errors import ShdError
from shdcli.heads.measure import HeadsReport
from shdcli.heads.plots import plot_alphas, plot_attention_maps, plot_similarity_grid
from shdcli.models.mapping import format_groups
from shdcli.report import write_json_atomic


# --------------------------------------------------------------------------- terminal
def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}±{std:.2f}"


def table_rows(report: HeadsReport) -> list[list[str]]:
    """The table's cells, formatted from the report's numbers (the JSON holds the same numbers)."""
    rows = []
    for s in report.layer_stats:
        multi = [g for g in s.groups if len(g.heads) > 1]
        rows.append([
            str(s.layer), f"{s.redundancy:.3f}",
            f"{s.error['lsq']:.3f}", f"{s.error['mean']:.3f}", f"{s.error['select']:.3f}",
            " ".join(f"{g.weight_mean[0]:.2f}" for g in multi) or "-",
            " ".join(f"{g.weight_std[0]:.2f}" for g in multi) or "-",
            str(s.suggested_heads),
        ])
        if s.contiguous_error is not None:  # calibrated groups against the contiguous ones
            cal = s.calibration
            rows[-1] += [format_groups([g.heads for g in s.groups]), f"{s.contiguous_error:.3f}",
                         f"{cal['error']:.3f} / {cal['contiguous_error']:.3f}" if cal else "-"]
    return rows


TABLE_COLUMNS = ["layer", "redundancy", "err lsq", "err mean", "err select", "alpha mean per group",
                 "alpha std per group", "min heads"]
# `--grouping calibrated` adds: the layer's groups, the contiguous groups' err lsq on the same samples,
# and the mean group error of calibrated / contiguous groups on the calibration samples (grouping.py).
CALIBRATED_COLUMNS = ["groups", "contiguous err lsq", "calib. set err: calibrated / contiguous"]


def _calibrated(report: HeadsReport) -> bool:
    return any(s.contiguous_error is not None for s in report.layer_stats)


def heads_table(report: HeadsReport) -> Table:
    groups = report.layer_stats[0].groups if report.layer_stats else []
    calibrated = _calibrated(report)
    shown = "per layer (column groups)" if calibrated else format_groups([g.heads for g in groups])
    note = ""
    if calibrated:
        where = "disjoint from" if report.calibration_heldout else "the same as"
        note = (f" Calibrated groups chosen on {report.calibration_samples} samples, {where} the "
                f"{report.samples} measured; last column: mean group error there (lsq).")
    table = Table(
        title=f"{report.model}: {report.layers} layers x {report.heads} heads (kv {report.kv_heads}), "
        f"{report.samples} samples / {report.rows} query rows of {report.data}; "
        f"squeezed to {report.target_heads} heads, {report.grouping} groups {shown}",
        title_justify="left",
        caption=f"redundancy = 1 - mean JS / ln 2 (1: heads attend alike). err: relative Frobenius error of the "
        f"squeezed layer's head output (X = {report.features}); alpha: lsq weight of each group's first head; "
        f"min heads: fewest heads with err lsq <= {report.tolerance:g} "
        f"(total {report.suggested_total} of {report.heads * report.layers}).{note}",
        caption_justify="left",
    )
    for name in TABLE_COLUMNS + (CALIBRATED_COLUMNS if calibrated else []):
        wrap = name.startswith("alpha") or name == "groups"
        table.add_column(name, justify="left" if wrap else "right", no_wrap=not wrap)
    for row in table_rows(report):
        table.add_row(*row)
    return table


_SHADES = " ░▒▓█"


def _heat_colour(value: float) -> str:
    """Blue (0) -> yellow (0.5) -> red (1), as an rgb() style."""
    v = min(1.0, max(0.0, value))
    if v < 0.5:
        t = v / 0.5
        r, g, b = int(40 + t * 215), int(70 + t * 150), int(200 - t * 160)
    else:
        t = (v - 0.5) / 0.5
        r, g, b = 255, int(220 - t * 170), int(40 - t * 20)
    return f"rgb({r},{g},{b})"


def heat_strip(report: HeadsReport) -> Text:
    """One coloured block per layer: its redundancy, relative to this model's lowest and highest."""
    values = [s.redundancy for s in report.layer_stats]
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else 1.0
    text = Text("redundancy by layer ")
    text.append(f"(0..{len(values) - 1}) ", style="dim")
    for v in values:
        rel = (v - lo) / span
        shade = _SHADES[min(len(_SHADES) - 1, 1 + int(rel * (len(_SHADES) - 2) + 0.5))]
        text.append(shade * 2, style=_heat_colour(rel))
    text.append(f"  low {lo:.3f} ", style="dim")
    text.append("██", style=_heat_colour(0.0))
    text.append(" .. ", style="dim")
    text.append("██", style=_heat_colour(1.0))
    text.append(f" high {hi:.3f}", style="dim")
    return text


# --------------------------------------------------------------------------- files
def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


PLOT_HINT = "matplotlib is not installed, so no PNGs were drawn; install it with: pip install 'shd[plot]'"


def write_outputs(
    report: HeadsReport, out: Path, plot_layers: list[int] | None = None
) -> tuple[list[Path], str | None]:
    """heads.json always; heads.png, alphas.png and attention_layerL.png when matplotlib is there.

    Returns (files written, a note for the user or None).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShdError(f"--out: {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "heads.json", report.to_dict())
    files = [out / "heads.json"]
    if not have_matplotlib():
        return files, PLOT_HINT
    layers = plot_layers if plot_layers is not None else default_plot_layers(report)
    for layer in layers:
        if not 0 <= layer < report.layers:
            raise ShdError(f"--plot-layers: {layer} is outside 0..{report.layers - 1}")
    files.append(plot_similarity_grid(report, out / "heads.png"))
    files.append(plot_alphas(report, out / "alphas.png"))
    for layer in layers:
        files.append(plot_attention_maps(report, layer, out / f"attention_layer{layer}.png"))
    return files, None


def default_plot_layers(report: HeadsReport) -> list[int]:
    """The most and the least redundant layers."""
    order = sorted(report.layer_stats, key=lambda s: s.redundancy)
    return sorted({order[-1].layer, order[0].layer})
