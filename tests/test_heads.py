"""`shd inspect-heads`: the head-similarity and squeeze-cost numbers, checked against slow references,
on constructed maps and on tiny models, plus the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from shdcli import heads
from shdcli.attention import shd
from shdcli.tasks.data import read_documents
from shdcli.tasks.registry import load_model
from tests.conftest import run_cli, run_main

F64 = torch.float64




def rand_maps(b, h, n, m=None, seed=0, sharp=2.0):
    m = n if m is None else m
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(b, h, n, m, dtype=F64, generator=g), dim=-1)


def ref_js(p: torch.Tensor, q: torch.Tensor) -> float:
    """JS divergence of two 1-D distributions by the textbook formula, in nats."""
    m = 0.5 * (p + q)
    kl = lambda a, b: sum(float(a[i] * math.log(a[i] / b[i])) for i in range(len(a)) if a[i] > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# =========================================================================== pure math
def test_pairwise_js_matches_reference_and_skips_padded_rows():
    maps = rand_maps(2, 3, 4, 5)
    row_mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    sums, rows = heads.pairwise_js(maps, row_mask)
    assert rows == 6
    for h in range(3):
        for g in range(3):
            want = sum(ref_js(maps[b, h, r], maps[b, g, r]) for b in range(2) for r in range(4) if row_mask[b, r])
            assert sums[h, g].item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_js_of_identical_heads_is_zero_and_redundancy_is_one():
    one = rand_maps(2, 1, 6)
    maps = one.expand(2, 4, 6, 6).clone()
    sums, rows = heads.pairwise_js(maps, None)
    assert sums.abs().max().item() < 1e-12
    assert heads.redundancy_score(sums / rows) == pytest.approx(1.0)


def test_redundancy_is_zero_for_heads_on_disjoint_keys():
    # Head h attends only to key h: every pair has JS = ln 2, the maximum.
    maps = torch.zeros(1, 3, 2, 3, dtype=F64)
    for h in range(3):
        maps[0, h, :, h] = 1.0
    sums, rows = heads.pairwise_js(maps, None)
    js = sums / rows
    assert js[0, 1].item() == pytest.approx(math.log(2))
    assert heads.redundancy_score(js) == pytest.approx(0.0, abs=1e-12)


def test_gram_error_equals_reconstruction_error():
    maps = rand_maps(3, 3, 5, seed=4)
    feats = torch.randn(3, 3, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    gram, rhs = shd.squeeze_statistics(maps, feats)
    t_sq = torch.matmul(maps, feats).sum(1).flatten(1).pow(2).sum(-1)
    for mode in ("lsq", "mean", "select"):
        w = shd.solve_weights(gram, rhs, mode)
        want = shd.reconstruction_error(maps, feats, w)
        assert torch.allclose(heads.gram_error(gram, rhs, t_sq, w).sqrt(), want.double(), atol=1e-7)


def ref_layer_error(maps, feats_full, groups, mode):
    """Slow reference: per sample, every group's weights, squeezed output and true output, then
    sqrt(sum_j ||A~_j S_j - T_j||^2 / sum_j ||T_j||^2). feats_full [B, H, M, D]."""
    out = []
    for b in range(maps.shape[0]):
        lost, energy = 0.0, 0.0
        for g in groups:
            t = sum(maps[b, h] @ feats_full[b, h] for h in g)
            energy += float((t**2).sum())
            if len(g) == 1:
                continue
            gram, rhs = shd.squeeze_statistics(maps[b:b + 1, g], feats_full[b:b + 1, g])
            w = shd.solve_weights(gram, rhs, mode)[0]
            merged = sum(w[i].double() * maps[b, h] for i, h in enumerate(g))
            s = sum(feats_full[b, h] for h in g)
            lost += float(((merged @ s - t) ** 2).sum())
        out.append(math.sqrt(lost / energy))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("exact", [True, False])
def test_layer_error_pools_groups_of_mixed_sizes(exact):
    maps = rand_maps(2, 6, 5, seed=7)
    feats_full = torch.randn(2, 6, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
    groups = [[0, 1, 2], [3, 4], [5]]
    feats = [feats_full[:, g] for g in groups]
    layer, per_group, weights = heads.measure._group_errors(maps, feats, groups, heads.MODES, None, exact=exact)
    for mode in heads.MODES:
        assert torch.allclose(layer[mode], ref_layer_error(maps, feats_full, groups, mode), atol=1e-6)
        assert per_group[mode][:, 2].abs().max() == 0  # the lone head loses nothing
    assert [w.shape for w in weights] == [(2, 3), (2, 2), (2, 1)]
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, dtype=weights[0].dtype))


def test_default_heads_is_half_rounded_up():
    assert [heads.default_heads(h) for h in (1, 2, 9, 12)] == [1, 1, 5, 6]


# =========================================================================== on tiny models
def _tie_heads(model, layer: int) -> None:
    """Sharpen every layer's attention (random init attends almost uniformly, so all heads would look
    alike), then make every query head of `layer` attend exactly like head 0 (same q and k; v differs)."""
    from shdcli.models.families import attention_params, decoder_layers, model_shape

    shape = model_shape(model.config)
    with torch.no_grad():
        for block in decoder_layers(model):
            params = attention_params(block, model.config)
            params.q.weight.mul_(8.0)
            params.k.weight.mul_(8.0)
    p = attention_params(decoder_layers(model)[layer], model.config)
    d = shape.head_dim
    with torch.no_grad():
        for mod, n in ((p.q, shape.heads), (p.k, shape.kv_heads)):
            for h in range(1, n):
                mod.weight[h * d:(h + 1) * d] = mod.weight[:d]
                if mod.bias is not None:
                    mod.bias[h * d:(h + 1) * d] = mod.bias[:d]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_layer_with_identical_heads_suggests_one_head(tiny_models, kind):
    model, tokenizer, task = load_model(tiny_models[kind], "MODEL")
    _tie_heads(model, 1)
    batches = heads.text_batches(read_documents("builtin:sentences")[:40], tokenizer, task, 6, 24, 3)
    report = heads.inspect_heads(model, batches, target_heads=2, tolerance=0.05, tokenizer=tokenizer)
    tied = report.layer_stats[1]
    assert tied.redundancy == pytest.approx(1.0, abs=1e-6)
    assert tied.redundancy == max(s.redundancy for s in report.layer_stats)
    assert tied.suggested_heads == 1
    assert max(tied.error.values()) < 1e-4
    assert tied.error_by_heads[1] < 1e-3
    others = [s for s in report.layer_stats if s.layer != 1]
    assert all(s.redundancy < 0.999 for s in others)
    assert all(s.suggested_heads > 1 for s in others)
    # The sweep's Gram-form error and the displayed reconstruction_error agree at the target K.
    for s in report.layer_stats:
        assert s.error_by_heads[2] == pytest.approx(s.error["lsq"], abs=1e-4)
        assert s.error_by_heads[report.heads] == 0.0
    assert report.sample_maps.shape[:2] == (report.layers, report.heads)


def test_given_groups_are_used_for_the_target(tiny_models):
    model, tokenizer, task = load_model(tiny_models["gpt2"], "MODEL")
    batches = heads.text_batches(read_documents("builtin:sentences")[:40], tokenizer, task, 4, 16, 4)
    custom = {0: [[0, 5], [1, 2, 3, 4]]}
    grouper = heads.groups_per_layer_grouper(6, 2, custom)
    report = heads.inspect_heads(model, batches, target_heads=2, grouper=grouper, grouping="custom")
    assert [g.heads for g in report.layer_stats[0].groups] == [[0, 5], [1, 2, 3, 4]]
    assert [g.heads for g in report.layer_stats[1].groups] == [[0, 1, 2], [3, 4, 5]]
    assert len(report.layer_stats[0].groups[1].weight_mean) == 4


@pytest.fixture(scope="module")
def gpt2_report(tiny_models):
    return heads.run_inspect(str(tiny_models["gpt2"]), heads.InspectOptions(samples=4, seq_len=16, batch_size=2))


def test_table_shows_the_json_numbers(gpt2_report):
    data = json.loads(json.dumps(gpt2_report.to_dict()))
    rows = heads.table_rows(gpt2_report)
    assert len(rows) == len(data["layer_stats"])
    for row, layer in zip(rows, data["layer_stats"]):
        multi = [g for g in layer["groups"] if len(g["heads"]) > 1]
        assert row == [
            str(layer["layer"]), f"{layer['redundancy']:.3f}", f"{layer['error']['lsq']:.3f}",
            f"{layer['error']['mean']:.3f}", f"{layer['error']['select']:.3f}",
            " ".join(f"{g['weight_mean'][0]:.2f}" for g in multi), " ".join(f"{g['weight_std'][0]:.2f}" for g in multi),
            str(layer["suggested_heads"]),
        ]
    console = Console(width=250, record=True)
    console.print(heads.heads_table(gpt2_report))
    lines = [line for line in console.export_text().splitlines() if line.startswith("│")]
    assert [[c.strip() for c in line.split("│")[1:-1]] for line in lines] == rows


def test_outputs_without_matplotlib_still_write_json(gpt2_report, tmp_path, monkeypatch):
    monkeypatch.setattr(heads.report, "have_matplotlib", lambda: False)
    files, note = heads.write_outputs(gpt2_report, tmp_path / "out")
    assert [f.name for f in files] == ["heads.json"]
    assert "pip install 'shd[plot]'" in note
    assert json.loads((tmp_path / "out" / "heads.json").read_text())["layers"] == gpt2_report.layers


# =========================================================================== CLI
def test_cli_inspect_heads_writes_files_and_json(tiny_models, tmp_path):
    out = tmp_path / "heads"
    proc = run_cli("inspect-heads", str(tiny_models["llama"]), "--samples", "4", "--seq-len", "16",
                   "--heads-to", "3", "--out", str(out), "--plot-layers", "0,2", "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    on_disk = json.loads((out / "heads.json").read_text())
    assert printed == on_disk
    assert printed["target_heads"] == 3 and printed["kv_heads"] == 2
    assert len(printed["layer_stats"]) == 4
    for name in ("heads.png", "alphas.png", "attention_layer0.png", "attention_layer2.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect_heads_table_and_errors(tiny_models, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "inspect-heads", str(tiny_models["bert"]), "--samples", "3")
    assert code == 0, err
    assert "redundancy" in out and "min heads" in out and "pass --out DIR" in out
    code, _, err = run_main(monkeypatch, capsys, "inspect-heads", str(tiny_models["bert"]), "--heads-to", "9")
    assert code == 2
    assert "--heads-to" in err and "Traceback" not in err
    code, _, err = run_main(monkeypatch, capsys, "inspect-heads", "/nonexistent/model")
    assert code == 2 and "does not exist" in err
    code, _, err = run_main(monkeypatch, capsys, "inspect-heads", str(tiny_models["bert"]), "--grouping", "odd")
    assert code == 2 and "--grouping" in err
