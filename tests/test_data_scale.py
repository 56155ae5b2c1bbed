"""Streaming sources (txt/jsonl/parquet/datasets folders) into the memory-mapped token cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shdcli.errors import ShdError
from shdcli.tasks.data import _is_validation, _pack, _per_document, iter_documents, read_documents, stream_blocks
from tests.tiny import make_tokenizer, write_text


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[str]:
    return read_documents(str(write_text(tmp_path_factory.mktemp("t") / "train.txt", paragraphs=80)))


def _reference(docs: list[str], tokenizer, seq_len: int, packed: bool, seed: int, fraction: float):
    """Obviously-correct reference: coin-split in memory, then the in-memory tokenisers."""
    train = [d for i, d in enumerate(docs) if not _is_validation(i, seed, fraction)]
    val = [d for i, d in enumerate(docs) if _is_validation(i, seed, fraction)]
    build = _pack if packed else _per_document
    return build(train, tokenizer, seq_len), build(val, tokenizer, seq_len)


def _same(blocks, ref) -> None:
    assert torch.equal(blocks.input_ids.long(), ref.input_ids)
    assert torch.equal(blocks.attention_mask.long(), ref.attention_mask)


@pytest.mark.parametrize("packed", [True, False])
def test_streamed_txt_matches_in_memory_tokenisation(tmp_path, docs, tokenizer, packed):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    # val_rows large: the validation set is exactly the coin's documents.
    train, val = stream_blocks(str(path), "text", tokenizer, 24, packed, seed=5, val_fraction=0.2, val_rows=10**6)
    ref_train, ref_val = _reference(docs, tokenizer, 24, packed, 5, 0.2)
    _same(train, ref_train)
    _same(val, ref_val)
    assert train.input_ids.dtype == torch.int32
    if packed:  # the all-ones mask is a stride-0 view, not rows * seq_len bytes
        assert train.attention_mask.stride() == (0, 1)


def test_parquet_jsonl_and_datasets_folder_give_the_same_tokens(tmp_path, docs, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)  # many row groups: streamed in pieces
    (tmp_path / "folder").mkdir()
    pq.write_table(table.slice(0, 30), tmp_path / "folder" / "part-0.parquet")
    pq.write_table(table.slice(30), tmp_path / "folder" / "part-1.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    sources = [tmp_path / "c.parquet", tmp_path / "folder", tmp_path / "c.jsonl"]
    try:
        import datasets

        ds = datasets.Dataset.from_dict({"body": docs})
        ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dsdict"))
        sources += [tmp_path / "ds", tmp_path / "dsdict"]
    except ImportError:
        pass
    for source in sources:
        assert list(iter_documents(str(source), "body")) == docs, source
    ref_train, ref_val = _reference(docs, tokenizer, 16, True, 1, 0.1)
    for source in sources:
        train, val = stream_blocks(str(source), "body", tokenizer, 16, True, seed=1, val_fraction=0.1, val_rows=10**6)
        _same(train, ref_train)
        _same(val, ref_val)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, docs, tokenizer, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    args = ("text", tokenizer, 16, True, 0, 0.1, 8)
    first, _ = stream_blocks(str(path), *args)
    calls = []
    import shdcli.tasks.data as data

    real = data._build_stream_cache
    monkeypatch.setattr(data, "_build_stream_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = stream_blocks(str(path), *args)
    assert calls == [] and torch.equal(first.input_ids, again.input_ids)
    path.write_text("\n\n".join(docs[:40]) + "\n")
    changed, _ = stream_blocks(str(path), *args)
    assert calls == [1] and len(changed) < len(first)
    cache_files = list(Path(data.cache_dir(), "tokens").glob("*/train.ids.bin"))
    assert any(f.stat().st_size == len(first) * 16 * 4 for f in cache_files)


def test_validation_stops_at_the_rows_it_needs(tmp_path, docs, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    train, val = stream_blocks(str(path), "text", tokenizer, 16, True, 0, 0.5, val_rows=4)
    full_train, full_val = stream_blocks(str(path), "text", tokenizer, 16, True, 0, 0.5, val_rows=10**6)
    assert 4 <= len(val) < len(full_val)
    assert len(train) > len(full_train)


def test_stream_errors_are_one_line_user_errors(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["hello world"] * 5}), tmp_path / "x.parquet")
    with pytest.raises(ShdError, match="no column 'text'.*content"):
        list(iter_documents(str(tmp_path / "x.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShdError, match="neither a datasets"):
        list(iter_documents(str(tmp_path / "empty")))
    with pytest.raises(ShdError, match="fewer tokens than one block"):
        stream_blocks(str(tmp_path / "x.parquet"), "content", tokenizer, 512, True, 0, 0.5, 1)


def test_distill_from_parquet(tmp_path, tiny_models, docs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from rich.console import Console

    from shdcli.recipe import validate_recipe
    from shdcli.train import run_distillation

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    recipe = validate_recipe({
        "teacher": str(tiny_models["gpt2"]),
        "student": {"from_teacher": {"layers": 2, "heads": 3}},
        "data": {"path": str(tmp_path / "c.parquet"), "seq_len": 32, "batch_size": 2, "val_batches": 2},
        "train": {"max_steps": 2, "eval_every": 2, "device": "cpu", "threads": 1},
        "output_dir": str(tmp_path / "run"),
    })
    metrics = run_distillation(recipe, Console(quiet=True))
    assert len(metrics["history"]) == 2 and (tmp_path / "run" / "student" / "model.safetensors").exists()
