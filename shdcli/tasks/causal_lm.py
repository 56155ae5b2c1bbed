"""Causal language models (Llama, GPT-2, Qwen, Gemma ... *ForCausalLM): packed text blocks,
next-token cross entropy plus logit KD (fused with the LM head by default), perplexity.

Perplexity: token-weighted exp(mean next-token NLL); `sliding_perplexity` scores a long token
stream with overlapping windows so every token after the first is predicted exactly once, with
at least window - stride tokens of context (once the stream is that long).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shdcli.attention import fused_logits
from shdcli.attention.fused_logits import next_token_nll
from shdcli.attention.losses import causal_lm_loss, logit_kd_loss
from shdcli.errors import ShdError
from shdcli.models.families import causal_model_types, model_shape
from shdcli.tasks.base import CAUSAL_LM, Batch, Forwards, QualityInputs, model_inputs
from shdcli.tasks.data import TextTask, same_tokens, tokenize

DISTANCE_CHUNK_BYTES = 64 * 2**20  # one [rows, V] float32 temporary of the depth search's token KL
# Configs without `architectures` (hand-built) of these types are causal LMs.
CAUSAL_MODEL_TYPES = causal_model_types()


class CausalLM(TextTask):
    name = CAUSAL_LM
    packed = True
    ddp_find_unused = False
    text = True
    regresses_teacher = False  # next-token cross entropy + token KD

    def matches(self, config) -> bool:
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
            return True
        return not archs and getattr(config, "model_type", "") in CAUSAL_MODEL_TYPES

    def folder_config(self, folder, field: str) -> None:
        return None  # transformers folders: AutoConfig reads them

    def auto_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def uses_logit_kd(self, distill, teacher: nn.Module, student: nn.Module) -> bool:
        if distill.logit <= 0:
            return False
        t_vocab, s_vocab = model_shape(teacher.config).vocab, model_shape(student.config).vocab
        if s_vocab != t_vocab:
            raise ShdError(
                f"distill.logit: teacher vocabulary ({t_vocab}) and student vocabulary ({s_vocab}) differ, "
                "so logits cannot be compared; set distill.logit=0 to train without logit KD"
            )
        return True

    def fuses_heads(self, distill) -> bool:
        return distill.logit_impl == "fused"  # both heads skipped in forward: final hidden states instead

    def losses(self, f: Forwards) -> dict[str, torch.Tensor]:
        d, ids, mask = f.distill, f.batch["input_ids"], f.batch.get("attention_mask")
        if self.fuses_heads(d):
            return fused_logits.causal_lm_parts(f.student, f.student_out, f.teacher, f.teacher_out, ids, mask, d,
                                                f.use_logit)
        parts = {"task": causal_lm_loss(f.student_out.logits, ids, mask)}
        if f.use_logit:
            parts["logit"] = logit_kd_loss(f.student_out.logits, f.teacher_out.logits, mask, d.logit_temperature,
                                           kind=d.logit_loss, beta=d.jsd_beta)
        return parts

    def batch_weight(self, batch: Batch) -> float:
        return float(batch["attention_mask"][:, 1:].sum())  # predicted tokens

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        return {"val_perplexity": math.exp(min(losses["val_task"], 700.0))}

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        # same packed validation blocks as val_perplexity, for a like-for-like number
        return {"teacher_val_perplexity": perplexity(teacher, val_batches, device)["perplexity"]}

    def quality(self, model: nn.Module, tokenizer, teacher: nn.Module | None, q: QualityInputs,
                notes: list[str], name: str) -> dict[str, float]:
        if not same_tokens(tokenizer, q.tokenizer):
            notes.append(f"{name}: its tokenizer differs from the teacher's; perplexity uses its own tokens")
        # seq_len=1 packs the documents (joined with EOS, as in training) without cutting any tokens off.
        ids = tokenize(q.docs, tokenizer, 1, True).input_ids.flatten()[: q.max_tokens]
        stride = q.stride or max(1, q.seq_len // 2)
        ppl = sliding_perplexity(model, ids, q.seq_len, stride, q.device, batch_size=q.batch_size)
        return {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "ppl_tokens": ppl["tokens"]}

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()  # [B, N, V]

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        """Token KL(teacher || pruned) over valid positions, in chunks of token rows (a 262k vocabulary
        makes each [rows, V] float32 temporary large)."""
        ref, out = reference.flatten(0, 1), output.flatten(0, 1)  # [B N, V]
        mask = batch["attention_mask"].flatten().to(ref.dtype)
        rows = max(1, DISTANCE_CHUNK_BYTES // (4 * ref.shape[-1]))
        total = ref.new_zeros(())
        for a in range(0, ref.shape[0], rows):
            log_p, log_q = F.log_softmax(ref[a:a + rows], -1), F.log_softmax(out[a:a + rows], -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [rows]
            total += (kl * mask[a:a + rows]).sum()
        return float(total / mask.sum().clamp_min(1.0))


# --------------------------------------------------------------------------- perplexity
def _ppl(nll: float, tokens: int) -> dict[str, float]:
    mean = nll / max(1, tokens)
    return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}


@torch.inference_mode()
def perplexity(model, batches: list[dict[str, torch.Tensor]], device: torch.device | str) -> dict[str, float]:
    """Token-weighted perplexity over batches: exp(total next-token NLL / number of predicted tokens)."""
    nll, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        part, n = next_token_nll(model, batch["input_ids"], batch["attention_mask"], labels)  # head in row chunks
        nll, tokens = nll + part, tokens + n
    return _ppl(nll, tokens)


def window_spans(total: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `total` tokens.

    Window w covers tokens [begin, end) and scores positions [first, end): the ones the previous
    window did not reach, never its own first token (it has no context). Every position 1..total-1
    is scored exactly once.
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    if not 1 <= stride < window:  # windows must overlap, else each window's first token goes unscored
        raise ValueError(f"stride {stride} must be in 1..window - 1 ({window - 1})")
    spans, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + window, total)
        spans.append((begin, end, max(prev_end, begin + 1)))
        if end >= total:
            return spans
        prev_end = end
        begin += stride


@torch.inference_mode()
def sliding_perplexity(model, ids: torch.Tensor, window: int, stride: int, device: torch.device | str,
                       batch_size: int = 4) -> dict[str, float]:
    """Token-weighted perplexity of one long token stream ids [T] with sliding windows (see window_spans)."""
    ids = ids.flatten().long()
    if ids.numel() < 2:
        raise ShdError("data: the held-out text gives fewer than 2 tokens; give more text")
    spans = window_spans(ids.numel(), window, stride)
    nll, tokens = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        length = max(end - begin for begin, end, _ in chunk)
        input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, (begin, end, first) in enumerate(chunk):  # right padding: causal rows never see it
            input_ids[row, : end - begin] = ids[begin:end]
            mask[row, : end - begin] = 1
            labels[row, first - begin: end - begin] = ids[first:end]
        part, n = next_token_nll(model, input_ids.to(device), mask.to(device), labels.to(device))
        nll, tokens = nll + part, tokens + n
    return {**_ppl(nll, tokens), "window": window, "stride": stride}
