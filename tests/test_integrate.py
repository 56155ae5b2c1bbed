"""Integration of the merged features: `shd inspect-heads --grouping calibrated` (issue 9), and
`shd inspect-heads` / `shd eval` on image classifiers (issue 8), through the CLI on tiny models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from shdcli import heads
from shdcli.attention import shd
from shdcli.models.families import attention_params, decoder_layers, model_shape
from shdcli.tasks.data import read_documents
from shdcli.tasks.registry import load_model
from tests.conftest import run_cli, run_main
from tests.test_vision import save_teacher, write_npz


def check_partition(groups: list[list[int]], ht: int, hs: int) -> None:
    assert sorted(h for g in groups for h in g) == list(range(ht)), groups  # every head exactly once
    assert sorted(len(g) for g in groups) == sorted(len(g) for g in shd.group_heads(ht, hs, "balanced"))


# =========================================================================== calibrated grouping
def test_inspect_heads_calibrated_cli(tiny_models, tmp_path):
    out = tmp_path / "heads"
    proc = run_cli("inspect-heads", str(tiny_models["bert"]), "--grouping", "calibrated", "--samples", "8",
                   "--seq-len", "16", "--heads-to", "4", "--json", "--out", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "heads.json").read_text())
    assert report["grouping"] == "calibrated" and report["target_heads"] == 4
    # the first half of the samples chooses the groups, the other half is measured
    assert report["calibration_heldout"] and report["calibration_samples"] == 4 and report["samples"] == 4
    for layer in report["layer_stats"]:
        groups = [g["heads"] for g in layer["groups"]]
        check_partition(groups, 6, 4)
        cal = layer["calibration"]
        assert cal["groups"] == groups
        assert cal["error"] <= cal["contiguous_error"] + 1e-12  # on the calibration samples: never worse
        assert math.isfinite(layer["error"]["lsq"]) and math.isfinite(layer["contiguous_error"])
        assert len(cal["representatives"]) == 4 and all(r in g for r, g in zip(cal["representatives"], groups))


def _permuted_copies_folder(src: Path, dst: Path, layer: int, order: list[int]) -> Path:
    """A copy of a tiny model folder whose layer `layer` has query head h attend exactly like head
    order[h] (same q and k rows; v differs), every layer's attention sharpened (random init attends
    almost uniformly, so all heads would look alike)."""
    model, _, _ = load_model(src, "MODEL")
    d = model_shape(model.config).head_dim
    with torch.no_grad():
        for block in decoder_layers(model):
            p = attention_params(block, model.config)
            p.q.weight.mul_(8.0)
            p.k.weight.mul_(8.0)
        p = attention_params(decoder_layers(model)[layer], model.config)
        for mod in (p.q, p.k):
            w, b = mod.weight.clone(), None if mod.bias is None else mod.bias.clone()
            for h, c in enumerate(order):
                mod.weight[h * d:(h + 1) * d] = w[c * d:(c + 1) * d]
                if b is not None:
                    mod.bias[h * d:(h + 1) * d] = b[c * d:(c + 1) * d]
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    return dst


def test_calibrated_finds_permuted_copies(tiny_models, tmp_path):
    """Layer 1's heads are copies in the order 0 1 2 0 1 2: calibrated groups pair the copies and
    squeeze them without loss; contiguous groups pair different heads and lose output."""
    folder = _permuted_copies_folder(tiny_models["bert"], tmp_path / "copies", 1, [0, 1, 2, 0, 1, 2])
    report = heads.run_inspect(str(folder), heads.InspectOptions(samples=8, seq_len=16, batch_size=4, target_heads=3,
                                                                 grouping="calibrated"))
    tied = report.layer_stats[1]
    assert [g.heads for g in tied.groups] == [[0, 3], [1, 4], [2, 5]]
    assert tied.calibration["error"] < 1e-3 and tied.calibration["contiguous_error"] > 0.05
    assert tied.error["lsq"] < 1e-3  # on the measured (held-out) samples too
    assert tied.contiguous_error > 0.05
    for s in report.layer_stats:
        check_partition([g.heads for g in s.groups], 6, 3)
    # the table shows the groups and both errors, formatted from the report's numbers
    row = heads.table_rows(report)[1]
    assert row[-3:] == ["{0,3} {1,4} {2,5}", f"{tied.contiguous_error:.3f}",
                        f"{tied.calibration['error']:.3f} / {tied.calibration['contiguous_error']:.3f}"]


def test_contiguous_error_matches_balanced_run(tiny_models):
    """The contiguous column is the balanced grouping's error on the same samples."""
    model, tokenizer, task = load_model(tiny_models["gpt2"], "MODEL")
    batches = heads.text_batches(read_documents("builtin:sentences")[:40], tokenizer, task, 4, 16, 2)
    grouper = heads.groups_per_layer_grouper(6, 2, {0: [[0, 5], [1, 2, 3, 4]]})
    custom = heads.inspect_heads(model, batches, 2, grouper=grouper, grouping="custom", compare_contiguous=True)
    plain = heads.inspect_heads(model, batches, 2)
    for c, p in zip(custom.layer_stats, plain.layer_stats):
        assert c.contiguous_error == pytest.approx(p.error["lsq"], rel=1e-5, abs=1e-7)
    assert plain.layer_stats[0].contiguous_error is None


# =========================================================================== image classifiers
@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("vit")
    return {"teacher": save_teacher(base / "teacher", heads=6, hidden=24, layers=2, labels=3),
            "data": write_npz(base / "d.npz", n=48)}


def test_inspect_heads_on_vit(vit, tmp_path, monkeypatch, capsys):
    out = tmp_path / "heads"
    code, stdout, err = run_main(monkeypatch, capsys, "inspect-heads", str(vit["teacher"]), "--data", str(vit["data"]),
                                 "--samples", "5", "--batch-size", "2", "--json", "--out", str(out), "--threads", "1")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["task"] == "image-classification" and report["samples"] == 5
    assert report["seq_len"] == (8 // 4) ** 2 + 1  # patches + CLS
    assert report["rows"] == 5 * report["seq_len"]  # no padding: every query row counts
    assert len(report["layer_stats"]) == 2 and report["sample_tokens"] == []
    assert all(0.0 <= s["redundancy"] <= 1.0 and math.isfinite(s["error"]["lsq"]) for s in report["layer_stats"])
    assert (out / "attention_layer0.png").read_bytes()[:4] == b"\x89PNG"
    # calibrated grouping on images: groups chosen on 2 images, measured on the other 3
    code, stdout, err = run_main(monkeypatch, capsys, "inspect-heads", str(vit["teacher"]), "--data", str(vit["data"]),
                                 "--samples", "5", "--grouping", "calibrated", "--threads", "1")
    assert code == 0, err
    assert "contiguous err lsq" in stdout and "Calibrated groups chosen on 2 samples" in stdout


def test_inspect_heads_on_vit_default_digits(vit):
    """builtin:digits (10 classes) is the default and works for a 3-class model: labels are not read."""
    pytest.importorskip("sklearn")
    report = heads.run_inspect(str(vit["teacher"]), heads.InspectOptions(samples=3, batch_size=3))
    assert report.data == "builtin:digits" and report.samples == 3


def test_eval_image_classifier(vit, tmp_path, monkeypatch, capsys):
    code, stdout, err = run_main(monkeypatch, capsys, "eval", str(vit["teacher"]), "--data", str(vit["data"]),
                                 "--teacher", str(vit["teacher"]), "--json", "--out", str(tmp_path / "e" / "r.json"),
                                 "--threads", "1")
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads((tmp_path / "e" / "r.json").read_text())
    for role in ("model", "teacher"):
        r = result[role]
        assert r["images"] == 5 and sum(map(sum, r["confusion_matrix"])) == 5  # 10% of 48 held out
        assert 0 <= r["top1"] <= r["top5"] == 1.0  # 3 classes: top-5 always hits
        assert r["size_mb"] > 0 and r["latency_ms_per_image"] > 0
        assert Path(r["confusion_png"]).parent == tmp_path / "e"
        assert Path(r["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert result["model"]["top1"] == result["teacher"]["top1"]  # the same model, scored twice

    # a distilled student's run folder supplies data (its held-out split) and teacher; the table mode
    run = tmp_path / "run"
    shutil.copytree(vit["teacher"], run / "student")
    (run / "metrics.json").write_text(json.dumps({"recipe": {
        "teacher": {"path": str(vit["teacher"])}, "data": {"path": str(vit["data"]), "val_fraction": 0.25}}}))
    code, stdout, err = run_main(monkeypatch, capsys, "eval", str(run / "student"), "--threads", "1")
    assert code == 0, err
    assert "model: top-1" in stdout and "teacher: top-1" in stdout and "taken from" in stdout
    saved = json.loads((run / "student_eval" / "eval.json").read_text())
    assert saved["model"]["images"] == 12 and saved["teacher"]["images"] == 12
    assert (run / "student_eval" / "confusion_model.png").exists()

    code, _, err = run_main(monkeypatch, capsys, "eval", str(vit["teacher"]), "--compare", str(vit["teacher"]),
                            "--data", str(vit["data"]))
    assert code == 2 and "--compare" in err and "Traceback" not in err


def test_distill_vit_with_calibrated_grouping(vit, tmp_path, monkeypatch, capsys):
    """distill.grouping: calibrated on an image classifier: calibration batches are image batches."""
    from tests.test_vision import RECIPE

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(task="", teacher=vit["teacher"], data=vit["data"], out=tmp_path / "run"))
    code, stdout, err = run_main(monkeypatch, capsys, "distill", str(recipe), "--set", "distill.grouping=calibrated")
    assert code == 0, err
    assert "calibrating head groups on" in stdout
    plan = json.loads((tmp_path / "run" / "metrics.json").read_text())["plan"]
    for groups, cal in zip(plan["groups"], plan["calibration"]):
        check_partition(groups, 6, 4)
        assert cal["error"] <= cal["contiguous_error"] + 1e-12
