"""Diffusion transformers (diffusers' DiTTransformer2DModel): class-conditional denoising in pixel space.

`task: diffusion` distils a DiT teacher into a student with fewer heads (and layers; a narrower width with
init: random). Needs `diffusers` (pip install 'shd[diffusion]'); without it a diffusion recipe or folder is
refused with one line naming the extra.

The model. A diffusers folder (config.json with `_class_name: DiTTransformer2DModel`, the weights, and the
noise schedule's scheduler_config.json beside them) loads as a `DiTModel`: the diffusers module inside an
nn.Module whose `config` is an HF-style `DiTConfig` (layers, heads, width: what models/families.py, the
student derivation and the SHD plan read) that also carries the diffusers and scheduler configs. A student
is saved back as a diffusers folder: `DiTTransformer2DModel.from_pretrained(student)` reloads it and
`DDPMScheduler.from_pretrained(student)` its schedule. Attention is captured through diffusers' attention
processors (attention/processors.py); families.py's DIFFUSERS_FAMILIES says where DiT keeps its parts.

The data. Images (tasks/image.py's sources: builtin:digits, image folders, .npz, datasets folders) become
[C, H, W] pixels in [-1, 1] at the model's sample size and channels, split by image.split_rows (fixed seed,
the split the demo teacher trained on). A batch (NoisedImages.batch) draws per row a timestep t uniformly
from the scheduler's training timesteps and Gaussian noise eps, seeded by the batch's rows (a resumed run
sees the very same noise), and holds the model's inputs x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
("hidden_states"), t ("timestep"), the class ("class_labels"), and the regression target as "labels":
eps (prediction_type epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v_prediction).

The losses. task = MSE of the student's prediction to the target (the denoising objective); "logit" (output
KD, weight distill.logit) = MSE of the student's prediction to the teacher's at the same noisy input,
timestep and class; SHD (the shared lean loss) on the mapped layers' maps of that same forward. The
logit_loss / logit_temperature settings of classifier KD do not apply to a regression output.

The metrics (final evaluation and `shd eval`):
  - denoising MSE at fixed timesteps (DENOISE_TIMESTEPS) on the held-out images with fixed noise: the
    student's prediction against the teacher's, and each model's against the true target;
  - samples: SAMPLES_PER_CLASS per class by deterministic DDIM (SAMPLING_STEPS steps, eta 0) from the same
    seeded noise for teacher and student, scored by a small digits classifier trained here on the training
    split (DigitScorer): the class accuracy of the samples (does a "3" look like a 3), and the Frechet
    distance between the scorer's penultimate features of the samples and of the held-out real images (the
    FID recipe with this classifier in place of Inception, which cannot be downloaded here);
  - a PNG grid (samples.png): one row per class, the teacher's samples beside the student's.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from shdcli.errors import ShdError
from shdcli.models.sources import count_parameters, resolve_source, run_info
from shdcli.report import write_json_atomic
from shdcli.tasks.base import DIFFUSION, Batch, NoHeldOutText, model_inputs
from shdcli.tasks.data import eval_batches
from shdcli.tasks.image import SPLIT_SEED, read_images, split_rows

EXTRA = "pip install 'shd[diffusion]'"
ARCHITECTURES = ("DiTTransformer2DModel",)
SCHEDULER_FILE = "scheduler_config.json"
DENOISE_TIMESTEPS = (50, 250, 500, 750, 950)  # fixed timesteps of the denoising MSE (of 1000 training steps)
SAMPLES_PER_CLASS = 20
SAMPLING_STEPS = 25
SAMPLE_SEED = 0
GRID_COLUMNS = 8  # samples per model and class in the PNG grid
INSPECT_TIMESTEP = 500  # `shd inspect-heads` default: maps at this timestep (--data SOURCE@t=T chooses another)


def diffusers_module():
    """The diffusers package, or one line naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ShdError(f"task: diffusion needs the diffusers package; {EXTRA}") from None
    return diffusers


# --------------------------------------------------------------------------- the model
class DiTConfig(PretrainedConfig):
    """An HF-style view of a DiTTransformer2DModel config: the counts shd's shape, plan and derivation read
    (num_hidden_layers, num_attention_heads, hidden_size = heads x attention_head_dim, intermediate_size =
    DiT's fixed 4 x width), plus the rest of the diffusers config (`dit`) and the noise schedule (`scheduler`)."""

    model_type = "dit"

    def __init__(self, num_hidden_layers: int = 1, num_attention_heads: int = 1, hidden_size: int = 64,
                 intermediate_size: int | None = None, dit: dict | None = None, scheduler: dict | None = None,
                 **kwargs) -> None:
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_size = hidden_size
        self.intermediate_request = intermediate_size  # an MLP width other than 4 x width is refused when built
        self.dit = dict(dit or {})
        self.scheduler = dict(scheduler or {})
        kwargs.setdefault("architectures", list(ARCHITECTURES))
        super().__init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        """DiT's MLP width: always 4 x the width (FeedForward mult 4), so it follows a narrower student."""
        return 4 * self.hidden_size

    @intermediate_size.setter
    def intermediate_size(self, value: int | None) -> None:
        self.intermediate_request = value

    @classmethod
    def from_diffusers(cls, dit: dict, scheduler: dict) -> DiTConfig:
        dit = {k: v for k, v in dit.items() if not k.startswith("_")}
        heads = int(dit["num_attention_heads"])
        return cls(num_hidden_layers=int(dit["num_layers"]), num_attention_heads=heads,
                   hidden_size=heads * int(dit["attention_head_dim"]), dit=dit, scheduler=scheduler)

    def diffusers_kwargs(self) -> dict:
        """DiTTransformer2DModel's arguments for this shape (a derived student's heads, layers, width)."""
        if self.hidden_size % self.num_attention_heads:
            raise ShdError(f"student.from_teacher: width {self.hidden_size} is not divisible by "
                           f"{self.num_attention_heads} heads; give a hidden_size that is a multiple of the heads")
        if self.intermediate_request not in (None, self.intermediate_size):
            raise ShdError(f"student.from_teacher.intermediate_size: DiTTransformer2DModel's MLP is 4 x its width "
                           f"({self.intermediate_size}), not {self.intermediate_request}; drop intermediate_size")
        return {**self.dit, "num_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "attention_head_dim": self.hidden_size // self.num_attention_heads}


def folder_config(folder: Path, field: str = "model") -> DiTConfig | None:
    """The DiTConfig of a diffusers DiT folder (config.json `_class_name` DiTTransformer2DModel, with the
    scheduler's config beside it); None for any other folder. Needs diffusers installed."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("_class_name") not in ARCHITECTURES:
        return None
    diffusers_module()
    scheduler_path = Path(folder) / SCHEDULER_FILE
    if not scheduler_path.exists():
        raise ShdError(f"{field}: {folder} holds a DiT but no {SCHEDULER_FILE}; save the noise scheduler beside "
                       "it (scheduler.save_pretrained(folder)) so teacher and student share its timesteps")
    try:
        scheduler = json.loads(scheduler_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShdError(f"{field}: cannot read {scheduler_path} ({exc}); fix or replace it") from None
    return DiTConfig.from_diffusers(raw, scheduler)


class DiTModel(nn.Module):
    """A DiTTransformer2DModel (`.dit`) behind shd's model interface: `config` is a DiTConfig; forward(
    hidden_states [B, C, H, W], timestep [B], class_labels [B]) gives diffusers' output (.sample [B, C, H, W]);
    save_pretrained writes the diffusers folder and the scheduler config."""

    def __init__(self, config: DiTConfig, dit: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.dit = dit if dit is not None else diffusers_module().DiTTransformer2DModel(**config.diffusers_kwargs())

    @classmethod
    def from_config(cls, config: DiTConfig, dtype: torch.dtype | None = None, **_: Any) -> DiTModel:
        model = cls(config)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, output_loading_info: bool = False,
                        **_: Any) -> DiTModel | tuple[DiTModel, dict]:
        config = folder_config(Path(folder))
        if config is None:
            raise ShdError(f"model: {folder} is not a diffusers DiTTransformer2DModel folder")
        dit, info = diffusers_module().DiTTransformer2DModel.from_pretrained(
            str(folder), torch_dtype=dtype, output_loading_info=True)
        model = cls(config, dit)
        return (model, info) if output_loading_info else model

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        return self.dit(hidden_states, timestep=timestep, class_labels=class_labels)

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True, **_: Any) -> None:
        self.dit.save_pretrained(str(folder), safe_serialization=True)
        training_scheduler(self.config).save_pretrained(str(folder))

    def get_input_embeddings(self) -> nn.Module:
        return self.dit.pos_embed

    def get_output_embeddings(self) -> None:
        return None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.dit.config
        return int(c.in_channels), int(c.sample_size), int(c.sample_size)

    @property
    def num_classes(self) -> int:
        return int(self.dit.config.num_embeds_ada_norm)


def training_scheduler(config: DiTConfig):
    """The DDPM noise schedule of a model (its scheduler_config.json)."""
    return diffusers_module().DDPMScheduler.from_config(config.scheduler)


def alphas_cumprod(config: DiTConfig) -> torch.Tensor:
    """[T] float64 abar_t of the model's training schedule."""
    return training_scheduler(config).alphas_cumprod.double()


# --------------------------------------------------------------------------- data
def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, classes: torch.Tensor, abar: torch.Tensor,
           prediction: str) -> Batch:
    """A denoising batch: x0, noise [B, C, H, W], t, classes [B], abar [T] -> the model's inputs and the target."""
    a = abar[t].float().sqrt()[:, None, None, None]  # [B, 1, 1, 1]
    s = (1 - abar[t]).float().sqrt()[:, None, None, None]
    target = noise if prediction == "epsilon" else a * noise - s * x0
    return {"hidden_states": a * x0 + s * noise, "timestep": t, "class_labels": classes, "labels": target}


@dataclass
class NoisedImages:
    """Clean images [S, C, H, W] in [-1, 1] and their classes [S], served as denoising batches (module doc)."""

    images: torch.Tensor
    classes: torch.Tensor
    abar: torch.Tensor  # [T] float64
    prediction: str
    seed: int = 0

    def __len__(self) -> int:
        return self.classes.shape[0]

    def batch(self, rows) -> Batch:
        idx = torch.arange(len(self))[rows]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(idx.numpy().tobytes()))
        t = torch.randint(0, self.abar.shape[0], (idx.shape[0],), generator=gen)
        noise = torch.randn(self.images[idx].shape, generator=gen)
        return noised(self.images[idx], noise, t, self.classes[idx], self.abar, self.prediction)

    def repeat(self, times: int) -> NoisedImages:
        return NoisedImages(self.images.repeat(times, 1, 1, 1), self.classes.repeat(times), self.abar,
                            self.prediction, self.seed)


@dataclass
class LabelledImages:
    """Images [S, C, H, W] in [-1, 1], class ids [S] and the class names."""

    images: torch.Tensor
    classes: torch.Tensor
    names: list[str]


def to_pixels(images: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """uint8 RGB [H, W, 3] images -> [S, channels, size, size] float32 in [-1, 1] (grey: the channel mean)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [S, 3, H, W]
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif channels != 3:
        raise ShdError(f"teacher.path: the DiT reads {channels} channels; shd feeds it grey (1) or RGB (3) images")
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def load_split(path: str, channels: int, size: int, num_classes: int, val_fraction: float,
               field: str = "data.path") -> tuple[LabelledImages, LabelledImages]:
    """(train, held-out) images of a source, classes numbered in the source's order, split by image.split_rows."""
    raw = read_images(path, field=field)
    if len(raw.classes) > num_classes:
        raise ShdError(f"{field}: {path} has {len(raw.classes)} classes but the DiT embeds {num_classes}; "
                       "give data with at most as many classes as the teacher's num_embeds_ada_norm")
    index = {c: i for i, c in enumerate(raw.classes)}
    pixels = to_pixels(raw.images, channels, size)
    classes = torch.tensor([index[n] for n in raw.names], dtype=torch.long)
    if raw.split is not None:
        is_val = torch.tensor([s == "val" for s in raw.split])
        train_rows, val_rows = (~is_val).nonzero().squeeze(-1), is_val.nonzero().squeeze(-1)
    else:
        train_rows, val_rows = split_rows(len(classes), val_fraction, SPLIT_SEED)
    return (LabelledImages(pixels[train_rows], classes[train_rows], raw.classes),
            LabelledImages(pixels[val_rows], classes[val_rows], raw.classes))


# --------------------------------------------------------------------------- the digits scorer
class DigitScorer(nn.Module):
    """A small MLP classifier of images; its penultimate activations are the Frechet distance's features."""

    def __init__(self, pixels: int, classes: int, hidden: int = 256, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, features),
                                  nn.ReLU())
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, F]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, classes]
        return self.head(self.body(x))


def train_scorer(train: LabelledImages, classes: int, steps: int = 600, seed: int = 0) -> DigitScorer:
    """A DigitScorer trained full-batch (AdamW, light Gaussian pixel noise) on the training split; the global RNG
    is left as it was (fork_rng), so scoring never changes a run's randomness."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer = DigitScorer(train.images[0].numel(), classes)
        opt = torch.optim.AdamW(scorer.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(steps):
            x = train.images + 0.1 * torch.randn_like(train.images)
            loss = F.cross_entropy(scorer(x), train.classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return scorer.eval().requires_grad_(False)


@functools.cache
def reference(path: str, channels: int, size: int, num_classes: int, val_fraction: float
              ) -> tuple[LabelledImages, LabelledImages, DigitScorer]:
    """(train, held-out, scorer trained on train) of a data source, memoised per process."""
    train, val = load_split(path, channels, size, num_classes, val_fraction)
    return train, val, train_scorer(train, num_classes)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to features a [N, F] and b [M, F]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)  # [F, F]
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()  # tr (S_a^1/2 S_b S_a^1/2)^1/2
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


# --------------------------------------------------------------------------- sampling and metrics
@torch.no_grad()
def generate(model: DiTModel, classes: torch.Tensor, steps: int = SAMPLING_STEPS, seed: int = SAMPLE_SEED,
             device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Deterministic DDIM samples (eta 0) of `classes` [N] from seeded Gaussian noise: [N, C, H, W] in [-1, 1]."""
    scheduler = diffusers_module().DDIMScheduler.from_config(model.config.scheduler)
    scheduler.set_timesteps(steps)
    noise = torch.randn((classes.shape[0], *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, classes.shape[0], batch_size):
        x = noise[start:start + batch_size].to(device)
        y = classes[start:start + batch_size].to(device)
        for t in scheduler.timesteps:
            pred = model(hidden_states=x, timestep=t.expand(x.shape[0]).to(device), class_labels=y).sample
            x = scheduler.step(pred.float(), t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def sample_classes(num_classes: int, per_class: int = SAMPLES_PER_CLASS) -> torch.Tensor:
    """[num_classes * per_class] class ids, per_class of each in a row."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def sample_scores(samples: torch.Tensor, classes: torch.Tensor, scorer: DigitScorer, real: LabelledImages
                  ) -> dict[str, float]:
    """Class accuracy of samples [N, C, H, W] meant as `classes` [N], and their Frechet distance to the real
    held-out images in the scorer's feature space."""
    return {"sample_accuracy": float((scorer(samples).argmax(-1) == classes).float().mean()),
            "sample_fd": frechet_distance(scorer.features(samples), scorer.features(real.images))}


@torch.no_grad()
def denoise_errors(student: nn.Module, teacher: nn.Module, held: LabelledImages, abar: torch.Tensor,
                   prediction: str, device: torch.device | str, batch_size: int = 256) -> dict[str, float]:
    """Denoising MSE at DENOISE_TIMESTEPS on the held-out images with fixed noise (seed 0): the student's
    prediction against the teacher's (denoise_mse_vs_teacher_t{t} and their mean), and each model's
    against the true target (student_denoise_mse, teacher_denoise_mse: means over the timesteps)."""
    noise = torch.randn(held.images.shape, generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    sums = {"student_denoise_mse": 0.0, "teacher_denoise_mse": 0.0, "denoise_mse_vs_teacher": 0.0}
    n = held.images.shape[0]
    for t in DENOISE_TIMESTEPS:
        t = min(t, abar.shape[0] - 1)
        err = {"vs": 0.0, "student": 0.0, "teacher": 0.0}
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            steps = torch.full((held.images[rows].shape[0],), t, dtype=torch.long)
            batch = {k: v.to(device) for k, v in noised(held.images[rows], noise[rows], steps, held.classes[rows],
                                                         abar, prediction).items()}
            inputs = model_inputs(batch)
            s, tt = student(**inputs).sample.float(), teacher(**inputs).sample.float()
            w = s.shape[0] / n
            err["vs"] += w * float(F.mse_loss(s, tt))
            err["student"] += w * float(F.mse_loss(s, batch["labels"]))
            err["teacher"] += w * float(F.mse_loss(tt, batch["labels"]))
        out[f"denoise_mse_vs_teacher_t{t}"] = err["vs"]
        sums["denoise_mse_vs_teacher"] += err["vs"] / len(DENOISE_TIMESTEPS)
        sums["student_denoise_mse"] += err["student"] / len(DENOISE_TIMESTEPS)
        sums["teacher_denoise_mse"] += err["teacher"] / len(DENOISE_TIMESTEPS)
    return {**sums, **out}


def write_sample_grid(samples: dict[str, torch.Tensor], per_class: int, names: list[str], path: Path,
                      title: str, columns: int = GRID_COLUMNS) -> Path:
    """PNG: one row per class; for each model (teacher first) `columns` of its samples [K per_class, C, H, W]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ShdError("the sample grid PNG needs matplotlib; pip install 'shd[plot]'") from exc
    columns = min(columns, per_class)
    roles = list(samples)
    classes = len(names)
    tiles = []
    for k in range(classes):
        row = []
        for r, role in enumerate(roles):
            block = samples[role][k * per_class:k * per_class + columns]  # [columns, C, H, W]
            block = F.pad(block, (0, 1, 0, 1), value=0.0)  # a grey line right of and below each sample
            row += [x for x in block]
            if r < len(roles) - 1:
                row.append(torch.full_like(block[0], 1.0))  # a white gap between the models
        tiles.append(torch.cat(row, dim=-1))  # [C, H, W * n]
    grid = ((torch.cat(tiles, dim=-2) + 1) / 2).clamp(0, 1)  # [C, H K, W n] in [0, 1]
    image = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * image.shape[1] / 8 * 2), max(3.0, 0.35 * classes * 2)))
    ax.imshow(image, cmap="gray" if grid.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    height = image.shape[0] // classes
    ax.set_yticks([height * (k + 0.5) for k in range(classes)], names, fontsize=8)
    width = image.shape[1] // max(1, len(roles))
    ax.set_xticks([width * (r + 0.5) for r in range(len(roles))], roles, fontsize=9)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- evaluation of a run and of folders
def score_models(student: DiTModel, teacher: DiTModel, data: str, val_fraction: float, device,
                 memo: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor], list[str]]:
    """Denoising errors and sample scores of a student and its teacher on a data source's held-out split:
    (metrics, {"teacher": samples, "student": samples}, class names). `memo` keeps the teacher's samples."""
    channels, size, _ = teacher.sample_shape
    _, held, scorer = reference(data, channels, size, teacher.num_classes, val_fraction)
    classes = sample_classes(len(held.names))
    memo = memo if memo is not None else {}
    if "samples" not in memo:
        memo["samples"] = generate(teacher, classes, device=device)
        memo["scores"] = sample_scores(memo["samples"], classes, scorer, held)
    s_samples = generate(student, classes, device=device)
    metrics = denoise_errors(student, teacher, held, alphas_cumprod(teacher.config),
                             teacher.config.scheduler.get("prediction_type", "epsilon"), device)
    metrics.update({f"student_{k}": v for k, v in sample_scores(s_samples, classes, scorer, held).items()})
    metrics.update({f"teacher_{k}": v for k, v in memo["scores"].items()})
    metrics["scorer_heldout_accuracy"] = float((scorer(held.images).argmax(-1) == held.classes).float().mean())
    return metrics, {"teacher": memo["samples"], "student": s_samples}, held.names


def evaluate_folder(student_path: str | Path, teacher_path: str | Path | None, data: str | None,
                    out_dir: str | Path | None, val_fraction: float | None = None, device: str = "cpu") -> dict:
    """`shd eval` for a DiT student: denoising MSE against the teacher, sample accuracy and Frechet distance
    of both, the sample grid PNG, parameters. Teacher and data default to the student's run (metrics.json)."""
    folder = resolve_source(str(student_path), "STUDENT")
    info = run_info(folder)
    notes = []
    run_data = info.recipe.get("data", {})
    if data is None:
        data = run_data.get("path") or "builtin:digits"
        notes.append(f"data {data} (its held-out split)" + (f" taken from {info.metrics_file}"
                                                            if run_data.get("path") else ""))
    if val_fraction is None:
        val_fraction = float(run_data.get("val_fraction", 0.25))
    if teacher_path is None:
        teacher_path = info.recipe.get("teacher", {}).get("path")
        if teacher_path is None:
            raise ShdError("--teacher: a DiT student is scored against its teacher; give --teacher (no run "
                           "metrics.json beside the student names one)")
        notes.append(f"teacher {teacher_path} taken from {info.metrics_file}")
    t_folder = resolve_source(str(teacher_path), "--teacher")
    dev = torch.device(device)
    student = DiTModel.from_pretrained(folder).to(dev).eval()
    teacher = DiTModel.from_pretrained(t_folder).to(dev).eval()
    if student.sample_shape != teacher.sample_shape:
        raise ShdError(f"--teacher: {t_folder} makes {teacher.sample_shape} samples, the student "
                       f"{student.sample_shape}; give the student's own teacher")
    metrics, samples, names = score_models(student, teacher, data, val_fraction, dev)
    out = Path(out_dir) if out_dir is not None else folder.parent / f"{folder.name}_eval"
    png = write_sample_grid(samples, SAMPLES_PER_CLASS, names, out / "samples.png",
                            f"teacher (left) vs student (right), {SAMPLING_STEPS} DDIM steps")
    result = {"task": DIFFUSION, "data": data, "val_fraction": val_fraction, "student": str(folder),
              "teacher": str(t_folder), **metrics, "student_params": count_parameters(student),
              "teacher_params": count_parameters(teacher), "samples_png": str(png), "notes": notes}
    result["summary"] = format_eval(result)
    write_json_atomic(out / "eval.json", result)
    return result


def format_eval(r: dict) -> str:
    """The lines `shd eval` prints for a DiT student."""
    return "\n".join([
        f"denoising MSE vs teacher (t in {', '.join(map(str, DENOISE_TIMESTEPS))}): {r['denoise_mse_vs_teacher']:.4f}",
        f"denoising MSE vs target: student {r['student_denoise_mse']:.4f}  teacher {r['teacher_denoise_mse']:.4f}",
        f"samples ({SAMPLES_PER_CLASS}/class, {SAMPLING_STEPS} DDIM steps): class accuracy student "
        f"{r['student_sample_accuracy']:.3f}  teacher {r['teacher_sample_accuracy']:.3f};  Frechet distance "
        f"student {r['student_sample_fd']:.2f}  teacher {r['teacher_sample_fd']:.2f}  (scorer held-out accuracy "
        f"{r['scorer_heldout_accuracy']:.3f})",
        f"parameters: student {r['student_params']:,}  teacher {r['teacher_params']:,};  grid: {r['samples_png']}",
    ])


# --------------------------------------------------------------------------- the task
def parse_inspect_data(data: str | None) -> tuple[str, int]:
    """`--data SOURCE[@t=T]` of `shd inspect-heads` -> (source, timestep)."""
    data = data or "builtin:digits"
    source, _, rest = data.partition("@t=")
    if not rest:
        return source, INSPECT_TIMESTEP
    try:
        return source, int(rest)
    except ValueError:
        raise ShdError(f"--data: {data!r}: the timestep after @t= must be a whole number, e.g. "
                       f"{source}@t={INSPECT_TIMESTEP}") from None


class Diffusion(NoHeldOutText):
    name = DIFFUSION
    packed = False
    ddp_find_unused = True  # the class embedding's null row (classifier-free dropout) may see no gradient
    text = False  # scored by denoising errors and samples (evaluate_folder, run_metrics), not text metrics
    regresses_teacher = False  # the denoising target is the true noise
    scored_on = "a DiT is scored on samples and denoising errors (shd eval)"

    def __init__(self) -> None:
        # teacher -> (data path, val_fraction) -> the teacher's samples and scores: step 0 and the final
        # evaluation of a run sample the teacher once (weak keys: a finished run's teacher is not kept alive)
        self.teacher_samples: WeakKeyDictionary[nn.Module, dict[tuple[str, float], dict[str, Any]]] = \
            WeakKeyDictionary()

    def matches(self, config) -> bool:
        return any(a in ARCHITECTURES for a in getattr(config, "architectures", None) or [])

    def folder_config(self, folder: Path, field: str) -> DiTConfig | None:
        return folder_config(folder, field)

    def auto_class(self) -> type:
        diffusers_module()
        return DiTModel

    def load_preprocessor(self, folder, config, field: str, trust_remote_code: bool):
        return training_scheduler(config)  # saved beside the student as scheduler_config.json

    def training_data(self, recipe, preprocessor, config, world: int):
        d = recipe.data
        dit = config.dit
        train, val = load_split(d.path, int(dit.get("in_channels", 1)), int(dit["sample_size"]),
                                int(dit["num_embeds_ada_norm"]), d.val_fraction)
        if d.max_documents:
            train = LabelledImages(train.images[:d.max_documents], train.classes[:d.max_documents], train.names)
        if len(val.classes) == 0:
            raise ShdError("data.val_fraction: the validation split is empty; raise data.val_fraction")
        abar = preprocessor.alphas_cumprod.double()
        prediction = preprocessor.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise ShdError(f"teacher.path: {SCHEDULER_FILE} has prediction_type {prediction!r}; shd distils "
                           "epsilon or v_prediction DiTs")
        rows = NoisedImages(train.images, train.classes, abar, prediction, recipe.train.seed)
        held = NoisedImages(val.images, val.classes, abar, prediction, SPLIT_SEED)
        batches = eval_batches(held, d.batch_size, d.val_batches)
        return rows, batches

    def inputs(self, batch: Batch) -> Batch:
        return model_inputs(batch)

    def row_mask(self, batch: Batch) -> torch.Tensor | None:
        return None  # every patch token is a query row

    def uses_logit_kd(self, distill, teacher: nn.Module, student: nn.Module) -> bool:
        if distill.logit <= 0:
            return False
        if teacher.sample_shape != student.sample_shape:
            raise ShdError(f"distill.logit: teacher makes {teacher.sample_shape} predictions, student "
                           f"{student.sample_shape}; give a student of the teacher's sample size or set "
                           "distill.logit=0")
        return True

    def fuses_heads(self, distill) -> bool:
        return False

    def losses(self, f) -> dict[str, torch.Tensor]:
        """task: MSE to the denoising target; logit (output KD): MSE to the teacher's prediction (f: base.Forwards)."""
        pred = f.student_out.sample.float()  # [B, C, H, W]
        parts = {"task": F.mse_loss(pred, f.batch["labels"].float())}
        if f.use_logit:
            target = f.teacher_out.sample.float().clone()  # out of the teacher's inference_mode: autograd may save it
            parts["logit"] = F.mse_loss(pred, target)
        return parts

    def batch_weight(self, batch: Batch) -> float:
        return float(len(batch["labels"]))

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        return {}  # val_task is the held-out denoising MSE

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        student, teacher = _unwrap(student), _unwrap(teacher)
        d = recipe.data
        memo = self.teacher_samples.setdefault(teacher, {}).setdefault((d.path, d.val_fraction), {})
        metrics, samples, names = score_models(student, teacher, d.path, d.val_fraction, device, memo)
        # the final call's grid replaces the one of step 0
        write_sample_grid(samples, SAMPLES_PER_CLASS, names, Path(recipe.output_dir) / "samples.png",
                          f"teacher (left) vs student (right), {SAMPLING_STEPS} DDIM steps")
        return metrics

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).sample.float()  # [B, C, H, W]

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return float(F.mse_loss(output, reference))

    def evaluate_folder(self, folder: Path, teacher: str | None, data: str | None, out_dir: Path | None) -> dict:
        """`shd eval` of a DiT student folder (module-level evaluate_folder)."""
        return evaluate_folder(folder, teacher, data, out_dir)

    def inspect_batches(self, folder, preprocessor, data, samples, seq_len, batch_size, max_positions):
        """Held-out images noised to one timestep (`--data SOURCE@t=T`, default t=INSPECT_TIMESTEP), fixed noise."""
        source, t = parse_inspect_data(data)
        abar = preprocessor.alphas_cumprod.double()
        if not 0 <= t < abar.shape[0]:
            raise ShdError(f"--data: timestep {t} is outside 0..{abar.shape[0] - 1} (the scheduler's training steps)")
        config = folder_config(Path(folder), "MODEL")
        dit = config.dit
        _, held = load_split(source, int(dit.get("in_channels", 1)), int(dit["sample_size"]),
                             int(dit["num_embeds_ada_norm"]), 0.25, field="--data")
        images, classes = held.images[:samples], held.classes[:samples]
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        steps = torch.full((images.shape[0],), t, dtype=torch.long)
        batch = model_inputs(noised(images, noise, steps, classes, abar, preprocessor.config.prediction_type))
        out = [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, images.shape[0], batch_size)]
        return out, f"{source} held-out images at timestep {t}", None


def _unwrap(model: nn.Module) -> DiTModel:
    """The DiTModel inside a DDP / compiled wrapper."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, DiTModel) else model  # type: ignore[return-value]

