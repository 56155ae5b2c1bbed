"""Squeezing-Heads Distillation math: pure functions on tensors, no models.

Notation (see shared/docs/shd_method.md):
  B batch, Ht teacher heads, Hs student heads, k heads in one group, N (or c) query rows,
  M keys, D model width. A_h is head h's attention map [N, M] (rows sum to 1), X_h = V_h W_O[h]
  its per-head output features [M, D]. A group G of teacher heads is squeezed into
  A~ = sum_h w_h A_h with w on the simplex, chosen per sample to minimise
  || sum_h w_h A_h S - T ||_F^2 with S = sum_h X_h and T = sum_h A_h X_h.

Every function that touches maps works on a block of query rows, so the same code serves the
naive path (all rows at once) and the memory-lean path (row chunks, statistics accumulated).
"""

from __future__ import annotations

from typing import Literal

import torch

AlphaMode = Literal["lsq", "mean", "select"]
AttnLoss = Literal["kl", "mse", "cosine"]
GroupingMode = Literal["balanced", "pairs"]


# --------------------------------------------------------------------------- head grouping
def group_heads(ht: int, hs: int, mode: GroupingMode = "balanced") -> list[list[int]]:
    """Contiguous groups of the ht teacher heads, one group per student head.

    balanced: hs groups whose sizes differ by at most one, larger groups first (12 -> 5: 3,3,2,2,2).
    pairs: the paper's progressive merging of adjacent pairs; an odd head passes a round unmerged,
           and the last round merges only as many pairs as needed to land exactly on hs.
    """
    if hs < 1 or ht < 1:
        raise ValueError(f"head counts must be positive (teacher {ht}, student {hs})")
    if hs > ht:
        raise ValueError(
            f"student has more heads ({hs}) than the teacher ({ht}); SHD squeezes teacher heads, "
            "so the student needs at most as many"
        )
    if mode == "balanced":
        base, extra = divmod(ht, hs)
        groups, start = [], 0
        for j in range(hs):
            size = base + (1 if j < extra else 0)
            groups.append(list(range(start, start + size)))
            start += size
        return groups
    if mode == "pairs":
        groups = [[h] for h in range(ht)]
        while len(groups) > hs:
            surplus = len(groups) - hs  # merges still needed
            merged: list[list[int]] = []
            i = 0
            while i < len(groups):
                if surplus > 0 and i + 1 < len(groups):
                    merged.append(groups[i] + groups[i + 1])
                    surplus -= 1
                    i += 2
                else:
                    merged.append(groups[i])
                    i += 1
            groups = merged
        return groups
    raise ValueError(f"unknown grouping mode {mode!r} (use balanced or pairs)")


# --------------------------------------------------------------------------- attention maps
def attention_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float, allowed: torch.Tensor | None, tau: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Temperature-softened, masked attention logits.

    query [B, H, c, d], key [B, H, M, d] (already expanded for GQA), allowed bool broadcastable to
    [B, H, c, M] (True = may attend) or None. softcap: the family's logit soft-capping (Gemma-2),
    scores = softcap * tanh(q k^T scaling / softcap) before the temperature. Returns [B, H, c, M]
    float32 with -inf where masked.
    """
    if softcap is None:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * (scaling / tau)
    else:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        scores = torch.tanh(scores / softcap) * (softcap / tau)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        # A query row with no allowed key (padding under a causal mask) would give NaN; make it
        # uniform instead. Such rows are padding and are excluded from the loss and the statistics.
        scores = scores.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return scores


def attention_maps(
    query: torch.Tensor, key: torch.Tensor, scaling: float, allowed: torch.Tensor | None, tau: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scaling / tau) (soft-capped first when softcap is given) with masked keys at zero.
    [B, H, c, M], rows sum to 1."""
    return torch.softmax(attention_scores(query, key, scaling, allowed, tau, softcap), dim=-1)


# --------------------------------------------------------------------------- the squeeze
def squeeze_statistics(
    maps: torch.Tensor, feats: torch.Tensor, row_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram statistics of one group's least-squares problem over a block of query rows.

    maps  [B, k, c, M]: the group's k teacher maps (rows of a chunk).
    feats [B, k, M, D]: the group's per-head features X_h.
    row_mask [B, c] bool: rows that count (padding excluded), or None for all.
    Returns G [B, k, k] with G_hg = <A_h S, A_g S> and b [B, k] with b_h = <A_h S, T>; both are
    sums over rows, so chunks add up to the whole-map statistics.
    """
    if row_mask is not None:
        maps = maps * row_mask[:, None, :, None].to(maps.dtype)
    s = feats.sum(dim=1)  # S: [B, M, D]
    p = torch.matmul(maps, s.unsqueeze(1))  # P_h = A_h S: [B, k, c, D]
    t = torch.matmul(maps, feats).sum(dim=1)  # T = sum_h A_h X_h: [B, c, D]
    gram = torch.einsum("bhcd,bgcd->bhg", p, p)
    rhs = torch.einsum("bhcd,bcd->bh", p, t)
    return gram, rhs


def solve_weights(gram: torch.Tensor, rhs: torch.Tensor, mode: AlphaMode = "lsq") -> torch.Tensor:
    """Group weights w [B, k] on the simplex from the statistics of `squeeze_statistics`.

    lsq: least squares on the simplex. k = 2 is the paper's closed form
         alpha = <M X_p, M S> / ||M S||^2 (M = A_p - A_q) written with G and b, clipped to [0, 1];
         k > 2 is the exact minimiser on the simplex (`simplex_least_squares`): the KKT solution
         when it is non-negative, else the best face. (Clamping the KKT solution at 0 and
         renormalising, as first sketched in shd_method.md, can be worse than a single head.)
    mean: w = 1/k (fixed alpha). select: one-hot on the head whose own map reconstructs T best.
    """
    if mode not in ("lsq", "mean", "select"):
        raise ValueError(f"unknown alpha mode {mode!r} (use lsq, mean or select)")
    bsz, k = rhs.shape
    gram = gram.double()
    rhs = rhs.double()
    if k == 1:
        return torch.ones(bsz, 1, dtype=torch.float32, device=rhs.device)
    if mode == "mean":
        return torch.full((bsz, k), 1.0 / k, dtype=torch.float32, device=rhs.device)
    if mode == "select":
        # ||A_h S - T||^2 = G_hh - 2 b_h + ||T||^2; ||T||^2 is the same for every h.
        err = torch.diagonal(gram, dim1=-2, dim2=-1) - 2 * rhs
        return torch.nn.functional.one_hot(err.argmin(dim=-1), k).float()
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)  # [B]
    if k == 2:
        # || w P_p + (1 - w) P_q - T ||^2 is minimised at w = <P_p - P_q, T - P_q> / ||P_p - P_q||^2.
        num = rhs[:, 0] - rhs[:, 1] - gram[:, 0, 1] + gram[:, 1, 1]
        den = gram[:, 0, 0] - 2 * gram[:, 0, 1] + gram[:, 1, 1]
        degenerate = den <= 1e-10 * scale  # identical maps: every alpha is optimal, take the middle
        alpha = torch.where(degenerate, torch.full_like(num, 0.5), num / den.clamp_min(1e-300)).clamp(0.0, 1.0)
        return torch.stack([alpha, 1.0 - alpha], dim=-1).float()
    gram = gram + (1e-9 * scale)[:, None, None] * torch.eye(k, dtype=gram.dtype, device=gram.device)
    return simplex_least_squares(gram, rhs).float()


def _affine_solve(gram: torch.Tensor, rhs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Minimise w^T G w - 2 b^T w subject to sum w = 1 and w = 0 off `support` (KKT system).

    gram [..., k, k], rhs [..., k], support bool [..., k] -> w [..., k].
    """
    k = rhs.shape[-1]
    on = support.to(gram.dtype)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    # Rows/columns off the support become identity rows with w = 0.
    g = gram * on[..., :, None] * on[..., None, :] + eye * (1 - on)[..., None, :]
    kkt = torch.zeros(*rhs.shape[:-1], k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    kkt[..., :k, :k] = g
    kkt[..., :k, k] = on
    kkt[..., k, :k] = on
    target = torch.cat([rhs * on, torch.ones_like(rhs[..., :1])], dim=-1)
    return torch.linalg.solve(kkt, target.unsqueeze(-1)).squeeze(-1)[..., :k] * on


def simplex_least_squares(gram: torch.Tensor, rhs: torch.Tensor, max_enumerate: int = 10) -> torch.Tensor:
    """argmin_w w^T G w - 2 b^T w over the probability simplex; G [B, k, k] positive definite.

    The equality-constrained KKT solution is optimal whenever it is non-negative (the common case).
    Otherwise the optimum lies on a face: for k <= max_enumerate every support is solved exactly and
    the best feasible one is kept; larger groups use projected gradient descent (FISTA).
    """
    bsz, k = rhs.shape
    full = torch.ones(bsz, k, dtype=torch.bool, device=rhs.device)
    w = _affine_solve(gram, rhs, full)
    bad = (w < 0).any(dim=-1)
    if not bad.any():
        return w
    g, b = gram[bad], rhs[bad]
    if k <= max_enumerate:
        codes = torch.arange(1, 2**k, device=rhs.device)
        supports = ((codes[:, None] >> torch.arange(k, device=rhs.device)) & 1).bool()  # [S, k]
        n_sup = supports.shape[0]
        cand = _affine_solve(
            g[:, None].expand(-1, n_sup, k, k), b[:, None].expand(-1, n_sup, k), supports[None].expand(len(b), -1, -1)
        )  # [b, S, k]
        obj = torch.einsum("bsk,bkl,bsl->bs", cand, g, cand) - 2 * torch.einsum("bsk,bk->bs", cand, b)
        obj = obj.masked_fill((cand < -1e-12).any(dim=-1), float("inf"))
        best = cand[torch.arange(len(b)), obj.argmin(dim=-1)].clamp_min(0.0)
    else:
        best = _projected_gradient(g, b)
    w = w.clone()
    w[bad] = best / best.sum(dim=-1, keepdim=True)
    return w


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v [..., k] onto the probability simplex (sort-based)."""
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    idx = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / idx) > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def _projected_gradient(gram: torch.Tensor, rhs: torch.Tensor, iters: int = 500) -> torch.Tensor:
    k = rhs.shape[-1]
    step = 1.0 / torch.linalg.eigvalsh(gram)[..., -1:].clamp_min(1e-300)  # 1 / L
    w = torch.full_like(rhs, 1.0 / k)
    y, t = w, 1.0
    for _ in range(iters):
        grad = torch.einsum("bkl,bl->bk", gram, y) - rhs
        w_next = project_simplex(y - step * grad)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w


def squeeze_weights(
    maps: torch.Tensor,
    feats: torch.Tensor,
    groups: list[list[int]],
    mode: AlphaMode = "lsq",
    row_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per-group weights from whole maps. maps [B, Ht, N, M], feats [B, Ht, M, D] -> Hs tensors [B, k_j]."""
    return [solve_weights(*squeeze_statistics(maps[:, g], feats[:, g], row_mask), mode) for g in groups]


def apply_weights(maps: torch.Tensor, groups: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor:
    """Squeezed maps A~_j = sum_{h in G_j} w_jh A_h. maps [B, Ht, c, M] -> [B, Hs, c, M]."""
    out = [torch.einsum("bk,bkcm->bcm", w.to(maps.dtype), maps[:, group]) for group, w in zip(groups, weights)]
    return torch.stack(out, dim=1)


def squeeze(
    maps: torch.Tensor,
    feats: torch.Tensor,
    groups: list[list[int]],
    mode: AlphaMode = "lsq",
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Squeeze Ht teacher maps [B, Ht, N, M] into Hs maps [B, Hs, N, M]; also returns the weights."""
    weights = squeeze_weights(maps, feats, groups, mode, row_mask)
    return apply_weights(maps, groups, weights), weights


def reconstruction_error(maps: torch.Tensor, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error ||A~ S - T|| / ||T|| of a squeezed group, per sample.

    maps [B, k, N, M], feats [B, k, M, D], weights [B, k] -> [B]. What the squeeze loses of the
    group's true output; used by inspect-heads and calibrated grouping.
    """
    s = feats.sum(dim=1)
    t = torch.matmul(maps, feats).sum(dim=1)  # [B, N, D]
    merged = torch.einsum("bk,bknm->bnm", weights.to(maps.dtype), maps)
    approx = torch.matmul(merged, s)
    return (approx - t).flatten(1).norm(dim=-1) / t.flatten(1).norm(dim=-1).clamp_min(1e-12)


def group_feature_bases(w_out: torch.Tensor, groups: list[list[int]], head_dim: int) -> list[torch.Tensor]:
    """Per-group bases R_h [k, d, D'] with D' = min(k d, D) such that X_h = V_h R_h has the same
    inner products as V_h W_O[h] for every quantity of the squeeze.

    All of G, b and the reconstruction error are Frobenius inner products of matrices Y W_G, where
    W_G [k d, D] stacks the group's rows of W_O. With K = W_G W_G^T = R R^T, <Y1 W_G, Y2 W_G> =
    <Y1 R, Y2 R>, so features of width k d replace width D (MiniLM 12 -> 4: 96 instead of 384):
    exact, and computed once, since the teacher's weights do not change.
    w_out [H d, D] in x @ W orientation.
    """
    d_model = w_out.shape[-1]
    out = []
    for group in groups:
        w_g = torch.cat([w_out[h * head_dim:(h + 1) * head_dim] for h in group]).double()  # [k d, D]
        if w_g.shape[0] < d_model:
            evals, evecs = torch.linalg.eigh(w_g @ w_g.t())
            w_g = evecs * evals.clamp_min(0).sqrt()  # R with R R^T = K
        out.append(w_g.float().reshape(len(group), head_dim, -1))
    return out


# --------------------------------------------------------------------------- the loss
def attention_kd_rows(
    target: torch.Tensor, student_scores: torch.Tensor, row_mask: torch.Tensor | None, kind: AttnLoss = "kl"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-row attention distillation loss over a block of rows, and the row count.

    target [B, H, c, M]: squeezed teacher maps (no grad), rows sum to 1, masked keys 0.
    student_scores [B, H, c, M]: the student's softened logits (-inf on masked keys), with grad.
    row_mask [B, c] bool: valid query rows (padding excluded), or None for all rows.
    kl: KL(target || student) summed over keys. mse: squared error summed over keys.
    cosine: 1 - cosine similarity of the two rows.
    """
    # A row with every key masked (padding) has no distribution; give it a uniform one so that no
    # NaN reaches the loss or its gradient. Such rows are excluded below.
    dead = (student_scores == float("-inf")).all(dim=-1, keepdim=True)
    student_scores = student_scores.masked_fill(dead, 0.0)
    if kind == "kl":
        log_student = torch.log_softmax(student_scores, dim=-1)
        # Keys where the target has no mass contribute nothing; zero the (possibly -inf) log there.
        log_student = log_student.masked_fill(target <= 0, 0.0)
        per_row = (torch.special.xlogy(target, target) - target * log_student).sum(dim=-1)
    elif kind == "mse":
        per_row = (torch.softmax(student_scores, dim=-1) - target).pow(2).sum(dim=-1)
    elif kind == "cosine":
        per_row = 1.0 - torch.nn.functional.cosine_similarity(torch.softmax(student_scores, dim=-1), target, dim=-1)
    else:
        raise ValueError(f"unknown attention loss {kind!r} (use kl, mse or cosine)")
    # per_row: [B, H, c]
    if row_mask is None:
        return per_row.sum(), torch.tensor(float(per_row.numel()), device=per_row.device)
    keep = row_mask[:, None, :].expand_as(per_row)
    # where, not multiply: a padded row may hold NaN/inf and 0 * NaN is NaN.
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum(), keep.sum().to(per_row.dtype)


def loss_scale(kind: AttnLoss, tau: float) -> float:
    """tau^2 keeps KL gradients comparable across temperatures (Hinton et al.); other losses are unscaled."""
    return tau * tau if kind == "kl" else 1.0


def attention_kd_loss(
    target: torch.Tensor,
    student_scores: torch.Tensor,
    row_mask: torch.Tensor | None,
    kind: AttnLoss = "kl",
    tau: float = 1.0,
) -> torch.Tensor:
    """Mean per-row attention distillation loss over (batch, heads, valid rows), scaled for tau."""
    total, count = attention_kd_rows(target, student_scores, row_mask, kind)
    return loss_scale(kind, tau) * total / count.clamp_min(1.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last dim. Shapes broadcast."""
    m = 0.5 * (p + q)
    kl_pm = torch.special.xlogy(p, p) - torch.special.xlogy(p, m)
    kl_qm = torch.special.xlogy(q, q) - torch.special.xlogy(q, m)
    return 0.5 * (kl_pm + kl_qm).sum(dim=-1)
