"""Sentence encoders (BERT, MiniLM, RoBERTa ... AutoModel): one padded sequence per document, the
task loss matches the teacher's mean-pooled, L2-normalised sentence embedding; quality is how well
the student keeps the teacher's embeddings.

Quality: cosine of mean-pooled sentence embeddings to the teacher's, and how well the student keeps
the teacher's similarity structure (Pearson / Spearman of in-batch cosine similarities); Spearman
against human scores only when a sentence-similarity file is given (none ships offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shdcli.attention.losses import embedding_loss, mean_pool
from shdcli.errors import ShdError
from shdcli.tasks.base import ENCODER, Batch, Forwards, QualityInputs
from shdcli.tasks.data import TextTask, same_tokens

NO_SIMILARITY_NOTE = ("no sentence-similarity set with human scores ships offline (README, 'See the heads, measure "
                      "the student'), so no Spearman against them; pass --similarity FILE.tsv "
                      "(sentence1<TAB>sentence2<TAB>score)")


class Encoder(TextTask):
    name = ENCODER
    packed = False
    ddp_find_unused = True  # a BertModel's pooler: the embedding loss never reads it
    text = True
    regresses_teacher = True  # the task loss matches the teacher's sentence embedding

    def matches(self, config) -> bool:
        # The fallback for bare backbones (BertModel, MiniLM, sentence-transformers folders): a config that
        # names a task head (BertForMaskedLM, *ForTokenClassification ...) is not silently distilled as an
        # encoder with its head dropped; registry.task_of refuses it unless `task: encoder` is set.
        return head_of(config) is None

    def folder_config(self, folder, field: str) -> None:
        return None  # transformers folders: AutoConfig reads them

    def auto_class(self) -> type:
        from transformers import AutoModel

        return AutoModel

    def uses_logit_kd(self, distill, teacher: nn.Module, student: nn.Module) -> bool:
        return False  # an encoder has no logits: its task loss is already a match to the teacher

    def fuses_heads(self, distill) -> bool:
        return False

    def losses(self, f: Forwards) -> dict[str, torch.Tensor]:
        t_hidden = f.teacher_out.last_hidden_state  # [B, N, D_t]
        s_hidden = f.student_out.last_hidden_state  # [B, N, D_s]
        if f.channels is not None and channels_match(t_hidden, s_hidden, f.channels):
            # A width-pruned student started as the teacher on its kept channels: match it there.
            t_hidden = t_hidden[..., f.channels]
        return {"task": embedding_loss(s_hidden, t_hidden, f.batch["attention_mask"])}

    def batch_weight(self, batch: Batch) -> float:
        return float(len(batch["input_ids"]))

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        return {}

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        return {}

    def quality(self, model: nn.Module, tokenizer, teacher: nn.Module | None, q: QualityInputs,
                notes: list[str], name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if teacher is not None and not same_tokens(tokenizer, q.tokenizer):
            notes.append(f"{name}: its tokenizer differs from the teacher's; no embedding agreement")
        elif teacher is not None:
            out.update(embedding_agreement(model, teacher, q.batches, q.device))
        if q.similarity:
            first, second, gold = read_similarity_file(q.similarity)
            out["sts_spearman"] = similarity_spearman(model, tokenizer, first, second, gold, q.device,
                                                      max_len=q.seq_len)
        elif NO_SIMILARITY_NOTE not in notes:
            notes.append(NO_SIMILARITY_NOTE)
        return out

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state.float()  # [B, N, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, D]

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return float((1.0 - F.cosine_similarity(reference, output, dim=-1)).mean())



def head_of(config) -> str | None:
    """The first architecture of a config that carries a task head (transformers names them XFor...), or None."""
    return next((a for a in getattr(config, "architectures", None) or [] if "For" in a), None)


def channels_match(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, channels: list[int]) -> bool:
    """Whether a narrower student's width is exactly its kept channels of the teacher's."""
    return teacher_hidden.shape[-1] > student_hidden.shape[-1] == len(channels)


# --------------------------------------------------------------------------- embedding metrics
def forward_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states [B, N, D] of an encoder (or the base model of a causal LM)."""
    out = model(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def rank_average(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (as Spearman's rho needs)."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson correlation of average ranks."""
    return pearson(rank_average(a.flatten()), rank_average(b.flatten()))


def _embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.normalize(mean_pool(forward_hidden(model, batch).float(), batch["attention_mask"]), dim=-1)


@torch.inference_mode()
def embedding_agreement(student, teacher, batches: list[dict[str, torch.Tensor]], device: torch.device | str) -> dict:
    """Cosine of mean-pooled sentence embeddings to the teacher's (same width only), and agreement of
    the in-batch similarity structure: Pearson and Spearman correlation of the off-diagonal cosine
    similarities of student and teacher (works across widths)."""
    cosines, sims_s, sims_t = [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        s, t = _embed(student, batch), _embed(teacher, batch)
        if s.shape[-1] == t.shape[-1]:
            cosines.append((s * t).sum(-1))
        off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        sims_s.append((s @ s.t())[off])
        sims_t.append((t @ t.t())[off])
    out: dict[str, float] = {}
    if cosines:
        out["embedding_cosine"] = torch.cat(cosines).mean().item()
    a, b = torch.cat(sims_s).cpu(), torch.cat(sims_t).cpu()
    if a.numel() > 1:
        out["similarity_pearson"] = pearson(a, b)
        out["similarity_spearman"] = spearman(a, b)
    return out


def read_similarity_file(path: str) -> tuple[list[str], list[str], torch.Tensor]:
    """A sentence-similarity set: UTF-8 lines `sentence1<TAB>sentence2<TAB>score` (STS-B style)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ShdError(f"--similarity: {path} is not a file; give a TSV of sentence1<TAB>sentence2<TAB>score")
    first, second, scores = [], [], []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            score = float(parts[2])
        except (IndexError, ValueError):
            if lineno == 1:  # a header line
                continue
            raise ShdError(f"--similarity: {path} line {lineno} is not sentence1<TAB>sentence2<TAB>score") from None
        first.append(parts[0])
        second.append(parts[1])
        scores.append(score)
    if len(scores) < 3:
        raise ShdError(f"--similarity: {path} holds {len(scores)} scored pairs; give at least 3")
    return first, second, torch.tensor(scores, dtype=torch.float64)


@torch.inference_mode()
def similarity_spearman(model, tokenizer, first: list[str], second: list[str], gold: torch.Tensor,
                        device: torch.device | str, batch_size: int = 32, max_len: int = 128) -> float:
    """Spearman correlation of the cosine of the two sentences' embeddings with the gold scores."""
    def embed(sentences: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            out.append(_embed(model, {"input_ids": enc["input_ids"].to(device),
                                      "attention_mask": enc["attention_mask"].to(device)}).cpu())
        return torch.cat(out)

    return spearman((embed(first) * embed(second)).sum(-1), gold)
