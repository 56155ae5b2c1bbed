"""A derived student end to end: `shd distill` with importance pruning writes a smaller student, the
plan follows the kept layers, and metrics/report carry the student at init next to the final one;
the students benchmark's path stays alive (benchmarks/students.py --quick)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tests.conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_distill_importance_pruned_student(tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    recipe = {
        "teacher": str(tiny_models["llama"]),
        "student": {"from_teacher": {"heads": 2, "params": 0.7}},
        "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1,
                 "ood_eval": "builtin:sentences"},
        "distill": {"calibration_batches": 2},
        "train": {"max_steps": 2, "eval_every": 1, "warmup_steps": 0, "device": "cpu"},
        "output_dir": str(out),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, stdout, stderr = run_main(monkeypatch, capsys, "distill", str(path))
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    derivation, plan = metrics["derivation"], metrics["plan"]
    assert derivation["prune"] == "importance" and len(derivation["layers"]) == plan["student"]["layers"]
    assert plan["layers"] == [[i, t] for i, t in enumerate(derivation["layers"])]  # SHD follows the kept layers
    assert metrics["sizes"]["student_params"] <= 0.7 * metrics["sizes"]["teacher_params"]
    for row in (metrics["init_eval"], metrics["final_eval"]):
        assert row["perplexity"] > 1 and row["ood_perplexity"] > 1 and row["teacher_ood_perplexity"] > 1
    assert "speedup_b8" in metrics["final_eval"] and "speedup_b8" not in metrics["init_eval"]
    report = (out / "report.md").read_text()
    assert "| metric | teacher | student at init | student (final) |" in report
    assert "skip distance" in stdout and "x the teacher's parameters" in stdout


def test_size_warning_for_a_student_as_big_as_its_teacher(tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    recipe = {
        "teacher": str(tiny_models["bert"]),
        "student": {"from_teacher": {"heads": 3}},  # BERT: fewer heads at the same width shrink nothing
        "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "train": {"max_steps": 1, "eval_every": 1, "warmup_steps": 0, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, stdout, stderr = run_main(monkeypatch, capsys, "distill", str(path))
    assert code == 0, stderr
    assert "warning: the student has 1.00 x the teacher's parameters" in stdout


def test_students_benchmark_quick(tmp_path):
    import students

    js = tmp_path / "s.json"
    assert students.main(["--quick", "--seeds", "0,1", "--train", "combined", "--json", str(js)]) == 0
    results = json.loads(js.read_text())
    rows = results["step0"]["tiny-llama"]
    assert {(r["shape"], r["prune"]) for r in rows} == {(s, p) for s in ("combined", "depth")
                                                         for p in ("uniform", "importance")}
    assert all(r["m"]["perplexity"] > 1 and r["m"]["speedup_b8"] > 0 for r in rows)
    runs = results["trained"]["tiny-llama"]
    assert len(runs) == 4 and all(r["final"]["perplexity"] > 1 for r in runs)
    assert "importance - uniform in log perplexity" in students.markdown(results)


def test_part_norms_with_fused_logits_log_task_and_kd_together(tiny_models, tiny_text, tmp_path, monkeypatch, capsys):
    """Per-part gradient norms on a causal LM with the fused logit loss (one gradient for CE + KD)."""
    recipe = {
        "teacher": str(tiny_models["llama"]),
        "student": {"from_teacher": {"layers": 2, "heads": 2}},
        "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
        "train": {"max_steps": 2, "eval_every": 2, "warmup_steps": 0, "device": "cpu", "grad_norms_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_main(monkeypatch, capsys, "distill", str(path))
    assert code == 0, stderr
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert all(h["grad_norm_rest"] > 0 and h["grad_norm_shd"] > 0 for h in history)
