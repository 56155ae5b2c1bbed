"""The optimizer and learning-rate schedule of a run: AdamW with decoupled weight decay on matrices only,
linear warmup then cosine decay to a tenth of train.lr."""

from __future__ import annotations

import math

import torch

from shdcli.recipe import Recipe


def make_optimizer(
    model: torch.nn.Module, recipe: Recipe, extra: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if extra is not None:  # e.g. the projector baseline: trained with the student, no weight decay
        lr = getattr(extra, "lr", recipe.train.lr)
        groups.append({"params": list(extra.parameters()), "weight_decay": 0.0, "lr": lr})
    return torch.optim.AdamW(groups, lr=recipe.train.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = recipe.train.warmup_steps, recipe.train.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
