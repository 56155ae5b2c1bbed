"""What every classifier task shares (images: tasks/image.py; text: tasks/text_classification.py): the
loss parts (cross entropy on labels, logit KD on class logits), the metrics (accuracy, macro-F1,
agreement with the teacher, expected calibration error, confusion matrix) and the confusion PNG.

Metric definitions (logits [S, C], labels [S], predictions = argmax):
  - macro-F1: the mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), over the classes that
    occur among the labels or the predictions (scikit-learn's f1_score(average="macro") convention);
  - expected calibration error (Guo et al. 2017): confidences (max softmax probability) fall into
    `bins` equal-width bins of (0, 1]; ECE = sum_b |b| / S * |accuracy(b) - mean confidence(b)|;
  - agreement: the share of rows where the model predicts the teacher's class.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from shdcli.attention.losses import logit_kd_loss
from shdcli.errors import ShdError

ECE_BINS = 15


# --------------------------------------------------------------------------- loss parts
def classification_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                          use_logit: bool, temperature: float, kind: str = "kl",
                          beta: float = 0.5) -> dict[str, torch.Tensor]:
    """task = cross entropy on labels; logit = T^2 divergence (distill.logit_loss) of the class logits [B, C]."""
    parts = {"task": F.cross_entropy(student_logits.float(), labels)}
    if use_logit:
        ones = torch.ones(labels.shape[0], 1, dtype=torch.long, device=labels.device)  # every row is one "token"
        parts["logit"] = logit_kd_loss(student_logits[:, None], teacher_logits[:, None], ones, temperature,
                                       kind=kind, beta=beta)
    return parts


def classifier_logit_kd(distill, teacher: torch.nn.Module, student: torch.nn.Module) -> bool:
    """Whether logit KD applies to two classifiers (distill.logit > 0), and a clear error when their class
    counts differ (their logits cannot be compared)."""
    if distill.logit <= 0:
        return False
    if student.config.num_labels != teacher.config.num_labels:
        raise ShdError(f"distill.logit: teacher has {teacher.config.num_labels} classes, student "
                       f"{student.config.num_labels}; give a student with the teacher's classes or set "
                       "distill.logit=0")
    return True


class ClassifierLosses:
    """The Task methods every classifier shares (image and text): logit KD on the class logits, cross entropy
    on the labels, one row per label in the validation means."""

    def uses_logit_kd(self, distill, teacher: torch.nn.Module, student: torch.nn.Module) -> bool:
        return classifier_logit_kd(distill, teacher, student)

    def fuses_heads(self, distill) -> bool:
        return False

    def losses(self, f) -> dict[str, torch.Tensor]:
        """Cross entropy on the labels and, with use_logit, logit KD on the class logits with distill.logit_loss
        at distill.logit_temperature (f: tasks.base.Forwards)."""
        d = f.distill
        return classification_losses(f.student_out.logits, f.teacher_out.logits, f.batch["labels"], f.use_logit,
                                     d.logit_temperature, kind=d.logit_loss, beta=d.jsd_beta)

    def batch_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(len(batch["labels"]))


def class_kl(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Mean KL(softmax(reference) || softmax(output)) over rows of class logits [B, C] (the depth search's distance)."""
    ones = torch.ones(reference.shape[0], 1, dtype=torch.long, device=reference.device)
    return float(logit_kd_loss(output[:, None], reference[:, None], ones, 1.0))


# --------------------------------------------------------------------------- metrics
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] counts: row = true class, column = predicted class."""
    return torch.bincount(labels * n + pred, minlength=n * n).view(n, n)


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, n: int) -> float:
    """Mean per-class F1 over the classes present in labels or predictions (module docstring)."""
    m = confusion_matrix(pred, labels, n).double()
    tp = m.diag()
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    present = (m.sum(0) + m.sum(1)) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12)
    return float(f1[present].mean()) if present.any() else float("nan")


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width confidence bins (module docstring); logits [S, C], labels [S]."""
    conf, pred = logits.float().softmax(-1).max(-1)  # [S], [S]
    hit = (pred == labels).double()
    # bin b holds confidences in (b / bins, (b + 1) / bins]; a confidence of exactly 0 cannot occur (softmax > 0)
    which = (conf.double() * bins).ceil().long().clamp(1, bins) - 1  # [S]
    # |b| / S * |hits(b) / |b| - conf(b) / |b||  =  |hits(b) - conf(b)| / S  (sums over the bin's rows)
    hits = torch.bincount(which, weights=hit, minlength=bins)
    confs = torch.bincount(which, weights=conf.double(), minlength=bins)
    return float((hits - confs).abs().sum() / max(1, labels.numel()))


def classifier_metrics(logits: torch.Tensor, labels: torch.Tensor,
                       teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy, macro-F1, ECE and (with the teacher's logits on the same rows) agreement."""
    pred = logits.argmax(-1)
    out = {"accuracy": float((pred == labels).float().mean()),
           "macro_f1": macro_f1(pred, labels, logits.shape[1]),
           "ece": expected_calibration_error(logits, labels)}
    if teacher_logits is not None:
        out["agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
    return out


# --------------------------------------------------------------------------- the confusion PNG
def plot_confusion(matrix: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix PNG with counts, written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ShdError("the confusion matrix PNG needs matplotlib; pip install 'shd[plot]'") from exc
    n = matrix.shape[0]
    rates = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
