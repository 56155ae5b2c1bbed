"""`shd inspect-heads` loading: resolve a model, read its samples (text or images), measure its heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shdcli.errors import ShdError
from shdcli.heads.measure import HeadsReport, default_heads, groups_per_layer_grouper, inspect_heads
from shdcli.models.families import model_shape
from shdcli.models.grouping import calibrate_teacher
from shdcli.models.sources import resolve_source
from shdcli.tasks.data import TokenBlocks, eval_batches, tokenize
from shdcli.tasks.registry import get as get_task
from shdcli.tasks.registry import load_model


# --------------------------------------------------------------------------- loading (CLI)
def text_batches(docs: list[str], tokenizer, task: str, samples: int, seq_len: int,
                 batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first `samples` sequences of the text: packed seq_len blocks for a causal LM (as in
    training), one padded sequence per document (cut at seq_len) for an encoder."""
    blocks = tokenize(docs, tokenizer, seq_len, packed=get_task(task).packed)
    blocks = TokenBlocks(blocks.input_ids[:samples], blocks.attention_mask[:samples])
    return eval_batches(blocks, batch_size)


GROUPINGS = ("balanced", "pairs", "calibrated")


@dataclass(frozen=True, kw_only=True)
class InspectOptions:
    """What `shd inspect-heads` runs the model on and measures (its options, named as on the command line)."""

    data: str | None = None  # --data: text or images (None: builtin:sentences / builtin:digits)
    samples: int = 32  # --samples: sequences or images the model runs on
    seq_len: int = 64  # --seq-len: tokens per sample (causal LMs: packed blocks)
    batch_size: int = 8  # --batch-size
    target_heads: int | None = None  # --heads-to: K (None: half the heads, rounded up)
    tolerance: float = 0.3  # --tolerance: the lsq error a layer's suggested head count may lose
    grouping: str = "balanced"  # --grouping: balanced | pairs | calibrated
    sample_index: int = 0  # --sample: the sample attention_layerL.png shows
    device: str = "cpu"

    def check(self) -> None:
        """One-line errors naming the option, before anything loads."""
        if self.samples < 1:
            raise ShdError("--samples: give at least 1 sample")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ShdError("--batch-size must be >= 1 and --seq-len >= 2")
        if self.grouping not in GROUPINGS:
            raise ShdError(f"--grouping: {self.grouping!r} is not a grouping; use {', '.join(GROUPINGS)}")
        if self.tolerance < 0:
            raise ShdError("--tolerance: give a non-negative relative error, e.g. 0.3")


def run_inspect(model_spec: str, options: InspectOptions = InspectOptions()) -> HeadsReport:
    """Resolve and load a model (HF folder, .gguf, pkg://), read its samples, and inspect its heads.

    Text models read `data` (default builtin:sentences); image classifiers (ViT, DeiT) read images
    (default builtin:digits, the fixed validation split of tasks/image.py) and ignore seq_len.
    grouping = calibrated chooses each layer's groups on the first half of the samples
    (grouping.calibrate_teacher) and measures them, and the contiguous groups, on the other half.
    """
    options.check()
    o = options  # short: read on every line below
    folder = resolve_source(model_spec, "MODEL")
    model, preprocessor, task = load_model(folder, "MODEL", backbone_ok=True)  # a masked LM: its attention
    shape = model_shape(model.config)
    if o.target_heads is not None and not 1 <= o.target_heads <= shape.heads:
        raise ShdError(f"--heads-to: {o.target_heads} is outside 1..{shape.heads} (the model has {shape.heads} heads)")
    batches, data, tokenizer = get_task(task).inspect_batches(folder, preprocessor, o.data, o.samples, o.seq_len,
                                                              o.batch_size, shape.max_positions)
    # calibrated: the first half of the samples chooses the groups, the rest is measured (with one
    # sample, both use it: the report says so in calibration_heldout)
    total = sum(len(next(iter(b.values()))) for b in batches)
    calib, batches = _split_batches(batches, total // 2) if o.grouping == "calibrated" else ([], batches)
    n = sum(len(next(iter(b.values()))) for b in batches)
    if n == 0:
        raise ShdError("--data: no samples to run the model on; give data with some text or images")
    if not 0 <= o.sample_index < n:
        raise ShdError(f"--sample: {o.sample_index} is outside 0..{n - 1} (the {n} samples measured)")
    meta = {"model": model_spec, "folder": folder, "data": data, "seq_len": o.seq_len, "task": task,
            "grouping": o.grouping}
    target = o.target_heads or default_heads(shape.heads)
    grouper, chosen = None, {}
    if o.grouping == "calibrated":
        model.eval().to(o.device)
        chosen = calibrate_teacher(model, list(range(shape.layers)), calib or batches, target, o.device)
        grouper = groups_per_layer_grouper(shape.heads, target, {i: c.groups for i, c in chosen.items()})
    report = inspect_heads(model, batches, target, o.tolerance, grouper=grouper, grouping=o.grouping,
                           sample_index=o.sample_index, device=o.device, tokenizer=tokenizer, meta=meta,
                           compare_contiguous=o.grouping == "calibrated")
    if not get_task(task).text and report.sample_maps is not None:  # images
        report.seq_len = int(report.sample_maps.shape[-1])  # tokens per image: patches + CLS (+ distillation)
    if chosen:
        report.calibration_samples = sum(len(next(iter(b.values()))) for b in calib) if calib else n
        report.calibration_heldout = bool(calib)
        for s in report.layer_stats:
            s.calibration = chosen[s.layer].to_dict() if s.layer in chosen else None
    return report


def _split_batches(batches: list[dict[str, torch.Tensor]], n_first: int) -> tuple[list[dict], list[dict]]:
    """(first n_first samples, the rest) as batches; ([], batches) when nothing would be left to measure."""
    total = sum(len(next(iter(b.values()))) for b in batches)
    if not 0 < n_first < total:
        return [], batches
    first, rest, seen = [], [], 0
    for b in batches:
        size = len(next(iter(b.values())))
        cut = min(size, max(0, n_first - seen))
        if cut:
            first.append({k: v[:cut] for k, v in b.items()})
        if cut < size:
            rest.append({k: v[cut:] for k, v in b.items()})
        seen += size
    return first, rest
