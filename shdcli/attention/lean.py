"""The memory-lean, fast SHD loss of one mapped layer: row chunks, fused student loss, exact.

Computes the same loss and gradients as the naive path in losses.py (whole [B, H, N, M] maps per
layer), differently:
  * Query rows are processed in chunks of c rows; a chunk needs keys [0, m) only, where m is one past
    the last key any of its rows may see (causal attention: m = the chunk's last row + 1, so causal
    layers do about half the work of whole maps). Working memory is O(B H c M).
  * GQA without copies: the r query heads that share a key/value head are stacked as r * c rows of
    one matmul against that head's keys ([B, Hkv, r c, d] @ [B, Hkv, d, m]), for teacher and student.
  * Squeeze statistics (shd.squeeze_statistics) from A_h V instead of A_h S and A_h X_h: with
    X_h = V_kv(h) R_h (shd.group_feature_bases), P_h = A_h S = (A_h V_U) Rs and T = sum_h (A_h V_U) E_h,
    where V_U stacks the group's distinct value heads (usually one under GQA). One [c, m] x [m, u d]
    product per head instead of two of width k d. They are sums over rows: a first pass accumulates
    them, then the weights are solved; the teacher chunks of that pass are kept for the second pass
    when the layer's maps fit the budget, else recomputed. Groups of one head need no statistics.
  * The student's loss and its gradients w.r.t. q and k are computed together, chunk by chunk, in the
    forward of one autograd Function (softmax written once, in place); only dq [B, Hs, N, d] and
    dk [B, Hkv, M, d] are kept for backward: O(N d) per layer instead of O(N M).
Masked keys get a large finite negative score instead of -inf (exp gives exactly 0 either way), so no
0 * inf appears; rows with no allowed key become uniform, as in shd.attention_scores.
Soft-capped layers (Gemma-2, LayerRecord.softcap = c) score c tanh(q k^T scaling / c) / tau; the student's
gradient passes through the cap, d score / d raw = (1 - tanh^2) / tau (one more chunk-sized tensor).
"""

from __future__ import annotations

import functools

import torch

from shdcli.attention.capture import LayerRecord
from shdcli.attention.shd import solve_weights

NEG = -1e30  # "minus infinity" that stays finite: exp(NEG - max) == 0 and 0 * NEG == 0
TINY = 1e-30  # t log t at t < TINY is below 1e-28: dropped
DEFAULT_BUDGET = 64 * 2**20  # bytes of chunk working memory (and of kept teacher maps) per layer
BLOCK_BYTES = 4 * 2**20  # preferred size of one chunk of teacher maps (see auto_chunk_rows)


# --------------------------------------------------------------------------- chunking
def auto_chunk_rows(batch: int, t_heads: int, s_heads: int, rows: int, keys: int,
                    budget_bytes: int = DEFAULT_BUDGET, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per chunk: a teacher block [B, Ht, c, M] of about block_bytes (cache-sized: measured fastest on
    CPU, and short row blocks let causal chunks stop at their last key), at least 16 rows against Python
    overhead, and the whole working set (teacher block, squeezed target, student scores and a temporary,
    float32 each) within budget_bytes."""
    keys = max(keys, 1)
    c = max(16, block_bytes // (batch * t_heads * keys * 4))
    c = min(c, max(1, budget_bytes // (batch * (t_heads + 3 * s_heads) * keys * 4)))
    return max(1, min(rows, c))


def _key_needs(rec: LayerRecord, row_mask: torch.Tensor | None) -> list[int]:
    """Per query row, the number of leading keys it can see (1 + its last allowed key). A counted row
    with no allowed key needs every key (it is uniform over all keys, as in the naive path)."""
    keys, queries = rec.key.shape[2], rec.query.shape[2]
    if rec.allowed is None:
        if rec.causal:
            offset = keys - queries
            return [min(keys, max(1, i + 1 + offset)) for i in range(queries)]
        return [keys] * queries
    allowed = rec.allowed[:, 0]  # [B|1, N, M]
    seen = allowed.any(dim=0)  # [N, M]
    last = keys - seen.flip(-1).to(torch.uint8).argmax(dim=-1)  # 1 + last allowed key of each row
    need = torch.where(seen.any(dim=-1), last, torch.zeros_like(last))
    dead = ~allowed.any(dim=-1)  # [B|1, N]
    if row_mask is not None:
        dead = dead & row_mask
    need = torch.where(dead.any(dim=0), torch.full_like(need, keys), need)
    return need.tolist()


@functools.lru_cache(maxsize=32)
def _upper(c: int, device: torch.device) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).triu(1)


def _query_factor(rec: LayerRecord, tau: float) -> float:
    """What the queries are multiplied by before q k^T: scaling / tau, or scaling alone when the
    scores are soft-capped (the temperature then divides the capped scores, _masked_scores)."""
    return rec.scaling if rec.softcap is not None else rec.scaling / tau


def _masked_scores(rec: LayerRecord, q: torch.Tensor, k: torch.Tensor, start: int, stop: int, m: int,
                   not_allowed: torch.Tensor | None, tau: float = 1.0, slopes: list | None = None) -> torch.Tensor:
    """Scaled, masked scores of rows [start, stop) against keys [0, m).

    q [B, H, c, d] already multiplied by _query_factor, k [B, Hkv, M, d] contiguous float32;
    not_allowed bool [B|1, 1, N, M] or None. Soft-capped records: scores = c tanh(raw / c) / tau, and
    when `slopes` is a list the derivative (1 - tanh^2) / tau [B, H, c, m] is appended to it.
    Returns [B, H, c, m] (contiguous, float32).
    """
    bsz, heads, c, d = q.shape
    kv = k.shape[1]
    r = heads // kv
    scores = torch.matmul(q.reshape(bsz, kv, r * c, d), k[:, :, :m].transpose(-1, -2))  # [B, Hkv, r c, m]
    if rec.softcap is not None:
        cap = rec.softcap
        scores.div_(cap).tanh_()
        if slopes is not None:
            slopes.append((1.0 - scores * scores).div_(tau).view(bsz, heads, c, m))
        scores.mul_(cap / tau)
    s5 = scores.view(bsz, kv, r, c, m)
    if not_allowed is not None:
        s5.masked_fill_(not_allowed[:, :, start:stop, :m].unsqueeze(2), NEG)
    elif rec.causal:
        first = start + rec.key.shape[2] - rec.query.shape[2]  # key of row `start` on the diagonal
        if first < m:
            width = min(c, m - first)
            s5[..., first:first + width].masked_fill_(_upper(c, scores.device)[:, :width], NEG)
            s5[..., first + width:].fill_(NEG)
    return scores.view(bsz, heads, c, m)


# --------------------------------------------------------------------------- the squeeze
class _GroupStats:
    """One multi-head group's least-squares statistics, accumulated over row chunks (see module doc)."""

    def __init__(self, heads: list[int], kv_repeat: int, values: torch.Tensor, basis: torch.Tensor | None) -> None:
        k = len(heads)
        d = values.shape[-1]
        kvs = [h // kv_repeat for h in heads]
        distinct = sorted(set(kvs))
        u = len(distinct)
        self.k, self.ud = k, u * d
        self.sl = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
        # V_U [B, M, u d]: the group's distinct value heads side by side.
        self.values = values[:, distinct[0]] if u == 1 else torch.cat([values[:, j] for j in distinct], dim=-1)
        basis = _basis(basis, k, d, values.device)
        width = basis.shape[-1]
        rs = torch.zeros(u * d, width, device=values.device)  # S = V_U Rs
        e = torch.zeros(k, u * d, width, device=values.device)  # T = sum_h (A_h V_U) E_h
        for i, j in enumerate(kvs):
            slot = distinct.index(j)
            rs[slot * d:(slot + 1) * d] += basis[i]
            e[i, slot * d:(slot + 1) * d] = basis[i]
        self.rs, self.e = rs, e.reshape(k * u * d, width)
        bsz = values.shape[0]
        self.gram = torch.zeros(bsz, k, k, device=values.device)
        self.rhs = torch.zeros(bsz, k, device=values.device)

    def add(self, maps: torch.Tensor, rows: torch.Tensor | None) -> None:
        """maps [B, Ht, c, m] (teacher, one chunk); rows [B, c] float (1 = counted) or None."""
        bsz, _, c, m = maps.shape
        group = maps[:, self.sl]
        y = torch.matmul(group.reshape(bsz, self.k * c, m), self.values[:, :m])  # A_h V_U: [B, k c, u d]
        y = y.view(bsz, self.k, c, self.ud)
        if rows is not None:
            y = y * rows[:, None, :, None]
        p = torch.matmul(y, self.rs).reshape(bsz, self.k, -1)  # P_h = A_h S: [B, k, c D']
        t = torch.matmul(y.transpose(1, 2).reshape(bsz, c, -1), self.e).reshape(bsz, -1, 1)  # T: [B, c D', 1]
        self.gram += torch.bmm(p, p.transpose(1, 2))
        self.rhs += torch.bmm(p, t).squeeze(-1)


class _UniformStats:
    """All groups at once when they are Hs contiguous groups of k heads, each inside one value head (the
    usual GQA case): one [r c, m] x [m, d] product per value head gives A_h V_kv(h) for every head."""

    def __init__(self, hs: int, kv_repeat: int, values: torch.Tensor, bases: list[torch.Tensor] | None) -> None:
        bsz, _, _, d = values.shape
        self.hs, self.r, self.values = hs, kv_repeat, values
        self.k = k = values.shape[1] * kv_repeat // hs
        basis = torch.stack([_basis(None if bases is None else bases[j], k, d, values.device) for j in range(hs)])
        self.rs = basis.sum(dim=1)  # [Hs, d, D']: S = V Rs
        self.e = basis.reshape(hs, k * d, -1)  # [Hs, k d, D']: T = [A_h V]_h E
        self.gram = torch.zeros(bsz, hs, k, k, device=values.device)
        self.rhs = torch.zeros(bsz, hs, k, device=values.device)

    @staticmethod
    def applies(groups: list[list[int]], ht: int, kv_repeat: int) -> bool:
        k = len(groups[0])
        return (k > 1 and all(len(g) == k for g in groups) and [h for g in groups for h in g] == list(range(ht))
                and all(g[0] // kv_repeat == g[-1] // kv_repeat for g in groups))

    def add(self, maps: torch.Tensor, rows: torch.Tensor | None) -> None:
        bsz, ht, c, m = maps.shape
        kv = self.values.shape[1]
        y = torch.matmul(maps.view(bsz, kv, self.r * c, m), self.values[:, :, :m])  # [B, Hkv, r c, d]
        y = y.view(bsz, self.hs, self.k, c, -1)  # A_h V_kv(h) per group
        if rows is not None:
            y = y * rows[:, None, None, :, None]
        p = torch.matmul(y.reshape(bsz, self.hs, self.k * c, -1), self.rs).reshape(bsz, self.hs, self.k, -1)
        t = torch.matmul(y.transpose(2, 3).reshape(bsz, self.hs, c, -1), self.e).reshape(bsz, self.hs, -1, 1)
        self.gram += torch.matmul(p, p.transpose(-1, -2))
        self.rhs += torch.matmul(p, t).squeeze(-1)

    def weights(self, mode: str) -> list[torch.Tensor]:
        bsz = self.gram.shape[0]
        w = solve_weights(self.gram.reshape(-1, self.k, self.k), self.rhs.reshape(-1, self.k), mode)
        return list(w.view(bsz, self.hs, self.k).unbind(dim=1))


def _basis(basis: torch.Tensor | None, k: int, d: int, device: torch.device) -> torch.Tensor:
    """R_h [k, d, D'] (X_h = V R_h); identity when the output projection is unknown (X_h = V)."""
    if basis is None:
        return torch.eye(d, device=device).expand(k, d, d)
    return basis.to(device=device, dtype=torch.float32)


class _Squeezer:
    """Maps a teacher chunk [B, Ht, c, m] to the squeezed target [B, Hs, c, m] with fixed weights."""

    def __init__(self, groups: list[list[int]], weights: list[torch.Tensor], ht: int) -> None:
        self.groups, self.weights = groups, weights
        sizes = {len(g) for g in groups}
        in_order = [h for g in groups for h in g] == list(range(ht))
        self.identity = in_order and sizes == {1}
        self.uniform = in_order and len(sizes) == 1 and not self.identity
        if self.uniform:
            self.w = torch.stack(weights, dim=1).unsqueeze(-2)  # [B, Hs, 1, k]

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        bsz, ht, c, m = maps.shape
        if self.identity:
            return maps
        hs = len(self.groups)
        if self.uniform:
            return torch.matmul(self.w, maps.view(bsz, hs, ht // hs, c * m)).view(bsz, hs, c, m)
        out = []
        for g, w in zip(self.groups, self.weights):
            if len(g) == 1:
                out.append(maps[:, g[0]])
            else:
                out.append(torch.matmul(w.unsqueeze(1), maps[:, g].reshape(bsz, len(g), c * m)).view(bsz, c, m))
        return torch.stack(out, dim=1)


# --------------------------------------------------------------------------- the student's loss
def _rows_loss_and_grad(scores: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None, kind: str,
                        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed per-row loss of softmax(scores) against target over counted rows, and d(sum)/d(scores).

    scores [B, H, c, m] (consumed: overwritten in place), target [B, H, c, m], rows [B, c] float or None.
    """
    scores.sub_(scores.amax(dim=-1, keepdim=True))  # shifted logits; masked keys stay ~NEG
    probs = torch.softmax(scores, dim=-1)
    if kind == "kl":
        # sum_j t (log t - log p) with log p = shifted - log z and log z = -log max_j p (at the shifted 0).
        # Rows of t sum to 1. log of a clamped t: t = 0 contributes 0, and log(0) is a slow path on CPU.
        log_t = target.clamp_min(TINY).log_()
        per_row = log_t.sub_(scores).mul_(target).sum(dim=-1) - probs.amax(dim=-1).log()
        grad = probs.sub_(target) if need_grad else None  # d/ds = p sum(t) - t
    elif kind == "mse":
        diff = probs - target
        per_row = diff.pow(2).sum(dim=-1)
        if need_grad:  # g = 2 (p - t); ds = p * (g - <p, g>)
            g = diff.mul_(2.0)
            grad = g.sub_((probs * g).sum(dim=-1, keepdim=True)).mul_(probs)
        else:
            grad = None
    elif kind == "cosine":
        pn = probs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        tn = target.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        cos = (probs * target).sum(dim=-1, keepdim=True) / (pn * tn)
        per_row = 1.0 - cos.squeeze(-1)
        if need_grad:  # dL/dp = -(t / (|p||t|) - cos p / |p|^2); ds = p * (g - <p, g>)
            g = probs * (cos / (pn * pn)) - target / (pn * tn)
            grad = g.sub_((probs * g).sum(dim=-1, keepdim=True)).mul_(probs)
        else:
            grad = None
    else:
        raise ValueError(f"unknown attention loss {kind!r} (use kl, mse or cosine)")
    if rows is not None:
        per_row = per_row * rows[:, None, :]
        if grad is not None:
            grad.mul_(rows[:, None, :, None])
    return per_row.sum(), grad


class _FusedStudentLoss(torch.autograd.Function):
    """loss = layer(q, k) with the gradients computed in forward (see module doc); backward scales them."""

    @staticmethod
    def forward(ctx, query, key, student_pass):  # noqa: D401 - autograd API
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total, dq, dk = student_pass.run(query.detach(), key.detach(), need_grad)
        ctx.save_for_backward(dq, dk)
        ctx.dtypes = (query.dtype, key.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk = ctx.saved_tensors
        return (dq * grad_out).to(ctx.dtypes[0]), (dk * grad_out).to(ctx.dtypes[1]), None


# --------------------------------------------------------------------------- one layer
class TeacherChunks:
    """The teacher's softened maps of one layer, one chunk of query rows at a time.

    bounds[i] = (a, b): the rows of chunk i; stops[i]: the keys any row of it can see (the rest is
    masked for every row). Maps are recomputed on demand unless `keep` holds them from the weight
    solve (when they fit the memory budget); `take(i)` hands a kept chunk over and forgets it."""

    def __init__(self, teacher: LayerRecord, row_mask: torch.Tensor | None, student: LayerRecord, tau: float,
                 chunk_rows: int, budget_bytes: int) -> None:
        bsz, ht, n, _ = teacher.query.shape
        need = [max(x, y) for x, y in zip(_key_needs(teacher, row_mask), _key_needs(student, row_mask))]
        chunk = chunk_rows or auto_chunk_rows(bsz, ht, student.query.shape[1], n, teacher.key.shape[2], budget_bytes)
        self.bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
        self.stops = [max(1, max(need[a:b])) for a, b in self.bounds]
        self.teacher, self.key = teacher, teacher.key.float().contiguous()
        self.not_allowed = None if teacher.allowed is None else ~teacher.allowed
        self.factor, self.tau = _query_factor(teacher, tau), tau
        self.fits = sum(bsz * ht * (b - a) * m * 4 for (a, b), m in zip(self.bounds, self.stops)) <= budget_bytes
        self.kept: list[torch.Tensor | None] = []

    def maps(self, i: int) -> torch.Tensor:
        """Chunk i: [B, Ht, b - a, stops[i]] float32 softmax(q k^T * scaling / tau)."""
        a, b = self.bounds[i]
        q = self.teacher.query[:, :, a:b].float() * self.factor
        return torch.softmax(_masked_scores(self.teacher, q, self.key, a, b, self.stops[i], self.not_allowed, self.tau),
                             dim=-1)

    def take(self, i: int) -> torch.Tensor:
        if not self.kept:
            return self.maps(i)
        maps, self.kept[i] = self.kept[i], None  # free as we go
        return maps


def solve_squeeze_weights(chunks: TeacherChunks, groups: list[list[int]], bases: list[torch.Tensor] | None,
                          row_mask: torch.Tensor | None, alpha: str) -> list[torch.Tensor]:
    """Phase 1: the closed-form squeeze weights (Hs x [B, k]) from the teacher's maps and features,
    accumulated over row chunks; keeps the chunks in `chunks.kept` when they fit the budget."""
    teacher = chunks.teacher
    bsz, ht = teacher.query.shape[:2]
    device = teacher.query.device
    multi = [i for i, g in enumerate(groups) if len(g) > 1]
    if alpha == "mean" or not multi:
        return [torch.full((bsz, len(g)), 1.0 / len(g), device=device) for g in groups]
    values = teacher.value.float().contiguous()
    if _UniformStats.applies(groups, ht, teacher.kv_repeat):
        uniform = _UniformStats(len(groups), teacher.kv_repeat, values, bases)
        accumulators: list = [uniform]
    else:
        uniform = None
        stats = {i: _GroupStats(groups[i], teacher.kv_repeat, values, None if bases is None else bases[i])
                 for i in multi}
        accumulators = list(stats.values())
    rows_f = None if row_mask is None else row_mask.float()
    for i, (a, b) in enumerate(chunks.bounds):
        maps = chunks.maps(i)
        rows = None if rows_f is None else rows_f[:, a:b]
        for acc in accumulators:
            acc.add(maps, rows)
        if chunks.fits:
            chunks.kept.append(maps)
    if uniform is not None:
        return uniform.weights(alpha)
    return [solve_weights(stats[i].gram, stats[i].rhs, alpha) if i in stats else torch.ones(bsz, 1, device=device)
            for i in range(len(groups))]


class StudentPass:
    """Phase 2: the fused student loss over row chunks against the squeezed targets, with dq and dk
    formed in the same pass (run by _FusedStudentLoss, or directly when no gradient is needed)."""

    def __init__(self, student: LayerRecord, chunks: TeacherChunks, squeeze: _Squeezer,
                 row_mask: torch.Tensor | None, kind: str, tau: float) -> None:
        self.student, self.chunks, self.squeeze, self.kind = student, chunks, squeeze, kind
        self.rows_f = None if row_mask is None else row_mask.float()
        self.factor, self.tau = _query_factor(student, tau), tau

    def run(self, q_s: torch.Tensor, k_s: torch.Tensor, need_grad: bool):
        """(summed loss, dq or None, dk or None) for student queries q_s [B, Hs, N, d], keys k_s [B, Hkv, M, d]."""
        device, bsz, hs = q_s.device, q_s.shape[0], q_s.shape[1]
        with torch.autocast(device.type, enabled=False):
            k_f = k_s.float().contiguous()
            s_not = None if self.student.allowed is None else ~self.student.allowed
            dq = torch.zeros(q_s.shape, device=device) if need_grad else None
            dk = torch.zeros(k_f.shape, device=device) if need_grad else None
            kv = k_f.shape[1]
            total = torch.zeros((), device=device)
            for i, (a, b) in enumerate(self.chunks.bounds):
                m = self.chunks.stops[i]
                maps = self.chunks.take(i)
                target = self.squeeze(maps)
                del maps
                q = q_s[:, :, a:b].float() * self.factor
                slopes: list[torch.Tensor] | None = [] if need_grad and self.student.softcap is not None else None
                scores = _masked_scores(self.student, q, k_f, a, b, m, s_not, self.tau, slopes)
                rows = None if self.rows_f is None else self.rows_f[:, a:b]
                part, grad = _rows_loss_and_grad(scores, target, rows, self.kind, need_grad)
                total += part
                if need_grad:
                    c = b - a
                    if slopes:  # through the soft cap: d score / d raw
                        grad.mul_(slopes.pop())
                    g = grad.view(bsz, kv, -1, m)  # [B, Hkv, r c, m]
                    dq[:, :, a:b] = torch.matmul(g, k_f[:, :, :m]).view(bsz, hs, c, -1) * self.factor
                    dk[:, :, :m] += torch.matmul(g.transpose(-1, -2), q.reshape(bsz, kv, -1, q.shape[-1]))
            return total, dq, dk


def lean_layer_loss(
    teacher: LayerRecord,
    student: LayerRecord,
    groups: list[list[int]],
    bases: list[torch.Tensor] | None,
    row_mask: torch.Tensor | None,
    alpha: str = "lsq",
    kind: str = "kl",
    tau: float = 1.0,
    chunk_rows: int = 0,
    budget_bytes: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Summed per-row loss of one (student layer, teacher layer) pair, the number of counted rows,
    and the squeeze weights (Hs x [B, k]). Same meaning as the naive path's sums in losses.shd_loss."""
    if alpha not in ("lsq", "mean", "select"):
        raise ValueError(f"unknown alpha mode {alpha!r} (use lsq, mean or select)")
    if kind not in ("kl", "mse", "cosine"):
        raise ValueError(f"unknown attention loss {kind!r} (use kl, mse or cosine)")
    bsz, ht, n, _ = teacher.query.shape
    hs = student.query.shape[1]
    # ---- phase 1: squeeze weights (teacher only, no graph)
    with torch.autocast(student.query.device.type, enabled=False), torch.no_grad():
        chunks = TeacherChunks(teacher, row_mask, student, tau, chunk_rows, budget_bytes)
        weights = solve_squeeze_weights(chunks, groups, bases, row_mask, alpha)
        squeeze = _Squeezer(groups, weights, ht)
        device = student.query.device
        count = torch.tensor(float(bsz * hs * n), device=device) if row_mask is None else hs * row_mask.sum().float()
    # ---- phase 2: the fused student loss (gradients formed in forward)
    student_pass = StudentPass(student, chunks, squeeze, row_mask, kind, tau)
    if torch.is_grad_enabled() and (student.query.requires_grad or student.key.requires_grad):
        total = _FusedStudentLoss.apply(student.query, student.key, student_pass)
    else:
        with torch.no_grad():
            total = student_pass.run(student.query, student.key, False)[0]
    return total, count, weights
