"""Text classifiers (BERT, RoBERTa/XLM-R, DistilBERT, ELECTRA, and decoder classifiers such as Llama,
Qwen, GPT-2 ... *ForSequenceClassification): labelled rows, cross entropy plus logit KD on the class
logits, classifier metrics on a held-out split.

The student keeps the teacher's head: it is built by AutoModelForSequenceClassification from the
teacher's config (same id2label / label2id), and students/derive.py copies the pooler and classifier
like every other tensor, sliced to the kept residual channels. SHD runs over every real token's
query row ([CLS] included, padding excluded: TextTask.row_mask).

Data (`data.path`, with data.text_field, data.label_field and, for pairs, data.text_pair_field):
  - a .jsonl file (one object per line) or a .csv file (a header row), UTF-8;
  - a .parquet file, a folder of them, or a `datasets` save_to_disk folder (needs pyarrow);
  - builtin:bbc-news (5 topics) or builtin:tweets (3 sentiments), tasks/corpora.py.
Labels are class names, mapped through the teacher's label2id, or class ids 0..num_labels-1; a label
the teacher does not know is an error naming it, the file and the row.

The held-out split is fixed: a row is held out when crc32("0:" + text [+ "\\t" + pair]) < fraction *
2^32, whatever train.seed is, so every seed of a benchmark is scored on the same rows, identical texts
never straddle the split, and `shd make-demo-teacher text-classifier` trains on the same training
rows a recipe does. fraction = data.val_fraction for files; for the builtins it is fixed at
BUILTIN_HELDOUT = 0.1 (data.val_fraction is ignored), so no recipe ever trains on their held-out rows
(builtin:bbc-news: 220 of 2,225 articles; builtin:tweets: 3,984 of 38,158 tweets). Held-out rows are
kept in hash order, so any prefix of them (data.val_batches, data.eval_tokens) is a fair sample.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shdcli.errors import ShdError
from shdcli.models.families import causal_model_types
from shdcli.tasks.base import SEQUENCE_CLASSIFICATION, Batch, HeldOut, QualityInputs, model_inputs
from shdcli.tasks.classify import (
    ClassifierLosses,
    class_kl,
    classifier_metrics,
    confusion_matrix,
    plot_confusion,
)
from shdcli.tasks.corpora import LABELLED, LabelledRow, read_builtin
from shdcli.tasks.data import TextTask, _source_files, eval_batches, same_tokens

SPLIT_SEED = 0
BUILTIN_HELDOUT = 0.1


# --------------------------------------------------------------------------- reading labelled rows
@dataclass
class Fields:
    """Which columns hold the text, the label and (pairs) the second text."""

    text: str = "text"
    label: str = "label"
    pair: str | None = None

    @staticmethod
    def of(data: dict) -> Fields:
        return Fields(data.get("text_field", "text"), data.get("label_field", "label"), data.get("text_pair_field"))


def read_rows(path: str, fields: Fields, field: str = "data.path") -> list[LabelledRow]:
    """Labelled rows of a builtin, a .jsonl / .csv / .parquet file, or a parquet / datasets folder."""
    if path in LABELLED:
        return read_builtin(path, field)
    if path.startswith("builtin:"):
        raise ShdError(f"{field}: {path!r} holds no labels; a text classifier needs labelled rows: "
                       f"{', '.join(LABELLED)}, a .jsonl / .csv / .parquet file or a datasets folder")
    file = Path(path).expanduser()
    if not file.exists():
        raise ShdError(f"{field}: {path} does not exist; give a labelled .jsonl / .csv / .parquet file, a datasets "
                       f"folder or {', '.join(LABELLED)}")
    if file.is_file() and file.suffix == ".jsonl":
        rows = _jsonl(file, fields, field)
    elif file.is_file() and file.suffix == ".csv":
        rows = _csv(file, fields, field)
    elif file.is_dir() or file.suffix == ".parquet":
        rows = _columnar(path, fields, field)
    else:
        raise ShdError(f"{field}: {path} is not a .jsonl, .csv or .parquet file; give labelled rows in one of those "
                       "(or a datasets folder)")
    if not rows:
        raise ShdError(f"{field}: {path} holds no labelled rows")
    return rows


def _row(record: dict, fields: Fields, source: str, row: int) -> LabelledRow | None:
    """One record as a LabelledRow (None: an empty text, skipped), or one line naming what is missing."""
    for key, which in ((fields.text, "text_field"), (fields.label, "label_field"), (fields.pair, "text_pair_field")):
        if key is not None and record.get(key) is None:
            raise ShdError(f"data.{which}: {source} row {row} has no {key!r} (it has {', '.join(map(str, record))}); "
                           f"set data.{which}")
    text = " ".join(str(record[fields.text]).split())
    pair = " ".join(str(record[fields.pair]).split()) if fields.pair is not None else None
    if not text:
        return None
    label = record[fields.label]
    return LabelledRow(text, label if isinstance(label, (int, str)) else str(label), row, pair)


def _jsonl(file: Path, fields: Fields, field: str) -> list[LabelledRow]:
    rows = []
    with open(file, encoding="utf-8") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as exc:
            raise ShdError(f"{field}: {file} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    for lineno, line in enumerate((x for x in lines if x.strip()), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ShdError(f"{field}: {file} row {lineno} is not valid JSON; one JSON object per line") from None
        if not isinstance(record, dict):
            raise ShdError(f"{field}: {file} row {lineno} is not a JSON object; write one object per line")
        row = _row(record, fields, str(file), lineno)
        if row is not None:
            rows.append(row)
    return rows


def _csv(file: Path, fields: Fields, field: str) -> list[LabelledRow]:
    rows = []
    try:
        with open(file, encoding="utf-8", newline="") as handle:
            for i, record in enumerate(csv.DictReader(handle), 1):
                row = _row(record, fields, str(file), i)
                if row is not None:
                    rows.append(row)
    except UnicodeDecodeError as exc:
        raise ShdError(f"{field}: {file} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    return rows


def _columnar(path: str, fields: Fields, field: str) -> list[LabelledRow]:
    """Parquet files and datasets folders (arrow stream shards) through pyarrow, in file order."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ShdError(f"{field}: {path} needs the optional package pyarrow to be read; pip install pyarrow") from None
    kind, files = _source_files(path, field)
    wanted = [k for k in (fields.text, fields.label, fields.pair) if k is not None]
    rows: list[LabelledRow] = []
    for file in files:
        table = pq.read_table(file) if kind == "parquet" else pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
        missing = [k for k in wanted if k not in table.column_names]
        if missing:
            which = {fields.text: "text_field", fields.label: "label_field", fields.pair: "text_pair_field"}[missing[0]]
            raise ShdError(f"data.{which}: {file} has no column {missing[0]!r} (columns: "
                           f"{', '.join(table.column_names)}); set data.{which}")
        columns = {k: table.column(k).to_pylist() for k in wanted}
        for i in range(table.num_rows):
            row = _row({k: v[i] for k, v in columns.items()}, fields, str(file), len(rows) + 1)
            if row is not None:
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- labels and the split
def label_ids(rows: list[LabelledRow], config, source: str) -> list[int]:
    """Each row's class id in the teacher's label space: names through label2id, ids 0..num_labels-1
    as they are (a digit string that is not a label name counts as an id, as CSV cells are text)."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    n = int(getattr(config, "num_labels", len(label2id)))
    ids = []
    for row in rows:
        label = row.label
        if isinstance(label, str) and label in label2id:
            ids.append(label2id[label])
            continue
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n:
            ids.append(label)
            continue
        names = ", ".join(sorted(label2id, key=label2id.get)) or "none"
        raise ShdError(f"data.label_field: label {row.label!r} in {source} row {row.row} is not one of the teacher's "
                       f"labels ({names}) nor an id 0..{n - 1}; fix the row or use a teacher trained on that label")
    return ids


def heldout_fraction(path: str, val_fraction: float) -> float:
    """The held-out share of a source: fixed for the builtins, data.val_fraction for files."""
    return BUILTIN_HELDOUT if path in LABELLED else val_fraction


def split_key(row: LabelledRow) -> int:
    """The row's position on [0, 2^32): held out below fraction * 2^32 (module docstring)."""
    text = row.text if row.pair is None else f"{row.text}\t{row.pair}"
    return zlib.crc32(f"{SPLIT_SEED}:{text}".encode())


def split_rows(rows: list[LabelledRow], fraction: float,
               field: str = "data.val_fraction") -> tuple[list[int], list[int]]:
    """(training row indices in source order, held-out row indices in hash order)."""
    keys = [split_key(r) for r in rows]
    limit = fraction * 2**32
    train = [i for i, k in enumerate(keys) if k >= limit]
    held = sorted((i for i, k in enumerate(keys) if k < limit), key=lambda i: (keys[i], i))
    if not train or not held:
        raise ShdError(f"{field}: {len(rows)} rows at a held-out fraction of {fraction} leave "
                       f"{len(train)} to train on and {len(held)} held out; give more rows or change the fraction")
    return train, held


# --------------------------------------------------------------------------- tokenised rows
@dataclass
class TextRows:
    """Tokenised labelled rows: input_ids / attention_mask (/ token_type_ids) [S, L], labels [S]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, rows) -> Batch:
        """Rows (indices or a slice) as a model batch with labels, all-padding columns trimmed."""
        mask = self.attention_mask[rows]  # [B, L]
        length = max(1, int(mask.sum(1).max())) if mask.numel() else 1
        out = {"input_ids": self.input_ids[rows][:, :length], "attention_mask": mask[:, :length],
               "labels": self.labels[rows]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[rows][:, :length]
        return out

    def repeat(self, times: int) -> TextRows:
        types = None if self.token_type_ids is None else self.token_type_ids.repeat(times, 1)
        return TextRows(self.input_ids.repeat(times, 1), self.attention_mask.repeat(times, 1),
                        self.labels.repeat(times), types)


def pad_id(tokenizer, config) -> int:
    """The id padding is written with: the model's pad_token_id (a decoder classifier finds each row's
    last real token by it), else the tokenizer's, else 0 (the attention mask hides it anyway)."""
    for value in (getattr(config, "pad_token_id", None), tokenizer.pad_token_id):
        if value is not None:
            return int(value)
    return 0


def encode(tokenizer, texts: list[str], pairs: list[str] | None, labels: list[int], seq_len: int,
           pad: int) -> TextRows:
    """Rows cut to seq_len tokens (pairs: the longer text first), right-padded with `pad`."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=seq_len)
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    types = torch.zeros((len(texts), seq_len), dtype=torch.long) if "token_type_ids" in enc else None
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        if types is not None:
            types[i, : len(row)] = torch.tensor(enc["token_type_ids"][i])
    return TextRows(ids, mask, torch.tensor(labels, dtype=torch.long), types)


@dataclass
class Labelled:
    """A source's rows split into training and held-out parts, with label ids."""

    rows: list[LabelledRow]
    ids: list[int]
    train: list[int]  # row indices, source order
    held: list[int]  # row indices, hash order
    source: str

    def part(self, which: str) -> tuple[list[str], list[str] | None, list[int]]:
        """(texts, pairs or None, label ids) of the train or held part."""
        index = self.train if which == "train" else self.held
        pairs = None if self.rows[0].pair is None else [self.rows[i].pair for i in index]
        return [self.rows[i].text for i in index], pairs, [self.ids[i] for i in index]


def load_labelled(data: dict, config, field: str = "data.path") -> Labelled:
    """Read, label and split a data section (a resolved recipe's `data` dict)."""
    path = data["path"]
    rows = read_rows(path, Fields.of(data), field)
    ids = label_ids(rows, config, path)
    train, held = split_rows(rows, heldout_fraction(path, data.get("val_fraction", 0.1)))
    return Labelled(rows, ids, train, held, path)


# --------------------------------------------------------------------------- predictions
@torch.inference_mode()
def predict(model: nn.Module, batches: list[Batch], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [S, C] float32, labels [S]) over batches."""
    logits, labels = [], []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        logits.append(model(**inputs).logits.float().cpu())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def first_rows_within(rows: TextRows, tokens: int) -> int:
    """How many leading rows it takes to hold `tokens` real tokens (at least one row, at most all)."""
    counts = rows.attention_mask.sum(1).cumsum(0)  # [S]
    return min(len(rows), int((counts < tokens).sum()) + 1)


def check_decoder_padding(config, field: str = "teacher.path") -> None:
    """A decoder classifier (Llama, GPT-2 ...ForSequenceClassification) reads each row's last real token,
    found by config.pad_token_id: without one transformers refuses batches of more than one row."""
    if config.model_type in causal_model_types() and getattr(config, "pad_token_id", None) is None:
        raise ShdError(f"{field}: this {config.model_type} classifier has no pad_token_id in config.json; set it "
                       "(e.g. to the tokenizer's pad or eos token id) so padded batches can be classified")


# --------------------------------------------------------------------------- the task
class SequenceClassification(ClassifierLosses, TextTask):
    name = SEQUENCE_CLASSIFICATION
    packed = False
    ddp_find_unused = True  # e.g. a BERT classifier's token_type embeddings rows a batch never reads
    text = True
    regresses_teacher = False  # labels + class-logit KD

    def __init__(self) -> None:
        self._teacher_memo: dict[tuple, torch.Tensor] = {}  # the teacher's held-out logits (init and final eval)

    def matches(self, config) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])

    def folder_config(self, folder, field: str) -> None:
        return None  # transformers folders: AutoConfig reads them

    def auto_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def training_data(self, recipe, preprocessor, config, world: int) -> tuple[TextRows, list[Batch]]:
        d = recipe.data
        check_decoder_padding(config)
        data = load_labelled(d.model_dump(), config)
        pad = pad_id(preprocessor, config)
        texts, pairs, ids = data.part("train")
        if d.max_documents:
            texts, pairs, ids = texts[: d.max_documents], pairs and pairs[: d.max_documents], ids[: d.max_documents]
        train = encode(preprocessor, texts, pairs, ids, d.seq_len, pad)
        held = encode(preprocessor, *data.part("held"), d.seq_len, pad)
        return train, eval_batches(held, d.batch_size * world, d.val_batches)

    def validation_extras(self, student: nn.Module, val_batches: list[Batch], device, losses: dict) -> dict:
        logits, labels = predict(student, val_batches, device)
        return {"val_accuracy": float((logits.argmax(-1) == labels).float().mean())}

    def run_metrics(self, student: nn.Module, teacher: nn.Module, val_batches: list[Batch], recipe, device) -> dict:
        return {}  # the held-out metrics come from quality() in the final evaluation

    def heldout(self, data: dict, seed: int, config, whole: bool = False, field: str = "data.path") -> HeldOut:
        """The fixed held-out split (train.seed plays no part); with `whole` (`shd eval --data FILE`) every
        row of a file, the held-out split of a builtin."""
        labelled = load_labelled(data, config, field)
        if whole and data["path"] not in LABELLED:
            labelled.held = list(range(len(labelled.rows)))
            source = f"{data['path']} (all {len(labelled.rows)} rows)"
        else:
            fraction = heldout_fraction(data["path"], data.get("val_fraction", 0.1))
            source = f"held-out split of {data['path']} ({fraction:g} of its rows, fixed)"
        texts, pairs, ids = labelled.part("held")
        return HeldOut(texts, source, ids, pairs)

    def quality(self, model: nn.Module, tokenizer, teacher: nn.Module | None, q: QualityInputs,
                notes: list[str], name: str) -> dict[str, float | str]:
        if q.labels is None:
            notes.append(f"{name}: the held-out text has no labels; no accuracy")
            return {}
        rows = encode(tokenizer, q.docs, q.pairs, q.labels, q.seq_len, pad_id(tokenizer, model.config))
        n = first_rows_within(rows, q.max_tokens)
        batches = eval_batches(rows, q.batch_size, limit=-(-n // q.batch_size))  # the batches the n rows fill
        logits, labels = predict(model, batches, q.device)
        logits, labels = logits[:n], labels[:n]  # [n, C], [n]
        reference = None
        if teacher is not None and same_tokens(tokenizer, q.tokenizer):
            reference = self._teacher_logits(teacher, rows, batches, q, n)
        elif teacher is not None:
            notes.append(f"{name}: its tokenizer differs from the teacher's; no agreement")
        out: dict[str, float | str] = {**classifier_metrics(logits, labels, reference), "eval_rows": n}
        if q.out_dir is not None:
            classes = logits.shape[1]
            names = [str((model.config.id2label or {}).get(i, i)) for i in range(classes)]
            png = q.out_dir / f"confusion_{_slug(name)}.png"
            plot_confusion(confusion_matrix(logits.argmax(-1), labels, classes), names, png,
                           f"{name}: accuracy {out['accuracy']:.3f} on {n} held-out rows")
            out["confusion_png"] = str(png)
        return out

    def _teacher_logits(self, teacher: nn.Module, rows: TextRows, batches: list[Batch], q: QualityInputs,
                        n: int) -> torch.Tensor:
        """The teacher's logits on the first n rows, computed once per (teacher, rows)."""
        key = (id(teacher), n, q.seq_len, hash(tuple(q.docs[:n])), str(q.device))
        if key not in self._teacher_memo:
            self._teacher_memo.clear()  # one evaluation's worth: the init and final evaluations share it
            self._teacher_memo[key] = predict(teacher, batches, q.device)[0][:n]
        return self._teacher_memo[key]

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()  # [B, C]

    def output_distance(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return class_kl(reference, output)


def _slug(name: str) -> str:
    """A model name (a role or a path) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_.") or "model"
