"""Fused LM head + CE + logit KD (shdcli/attention/fused_logits.py) against a slow reference on full logits.

The reference below is written here with plain F.log_softmax on whole [B, N, V] logits and autograd,
sharing no code with the fused path (nor with losses.py's naive path, which the end-to-end test uses).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shdcli.attention.fused_logits import FusedSpec, Head, bypass_heads, final_hidden, fused_lm_losses, next_token_nll
from shdcli.errors import ShdError
from tests.helpers import TEST_DEVICE
from tests.test_distributed import no_dropout_gpt2  # noqa: F401, F811 - fixture


def reference(hidden, weight, bias, cap, input_ids, mask, t_logits, kind, beta, temp, a, b):
    """a * CE + b * KD on full float32 logits; returns (ce, kd, total)."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    vocab = logits.shape[-1]
    # CE: row i predicts token i + 1 where that token is real.
    ce_terms, ce_count = [], 0
    for row in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1] - 1):
            if mask[row, i + 1]:
                ce_terms.append(-F.log_softmax(logits[row, i], dim=-1)[input_ids[row, i + 1]])
                ce_count += 1
    ce = torch.stack(ce_terms).sum() / ce_count
    if t_logits is None:
        return ce, None, a * ce
    kd_terms = []
    for row in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1]):
            if not mask[row, i]:
                continue
            log_p = F.log_softmax(logits[row, i] / temp, dim=-1)
            log_q = F.log_softmax(t_logits[row, i].float() / temp, dim=-1)
            p, q = log_p.exp(), log_q.exp()
            if kind == "kl" or (kind == "jsd" and beta == 0.0):
                d = (q * (log_q - log_p)).sum()
            elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
                d = (p * (log_p - log_q)).sum()
            else:
                m = beta * q + (1 - beta) * p
                d = beta * (q * (log_q - m.log())).sum() + (1 - beta) * (p * (log_p - m.log())).sum()
            kd_terms.append(d)
    assert vocab == t_logits.shape[-1]
    kd = temp * temp * torch.stack(kd_terms).sum() / len(kd_terms)
    return ce, kd, a * ce + b * kd


def _case(seed, bsz=2, n=7, dim=12, vocab=37, t_dim=10, bias=False, pad=True):
    g = torch.Generator().manual_seed(seed)
    dev = TEST_DEVICE  # drawn on the CPU generator, moved before requires_grad (leaves on the device)
    hidden = torch.randn(bsz, n, dim, generator=g, dtype=torch.float64).float().to(dev).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=g) * 0.7).to(dev).requires_grad_(True)
    b = (torch.randn(vocab, generator=g) * 0.3).to(dev).requires_grad_(True) if bias else None
    t_hidden = torch.randn(bsz, n, t_dim, generator=g).to(dev)
    t_weight = torch.randn(vocab, t_dim, generator=g).to(dev)
    ids = torch.randint(0, vocab, (bsz, n), generator=g).to(dev)
    mask = torch.ones(bsz, n, dtype=torch.long)
    if pad:
        mask[0, n - 3:] = 0  # right padding
        if bsz > 1:
            mask[1, :2] = 0  # left padding
    return hidden, weight, b, t_hidden, t_weight, ids, mask.to(dev)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("chunk", [3, 5, 100])
def test_losses_and_grads_equal_reference(kind, beta, chunk):
    hidden, weight, _, t_hidden, t_weight, ids, mask = _case(1)
    temp, a, b = 2.0, 0.7, 1.3
    spec = FusedSpec(kind=kind, beta=beta, temperature=temp, task_weight=a, logit_weight=b, chunk_tokens=chunk)
    ce, kd = fused_lm_losses(hidden, Head(weight, None, None), ids, mask, t_hidden, Head(t_weight, None, None), spec)
    ref_ce, ref_kd, ref_total = reference(hidden, weight, None, None, ids, mask, t_hidden @ t_weight.t(), kind, beta,
                                          temp, a, b)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-6)
    got = _grads(a * ce + b * kd, [hidden, weight])
    want = _grads(ref_total, [hidden, weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_bias_softcap_temperature_one_and_ce_alone():
    hidden, weight, bias, t_hidden, t_weight, ids, mask = _case(2, bias=True)
    t_bias = torch.randn(weight.shape[0]).to(TEST_DEVICE)
    spec = FusedSpec(kind="kl", temperature=1.0, task_weight=1.0, logit_weight=0.5, chunk_tokens=4)
    ce, kd = fused_lm_losses(hidden, Head(weight, bias, 3.0), ids, mask, t_hidden, Head(t_weight, t_bias, 3.0), spec)
    t_logits = 3.0 * torch.tanh((t_hidden @ t_weight.t() + t_bias) / 3.0)
    ref_ce, ref_kd, ref_total = reference(hidden, weight, bias, 3.0, ids, mask, t_logits, "kl", 0.5, 1.0, 1.0, 0.5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(ce + 0.5 * kd, [hidden, weight, bias]), _grads(ref_total, [hidden, weight, bias])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # CE alone (no teacher): the gradient of CE only.
    ce2, kd2 = fused_lm_losses(hidden, Head(weight, bias, None), ids, mask, None, None,
                               FusedSpec(task_weight=1.0, chunk_tokens=5))
    assert kd2 is None
    ref_ce2, _, _ = reference(hidden, weight, bias, None, ids, mask, None, "kl", 0.5, 1.0, 1.0, 0.0)
    torch.testing.assert_close(ce2, ref_ce2, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(ce2, [hidden, weight, bias]), _grads(ref_ce2, [hidden, weight, bias])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_tied_head_gradient_reaches_the_shared_embedding():
    """Embedding lookup and head share one weight: autograd adds both gradients on the leaf."""
    g = torch.Generator().manual_seed(3)
    vocab, dim = 29, 8
    emb = torch.randn(vocab, dim, generator=g).requires_grad_(True)
    mix = torch.randn(dim, dim, generator=g)
    ids = torch.randint(0, vocab, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    t_logits = torch.randn(2, 6, vocab, generator=g)

    def hidden_of(w):
        return torch.tanh(w[ids] @ mix)

    spec = FusedSpec(kind="reverse_kl", temperature=1.5, task_weight=1.0, logit_weight=2.0, chunk_tokens=5)
    # the teacher's "hidden states" are its logits and its head the identity: q = softmax(t_logits / T)
    ce, kd = fused_lm_losses(hidden_of(emb), Head(emb, None, None), ids, mask, t_logits,
                             Head(torch.eye(vocab), None, None), spec)
    (got,) = torch.autograd.grad(ce + 2.0 * kd, [emb])
    _, _, ref_total = reference(hidden_of(emb), emb, None, None, ids, mask, t_logits, "reverse_kl", 0.5, 1.5, 1.0, 2.0)
    (want,) = torch.autograd.grad(ref_total, [emb])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_backward_of_one_part_alone_is_refused():
    hidden, weight, _, t_hidden, t_weight, ids, mask = _case(4)
    spec = FusedSpec(task_weight=1.0, logit_weight=1.0, chunk_tokens=4)
    ce, kd = fused_lm_losses(hidden, Head(weight, None, None), ids, mask, t_hidden, Head(t_weight, None, None), spec)
    with pytest.raises(RuntimeError, match="another mix"):
        torch.autograd.grad(ce, [hidden])


def test_bf16_autocast_matches_float32():
    hidden, weight, _, t_hidden, t_weight, ids, mask = _case(5, pad=False)
    spec = FusedSpec(kind="jsd", beta=0.5, temperature=2.0, chunk_tokens=6)
    ref = fused_lm_losses(hidden, Head(weight, None, None), ids, mask, t_hidden, Head(t_weight, None, None), spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_lm_losses(hidden.bfloat16(), Head(weight, None, None), ids, mask, t_hidden.bfloat16(),
                              Head(t_weight.bfloat16(), None, None), spec)
    assert got[0].dtype == torch.float32
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------- real models
def _tiny_llama(tie: bool, vocab: int = 61, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=24, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [True, False])
def test_bypassed_forward_gives_the_heads_input_and_the_same_losses(tie):
    model = _tiny_llama(tie)
    teacher = _tiny_llama(False, seed=1).eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    full = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    with bypass_heads(model):
        out = model(input_ids=ids, attention_mask=mask)
    with torch.inference_mode(), bypass_heads(teacher):
        t_out = teacher(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 0, 61)
    hidden, head = final_hidden(model, out)
    t_hidden, t_head = final_hidden(teacher, t_out)
    assert (head.weight is model.model.embed_tokens.weight) == tie
    torch.testing.assert_close(hidden @ head.weight.t(), full, rtol=1e-5, atol=1e-5)
    spec = FusedSpec(kind="kl", temperature=2.0, task_weight=1.0, logit_weight=1.0, chunk_tokens=4)
    ce, kd = fused_lm_losses(hidden, head, ids, mask, t_hidden, t_head, spec)
    ref_ce, ref_kd, ref_total = reference(hidden, head.weight, None, None, ids, mask, t_logits, "kl", 0.5, 2.0, 1, 1)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters()]
    for g, w in zip(torch.autograd.grad(ce + kd, params, retain_graph=True), torch.autograd.grad(ref_total, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # outside the block the model is unchanged
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, full)


def test_next_token_nll_equals_full_logits():
    model = _tiny_llama(True).eval()
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    nll, count = next_token_nll(model, ids, mask, labels, budget_bytes=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert count == int((labels[:, 1:] != -100).sum())
    assert nll == pytest.approx(float(ref), rel=1e-5)


def test_forward_in_row_chunks_runs_the_model_and_keeps_no_logits():
    from shdcli.attention.fused_logits import forward_in_row_chunks

    model = _tiny_llama(False).eval()
    ids = torch.randint(0, 61, (2, 10))
    out = forward_in_row_chunks(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, budget_bytes=1)
    assert out.logits.shape == (2, 0, 61) and out.hidden_states[-1].shape == (2, 10, 16)


def test_rescaled_logits_are_refused():
    model = _tiny_llama(True)
    model.config.logit_scale = 0.5
    with pytest.raises(ShdError, match="logit_impl=naive"), bypass_heads(model):
        pass


# --------------------------------------------------------------------------- end to end
def test_distill_fused_and_naive_give_the_same_losses(tmp_path, monkeypatch):
    """Three training steps of a tiny distillation with logit KD + SHD + padding-free packed data:
    distill.logit_impl fused and naive give the same loss parts, gradient norms and validation."""
    from rich.console import Console

    from shdcli.attention import fused_logits
    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation
    from tests.tiny import make_tiny, write_text

    calls = []
    real = fused_logits.fused_lm_losses
    monkeypatch.setattr(fused_logits, "fused_lm_losses", lambda *a, **k: calls.append(1) or real(*a, **k))

    teacher = make_tiny("llama", tmp_path / "llama")
    text = write_text(tmp_path / "train.txt")
    runs = {}
    for impl in ("naive", "fused"):
        recipe = validate_recipe({
            "teacher": str(teacher),
            # init random: a teacher-initialised student's SHD is ~6e-6, a difference of near-equal sums that
            # float reordering (fused vs naive) moves by 1e-4 relative; from random init it is O(1).
            "student": {"from_teacher": {"layers": 2, "heads": 3, "init": "random"}},
            "data": {"path": str(text), "seq_len": 24, "batch_size": 3, "val_batches": 1},
            "distill": {"logit_impl": impl, "logit_loss": "jsd", "jsd_beta": 0.4, "logit_temperature": 1.5},
            "train": {"max_steps": 3, "eval_every": 3, "device": "cpu", "warmup_steps": 1, "lr": 1e-3, "threads": 1},
            "output_dir": str(tmp_path / impl),
        })
        runs[impl] = run_distillation(recipe, Console(quiet=True))
        assert bool(calls) == (impl == "fused")  # 3 steps + 2 validations
    for a, b in zip(runs["naive"]["history"], runs["fused"]["history"]):
        for key in ("total", "task", "logit", "shd", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    for a, b in zip(runs["naive"]["validation"], runs["fused"]["validation"]):
        for key in ("val_total", "val_task", "val_logit", "val_perplexity"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert math.isfinite(runs["fused"]["final_eval"]["perplexity"])


def test_fsdp_two_ranks_fused_match_one_process_naive(tmp_path, no_dropout_gpt2):  # noqa: F811
    """FSDP2 (2 gloo ranks, tied GPT-2 head, grad_accum 2) with the fused logit loss reproduces one process
    with full logits: the head's gradient reaches the sharded, tied embedding through the wrapped forward."""
    import json

    import yaml

    from tests.test_distributed import _assert_same_run, _recipe, _single, _torchrun
    from tests.tiny import write_text

    text = write_text(tmp_path / "train.txt")
    one_path = _recipe(tmp_path, no_dropout_gpt2, text, "one", 4, grad_accum=2)
    two_path = _recipe(tmp_path, no_dropout_gpt2, text, "two", 2, grad_accum=2, strategy="fsdp")
    for path, impl in ((one_path, "naive"), (two_path, "fused")):
        data = yaml.safe_load(path.read_text())
        data["distill"] = {"logit_impl": impl, "logit_loss": "reverse_kl"}
        path.write_text(yaml.safe_dump(data))
    one = _single(one_path)
    proc = _torchrun(two_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["recipe"]["distill"]["logit_impl"] == "fused" and one["recipe"]["distill"]["logit_impl"] == "naive"
    _assert_same_run(one, two)


def test_one_memory_knob_sizes_the_shd_and_the_logit_chunks(monkeypatch):
    from shdcli.attention import fused_logits, losses
    from shdcli.train import step_losses
    from tests.test_perf_quick import load_perf

    perf = load_perf()
    setup = perf.build(perf.QUICK, 24, torch.device("cpu"))
    setup.recipe.distill.chunk_memory_mb = 7
    seen = {}
    real_lean, real_fused = losses.lean_layer_loss, fused_logits.fused_lm_losses
    monkeypatch.setattr(losses, "lean_layer_loss",
                        lambda *a, **k: seen.setdefault("lean", a[-1]) and real_lean(*a, **k))
    monkeypatch.setattr(fused_logits, "fused_lm_losses",
                        lambda *a, **k: seen.setdefault("fused", a[-1].budget_bytes) and real_fused(*a, **k))
    batch = perf.make_batch(perf.QUICK, 2, 24, torch.device("cpu"))
    total, parts, _ = step_losses(setup, batch)
    assert set(parts) == {"task", "logit", "shd"} and torch.isfinite(total)
    assert seen == {"lean": 7 * 2**20, "fused": 7 * 2**20}


def test_teacher_memo_keeps_bypassed_and_full_forwards_apart():
    from tests.test_perf_quick import load_perf

    perf = load_perf()
    setup = perf.build(perf.QUICK, 12, torch.device("cpu"))
    setup.teacher_memo = {}
    batch = perf.make_batch(perf.QUICK, 2, 12, torch.device("cpu"))
    with bypass_heads(setup.teacher):
        hidden_out, _ = setup.teacher_forward(batch)
    full_out, _ = setup.teacher_forward(batch)
    assert hidden_out.logits.shape[1] == 0 and full_out.logits.shape == (2, 12, perf.QUICK.vocab)
    assert len(setup.teacher_memo) == 2
