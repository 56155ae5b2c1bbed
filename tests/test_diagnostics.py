"""Attention diagnostics (shdcli/attention/diagnostics.py) against a loop-by-loop reference that shares no
code with it, and their place in a run's validation records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shdcli.attention.capture import LayerRecord
from shdcli.attention.diagnostics import attention_diagnostics


def _softmax_row(scores: list[float], allowed: list[bool]) -> list[float]:
    top = max(s for s, a in zip(scores, allowed) if a)
    e = [math.exp(s - top) if a else 0.0 for s, a in zip(scores, allowed)]
    return [x / sum(e) for x in e]


def _reference(t_q, t_k, s_q, s_k, groups, key_mask, scaling_t, scaling_s):
    """Mean-squeezed targets (w = 1/k) and plain-Python KL, sink KL and entropies over valid rows."""
    batch, _, n, _ = t_q.shape
    kl = sink = ent_s = ent_t = rows = 0.0
    for b in range(batch):
        allowed = [bool(key_mask[b, m]) for m in range(n)]
        last = max(m for m in range(n) if allowed[m])
        for j, group in enumerate(groups):
            for i in range(n):
                if not allowed[i]:  # a padded query row
                    continue
                maps = []
                for h in group:
                    scores = [float(t_q[b, h, i] @ t_k[b, h, m]) * scaling_t for m in range(n)]
                    maps.append(_softmax_row(scores, allowed))
                target = [sum(mp[m] for mp in maps) / len(group) for m in range(n)]
                student = _softmax_row([float(s_q[b, j, i] @ s_k[b, j, m]) * scaling_s for m in range(n)], allowed)
                for m in range(n):
                    if target[m] > 0:
                        term = target[m] * math.log(target[m] / student[m])
                        kl += term
                        if m in (0, last):
                            sink += term
                        ent_t -= target[m] * math.log(target[m])
                    if student[m] > 0:
                        ent_s -= student[m] * math.log(student[m])
                rows += 1
    return {"sink_share": sink / kl, "entropy_student": ent_s / rows, "entropy_target": ent_t / rows,
            "kl_per_row": kl / rows}


def _record(q, k, key_mask, scaling, v=None):
    allowed = key_mask[:, None, None, :].expand(-1, 1, q.shape[2], -1)  # [B, 1, N, M]
    return LayerRecord(query=q, key=k, value=v, allowed=allowed, causal=False, scaling=scaling)


def test_diagnostics_match_a_loop_reference_with_padding_and_sep_sinks():
    torch.manual_seed(0)
    batch, n, d = 2, 6, 4
    t_q, t_k, t_v = (torch.randn(batch, 4, n, d, dtype=torch.float64) for _ in range(3))
    s_q, s_k = (torch.randn(batch, 2, n, d, dtype=torch.float64) for _ in range(2))
    t_q[:, :, :, 0] += 2.0  # teacher rows lean on some keys more than others
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # row 2: [SEP] at 3
    groups = [[0, 1], [2, 3]]
    got = attention_diagnostics({5: _record(t_q, t_k, key_mask, 0.5, t_v)}, {1: _record(s_q, s_k, key_mask, 0.4)},
                                [(1, 5)], [groups], {5: None}, key_mask, key_mask, "mean", 1.0)
    want = _reference(t_q, t_k, s_q, s_k, groups, key_mask, 0.5, 0.4)
    want["kl_layer/1"] = want.pop("kl_per_row")
    assert got == pytest.approx(want, rel=1e-6)  # the maps are computed in float32


def test_per_layer_kl_is_each_layers_own_and_the_whole_mixes_them():
    """Two mapped layers: kl_layer/<s> is that layer's reference KL per row; the shares and entropies are
    over both layers' rows together (so they differ from either layer's alone)."""
    torch.manual_seed(1)
    batch, n, d = 2, 5, 3
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    groups = [[0, 2], [1, 3]]
    layers = {}
    for s_idx, t_idx in ((0, 1), (1, 3)):
        t_q, t_k, t_v = (torch.randn(batch, 4, n, d, dtype=torch.float64) * (1 + s_idx) for _ in range(3))
        s_q, s_k = (torch.randn(batch, 2, n, d, dtype=torch.float64) for _ in range(2))
        layers[(s_idx, t_idx)] = (t_q, t_k, t_v, s_q, s_k)
    t_records = {t: _record(q, k, key_mask, 0.5, v) for (_, t), (q, k, v, _, _) in layers.items()}
    s_records = {s: _record(q, k, key_mask, 0.5) for (s, _), (_, _, _, q, k) in layers.items()}
    got = attention_diagnostics(t_records, s_records, list(layers), [groups, groups], {1: None, 3: None},
                                key_mask, key_mask, "mean", 1.0)
    for (s_idx, _), (t_q, t_k, _, s_q, s_k) in layers.items():
        alone = _reference(t_q, t_k, s_q, s_k, groups, key_mask, 0.5, 0.5)
        assert got[f"kl_layer/{s_idx}"] == pytest.approx(alone["kl_per_row"], rel=1e-6)
    first, second = (_reference(q, k, sq, sk, groups, key_mask, 0.5, 0.5) for q, k, _, sq, sk in layers.values())
    # equal row counts per layer: the whole's entropy is the mean of the layers'
    assert got["entropy_student"] == pytest.approx((first["entropy_student"] + second["entropy_student"]) / 2,
                                                   rel=1e-6)


def test_a_student_that_copies_everything_but_the_sink_has_all_its_kl_there():
    """Targets put mass on key 0; a student whose maps differ only there has sink_share 1."""
    n = 5
    key_mask = torch.ones(1, n, dtype=torch.bool)
    q = torch.zeros(1, 1, n, 1, dtype=torch.float64)
    q[..., 0] = 1.0
    t_k = torch.zeros(1, 1, n, 1, dtype=torch.float64)
    t_k[0, 0, 0, 0] = 3.0  # teacher: key 0 gets e^3 times the weight of the others
    s_k = torch.zeros(1, 1, n, 1, dtype=torch.float64)  # student: uniform
    got = attention_diagnostics({0: _record(q, t_k, key_mask, 1.0, t_k)}, {0: _record(q, s_k, key_mask, 1.0)},
                                [(0, 0)], [[[0]]], {0: None}, None, key_mask, "mean", 1.0)
    # KL of the non-sink keys is negative (student puts more there), the sink's positive; they sum to KL >= 0.
    assert got["entropy_student"] == pytest.approx(math.log(n))
    assert got["entropy_target"] < got["entropy_student"]
    assert got["sink_share"] > 1.0  # the sink key carries more than the whole KL: the rest pulls the other way


def test_validation_records_the_diagnostics_and_none_without_shd(tiny_models, tiny_text, tmp_path):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    def run(shd: float, name: str, balance: str = "none") -> list[dict]:
        data = {"teacher": str(tiny_models["llama"]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
                "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
                "distill": {"shd": shd, "balance": balance},
                "train": {"max_steps": 3, "eval_every": 3, "device": "cpu", "grad_norms_every": 1},
                "output_dir": str(tmp_path / name)}
        run_distillation(validate_recipe(data), Console(quiet=True))
        return json.loads((tmp_path / name / "metrics.json").read_text())

    metrics = run(1.0, "shd", balance="agreement")
    history, with_shd = metrics["history"], metrics["validation"]
    # every measured step logs the cosine and the applied norm ratio; agreement caps that ratio at the cosine
    for h in history:
        assert -1.0 <= h["grad_cos_shd"] <= 1.0
        assert h["grad_ratio_shd"] <= max(0.0, h["shd_agreement"]) + 1e-9
    report = (tmp_path / "shd" / "report.md").read_text()
    assert "## SHD and the task" in report and "balance agreement: running cosine" in report
    for record in with_shd:
        assert 0 < record["val_entropy_student"] <= math.log(32) + 1e-6
        assert 0 < record["val_entropy_target"] <= math.log(32) + 1e-6
        assert math.isfinite(record["val_sink_share"])
        # attention fidelity per student layer (both layers mapped), the plot's and TensorBoard's input
        assert sorted(record["attention_kl_by_layer"]) == ["0", "1"]
        # KL >= 0 up to float32 rounding (a student copied from the teacher starts at ~1e-6)
        assert all(v >= -1e-5 and math.isfinite(v) for v in record["attention_kl_by_layer"].values()), record
    assert "attention_kl_by_layer" not in metrics["final_eval"]  # final_eval holds numbers only
    assert not any("val_sink_share" in r for r in run(0.0, "kd")["validation"])
