"""distill.impl lean vs naive: the same SHD loss, squeeze weights and student gradients (fp32, rtol 1e-4).

The naive path (losses._naive_layer_loss: whole maps, autograd) is the reference; the lean path
(shdcli/attention/lean.py: row chunks, key prefixes, GQA views, fused student loss) must agree with it on
every mask layout, head layout, chunk size, loss kind and alpha mode. Records are synthetic q/k/v
with the layouts transformers produces ([B, N, H, d] transposed to [B, H, N, d]).
"""

from __future__ import annotations

import pytest
import torch

from shdcli.attention import lean
from shdcli.attention.capture import LayerRecord
from shdcli.attention.losses import shd_loss
from shdcli.attention.shd import group_feature_bases, group_heads
from tests.helpers import TEST_DEVICE

RTOL = 1e-4


def make_allowed(b: int, n: int, causal: bool, pad: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(allowed [B, 1, N, N] or None, row_mask [B, N] or None) for a padding layout."""
    if pad == "none":
        return None, None
    real = torch.ones(b, n, dtype=torch.bool)
    if pad == "right":
        real[0, n * 2 // 3:] = False
    elif pad == "left":  # causal + left padding: the first rows of sample 1 see no key at all
        real[-1, : n // 3] = False
    else:
        raise ValueError(pad)
    base = torch.tril(torch.ones(n, n, dtype=torch.bool)) if causal else torch.ones(n, n, dtype=torch.bool)
    return (base[None] & real[:, None, :])[:, None].to(TEST_DEVICE), real.to(TEST_DEVICE)


def make_record(b: int, heads: int, kv: int, n: int, d: int, allowed, causal: bool, grad: bool, seed: int,
                values: bool = True, dtype=torch.float32) -> LayerRecord:
    g = torch.Generator().manual_seed(seed)

    def rand(h):  # transformers' layout: projections [B, N, H, d] viewed as [B, H, N, d]
        return (1.5 * torch.randn(b, n, h, d, generator=g)).transpose(1, 2).to(TEST_DEVICE, dtype)

    q, k, v = rand(heads), rand(kv), rand(kv)
    if grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
    return LayerRecord(q, k, v if values else None, allowed, causal and allowed is None, d**-0.5)


def run(impl, t_recs, s_recs, pairs, groups, bases, row_mask, alpha="lsq", kind="kl", tau=1.0, chunk=0):
    for rec in s_recs.values():
        rec.query.grad = None
        rec.key.grad = None
    res = shd_loss(t_recs, s_recs, pairs, groups, bases, row_mask, alpha, kind, tau, impl, chunk)
    res.loss.backward()
    grads = [g for rec in s_recs.values() for g in (rec.query.grad.clone(), rec.key.grad.clone())]
    return res.loss.detach(), grads, res.weights


def assert_same(a, b, where: str) -> None:
    loss_a, grads_a, w_a = a
    loss_b, grads_b, w_b = b
    assert torch.isfinite(loss_b), where
    torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0.0, msg=lambda m: f"loss {where}: {m}")
    for ga, gb in zip(grads_a, grads_b):
        assert torch.isfinite(gb).all(), where
        torch.testing.assert_close(ga, gb, rtol=RTOL, atol=1e-5 * float(gb.abs().max()),
                                   msg=lambda m: f"grad {where}: {m}")
    for layer in w_b:
        for wa, wb in zip(w_a[layer], w_b[layer]):
            torch.testing.assert_close(wa, wb, rtol=RTOL, atol=1e-5, msg=lambda m: f"weights {where}: {m}")


def case(ht, t_kv, hs, s_kv, n=23, b=2, d=8, causal=True, pad="none", grouping="balanced", with_bases=True,
         layers=1, seed=0):
    allowed, row_mask = make_allowed(b, n, causal, pad)
    t_recs, s_recs, pairs, bases = {}, {}, [], {}
    for i in range(layers):
        t_recs[i] = make_record(b, ht, t_kv, n, d, allowed, causal, False, seed + 10 * i)
        s_recs[i] = make_record(b, hs, s_kv, n, d, allowed, causal, True, seed + 10 * i + 5, values=False)
        pairs.append((i, i))
    groups = [group_heads(ht, hs, grouping) for _ in pairs]
    for (_, t), g in zip(pairs, groups):
        w_out = torch.randn(ht * d, 3 * d, generator=torch.Generator().manual_seed(seed + 99)).to(TEST_DEVICE)
        bases[t] = group_feature_bases(w_out, g, d) if with_bases else None
    return t_recs, s_recs, pairs, groups, bases, row_mask


HEADS = [
    # (Ht, teacher kv, Hs, student kv): which squeeze path the lean code takes
    (8, 4, 4, 2),  # GQA, every group inside one value head: the batched (uniform) statistics
    (8, 2, 4, 1),  # GQA, r = 4, student MQA
    (6, 2, 3, 3),  # a group spanning two value heads: per-group statistics with u = 2
    (6, 6, 3, 3),  # MHA teacher
    (5, 5, 2, 1),  # unequal groups (3, 2)
    (5, 1, 3, 1),  # groups 2, 2, 1 (a singleton) under MQA
    (4, 2, 4, 2),  # identity grouping: plain attention-map KD, no statistics
]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "t{}kv{}-s{}kv{}".format(*h))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_lean_matches_naive_heads_masks_and_chunks(heads, causal, pad):
    ht, t_kv, hs, s_kv = heads
    n = 23
    args = case(ht, t_kv, hs, s_kv, n=n, causal=causal, pad=pad)
    ref = run("naive", *args)
    for chunk in (0, 4, 7, 64):  # auto, non-divisors of N, larger than N
        assert_same(run("lean", *args, chunk=chunk), ref, f"{heads} causal={causal} pad={pad} chunk={chunk}")


@pytest.mark.parametrize("heads", [(8, 4, 4, 2), (6, 2, 3, 3), (5, 1, 3, 1)], ids=str)
def test_lean_matches_naive_one_row_and_whole_map_chunks(heads):
    n = 9
    for causal, pad in [(True, "none"), (True, "left"), (False, "right")]:
        args = case(*heads, n=n, causal=causal, pad=pad, seed=5)
        ref = run("naive", *args)
        for chunk in (1, n):
            assert_same(run("lean", *args, chunk=chunk), ref, f"{heads} causal={causal} pad={pad} chunk={chunk}")


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("alpha", ["lsq", "select", "mean"])
def test_lean_matches_naive_loss_kinds_and_alpha_modes(kind, alpha):
    for heads, pad in [((8, 4, 4, 2), "right"), ((6, 2, 3, 3), "left"), ((5, 5, 2, 1), "none")]:
        args = case(*heads, n=19, pad=pad, seed=3)
        ref = run("naive", *args, alpha=alpha, kind=kind, tau=2.0)
        for chunk in (0, 5):
            assert_same(run("lean", *args, alpha=alpha, kind=kind, tau=2.0, chunk=chunk), ref,
                        f"{heads} {kind} {alpha} chunk={chunk}")


@pytest.mark.parametrize("grouping", ["balanced", "pairs"])
@pytest.mark.parametrize("with_bases", [True, False], ids=["W_O-bases", "X=V"])
def test_lean_matches_naive_groupings_bases_and_several_layers(grouping, with_bases):
    args = case(12, 4, 5, 5, n=17, grouping=grouping, with_bases=with_bases, layers=2, seed=7)
    ref = run("naive", *args)
    for chunk in (0, 3, 17):
        assert_same(run("lean", *args, chunk=chunk), ref, f"{grouping} bases={with_bases} chunk={chunk}")


def test_lean_matches_naive_with_dead_rows_counted():
    # No row mask while some rows see no key: those rows count, uniform over all keys in both paths.
    args = list(case(6, 2, 3, 1, n=15, pad="left", seed=11))
    args[5] = None
    ref = run("naive", *args)
    for chunk in (0, 2, 6):
        assert_same(run("lean", *args, chunk=chunk), ref, f"dead rows counted, chunk={chunk}")


def test_lean_matches_naive_under_no_grad_and_inference_teacher():
    allowed, row_mask = make_allowed(2, 21, True, "right")
    with torch.inference_mode():  # teacher.teacher_forward captures the teacher like this
        t_rec = make_record(2, 8, 4, 21, 8, allowed, True, False, seed=1)
    s_rec = make_record(2, 4, 2, 21, 8, allowed, True, True, seed=2, values=False)
    groups = [group_heads(8, 4)]
    bases = {0: group_feature_bases(torch.randn(64, 40).to(TEST_DEVICE), groups[0], 8)}
    ref = run("naive", {0: t_rec}, {0: s_rec}, [(0, 0)], groups, bases, row_mask)
    assert_same(run("lean", {0: t_rec}, {0: s_rec}, [(0, 0)], groups, bases, row_mask, chunk=5), ref, "inference")
    with torch.no_grad():
        for impl in ("naive", "lean"):
            res = shd_loss({0: t_rec}, {0: s_rec}, [(0, 0)], groups, bases, row_mask, impl=impl, chunk_rows=4)
            assert not res.loss.requires_grad
            torch.testing.assert_close(res.loss, ref[0], rtol=RTOL, atol=0.0)


def test_lean_accepts_bfloat16_teacher_records():
    # On CUDA the teacher runs in bf16: its q/k/v arrive in bf16 and both paths compute maps in fp32.
    t = make_record(2, 8, 4, 16, 8, None, True, False, seed=4, dtype=torch.bfloat16)
    s = make_record(2, 4, 2, 16, 8, None, True, True, seed=5, values=False)
    groups = [group_heads(8, 4)]
    args = ({0: t}, {0: s}, [(0, 0)], groups, {0: None}, None)
    assert_same(run("lean", *args, chunk=3), run("naive", *args), "bf16 teacher")


def test_lean_keeps_only_q_k_gradients_for_backward():
    # The fused Function saves dq and dk (O(N d)); the naive path's autograd keeps [B, H, N, N] maps.
    n, d = 64, 8
    args = case(8, 4, 4, 2, n=n, d=d, pad="right", layers=2, seed=9)
    saved: dict[str, int] = {}

    def measure(impl: str) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            shd_loss(*args[:5], args[5], impl=impl, chunk_rows=8)
        return total

    saved["lean"], saved["naive"] = measure("lean"), measure("naive")
    b, hs, s_kv, layers = 2, 4, 2, 2
    assert saved["lean"] <= layers * b * (hs + s_kv) * n * d * 4 + 64  # dq and dk per layer (+ scalars)
    assert saved["naive"] >= layers * b * hs * n * n * 4  # at least one [B, Hs, N, N] map per layer


def test_auto_chunk_rows_cache_sized_blocks_within_the_budget():
    budget = 8 * 2**20
    for b, ht, hs, n in [(1, 8, 4, 4096), (4, 12, 4, 512), (16, 30, 10, 128), (1, 1, 1, 5), (8, 64, 64, 8192)]:
        c = lean.auto_chunk_rows(b, ht, hs, n, n, budget)
        assert 1 <= c <= n
        assert c == 1 or b * (ht + 3 * hs) * c * n * 4 <= budget
    assert lean.auto_chunk_rows(4, 8, 4, 512, 512) == 64  # a 4 MiB block of teacher maps
    assert lean.auto_chunk_rows(1, 8, 4, 4096, 4096) == 32
    assert lean.auto_chunk_rows(1, 1, 1, 4096, 4096) == 256
    assert lean.auto_chunk_rows(4, 16, 8, 4096, 4096) == 16  # at least 16 rows while the budget allows
    assert lean.auto_chunk_rows(8, 16, 8, 4096, 4096) == 12  # ... and no more than it allows
    assert lean.auto_chunk_rows(64, 64, 64, 4096, 4096, budget_bytes=2**20) == 1
    assert lean.auto_chunk_rows(2, 2, 1, 10, 10) == 10  # short sequences: one chunk


def test_key_prefixes_follow_the_mask():
    allowed, row_mask = make_allowed(2, 9, True, "right")
    rec = make_record(2, 2, 1, 9, 4, allowed, True, False, seed=0)
    assert lean._key_needs(rec, row_mask) == list(range(1, 10))
    causal = make_record(1, 2, 1, 9, 4, None, True, False, seed=0)
    assert lean._key_needs(causal, None) == list(range(1, 10))
    bidir = make_record(1, 2, 1, 9, 4, None, False, False, seed=0)
    assert lean._key_needs(bidir, None) == [9] * 9
    # Left padding: rows 0-2 of sample 1 see nothing; sample 0 is unpadded, so its rows set the prefix.
    allowed, row_mask = make_allowed(2, 9, True, "left")
    rec = make_record(2, 2, 1, 9, 4, allowed, True, False, seed=0)
    assert lean._key_needs(rec, row_mask) == list(range(1, 10))
    assert lean._key_needs(rec, None) == [9, 9, 9, 4, 5, 6, 7, 8, 9]  # counted dead rows need every key
    only_left = (allowed[1:], row_mask[1:])
    rec = make_record(1, 2, 1, 9, 4, only_left[0], True, False, seed=0)
    assert lean._key_needs(rec, only_left[1]) == [0, 0, 0, 4, 5, 6, 7, 8, 9]  # excluded dead rows need nothing
    assert lean._key_needs(rec, None) == [9, 9, 9, 4, 5, 6, 7, 8, 9]  # counted dead rows need every key
