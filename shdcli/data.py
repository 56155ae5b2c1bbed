"""Text data: read documents, split train/validation, tokenise once (cached), serve batches.

Causal LMs get packed blocks (documents joined with EOS, cut into seq_len tokens, no padding).
Encoders get one sequence per document (long ones cut into several), padded per batch: sentence
embedding models are trained on sentences, and padding exercises the masks SHD must honour.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shdcli.errors import ShdError
from shdcli.models import cache_dir

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {
    "builtin:pydoc": "CPython's pydoc help topics (~465 KB of English technical prose)",
    "builtin:sentences": "a few hundred ordinary English sentences shipped with shd",
}


def read_documents(path: str, text_field: str = "text", field: str = "data.path") -> list[str]:
    """Documents from a .txt (blank-line separated, else one per line) or .jsonl file, or a builtin."""
    if path == "builtin:pydoc":
        from pydoc_data.topics import topics

        docs = [para.strip() for key in sorted(topics) for para in topics[key].split("\n\n")]
        return [d for d in docs if len(d) > 40]
    if path == "builtin:sentences":
        return _split_text((ASSETS / "sentences.txt").read_text(encoding="utf-8"))
    if path.startswith("builtin:"):
        raise ShdError(f"{field}: unknown builtin {path!r}; choose one of {', '.join(BUILTIN)}")
    file = Path(path).expanduser()
    if not file.exists():
        raise ShdError(f"{field}: {path} does not exist; give a .txt or .jsonl file (or builtin:pydoc)")
    if file.is_dir():
        raise ShdError(f"{field}: {path} is a folder; give a .txt or .jsonl file")
    raw = file.read_bytes()
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
    """Endless shuffled batches over TokenBlocks; the order depends only on (seed, epoch).

    Its position (epoch, index) is plain state, so a resumed run sees the very same batches.
    `rank`/`world` give each data-parallel rank its own slice of every global batch.
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(blocks) < batch_size * world:
            # Small corpora: repeat rows so every batch is full.
            reps = -(-batch_size * world // len(blocks))
            blocks = TokenBlocks(blocks.input_ids.repeat(reps, 1), blocks.attention_mask.repeat(reps, 1))
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
        rows = self._order[self.index + self.rank * self.batch_size: self.index + (self.rank + 1) * self.batch_size]
        self.index += global_batch
        return trim(self.blocks.input_ids[rows], self.blocks.attention_mask[rows])


def trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop columns that are padding in every row (right padding)."""
    length = int(attention_mask.sum(dim=1).max().item()) if attention_mask.numel() else 0
    length = max(length, 1)
    return {"input_ids": input_ids[:, :length], "attention_mask": attention_mask[:, :length]}


def eval_batches(blocks: TokenBlocks, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Fixed, ordered validation batches."""
    out = []
    for start in range(0, len(blocks), batch_size):
        if limit is not None and len(out) >= limit:
            break
        out.append(trim(blocks.input_ids[start:start + batch_size], blocks.attention_mask[start:start + batch_size]))
    return out
