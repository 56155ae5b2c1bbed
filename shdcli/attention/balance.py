"""How much the SHD term weighs in the total: schedule, loss balancing, per-part gradients.

The total loss of a step is  sum of w_task * task + w_logit * logit  (the "rest")  +  the SHD term.
  fraction(step) = distill.shd * schedule_factor(step): the SHD weight of that step.
  balance none:  SHD term = fraction * shd (the plain weighted sum).
  balance value: SHD term = fraction * (rest / shd).detach() * shd, so its VALUE is fraction * rest
                 (as Megatron-Bridge's LogitsAndIntermediatesLossBalancer scales the intermediate loss
                 to the logit loss and the KD loss to the student loss, with detached ratios).
  balance grad:  the SHD GRADIENT on the student's parameters is scaled so that its norm is
                 fraction * ||gradient of the rest||; the ratio of norms is a constant of the step.
Per-part gradients come from one torch.autograd.grad per part over the one forward's graph
(retain_graph), summed into .grad: no second forward, one extra backward per part beyond the first
(the SHD part only runs back through the mapped layers' q/k/v). Pure functions; train.py calls them.
"""

from __future__ import annotations

import math

import torch

from shdcli.errors import ShdError

REST = ("task", "logit")  # the parts SHD is balanced against


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
    if mode == "none":
        terms["shd"] = fraction * shd
    elif mode == "value":
        rest = sum(terms.values()) if terms else torch.zeros((), device=shd.device)
        terms["shd"] = value_scale(rest, shd, fraction) * shd
    elif mode == "grad":
        terms["shd"] = shd
    else:
        raise ValueError(f"unknown balance mode {mode!r} (use none, value or grad)")
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


def _add_into(params: list[torch.Tensor], grads: list[torch.Tensor | None], factor: float) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            g = g * factor if factor != 1.0 else g
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)


def backward_terms(terms: dict[str, torch.Tensor], params: list[torch.Tensor], n_student: int, mode: str,
                   fraction: float, divide: int, keep: dict[str, list] | None = None
                   ) -> tuple[dict[str, float], float]:
    """Backward each term separately and add their sum / divide into params' .grad.

    params: the trainable parameters (student first: the first n_student are what gradient norms
    are measured on; a projector's follow). mode grad: the shd gradient is multiplied by
    s = fraction * ||g_rest|| / ||g_shd|| (norms on the student; s = 0 when g_shd is 0), so its
    norm is fraction * ||g_rest||. Returns each term's gradient norm as added (shd scaled; before
    the 1/divide) and the scale applied to the raw shd term (1 in modes none/value: their scale is in
    the term). keep (grad accumulation): per-term running sums of the student gradients / divide, for
    norms over the whole step. Memory: one term's gradient and the rest's sum at a time (plus keep).
    """
    names = [k for k, v in terms.items() if v.requires_grad]
    norms = {k: 0.0 for k in terms}
    rest: list[torch.Tensor | None] | None = None

    def record(name: str, grads: list[torch.Tensor | None]) -> None:
        norms[name] = float(global_norm(grads[:n_student]))
        if keep is not None:
            keep[name] = sum_grads(keep.get(name, [None] * n_student), grads[:n_student], 1.0 / divide)

    for i, name in enumerate(sorted(names, key=lambda k: k == "shd")):  # the rest first, shd last
        grads = list(torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1, allow_unused=True))
        if name == "shd":
            scale = 1.0
            if mode == "grad":
                rest_norm = float(global_norm((rest or [None])[:n_student]))
                shd_norm = float(global_norm(grads[:n_student]))
                scale = fraction * rest_norm / shd_norm if shd_norm > 0 else 0.0
            grads = [None if g is None else g * scale for g in grads] if scale != 1.0 else grads
            record(name, grads)
            _add_into(params, grads, 1.0 / divide)
            return norms, scale
        record(name, grads)
        rest = grads if rest is None else sum_grads(rest, grads)
        _add_into(params, grads, 1.0 / divide)
        del grads
    return norms, (0.0 if mode == "grad" and "shd" in terms else 1.0)


def check_supported(mode: str, distributed_enabled: bool) -> None:
    """balance=grad assembles .grad by hand, which DDP/FSDP's gradient hooks never see."""
    if mode == "grad" and distributed_enabled:
        raise ShdError("distill.balance: grad runs in one process only (its per-part gradients bypass the "
                       "DDP/FSDP gradient sync); under torchrun use distill.balance=value")


__all__ = ["schedule_factor", "shd_fraction", "value_scale", "weighted_terms", "merge_rest", "global_norm",
           "backward_terms", "check_supported"]
