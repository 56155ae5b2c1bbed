"""Helpers shared by the model-level tests: load a tiny fixture model, make its weights generic, batch text."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shdcli.tasks.registry import load_model

# The equivalence tests (lean vs naive SHD, fused vs naive logits) build their tensors here:
# SHD_TEST_DEVICE=cuda runs them on a GPU (benchmarks/gpu_check.sh); random draws stay on the CPU generator.
TEST_DEVICE = torch.device(os.environ.get("SHD_TEST_DEVICE", "cpu"))

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "A short one.",
    "Numbers like 12 and 345 appear here, with some punctuation; and more words follow it.",
]


def load_tiny(folder: Path, seed: int = 0, scale: float = 0.3, **kwargs):
    """(model, tokenizer, task) with every parameter perturbed by N(0, scale^2).

    HF init gives zero biases, unit norms and near-uniform attention; random values everywhere make
    a copy that misses a bias, a norm or a head permutation show up in the numbers.
    """
    model, tokenizer, task = load_model(Path(folder), "teacher.path", **kwargs)
    perturb(model, seed, scale)
    return model.eval(), tokenizer, task


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_batch(tokenizer, texts: list[str] = TEXTS, side: str = "right") -> dict[str, torch.Tensor]:
    """Padded batch (input_ids, attention_mask) [B, N]; at least one row has padding."""
    tokenizer.padding_side = side
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert (out["attention_mask"] == 0).any(), "the batch must contain padding"
    return out
