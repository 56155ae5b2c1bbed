"""Evaluation metrics shared by `shd distill` (final evaluation) and `shd eval`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shdcli.losses import mean_pool


def forward_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states [B, N, D] of an encoder (or the base model of a causal LM)."""
    out = model(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.inference_mode()
def perplexity(model, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Token-weighted perplexity: exp(total next-token NLL / number of predicted tokens)."""
    nll, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits.float()
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    mean = nll / max(1, tokens)
    return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}


@torch.inference_mode()
def embedding_agreement(student, teacher, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    """Cosine of mean-pooled sentence embeddings to the teacher's (same width), and agreement of the
    in-batch similarity structure (Pearson correlation of the off-diagonal cosine similarities)."""
    cosines, sims_s, sims_t = [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        s = F.normalize(mean_pool(forward_hidden(student, batch).float(), batch["attention_mask"]), dim=-1)
        t = F.normalize(mean_pool(forward_hidden(teacher, batch).float(), batch["attention_mask"]), dim=-1)
        if s.shape[-1] == t.shape[-1]:
            cosines.append((s * t).sum(-1))
        off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        sims_s.append((s @ s.t())[off])
        sims_t.append((t @ t.t())[off])
    out: dict[str, float] = {}
    if cosines:
        out["embedding_cosine"] = torch.cat(cosines).mean().item()
    a, b = torch.cat(sims_s), torch.cat(sims_t)
    if a.numel() > 1:
        out["similarity_pearson"] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return out
