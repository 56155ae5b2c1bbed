"""The Task protocol: everything that differs between kinds of work (causal LM, sentence encoder,
image classifier) behind one small interface, so the training loop, the evaluation and the head
inspection are written once.

A task owns: the transformers Auto class its models load into, the preprocessor beside the weights
(tokenizer or image processor), its training and validation rows, the row mask SHD averages over,
the task loss (with logit KD where the task has logits), the numbers validation and the final
evaluation add, what the depth search compares, and the samples `shd inspect-heads` runs on.
A task is identified by its name (a recipe's `task:`); `registry.get(name)` gives the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from shdcli.errors import ShdError

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
IMAGE_CLASSIFICATION = "image-classification"
DIFFUSION = "diffusion"
SEQUENCE_CLASSIFICATION = "sequence-classification"

Batch = dict[str, torch.Tensor]


@dataclass
class Forwards:
    """One batch through teacher and student, as a task's loss reads it."""

    student: nn.Module
    teacher: nn.Module
    student_out: Any  # the student's ModelOutput (heads bypassed when the task fused them)
    teacher_out: Any
    batch: Batch  # with labels, on the device
    distill: Any  # recipe.DistillSpec
    use_logit: bool  # logit KD is on for this run (Task.uses_logit_kd)
    channels: list[int] | None = None  # a width-pruned student's kept residual channels (students.derive)


@dataclass
class HeldOut:
    """What the final evaluation and `shd eval` score: held-out documents and where they came from;
    classifiers also get each document's label id (and the second text of a pair)."""

    docs: list[str]
    source: str  # where the text came from, for the output
    labels: list[int] | None = None  # [S] label ids of the docs (classification tasks)
    pairs: list[str] | None = None  # the second text of each pair (text-pair classification)


@dataclass
class QualityInputs:
    """What a task's held-out quality metrics read (`shd eval` and the final evaluation)."""

    docs: list[str]  # held-out documents
    tokenizer: Any  # the teacher's (or first student's) tokenizer: the shared token ids
    seq_len: int
    stride: int | None
    max_tokens: int
    batches: list[Batch]  # tokenised held-out sequences (encoders, attention fidelity)
    similarity: str | None  # sentence-similarity TSV
    batch_size: int
    device: torch.device | str
    labels: list[int] | None = None  # HeldOut.labels
    pairs: list[str] | None = None  # HeldOut.pairs
    out_dir: Path | None = None  # where a task writes its plots (a classifier's confusion PNG); None: none


class Task(Protocol):
    name: str
    packed: bool  # text rows are packed blocks (causal LM) rather than one document per row
    ddp_find_unused: bool  # the model has parameters its loss never reads (an encoder's pooler)
    text: bool  # `shd eval`'s text metrics (perplexity / embeddings, attention, speed) apply
    # The task loss regresses the teacher's own output (an embedding), not labels or tokens: distill.balance auto
    # then caps SHD by its agreement with the task (attention/balance.resolve_mode).
    regresses_teacher: bool

    def matches(self, config) -> bool:
        """Whether an HF config (architectures, model_type) is this kind of model."""

    def folder_config(self, folder: Path, field: str) -> Any | None:
        """The config of a model folder this task reads itself (not a transformers folder: a diffusers DiT),
        else None (transformers' AutoConfig reads it)."""

    def auto_class(self) -> type:
        """The transformers Auto class models of this task load into and are built from (from_pretrained,
        from_config); a task with its own folders gives a class with the same two constructors."""

    def load_preprocessor(self, folder, config, field: str, trust_remote_code: bool) -> object | None:
        """The tokenizer or image processor saved beside the weights (None: there is none)."""

    def training_data(self, recipe, preprocessor, config, world: int) -> tuple[Any, list[Batch]]:
        """(training rows a data.BatchStream serves, validation batches of batch_size * world rows)."""

    def inputs(self, batch: Batch) -> Batch:
        """The forward arguments of a training batch (model_inputs: everything but the labels)."""

    def row_mask(self, batch: Batch) -> torch.Tensor | None:
        """[B, N] bool of the query rows SHD averages over (None: every row, e.g. image patches)."""

    def uses_logit_kd(self, distill, teacher: nn.Module, student: nn.Module) -> bool:
        """Whether logit KD applies (and a clear error when the two models' outputs cannot be compared)."""

    def fuses_heads(self, distill) -> bool:
        """Whether both models' output heads are skipped in forward and applied inside the loss."""

    def losses(self, f: Forwards) -> dict[str, torch.Tensor]:
        """The task loss ("task") and, with use_logit, logit KD ("logit"), with grad."""

    def batch_weight(self, batch: Batch) -> float:
        """What a validation batch's mean losses are weighted by (predicted tokens, rows)."""

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        """Numbers validation adds to the mean losses (val_perplexity, val_top1, ...)."""

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        """Numbers the final evaluation adds on the run's own validation batches (`recipe`: the run's, for tasks
        that score more than those batches, e.g. a DiT's samples written to output_dir)."""

    def heldout(self, data: dict, seed: int, config, whole: bool = False, field: str = "data.path") -> HeldOut:
        """The held-out documents of a data section (a resolved recipe's `data` dict, train.seed `seed`):
        its validation split, or with `whole` (`shd eval --data`) the whole source (classifiers: the
        fixed held-out split of a builtin corpus). `config`: the model's, for label ids."""

    def quality(self, model: nn.Module, tokenizer, teacher: nn.Module | None, q: QualityInputs,
                notes: list[str], name: str) -> dict[str, float | str]:
        """Held-out quality of one model (perplexity; embedding agreement with the teacher; accuracy ...)."""

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """What the depth search compares of a (pruned) model: logits, or a pooled embedding."""

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        """Mean distance of a pruned model's output to the full teacher's."""

    # Tasks whose folders folder_config reads (a diffusers DiT) also score them in `shd eval`:
    #   evaluate_folder(folder, teacher, data, out_dir) -> dict with a printable "summary".

    def inspect_batches(self, folder, preprocessor, data: str | None, samples: int, seq_len: int,
                        batch_size: int, max_positions: int | None) -> tuple[list[Batch], str, object | None]:
        """(batches, data label, tokenizer that labels the sample's tokens or None) for `shd inspect-heads`."""


class NoHeldOutText:
    """Task.heldout and Task.quality of a task `shd eval` scores without held-out text (image classifiers,
    DiTs): both refuse in one line. `scored_on` says what the task is scored on instead."""

    scored_on: str

    def heldout(self, data: dict, seed: int, config, whole: bool = False, field: str = "data.path") -> HeldOut:
        raise ShdError(f"{field}: {self.scored_on}, not held-out text")

    def quality(self, model: nn.Module, tokenizer, teacher: nn.Module | None, q: QualityInputs,
                notes: list[str], name: str) -> dict[str, float]:
        raise ShdError(f"{name}: {self.scored_on}, not held-out text")


def model_inputs(batch: Batch) -> Batch:
    """The forward arguments of a batch (labels stay out: the loss is ours, not the model's)."""
    return {k: v for k, v in batch.items() if k != "labels"}
