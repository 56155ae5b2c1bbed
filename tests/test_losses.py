"""Task, logit-KD and SHD losses (shdcli/attention/losses.py), and the exactness of the reduced W_O bases.

References are loops over samples and tokens; the SHD loss's memory-lean path (row chunks, Gram
statistics accumulated, checkpointed student chunks) must equal the naive whole-map path in both
value and student gradients, for every chunk size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shdcli.attention import capture, shd
from shdcli.attention.capture import LayerRecord
from shdcli.attention.losses import causal_lm_loss, embedding_loss, group_features, logit_kd_loss, mean_pool, shd_loss
from shdcli.models.families import derive_student_config, output_projection
from shdcli.models.mapping import layer_pairs
from shdcli.students.derive import build_student
from tests.helpers import load_tiny, make_batch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padding_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # [B, N] bool, right padding


# =========================================================================== task / logit
def test_causal_lm_loss_matches_manual_ce():
    bsz, n, vocab = 3, 7, 11
    logits = torch.randn(bsz, n, vocab, generator=gen(0))
    ids = torch.randint(0, vocab, (bsz, n), generator=gen(1))
    mask = padding_mask([7, 4, 2], n).long()
    total, count = 0.0, 0
    for b in range(bsz):
        for t in range(n - 1):
            if mask[b, t + 1]:
                log_p = torch.log_softmax(logits[b, t].double(), dim=-1)
                total += -float(log_p[ids[b, t + 1]])
                count += 1
    assert count == 6 + 3 + 1
    got = causal_lm_loss(logits, ids, mask)
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    # Logits at padded positions do not matter.
    logits2 = logits.clone()
    logits2[1, 4:] = 100.0
    logits2[2, 2:] = -50.0
    assert float(causal_lm_loss(logits2, ids, mask)) == pytest.approx(float(got), rel=1e-6)


def ref_logit_kd(s, t, mask, temp):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            p_t = torch.softmax(t[b, i].double() / temp, dim=-1)
            p_s = torch.softmax(s[b, i].double() / temp, dim=-1)
            total += float((p_t * (p_t.log() - p_s.log())).sum())
            count += 1
    return temp**2 * total / count


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_logit_kd_matches_reference_and_chunking(temp):
    bsz, n, vocab = 3, 6, 13
    s = torch.randn(bsz, n, vocab, generator=gen(2)) * 2
    t = torch.randn(bsz, n, vocab, generator=gen(3)) * 2
    mask = padding_mask([6, 3, 1], n)
    want = ref_logit_kd(s, t, mask, temp)
    for chunk in (1, 2, 5, 4096):
        got = logit_kd_loss(s, t, mask.long(), temp, chunk_tokens=chunk)
        assert float(got) == pytest.approx(want, rel=1e-5), chunk
    # Identical logits: zero; gradients flow to the student only where tokens are real.
    assert float(logit_kd_loss(t, t, mask, temp)) == pytest.approx(0.0, abs=1e-6)
    s_leaf = s.clone().requires_grad_(True)
    logit_kd_loss(s_leaf, t, mask, temp, chunk_tokens=1).backward()
    assert (s_leaf.grad[~mask] == 0).all() and (s_leaf.grad[mask].abs().sum() > 0)


def test_logit_kd_chunked_gradients_equal():
    s = torch.randn(2, 5, 9, generator=gen(4), requires_grad=True)
    t = torch.randn(2, 5, 9, generator=gen(5))
    mask = padding_mask([5, 2], 5)
    grads = []
    for chunk in (1, 3, 100):
        s.grad = None
        logit_kd_loss(s, t, mask, 2.0, chunk_tokens=chunk).backward()
        grads.append(s.grad.clone())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-7)


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 4, 3, generator=gen(6))
    mask = padding_mask([4, 2], 4).long()
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))


def test_embedding_loss_same_width():
    s = torch.randn(3, 5, 8, generator=gen(7))
    t = torch.randn(3, 5, 8, generator=gen(8))
    mask = padding_mask([5, 3, 1], 5).long()
    want = 0.0
    for b in range(3):
        k = int(mask[b].sum())
        ps, pt = s[b, :k].mean(0), t[b, :k].mean(0)
        want += 1.0 - float(F.cosine_similarity(ps, pt, dim=0))
    assert float(embedding_loss(s, t, mask)) == pytest.approx(want / 3, rel=1e-5)
    assert float(embedding_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    # Scale-free: only directions count.
    assert float(embedding_loss(3 * s, t, mask)) == pytest.approx(want / 3, rel=1e-5)
    s2 = s.clone()
    s2[2, 1:] = 1e3  # padding
    assert float(embedding_loss(s2, t, mask)) == pytest.approx(want / 3, rel=1e-5)


def test_embedding_loss_different_width_is_relational():
    s = torch.randn(4, 5, 6, generator=gen(9))
    t = torch.randn(4, 5, 10, generator=gen(10))
    mask = padding_mask([5, 4, 3, 2], 5).long()
    ps = F.normalize(mean_pool(s, mask), dim=-1)
    pt = F.normalize(mean_pool(t, mask), dim=-1)
    want = ((ps @ ps.t() - pt @ pt.t()) ** 2).mean()
    assert float(embedding_loss(s, t, mask)) == pytest.approx(float(want), rel=1e-5)
    # An orthogonal rotation of the student's space changes nothing (no projector needed).
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(11)))
    assert float(embedding_loss(s @ q, t, mask)) == pytest.approx(float(want), rel=1e-4, abs=1e-7)


# =========================================================================== SHD loss: lean == naive
def make_records(seed: int, bsz: int, n: int, t_heads: int, t_kv: int, s_heads: int, s_kv: int, d: int,
                 lengths: list[int] | None, causal: bool, layers: list[tuple[int, int]]):
    """Synthetic teacher/student records for the given (student, teacher) layer pairs, sharp-ish maps."""
    g = gen(seed)
    pad = None if lengths is None else padding_mask(lengths, n)
    allowed = None
    if pad is not None:
        # [B, 1, N, M], the shape transformers' mask builders hand to the attention function.
        allowed = pad[:, None, None, :].expand(bsz, 1, n, n).clone()
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    teacher, student, leaves = {}, {}, []
    for s_idx, t_idx in layers:
        teacher[t_idx] = LayerRecord(
            query=2 * torch.randn(bsz, t_heads, n, d, generator=g), key=torch.randn(bsz, t_kv, n, d, generator=g),
            value=torch.randn(bsz, t_kv, n, d, generator=g), allowed=allowed,
            causal=causal and allowed is None, scaling=d**-0.5,
        )
        q = torch.randn(bsz, s_heads, n, d, generator=g).requires_grad_(True)
        k = torch.randn(bsz, s_kv, n, d, generator=g).requires_grad_(True)
        leaves += [q, k]
        student[s_idx] = LayerRecord(query=q, key=k, value=None, allowed=allowed, causal=causal and allowed is None,
                                     scaling=d**-0.5)
    return teacher, student, leaves, pad


def loss_and_grads(teacher, student, leaves, pairs, groups, bases, pad, **kwargs):
    for leaf in leaves:
        leaf.grad = None
    result = shd_loss(teacher, student, pairs, groups, bases, pad, **kwargs)
    result.loss.backward()
    return result, [leaf.grad.clone() for leaf in leaves]


CASES = {
    # name: (t_heads, t_kv, s_heads, s_kv, lengths, causal)
    "causal-padded-gqa": (6, 2, 3, 1, [11, 7, 3], True),
    "bidirectional-padded": (6, 6, 4, 4, [11, 9, 5], False),
    "causal-no-mask": (4, 2, 2, 1, None, True),
    "uneven-groups": (5, 5, 2, 2, [11, 10, 4], True),
}


@pytest.mark.parametrize(
    "case, alpha, kind",
    [
        ("causal-padded-gqa", "lsq", "kl"),
        ("bidirectional-padded", "lsq", "kl"),
        ("causal-no-mask", "lsq", "kl"),
        ("uneven-groups", "lsq", "kl"),
        ("causal-padded-gqa", "mean", "mse"),
        ("bidirectional-padded", "select", "cosine"),
        ("uneven-groups", "select", "mse"),
    ],
)
def test_shd_loss_lean_equals_naive(case, alpha, kind):
    t_heads, t_kv, s_heads, s_kv, lengths, causal = CASES[case]
    n, d, width = 11, 4, 24
    pairs = [(0, 1), (1, 3)]
    teacher, student, leaves, pad = make_records(0, 3, n, t_heads, t_kv, s_heads, s_kv, d, lengths, causal, pairs)
    groups = [shd.group_heads(t_heads, s_heads), shd.group_heads(t_heads, s_heads, "pairs")]
    w_out = torch.randn(t_heads * d, width, generator=gen(42))
    # Layer 1 has a known output projection; layer 3 falls back to X_h = V_h.
    bases = {1: shd.group_feature_bases(w_out, groups[0], d), 3: None}
    tau = 2.0
    naive, naive_grads = loss_and_grads(teacher, student, leaves, pairs, groups, bases, pad, alpha=alpha, kind=kind,
                                        tau=tau, impl="naive")
    assert torch.isfinite(naive.loss) and float(naive.loss.detach()) > 0
    for chunk in (1, 3, 4, n, 0):  # 3 and 4 do not divide n = 11; 0 = auto
        lean, lean_grads = loss_and_grads(teacher, student, leaves, pairs, groups, bases, pad, alpha=alpha,
                                          kind=kind, tau=tau, impl="lean", chunk_rows=chunk)
        torch.testing.assert_close(lean.loss, naive.loss, rtol=1e-4, atol=1e-7, msg=f"loss, chunk {chunk}")
        for i, (a, b) in enumerate(zip(lean_grads, naive_grads)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=f"grad {i}, chunk {chunk}")
        for layer in naive.weights:
            for wa, wb in zip(lean.weights[layer], naive.weights[layer]):
                torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6)
    # Padded query rows carry no gradient.
    if pad is not None:
        for q in leaves[0::2]:
            assert (naive_grads[0].abs().sum(-1)[~pad[:, None, :].expand(-1, q.shape[1], -1)] == 0).all()


def test_shd_loss_identity_groups_is_plain_attention_kd():
    """Hs == Ht: tau^2 * mean over (layers, batch, heads, real rows) of KL(teacher row || student row)."""
    n, d, heads, tau = 9, 4, 3, 1.5
    pairs = [(0, 0), (1, 2)]
    teacher, student, leaves, pad = make_records(3, 2, n, heads, heads, heads, heads, d, [9, 5], True, pairs)
    groups = [shd.group_heads(heads, heads)] * 2
    got = shd_loss(teacher, student, pairs, groups, {0: None, 2: None}, pad, tau=tau, impl="lean", chunk_rows=2).loss
    total, count = 0.0, 0
    for s_idx, t_idx in pairs:
        t_rec, s_rec = teacher[t_idx], student[s_idx]
        for b in range(2):
            length = int(pad[b].sum())
            for h in range(heads):
                for i in range(length):
                    keys = min(i + 1, length)  # causal and padding
                    ts = (t_rec.query[b, h, i] @ t_rec.key[b, h, :keys].t()) * t_rec.scaling / tau
                    ss = (s_rec.query[b, h, i] @ s_rec.key[b, h, :keys].t()) * s_rec.scaling / tau
                    p, q = torch.softmax(ts.double(), -1), torch.softmax(ss.detach().double(), -1)
                    total += float((p * (p.log() - q.log())).sum())
                    count += 1
    assert float(got.detach()) == pytest.approx(tau**2 * total / count, rel=1e-5)


def test_shd_loss_on_captured_llama_records(tiny_models):
    """The same check on records captured from a real causal GQA teacher and a derived student."""
    teacher, tokenizer, task = load_tiny(tiny_models["llama"], seed=5, scale=0.5)
    pairs = layer_pairs(4, 2, "auto")
    config = derive_student_config(teacher.config, pairs, 3, None, None, None)
    torch.manual_seed(0)
    student = build_student(teacher, config, task).train()
    for model in (teacher, student):
        capture.enable(model)
    batch = make_batch(tokenizer)
    t_rec = capture.AttentionRecorder({t for _, t in pairs}, keep_values=True)
    s_rec = capture.AttentionRecorder({s for s, _ in pairs})
    with torch.no_grad(), t_rec.active():
        teacher(**batch)
    groups = [shd.group_heads(6, 3)] * len(pairs)
    bases = {t: shd.group_feature_bases(output_projection(teacher, t).detach(), g, 8)
             for (_, t), g in zip(pairs, groups)}
    pad = batch["attention_mask"].bool()
    params = [p for p in student.parameters() if p.requires_grad]
    results = {}
    for impl, chunk in (("naive", 0), ("lean", 7), ("lean", 0)):  # 7 does not divide N
        student.zero_grad(set_to_none=True)
        with s_rec.active():
            student(**batch)
        loss = shd_loss(t_rec.records, s_rec.records, pairs, groups, bases, pad, impl=impl, chunk_rows=chunk).loss
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        results[(impl, chunk)] = (loss.detach(), grads)
    ref_loss, ref_grads = results[("naive", 0)]
    assert float(ref_loss) > 0 and any(g.abs().sum() > 0 for g in ref_grads)
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-7, msg=str(key))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=str(key))


# =========================================================================== W_O bases are exact
@pytest.mark.parametrize(
    "heads, head_dim, width, groups",
    [
        (6, 4, 40, [[0, 1, 2], [3, 4, 5]]),  # k d = 12 < D = 40: reduced basis
        (6, 4, 40, [[0, 1], [2, 3], [4], [5]]),
        (4, 8, 16, [[0, 1, 2], [3]]),  # k d = 24 >= D = 16 for the first group: W_G itself
        (12, 4, 48, [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11]]),
    ],
)
def test_group_feature_bases_are_exact(heads, head_dim, width, groups):
    bsz, n = 3, 10
    w_out = torch.randn(heads * head_dim, width, generator=gen(20), dtype=torch.float64).float()
    values = torch.randn(bsz, heads, n, head_dim, generator=gen(21))
    maps = torch.softmax(2 * torch.randn(bsz, heads, n, n, generator=gen(22)), dim=-1)
    rows = padding_mask([10, 6, 3], n)
    bases = shd.group_feature_bases(w_out, groups, head_dim)
    for group, basis in zip(groups, bases):
        k = len(group)
        assert basis.shape == (k, head_dim, min(k * head_dim, width))
        full = torch.stack([values[:, h] @ w_out[h * head_dim:(h + 1) * head_dim] for h in group], dim=1)  # [B,k,M,D]
        reduced = torch.einsum("bkmd,kde->bkme", values[:, group], basis)
        gram_f, rhs_f = shd.squeeze_statistics(maps[:, group], full, rows)
        gram_r, rhs_r = shd.squeeze_statistics(maps[:, group], reduced, rows)
        scale = float(gram_f.abs().max())
        torch.testing.assert_close(gram_r, gram_f, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(rhs_r, rhs_f, rtol=1e-4, atol=1e-5 * scale)
        for mode in ("lsq", "select", "mean"):
            w_f = shd.solve_weights(gram_f, rhs_f, mode)
            w_r = shd.solve_weights(gram_r, rhs_r, mode)
            torch.testing.assert_close(w_r, w_f, rtol=1e-3, atol=1e-4)
            err_f = shd.reconstruction_error(maps[:, group], full, w_f)
            err_r = shd.reconstruction_error(maps[:, group], reduced, w_f)
            torch.testing.assert_close(err_r, err_f, rtol=1e-4, atol=1e-6)
        # group_features (what the loss uses) is the same reduced X_h.
        rec = LayerRecord(query=values, key=values, value=values, allowed=None, causal=False, scaling=1.0)
        feats = group_features(rec, [group], [basis])[0]
        torch.testing.assert_close(feats, reduced)


def test_group_feature_bases_gram_identity():
    """R R^T = W_G W_G^T exactly (what makes every inner product of the squeeze unchanged)."""
    w_out = torch.randn(8 * 4, 64, generator=gen(30))
    groups = [[0, 1], [2, 3, 4], [5, 6, 7]]
    for group, basis in zip(groups, shd.group_feature_bases(w_out, groups, 4)):
        w_g = torch.cat([w_out[h * 4:(h + 1) * 4] for h in group]).double()
        r = basis.reshape(len(group) * 4, -1).double()
        torch.testing.assert_close(r @ r.t(), w_g @ w_g.t(), rtol=1e-5, atol=1e-4)
        assert not math.isnan(float(r.sum()))
