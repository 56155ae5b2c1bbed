"""`shd compare RUN_DIR...`: finished runs side by side, from each run's metrics.json.

One table (the recipe keys that differ, the final evaluation, size and speed) and one overlay plot of
the validation curves. Runs of different teachers are refused: their numbers do not share a scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from shdcli.errors import ShdError
from shdcli.plots import plot_validation_overlay
from shdcli.recipe import flat_keys


@dataclass
class Comparison:
    names: list[str]
    recipe_rows: list[list[Any]] = field(default_factory=list)  # [key, value per run]
    metric_rows: list[list[Any]] = field(default_factory=list)  # [metric, teacher, value per run]
    size_rows: list[list[Any]] = field(default_factory=list)  # [what, value per run]
    runs: list[tuple[str, dict]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"runs": self.names, "recipe": self.recipe_rows, "final_eval": self.metric_rows,
                "size_speed": self.size_rows}


def load_run(folder: Path) -> dict:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise ShdError(f"RUN_DIR: {folder} has no metrics.json; give output folders of finished `shd distill` runs")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShdError(f"RUN_DIR: {path} is not valid JSON; was the run's output folder edited?") from None


def run_names(folders: list[Path]) -> list[str]:
    """Folder names, or whole paths where two runs share a name."""
    names = [Path(f).name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def compare_runs(folders: list[Path]) -> Comparison:
    if len(folders) < 2:
        raise ShdError("RUN_DIR: give at least two run folders to compare")
    metrics = [load_run(f) for f in folders]
    teachers = [m["recipe"]["teacher"]["path"] for m in metrics]
    for folder, teacher in zip(folders[1:], teachers[1:]):
        if teacher != teachers[0]:
            raise ShdError(f"RUN_DIR: {folders[0]} and {folder} distil different teachers ({teachers[0]} vs "
                           f"{teacher}); compare runs of one teacher")
    names = run_names(folders)
    result = Comparison(names, runs=list(zip(names, metrics)))
    recipes = [flat_keys(m["recipe"]) for m in metrics]
    for key in dict.fromkeys(k for r in recipes for k in r):
        values = [r.get(key) for r in recipes]  # a key a run lacks (an older shd): null
        if key != "output_dir" and any(json.dumps(v) != json.dumps(values[0]) for v in values):
            result.recipe_rows.append([key, *values])
    finals = [m.get("final_eval") or {} for m in metrics]
    for key in dict.fromkeys(k for f in finals for k in f if not k.startswith("teacher_") and k != "step"):
        teacher = next((f[f"teacher_{key}"] for f in finals if f"teacher_{key}" in f), "")
        result.metric_rows.append([key, teacher, *[f.get(key, "-") for f in finals]])
    result.size_rows = [
        ["student parameters", *[m["sizes"]["student_params"] for m in metrics]],
        ["parameters x teacher", *[m["sizes"]["student_params"] / m["sizes"]["teacher_params"] for m in metrics]],
        ["steps", *[m["steps_done"] for m in metrics]],
        ["training s", *[m["timings"]["train_s"] for m in metrics]],
        ["training tokens/s", *[m["timings"]["tokens_per_s"] for m in metrics]],
        ["device", *[m.get("device", "-") for m in metrics]],
    ]
    return result


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return value if isinstance(value, str) else json.dumps(value)


def comparison_table(result: Comparison) -> Table:
    table = Table(title="shd compare", expand=False)
    table.add_column("")
    table.add_column("teacher", justify="right")
    for name in result.names:
        table.add_column(name, justify="right")
    sections = [("recipe (keys that differ)", [[k, "", *v] for k, *v in result.recipe_rows]),
                ("final evaluation", result.metric_rows),
                ("size and speed", [[k, "", *v] for k, *v in result.size_rows])]
    for i, (title, rows) in enumerate(sections):
        if i:
            table.add_section()
        table.add_row(f"[bold]{title}[/bold]")
        for row in rows:
            table.add_row(*[_cell(v) for v in row])
    if not result.recipe_rows:
        table.caption = "the runs' recipes differ only in output_dir"
    return table


def write_overlay(result: Comparison, path: Path) -> str | None:
    """The validation curves of every run in one PNG; None when written, else why not."""
    return plot_validation_overlay(result.runs, path)
