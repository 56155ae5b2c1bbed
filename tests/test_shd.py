"""Unit tests of shdcli/attention/shd.py against slow, loop-based reference implementations.

Every reference below is written to be obviously correct rather than fast: explicit Python loops
over batch, heads, rows and keys, and plain torch.sum / matmul on 2-D slices. Shapes are tiny.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shdcli.attention import shd

F64 = torch.float64


# =========================================================================== helpers / references
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_maps(b: int, k: int, n: int, m: int | None = None, seed: int = 0, sharp: float = 2.0, dtype=F64):
    """Random attention maps [b, k, n, m], rows on the simplex, all entries > 0."""
    m = n if m is None else m
    return torch.softmax(sharp * torch.randn(b, k, n, m, dtype=F64, generator=gen(seed)), dim=-1).to(dtype)


def rand_feats(b: int, k: int, m: int, d: int, seed: int = 1, dtype=F64):
    return torch.randn(b, k, m, d, dtype=F64, generator=gen(seed)).to(dtype)


def ref_group_setup(maps_b: torch.Tensor, feats_b: torch.Tensor):
    """For one sample: maps_b [k, N, M], feats_b [k, M, D] -> (S, T, [P_h])."""
    k = maps_b.shape[0]
    s = feats_b[0].clone()
    for h in range(1, k):
        s = s + feats_b[h]
    t = maps_b[0] @ feats_b[0]
    for h in range(1, k):
        t = t + maps_b[h] @ feats_b[h]
    p = [maps_b[h] @ s for h in range(k)]
    return s, t, p


def ref_statistics(maps: torch.Tensor, feats: torch.Tensor):
    """G [B, k, k] and b [B, k] by explicit loops over batch and heads."""
    bsz, k = maps.shape[:2]
    gram = torch.zeros(bsz, k, k, dtype=maps.dtype)
    rhs = torch.zeros(bsz, k, dtype=maps.dtype)
    for bi in range(bsz):
        _, t, p = ref_group_setup(maps[bi], feats[bi])
        for h in range(k):
            for g in range(k):
                gram[bi, h, g] = torch.sum(p[h] * p[g])
            rhs[bi, h] = torch.sum(p[h] * t)
    return gram, rhs


def ref_objective(maps_b: torch.Tensor, feats_b: torch.Tensor, w) -> float:
    """|| (sum_h w_h A_h) S - T ||_F^2 for one sample."""
    s, t, _ = ref_group_setup(maps_b, feats_b)
    merged = torch.zeros_like(maps_b[0])
    for h in range(maps_b.shape[0]):
        merged = merged + float(w[h]) * maps_b[h]
    return float(torch.sum((merged @ s - t) ** 2))


def batched_objective(maps_b: torch.Tensor, feats_b: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Objective for many candidate weight vectors ws [P, k] at once (for brute-force searches)."""
    s, t, p = ref_group_setup(maps_b, feats_b)
    pstack = torch.stack(p)  # [k, N, D]
    approx = torch.einsum("pk,knd->pnd", ws.to(maps_b.dtype), pstack)
    return ((approx - t) ** 2).flatten(1).sum(-1)


def ref_simplex_lsq(maps_b: torch.Tensor, feats_b: torch.Tensor):
    """Exact minimiser over the simplex by enumerating supports (active-set enumeration).

    The optimum of a convex quadratic on the simplex is the equality-constrained optimum on the face
    spanned by its support, so trying every non-empty support and keeping the feasible candidates finds it.
    """
    k = maps_b.shape[0]
    _, t, p = ref_group_setup(maps_b, feats_b)
    best_w, best_e = None, math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            kkt = torch.zeros(size + 1, size + 1, dtype=F64)
            rhs = torch.zeros(size + 1, dtype=F64)
            for i, h in enumerate(support):
                for j, g in enumerate(support):
                    kkt[i, j] = torch.sum(p[h] * p[g])
                kkt[i, size] = 1.0
                kkt[size, i] = 1.0
                rhs[i] = torch.sum(p[h] * t)
            rhs[size] = 1.0
            sol = torch.linalg.pinv(kkt) @ rhs
            w = torch.zeros(k, dtype=F64)
            for i, h in enumerate(support):
                w[h] = sol[i]
            if (w < -1e-12).any() or abs(float(w.sum()) - 1.0) > 1e-8:
                continue
            e = ref_objective(maps_b, feats_b, w)
            if e < best_e:
                best_w, best_e = w, e
    return best_w, best_e


def ref_attention_maps(query, key, scaling, allowed, tau=1.0):
    """Per-element softmax with explicit loops; masked keys get exactly 0."""
    bsz, heads, rows, d = query.shape
    keys = key.shape[2]
    out = torch.zeros(bsz, heads, rows, keys, dtype=F64)
    q64, k64 = query.double(), key.double()
    for b in range(bsz):
        for h in range(heads):
            for i in range(rows):
                ok = [allowed is None or bool(allowed.expand(bsz, heads, rows, keys)[b, h, i, j]) for j in range(keys)]
                scores = []
                for j in range(keys):
                    acc = 0.0
                    for c in range(d):
                        acc += float(q64[b, h, i, c]) * float(k64[b, h, j, c])
                    scores.append(acc * scaling / tau)
                mx = max(scores[j] for j in range(keys) if ok[j])
                exps = [math.exp(scores[j] - mx) if ok[j] else 0.0 for j in range(keys)]
                z = sum(exps)
                for j in range(keys):
                    out[b, h, i, j] = exps[j] / z
    return out


def ref_row_softmax(scores_row) -> list[float]:
    vals = [float(x) for x in scores_row]
    mx = max(v for v in vals if v != -math.inf)
    exps = [math.exp(v - mx) if v != -math.inf else 0.0 for v in vals]
    z = sum(exps)
    return [e / z for e in exps]


def ref_row_loss(t_row, s_row, kind: str) -> float:
    t = [float(x) for x in t_row]
    q = ref_row_softmax(s_row)
    if kind == "kl":
        total = 0.0
        for tj, qj in zip(t, q, strict=True):
            if tj > 0:  # 0 * log 0 = 0
                total += tj * math.log(tj / qj)
        return total
    if kind == "mse":
        return sum((qj - tj) ** 2 for tj, qj in zip(t, q, strict=True))
    if kind == "cosine":
        dot = sum(tj * qj for tj, qj in zip(t, q, strict=True))
        nt = math.sqrt(sum(tj * tj for tj in t))
        nq = math.sqrt(sum(qj * qj for qj in q))
        return 1.0 - dot / (nt * nq)
    raise AssertionError(kind)


def ref_kd_loss(target, student_scores, row_mask, kind="kl", tau=1.0) -> float:
    bsz, heads, rows, _ = target.shape
    total, count = 0.0, 0
    for b in range(bsz):
        for h in range(heads):
            for i in range(rows):
                if row_mask is not None and not bool(row_mask[b, i]):
                    continue
                total += ref_row_loss(target[b, h, i], student_scores[b, h, i], kind)
                count += 1
    scale = tau * tau if kind == "kl" else 1.0
    return scale * total / max(count, 1)


def ref_js(p_row, q_row) -> float:
    total = 0.0
    for pj, qj in zip(p_row, q_row, strict=True):
        pj, qj = float(pj), float(qj)
        mj = 0.5 * (pj + qj)
        if pj > 0:
            total += 0.5 * pj * math.log(pj / mj)
        if qj > 0:
            total += 0.5 * qj * math.log(qj / mj)
    return total


def ref_pairs(ht: int, hs: int) -> list[list[int]]:
    """Progressive adjacent-pair merging, written independently: each round pairs (0,1), (2,3), ... of the
    current groups, but only as many pairs as are still needed; the rest (and an odd last group) pass."""
    groups = [[h] for h in range(ht)]
    while len(groups) > hs:
        need = len(groups) - hs
        n_pairs = min(need, len(groups) // 2)
        new = [groups[2 * i] + groups[2 * i + 1] for i in range(n_pairs)]
        new += groups[2 * n_pairs :]
        groups = new
    return groups


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


# =========================================================================== group_heads
def assert_partition(groups: list[list[int]], ht: int, hs: int) -> None:
    assert len(groups) == hs
    assert all(len(g) >= 1 for g in groups)
    flat = [h for g in groups for h in g]
    assert flat == list(range(ht)), "groups must be contiguous and cover every head exactly once, in order"
    for g in groups:
        assert g == list(range(g[0], g[0] + len(g)))


def test_group_heads_balanced_12_to_5():
    groups = shd.group_heads(12, 5)
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11]]
    assert [len(g) for g in groups] == [3, 3, 2, 2, 2]


def test_group_heads_default_mode_is_balanced():
    assert shd.group_heads(25, 12) == shd.group_heads(25, 12, "balanced")


@pytest.mark.parametrize(
    "ht,hs,sizes",
    [
        (25, 12, [3] + [2] * 11),
        (9, 4, [3, 2, 2, 2]),
        (40, 32, [2] * 8 + [1] * 24),
        (25, 16, [2] * 9 + [1] * 7),
        (25, 20, [2] * 5 + [1] * 15),
        (16, 6, [3, 3, 3, 3, 2, 2]),
        (7, 3, [3, 2, 2]),
        (5, 1, [5]),
    ],
)
def test_group_heads_balanced_known_sizes(ht, hs, sizes):
    groups = shd.group_heads(ht, hs, "balanced")
    assert_partition(groups, ht, hs)
    assert [len(g) for g in groups] == sizes


def test_group_heads_balanced_all_pairs_up_to_40():
    for ht in range(1, 41):
        for hs in range(1, ht + 1):
            groups = shd.group_heads(ht, hs, "balanced")
            assert_partition(groups, ht, hs)
            sizes = [len(g) for g in groups]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True), "larger groups first"


@pytest.mark.parametrize("mode", ["balanced", "pairs"])
@pytest.mark.parametrize("hs", [1, 2, 3, 6, 8, 10])
def test_group_heads_double_is_adjacent_pairs(mode, hs):
    assert shd.group_heads(2 * hs, hs, mode) == [[2 * j, 2 * j + 1] for j in range(hs)]


@pytest.mark.parametrize("mode", ["balanced", "pairs"])
@pytest.mark.parametrize("h", [1, 2, 5, 12, 25])
def test_group_heads_identity(mode, h):
    assert shd.group_heads(h, h, mode) == [[i] for i in range(h)]


@pytest.mark.parametrize("mode", ["balanced", "pairs"])
@pytest.mark.parametrize("ht,hs", [(3, 4), (12, 16), (1, 2)])
def test_group_heads_more_student_heads_raises_naming_both(mode, ht, hs):
    with pytest.raises(ValueError) as info:
        shd.group_heads(ht, hs, mode)
    msg = str(info.value)
    assert str(ht) in msg and str(hs) in msg


@pytest.mark.parametrize("ht,hs", [(0, 1), (4, 0), (-1, -1)])
def test_group_heads_nonpositive_raises(ht, hs):
    with pytest.raises(ValueError):
        shd.group_heads(ht, hs)


def test_group_heads_unknown_mode_raises():
    with pytest.raises(ValueError, match="bogus"):
        shd.group_heads(12, 6, "bogus")


def test_group_heads_pairs_known_cases():
    # 25 -> 12: one round of 12 adjacent pairs with head 24 passing, then one surplus merge in the last round.
    assert shd.group_heads(25, 12, "pairs") == [[0, 1, 2, 3]] + [[2 * i, 2 * i + 1] for i in range(2, 12)] + [[24]]
    # 9 -> 4: round 1 merges 4 pairs (head 8 passes), round 2 merges only the one surplus pair.
    assert shd.group_heads(9, 4, "pairs") == [[0, 1, 2, 3], [4, 5], [6, 7], [8]]
    # 12 -> 5: round 1 -> 6 pairs, round 2 merges only the first two pairs.
    assert shd.group_heads(12, 5, "pairs") == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    # 6 -> 3 = adjacent pairs; 16 -> 6 (MDT) lands exactly on 6.
    assert shd.group_heads(6, 3, "pairs") == [[0, 1], [2, 3], [4, 5]]
    assert_partition(shd.group_heads(16, 6, "pairs"), 16, 6)
    # Fewer merges than pairs: only the surplus is merged, the rest pass unmerged.
    assert shd.group_heads(5, 4, "pairs") == [[0, 1], [2], [3], [4]]


def test_group_heads_pairs_all_pairs_up_to_40_match_reference():
    for ht in range(1, 41):
        for hs in range(1, ht + 1):
            groups = shd.group_heads(ht, hs, "pairs")
            assert_partition(groups, ht, hs)
            assert groups == ref_pairs(ht, hs), (ht, hs)


@settings(max_examples=60, deadline=None)
@given(ht=st.integers(1, 64), data=st.data(), mode=st.sampled_from(["balanced", "pairs"]))
def test_group_heads_property(ht, data, mode):
    hs = data.draw(st.integers(1, ht))
    groups = shd.group_heads(ht, hs, mode)
    assert_partition(groups, ht, hs)
    if mode == "balanced":
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
    else:
        assert groups == ref_pairs(ht, hs)


# =========================================================================== attention maps
def qk(seed=0, b=2, h=2, n=5, m=None, d=4):
    m = n if m is None else m
    g = gen(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g)


def test_attention_maps_rows_sum_to_one_and_match_loop_reference():
    q, k = qk(seed=3, b=2, h=2, n=5, m=6, d=4)
    for tau in (0.5, 1.0, 3.0):
        out = shd.attention_maps(q, k, 0.5, None, tau)
        assert out.shape == (2, 2, 5, 6)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, 5), atol=1e-6, rtol=0)
        assert (out >= 0).all()
        torch.testing.assert_close(out.double(), ref_attention_maps(q, k, 0.5, None, tau), atol=1e-6, rtol=1e-5)


def test_attention_maps_masked_keys_exactly_zero_and_match_reference():
    q, k = qk(seed=4, b=2, h=3, n=4, m=6, d=3)
    allowed = torch.rand(2, 1, 4, 6, generator=gen(9)) > 0.4
    allowed[..., 0] = True  # every row keeps at least one key
    out = shd.attention_maps(q, k, 0.7, allowed, 1.3)
    full = allowed.expand(2, 3, 4, 6)
    assert (out[~full] == 0).all()
    assert (out[full] > 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), ref_attention_maps(q, k, 0.7, allowed, 1.3), atol=1e-6, rtol=1e-5)


def test_attention_maps_causal_mask():
    q, k = qk(seed=5, b=1, h=2, n=6, d=4)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    out = shd.attention_maps(q, k, 0.5, causal)
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    assert (out[..., upper] == 0).all()
    assert (out[..., 0, 0] == 1).all(), "the first query can only see the first key"
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), ref_attention_maps(q, k, 0.5, causal), atol=1e-6, rtol=1e-5)


def test_attention_scores_scaling_temperature_and_mask():
    q, k = qk(seed=6, b=1, h=1, n=3, m=4, d=2)
    allowed = torch.tensor([[True, False, True, True], [True, True, True, False], [True, True, True, True]])
    scores = shd.attention_scores(q, k, 0.25, allowed[None, None], tau=2.0)
    expected = (q.double() @ k.double().transpose(-1, -2)) * 0.25 / 2.0
    assert torch.isneginf(scores[0, 0, 0, 1]) and torch.isneginf(scores[0, 0, 1, 3])
    fin = allowed[None, None]
    torch.testing.assert_close(scores[fin].double(), expected[fin], atol=1e-6, rtol=1e-5)


def test_attention_maps_temperature_softens():
    q, k = qk(seed=7, b=2, h=2, n=5, m=7, d=4)
    taus = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    ents = [row_entropy(shd.attention_maps(q, k, 1.0, None, tau).double()) for tau in taus]
    for lo, hi in itertools.pairwise(ents):
        assert (hi > lo).all(), "entropy must grow strictly with tau"
    assert (ents[-1] <= math.log(7) + 1e-6).all()
    near_uniform = row_entropy(shd.attention_maps(q, k, 1.0, None, 1e4).double())
    torch.testing.assert_close(near_uniform, torch.full_like(near_uniform, math.log(7)), atol=1e-5, rtol=0)


# =========================================================================== squeeze statistics
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_squeeze_statistics_matches_reference(k):
    maps = rand_maps(3, k, 5, 6, seed=10 + k)
    feats = rand_feats(3, k, 6, 4, seed=20 + k)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    ref_g, ref_b = ref_statistics(maps, feats)
    assert gram.shape == (3, k, k) and rhs.shape == (3, k)
    torch.testing.assert_close(gram, ref_g, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rhs, ref_b, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gram, gram.transpose(-1, -2))


def test_squeeze_statistics_chunks_add_up():
    maps = rand_maps(2, 3, 8, 8, seed=30)
    feats = rand_feats(2, 3, 8, 5, seed=31)
    whole_g, whole_b = shd.squeeze_statistics(maps, feats)
    for bounds in ([0, 3, 5, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 8]):
        acc_g = torch.zeros_like(whole_g)
        acc_b = torch.zeros_like(whole_b)
        for lo, hi in itertools.pairwise(bounds):
            g, b = shd.squeeze_statistics(maps[:, :, lo:hi], feats)
            acc_g += g
            acc_b += b
        torch.testing.assert_close(acc_g, whole_g, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(acc_b, whole_b, atol=1e-10, rtol=1e-10)
        for mode in ("lsq", "select", "mean"):
            torch.testing.assert_close(shd.solve_weights(acc_g, acc_b, mode), shd.solve_weights(whole_g, whole_b, mode))


def test_apply_weights_chunks_concatenate():
    maps = rand_maps(2, 5, 8, 8, seed=32)
    feats = rand_feats(2, 5, 8, 3, seed=33)
    groups = shd.group_heads(5, 2)
    whole, weights = shd.squeeze(maps, feats, groups)
    parts = [shd.apply_weights(maps[:, :, lo:hi], groups, weights) for lo, hi in [(0, 3), (3, 4), (4, 8)]]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole)


# =========================================================================== solve_weights (k = 2)
def pair_case(seed: int, n=5, d=3, ratio: float | None = None):
    """Random pair. With ratio c, X_q = c X_p + small noise, so alpha ~ 1 / (1 + c): c = -0.5 pushes the
    unconstrained alpha above 1, c = -3 below 0 (both must clip)."""
    maps = rand_maps(1, 2, n, n, seed=seed, sharp=2.5)
    feats = rand_feats(1, 2, n, d, seed=seed + 1000)
    if ratio is not None:
        feats[:, 1] = ratio * feats[:, 0] + 0.05 * feats[:, 1]
    return maps, feats


def paper_alpha(maps_b, feats_b) -> float:
    ap, aq = maps_b[0], maps_b[1]
    xp, xq = feats_b[0], feats_b[1]
    mdiff = ap - aq
    s = xp + xq
    num = torch.sum((mdiff @ xp) * (mdiff @ s))
    den = torch.sum((mdiff @ s) ** 2)
    return min(1.0, max(0.0, float(num / den)))


def test_pair_alpha_matches_grid_search_and_paper_closed_form():
    grid = torch.linspace(0.0, 1.0, 2001, dtype=F64)
    ws = torch.stack([grid, 1.0 - grid], dim=-1)
    interior = clipped = 0
    for seed in range(24):
        maps, feats = pair_case(seed, ratio=[None, -0.5, None, -3.0][seed % 4])
        gram, rhs = shd.squeeze_statistics(maps, feats)
        w = shd.solve_weights(gram, rhs, "lsq")
        assert w.shape == (1, 2) and w.dtype == torch.float32
        alpha = float(w[0, 0])
        assert abs(float(w[0].sum()) - 1.0) < 1e-6
        errs = batched_objective(maps[0], feats[0], ws)
        grid_alpha = float(grid[errs.argmin()])
        assert abs(alpha - grid_alpha) <= 1e-3, (seed, alpha, grid_alpha)
        assert abs(alpha - paper_alpha(maps[0], feats[0])) <= 1e-6, seed
        # the solver's alpha is at least as good as every grid point (up to float32 rounding of alpha)
        assert ref_objective(maps[0], feats[0], [alpha, 1 - alpha]) <= float(errs.min()) + 1e-6
        if 0.0 < alpha < 1.0:
            interior += 1
        else:
            clipped += 1
    assert interior >= 6 and clipped >= 6, (interior, clipped)  # both branches were exercised


def test_pair_alpha_clips_to_one_and_zero():
    for ratio, expected in ((-0.5, 1.0), (-3.0, 0.0)):
        maps, feats = pair_case(99, ratio=ratio)
        gram, rhs = shd.squeeze_statistics(maps, feats)
        num = rhs[:, 0] - rhs[:, 1] - gram[:, 0, 1] + gram[:, 1, 1]
        den = gram[:, 0, 0] - 2 * gram[:, 0, 1] + gram[:, 1, 1]
        raw = float(num / den)
        assert (raw > 1.0) if expected == 1.0 else (raw < 0.0)
        w = shd.solve_weights(gram, rhs, "lsq")
        assert float(w[0, 0]) == expected and float(w[0, 1]) == 1.0 - expected
        assert abs(paper_alpha(maps[0], feats[0]) - expected) == 0.0
        # swapping the two heads swaps the weights
        swapped = shd.solve_weights(gram.flip(-1).flip(-2), rhs.flip(-1), "lsq")
        torch.testing.assert_close(swapped, w.flip(-1))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_identical_heads_give_uniform_weights(k):
    one = rand_maps(2, 1, 5, 5, seed=40)
    maps = one.expand(2, k, 5, 5).clone()
    feats = rand_feats(2, k, 5, 3, seed=41)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    w = shd.solve_weights(gram, rhs, "lsq")
    torch.testing.assert_close(w, torch.full((2, k), 1.0 / k), atol=1e-5, rtol=0)
    # float32 maps (the real path) too
    gram32, rhs32 = shd.squeeze_statistics(maps.float(), feats.float())
    torch.testing.assert_close(shd.solve_weights(gram32, rhs32, "lsq"), torch.full((2, k), 1.0 / k), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_zero_merged_features_give_uniform_weights(k):
    # S = 0: every w gives the same error, the solver must stay finite and on the simplex.
    maps = rand_maps(2, k, 4, 4, seed=42)
    feats = rand_feats(2, k, 4, 3, seed=43)
    feats[:, -1] = -feats[:, :-1].sum(1)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    w = shd.solve_weights(gram, rhs, "lsq")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2), atol=1e-6, rtol=0)
    assert (w >= 0).all()


# =========================================================================== solve_weights (k >= 3)
def kkt_unconstrained(maps_b, feats_b) -> torch.Tensor:
    """Equality-constrained (sum w = 1) least-squares solution, no sign constraint (reference)."""
    k = maps_b.shape[0]
    gram, rhs = ref_statistics(maps_b[None], feats_b[None])
    kkt = torch.zeros(k + 1, k + 1, dtype=F64)
    kkt[:k, :k] = gram[0]
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    return torch.linalg.solve(kkt, torch.cat([rhs[0], torch.ones(1, dtype=F64)]))[:k]


def simplex_samples(k: int, count: int, seed: int) -> torch.Tensor:
    e = -torch.log(torch.rand(count, k, dtype=F64, generator=gen(seed)))
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("k", [3, 4])
def test_lsq_weights_on_simplex_and_optimal_when_interior(k):
    vertices = torch.eye(k, dtype=F64)
    mean = torch.full((1, k), 1.0 / k, dtype=F64)
    checked = 0
    for seed in range(40):
        maps = rand_maps(1, k, 5, 5, seed=200 + seed, sharp=1.5)
        feats = rand_feats(1, k, 5, 3, seed=300 + seed)
        gram, rhs = shd.squeeze_statistics(maps, feats)
        w = shd.solve_weights(gram, rhs, "lsq")[0]
        assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-6
        checked += 1
        e = ref_objective(maps[0], feats[0], w.double())
        tol = 1e-6 * (1.0 + e)
        assert e <= float(batched_objective(maps[0], feats[0], vertices).min()) + tol
        assert e <= float(batched_objective(maps[0], feats[0], mean)) + tol
        assert e <= float(batched_objective(maps[0], feats[0], simplex_samples(k, 3000, seed)).min()) + tol
        ref_w, ref_e = ref_simplex_lsq(maps[0], feats[0])
        assert abs(e - ref_e) <= tol
        torch.testing.assert_close(w.double(), ref_w, atol=1e-5, rtol=0)
    assert checked == 40, checked


def test_lsq_k3_brute_force_grid_when_interior():
    # Fine barycentric grid (step 1/100) over the 3-simplex.
    steps = 100
    pts = [(a / steps, b / steps, (steps - a - b) / steps) for a in range(steps + 1) for b in range(steps + 1 - a)]
    grid = torch.tensor(pts, dtype=F64)
    done = 0
    for seed in range(40):
        maps = rand_maps(1, 3, 4, 4, seed=500 + seed, sharp=1.0)
        feats = rand_feats(1, 3, 4, 3, seed=600 + seed)
        gram, rhs = shd.squeeze_statistics(maps, feats)
        w = shd.solve_weights(gram, rhs, "lsq")[0].double()
        errs = batched_objective(maps[0], feats[0], grid)
        e = ref_objective(maps[0], feats[0], w)
        assert e <= float(errs.min()) + 1e-6 * (1.0 + e)
        done += 1
        if done >= 5:
            break
    assert done >= 3


def test_lsq_k3_is_simplex_optimal_even_when_kkt_solution_is_outside():
    g = gen(22)
    maps = torch.softmax(torch.randn(1, 3, 4, 4, dtype=F64, generator=g) * 2, -1)
    feats = torch.randn(1, 3, 4, 3, dtype=F64, generator=g)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    w = shd.solve_weights(gram, rhs, "lsq")[0].double()
    e = ref_objective(maps[0], feats[0], w)
    vertex_errs = batched_objective(maps[0], feats[0], torch.eye(3, dtype=F64))
    _, best = ref_simplex_lsq(maps[0], feats[0])
    assert e <= float(vertex_errs.min()) + 1e-9
    assert e <= best * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("k", [3, 5])
def test_lsq_weights_always_on_simplex(k):
    for seed in range(15):
        maps = rand_maps(2, k, 4, 6, seed=700 + seed, sharp=3.0)
        feats = rand_feats(2, k, 6, 2, seed=800 + seed)
        gram, rhs = shd.squeeze_statistics(maps, feats)
        w = shd.solve_weights(gram, rhs, "lsq")
        assert w.shape == (2, k) and w.dtype == torch.float32
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2), atol=1e-6, rtol=0)


# =========================================================================== other alpha modes
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mode_mean_gives_one_over_k(k):
    maps = rand_maps(3, k, 4, 4, seed=50)
    feats = rand_feats(3, k, 4, 2, seed=51)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    torch.testing.assert_close(shd.solve_weights(gram, rhs, "mean"), torch.full((3, k), 1.0 / k))
    groups = [list(range(k))]
    ws = shd.squeeze_weights(maps, feats, groups, "mean")
    torch.testing.assert_close(ws[0], torch.full((3, k), 1.0 / k))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mode_select_is_one_hot_on_best_head(k):
    for seed in range(10):
        maps = rand_maps(3, k, 5, 5, seed=60 + seed, sharp=2.0)
        feats = rand_feats(3, k, 5, 3, seed=70 + seed)
        gram, rhs = shd.squeeze_statistics(maps, feats)
        w = shd.solve_weights(gram, rhs, "select")
        assert w.shape == (3, k)
        for b in range(3):
            s, t, _ = ref_group_setup(maps[b], feats[b])
            errs = [float(torch.sum((maps[b, h] @ s - t) ** 2)) for h in range(k)]
            best = min(range(k), key=lambda h: errs[h])
            expected = torch.zeros(k)
            expected[best] = 1.0
            assert torch.equal(w[b], expected), (seed, b, errs, w[b])


def test_mode_select_single_head_group_and_squeeze_weights_singletons():
    maps = rand_maps(2, 3, 4, 4, seed=80)
    feats = rand_feats(2, 3, 4, 2, seed=81)
    for mode in ("lsq", "mean", "select"):
        ws = shd.squeeze_weights(maps, feats, [[0], [1, 2]], mode)
        torch.testing.assert_close(ws[0], torch.ones(2, 1))
        assert ws[1].shape == (2, 2)


@pytest.mark.parametrize("k", [2, 3])
def test_unknown_alpha_mode_raises(k):
    maps = rand_maps(1, k, 4, 4, seed=90)
    feats = rand_feats(1, k, 4, 2, seed=91)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    with pytest.raises(ValueError, match="bogus"):
        shd.solve_weights(gram, rhs, "bogus")
    with pytest.raises(ValueError):
        shd.squeeze(maps, feats, [list(range(k))], "bogus")


# =========================================================================== squeeze / apply_weights
def ref_squeeze(maps, groups, weights):
    bsz, _, n, m = maps.shape
    out = torch.zeros(bsz, len(groups), n, m, dtype=maps.dtype)
    for j, group in enumerate(groups):
        for b in range(bsz):
            for i, h in enumerate(group):
                out[b, j] += float(weights[j][b, i]) * maps[b, h]
    return out


@pytest.mark.parametrize(
    "ht,hs,grouping", [(6, 3, "balanced"), (5, 2, "balanced"), (9, 4, "pairs"), (4, 4, "pairs"), (7, 1, "balanced")]
)
@pytest.mark.parametrize("mode", ["lsq", "mean", "select"])
def test_squeeze_matches_reference(ht, hs, grouping, mode):
    maps = rand_maps(2, ht, 5, 6, seed=ht * 10 + hs)
    feats = rand_feats(2, ht, 6, 3, seed=ht * 10 + hs + 1)
    groups = shd.group_heads(ht, hs, grouping)
    out, weights = shd.squeeze(maps, feats, groups, mode)
    assert out.shape == (2, hs, 5, 6) and out.dtype == maps.dtype
    assert len(weights) == hs
    for group, w in zip(groups, weights, strict=True):
        assert w.shape == (2, len(group))
        if len(group) > 1:
            gram, rhs = ref_statistics(maps[:, group], feats[:, group])
            torch.testing.assert_close(w, shd.solve_weights(gram, rhs, mode))
    torch.testing.assert_close(out, ref_squeeze(maps, groups, weights), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(shd.apply_weights(maps, groups, weights), out)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, hs, 5, dtype=F64), atol=1e-6, rtol=0)


def test_squeeze_per_sample_weights_are_batch_independent():
    maps = rand_maps(3, 4, 5, 5, seed=110)
    feats = rand_feats(3, 4, 5, 3, seed=111)
    groups = shd.group_heads(4, 2)
    out, weights = shd.squeeze(maps, feats, groups)
    for b in range(3):
        out_b, weights_b = shd.squeeze(maps[b : b + 1], feats[b : b + 1], groups)
        torch.testing.assert_close(out_b, out[b : b + 1])
        for w, wb in zip(weights, weights_b, strict=True):
            torch.testing.assert_close(wb, w[b : b + 1])


def test_squeeze_masked_keys_stay_zero():
    q, k = qk(seed=120, b=2, h=4, n=5, d=3)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    maps = shd.attention_maps(q, k, 0.5, causal)
    feats = torch.randn(2, 4, 5, 3, generator=gen(121))
    for mode in ("lsq", "mean", "select"):
        out, _ = shd.squeeze(maps, feats, shd.group_heads(4, 2), mode)
        assert out.dtype == torch.float32
        assert (out[..., ~causal[0, 0]] == 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, 5), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    ht=st.integers(1, 7),
    data=st.data(),
    grouping=st.sampled_from(["balanced", "pairs"]),
    mode=st.sampled_from(["lsq", "mean", "select"]),
    seed=st.integers(0, 2**16),
    sharp=st.floats(0.1, 6.0),
    n=st.integers(1, 6),
)
def test_property_squeezed_rows_on_simplex(ht, data, grouping, mode, seed, sharp, n):
    hs = data.draw(st.integers(1, ht))
    groups = shd.group_heads(ht, hs, grouping)
    maps = torch.softmax(sharp * torch.randn(2, ht, n, n, generator=gen(seed)), -1)
    feats = torch.randn(2, ht, n, 3, generator=gen(seed + 1))
    out, weights = shd.squeeze(maps, feats, groups, mode)
    for w in weights:
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, hs, n), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 4), sharp=st.floats(0.2, 4.0))
def test_property_lsq_no_worse_than_mean_for_pairs_and_interior(seed, k, sharp):
    maps = torch.softmax(sharp * torch.randn(1, k, 4, 4, dtype=F64, generator=gen(seed)), -1)
    feats = torch.randn(1, k, 4, 3, dtype=F64, generator=gen(seed + 7))
    gram, rhs = shd.squeeze_statistics(maps, feats)
    w = shd.solve_weights(gram, rhs, "lsq")[0].double()
    e = ref_objective(maps[0], feats[0], w)
    e_mean = ref_objective(maps[0], feats[0], [1.0 / k] * k)
    e_vertex = min(ref_objective(maps[0], feats[0], torch.eye(k, dtype=F64)[h]) for h in range(k))
    tol = 1e-6 * (1.0 + e)
    assert e <= e_mean + tol and e <= e_vertex + tol


# =========================================================================== reconstruction_error
def ref_reconstruction_error(maps, feats, weights):
    out = torch.zeros(maps.shape[0], dtype=F64)
    for b in range(maps.shape[0]):
        s, t, _ = ref_group_setup(maps[b], feats[b])
        merged = torch.zeros_like(maps[b, 0])
        for h in range(maps.shape[1]):
            merged = merged + float(weights[b, h]) * maps[b, h]
        out[b] = math.sqrt(float(torch.sum((merged @ s - t) ** 2))) / math.sqrt(float(torch.sum(t**2)))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reconstruction_error_matches_reference(k):
    maps = rand_maps(3, k, 5, 6, seed=130 + k)
    feats = rand_feats(3, k, 6, 4, seed=140 + k)
    weights = simplex_samples(k, 3, seed=150 + k)
    got = shd.reconstruction_error(maps, feats, weights)
    assert got.shape == (3,)
    torch.testing.assert_close(got, ref_reconstruction_error(maps, feats, weights), atol=1e-10, rtol=1e-10)
    if k == 1:
        torch.testing.assert_close(got, torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_reconstruction_error_zero_for_identical_heads(k):
    maps = rand_maps(2, 1, 5, 5, seed=160).expand(2, k, 5, 5).clone()
    feats = rand_feats(2, k, 5, 3, seed=161)
    for weights in (torch.full((2, k), 1.0 / k, dtype=F64), simplex_samples(k, 2, seed=162)):
        torch.testing.assert_close(
            shd.reconstruction_error(maps, feats, weights), torch.zeros(2, dtype=F64), atol=1e-12, rtol=0
        )
    _, ws = shd.squeeze(maps, feats, [list(range(k))])
    torch.testing.assert_close(
        shd.reconstruction_error(maps, feats, ws[0]), torch.zeros(2, dtype=F64), atol=1e-6, rtol=0
    )


def test_reconstruction_error_lsq_pair_is_best_on_grid():
    maps, feats = pair_case(170)
    gram, rhs = shd.squeeze_statistics(maps, feats)
    w = shd.solve_weights(gram, rhs, "lsq")
    e = float(shd.reconstruction_error(maps, feats, w))
    for a in torch.linspace(0, 1, 101, dtype=F64):
        other = torch.tensor([[float(a), 1 - float(a)]], dtype=F64)
        assert e <= float(shd.reconstruction_error(maps, feats, other)) + 1e-6


# =========================================================================== attention KD loss
def kd_case(seed=0, b=2, h=3, n=5, m=6, dtype=F64):
    g = gen(seed)
    target = torch.softmax(2 * torch.randn(b, h, n, m, dtype=F64, generator=g), -1).to(dtype)
    scores = torch.randn(b, h, n, m, dtype=F64, generator=g).to(dtype)
    row_mask = torch.ones(b, n, dtype=torch.bool)  # right padding: sample i has its last i + 1 rows padded
    for i in range(b):
        row_mask[i, max(1, n - 1 - i) :] = False
    return target, scores, row_mask


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_kd_loss_matches_reference(kind, use_mask):
    target, scores, row_mask = kd_case(seed=1)
    rm = row_mask if use_mask else None
    for tau in (1.0, 2.0):
        got = shd.attention_kd_loss(target, scores, rm, kind, tau)
        assert got.dim() == 0
        assert abs(float(got) - ref_kd_loss(target, scores, rm, kind, tau)) <= 1e-10


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_rows_sum_and_count(kind):
    target, scores, row_mask = kd_case(seed=2)
    total, count = shd.attention_kd_rows(target, scores, row_mask, kind)
    n_valid = int(row_mask.sum())
    assert float(count) == n_valid * target.shape[1]
    mean = ref_kd_loss(target, scores, row_mask, kind)
    assert abs(float(total) - mean * n_valid * target.shape[1]) <= 1e-9
    total_all, count_all = shd.attention_kd_rows(target, scores, None, kind)
    assert float(count_all) == target.shape[0] * target.shape[1] * target.shape[2]
    assert abs(float(total_all) - ref_kd_loss(target, scores, None, kind) * float(count_all)) <= 1e-9


def test_attention_kd_unknown_kind_raises():
    target, scores, row_mask = kd_case(seed=3)
    with pytest.raises(ValueError, match="bogus"):
        shd.attention_kd_loss(target, scores, row_mask, "bogus")


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_zero_when_student_reproduces_target(kind):
    target, scores, row_mask = kd_case(seed=4)
    exact = torch.log(target)  # softmax(log t) == t
    loss = shd.attention_kd_loss(target, exact, row_mask, kind, tau=2.0)
    assert abs(float(loss)) <= 1e-12
    # shifted logits give the same distribution
    assert abs(float(shd.attention_kd_loss(target, exact + 3.0, row_mask, kind))) <= 1e-12


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_masked_keys_finite_loss_and_grads(kind):
    q, k = qk(seed=5, b=2, h=2, n=5, d=3)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    target = shd.attention_maps(q, k, 0.5, causal).double()
    scores = shd.attention_scores(q * 0.3, k, 0.5, causal).double().requires_grad_(True)
    assert torch.isneginf(scores.detach()[..., ~causal[0, 0]]).all()
    row_mask = torch.ones(2, 5, dtype=torch.bool)
    loss = shd.attention_kd_loss(target, scores, row_mask, kind)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_kd_loss(target, scores.detach(), row_mask, kind)) <= 1e-10
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[..., ~causal[0, 0]] == 0).all()
    # reproducing the target exactly (with the same -inf keys) gives zero
    exact = torch.log(target).masked_fill(~causal, float("-inf"))
    assert abs(float(shd.attention_kd_loss(target, exact, row_mask, kind))) <= 1e-6


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_padded_rows_excluded(kind):
    target, scores, row_mask = kd_case(seed=6)
    padded = ~row_mask[:, None, :].expand(scores.shape[:-1])  # [B, H, c]
    assert padded.any() and not padded.all()
    base = float(shd.attention_kd_loss(target, scores, row_mask, kind))
    # different student scores on padded rows: same loss
    changed = scores.clone()
    changed[padded] = 10.0 * torch.randn(int(padded.sum()), scores.shape[-1], dtype=F64, generator=gen(7))
    assert float(shd.attention_kd_loss(target, changed, row_mask, kind)) == base
    # a different (valid) target on padded rows: same loss
    changed_t = target.clone()
    changed_t[padded] = 1.0 / target.shape[-1]
    assert float(shd.attention_kd_loss(changed_t, scores, row_mask, kind)) == base
    # padded rows get no gradient
    s = scores.clone().requires_grad_(True)
    shd.attention_kd_loss(target, s, row_mask, kind).backward()
    assert (s.grad[padded] == 0).all()
    assert (s.grad[~padded] != 0).any()


def test_attention_kd_padded_rows_with_finite_garbage_do_not_change_gradient():
    target, scores, row_mask = kd_case(seed=8)
    s1 = scores.clone().requires_grad_(True)
    shd.attention_kd_loss(target, s1, row_mask).backward()
    s2 = scores.clone()
    s2[~row_mask[:, None, :].expand_as(scores[..., 0])] = -50.0
    s2.requires_grad_(True)
    shd.attention_kd_loss(target, s2, row_mask).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_fully_masked_padded_row_is_excluded(kind):
    target, scores, _ = kd_case(seed=9, b=1, h=1, n=3, m=4)
    row_mask = torch.tensor([[True, True, False]])
    s = scores.clone()
    s[0, 0, 2] = float("-inf")
    s.requires_grad_(True)
    loss = shd.attention_kd_loss(target, s, row_mask, kind)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_kd_loss(target, scores, row_mask, kind)) <= 1e-10
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_kl_tau_squared_scaling_only_for_kl():
    target, scores, row_mask = kd_case(seed=10)
    for kind in ("kl", "mse", "cosine"):
        one = float(shd.attention_kd_loss(target, scores, row_mask, kind, tau=1.0))
        for tau in (0.5, 2.0, 3.0):
            got = float(shd.attention_kd_loss(target, scores, row_mask, kind, tau=tau))
            factor = tau * tau if kind == "kl" else 1.0
            assert abs(got - factor * one) <= 1e-10 * (1 + abs(got))
            assert shd.loss_scale(kind, tau) == factor


@pytest.mark.parametrize("mode", ["lsq", "mean", "select"])
@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_identity_grouping_reduces_to_plain_attention_kd(mode, kind):
    teacher = rand_maps(2, 3, 5, 5, seed=11)
    feats = rand_feats(2, 3, 5, 4, seed=12)
    target, weights = shd.squeeze(teacher, feats, shd.group_heads(3, 3), mode)
    assert torch.equal(target, teacher)
    for w in weights:
        assert torch.equal(w, torch.ones(2, 1))
    scores = torch.randn(2, 3, 5, 5, dtype=F64, generator=gen(13))
    row_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert float(shd.attention_kd_loss(target, scores, row_mask, kind, 2.0)) == float(
        shd.attention_kd_loss(teacher, scores, row_mask, kind, 2.0)
    )
    assert (
        abs(
            float(shd.attention_kd_loss(target, scores, row_mask, kind, 2.0))
            - ref_kd_loss(teacher, scores, row_mask, kind, 2.0)
        )
        <= 1e-10
    )


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_attention_kd_gradcheck(kind):
    target, scores, row_mask = kd_case(seed=14, b=1, h=2, n=3, m=4)
    s = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: shd.attention_kd_loss(target, x, row_mask, kind, 1.5), (s,), eps=1e-6, atol=1e-6
    )


def test_attention_kl_gradient_closed_form():
    # d/ds KL(t || softmax(s)) summed over keys = softmax(s) - t per valid row; loss is a mean over valid rows.
    target, scores, row_mask = kd_case(seed=15, b=2, h=2, n=4, m=5)
    s = scores.clone().requires_grad_(True)
    shd.attention_kd_loss(target, s, row_mask, "kl").backward()
    count = float(row_mask.sum()) * 2
    expected = (torch.softmax(scores, -1) - target) / count
    expected = expected * row_mask[:, None, :, None].to(F64)
    torch.testing.assert_close(s.grad, expected, atol=1e-12, rtol=1e-10)


def test_attention_kd_float32_path():
    target, scores, row_mask = kd_case(seed=16, dtype=torch.float32)
    for kind in ("kl", "mse", "cosine"):
        got = shd.attention_kd_loss(target, scores, row_mask, kind)
        assert got.dtype == torch.float32
        assert abs(float(got) - ref_kd_loss(target, scores, row_mask, kind)) <= 1e-5


# =========================================================================== js_divergence
def test_js_divergence_matches_reference_and_properties():
    g = gen(17)
    p = torch.softmax(2 * torch.randn(3, 4, 6, dtype=F64, generator=g), -1)
    q = torch.softmax(2 * torch.randn(3, 4, 6, dtype=F64, generator=g), -1)
    js = shd.js_divergence(p, q)
    assert js.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert abs(float(js[i, j]) - ref_js(p[i, j], q[i, j])) <= 1e-12
    torch.testing.assert_close(js, shd.js_divergence(q, p), atol=1e-14, rtol=0)
    assert (js >= 0).all() and (js <= math.log(2) + 1e-12).all()
    torch.testing.assert_close(shd.js_divergence(p, p), torch.zeros(3, 4, dtype=F64), atol=1e-14, rtol=0)


def test_js_divergence_zeros_disjoint_and_broadcast():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    q = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=F64)
    assert abs(float(shd.js_divergence(p, q)) - math.log(2)) <= 1e-12
    r = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64)
    assert abs(float(shd.js_divergence(p, r)) - ref_js(p, r)) <= 1e-12
    assert float(shd.js_divergence(r, r)) == 0.0
    batch = torch.stack([p, q, r])
    torch.testing.assert_close(
        shd.js_divergence(batch, r), torch.tensor([ref_js(x, r) for x in batch], dtype=F64), atol=1e-12, rtol=0
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(1, 8), sharp=st.floats(0.0, 20.0))
def test_property_js_bounds_and_symmetry(seed, m, sharp):
    g = gen(seed)
    p = torch.softmax(sharp * torch.randn(3, m, dtype=F64, generator=g), -1)
    q = torch.softmax(sharp * torch.randn(3, m, dtype=F64, generator=g), -1)
    js = shd.js_divergence(p, q)
    assert torch.isfinite(js).all()
    assert (js >= -1e-15).all() and (js <= math.log(2) + 1e-12).all()
    torch.testing.assert_close(js, shd.js_divergence(q, p), atol=1e-14, rtol=0)
