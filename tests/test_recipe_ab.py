"""benchmarks/recipe_ab.py: a recipe run under two settings on the same seeds, as `shd distill` runs it,
compared by seed; finished runs are read, not run again, and a folder holding another run is refused."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import recipe_ab  # noqa: E402


def _recipe(tmp_path: Path, teacher: Path, text: Path) -> Path:
    recipe = {
        "teacher": str(teacher),
        "student": {"from_teacher": {"heads": 2, "layers": 2}},
        "data": {"path": str(text), "seq_len": 32, "batch_size": 4, "val_batches": 1,
                 "ood_eval": "builtin:sentences", "eval_tokens": 256},
        "train": {"max_steps": 2, "eval_every": 2, "warmup_steps": 0, "device": "cpu", "threads": 1},
    }
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_two_arms_paired_by_seed_and_finished_runs_are_reused(tiny_models, tiny_text, tmp_path, capsys):
    recipe, runs = _recipe(tmp_path, tiny_models["llama"], tiny_text), tmp_path / "runs"
    argv = [str(recipe), "--a", "distill.shd=0", "--b", "distill.shd=1.0", "--seeds", "0,1", "--runs", str(runs),
            "--markdown", str(tmp_path / "ab.md")]
    assert recipe_ab.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("running ") == 4
    for arm, shd in (("a", 0.0), ("b", 1.0)):
        for seed in (0, 1):
            metrics = json.loads((runs / f"{arm}_s{seed}" / "metrics.json").read_text())
            assert metrics["recipe"]["distill"]["shd"] == shd and metrics["recipe"]["train"]["seed"] == seed
    # the perplexity row: both arms' per-seed values, and B - A as a ratio with a finite p
    row = next(line for line in first.splitlines() if line.startswith("| perplexity, held-out"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    b_values = [json.loads((runs / f"b_s{s}" / "metrics.json").read_text())["final_eval"]["perplexity"] for s in (0, 1)]
    assert f"{b_values[0]:.4g}, {b_values[1]:.4g}" in cells[2]
    assert cells[3].endswith("]") and "%" in cells[3] and math.isfinite(float(cells[4]))
    assert "| train s/step" in first and (tmp_path / "ab.md").read_text().startswith("`python benchmarks/recipe_ab.py")

    # a second call reads the four finished runs: nothing runs, the same table comes back
    assert recipe_ab.main(argv) == 0
    second = capsys.readouterr().out
    assert "running " not in second and row in second


def test_a_folder_holding_another_run_is_refused(tiny_models, tiny_text, tmp_path, capsys):
    recipe, runs = _recipe(tmp_path, tiny_models["llama"], tiny_text), tmp_path / "runs"
    assert recipe_ab.main([str(recipe), "--a", "distill.shd=0", "--b", "distill.shd=1.0", "--seeds", "0",
                           "--runs", str(runs)]) == 0
    capsys.readouterr()
    before = (runs / "a_s0" / "metrics.json").read_bytes()
    # the same folder, another setting for arm A: refused with one line, the run already there kept
    code = recipe_ab.main([str(recipe), "--a", "distill.shd=0.5", "--b", "distill.shd=1.0", "--seeds", "0",
                           "--runs", str(runs)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "a_s0 holds a different run" in err
    assert len(err.strip().splitlines()) == 1
    assert (runs / "a_s0" / "metrics.json").read_bytes() == before
