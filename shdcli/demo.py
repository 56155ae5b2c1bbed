"""Demo teachers `shd make-demo-teacher` trains offline, for trying shd end to end without a hub.

vit-digits: a small ViTForImageClassification trained from scratch on scikit-learn's digits
(upscaled), saved with its image processor as an HF folder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shdcli.models.sources import save_model_folder
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

DEMO_TEACHERS = {"vit-digits": "a 4-layer, 12-head ViT image classifier trained on scikit-learn's digits"}


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
    warmup = max(1, steps // 10)

    def factor(s: int) -> float:  # linear warm-up, cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = stream.next()
        loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"make-teacher step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    acc = accuracy_metrics(model, eval_batches(val, 256), torch.device("cpu"))
    info = {"data": data, "train_images": len(train), "val_images": len(val), "val_fraction": val_fraction,
            "split_seed": SPLIT_SEED, "steps": steps, "train_s": time.perf_counter() - t0,
            **{f"val_{k}": v for k, v in acc.items()}}
    save_model_folder(model, processor, Path(out), {"shd_teacher.json": json.dumps(info, indent=2)})
    log(f"teacher written to {out}: val top-1 {acc['top1']:.4f} on {len(val)} held-out images")
    return info
