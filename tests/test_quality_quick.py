"""Keeps the quality benchmark's path alive (benchmarks/quality.py --quick on tiny random models) and
checks its statistics and the attention-KD baselines it compares SHD against (shdcli/attention/baselines.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402

from shdcli.attention.baselines import make_projector, score_mean_targets  # noqa: E402
from shdcli.attention.capture import LayerRecord  # noqa: E402
from shdcli.attention.shd import attention_maps  # noqa: E402
from shdcli.models.families import ModelShape  # noqa: E402
from shdcli.models.mapping import make_plan  # noqa: E402


# --------------------------------------------------------------------------- statistics vs closed forms
@pytest.mark.parametrize("t", [0.1, 0.7, 2.0, 4.302653, 25.0])
def test_t_pvalue_matches_closed_forms(t):
    # df = 1 (Cauchy): p = 1 - 2 atan(t) / pi; df = 2: p = 1 - t / sqrt(t^2 + 2).
    assert quality.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-10)
    assert quality.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-10)


def test_t_quantiles_match_tables():
    for df, expected in [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (30, 2.0422725)]:
        assert quality.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_paired_t_by_hand():
    mean, half, p = quality.paired_t([1.0, 2.0, 3.5], [0.0, 1.0, 2.0])  # diffs 1, 1, 1.5
    sd = math.sqrt(((1 - 7 / 6) ** 2 * 2 + (1.5 - 7 / 6) ** 2) / 2)
    assert mean == pytest.approx(7 / 6)
    assert half == pytest.approx(4.3026527 * sd / math.sqrt(3), rel=1e-6)
    t = (7 / 6) / (sd / math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)


# --------------------------------------------------------------------------- baselines
def _record(heads: int, n: int = 5, d: int = 4, seed: int = 0) -> LayerRecord:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, heads, n, d, generator=g), torch.randn(2, heads, n, d, generator=g)
    return LayerRecord(query=q, key=k, value=None, allowed=None, causal=True, scaling=d**-0.5)


def test_score_mean_is_softmax_of_mean_logits_and_identity_for_singletons():
    rec = _record(6)
    groups = [[0, 1, 2], [3, 4], [5]]
    target = score_mean_targets(rec, groups, tau=2.0)
    assert target.shape == (2, 3, 5, 5)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 3, 5))
    causal = torch.ones(5, 5).tril().bool()
    logits = (rec.query @ rec.key.transpose(-1, -2)) * rec.scaling / 2.0
    ref = torch.softmax(logits[:, [0, 1, 2]].mean(1).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(target[:, 0], ref)
    torch.testing.assert_close(target[:, 2], attention_maps(rec.query[:, [5]], rec.key[:, [5]], rec.scaling,
                                                            causal[None, None], 2.0)[:, 0])
    assert (target[..., ~causal] == 0).all()


def test_projector_starts_from_the_grouping_and_mixes_convexly():
    shape_t = ModelShape("llama", 2, 9, 3, 8, 72, None, None, None)
    shape_s = ModelShape("llama", 2, 3, 1, 8, 24, None, None, None)
    plan = make_plan(shape_t, shape_s, "auto", "balanced")
    proj = make_projector(plan, 9, 3)
    mix = proj.mix(0).detach()
    assert mix.shape == (9, 3)
    torch.testing.assert_close(mix.sum(-1), torch.ones(9))
    # teacher head t leans on the student head whose group holds it
    owner = torch.tensor([j for t in range(9) for j, g in enumerate(plan.groups[0]) if t in g])
    assert (mix.argmax(-1) == owner).all()
    assert mix.max(-1).values.min() == pytest.approx(math.exp(2) / (math.exp(2) + 2), rel=1e-5)


# --------------------------------------------------------------------------- the quick benchmark end to end
def test_quick_benchmark_writes_table_plot_and_json(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    out_json, png = tmp_path / "q.json", tmp_path / "curves.png"
    assert quality.main(["--quick", "--doc", str(doc), "--plot", str(png), "--json", str(out_json)]) == 0
    text = doc.read_text()
    assert "## Other section\n\nkept" in text and "## Quality (issue 4) (quick)" in text
    assert quality.BEGIN in text and quality.END in text
    for method in quality.ISSUE4_METHODS:
        assert f"| {quality.METHODS[method][0]} |" in text  # every method has a row (in the LM table at least)
    assert png.stat().st_size > 10_000
    data = json.loads(out_json.read_text())
    lm = data["summary"]["lm"]
    assert set(lm) == set(quality.ISSUE4_METHODS)
    for method, row in lm.items():
        assert math.isfinite(row["val_perplexity"][0]) and math.isfinite(row["fidelity_kl"][0])
        assert ("delta" in row) == (method != quality.BASELINE)
    # identical init and batches: every method starts from the same step-0 evaluation
    runs = data["results"]["lm"]["runs"]
    # Same initialisation for every method (calibrated grouping starts each student head from its own
    # group's representative, so its step-0 student differs by design).
    step0 = {m: runs[m]["0"]["curve"][0]["val_perplexity"] for m in runs if m != "shd_calibrated"}
    assert max(step0.values()) == pytest.approx(min(step0.values()), rel=1e-6)
    # the second run rewrites the generated block in place (hand-written text around it survives)
    doc.write_text(text.replace(quality.BEGIN, "hand-written note\n\n" + quality.BEGIN))
    assert quality.main(["--quick", "--methods", "kd", "--doc", str(doc), "--plot", "", "--json", str(out_json)]) == 0
    again = doc.read_text()
    assert "hand-written note" in again and again.count(quality.BEGIN) == 1
    assert "| 3 KD + SHD alpha lsq (default) |" not in again
    # report-only mode (used to merge parallel processes) rebuilds the tables from JSON without training
    assert quality.main(["--quick", "--from-json", str(out_json), "--doc", str(doc), "--plot", "", "--json",
                         str(tmp_path / "merged.json")]) == 0
    assert "| 2 logit KD (+task) |" in doc.read_text()


def test_distill_with_projector_target_has_projector_grads_and_saves_plain_student(tiny_models, tiny_text, tmp_path):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import make_optimizer, prepare, run_distillation, step_losses

    data = {"teacher": str(tiny_models["llama"]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            "distill": {"target": "projector"}, "train": {"max_steps": 2, "eval_every": 2, "device": "cpu"},
            "output_dir": str(tmp_path / "run")}
    recipe = validate_recipe(data)
    setup = prepare(recipe, Console(quiet=True))
    before = [p.detach().clone() for p in setup.projector.parameters()]
    metrics = run_distillation(recipe, Console(quiet=True))
    assert math.isfinite(metrics["final_eval"]["val_shd"])
    saved = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    assert b"logits" not in saved[:20000]  # the projector is not part of the student folder
    # the projector gets gradients and is in the optimizer: one step moves its logits
    optimizer = make_optimizer(setup.student, recipe, setup.projector)
    total, _, _ = step_losses(setup, dict(setup.val_batches[0]))
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in setup.projector.parameters())
    optimizer.step()
    assert not any(torch.equal(a, b) for a, b in zip(before, setup.projector.parameters()))


def test_quick_study_runs_every_setting_and_method_in_two_processes(tmp_path):
    """--study --quick --jobs 2: the three issue-13 settings on tiny models, every study method, one seed,
    split over two single-thread processes and merged; the second corpus and time per step are reported."""
    doc, out_json = tmp_path / "BENCHMARKS.md", tmp_path / "q13.json"
    student = '{"from_teacher": {"layers": 2, "heads": 3, "kv_heads": 3, "init": "teacher"}}'
    assert quality.main(["--study", "--quick", "--jobs", "2", "--doc", str(doc), "--plot", "", "--json",
                         str(out_json), "--student", f"lm_pruned={student}",
                         "--override", "enc_pruned:train.lr=0.002"]) == 0
    text = doc.read_text()
    assert "## Quality levers (issue 13) (quick)" in text and "fortunes" in text
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == set(quality.STUDY_SETTINGS)
    for name, rows in data["summary"].items():
        expected = set(quality.STUDY_METHODS) - quality.SKIP.get(name, set())
        assert set(rows) == expected
        metric = data["results"][name]["metric"]
        second = quality.SECOND_METRIC[metric]
        for row in rows.values():
            assert math.isfinite(row[metric][0]) and math.isfinite(row["fidelity_kl"][0])
            assert math.isfinite(row[second][0]) and row["s_per_step"][0] > 0
    lm = data["results"]["lm_pruned"]
    assert lm["recipe"]["student"]["from_teacher"]["layers"] == 2  # --student replaced the spec
    assert data["results"]["enc_pruned"]["recipe"]["train"]["lr"] == 0.002  # --override set one key
    assert lm["teacher_second"]["fortunes_perplexity"] > 1
    assert lm["runs"]["shd_bal_grad"]["0"]["grad_norms"]  # balance=grad measures every step
    # one initialisation and one batch order per seed: every method starts from the same student
    step0 = {m: r["0"]["curve"][0]["val_perplexity"] for m, r in lm["runs"].items() if m != "projector"}
    assert max(step0.values()) == pytest.approx(min(step0.values()), rel=1e-6)


def test_bounded_memo_keeps_batches_within_budget_and_serves_the_newest():
    rec = LayerRecord(query=torch.zeros(1, 1, 2, 2), key=torch.zeros(1, 1, 2, 2), value=None, allowed=None,
                      causal=False, scaling=1.0)
    entry = ({"logits": torch.zeros(10)}, {0: rec})  # 40 + 2 * 16 bytes
    memo = quality.BoundedMemo(150)
    memo["a"] = entry
    memo["b"] = entry
    assert memo.used == 144 and "a" in memo and "b" in memo
    memo["c"] = entry  # over budget: only held as the newest entry
    assert "c" in memo and memo["c"] is entry and dict.__len__(memo) == 2
    memo["d"] = entry
    assert "c" not in memo and memo["d"] is entry and memo["a"] is entry
    with pytest.raises(KeyError):
        memo["c"]


def _part(steps: int, runs: dict, seeds: list[int]) -> dict:
    """One --from-json part as JSON hands it back: seeds as string keys."""
    return {"command": f"run {steps}", "seeds": seeds, "results": {"lm_pruned": {
        "steps": steps, "title": "t", "metric": "val_perplexity", "higher_is_better": False,
        "runs": {m: {str(s): {"v": v} for s, v in by.items()} for m, by in runs.items()},
        "teacher": {str(s): {"val_perplexity": 1.0} for s in seeds}}}}


def test_merge_parts_unions_methods_and_seeds_and_keeps_other_step_counts_apart():
    parts = [_part(80, {"kd": {0: 1, 1: 2}}, [0, 1]), _part(80, {"shd_lsq": {0: 3, 1: 4}}, [0, 1]),
             _part(80, {"kd": {2: 5}}, [2]), _part(300, {"kd": {0: 6}, "shd_lsq": {0: 7}}, [0])]
    results, seeds = quality.merge_parts(parts)
    assert seeds == [0, 1, 2]
    assert set(results) == {"lm_pruned", "lm_pruned (300 steps)"}
    short = results["lm_pruned"]["runs"]
    assert {m: {s: r["v"] for s, r in by.items()} for m, by in short.items()} == \
        {"kd": {0: 1, 1: 2, 2: 5}, "shd_lsq": {0: 3, 1: 4}}
    long = results["lm_pruned (300 steps)"]
    assert long["steps"] == 300 and long["runs"]["kd"][0]["v"] == 6 and sorted(long["teacher"]) == [0]


def _all_layers_and_last_layer_setups():
    """The quick perf setup (SHD on every layer pair) and the same student and teacher with SHD on the
    last pair only, as `distill.layers: {last: 1}` plans it."""
    import dataclasses

    from tests.test_perf_quick import load_perf

    perf = load_perf()
    full = perf.build(perf.QUICK, 12, torch.device("cpu"))
    last = dataclasses.replace(full, plan=dataclasses.replace(full.plan, pairs=full.plan.pairs[-1:],
                                                              groups=full.plan.groups[-1:]))
    return perf, full, last


def test_shared_teacher_memo_serves_every_layer_a_run_needs():
    """Methods share one teacher memo per seed; SHD on the last layer only records one teacher layer, so
    its entries must not serve a later all-layer run (the KeyError the issue-13 study first hit)."""
    perf, full, last = _all_layers_and_last_layer_setups()
    memo = quality.BoundedMemo(2**30)
    full.teacher_memo = last.teacher_memo = memo
    batch = perf.make_batch(perf.QUICK, 2, 12, torch.device("cpu"))
    _, few = last.teacher_forward(batch)
    assert set(few) == {full.plan.pairs[-1][1]}
    _, every = full.teacher_forward(batch)
    assert set(every) == {t for _, t in full.plan.pairs}
    assert dict.__len__(memo) == 1 and memo.used == memo.nbytes(memo[next(iter(dict.keys(memo)))])
    _, again = last.teacher_forward(batch)  # a superset serves the subset run
    assert again is every


def test_fidelity_is_measured_on_every_layer_whatever_layers_the_method_trains():
    perf, full, last = _all_layers_and_last_layer_setups()
    full.val_batches = last.val_batches = [perf.make_batch(perf.QUICK, 2, 12, torch.device("cpu"))]
    view = quality.fidelity_view(last)
    assert view.plan.pairs == full.plan.pairs and view.student is last.student
    assert quality.fidelity_view(full) is full
    every, only_last = quality.evaluate_run(view)["fidelity_kl"], quality.evaluate_run(last)["fidelity_kl"]
    assert every == pytest.approx(quality.evaluate_run(full)["fidelity_kl"], rel=1e-6)
    assert every != pytest.approx(only_last, rel=1e-3)  # the subset alone measures something else


def test_a_report_merged_again_keeps_each_invocations_wall_time():
    """--from-json over an earlier merged report lists every invocation once, each with the wall time it
    ran for; older merged files (bare commands) and cut-short partial runs list none."""
    earlier = {"parts": ["bare older command", {"command": "timed run", "wall_s": 702.0}]}
    new, cut = {"command": "new run", "wall_s": 120.0}, {"command": "(cut short; finished runs from x.partial.json)"}
    entries = [entry for part in (earlier, new, cut) for entry in quality.part_entries(part)]
    again = quality.part_entries({"parts": entries})  # the merged file, merged once more
    assert again == entries
    assert "".join(quality._entry_line(entry) for entry in again) == (
        "- `bare older command`\n- `timed run`: 11.7 min wall\n- `new run`: 2.0 min wall\n"
        "- `(cut short; finished runs from x.partial.json)`\n")


def test_partial_file_carries_the_setting_as_it_ran(tmp_path):
    """A study cut short leaves a .partial.json; it records the recipe that ran (--student applied) and
    the setting's title and metric, so the merged report does not describe today's default student."""
    from rich.console import Console

    settings = {"enc_pruned": quality.quick_study_settings(tmp_path)["enc_pruned"]}
    settings = quality.apply_setting_overrides(settings, ['enc_pruned={"from_teacher": {"layers": 1, "heads": 2}}'],
                                               [])
    partial = tmp_path / "study.partial.json"
    quiet = Console(quiet=True)
    results = quality.run(settings, ["kd"], [0], 2, 2, quiet, quiet, partial)
    written = json.loads(partial.read_text())["enc_pruned"]
    assert written["recipe"]["student"] == {"from_teacher": {"layers": 1, "heads": 2}}
    assert written["recipe"] == results["enc_pruned"]["recipe"]
    title = settings["enc_pruned"][0]
    assert (written["title"], written["metric"], written["steps"]) == (title, "similarity_pearson", 2)
    assert list(written["runs"]["kd"]) == ["0"]
