"""Text data: read documents, split train/validation, tokenise once (cached), serve batches.

Causal LMs get packed blocks (documents joined with EOS, cut into seq_len tokens, no padding).
Encoders get one sequence per document (long ones cut into several), padded per batch: sentence
embedding models are trained on sentences, and padding exercises the masks SHD must honour.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shdcli import distributed
from shdcli.errors import ShdError
from shdcli.models.sources import cache_dir, load_tokenizer
from shdcli.report import looks_utf16
from shdcli.tasks.base import Batch, HeldOut, model_inputs
from shdcli.tasks.corpora import LABELLED, bbc_paragraphs, read_builtin

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # shdcli/assets
BUILTIN = {
    "builtin:pydoc": "CPython's pydoc help topics (~465 KB of English technical prose)",
    "builtin:sentences": "a few hundred ordinary English sentences shipped with shd",
    "builtin:fortunes": "Debian's fortunes (~2.5 MB of quotations; apt-get install fortunes)",
    **LABELLED,  # labelled corpora (tasks/corpora.py): as plain text, their texts without labels
}


def load_blocks(spec, tokenizer, packed: bool, seed: int, world: int = 1) -> tuple[TokenBlocks, TokenBlocks]:
    """Train and validation blocks for a recipe's data section (spec: recipe.DataSpec).

    Small sources (.txt/.jsonl/builtin) are read whole; parquet, datasets folders and data.stream
    sources stream into a memory-mapped cache (stream_blocks).
    """
    if is_stream_source(spec.path, spec.stream):
        val_rows = spec.batch_size * world * spec.val_batches
        return stream_blocks(spec.path, spec.text_field, tokenizer, spec.seq_len, packed, seed, spec.val_fraction,
                             val_rows, spec.max_documents)
    docs = read_documents(spec.path, spec.text_field)
    if spec.max_documents:
        docs = docs[: spec.max_documents]
    train_docs, val_docs = split_documents(docs, spec.val_fraction, seed)
    train_blocks = tokenize(train_docs, tokenizer, spec.seq_len, packed)
    try:
        val_blocks = tokenize(val_docs, tokenizer, spec.seq_len, packed)
    except ShdError as exc:
        raise ShdError(
            f"data.val_fraction: the validation split is too small ({exc}); raise data.val_fraction"
        ) from None
    return train_blocks, val_blocks


def text_training_data(recipe, tokenizer, packed: bool,
                       world: int) -> tuple[TokenBlocks, list[dict[str, torch.Tensor]]]:
    """Training blocks and global validation batches (batch_size * world rows; validate() gives each
    rank its share) of a text recipe."""
    with distributed.main_first():  # rank 0 tokenises into the cache, the other ranks then read it
        train_blocks, val_blocks = load_blocks(recipe.data, tokenizer, packed, recipe.train.seed, world)
    val = eval_batches(val_blocks, recipe.data.batch_size * world, recipe.data.val_batches)
    return train_blocks, [b for b in val if len(b["input_ids"]) >= world]  # every rank needs rows (FSDP)


def text_inspect_batches(tokenizer, folder, data: str | None, samples: int, seq_len: int, batch_size: int,
                         max_positions: int | None, packed: bool) -> tuple[list[dict[str, torch.Tensor]], str]:
    """`shd inspect-heads` samples of a text model: the first `samples` sequences of `data` (default
    builtin:sentences): packed seq_len blocks for a causal LM (as in training), one padded sequence
    per document (cut at seq_len) for an encoder."""
    if tokenizer is None:
        raise ShdError(f"MODEL: {folder} has no tokenizer files; add tokenizer.json (or vocab files) to it")
    if max_positions and seq_len > max_positions:
        raise ShdError(f"--seq-len: {seq_len} is longer than the model's {max_positions} positions")
    data = data or "builtin:sentences"
    blocks = tokenize(read_documents(data, field="--data"), tokenizer, seq_len, packed=packed)
    blocks = TokenBlocks(blocks.input_ids[:samples], blocks.attention_mask[:samples])
    return eval_batches(blocks, batch_size), data


def same_tokens(a, b) -> bool:
    """Whether two tokenizers give the same ids (so two models can read one batch)."""
    return a is b or (a is not None and b is not None and a.get_vocab() == b.get_vocab())


def read_documents(path: str, text_field: str = "text", field: str = "data.path") -> list[str]:
    """Documents from a .txt (blank-line separated, else one per line) or .jsonl file, or a builtin."""
    if path == "builtin:pydoc":
        from pydoc_data.topics import topics

        docs = [para.strip() for key in sorted(topics) for para in topics[key].split("\n\n")]
        return [d for d in docs if len(d) > 40]
    if path == "builtin:sentences":
        return _split_text((ASSETS / "sentences.txt").read_text(encoding="utf-8"))
    if path == "builtin:fortunes":
        return fortune_documents(field)
    if path == "builtin:bbc-news":  # as plain text: paragraphs (its labelled rows are whole articles)
        return bbc_paragraphs(field)
    if path in LABELLED:
        return [row.text for row in read_builtin(path, field)]
    if path.startswith("builtin:"):
        raise ShdError(f"{field}: unknown builtin {path!r}; choose one of {', '.join(BUILTIN)}")
    file = Path(path).expanduser()
    if not file.exists():
        raise ShdError(f"{field}: {path} does not exist; give a .txt or .jsonl file (or builtin:pydoc)")
    if file.is_dir():
        raise ShdError(f"{field}: {path} is a folder; give a .txt or .jsonl file")
    raw = file.read_bytes()
    if looks_utf16(raw):
        raise ShdError(f"{field}: {path} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw[:4096]:
        raise ShdError(f"{field}: {path} is not a text file (it holds binary data); give UTF-8 .txt or .jsonl")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShdError(f"{field}: {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if file.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ShdError(f"{field}: {path} line {lineno} is not valid JSON; one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ShdError(
                    f"{field}: {path} line {lineno} has no string field {text_field!r}; set data.text_field"
                )
            docs.append(record[text_field])
        docs = [d.strip() for d in docs if d.strip()]
    else:
        docs = _split_text(text)
    if not docs:
        raise ShdError(f"{field}: {path} holds no text; give a file with at least a few documents")
    return docs


FORTUNES = Path("/usr/share/games/fortunes")


def fortune_documents(field: str = "data.path", root: Path = FORTUNES) -> list[str]:
    """Debian fortunes: entries separated by lines holding a single %, from every fortune file
    (not the .dat indexes, .u8 copies or the offensive off/ folder), in sorted file order."""
    files = sorted(f for f in root.glob("*") if f.is_file() and f.suffix not in (".dat", ".u8"))
    if not files:
        raise ShdError(f"{field}: builtin:fortunes needs Debian's fortunes in {root}; apt-get install fortunes")
    docs: list[str] = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        docs += [" ".join(entry.split()) for entry in text.split("\n%\n")]
    return [d for d in docs if len(d) > 40]


def _split_text(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    parts = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
    return [" ".join(p.split()) for p in parts if p.strip()]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: validation text never appears in training."""
    if len(docs) < 2:
        raise ShdError("data.path: need at least 2 documents to hold some out for validation")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


@dataclass
class TokenBlocks:
    """Tokenised sequences: input_ids [S, L] and attention_mask [S, L] (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Rows (indices or a slice) as a model batch, all-padding columns trimmed."""
        return trim(self.input_ids[rows], self.attention_mask[rows])

    def repeat(self, times: int) -> TokenBlocks:
        return TokenBlocks(self.input_ids.repeat(times, 1), self.attention_mask.repeat(times, 1))


def _tokenizer_id(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{vocab}".encode()).hexdigest()[:16]


def tokenize(docs: list[str], tokenizer, seq_len: int, packed: bool) -> TokenBlocks:
    """Tokenise documents into blocks of seq_len, cached on disk by content and tokenizer."""
    key = hashlib.sha256(
        json.dumps([docs, _tokenizer_id(tokenizer), seq_len, packed], separators=(",", ":")).encode()
    ).hexdigest()[:24]
    cached = cache_dir() / "tokens" / f"{key}.safetensors"
    if cached.exists():
        try:
            tensors = load_file(cached)
            return TokenBlocks(tensors["input_ids"], tensors["attention_mask"])
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cached.unlink(missing_ok=True)
    blocks = _pack(docs, tokenizer, seq_len) if packed else _per_document(docs, tokenizer, seq_len)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{random.Random().getrandbits(32)}")  # own RNG: the seeded global stays untouched
    save_file({"input_ids": blocks.input_ids, "attention_mask": blocks.attention_mask}, str(tmp))
    tmp.replace(cached)
    return blocks


def _pack(docs: list[str], tokenizer, seq_len: int) -> TokenBlocks:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ShdError(
            f"data: the text gives {len(ids)} tokens, fewer than one block of data.seq_len={seq_len}; "
            "add text or lower data.seq_len"
        )
    input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenBlocks(input_ids, torch.ones_like(input_ids))


def _per_document(docs: list[str], tokenizer, seq_len: int) -> TokenBlocks:
    prefix, suffix = _special_affixes(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ShdError(f"data.seq_len={seq_len} leaves no room after the tokenizer's special tokens; raise it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        for start in range(0, max(1, len(encoded)), body):
            rows.append(prefix + encoded[start:start + body] + suffix)
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return TokenBlocks(input_ids, attention_mask)


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (BERT: [CLS] ... [SEP])."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


class BatchStream:
    """Endless shuffled batches over a row set (TokenBlocks, vision.ImageSet: anything with len,
    batch(rows) and repeat(times)); the order depends only on (seed, epoch).

    Its position (epoch, index) is plain state, so a resumed run sees the very same batches.
    `rank`/`world` give each data-parallel rank its own slice of every global batch.
    """

    def __init__(self, blocks, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(blocks) < batch_size * world:
            # Small corpora: repeat rows so every batch is full.
            blocks = blocks.repeat(-(-batch_size * world // len(blocks)))
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.blocks), generator=gen)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()

    def next(self) -> dict[str, torch.Tensor]:
        global_batch = self.batch_size * self.world
        if self.index + global_batch > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order()
        start = self.index + self.rank * self.batch_size
        self.index += global_batch
        return self.blocks.batch(self._order[start:start + self.batch_size])


def trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop columns that are padding in every row (right padding); int64 whatever the storage dtype."""
    length = int(attention_mask.sum(dim=1).max().item()) if attention_mask.numel() else 0
    length = max(length, 1)
    return {"input_ids": input_ids[:, :length].long(), "attention_mask": attention_mask[:, :length].long()}


def eval_batches(blocks, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Fixed, ordered validation batches of a row set (TokenBlocks or vision.ImageSet)."""
    starts = range(0, len(blocks), batch_size)
    return [blocks.batch(slice(start, start + batch_size)) for start in starts[:limit]]


# --------------------------------------------------------------------------- corpora larger than RAM
# Parquet files, Hugging Face `datasets` folders (save_to_disk) and, with data.stream, big .txt/.jsonl
# files are never held in memory: documents stream from disk, are tokenised in chunks and appended
# to a memory-mapped cache of token ids (int32 [S, L] .bin files + meta.json). BatchStream reads only
# the rows of each batch from it, so RAM use does not grow with the corpus.

STREAM_CHUNK = 512  # documents per tokenizer call


def is_stream_source(path: str, stream: bool = False) -> bool:
    """Parquet files, folders of parquet files and `datasets` folders always stream; .txt/.jsonl on request."""
    if path.startswith("builtin:"):
        return False
    file = Path(path).expanduser()
    if file.suffix == ".parquet":
        return True
    if file.is_dir():
        return True  # read_documents rejects folders; only the streaming readers understand them
    return stream


def _pyarrow(path: str, field: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ShdError(
            f"{field}: {path} needs the optional package pyarrow to be read; pip install pyarrow"
        ) from None
    import pyarrow

    return pyarrow


def _source_files(path: str, field: str) -> tuple[str, list[Path]]:
    """(kind, files) of a streaming source: kind is parquet | arrow | txt | jsonl."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ShdError(f"{field}: {path} does not exist; give a .txt, .jsonl or .parquet file or a datasets folder")
    if file.is_file():
        kind = {".parquet": "parquet", ".jsonl": "jsonl"}.get(file.suffix, "txt")
        return kind, [file]
    if (file / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one sub-folder per split
        splits = json.loads((file / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ShdError(f"{field}: {path} is a DatasetDict with splits {splits}; give one split's folder")
        file = file / "train"
    if (file / "state.json").exists():  # Dataset.save_to_disk: arrow stream shards listed in state.json
        state = json.loads((file / "state.json").read_text())
        return "arrow", [file / f["filename"] for f in state.get("_data_files", [])]
    parquet = sorted(file.glob("*.parquet"))
    if parquet:
        return "parquet", parquet
    raise ShdError(
        f"{field}: folder {path} holds neither a datasets save_to_disk dataset (state.json) nor .parquet files; "
        "give a .txt/.jsonl/.parquet file or such a folder"
    )


def iter_documents(path: str, text_field: str = "text", field: str = "data.path") -> Iterator[str]:
    """Documents one at a time, whatever the size of the source (see is_stream_source)."""
    kind, files = _source_files(path, field)
    if kind in ("parquet", "arrow"):
        pa = _pyarrow(path, field)
        for file in files:
            yield from _arrow_texts(pa, file, kind, text_field, path, field)
    elif kind == "jsonl":
        with open(files[0], encoding="utf-8", errors="strict") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ShdError(f"{field}: {path} line {lineno} is not valid JSON; one object per line") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ShdError(
                        f"{field}: {path} line {lineno} has no string field {text_field!r}; set data.text_field"
                    )
                if text.strip():
                    yield text.strip()
    else:
        yield from _stream_text(files[0])


def _arrow_texts(pa, file: Path, kind: str, text_field: str, path: str, field: str) -> Iterator[str]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        source = pq.ParquetFile(file)
        names = source.schema_arrow.names
        batches = source.iter_batches(batch_size=1024, columns=[text_field]) if text_field in names else None
    else:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))  # datasets shards: arrow IPC streams
        names = reader.schema.names
        batches = reader if text_field in names else None
    if batches is None:
        raise ShdError(
            f"{field}: {path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field"
        )
    for batch in batches:
        for text in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text.strip()


def _stream_text(file: Path) -> Iterator[str]:
    """A .txt file read line by line: blank-line separated paragraphs if its first MiB has a blank line."""
    with open(file, encoding="utf-8") as handle:
        head = handle.read(1 << 20)
        paragraphs = "\n\n" in head.replace("\r\n", "\n").strip()
        handle.seek(0)
        current: list[str] = []
        try:
            for line in handle:
                if not paragraphs:
                    if line.strip():
                        yield " ".join(line.split())
                    continue
                if line.strip():
                    current.append(line)
                elif current:
                    yield " ".join(" ".join(current).split())
                    current = []
        except UnicodeDecodeError as exc:
            raise ShdError(f"data.path: {file} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
        if current:
            yield " ".join(" ".join(current).split())


def _is_validation(index: int, seed: int, fraction: float) -> bool:
    """Deterministic per-document coin (a hash of seed and position): the same split on every rank and rerun."""
    return zlib.crc32(f"{seed}:{index}".encode()) < fraction * 2**32


class _BlockWriter:
    """Appends tokenised rows to <name>.ids.bin (int32 [S, L]) and, unpacked, <name>.mask.bin (uint8)."""

    def __init__(self, folder: Path, name: str, seq_len: int, packed: bool, prefix: list[int], suffix: list[int],
                 eos: int | None, pad: int) -> None:
        self.seq_len, self.packed, self.eos, self.pad = seq_len, packed, eos, pad
        self.prefix, self.suffix = prefix, suffix
        self.ids = open(folder / f"{name}.ids.bin", "wb")  # noqa: SIM115 - closed in close()
        self.mask = None if packed else open(folder / f"{name}.mask.bin", "wb")  # noqa: SIM115
        self.buffer: list[int] = []  # packed: tokens of the block being filled
        self.rows = 0

    def add(self, encoded: list[int]) -> None:
        if self.packed:
            self.buffer.extend(encoded)
            if self.eos is not None:
                self.buffer.append(self.eos)
            full = len(self.buffer) // self.seq_len * self.seq_len
            if full:
                self.ids.write(np.asarray(self.buffer[:full], dtype=np.int32).tobytes())
                self.rows += full // self.seq_len
                del self.buffer[:full]
            return
        body = self.seq_len - len(self.prefix) - len(self.suffix)
        for start in range(0, max(1, len(encoded)), body):
            row = self.prefix + encoded[start:start + body] + self.suffix
            ids = np.full(self.seq_len, self.pad, dtype=np.int32)
            ids[: len(row)] = row
            mask = np.zeros(self.seq_len, dtype=np.uint8)
            mask[: len(row)] = 1
            self.ids.write(ids.tobytes())
            self.mask.write(mask.tobytes())
            self.rows += 1

    def close(self) -> None:
        # The packed tail shorter than one block is dropped, as _pack does.
        self.ids.close()
        if self.mask is not None:
            self.mask.close()


def open_blocks(folder: Path, name: str, rows: int, seq_len: int, packed: bool) -> TokenBlocks:
    """Memory-mapped TokenBlocks: pages are read from disk only for the rows a batch indexes."""
    # mode "c" (copy-on-write): a writable view for torch.from_numpy that never writes the file.
    ids = torch.from_numpy(np.memmap(folder / f"{name}.ids.bin", dtype=np.int32, mode="c", shape=(rows, seq_len)))
    if packed:  # every token is real: a stride-0 view of one row of ones costs no memory
        mask = torch.ones(1, seq_len, dtype=torch.uint8).expand(rows, seq_len)
    else:
        mask = torch.from_numpy(np.memmap(folder / f"{name}.mask.bin", dtype=np.uint8, mode="c", shape=(rows, seq_len)))
    return TokenBlocks(ids, mask)


def _source_key(path: str) -> list:
    """Identity of a streaming source without reading it: each file's path, size and mtime."""
    file = Path(path).expanduser().resolve()
    files = [file] if file.is_file() else sorted(p for p in file.rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def stream_blocks(path: str, text_field: str, tokenizer, seq_len: int, packed: bool, seed: int, val_fraction: float,
                  val_rows: int, max_documents: int | None = None) -> tuple[TokenBlocks, TokenBlocks]:
    """Train and validation TokenBlocks of a streaming source, tokenised once into a memory-mapped cache.

    Validation: documents whose hash coin (seed, position) falls under val_fraction, until they give
    val_rows sequences (enough for data.val_batches); every later document trains. Documents never
    straddle the split.
    """
    key = hashlib.sha256(json.dumps(
        [_source_key(path), text_field, _tokenizer_id(tokenizer), seq_len, packed, seed, val_fraction, val_rows,
         max_documents], separators=(",", ":")).encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        _build_stream_cache(folder, path, text_field, tokenizer, seq_len, packed, seed, val_fraction, val_rows,
                            max_documents)
    meta = json.loads(meta_file.read_text())
    if meta["train_rows"] == 0:
        raise ShdError(
            f"data: the training text gives fewer tokens than one block of data.seq_len={seq_len}; "
            "add text or lower data.seq_len"
        )
    if meta["val_rows"] == 0:
        raise ShdError(
            f"data.val_fraction: the validation documents ({meta['val_documents']} of {meta['documents']}) give "
            f"fewer tokens than one block of data.seq_len={seq_len}; raise data.val_fraction or lower data.seq_len"
        )
    return (open_blocks(folder, "train", meta["train_rows"], seq_len, packed),
            open_blocks(folder, "val", meta["val_rows"], seq_len, packed))


def _build_stream_cache(folder: Path, path: str, text_field: str, tokenizer, seq_len: int, packed: bool, seed: int,
                        val_fraction: float, val_rows: int, max_documents: int | None) -> None:
    prefix, suffix = ([], []) if packed else _special_affixes(tokenizer)
    if not packed and seq_len - len(prefix) - len(suffix) < 1:
        raise ShdError(f"data.seq_len={seq_len} leaves no room after the tokenizer's special tokens; raise it")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        writers = {n: _BlockWriter(tmp, n, seq_len, packed, prefix, suffix, eos, pad) for n in ("train", "val")}
        chunk: list[str] = []  # training documents waiting for one batched tokenizer call
        documents = val_documents = 0

        def flush() -> None:
            for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                writers["train"].add(ids)
            chunk.clear()

        for index, text in enumerate(iter_documents(path, text_field)):
            if max_documents is not None and index >= max_documents:
                break
            documents += 1
            if writers["val"].rows < val_rows and _is_validation(index, seed, val_fraction):
                # Validation documents are few (capped at val_rows): tokenised at once, so the cap is exact.
                writers["val"].add(tokenizer(text, add_special_tokens=False)["input_ids"])
                val_documents += 1
                continue
            chunk.append(text)
            if len(chunk) >= STREAM_CHUNK:
                flush()
        if chunk:
            flush()
        for writer in writers.values():
            writer.close()
        if documents == 0:
            raise ShdError(f"data.path: {path} holds no text; give a source with at least a few documents")
        meta = {"train_rows": writers["train"].rows, "val_rows": writers["val"].rows, "documents": documents,
                "val_documents": val_documents,
                "seq_len": seq_len, "packed": packed, "dtype": "int32", "source": path}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TextTask:
    """What causal LMs and encoders share as Tasks (tasks/base.py): the tokenizer beside the weights,
    text rows (packed blocks when `packed`), every non-padding query row counted, and text samples
    for `shd inspect-heads`. Subclasses set `packed` and the rest of the protocol."""

    packed: bool

    def load_preprocessor(self, folder, config, field: str, trust_remote_code: bool):
        return load_tokenizer(folder, field, trust_remote_code)

    def training_data(self, recipe, preprocessor, config, world: int):
        return text_training_data(recipe, preprocessor, self.packed, world)

    def inputs(self, batch: Batch) -> Batch:
        return model_inputs(batch)

    def row_mask(self, batch: Batch) -> torch.Tensor | None:
        return batch["attention_mask"].bool()

    def heldout(self, data: dict, seed: int, config, whole: bool = False, field: str = "data.path") -> HeldOut:
        """The validation split (split_documents with train.seed) of a recipe's text, or all of it (whole)."""
        docs = read_documents(data["path"], data.get("text_field", "text"), field)
        if whole:
            return HeldOut(docs, data["path"])
        if data.get("max_documents"):
            docs = docs[: data["max_documents"]]
        fraction = data.get("val_fraction", 0.1)
        _, val = split_documents(docs, fraction, seed)
        return HeldOut(val, f"validation split of {data['path']} (val_fraction {fraction}, seed {seed})")

    def inspect_batches(self, folder, preprocessor, data, samples, seq_len, batch_size, max_positions):
        batches, data = text_inspect_batches(preprocessor, folder, data, samples, seq_len, batch_size,
                                             max_positions, packed=self.packed)
        return batches, data, preprocessor
