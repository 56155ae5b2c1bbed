"""How much the SHD term weighs in the total: schedule, loss balancing, per-part gradients.

The total loss of a step is  sum of w_task * task + w_logit * logit  (the "rest")  +  the SHD term.
  fraction(step) = distill.shd * schedule_factor(step): the SHD weight of that step.
  balance none:  SHD term = fraction * shd (the plain weighted sum).
  balance value: SHD term = fraction * (rest / shd).detach() * shd, so its VALUE is fraction * rest
                 (as Megatron-Bridge's LogitsAndIntermediatesLossBalancer scales the intermediate loss
                 to the logit loss and the KD loss to the student loss, with detached ratios).
  balance grad:  the SHD GRADIENT on the student's parameters is scaled so that its norm is
                 fraction * ||gradient of the rest||; the ratio of norms is a constant of the step.
  balance agreement: the SHD term is weighted as in none, then its gradient g_shd is capped so that
                 ||g_shd|| <= max(0, c) * ||g_rest||, with c a running (bias-corrected EMA) estimate of
                 cos(g_shd, g_rest). SHD's weight follows its measured usefulness to the task: where its
                 gradient points with the task's (the causal and labelled students, cos 0.1-0.5) it keeps
                 its weight; where it is orthogonal (embedding-regression encoders, cos ~0.02) it fades to a
                 few percent of the task's step; it can never outweigh the task (c <= 1).
  balance pcgrad: the SHD term is weighted as in none; when g_shd opposes g_rest (negative inner product) its
                 component along g_rest is removed (PCGrad, Yu et al. 2020, projecting the auxiliary task only).
Per-part gradients come from one torch.autograd.grad per part over the one forward's graph
(retain_graph), summed into .grad: no second forward, one extra backward per part beyond the first
(the SHD part only runs back through the mapped layers' q/k/v). Pure functions; train.py calls them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shdcli.errors import ShdError

MODES = ("none", "value", "grad", "agreement", "pcgrad")  # and "auto", resolved per run by resolve_mode
PER_PART = ("grad", "agreement", "pcgrad")  # modes that need the SHD gradient apart from the rest's


# --------------------------------------------------------------------------- schedule
def schedule_factor(step: int, schedule: str, warmup: int, decay: int, max_steps: int) -> float:
    """Multiplier in [0, 1] of the SHD weight for the optimizer step with 0-based index `step`.

    warmup W > 0: steps 0 .. W-1 ramp linearly, factor (step + 1) / W (step W-1 reaches 1).
    After the warmup, decay over D steps (D = decay, or max_steps - W when decay is 0), with
    progress p = min(1, (step - W) / D):
      constant: 1;  linear_decay: 1 - p;  cosine_decay: (1 + cos(pi p)) / 2.
    So step W has factor 1 and every step from W + D on has factor 0 (decays only).
    """
    if schedule not in ("constant", "linear_decay", "cosine_decay"):
        raise ValueError(f"unknown SHD schedule {schedule!r} (use constant, linear_decay or cosine_decay)")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = decay if decay > 0 else max(1, max_steps - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear_decay":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def shd_fraction(distill, step: int, max_steps: int) -> float:
    """distill.shd times the schedule factor of `step` (distill: the recipe's DistillSpec)."""
    return distill.shd * schedule_factor(step, distill.shd_schedule, distill.shd_warmup_steps,
                                         distill.shd_decay_steps, max_steps)


# --------------------------------------------------------------------------- the weighted terms
def value_scale(rest: torch.Tensor, shd: torch.Tensor, fraction: float) -> torch.Tensor:
    """Detached c with c * shd == fraction * rest in value (0 where shd is 0: nothing to scale)."""
    rest, shd = rest.detach(), shd.detach()
    return torch.where(shd > 0, fraction * rest / shd.clamp_min(1e-30), torch.zeros_like(shd))


def weighted_terms(parts: dict[str, torch.Tensor], weights: dict[str, float], fraction: float,
                   mode: str) -> dict[str, torch.Tensor]:
    """The terms whose sum is the step's loss (with grad). parts: raw loss parts (task, logit, shd);
    weights: distill.task / distill.logit. For mode grad the shd term is the raw part: its gradient
    is scaled in backward_terms (its value scale is only known after the rest's backward)."""
    terms = {k: weights[k] * v for k, v in parts.items() if k != "shd"}
    if "shd" not in parts:
        return terms
    shd = parts["shd"]
    if mode in ("none", "off", "agreement", "pcgrad"):  # the last two act on the gradient in backward_terms
        terms["shd"] = fraction * shd
    elif mode == "value":
        rest = sum(terms.values()) if terms else torch.zeros((), device=shd.device)
        terms["shd"] = value_scale(rest, shd, fraction) * shd
    elif mode == "grad":
        terms["shd"] = shd
    else:
        raise ValueError(f"unknown balance mode {mode!r} (use {', '.join(MODES)})")
    return terms


# --------------------------------------------------------------------------- per-part gradients
def global_norm(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm over a list of gradients (None counts as zero): per-tensor norms in their own dtype
    (at least float32), combined in float64."""
    norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.promote_types(g.dtype, torch.float32)).double()
             for g in grads if g is not None]
    return torch.stack(norms).pow(2).sum().sqrt() if norms else torch.zeros((), dtype=torch.float64)


def sum_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None], scale: float = 1.0) -> list:
    """a + scale * b elementwise over two gradient lists (None = zero)."""
    out = []
    for x, y in zip(a, b):
        if y is None:
            out.append(x)
        elif x is None:
            out.append(y * scale if scale != 1.0 else y)
        else:
            out.append(x + y * scale if scale != 1.0 else x + y)
    return out


def merge_rest(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"rest": sum of the non-shd terms, "shd": ...}: balance=grad needs only ||g_rest|| and g_shd, so on
    steps that do not log per-part norms the rest is back-propagated once, not once per part."""
    rest = [v for k, v in terms.items() if k != "shd"]
    out = {"rest": sum(rest)} if rest else {}
    if "shd" in terms:
        out["shd"] = terms["shd"]
    return out


def inner(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """<a, b> over two gradient lists (None = zero), accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.detach().double() * y.detach().double()).sum().cpu()
    return float(total)


@dataclass
class Agreement:
    """Running estimate of cos(g_shd, g_rest) for balance=agreement: an exponential moving average with
    Adam's bias correction (the first measured step counts fully). Saved in every checkpoint, so a resumed
    run scales SHD exactly as an uninterrupted one."""

    beta: float = 0.9
    ema: float = 0.0
    count: int = 0

    @property
    def estimate(self) -> float:
        return self.ema / (1.0 - self.beta ** self.count) if self.count else 0.0

    def update(self, cosine: float) -> float:
        self.ema = self.beta * self.ema + (1.0 - self.beta) * cosine
        self.count += 1
        return self.estimate

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ema": self.ema, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.ema, self.count = float(state["beta"]), float(state["ema"]), int(state["count"])


@dataclass
class PartGradients:
    """What backward_terms measured and applied for one micro-batch."""

    norms: dict[str, float] = field(default_factory=dict)  # each term's gradient norm as added (before 1/divide)
    scale: float = 1.0  # factor applied to the SHD term's gradient (pcgrad: 1, its change is a projection)
    cosine: float | None = None  # cos(g_shd, g_rest) as weighted, before any change (None: one of them is 0)
    ratio: float | None = None  # ||g_shd as added|| / ||g_rest||


def adjust_shd_gradient(mode: str, shd: list[torch.Tensor | None], rest: list[torch.Tensor | None],
                        n_student: int, fraction: float, agreement: Agreement | None = None
                        ) -> tuple[list[torch.Tensor | None], float, float | None, float]:
    """(the SHD gradient to add, the scale applied to it, cos(g_shd, g_rest), ||g_rest||) for a balance mode.

    shd, rest: gradient lists over all trainable parameters; norms and inner products are taken on the
    first n_student (the student's; a projector's follow and have no rest gradient).
      grad:      scale = fraction * ||g_rest|| / ||g_shd||.
      agreement: c = agreement.update(cos) (the running estimate); scale = min(1, max(0, c) ||g_rest|| / ||g_shd||).
      pcgrad:    g_shd - min(0, <g_shd, g_rest>) / ||g_rest||^2 * g_rest.
      none/value: unchanged.
    """
    shd_norm, rest_norm = float(global_norm(shd[:n_student])), float(global_norm(rest[:n_student]))
    dot = inner(shd[:n_student], rest[:n_student])
    cosine = dot / (shd_norm * rest_norm) if shd_norm > 0 and rest_norm > 0 else None
    scale = 1.0
    if mode == "grad":
        scale = fraction * rest_norm / shd_norm if shd_norm > 0 else 0.0
    elif mode == "agreement":
        assert agreement is not None, "balance=agreement needs its running Agreement"
        c = agreement.update(cosine) if cosine is not None else agreement.estimate
        scale = min(1.0, max(0.0, c) * rest_norm / shd_norm) if shd_norm > 0 else 1.0
    elif mode == "pcgrad" and dot < 0:  # conflicting: drop the component of g_shd along g_rest
        shd = sum_grads(shd, list(rest[:n_student]) + [None] * (len(shd) - n_student), -dot / rest_norm**2)
    if scale != 1.0:
        shd = [None if g is None else g * scale for g in shd]
    return shd, scale, cosine, rest_norm


def _add_into(params: list[torch.Tensor], grads: list[torch.Tensor | None], factor: float) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            g = g * factor if factor != 1.0 else g
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)


def backward_terms(terms: dict[str, torch.Tensor], params: list[torch.Tensor], n_student: int, mode: str,
                   fraction: float, divide: int, keep: dict[str, list] | None = None,
                   agreement: Agreement | None = None,
                   reduce: Callable[[list[torch.Tensor | None], list[torch.Tensor]], list] | None = None
                   ) -> PartGradients:
    """Backward each term separately and add their sum / divide into params' .grad.

    params: the trainable parameters (student first: the first n_student are what gradient norms
    are measured on; a projector's follow). The SHD term goes last; its gradient is changed by the
    balance mode (adjust_shd_gradient) before it is added. Returns each term's gradient norm as added
    (before the 1/divide), the scale applied to the shd gradient and the cosine and norm ratio of the SHD
    gradient to the rest's. keep (grad accumulation): per-term running sums of the student gradients /
    divide, for norms over the whole step. reduce (DDP): averages each part's gradients over ranks before
    they are measured or combined, so every rank computes the same cosine and scale. Memory: one term's
    gradient and the rest's sum at a time (plus keep).
    """
    names = [k for k, v in terms.items() if v.requires_grad]
    out = PartGradients(norms={k: 0.0 for k in terms})
    rest: list[torch.Tensor | None] = [None] * len(params)

    def record(name: str, grads: list[torch.Tensor | None]) -> None:
        out.norms[name] = float(global_norm(grads[:n_student]))
        if keep is not None:
            keep[name] = sum_grads(keep.get(name, [None] * n_student), grads[:n_student], 1.0 / divide)

    for i, name in enumerate(sorted(names, key=lambda k: k == "shd")):  # the rest first, shd last
        grads = list(torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1, allow_unused=True))
        if reduce is not None:
            grads = reduce(grads, params)
        if name == "shd":
            grads, out.scale, out.cosine, rest_norm = adjust_shd_gradient(mode, grads, rest, n_student, fraction,
                                                                          agreement)
            record(name, grads)
            out.ratio = out.norms["shd"] / rest_norm if rest_norm > 0 else None
        else:
            record(name, grads)
            rest = sum_grads(rest, grads)
        _add_into(params, grads, 1.0 / divide)
        del grads
    if mode == "grad" and "shd" in terms and "shd" not in names:
        out.scale = 0.0  # a term without a graph (schedule at 0) adds nothing
    return out


def resolve_mode(mode: str, regresses_teacher: bool) -> tuple[str, str | None]:
    """(the balance mode a run uses, a line for the plan saying why) for distill.balance; auto chooses by what
    the task supervises (our paired studies, docs/BENCHMARKS.md "SHD on by default (issue 26)"):
      a task that learns labels or token distributions with logit KD: none (SHD at distill.shd). There KD + SHD
        won (ViT digits +0.012 top-1, p = 0.021, 9 of 10 seeds; heads-pruned SmolLM2 -12% perplexity, 3 of 3).
        Its training-gradient cosine is small there too (0.1-0.15): its gain is not in the immediate task-loss
        descent, and capping it by agreement took the ViT gain away (+0.003, p = 0.59).
      a task whose loss regresses the teacher's own output (a sentence embedding): off. Training steps skip
        SHD (a KD-alone step, bit for bit); validation still measures it. There SHD's gradient is orthogonal
        to the task's (cos ~0.01-0.02): at full weight it lost on every seed (-0.007 and -0.044 Pearson), and
        even capped by agreement to ~1% of the task's gradient it still lost 0.0005 (p = 0.017) at 1.9x the
        step time: Adam's per-coordinate steps amplify a small orthogonal gradient."""
    if mode != "auto":
        return mode, None
    if not regresses_teacher:
        return "none", None
    return "off", ("distill.balance auto -> off: this task regresses the teacher's output, where SHD cost quality "
                   "in every paired study (even capped by agreement); training runs KD alone and validation "
                   "still reports val_shd. Set distill.balance=none (or agreement) to train with SHD")


def check_supported(mode: str, strategy: str | None) -> None:
    """The per-part modes assemble .grad by hand: under DDP each part is averaged over ranks
    (distributed.average_grads); FSDP2's sharded gradients are reduce-scattered by its own hooks, which
    per-part gradients bypass. strategy: train.strategy under torchrun, None in one process."""
    if mode in PER_PART and strategy == "fsdp":
        raise ShdError(f"distill.balance: {mode} does not run with train.strategy=fsdp (its per-part gradients "
                       "bypass FSDP's gradient reduce-scatter); use train.strategy=ddp, or distill.balance=value")


__all__ = ["MODES", "PER_PART", "schedule_factor", "shd_fraction", "value_scale", "weighted_terms", "merge_rest",
           "global_norm", "inner", "Agreement", "PartGradients", "adjust_shd_gradient", "backward_terms",
           "resolve_mode", "check_supported"]
