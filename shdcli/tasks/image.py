"""Image classifiers (ViT, DeiT ...ForImageClassification): image data, loss parts, classifier evaluation.

Everything SHD itself needs is shared with text: ViT attention goes through transformers'
AttentionInterface like BERT's, so capture.py records q/k/v of every layer (ViT attention modules
have no layer_idx; the recorder counts calls in order and is reset per forward). What differs is
here: the data (pixels instead of tokens, no padding so every query row counts, CLS row included),
the task loss (cross entropy on labels), logit KD on class logits, and classifier metrics.

Data sources for `data.path` (all local):
  - `builtin:digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped in the package;
  - an image folder `root/<class>/<file>` (png, jpg, bmp, gif, webp, tiff);
  - a `.npz` file with arrays x (images: [S, H, W], [S, H, W, C] or [S, C, H, W]; uint8, or float in
    [0, 1]) and y (integer labels [S]); optional `classes` (names, one per label);
  - a Hugging Face `datasets` folder written by `save_to_disk` (needs `datasets` installed).
Images go through the teacher folder's image processor (resize, rescale, normalise) when it has a
preprocessor_config.json, else through a plain resize to the config's image size and (x - 0.5) / 0.5.

The train/validation split of image data uses a fixed seed (SPLIT_SEED), not train.seed: every seed
of a benchmark is scored on the same held-out images, and `shd make-demo-teacher` trains its teacher on the
train part of that same split, so a recipe with the same (or a smaller) val_fraction never scores on
images the teacher saw.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shdcli.errors import ShdError
from shdcli.models.sources import count_parameters, resolve_source
from shdcli.report import write_json_atomic
from shdcli.tasks.base import IMAGE_CLASSIFICATION, Batch, NoHeldOutText, model_inputs
from shdcli.tasks.classify import (
    ClassifierLosses,
    class_kl,
    confusion_matrix,
    plot_confusion,
    topk_accuracy,
)
from shdcli.tasks.data import eval_batches

SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
BUILTIN = {"builtin:digits": "scikit-learn's 1,797 handwritten digits (8x8 grey, 10 classes; pip install scikit-learn)"}


# --------------------------------------------------------------------------- reading images
@dataclass
class RawImages:
    """Decoded images before processing: uint8 RGB arrays [H, W, 3] and their class names.

    `split` is None for one pool of images, else "train"/"val" per image (a datasets folder with
    its own validation split keeps it).
    """

    images: list[np.ndarray]
    names: list[str]  # class name of each image
    classes: list[str]  # all class names, in label-id order when the source fixes one
    split: list[str] | None = None


def read_images(path: str, field: str = "data.path", image_field: str = "image",
                label_field: str = "label") -> RawImages:
    """Images and class names from a builtin, an image folder, a .npz file or a datasets folder."""
    if path == "builtin:digits":
        return _digits(field)
    if path.startswith("builtin:"):
        raise ShdError(f"{field}: unknown image builtin {path!r}; choose one of {', '.join(BUILTIN)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ShdError(f"{field}: {path} does not exist; give an image folder (root/<class>/<file>), a .npz file, "
                       "a datasets folder or builtin:digits")
    if p.is_file():
        if p.suffix != ".npz":
            raise ShdError(f"{field}: {path} is not a .npz file; give root/<class>/<file> images, a .npz with x and y, "
                           "or a datasets folder")
        return _npz(p, field)
    if any((p / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return _hf_dataset(p, field, image_field, label_field)
    return _image_folder(p, field)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, C] uint8 -> [H, W, 3] uint8."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return np.ascontiguousarray(x[:, :, :3])


def _digits(field: str) -> RawImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ShdError(f"{field}: builtin:digits needs scikit-learn; pip install scikit-learn "
                       "(or pip install 'shd[vision]')") from exc
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 grey levels -> 0..255
    classes = [str(i) for i in range(10)]
    return RawImages([_to_rgb(x) for x in pixels], [classes[int(y)] for y in digits.target], classes)


def _npz(path: Path, field: str) -> RawImages:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShdError(f"{field}: cannot read {path} as a .npz archive ({exc}); write it with numpy.savez") from None
    missing = [k for k in ("x", "y") if k not in data.files]
    if missing:
        raise ShdError(f"{field}: {path} has no array {missing[0]!r} (it has {', '.join(data.files) or 'none'}); "
                       "save images as x and integer labels as y")
    x, y = data["x"], data["y"]
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)  # [S, C, H, W] -> [S, H, W, C]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3, 4)):
        raise ShdError(f"{field}: {path}: x has shape {tuple(x.shape)}; give [S, H, W], [S, H, W, C] or [S, C, H, W] "
                       "with C in 1, 3, 4")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ShdError(f"{field}: {path}: y must be integer labels [S] with S = {x.shape[0]} images "
                       f"(got {y.dtype} {tuple(y.shape)})")
    if y.size and y.min() < 0:
        raise ShdError(f"{field}: {path}: y holds negative labels; labels are class ids 0..C-1")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or (x.size and (x.min() < 0 or x.max() > 1)):
            raise ShdError(f"{field}: {path}: x must be uint8 (0..255) or float in [0, 1] (got {x.dtype}, "
                           f"range {x.min() if x.size else 0}..{x.max() if x.size else 0})")
        x = (x * 255.0).round().astype(np.uint8)
    n_classes = int(y.max()) + 1 if y.size else 0
    classes = [str(c) for c in data["classes"]] if "classes" in data.files else [str(i) for i in range(n_classes)]
    if len(classes) < n_classes:
        raise ShdError(f"{field}: {path}: classes names {len(classes)} classes but y uses {n_classes}")
    return RawImages([_to_rgb(img) for img in x], [classes[int(i)] for i in y], classes)


def _image_folder(root: Path, field: str) -> RawImages:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ShdError(f"{field}: {root} has no class subfolders; lay images out as {root}/<class>/<file>.png")
    images, names = [], []
    for name in classes:
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            try:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as exc:
                raise ShdError(f"{field}: cannot decode image {file} ({exc}); remove or replace it") from None
            names.append(name)
    if not images:
        raise ShdError(f"{field}: {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return RawImages(images, names, classes)


def _hf_dataset(root: Path, field: str, image_field: str, label_field: str) -> RawImages:
    try:
        import datasets
    except ImportError as exc:
        raise ShdError(f"{field}: {root} is a Hugging Face datasets folder; pip install datasets to read it") from exc
    loaded = datasets.load_from_disk(str(root))
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    train_name = "train" if "train" in parts else next(iter(parts))
    val_name = next((n for n in ("validation", "val", "test") if n in parts and n != train_name), None)
    images, names, split = [], [], []
    classes: list[str] | None = None
    for split_name, tag in ((train_name, "train"), (val_name, "val")):
        if split_name is None:
            continue
        ds = parts[split_name]
        for key in (image_field, label_field):
            if key not in ds.column_names:
                which = "image" if key == image_field else "label"
                raise ShdError(f"data.{which}_field: split {split_name!r} of {root} has no column {key!r} "
                               f"(columns: {', '.join(ds.column_names)})")
        feature = ds.features[label_field]
        if classes is None:
            classes = list(feature.names) if hasattr(feature, "names") else None
        for row in ds:
            img, label = row[image_field], row[label_field]
            arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            images.append(_to_rgb(arr))
            names.append(classes[label] if classes is not None and isinstance(label, int) else str(label))
            split.append(tag)
    if classes is None:
        classes = sorted(set(names))
    if not images:
        raise ShdError(f"{field}: {root} holds no rows")
    return RawImages(images, names, classes, split if val_name is not None else None)


# --------------------------------------------------------------------------- labels and pixels
def label_ids(raw: RawImages, config, field: str = "data.path") -> torch.Tensor:
    """Class names -> the model's label ids: by name when every class is in config.label2id, else in
    the source's class order (sorted folder names), which must fit the model's num_labels."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    num_labels = int(getattr(config, "num_labels", len(label2id)))
    if label2id and all(c in label2id for c in raw.classes):
        mapping = {c: label2id[c] for c in raw.classes}
    else:
        if len(raw.classes) > num_labels:
            raise ShdError(f"{field}: the data has {len(raw.classes)} classes but the teacher predicts {num_labels}; "
                           "give data with the teacher's classes (folder names = its id2label names)")
        mapping = {c: i for i, c in enumerate(raw.classes)}
    return torch.tensor([mapping[n] for n in raw.names], dtype=torch.long)


class SimpleImageProcessor:
    """Fallback when the teacher folder has no preprocessor_config.json: an HF ViTImageProcessor that
    resizes to the config's image size and normalises with mean = std = 0.5 (saved with the student)."""

    @staticmethod
    def build(config):
        from transformers import ViTImageProcessor

        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return ViTImageProcessor(size={"height": h, "width": w}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def load_processor(folder: Path, config):
    """The image processor of an HF folder (AutoImageProcessor), else SimpleImageProcessor.build(config)."""
    if (Path(folder) / "preprocessor_config.json").exists():
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(str(folder))
        except (ValueError, OSError, TypeError) as exc:
            raise ShdError(f"{folder}/preprocessor_config.json cannot be loaded ({str(exc).splitlines()[0]}); "
                           "fix or remove it (shd then resizes to the config's image size)") from exc
    return SimpleImageProcessor.build(config)


def pixel_values(images: list[np.ndarray], processor, config, chunk: int = 256) -> torch.Tensor:
    """Processed pixels [S, C, H, W] float32, checked against the model's image size and channels."""
    out = []
    for start in range(0, len(images), chunk):
        out.append(processor(images=images[start:start + chunk], return_tensors="pt")["pixel_values"].float())
    pixels = torch.cat(out)
    channels = int(getattr(config, "num_channels", 3))
    if channels == 1 and pixels.shape[1] == 3:
        pixels = pixels.mean(dim=1, keepdim=True)
    size = getattr(config, "image_size", None)
    if size is not None:
        want = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(pixels.shape[2:]) != want:
            raise ShdError(f"teacher.path: its image processor makes {tuple(pixels.shape[2:])} images but the model "
                           f"expects {want}; fix preprocessor_config.json (size / crop_size)")
    return pixels


@dataclass
class ImageSet:
    """Processed images: pixel_values [S, C, H, W] float32 and labels [S] (model label ids)."""

    pixel_values: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, rows) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[rows], "labels": self.labels[rows]}

    def repeat(self, times: int) -> ImageSet:
        return ImageSet(self.pixel_values.repeat(times, 1, 1, 1), self.labels.repeat(times))


def split_rows(n: int, val_fraction: float, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train rows, val rows): val is the first round(n * val_fraction) of a permutation."""
    if n < 2:
        raise ShdError("data.path: need at least 2 images to hold some out for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def load_image_splits(path: str, processor, config, val_fraction: float, image_field: str = "image",
                      label_field: str = "label", max_images: int | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, val) ImageSets from a data source, labels mapped to the model's ids."""
    raw = read_images(path, image_field=image_field, label_field=label_field)
    labels = label_ids(raw, config)
    pixels = pixel_values(raw.images, processor, config)
    if raw.split is not None:
        is_val = torch.tensor([s == "val" for s in raw.split])
        train_rows, val_rows = (~is_val).nonzero().squeeze(-1), is_val.nonzero().squeeze(-1)
    else:
        train_rows, val_rows = split_rows(len(labels), val_fraction)
    if max_images:
        train_rows = train_rows[:max_images]
    return ImageSet(pixels[train_rows], labels[train_rows]), ImageSet(pixels[val_rows], labels[val_rows])


def train_val_data(recipe, processor, config) -> tuple[ImageSet, list[dict[str, torch.Tensor]]]:
    """What train.prepare needs for an image-classification run: train images and validation batches."""
    d = recipe.data
    train, val = load_image_splits(d.path, processor, config, d.val_fraction, d.image_field, d.label_field,
                                   d.max_documents)
    if len(val) == 0:
        raise ShdError("data.val_fraction: the validation split is empty; raise data.val_fraction")
    return train, eval_batches(val, d.batch_size, d.val_batches)


def image_batches(model_folder: str | Path, data_path: str, n_images: int = 32, batch_size: int = 8,
                  split: str = "val", val_fraction: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """Processed image batches ({"pixel_values": [B, C, H, W]}) for a model folder, e.g. for
    `shd inspect-heads` on ViT: the first n_images of the fixed validation (or train) split. Labels
    are not read, so any images will do (their classes need not be the model's)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_folder))
    raw = read_images(data_path, field="--data")
    if raw.split is not None:
        rows = [i for i, s in enumerate(raw.split) if s == split]
    else:
        rows = split_rows(len(raw.images), val_fraction)[1 if split == "val" else 0].tolist()
    chosen = [raw.images[i] for i in rows[:n_images]]
    if not chosen:
        return []
    pixels = pixel_values(chosen, load_processor(Path(model_folder), config), config)  # [S, C, H, W]
    return [{"pixel_values": pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)]


# --------------------------------------------------------------------------- metrics
@torch.inference_mode()
def predict(model, batches: list[dict[str, torch.Tensor]], device: torch.device | str = "cpu"):
    """(logits [S, C] float32, labels [S]) over batches."""
    logits, labels = [], []
    for batch in batches:
        logits.append(model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def accuracy_metrics(model, batches, device) -> dict[str, float]:
    logits, labels = predict(model, batches, device)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


@torch.inference_mode()
def latency(model, pixels: torch.Tensor, device, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median wall time of one forward of a batch [B, C, H, W]: per batch and per image (ms)."""
    x = pixels.to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(pixel_values=x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times) * 1000
    return {"latency_ms_per_batch": med, "latency_ms_per_image": med / x.shape[0], "latency_batch_size": x.shape[0]}


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


def is_image_classifier(folder: str | Path) -> bool:
    """Whether an HF folder holds an image classifier (config architectures *ForImageClassification)."""
    config = Path(folder) / "config.json"
    if not config.exists():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, OSError):
        return False
    return any(a.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")) for a in archs)


def evaluate_classifier(model_path: str | Path, data_path: str, out_dir: str | Path, split: str = "val",
                        val_fraction: float = 0.1, batch_size: int = 64, device: str = "cpu",
                        teacher_path: str | Path | None = None, image_field: str = "image",
                        label_field: str = "label") -> dict:
    """`shd eval` for an image classifier: top-1/top-5, per-class accuracy, confusion matrix PNG,
    parameters, safetensors size and latency; a teacher (optional) is scored the same way."""
    from transformers import AutoModelForImageClassification

    if split not in ("val", "train", "all"):
        raise ShdError(f"--split: {split!r} is not one of val, train, all")
    out_dir = Path(out_dir)
    dev = torch.device(device)
    results: dict = {"data": data_path, "split": split}
    for role, path in (("model", model_path), ("teacher", teacher_path)):
        if path is None:
            continue
        folder = resolve_source(str(path), role)
        if not is_image_classifier(folder):
            raise ShdError(f"{role}: {folder} is not an image classifier (architectures *ForImageClassification)")
        model = AutoModelForImageClassification.from_pretrained(str(folder), dtype=torch.float32).to(dev).eval()
        processor = load_processor(folder, model.config)
        raw = read_images(data_path, image_field=image_field, label_field=label_field)
        labels = label_ids(raw, model.config)
        pixels = pixel_values(raw.images, processor, model.config)
        if split == "all":
            rows = torch.arange(len(labels))
        elif raw.split is not None:
            rows = torch.tensor([i for i, s in enumerate(raw.split) if s == split])
        else:
            rows = split_rows(len(labels), val_fraction)[1 if split == "val" else 0]
        images = ImageSet(pixels[rows], labels[rows])
        logits, y = predict(model, eval_batches(images, batch_size), dev)
        n = logits.shape[1]
        matrix = confusion_matrix(logits.argmax(1), y, n)
        names = [str(model.config.id2label.get(i, i)) for i in range(n)]
        png = out_dir / f"confusion_{role}.png"
        top1 = topk_accuracy(logits, y, 1)
        plot_confusion(matrix, names, png, f"{folder.name}: top-1 {top1:.3f} on {len(y)} {split} images")
        per_class = (matrix.diag().double() / matrix.sum(1).clamp_min(1)).tolist()
        results[role] = {
            "path": str(folder), "images": len(y), "top1": top1, "top5": topk_accuracy(logits, y, 5),
            "per_class_accuracy": {names[i]: per_class[i] for i in range(n) if matrix[i].sum() > 0},
            "confusion_matrix": matrix.tolist(), "confusion_png": str(png),
            "params": count_parameters(model), "size_mb": folder_size_mb(folder),
            **latency(model, images.pixel_values[:batch_size], dev),
        }
    write_json_atomic(out_dir / "eval.json", results)
    return results


def eval_hook(model_path: str, data_path: str | None, out_dir: str | Path, **kwargs) -> dict | None:
    """For the lead's `shd eval`: evaluate `model_path` if it is an image classifier, else return None
    (the text evaluation then runs). kwargs go to evaluate_classifier (split, batch_size, teacher_path...)."""
    folder = resolve_source(model_path, "model")
    if not is_image_classifier(folder):
        return None
    if data_path is None:
        raise ShdError("--data: an image classifier is evaluated on images; give an image folder, .npz, datasets "
                       "folder or builtin:digits")
    return evaluate_classifier(folder, data_path, out_dir, **kwargs)


def format_eval(results: dict) -> str:
    lines = []
    for role in ("model", "teacher"):
        r = results.get(role)
        if r:
            lines.append(f"{role}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  on {r['images']} images  "
                         f"{r['params']:,} params  {r['size_mb']:.2f} MB  "
                         f"{r['latency_ms_per_image']:.3f} ms/image (batch {r['latency_batch_size']})  "
                         f"confusion: {r['confusion_png']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the task
IMAGE_DATA = "builtin:digits"  # default samples of `shd inspect-heads` for image classifiers
CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")


class ImageClassification(NoHeldOutText, ClassifierLosses):
    name = IMAGE_CLASSIFICATION
    packed = False
    ddp_find_unused = True
    text = False  # scored by evaluate_classifier (top-1/top-5, confusion matrix), not the text metrics
    regresses_teacher = False  # labels + class-logit KD
    scored_on = "an image classifier is scored on images (evaluate_classifier)"

    def matches(self, config) -> bool:
        return any(a.endswith(CLASSIFIER_SUFFIXES) for a in getattr(config, "architectures", None) or [])

    def folder_config(self, folder, field: str) -> None:
        return None  # transformers folders: AutoConfig reads them

    def auto_class(self) -> type:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def load_preprocessor(self, folder, config, field: str, trust_remote_code: bool):
        return load_processor(folder, config)

    def training_data(self, recipe, preprocessor, config, world: int):
        return train_val_data(recipe, preprocessor, config)

    def inputs(self, batch: Batch) -> Batch:
        return model_inputs(batch)

    def row_mask(self, batch: Batch) -> torch.Tensor | None:
        return None  # no padding: every row (CLS included) counts

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        return {"val_top1": accuracy_metrics(student, val_batches, device)["top1"]}

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        out = {}
        for role, model in (("student", student), ("teacher", teacher)):
            out.update({f"{role}_{k}": v for k, v in accuracy_metrics(model, val_batches, device).items()})
        return out

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()  # [B, C]

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return class_kl(reference, output)

    def inspect_batches(self, folder, preprocessor, data, samples, seq_len, batch_size, max_positions):
        data = data or IMAGE_DATA
        return image_batches(folder, data, samples, batch_size), data, None  # no tokens to label
