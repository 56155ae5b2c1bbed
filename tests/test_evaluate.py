"""`shd eval` and the evaluation shared with `shd distill`: metric math against references on models
with known outputs, then the command on tiny models."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from shdcli import evaluate
from shdcli.errors import ShdError
from shdcli.evaluate import EvalModel, EvalOptions, HeldOut
from shdcli.tasks import causal_lm, encoder, registry
from shdcli.tasks.registry import load_model
from tests.conftest import run_cli, run_main
from tests.tiny import make_tiny

F64 = torch.float64




class BigramLM(torch.nn.Module):
    """A causal LM with known logits: the next-token logits depend on the current token only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # [V, V]
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def ref_bigram_ppl(table: torch.Tensor, ids: list[int]) -> float:
    """exp(mean over i of -log softmax(table[x_i])[x_{i+1}]) with explicit sums, in float64."""
    nll = 0.0
    for a, b in zip(ids[:-1], ids[1:]):
        row = table[a].double()
        nll += -(row[b] - math.log(sum(math.exp(float(v)) for v in row)))
    return math.exp(nll / (len(ids) - 1))


# =========================================================================== perplexity
def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    model = BigramLM(torch.zeros(7, 7))
    ids = torch.randint(0, 7, (2, 9), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    assert causal_lm.perplexity(model, batches, "cpu")["perplexity"] == pytest.approx(7.0)
    out = causal_lm.sliding_perplexity(model, ids.flatten(), window=5, stride=3, device="cpu")
    assert out["perplexity"] == pytest.approx(7.0) and out["tokens"] == ids.numel() - 1


def test_perplexity_of_known_logits_matches_reference_and_skips_padding():
    table = torch.randn(11, 11, generator=torch.Generator().manual_seed(1)) * 3
    model = BigramLM(table)
    seqs = [[1, 4, 2, 9, 9, 3], [5, 0, 7]]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    out = causal_lm.perplexity(model, [{"input_ids": ids, "attention_mask": mask}], "cpu")
    nll = sum(math.log(ref_bigram_ppl(table, s)) * (len(s) - 1) for s in seqs)
    assert out["tokens"] == 7
    assert out["perplexity"] == pytest.approx(math.exp(nll / 7), rel=1e-5)


@pytest.mark.parametrize("window,stride,batch", [(2, 1, 1), (4, 3, 2), (5, 2, 3), (8, 3, 4), (40, 7, 1)])
def test_sliding_perplexity_scores_every_token_once(window, stride, batch):
    # A bigram model's per-token NLL does not depend on context, so any windowing that scores every
    # token exactly once gives the whole stream's perplexity.
    table = torch.randn(13, 13, generator=torch.Generator().manual_seed(2)) * 2
    ids = torch.randint(0, 13, (23,), generator=torch.Generator().manual_seed(3))
    out = causal_lm.sliding_perplexity(BigramLM(table), ids, window, stride, "cpu", batch_size=batch)
    assert out["tokens"] == 22
    assert out["perplexity"] == pytest.approx(ref_bigram_ppl(table, ids.tolist()), rel=1e-5)


@pytest.mark.parametrize("total,window,stride", [(2, 2, 1), (10, 3, 1), (10, 4, 3), (17, 6, 5), (9, 20, 10)])
def test_window_spans_cover_each_position_once_with_context(total, window, stride):
    spans = causal_lm.window_spans(total, window, stride)
    scored = [p for begin, end, first in spans for p in range(first, end)]
    assert sorted(scored) == list(range(1, total))
    for i, (begin, end, first) in enumerate(spans):
        assert end - begin <= window and begin < first
        if i > 0:  # every later window gives its scored tokens at least window - stride tokens of context
            assert first - begin >= min(window - stride, first)


def test_sliding_equals_full_window_when_the_window_covers_the_text(tiny_models):
    model, _, _ = load_model(tiny_models["gpt2"], "MODEL")
    ids = torch.randint(4, 300, (37,), generator=torch.Generator().manual_seed(4))
    whole = [{"input_ids": ids[None], "attention_mask": torch.ones(1, 37, dtype=torch.long)}]
    full = causal_lm.perplexity(model, whole, "cpu")
    sliding = causal_lm.sliding_perplexity(model, ids, window=64, stride=32, device="cpu")
    assert sliding["tokens"] == full["tokens"] == 36
    assert sliding["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    # With short windows the context is cut, so a real model's number moves (the test can fail).
    short = causal_lm.sliding_perplexity(model, ids, window=4, stride=3, device="cpu")
    assert short["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)


# =========================================================================== correlations
def test_rank_average_and_spearman():
    assert encoder.rank_average(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    b = torch.tensor([2.0, 1.0, 4.0, 3.0, 6.0, 5.0])
    d2 = sum((x - y) ** 2 for x, y in zip([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]))
    assert encoder.spearman(a, b) == pytest.approx(1 - 6 * d2 / (6 * 35))
    assert encoder.spearman(a, a.exp()) == pytest.approx(1.0)
    assert encoder.spearman(a, -a) == pytest.approx(-1.0)


# =========================================================================== models against themselves
def test_model_against_itself_agrees_perfectly(tiny_models):
    model, tokenizer, task = load_model(tiny_models["bert"], "MODEL")
    same, _, _ = load_model(tiny_models["bert"], "MODEL")
    result = evaluate.evaluate_models(
        [EvalModel("copy", same, tokenizer, task, tiny_models["bert"])],
        EvalModel("teacher", model, tokenizer, task, tiny_models["bert"]),
        HeldOut(evaluate.read_documents("builtin:sentences")[:20], "test"),
        EvalOptions(seq_len=32, samples=12, batch_size=6, speed_seconds=0.05),
    )
    s = result["students"][0]
    assert s["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert s["similarity_pearson"] == pytest.approx(1.0, abs=1e-5)
    assert s["shd_kl"] == pytest.approx(0.0, abs=1e-5)
    assert s["params_ratio"] == 1.0 and s["disk_ratio"] == 1.0
    assert any("no sentence-similarity set" in n for n in result["notes"])


def test_teacher_memo_scores_the_teacher_once_with_the_same_numbers(tiny_models, monkeypatch):
    """shd distill evaluates at init and at the end: the second call reuses the teacher's perplexity."""
    teacher, tokenizer, task = load_model(tiny_models["llama"], "MODEL")
    student, _, _ = load_model(tiny_models["llama"], "MODEL")
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # a different student: its numbers differ
    scored = []
    kind = registry.get(task)
    real = type(kind).quality
    monkeypatch.setattr(type(kind), "quality", lambda self, model, *a: scored.append(model) or real(self, model, *a))
    memo: dict = {}
    args = (HeldOut(evaluate.read_documents("builtin:sentences")[:20], "test"),
            EvalOptions(seq_len=16, samples=4, batch_size=2, speed=False, attention=False, max_tokens=200))
    first = evaluate.evaluate_models([EvalModel("s", student, tokenizer, task)],
                                     EvalModel("t", teacher, tokenizer, task), *args, teacher_memo=memo)
    second = evaluate.evaluate_models([EvalModel("s", student, tokenizer, task)],
                                      EvalModel("t", teacher, tokenizer, task), *args, teacher_memo=memo)
    assert [m is teacher for m in scored] == [True, False, False]  # teacher once, the student each time
    assert first["teacher"] == second["teacher"] and first["students"] == second["students"]
    assert first["teacher"]["perplexity"] != first["students"][0]["perplexity"]
    fresh = evaluate.evaluate_models([EvalModel("s", student, tokenizer, task)],
                                     EvalModel("t", teacher, tokenizer, task), *args)
    assert fresh["teacher"] == first["teacher"]


def test_attention_fidelity_is_zero_for_itself_and_positive_for_another_model(tiny_models, tmp_path):
    teacher, tokenizer, _ = load_model(tiny_models["llama"], "MODEL")
    same, _, _ = load_model(tiny_models["llama"], "MODEL")
    other, _, _ = load_model(make_tiny("llama", tmp_path / "other", layers=2, heads=3, kv_heads=1, seed=5), "MODEL")
    from shdcli.models.families import model_shape
    from shdcli.models.mapping import make_plan

    ids = torch.randint(4, 300, (4, 20), generator=torch.Generator().manual_seed(6))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    t_shape = model_shape(teacher.config)
    plan = make_plan(t_shape, model_shape(same.config), "auto", "balanced")
    assert evaluate.attention_fidelity(same, teacher, plan, batches, "cpu") == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # random init attends almost uniformly, like the teacher: sharpen the other model
        for block in other.model.layers:
            block.self_attn.q_proj.weight.mul_(10.0)
    plan = make_plan(t_shape, model_shape(other.config), "auto", "balanced")
    assert evaluate.attention_fidelity(other, teacher, plan, batches, "cpu") > 1e-2


# =========================================================================== the command
@pytest.fixture(scope="module")
def students(tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("students")
    return {
        "llama_small": make_tiny("llama", base / "llama_small", layers=2, heads=3, kv_heads=1, seed=1),
        "llama_tiny": make_tiny("llama", base / "llama_tiny", layers=1, heads=2, kv_heads=1, hidden=32, seed=2),
        "bert_small": make_tiny("bert", base / "bert_small", layers=2, heads=3, seed=3),
    }


def test_eval_table_shows_the_json_numbers(tiny_models, students, tmp_path, monkeypatch, capsys):
    from shdcli import cli

    monkeypatch.setattr(cli, "console", Console(width=400))  # no wrapping: one table line per row
    out = tmp_path / "eval.json"
    code, stdout, err = run_main(
        monkeypatch, capsys, "eval", str(students["llama_small"]), "--compare", str(students["llama_tiny"]),
        "--teacher", str(tiny_models["llama"]), "--seq-len", "16", "--samples", "8", "--max-tokens", "200",
        "--out", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["students"]] == [str(students["llama_small"]), str(students["llama_tiny"])]
    for entry in result["students"]:
        for key in ("perplexity", "shd_kl", "params", "disk_bytes", "latency_ms_b1", "tokens_per_s_b8", "speedup_b8"):
            assert entry[key] is not None and entry[key] > 0, key
        assert entry["params_ratio"] < 1.0
        assert entry["ppl_tokens"] == 199
    assert result["teacher"]["perplexity"] > 0
    headers, rows = evaluate.table_cells(result)
    assert len(headers) == 4
    by_label = {r[0]: r[1:] for r in rows}
    assert by_label["perplexity (sliding window)"][1] == f"{result['students'][0]['perplexity']:.3f}"
    assert by_label["speed-up batch 8"][2] == f"{result['students'][1]['speedup_b8']:.3f}x"
    assert by_label["attention KL to teacher (SHD)"][0] == "-"  # the teacher has no KL to itself
    # The table the command printed holds exactly the numbers of the JSON it wrote in the same run.
    printed = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]
    assert printed == rows


def test_eval_encoder_with_similarity_file_and_json(tiny_models, students, tmp_path, monkeypatch, capsys):
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\nA cat sat.\tA cat sat down.\t4.5\nThe dog ran.\tTaxes rose.\t0.2\n"
                   "Rain fell.\tIt rained.\t4.0\nShe sang.\tThe bus left.\t1.0\n")
    code, stdout, err = run_main(
        monkeypatch, capsys, "eval", str(students["bert_small"]), "--teacher", str(tiny_models["bert"]),
        "--similarity", str(sts), "--no-speed", "--samples", "8", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    s, t = result["students"][0], result["teacher"]
    assert -1.0 <= s["sts_spearman"] <= 1.0 and -1.0 <= t["sts_spearman"] <= 1.0
    assert -1.0 <= s["embedding_cosine"] <= 1.0  # same width (48): the cosine to the teacher is defined
    assert "latency_ms_b1" not in s


def test_eval_errors_are_one_line(tiny_models, students, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "eval", "/nonexistent/student")
    assert code == 2 and "does not exist" in err
    code, _, err = run_main(monkeypatch, capsys, "eval", str(students["bert_small"]), "--teacher",
                            str(tiny_models["gpt2"]), "--no-speed")
    assert code == 2 and "cannot be compared" in err
    code, _, err = run_main(monkeypatch, capsys, "eval", str(students["llama_small"]), "--stride", "999")
    assert code == 2 and "--stride" in err


def test_distill_final_eval_and_eval_of_its_student(tiny_models, tiny_text, tmp_path):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "run"
    recipe.write_text(
        f"teacher: {tiny_models['llama']}\nstudent:\n  from_teacher:\n    layers: 2\n    heads: 3\n"
        f"data:\n  path: {tiny_text}\n  seq_len: 32\n  batch_size: 4\n  val_batches: 2\n"
        f"train:\n  max_steps: 2\n  eval_every: 2\n  threads: 1\noutput_dir: {out}\n")
    proc = run_cli("distill", str(recipe))
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "metrics.json").read_text())["final_eval"]
    for key in ("perplexity", "teacher_perplexity", "shd_kl", "params_ratio", "speedup_b1", "speedup_b8",
                "teacher_val_perplexity", "val_perplexity"):
        assert key in final, key
    assert "shd_kl" in (out / "report.md").read_text()
    # `shd eval` finds the teacher (metrics.json), the plan (shd_plan.json) and the validation split.
    proc = run_cli("eval", str(out / "student"), "--json", "--no-speed", "--threads", "1", "--seq-len", "32",
                   "--samples", "8", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    s = result["students"][0]
    assert s["attention_plan"].endswith("shd_plan.json")
    assert result["data"]["source"].startswith("validation split of")
    assert any("taken from" in n for n in result["notes"])
    # Same held-out text, model and plan as the run's final evaluation: the same numbers.
    assert s["perplexity"] == pytest.approx(final["perplexity"], rel=1e-4)
    assert s["shd_kl"] == pytest.approx(final["shd_kl"], rel=1e-4)


def test_shd_eval_repeats_the_final_evaluation_of_a_run(tiny_models, tiny_text, tmp_path):
    """One number for one student: `shd eval STUDENT` with no options scores the run's validation rows the
    way the run's final evaluation did, so the two figures agree."""
    from rich.console import Console

    from shdcli.evaluate import EvalOptions, run_eval
    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    data = {"teacher": str(tiny_models["bert"]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 24, "batch_size": 3, "val_batches": 2},
            "train": {"max_steps": 2, "eval_every": 2, "device": "cpu"}, "output_dir": str(tmp_path / "run")}
    final = run_distillation(validate_recipe(data), Console(quiet=True))["final_eval"]
    result = run_eval([str(tmp_path / "run" / "student")], None, None,
                      EvalOptions(seq_len=None, samples=None, batch_size=None, max_tokens=None, speed=False))
    student = result["students"][0]
    for key in ("similarity_pearson", "similarity_spearman"):
        assert student[key] == pytest.approx(final[key], abs=1e-6), key
    assert result["data"]["sequences"] == 6 and result["data"]["seq_len"] == 24  # batch_size x val_batches rows


@pytest.mark.parametrize("task", ["image-classification", "diffusion"])
def test_tasks_without_text_refuse_held_out_text_naming_the_field(task):
    kind = registry.get(task)
    with pytest.raises(ShdError, match=r"^--data: .* is scored on .*, not held-out text$"):
        kind.heldout({"path": "builtin:tweets"}, 0, None, whole=True, field="--data")
    with pytest.raises(ShdError, match=r"^STUDENT: .*, not held-out text$"):
        kind.quality(torch.nn.Linear(1, 1), None, None, None, [], "STUDENT")
