"""MiniLMv2 multi-head self-attention relation distillation (distill.target: relations).

Wang et al. 2021 (arXiv 2012.15828), as ported in bloomberg/minilmv2.bb (minilmv2/minilmv2.py):
for a mapped (student layer, teacher layer) pair and each of X in {Q, K, V}:
  * concatenate X over heads, [B, H, N, d] -> [B, N, H d], and re-split it into A_r relation heads
    of width d_r = H d / A_r: X_r [B, A_r, N, d_r] (teacher and student each with their own d_r, so
    any head counts work; with GQA, K and V have the KV width H_kv d);
  * relation R = softmax(X_r X_r^T / sqrt(d_r)) over keys, [B, A_r, N, N];
  * loss = KL(R_teacher || R_student) per row, summed over keys, averaged over relation heads and the
    sample's valid rows, then over the samples of the batch (the port's normalisation: / (A_r * len)
    per sample, / batch size); Q-Q, K-K and V-V weigh 1/3 each; mapped pairs are averaged.
Masks: padded query rows do not count and padded keys get no mass (the port crops each sample to its
length). For a causal student a token cannot see the future, so keys are restricted to the causal
prefix (MiniLMv2 is bidirectional; a causal relation row i is over keys 0..i). The key mask is the
student's own attention mask, used for the teacher rows too, so both rows are distributions over the
same keys. q/k are those the attention uses (after rotary embeddings for Llama-like models).
No temperature and always KL, as in MiniLMv2 (distill.temperature / attn_loss do not apply).

Memory: like lean.py, query rows go in chunks of c: the working set is [B, A_r, c, m] (m: keys the
chunk can see), and the student's loss and its gradient w.r.t. X are computed together in the forward
of one autograd Function, which keeps only dX [B, A_r, N, d_r] for backward. dL/dR = w (p - t) with
R = s X X^T gives dX += s (G X) for the rows and s (G^T X) for the keys.
"""

from __future__ import annotations

import math

import torch

from shdcli.attention.capture import LayerRecord
from shdcli.errors import ShdError

NEG = -1e30  # finite "minus infinity": exp(NEG - max) == 0, and NEG - NEG == 0 (no inf - inf)
BLOCK_BYTES = 4 * 2**20  # target size of one [B, A_r, c, m] float32 chunk


def relation_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, N, d] (heads of q, k or v) -> [B, A_r, N, H d / A_r] (concatenated, re-split)."""
    bsz, h, n, d = x.shape
    return x.transpose(1, 2).reshape(bsz, n, heads, h * d // heads).transpose(1, 2)


def default_relation_heads(t_rec: LayerRecord, s_rec: LayerRecord) -> int:
    """gcd of the teacher's and student's query and KV head counts: divides every width."""
    return math.gcd(t_rec.query.shape[1], t_rec.key.shape[1], s_rec.query.shape[1], s_rec.key.shape[1])


def check_relation_heads(heads: int, t_rec: LayerRecord, s_rec: LayerRecord) -> None:
    widths = {"teacher query": t_rec.query.shape[1] * t_rec.query.shape[3],
              "teacher key/value": t_rec.key.shape[1] * t_rec.key.shape[3],
              "student query": s_rec.query.shape[1] * s_rec.query.shape[3],
              "student key/value": s_rec.key.shape[1] * s_rec.key.shape[3]}
    bad = {k: w for k, w in widths.items() if w % heads}
    if bad:
        text = ", ".join(f"{k} width {w}" for k, w in bad.items())
        raise ShdError(f"distill.relation_heads: {heads} does not divide the {text}; choose a common divisor of "
                       f"{', '.join(str(w) for w in widths.values())} (0 picks one)")


def _key_mask(rec: LayerRecord, n: int) -> torch.Tensor | None:
    """Keys each query row may use: bool [B|1, 1, N, N] or None (all). Causal prefix for causal models."""
    if rec.allowed is not None:
        return rec.allowed[..., -n:, -n:]
    if rec.causal:
        return torch.ones(n, n, dtype=torch.bool, device=rec.query.device).tril()[None, None]
    return None


def _row_weights(row_mask: torch.Tensor | None, bsz: int, n: int, heads: int, device) -> torch.Tensor:
    """[B, N] weight of each (sample, row): 1 / (A_r * valid rows of the sample * samples with rows)."""
    valid = torch.ones(bsz, n, device=device) if row_mask is None else row_mask.float()
    per = valid.sum(dim=1, keepdim=True)  # [B, 1]
    samples = (per > 0).sum().clamp_min(1).float()
    return valid / (heads * per.clamp_min(1.0) * samples)


def _chunk_rows(bsz: int, heads: int, n: int) -> int:
    return max(1, min(n, max(16, BLOCK_BYTES // (bsz * heads * max(n, 1) * 4))))


def _scores(x: torch.Tensor, a: int, b: int, m: int, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled relation logits of rows [a, b) against keys [0, m): [B, A_r, c, m] float32, NEG where masked."""
    s = torch.matmul(x[:, :, a:b], x[:, :, :m].transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask[:, :, a:b, :m], NEG)
    return s


class _FusedRelationLoss(torch.autograd.Function):
    """loss = relation KL of student X against fixed teacher rows; gradient computed in forward."""

    @staticmethod
    def forward(ctx, x, run):  # noqa: D401 - autograd API
        total, dx = run(x.detach(), ctx.needs_input_grad[0])
        ctx.save_for_backward(dx)
        ctx.dtype = x.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (dx,) = ctx.saved_tensors
        return (dx * grad_out).to(ctx.dtype), None


def relation_kl(x_t: torch.Tensor, x_s: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor,
                chunk_rows: int = 0) -> torch.Tensor:
    """sum over (sample, relation head, row) of weights[b, row] * KL(R_t[row] || R_s[row]).

    x_t [B, A_r, N, d_t] (teacher, no grad), x_s [B, A_r, N, d_s] (student, with grad),
    mask bool [B|1, 1, N, N] of usable keys or None, weights [B, N]."""
    bsz, heads, n, _ = x_s.shape
    device = x_s.device
    chunk = chunk_rows or _chunk_rows(bsz, heads, n)
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    if mask is None:
        stops = [n] * len(bounds)
    else:
        seen = mask.any(dim=0)[0]  # [N, N]: key usable by some sample's row
        last = n - seen.flip(-1).to(torch.uint8).argmax(dim=-1)  # 1 + last usable key per row
        stops = [int(last[a:b].max()) if seen[a:b].any() else n for a, b in bounds]
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        t = x_t.float().contiguous()
        t_scale = t.shape[-1] ** -0.5
    s_scale = x_s.shape[-1] ** -0.5
    w = weights.float()

    def run(xs: torch.Tensor, need_grad: bool):
        with torch.autocast(device.type, enabled=False):
            xs = xs.float().contiguous()
            dx = torch.zeros_like(xs) if need_grad else None
            total = torch.zeros((), device=device)
            for (a, b), m in zip(bounds, stops):
                log_t = torch.log_softmax(_scores(t, a, b, m, t_scale, mask), dim=-1)  # [B, A, c, m]
                target = log_t.exp()
                logits = _scores(xs, a, b, m, s_scale, mask)
                log_s = torch.log_softmax(logits, dim=-1)
                rw = w[:, None, a:b]  # [B, 1, c]
                total += ((target * (log_t - log_s)).sum(dim=-1) * rw).sum()
                if need_grad:
                    g = log_s.exp_().sub_(target).mul_(rw[..., None]).mul_(s_scale)  # dL/d(X X^T)
                    dx[:, :, a:b] += torch.matmul(g, xs[:, :, :m])
                    dx[:, :, :m] += torch.matmul(g.transpose(-1, -2), xs[:, :, a:b])
            return total, dx

    if torch.is_grad_enabled() and x_s.requires_grad:
        return _FusedRelationLoss.apply(x_s, run)
    with torch.no_grad():
        return run(x_s, False)[0]


def relation_loss(teacher_records: dict[int, LayerRecord], student_records: dict[int, LayerRecord],
                  pairs: list[tuple[int, int]], row_mask: torch.Tensor | None, relation_heads: int = 0,
                  chunk_rows: int = 0) -> torch.Tensor:
    """MiniLMv2 relation loss over mapped (student, teacher) layer pairs: mean over pairs of the mean
    over Q-Q, K-K, V-V of relation_kl. row_mask [B, N] bool: counted query rows (None: all).
    Student records must hold values (AttentionRecorder(keep_values=True))."""
    total = None
    for s_idx, t_idx in pairs:
        t_rec, s_rec = teacher_records[t_idx], student_records[s_idx]
        if s_rec.value is None or t_rec.value is None:
            raise ValueError("relations need the values of teacher and student (record with keep_values=True)")
        heads = relation_heads or default_relation_heads(t_rec, s_rec)
        check_relation_heads(heads, t_rec, s_rec)
        bsz, _, n, _ = s_rec.query.shape
        mask = _key_mask(s_rec, n)
        weights = _row_weights(row_mask, bsz, n, heads, s_rec.query.device)
        for xt, xs in ((t_rec.query, s_rec.query), (t_rec.key, s_rec.key), (t_rec.value, s_rec.value)):
            part = relation_kl(relation_split(xt, heads), relation_split(xs, heads), mask, weights, chunk_rows) / 3
            total = part if total is None else total + part
    if total is None:
        raise ValueError("no mapped layers")
    return total / len(pairs)


__all__ = ["relation_split", "default_relation_heads", "check_relation_heads", "relation_kl", "relation_loss"]
