"""What the student's attention does against its squeezed targets, beyond the loss value.

Measured on one validation batch per validation (whole maps, no grad; the naive squeeze):
  sink_share:      the share of the SHD KL that the sink key columns carry: the first key ([CLS], <s>,
                   the image's class token) and, in a bidirectional text model, each row's last valid key
                   ([SEP]). Attention-transfer work finds most of a map's mass on such columns; a high share
                   means SHD spends its gradient copying where heads park attention, not what they read.
  entropy_student: mean row entropy (nats) of the student's maps; entropy_target: of the squeezed targets.
                   A student far sharper or flatter than its targets has not taken their shape.
  kl_layer/<s>:    per student layer s, the KL to its squeezed targets (attention fidelity layer by layer:
                   which layers the student has not learned to attend like the teacher).
All but kl_layer are means over the valid query rows of every mapped layer, the batch and the student heads;
kl_layer/<s> over one layer's.
"""

from __future__ import annotations

import torch

from shdcli.attention.capture import LayerRecord
from shdcli.attention.losses import group_features
from shdcli.attention.shd import apply_weights, attention_maps, solve_weights, squeeze_statistics


def sink_keys(record: LayerRecord, key_mask: torch.Tensor | None) -> torch.Tensor:
    """bool [B, M]: the sink columns of a layer's keys (first key; last valid key when bidirectional with padding)."""
    batch, keys = record.query.shape[0], record.key.shape[2]
    sinks = torch.zeros(batch, keys, dtype=torch.bool, device=record.key.device)
    sinks[:, 0] = True
    if key_mask is not None and not record.causal and key_mask.shape[-1] == keys:
        last = key_mask.long().sum(-1).clamp_min(1) - 1  # [B]: the [SEP] of a BERT-style row
        sinks[torch.arange(batch, device=sinks.device), last.to(sinks.device)] = True
    return sinks


def row_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of maps [..., M] (rows sum to 1; zeros contribute 0): [...]."""
    return -torch.special.xlogy(maps, maps).sum(-1)


LAYER_KL = "kl_layer/"  # + student layer index: a key of attention_diagnostics' result


@torch.no_grad()
def layer_diagnostics(t_rec: LayerRecord, s_rec: LayerRecord, layer_groups: list[list[int]],
                      bases: list[torch.Tensor] | None, row_mask: torch.Tensor | None,
                      key_mask: torch.Tensor | None, alpha: str, tau: float) -> dict[str, torch.Tensor]:
    """Sums over valid (batch, student head, row) of: KL, its sink-column part, both entropies; and the row count."""
    n = s_rec.query.shape[2]
    feats = group_features(t_rec, layer_groups, bases)  # Hs x [B, k, M, D']
    maps = attention_maps(t_rec.query, t_rec.keys_per_head(), t_rec.scaling, t_rec.allowed_rows(0, n), tau,
                          t_rec.softcap)  # [B, Ht, N, M]
    weights = [solve_weights(*squeeze_statistics(maps[:, g], f, row_mask), alpha) for g, f in zip(layer_groups, feats)]
    target = apply_weights(maps, layer_groups, weights)  # [B, Hs, N, M]
    student = attention_maps(s_rec.query, s_rec.keys_per_head(), s_rec.scaling, s_rec.allowed_rows(0, n), tau,
                             s_rec.softcap)  # [B, Hs, N, M]
    # per-key KL terms p log(p / q) (0 where p = 0): [B, Hs, N, M]
    per_key = torch.special.xlogy(target, target) - torch.special.xlogy(target, student.clamp_min(1e-30))
    sinks = sink_keys(s_rec, key_mask)[:, None, None, :]  # [B, 1, 1, M]
    rows = (torch.ones(target.shape[0], n, dtype=torch.bool, device=target.device) if row_mask is None
            else row_mask.to(target.device))[:, None, :].expand(-1, target.shape[1], -1)  # [B, Hs, N]

    def total(x: torch.Tensor) -> torch.Tensor:  # x [B, Hs, N] -> sum over valid rows (where: padding may be NaN)
        return torch.where(rows, x, torch.zeros_like(x)).sum().double()

    return {"kl": total(per_key.sum(-1)), "kl_sink": total((per_key * sinks).sum(-1)),
            "entropy_student": total(row_entropy(student)), "entropy_target": total(row_entropy(target)),
            "rows": rows.sum().double()}


def attention_diagnostics(teacher_records: dict[int, LayerRecord], student_records: dict[int, LayerRecord],
                          pairs: list[tuple[int, int]], groups: list[list[list[int]]],
                          bases: dict[int, list[torch.Tensor] | None], row_mask: torch.Tensor | None,
                          key_mask: torch.Tensor | None, alpha: str, tau: float) -> dict[str, float]:
    """sink_share, entropy_student, entropy_target and kl_layer/<s> (see the module doc) of one batch."""
    sums: dict[str, torch.Tensor] = {}
    by_layer: dict[str, float] = {}
    for (s_idx, t_idx), layer_groups in zip(pairs, groups):
        part = layer_diagnostics(teacher_records[t_idx], student_records[s_idx], layer_groups, bases.get(t_idx),
                                 row_mask, key_mask, alpha, tau)
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        if float(part["rows"]) > 0:
            by_layer[f"{LAYER_KL}{s_idx}"] = float(part["kl"]) / float(part["rows"])
    rows = float(sums["rows"]) if sums else 0.0
    if rows == 0:
        return {}
    kl = float(sums["kl"])
    return {"sink_share": float(sums["kl_sink"]) / kl if kl > 0 else 0.0,
            "entropy_student": float(sums["entropy_student"]) / rows,
            "entropy_target": float(sums["entropy_target"]) / rows, **by_layer}


__all__ = ["LAYER_KL", "sink_keys", "row_entropy", "layer_diagnostics", "attention_diagnostics"]
