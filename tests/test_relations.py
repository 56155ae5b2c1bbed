"""MiniLMv2 relation distillation (shdcli/attention/relations.py) against a slow reference that loops over
relation heads and query rows, plus the recipe path (distill.target: relations)."""

from __future__ import annotations

import math

import pytest
import torch

from shdcli.attention.capture import LayerRecord
from shdcli.attention.relations import relation_loss
from shdcli.errors import ShdError


def reference(t: LayerRecord, s: LayerRecord, key_ok: torch.Tensor, causal: bool, rows: torch.Tensor,
              heads: int) -> torch.Tensor:
    """Per relation (Q, K, V), per sample, per relation head, per valid row: KL of two softmaxes over the
    row's usable keys; / (heads * rows of the sample), mean over samples with rows, mean over relations."""
    bsz, _, n, _ = s.query.shape
    total = 0.0
    for xt4, xs4 in ((t.query, s.query), (t.key, s.key), (t.value, s.value)):
        xt = torch.cat([xt4[:, h] for h in range(xt4.shape[1])], dim=-1)  # [B, N, H d]
        xs = torch.cat([xs4[:, h] for h in range(xs4.shape[1])], dim=-1)
        dt, ds = xt.shape[-1] // heads, xs.shape[-1] // heads
        per_sample = []
        for b in range(bsz):
            valid = [i for i in range(n) if rows[b, i]]
            if not valid:
                continue
            acc = 0.0
            for a in range(heads):
                ta, sa = xt[b, :, a * dt:(a + 1) * dt].double(), xs[b, :, a * ds:(a + 1) * ds].double()
                for i in valid:
                    keys = [j for j in range(n) if key_ok[b, j] and (j <= i or not causal)]
                    lt = torch.log_softmax(torch.stack([ta[i] @ ta[j] for j in keys]) / math.sqrt(dt), dim=0)
                    ls = torch.log_softmax(torch.stack([sa[i] @ sa[j] for j in keys]) / math.sqrt(ds), dim=0)
                    acc = acc + (lt.exp() * (lt - ls)).sum()
            per_sample.append(acc / (heads * len(valid)))
        total = total + sum(per_sample) / len(per_sample) / 3
    return total


def records(causal: bool, padded: bool, seed: int = 0):
    """Teacher 6 heads (2 KV heads), student 3 heads (1 KV head), head dim 4, N = 7, B = 3."""
    g = torch.Generator().manual_seed(seed)
    bsz, n, d = 3, 7, 4

    def rnd(*shape, grad=False):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5).requires_grad_(grad)

    key_ok = torch.ones(bsz, n, dtype=torch.bool)
    if padded:
        key_ok[1, 5:] = False  # right padding
        key_ok[2, :2] = False  # left padding
    rows = key_ok.clone()
    allowed = None
    if padded:
        allowed = key_ok[:, None, None, :].expand(bsz, 1, n, n)
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    t = LayerRecord(rnd(bsz, 6, n, d), rnd(bsz, 2, n, d), rnd(bsz, 2, n, d), allowed, causal and not padded, 0.5)
    s = LayerRecord(rnd(bsz, 3, n, d, grad=True), rnd(bsz, 1, n, d, grad=True), rnd(bsz, 1, n, d, grad=True),
                    allowed, causal and not padded, 0.5)
    return t, s, key_ok, rows


@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("heads,chunk", [(4, 3), (2, 0), (1, 2)])
def test_relation_loss_and_gradient_match_the_loop(causal, padded, heads, chunk):
    t, s, key_ok, rows = records(causal, padded)
    fast = relation_loss({0: t}, {0: s}, [(0, 0)], rows if padded else None, heads, chunk)
    grads = torch.autograd.grad(fast, [s.query, s.key, s.value])
    ref = reference(t, s, key_ok, causal, rows, heads)
    ref_grads = torch.autograd.grad(ref, [s.query, s.key, s.value])
    assert float(fast.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-9)
    assert float(fast.detach()) > 0
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-8)


def test_identical_relations_give_zero_and_pairs_average():
    t, s, _, rows = records(True, True)
    same = LayerRecord(t.query, t.key, t.value, t.allowed, t.causal, t.scaling)
    assert float(relation_loss({0: t}, {0: same}, [(0, 0)], rows, 2)) == pytest.approx(0.0, abs=1e-9)
    one = relation_loss({0: t}, {0: s}, [(0, 0)], rows, 2).detach()
    both = relation_loss({0: t, 1: t}, {0: s, 1: same}, [(0, 0), (1, 1)], rows, 2).detach()
    assert float(both) == pytest.approx(float(one) / 2, rel=1e-9)


def test_relation_heads_must_divide_every_width():
    t, s, _, rows = records(False, False)
    with pytest.raises(ShdError, match=r"distill.relation_heads: 3 does not divide the teacher key/value width 8"):
        relation_loss({0: t}, {0: s}, [(0, 0)], None, 3)
    # 0 picks gcd(6, 2, 3, 1) = 1
    torch.testing.assert_close(relation_loss({0: t}, {0: s}, [(0, 0)], None, 0),
                               relation_loss({0: t}, {0: s}, [(0, 0)], None, 1))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_distill_step_with_relations_target_trains_qkv(kind, tiny_models, tiny_text):
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import prepare, step_losses

    data = {"teacher": str(tiny_models[kind]), "student": {"from_teacher": {"layers": 2, "heads": 3}},
            "data": {"path": str(tiny_text), "seq_len": 32, "batch_size": 4, "val_batches": 1},
            "distill": {"target": "relations", "relation_heads": 0, "layers": {"last": 1}, "balance": "none"},
            "train": {"max_steps": 2, "device": "cpu"}}
    setup = prepare(validate_recipe(data), Console(quiet=True))
    total, parts, _ = step_losses(setup, dict(setup.val_batches[0]))
    assert math.isfinite(float(parts["shd"])) and float(parts["shd"]) > 0
    total.backward()
    named = dict(setup.student.named_parameters())
    v_proj = [n for n in named if n.endswith(("v_proj.weight", "value.weight")) and ".1." in n]
    assert v_proj and named[v_proj[0]].grad.abs().sum() > 0  # V-V relations reach the value projection
    data["distill"]["relation_heads"] = 5
    setup = prepare(validate_recipe(data), Console(quiet=True))
    with pytest.raises(ShdError, match="distill.relation_heads: 5 does not divide"):
        step_losses(setup, dict(setup.val_batches[0]))
