"""Cross entropy and logit KD of a causal LM without its [B, N, V] logits (distill.logit_impl: fused).

The naive path (losses.causal_lm_loss, losses.logit_kd_loss) lets both LM heads build their whole
[B, N, V] logits and autograd keep every chunk's log-probabilities for backward: several copies of
B N V float32 (SmolLM2, V = 49,152, N = 2048: 0.4 GB each; Gemma-3, V = 262,144: 2.1 GB each).
Here, as in Liger's fused linear cross entropy / JSD:
  * HeadBypass: while active, the causal LM's output head is skipped (it is handed zero rows, so its
    logits are [B, 0, V]) and the output carries the head's input, the final hidden states [B, N, D],
    as `hidden_states[-1]`. It runs inside the model's forward (and so inside DDP / FSDP2's forward:
    FSDP2 keeps the root's parameters, the head among them, unsharded from forward to backward).
  * fused_lm_losses: token rows in chunks of c; per chunk the student's logits h W^T (+ b) [c, V], the
    teacher's from its own hidden states and head (under no grad, never kept whole), cross entropy on
    the next token and the temperature-scaled divergence to the teacher, all in float32; the gradient of
    task * CE + logit * KD with respect to the chunk's logits is formed at once and contracted into
    dh [T, D] and dW [V, D] in the same pass (one autograd Function, as lean.py does for SHD). Backward
    only scales what forward kept: O(T D + V D) instead of O(T V).
Same masks and means as the naive path: CE over rows whose next token is real (labels input_ids[:, 1:]),
KD over real tokens (attention_mask), T^2 * mean. Divergences (p student, q teacher, softmax(x / T)):
  kl          KL(q || p)                                  (forward; the naive path's logit KD)
  reverse_kl  KL(p || q)
  jsd         beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p  (TRL's / Liger's generalised
              JSD; as there, beta = 0 is forward KL and beta = 1 reverse KL, the limits up to a factor)
Gradients with respect to u = s / T: kl p - q; reverse_kl p (d - <p, d>), d = log p - log q;
jsd p (g - <p, g>), g = (1 - beta)(log p - log m). Final-logit soft-capping cap tanh(z / cap) (Gemma) is
chained through (1 - tanh^2).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shdcli.distributed import unwrap
from shdcli.errors import ShdError

KINDS = ("kl", "reverse_kl", "jsd")
ROW_COPIES = 8  # float32 [c, V] arrays alive at once in one chunk (logits, probabilities, teacher, temporaries)
MIN_ROWS = 32  # fewer rows per chunk leave the weight-bound matmuls slow; the budget yields below this
# Config fields of families whose forward rescales the logits after the head (not reproduced here).
_RESCALING = ("logit_scale", "logits_scaling", "output_multiplier_scale", "dim_model_base")


# --------------------------------------------------------------------------- the output head
@dataclass
class Head:
    """An LM head: logits = softcap(h W^T + b). weight [V, D], bias [V] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


def _softcap(config) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    text = getattr(config, "text_config", None)
    if cap is None and text is not None:
        cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def check_supported(model: torch.nn.Module, field: str = "distill.logit_impl") -> None:
    """A clear error for causal LMs the fused path cannot reproduce (no output head, logits rescaled)."""
    inner = unwrap(model)
    head = getattr(inner, "get_output_embeddings", None)
    if head is None or head() is None or getattr(inner, "config", None) is None:
        raise ShdError(f"{field}: {type(inner).__name__} has no output embeddings (LM head) to fuse; set {field}=naive")
    for name in _RESCALING:
        for config in (inner.config, getattr(inner.config, "text_config", None)):
            value = getattr(config, name, None) if config is not None else None
            if value not in (None, 1, 1.0):
                raise ShdError(f"{field}: {type(inner).__name__} rescales its logits ({name}={value}), which the "
                               f"fused path does not reproduce; set {field}=naive")


# --------------------------------------------------------------------------- skipping the head in forward
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("shd_head_bypass", default=False)


class HeadBypass:
    """Hooks on one causal LM (installed once, idle outside `active()`); see the module doc."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = unwrap(model)
        check_supported(inner)
        self.head_module = inner.get_output_embeddings()
        self.softcap = _softcap(inner.config)
        self._hidden: torch.Tensor | None = None
        self.head: Head | None = None  # the head's parameters as the forward saw them (FSDP2: unsharded)
        self.head_module.register_forward_pre_hook(self._before_head)
        inner.register_forward_hook(self._after_model, prepend=True)  # before FSDP2's post-forward hook

    def _before_head(self, module: torch.nn.Module, args: tuple):
        if not _BYPASS.get():
            return None
        hidden = args[0]
        self._hidden = hidden
        self.head = Head(module.weight, getattr(module, "bias", None), self.softcap)
        return (hidden[..., :0, :], *args[1:])

    def _after_model(self, module: torch.nn.Module, args: tuple, output):
        if not _BYPASS.get():
            return None
        if self._hidden is None:
            raise RuntimeError(f"{type(module).__name__}: the output head did not run in forward; "
                               "set distill.logit_impl=naive")
        output["hidden_states"] = (self._hidden,)
        self._hidden = None
        return output


def bypass_of(model: torch.nn.Module) -> HeadBypass:
    inner = unwrap(model)
    found = getattr(inner, "_shd_head_bypass", None)
    if found is None:
        found = HeadBypass(inner)
        inner._shd_head_bypass = found
    return found


@contextlib.contextmanager
def bypass_heads(*models: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Forward passes of these causal LMs inside the block return final hidden states instead of logits
    (enabled=False: a no-op)."""
    if not enabled:
        yield
        return
    for model in models:
        bypass_of(model)
    token = _BYPASS.set(True)
    try:
        yield
    finally:
        _BYPASS.reset(token)


def bypass_active() -> bool:
    """Whether forwards run now hand back hidden states instead of logits (teacher.memo_key)."""
    return _BYPASS.get()


def final_hidden(model: torch.nn.Module, output) -> tuple[torch.Tensor, Head]:
    """The final hidden states [B, N, D] of a forward run under bypass_heads, and the head it skipped."""
    bypass = bypass_of(model)
    hidden = output.hidden_states[-1] if getattr(output, "hidden_states", None) else None
    if hidden is None or bypass.head is None:
        raise RuntimeError("final_hidden: the forward did not run under bypass_heads")
    return hidden, bypass.head


# --------------------------------------------------------------------------- chunking
def auto_chunk_tokens(vocab: int, budget_bytes: int, rows: int) -> int:
    """Token rows per chunk: ROW_COPIES float32 [c, V] arrays within budget_bytes, at least MIN_ROWS."""
    c = max(MIN_ROWS, budget_bytes // (ROW_COPIES * 4 * max(vocab, 1)))
    return max(1, min(rows, c))


def _rows(input_ids: torch.Tensor, mask: torch.Tensor | None, with_kd: bool):
    """Flattened row weights: labels [T] (-100 = no CE), ce [T] and kd [T] float (1 = counted)."""
    mask = torch.ones_like(input_ids) if mask is None else mask
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -100)], dim=1).flatten()  # [B N]
    ce = (labels != -100).float()
    kd = mask.flatten().bool().float() if with_kd else torch.zeros_like(ce)
    return labels, ce, kd


# --------------------------------------------------------------------------- one chunk
def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij per row: [c, V] x [c, V] -> [c], one pass, no [c, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _softmax_parts(x: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [c, V] (consumed) -> (x / T shifted by its row max, exp of it, row sums [c, 1]); so
    log softmax(x / T) = shifted - log sums and softmax = exp / sums."""
    shifted = x.sub_(x.amax(dim=-1, keepdim=True))
    if temp != 1.0:
        shifted.div_(temp)
    e = shifted.exp()
    return shifted, e, e.sum(dim=-1, keepdim=True)


def _divergence(du: torch.Tensor, eu: torch.Tensor, zu: torch.Tensor, dt: torch.Tensor, et: torch.Tensor,
                zt: torch.Tensor, kind: str, beta: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence [c] between the student (du, eu, zu: _softmax_parts of s / T) and the teacher (dt, et,
    zt, the same of t / T), and its gradient with respect to u = s / T. Consumes every [c, V] argument."""
    if kind == "jsd" and beta <= 0.0:
        kind = "kl"
    elif kind == "jsd" and beta >= 1.0:
        kind = "reverse_kl"
    log_q = dt.sub_(zt.log())
    q = et.div_(zt)
    if kind == "kl":  # sum q (log q - log p), differences taken per entry (a small KL is no difference of sums)
        rows = _rowdot(q, log_q - du.sub_(zu.log()))
        grad = eu.div_(zu).sub_(q) if need_grad else None  # p - q
    elif kind == "reverse_kl":
        log_p = du.sub_(zu.log())
        p = eu.div_(zu)
        d = log_p.sub_(log_q)  # log p - log q
        rows = _rowdot(p, d)
        grad = d.sub_(rows[:, None]).mul_(p) if need_grad else None  # p (d - <p, d>)
    elif kind == "jsd":
        log_p = du.sub_(zu.log())
        p = eu.div_(zu)
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        rows = beta * _rowdot(q, log_q - log_m)
        g = log_p.sub_(log_m)  # log p - log m
        del log_m
        rows += (1.0 - beta) * _rowdot(p, g)
        if need_grad:  # p (g' - <p, g'>), g' = (1 - beta) g
            g.mul_(1.0 - beta)
            grad = g.sub_(_rowdot(p, g)[:, None]).mul_(p)
        else:
            grad = None
    else:
        raise ValueError(f"unknown logit loss {kind!r} (use {', '.join(KINDS)})")
    return rows, grad


def _logits(h: torch.Tensor, head: Head, w32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits [c, V] of rows h [c, D] and, with soft-capping, tanh(z / cap) for the chain rule."""
    z = h.to(w32.dtype) @ w32.t()
    if head.bias is not None:
        z += head.bias.to(z.dtype)
    z = z.float()
    if head.softcap is None:
        return z, None
    th = z.div_(head.softcap).tanh_()
    return th * head.softcap, th


# --------------------------------------------------------------------------- the loss
@dataclass
class FusedSpec:
    """What the fused loss needs to know besides tensors."""

    kind: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    task_weight: float = 1.0  # the gradient formed in forward is that of task * CE + logit * KD
    logit_weight: float = 1.0
    chunk_tokens: int = 0  # 0 = auto from budget_bytes
    budget_bytes: int = 64 * 2**20


class _FusedHeadLoss(torch.autograd.Function):
    """(ce, kd) = run(hidden, W, b) with the gradient of task * ce + logit * kd computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run, weights):  # noqa: D401 - autograd API
        ce, kd, dh, dw, db = run(hidden.detach(), True)
        ctx.save_for_backward(dh, dw, db)
        ctx.weights = weights
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.spent = False
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        if ctx.spent:
            raise RuntimeError("the fused logit loss keeps its gradient for one backward; set distill.logit_impl=naive")
        ctx.spent = True
        a, b = ctx.weights
        scale = g_ce / a if a != 0 else g_kd / b
        # The gradient kept is that of a*ce + b*kd: other proportions (one part alone) cannot be served.
        torch._assert_async(torch.isclose(g_ce * b, g_kd * a, rtol=1e-4, atol=1e-12),
                            "fused logit loss: backward asked for another mix of task and logit KD than "
                            "distill.task : distill.logit; set distill.logit_impl=naive")
        dh, dw, db = ctx.saved_tensors
        # In place: the saved tensors are not used again (one backward), so no second [V, D] copy.
        out = [None if t is None else t.mul_(scale.to(t.dtype)).to(dt) for t, dt in zip((dh, dw, db), ctx.dtypes)]
        return out[0], out[1], out[2], None, None


def fused_lm_losses(
    hidden: torch.Tensor,
    head: Head,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_head: Head | None,
    spec: FusedSpec,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next-token CE, logit KD or None) from final hidden states; see the module doc.

    hidden [B, N, D] (student, with grad), head: the student's; input_ids, mask [B, N]; teacher_hidden
    [B, N, Dt] and teacher_head, or None for CE alone. Equal to losses.causal_lm_loss and
    losses.logit_kd_loss (spec.kind, spec.beta) on the full logits.
    """
    if spec.kind not in KINDS:
        raise ValueError(f"unknown logit loss {spec.kind!r} (use {', '.join(KINDS)})")
    with_kd = teacher_hidden is not None
    bsz, n, dim = hidden.shape
    device = hidden.device
    with torch.no_grad():
        labels, ce_w, kd_w = _rows(input_ids, mask, with_kd)
        used = (ce_w + kd_w) > 0
        keep = None if bool(used.all()) else used.nonzero().squeeze(1)  # rows counted by neither: skipped
        labels_k = labels if keep is None else labels[keep]
        ce_w, kd_w = (ce_w, kd_w) if keep is None else (ce_w[keep], kd_w[keep])
        n_ce, n_kd = ce_w.sum(), kd_w.sum().clamp_min(1.0)
        t_rows = None
        if with_kd:
            t_rows = teacher_hidden.reshape(bsz * n, -1)
            t_rows = t_rows if keep is None else t_rows[keep]
    rows_h = hidden.reshape(bsz * n, dim)
    rows_h = rows_h if keep is None else rows_h[keep]
    total = rows_h.shape[0]
    chunk = spec.chunk_tokens or auto_chunk_tokens(head.vocab, spec.budget_bytes, total)
    temp = spec.temperature
    a = float(spec.task_weight)
    b = float(spec.logit_weight) if with_kd else 0.0

    def run(h: torch.Tensor, need_grad: bool):
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            w32 = head.weight.float()
            tw = None if teacher_head is None else teacher_head.weight  # teacher logits in its own dtype
            dh = torch.zeros(h.shape, device=device) if need_grad else None
            dw = torch.zeros(w32.shape, device=device) if need_grad else None
            db = torch.zeros(head.vocab, device=device) if need_grad and head.bias is not None else None
            ce_sum = torch.zeros((), device=device)
            kd_sum = torch.zeros((), device=device)
            ce_scale = a * ce_w / n_ce  # d(a * CE)/d(row's CE)
            kd_scale = b * temp * kd_w / n_kd  # d(b T^2 mean)/d(row's divergence) / T (u = s / T)
            for start in range(0, total, chunk):
                stop = min(total, start + chunk)
                hc = h[start:stop]
                s, th = _logits(hc, head, w32)  # [c, V]
                lab = labels_k[start:stop].clamp_min(0)[:, None]
                ds, es, zs = _softmax_parts(s, 1.0)  # s - max, its exp, row sums
                ce_sum += ((zs.log().squeeze(1) - ds.gather(1, lab).squeeze(1)) * ce_w[start:stop]).sum()
                grad = None
                if with_kd:  # the student's tempered exp first: es becomes the CE gradient below
                    du = ds.div_(temp) if temp != 1.0 else ds
                    eu = du.exp() if temp != 1.0 else es.clone()
                    zu = eu.sum(dim=-1, keepdim=True)
                if need_grad:  # a * (softmax(s) - onehot) / n_ce on CE rows
                    grad = es.mul_(ce_scale[start:stop, None] / zs)
                    grad.scatter_add_(1, lab, -ce_scale[start:stop, None])
                del es
                if with_kd:
                    t, _ = _logits(t_rows[start:stop], teacher_head, tw)
                    dt, et, zt = _softmax_parts(t, temp)
                    rows, g_u = _divergence(du, eu, zu, dt, et, zt, spec.kind, spec.beta, need_grad)
                    del du, eu, dt, et
                    kd_sum += (rows * kd_w[start:stop]).sum()
                    if need_grad:
                        grad += g_u.mul_(kd_scale[start:stop, None])
                    del g_u
                del s, ds
                if need_grad:
                    if th is not None:  # d softcap(z) / dz = 1 - tanh^2
                        grad.mul_(1.0 - th * th)
                    dh[start:stop] = grad @ w32
                    dw.addmm_(grad.t(), hc.float())
                    if db is not None:
                        db += grad.sum(dim=0)
            ce = ce_sum / n_ce
            kd = temp * temp * kd_sum / n_kd
            return ce, kd, dh, dw, db

    params = (head.weight, head.bias)
    if torch.is_grad_enabled() and (rows_h.requires_grad or any(p is not None and p.requires_grad for p in params)) \
            and (a != 0 or b != 0):
        ce, kd = _FusedHeadLoss.apply(rows_h, head.weight, head.bias, run, (a, b))
    else:
        ce, kd = run(rows_h.detach(), False)[:2]
    return ce, (kd if with_kd else None)


# --------------------------------------------------------------------------- evaluation: summed NLL
@torch.inference_mode()
def next_token_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, budget_bytes: int = 64 * 2**20) -> tuple[float, int]:
    """Summed NLL of labels[:, 1:] (-100 = not scored) under the model's next-token distribution and the
    count, with the head applied to chunks of rows (no [B, N, V] logits). Models without an output head
    (or rescaling their logits) are scored from their full logits."""
    target = labels[:, 1:]
    try:
        check_supported(model)
    except ShdError:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                                reduction="sum")
        return float(nll), int((target != -100).sum())
    with bypass_heads(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    hidden, head = final_hidden(model, out)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat = target.reshape(-1)
    keep = (flat != -100).nonzero().squeeze(1)
    rows, flat = rows[keep], flat[keep]
    chunk = auto_chunk_tokens(head.vocab, budget_bytes, rows.shape[0])
    w = head.weight if head.weight.dtype == torch.float32 else head.weight.float()
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, rows.shape[0], chunk):
        s, _ = _logits(rows[start:start + chunk], head, w)
        lab = flat[start:start + chunk, None]
        total += (torch.logsumexp(s, dim=-1) - s.gather(1, lab).squeeze(1)).sum().double()
    return float(total), int(keep.numel())


# --------------------------------------------------------------------------- train.step_losses' causal-LM parts
def causal_lm_parts(student: torch.nn.Module, s_out, teacher: torch.nn.Module, t_out, input_ids: torch.Tensor,
                    mask: torch.Tensor | None, distill, use_logit: bool) -> dict[str, torch.Tensor]:
    """{"task": CE, "logit": KD} of forwards run under bypass_heads (recipe.DistillSpec `distill`), with the
    gradient of distill.task * CE + distill.logit * KD."""
    hidden, head = final_hidden(student, s_out)
    t_hidden, t_head = final_hidden(teacher, t_out) if use_logit else (None, None)
    spec = FusedSpec(kind=distill.logit_loss, beta=distill.jsd_beta, temperature=distill.logit_temperature,
                     task_weight=distill.task, logit_weight=distill.logit if use_logit else 0.0,
                     budget_bytes=distill.chunk_memory_mb * 2**20)
    ce, kd = fused_lm_losses(hidden, head, input_ids, mask, t_hidden, t_head, spec)
    return {"task": ce} if kd is None else {"task": ce, "logit": kd}


@torch.inference_mode()
def forward_in_row_chunks(model: torch.nn.Module, batch: dict[str, torch.Tensor], budget_bytes: int = 64 * 2**20):
    """One forward pass that computes every position's logits, a chunk of rows at a time, and keeps none
    (what evaluate.measure_speed times: the same work as model(**batch), without [B, N, V] in memory).
    Models without a fusable head run model(**batch)."""
    try:
        check_supported(model)
    except ShdError:
        return model(**batch)
    with bypass_heads(model):
        out = model(**batch)
    hidden, head = final_hidden(model, out)
    rows = hidden.reshape(-1, hidden.shape[-1])
    chunk = auto_chunk_tokens(head.vocab, budget_bytes, rows.shape[0])
    for start in range(0, rows.shape[0], chunk):
        z = rows[start:start + chunk] @ head.weight.t()
        if head.bias is not None:
            z += head.bias
        if head.softcap is not None:
            z = torch.tanh(z / head.softcap) * head.softcap
    return out
