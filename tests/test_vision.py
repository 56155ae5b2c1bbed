"""Image classification (issue 8): loaders, ViT/DeiT mapping on tiny random configs, losses, metrics,
capture without layer_idx, and a tiny end-to-end `shd distill` + classifier eval through the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shdcli import demo
from shdcli.attention import capture
from shdcli.errors import ShdError
from shdcli.models import families as models
from shdcli.students import derive as student_lib
from shdcli.tasks import classify, registry
from shdcli.tasks import image as vision
from shdcli.tasks.base import IMAGE_CLASSIFICATION
from shdcli.tasks.data import BatchStream
from tests.conftest import run_cli


# --------------------------------------------------------------------------- helpers
def vit_config(kind: str = "vit", heads: int = 12, hidden: int = 48, layers: int = 3, labels: int = 3,
               image: int = 8, patch: int = 4):
    from transformers import DeiTConfig, ViTConfig

    cls = ViTConfig if kind == "vit" else DeiTConfig
    names = ["a", "b", "c", "d", "e"][:labels]
    config = cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                 image_size=image, patch_size=patch, num_labels=labels, id2label=dict(enumerate(names)),
                 label2id={n: i for i, n in enumerate(names)})
    config.architectures = ["ViTForImageClassification" if kind == "vit" else "DeiTForImageClassification"]
    return config


def vit_model(kind: str = "vit", seed: int = 0, **kw):
    from transformers import DeiTForImageClassification, ViTForImageClassification

    torch.manual_seed(seed)
    cls = ViTForImageClassification if kind == "vit" else DeiTForImageClassification
    return cls(vit_config(kind, **kw)).eval()


def save_teacher(folder: Path, processor: bool = True, **kw) -> Path:
    from transformers import ViTImageProcessor

    model = vit_model(**kw)
    model.save_pretrained(folder)
    if processor:
        size = model.config.image_size
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def write_npz(path: Path, n: int = 48, classes: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, 6, 6)).astype(np.uint8)
    x[:, :, :2] += (y[:, None, None] * 60).astype(np.uint8)  # a class-dependent stripe: learnable
    np.savez(path, x=x, y=y)
    return path


# --------------------------------------------------------------------------- loaders
def test_image_folder_loader(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    Image.fromarray(rgb).save(root / "cat" / "x.png")
    grey = np.full((4, 4), 200, dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(root / "dog" / "y.png")
    Image.fromarray(grey, mode="L").save(root / "dog" / "z.bmp")
    (root / "dog" / "notes.txt").write_text("not an image")
    raw = vision.read_images(str(root))
    assert raw.classes == ["cat", "dog"]
    assert raw.names == ["cat", "dog", "dog"]
    np.testing.assert_array_equal(raw.images[0], rgb)
    assert raw.images[1].shape == (4, 4, 3) and (raw.images[1] == 200).all()

    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ShdError, match="broken.png"):
        vision.read_images(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShdError, match="no class subfolders"):
        vision.read_images(str(empty))
    with pytest.raises(ShdError, match="does not exist"):
        vision.read_images(str(tmp_path / "missing"))


def test_npz_loader(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4)).astype(np.uint8)
    y = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "a.npz", x=x, y=y)
    raw = vision.read_images(str(tmp_path / "a.npz"))
    assert raw.classes == ["0", "1", "2"] and raw.names == ["0", "2", "1", "2", "0"]
    assert raw.images[3].shape == (3, 4, 3)
    np.testing.assert_array_equal(raw.images[3][:, :, 1], x[3])

    chw = np.random.default_rng(1).random((2, 3, 4, 5)).astype(np.float32)  # [S, C, H, W] floats in [0, 1]
    np.savez(tmp_path / "b.npz", x=chw, y=np.array([1, 0]), classes=np.array(["no", "yes"]))
    raw = vision.read_images(str(tmp_path / "b.npz"))
    assert raw.classes == ["no", "yes"] and raw.names == ["yes", "no"]
    np.testing.assert_array_equal(raw.images[0], (chw[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))

    np.savez(tmp_path / "c.npz", x=x, y=y[:3])
    with pytest.raises(ShdError, match="y must be integer labels"):
        vision.read_images(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", images=x, y=y)
    with pytest.raises(ShdError, match="no array 'x'"):
        vision.read_images(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(ShdError, match="uint8"):
        vision.read_images(str(tmp_path / "e.npz"))


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    imgs = [Image.fromarray(np.full((4, 4, 3), 10 * i, dtype=np.uint8)) for i in range(6)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["u", "v"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": imgs[:4], "label": [0, 1, 0, 1]}, features=feats),
        "test": datasets.Dataset.from_dict({"image": imgs[4:], "label": [1, 0]}, features=feats),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    raw = vision.read_images(str(tmp_path / "ds"))
    assert raw.classes == ["u", "v"] and raw.names == ["u", "v", "u", "v", "v", "u"]
    assert raw.split == ["train"] * 4 + ["val"] * 2


def test_digits_builtin():
    pytest.importorskip("sklearn")
    raw = vision.read_images("builtin:digits")
    assert len(raw.images) == 1797 and raw.classes == [str(i) for i in range(10)]
    from sklearn.datasets import load_digits

    assert raw.images[0].shape == (8, 8, 3)
    np.testing.assert_array_equal(raw.images[0][:, :, 2], (load_digits().images[0] * 255 / 16).round())


def test_labels_pixels_and_split():
    config = vit_config(labels=3)
    raw = vision.RawImages([np.full((5, 5, 3), v, dtype=np.uint8) for v in (0, 255, 51)], ["c", "a", "b"],
                           ["a", "b", "c"])
    assert vision.label_ids(raw, config).tolist() == [2, 0, 1]  # by name through config.label2id
    other = vision.RawImages(raw.images, ["z", "x", "y"], ["x", "y", "z"])
    assert vision.label_ids(other, config).tolist() == [2, 0, 1]  # sorted class order
    with pytest.raises(ShdError, match="4 classes"):
        vision.label_ids(vision.RawImages(raw.images, ["w", "x", "y"], ["w", "x", "y", "z"]), config)

    processor = vision.SimpleImageProcessor.build(config)
    pixels = vision.pixel_values(raw.images, processor, config)
    assert pixels.shape == (3, 3, 8, 8)
    for i, v in enumerate((0, 255, 51)):  # a constant image stays constant under resizing
        torch.testing.assert_close(pixels[i], torch.full((3, 8, 8), (v / 255 - 0.5) / 0.5), atol=1e-5, rtol=0)

    train, val = vision.split_rows(50, 0.2)
    assert len(val) == 10 and len(train) == 40
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    assert torch.equal(val, vision.split_rows(50, 0.2)[1])


# --------------------------------------------------------------------------- models / mapping / capture
@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_vit_task_derivation_and_init(kind):
    teacher = vit_model(kind, heads=12, hidden=48)
    assert registry.task_of(teacher.config) == IMAGE_CLASSIFICATION
    layer = models.decoder_layers(teacher)[0]
    params = models.attention_params(layer, teacher.config)
    assert params.q is layer.attention.q_proj and params.v is layer.attention.v_proj
    assert params.o is layer.attention.o_proj  # not the MLP's fc2
    torch.testing.assert_close(models.output_projection(teacher, 1),
                               models.decoder_layers(teacher)[1].attention.o_proj.weight.t())

    pairs = [(0, 0), (1, 2)]
    config = models.derive_student_config(teacher.config, pairs, heads=4, kv_heads=None, hidden=None, intermediate=None)
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 4)
    assert (config.image_size, config.patch_size, config.num_labels) == (8, 4, 3)
    student = student_lib.build_student(teacher, config, IMAGE_CLASSIFICATION)
    assert type(student) is type(teacher)
    kept = student_lib.derive(teacher, IMAGE_CLASSIFICATION, student_lib.StudentShape(2, 4, 4, 48, None),
                              "uniform", "balanced", [])
    layers = models.model_shape(teacher.config).layers
    assert kept.layers == [math.ceil((i + 1) * layers / 2) - 1 for i in range(2)]  # uniform, last aligned
    student_lib.init_from_teacher(student, teacher, kept)
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    x = torch.randn(2, 3, 8, 8)
    assert student(pixel_values=x).logits.shape == (2, 3)
    # All heads and layers kept: the derived student is the teacher, output for output.
    full = student_lib.StudentShape(layers, 12, 12, 48, teacher.config.intermediate_size)
    same = student_lib.build_student(teacher, student_lib.student_config(teacher.config, list(range(layers)), full),
                                IMAGE_CLASSIFICATION).eval()
    student_lib.init_from_teacher(same, teacher.eval(), student_lib.derive(
        teacher, IMAGE_CLASSIFICATION, full, "uniform", "balanced", []))
    with torch.no_grad():
        torch.testing.assert_close(same(pixel_values=x).logits, teacher(pixel_values=x).logits, atol=1e-5, rtol=1e-4)

    narrow = models.derive_student_config(teacher.config, pairs, heads=3, kv_heads=None, hidden=24, intermediate=48)
    assert narrow.hidden_size == 24 and narrow.pooler_output_size == 24
    small = student_lib.build_student(teacher, narrow, IMAGE_CLASSIFICATION)
    shape = student_lib.StudentShape(2, 3, 3, 24, 48)
    student_lib.init_from_teacher(small, teacher, student_lib.derive(
        teacher, IMAGE_CLASSIFICATION, shape, "importance", "balanced", [{"pixel_values": x}]))
    assert small(pixel_values=x).logits.shape == (2, 3)
    with pytest.raises(ShdError, match="not divisible"):
        models.derive_student_config(teacher.config, pairs, heads=5, kv_heads=None, hidden=None, intermediate=None)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_capture_counts_layers_without_layer_idx(kind):
    model = vit_model(kind, heads=6, hidden=24, layers=3)
    layers = models.decoder_layers(model)
    assert getattr(layers[0].attention, "layer_idx", None) is None  # the recorder must count calls
    capture.enable(model)
    recorder = capture.AttentionRecorder({1, 2}, keep_values=True)
    seen: dict[int, torch.Tensor] = {}
    hooks = [layers[i].attention.q_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i in range(3)]
    tokens = 1 + (8 // 4) ** 2 + (1 if kind == "deit" else 0)  # CLS (+ distillation token) + patches
    for seed in (0, 1):  # a second forward must restart the count at layer 0
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), recorder.active():
            out = model(pixel_values=x)
        assert sorted(recorder.records) == [1, 2] and recorder._calls == 3
        for i in (1, 2):
            rec = recorder.records[i]
            assert rec.query.shape == (2, 6, tokens, 4) and rec.allowed is None and not rec.causal
            torch.testing.assert_close(rec.query, seen[i].view(2, tokens, 6, 4).transpose(1, 2))
    for h in hooks:
        h.remove()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, out.logits)


# --------------------------------------------------------------------------- losses and metrics
def test_classification_losses_match_reference():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 3])
    parts = classify.classification_losses(s, t, y, use_logit=True, temperature=2.0)
    torch.testing.assert_close(parts["task"], F.cross_entropy(s, y))
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    ref = 4.0 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(parts["logit"], ref)
    assert float(classify.classification_losses(t, t, y, True, 2.0)["logit"]) == pytest.approx(0.0, abs=1e-6)
    assert "logit" not in classify.classification_losses(s, t, y, use_logit=False, temperature=2.0)


def test_topk_and_confusion():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 2])
    assert vision.topk_accuracy(logits, labels, 1) == pytest.approx(0.5)
    assert vision.topk_accuracy(logits, labels, 2) == pytest.approx(1.0)
    assert vision.topk_accuracy(logits, labels, 5) == pytest.approx(1.0)  # k capped at the class count
    cm = vision.confusion_matrix(logits.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_image_stream_is_deterministic_and_covers_an_epoch():
    images = vision.ImageSet(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    a, b = BatchStream(images, 4, seed=3), BatchStream(images, 4, seed=3)
    first = [a.next()["labels"] for _ in range(2)]
    assert all(torch.equal(x, b.next()["labels"]) for x in first)
    assert len(set(torch.cat(first).tolist())) == 8
    state = a.state_dict()
    nxt = a.next()["labels"]
    c = BatchStream(images, 4, seed=3)
    c.load_state_dict(state)
    assert torch.equal(c.next()["labels"], nxt)


def test_make_teacher_tiny(tmp_path):
    from transformers import AutoModelForImageClassification

    data = write_npz(tmp_path / "d.npz", n=40)
    info = demo.make_teacher(tmp_path / "t", data=str(data), hidden=24, heads=12, layers=2, intermediate=48,
                               image_size=8, patch_size=4, epochs=2, batch_size=16, log=lambda *_: None)
    assert info["train_images"] == 30 and info["val_images"] == 10 and 0.0 <= info["val_top1"] <= 1.0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "t")
    assert model.config.num_attention_heads == 12 and model.config.id2label[2] == "2"
    assert (tmp_path / "t" / "preprocessor_config.json").exists()


def test_make_demo_teacher_command(tmp_path, monkeypatch, capsys):
    """`shd make-demo-teacher vit-digits OUT` trains and saves a classifier; bad input is one line, exit 2."""
    from tests.conftest import run_main

    data = write_npz(tmp_path / "d.npz", n=40)
    code, out, err = run_main(monkeypatch, capsys, "make-demo-teacher", "vit-digits", str(tmp_path / "t"),
                              "--data", str(data), "--hidden", "24", "--heads", "6", "--layers", "2",
                              "--intermediate", "48", "--image-size", "8", "--epochs", "1", "--batch-size", "16")
    assert code == 0, err
    assert "teacher written to" in out
    info = json.loads((tmp_path / "t" / "shd_teacher.json").read_text())
    assert info["train_images"] == 30 and info["val_images"] == 10
    x = str(tmp_path / "x")
    for args, field in ((["gpt-digits", x], "KIND"), (["vit-digits", x, "--hidden", "25", "--heads", "6"], "--hidden"),
                        (["vit-digits", x, "--image-size", "10", "--patch-size", "4"], "--patch-size"),
                        (["vit-digits", x, "--data", str(tmp_path / "none.npz")], "--data")):
        code, out, err = run_main(monkeypatch, capsys, "make-demo-teacher", *args)
        assert code == 2 and field in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- end to end
RECIPE = """\
{task}teacher: {teacher}
student:
  from_teacher:
    layers: 2
    heads: 4
data:
  path: {data}
  batch_size: 8
  val_fraction: 0.25
  val_batches: 2
distill:
  logit: 1.0
  shd: 1.0
train:
  max_steps: 3
  eval_every: 2
  warmup_steps: 1
  device: cpu
  threads: 1
output_dir: {out}
"""


def test_distill_vit_end_to_end(tmp_path):
    from transformers import AutoModelForImageClassification

    teacher = save_teacher(tmp_path / "teacher", processor=False, heads=12, hidden=48, layers=3, labels=3)
    data = write_npz(tmp_path / "d.npz", n=32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(task="", teacher=teacher, data=data, out=tmp_path / "run"))
    proc = run_cli("distill", str(recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["plan"]["student"]["heads"] == 4 and metrics["plan"]["teacher"]["heads"] == 12
    final = metrics["final_eval"]
    assert {"val_task", "val_logit", "val_shd", "val_top1", "student_top1", "teacher_top5"} <= set(final)
    assert all(math.isfinite(v) for v in final.values())
    assert final["val_shd"] > 0
    assert len(metrics["alphas"]["0"]) == 4 and len(metrics["alphas"]["0"][0]["mean"]) == 3
    student_dir = tmp_path / "run" / "student"
    student = AutoModelForImageClassification.from_pretrained(student_dir)
    assert type(student).__name__ == "ViTForImageClassification"
    assert student.config.num_attention_heads == 4 and student.config.num_hidden_layers == 2
    assert (student_dir / "preprocessor_config.json").exists()  # simple normalisation, saved for reuse

    # the classifier eval (hook for `shd eval`): metrics, confusion matrix PNG, teacher alongside
    vision.eval_hook(str(student_dir), str(data), tmp_path / "eval", teacher_path=str(teacher), val_fraction=0.25)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"]["images"] == 8 and result["teacher"]["params"] > result["model"]["params"]
    assert sum(map(sum, result["model"]["confusion_matrix"])) == 8
    png = Path(result["model"]["confusion_png"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert result["model"]["latency_ms_per_image"] > 0 and result["model"]["size_mb"] > 0
    # image batches for `shd inspect-heads` on ViT
    batches = vision.image_batches(student_dir, str(data), n_images=5, batch_size=2, val_fraction=0.25)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    text = tmp_path / "text_model"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert vision.eval_hook(str(text), None, tmp_path) is None  # not a classifier: text eval runs instead
    with pytest.raises(ShdError, match="--data"):
        vision.eval_hook(str(student_dir), None, tmp_path)


def test_distill_vit_errors(tmp_path, monkeypatch, capsys):
    """User errors of an image recipe end as one line and exit code 2 (in-process: the CLI's own main)."""
    from shdcli import cli

    teacher = save_teacher(tmp_path / "teacher", heads=6, hidden=24, layers=2, labels=3)
    recipe = tmp_path / "r.yaml"
    capsys.readouterr()  # drop save_pretrained's progress bar
    for data, message in ((tmp_path / "none.npz", "does not exist"), (tmp_path / "t.txt", "not a .npz file")):
        (tmp_path / "t.txt").write_text("text")
        recipe.write_text(RECIPE.format(task="task: image-classification\n", teacher=teacher, data=data,
                                        out=tmp_path / "run"))
        monkeypatch.setattr(sys, "argv", ["shd", "distill", str(recipe)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        assert "data.path" in err and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
