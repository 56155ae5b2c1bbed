"""Attention-distillation baselines that SHD is compared against (benchmarks/quality.py).

Selected by `distill.target` (the default `squeeze` is SHD itself, losses.shd_loss):
  projector:  a trainable head-mixing matrix per mapped layer, P [Ht, Hs] with rows softmax-normalised,
              maps the student's Hs attention maps to predictions of all Ht teacher maps,
              A^_t = sum_j P[t, j] B_j (a convex mix, so every prediction stays a distribution);
              trained jointly with the student, then dropped. This is the "alignment by projector"
              approach that SHD avoids (it adds Hs * Ht parameters per layer and a second optimisation
              target). It starts from the head grouping as a prior (see make_projector).
  score_mean: target of student head j = softmax(mean over its group G_j of the teacher's attention
              LOGITS / tau): the plain group mean with no alpha computation. Averaging the maps
              themselves would be exactly `alpha: mean` of the squeeze (same convex combination).
Both use `distill.attn_loss` and `distill.temperature` like SHD and the same valid-row masking, and
work on whole [B, H, N, M] maps per layer (no row chunking: they are benchmark baselines).
"""

from __future__ import annotations

import torch
from torch import nn

from shdcli.attention.capture import LayerRecord
from shdcli.attention.shd import attention_kd_rows, attention_scores, loss_scale

# The projector's own learning rate (AdamW, no decay): its Hs x Ht logits must move by O(1) within a
# benchmark's few dozen steps, which the student's lr (~3e-4) would never do.
PROJECTOR_LR = 0.05
# Initial log-odds in favour of the student head whose group holds teacher head t (0 = uniform mix).
PROJECTOR_PRIOR = 2.0


class HeadProjector(nn.Module):
    """Per mapped layer, logits [Ht, Hs] of the head-mixing matrix (softmax over the Hs axis)."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(t) for t in logits])
        self.lr = PROJECTOR_LR  # read by train.make_optimizer

    def mix(self, i: int) -> torch.Tensor:
        """Row-stochastic mixing matrix [Ht, Hs] of mapped pair i."""
        return torch.softmax(self.logits[i], dim=-1)


def make_projector(plan, teacher_heads: int, student_heads: int) -> HeadProjector:
    """One [Ht, Hs] matrix per mapped layer of `plan` (a models.mapping.Plan: its groups are read);
    teacher head t starts leaning on the student head whose group contains t (the student heads are
    initialised from those groups), weight e^2 / (e^2 + Hs - 1) (0.79 for Hs = 3), so the projector
    starts where SHD's grouping is."""
    mats = []
    for groups in plan.groups:
        logits = torch.zeros(teacher_heads, student_heads)
        for j, group in enumerate(groups):
            logits[group, j] = PROJECTOR_PRIOR
        mats.append(logits)
    return HeadProjector(mats)


def _scores(record: LayerRecord, tau: float) -> torch.Tensor:
    """Softened masked attention logits of all heads: [B, H, N, M] float32."""
    n = record.query.shape[2]
    return attention_scores(record.query, record.keys_per_head(), record.scaling, record.allowed_rows(0, n), tau,
                            record.softcap)


def score_mean_targets(record: LayerRecord, groups: list[list[int]], tau: float) -> torch.Tensor:
    """softmax(mean of the group's teacher logits / tau) per student head: [B, Hs, N, M].

    Every head of a layer shares one key mask, so masked keys are -inf in every averaged logit
    and get zero mass."""
    scores = _scores(record, tau)
    mean = torch.stack([scores[:, g].mean(dim=1) for g in groups], dim=1)
    return torch.softmax(mean, dim=-1)


def attention_target_loss(method: str, t_records: dict[int, LayerRecord], s_records: dict[int, LayerRecord],
                          pairs: list[tuple[int, int]], groups_per_pair: list[list[list[int]]],
                          row_mask: torch.Tensor | None, tau: float, kind: str,
                          projector: HeadProjector | None = None) -> torch.Tensor:
    """Baseline attention-KD loss (distill.target = projector | score_mean), mean over mapped layers,
    batch, heads and valid query rows, scaled by tau^2 for KL like SHD."""
    total, count = None, None
    for i, ((s_idx, t_idx), groups) in enumerate(zip(pairs, groups_per_pair)):
        t_rec, s_rec = t_records[t_idx], s_records[s_idx]
        s_scores = _scores(s_rec, tau)  # [B, Hs, N, M], with grad
        if method == "score_mean":
            with torch.no_grad():
                target = score_mean_targets(t_rec, groups, tau)
            part, cnt = attention_kd_rows(target, s_scores, row_mask, kind)
        elif method == "projector":
            with torch.no_grad():
                target = torch.softmax(_scores(t_rec, tau), dim=-1)  # all Ht teacher maps [B, Ht, N, M]
            pred = torch.einsum("ts,bsnm->btnm", projector.mix(i), torch.softmax(s_scores, dim=-1))
            # log of the convex mix as "logits" (softmax(log p) = p). The clamp keeps masked keys
            # (p = 0) finite so no 0 * inf reaches the gradient; they carry no target mass anyway.
            part, cnt = attention_kd_rows(target, torch.log(pred.clamp_min(1e-30)), row_mask, kind)
        else:
            raise ValueError(f"unknown distill.target {method!r}")
        total = part if total is None else total + part
        count = cnt if count is None else count + cnt
    if total is None:
        raise ValueError("no mapped layers")
    return loss_scale(kind, tau) * total / count.clamp_min(1.0)


__all__ = ["HeadProjector", "make_projector", "score_mean_targets", "attention_target_loss"]
