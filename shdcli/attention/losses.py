"""Task and logit losses, and the SHD attention loss over captured layers.

The SHD loss is computed one mapped layer at a time from recorded q/k/v (capture.py):
  naive: whole [B, H, N, M] maps per layer, autograd through them (the obviously-correct reference;
         what attention-KD code usually does): autograd keeps O(L B H N M) for backward.
  lean:  lean.lean_layer_loss: row chunks, squeeze statistics accumulated over chunks first, the
         student's loss and gradients fused in one autograd Function that keeps only dq, dk.
         Peak extra memory O(B H c M + L B H N d); same loss and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shdcli.attention.capture import LayerRecord
from shdcli.attention.lean import DEFAULT_BUDGET, lean_layer_loss
from shdcli.attention.shd import (
    apply_weights,
    attention_kd_rows,
    attention_maps,
    attention_scores,
    loss_scale,
    solve_weights,
    squeeze_statistics,
)


# --------------------------------------------------------------------------- task / logit
def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over real tokens. logits [B, N, V], input_ids/attention_mask [B, N]."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    chunk_tokens: int = 2048,
    kind: str = "kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """T^2 * mean over real tokens of KL(softmax(t / T) || softmax(s / T)) (kind kl; reverse_kl:
    KL(s || t); jsd: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s, with TRL's
    beta = 0 -> kl and beta = 1 -> reverse_kl).

    logits [B, N, V]; computed in token chunks in float32 so a 262k vocabulary does not
    materialise several [B N, V] float32 copies at once (fused_logits.py avoids them altogether).
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "kl" if beta == 0.0 else "reverse_kl"
    s = student_logits.flatten(0, 1)
    t = teacher_logits.flatten(0, 1)
    keep = mask.flatten().bool()
    s, t = s[keep], t[keep]
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_tokens):
        log_p_s = torch.log_softmax(s[start:start + chunk_tokens].float() / temperature, dim=-1)
        log_p_t = torch.log_softmax(t[start:start + chunk_tokens].float() / temperature, dim=-1)
        if kind == "kl":
            part = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
        elif kind == "reverse_kl":
            part = F.kl_div(log_p_t, log_p_s, log_target=True, reduction="sum")
        elif kind == "jsd":
            log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1 - beta), log_p_t + math.log(beta)]), dim=0)
            part = beta * F.kl_div(log_m, log_p_t, log_target=True, reduction="sum") + (1 - beta) * F.kl_div(
                log_m, log_p_s, log_target=True, reduction="sum")
        else:
            raise ValueError(f"unknown logit loss {kind!r} (use kl, reverse_kl or jsd)")
        total = total + part
    return temperature**2 * total / max(1, s.shape[0])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real tokens: [B, N, D] -> [B, D] (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def embedding_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Encoder task loss: match the teacher's mean-pooled, L2-normalised sentence embedding.

    Same width: 1 - cosine(student, teacher). Different widths have no common space without a
    projector, so match the in-batch cosine-similarity matrices instead (relational, parameter-free).
    """
    s = F.normalize(mean_pool(student_hidden.float(), mask), dim=-1)
    t = F.normalize(mean_pool(teacher_hidden.float(), mask), dim=-1)
    if s.shape[-1] == t.shape[-1]:
        return (1.0 - (s * t).sum(dim=-1)).mean()
    return F.mse_loss(s @ s.t(), t @ t.t())


# --------------------------------------------------------------------------- SHD over layers
@dataclass
class ShdLossResult:
    loss: torch.Tensor  # scalar with grad
    weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # student layer -> Hs x [B, k]


def group_features(
    record: LayerRecord, groups: list[list[int]], bases: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Per-group head features [B, k, M, D'] with X_h = V_h R_h (see shd.group_feature_bases), or
    V_h alone where the output projection is unknown. With GQA a query head uses its KV group's V."""
    v = record.values_per_head().float()  # [B, H, M, d]
    if bases is None:
        return [v[:, g] for g in groups]
    return [torch.einsum("bkmd,kde->bkme", v[:, g], basis.to(v.device)) for g, basis in zip(groups, bases)]


def _rows(record: LayerRecord, start: int, stop: int, tau: float) -> torch.Tensor:
    q = record.query[:, :, start:stop]
    return attention_maps(q, record.keys_per_head(), record.scaling, record.allowed_rows(start, stop), tau,
                          record.softcap)


def shd_loss(
    teacher_records: dict[int, LayerRecord],
    student_records: dict[int, LayerRecord],
    pairs: list[tuple[int, int]],
    groups: list[list[list[int]]],
    bases: dict[int, list[torch.Tensor] | None],
    row_mask: torch.Tensor | None,
    alpha: str = "lsq",
    kind: str = "kl",
    tau: float = 1.0,
    impl: str = "lean",
    chunk_rows: int = 0,
    budget_bytes: int = DEFAULT_BUDGET,
) -> ShdLossResult:
    """SHD loss over mapped (student layer, teacher layer) pairs; mean over layers, batch, heads, rows.

    chunk_rows: query rows per chunk in the lean path (0 = auto, within budget_bytes of working memory);
    the naive path takes whole maps.
    """
    if impl not in ("lean", "naive"):
        raise ValueError(f"unknown SHD implementation {impl!r} (use lean or naive)")
    total = None
    count = None
    weights: dict[int, list[torch.Tensor]] = {}
    for (s_idx, t_idx), layer_groups in zip(pairs, groups):
        t_rec, s_rec = teacher_records[t_idx], student_records[s_idx]
        if impl == "lean":
            part, cnt, weights[s_idx] = lean_layer_loss(
                t_rec, s_rec, layer_groups, bases.get(t_idx), row_mask, alpha, kind, tau, chunk_rows, budget_bytes
            )
        else:
            part, cnt, weights[s_idx] = _naive_layer_loss(t_rec, s_rec, layer_groups, bases.get(t_idx), row_mask,
                                                          alpha, kind, tau)
        total = part if total is None else total + part
        count = cnt if count is None else count + cnt
    if total is None:
        raise ValueError("no mapped layers")
    return ShdLossResult(loss_scale(kind, tau) * total / count.clamp_min(1.0), weights)


def _naive_layer_loss(
    t_rec: LayerRecord,
    s_rec: LayerRecord,
    layer_groups: list[list[int]],
    bases: list[torch.Tensor] | None,
    row_mask: torch.Tensor | None,
    alpha: str,
    kind: str,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The reference: whole teacher maps, squeezed; whole student map; autograd does the rest."""
    n = s_rec.query.shape[2]
    with torch.no_grad():
        feats = group_features(t_rec, layer_groups, bases)  # Hs x [B, k, M, D']
        maps = _rows(t_rec, 0, n, tau)  # [B, Ht, N, M]
        w = [solve_weights(*squeeze_statistics(maps[:, g], f, row_mask), alpha) for g, f in zip(layer_groups, feats)]
        target = apply_weights(maps, layer_groups, w)  # [B, Hs, N, M]
    scores = attention_scores(s_rec.query, s_rec.keys_per_head(), s_rec.scaling, s_rec.allowed_rows(0, n), tau,
                              s_rec.softcap)
    part, cnt = attention_kd_rows(target, scores, row_mask, kind)
    return part, cnt, w
