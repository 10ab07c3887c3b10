"""Training data: text files and JSONL read, checked, tokenised and packed into fixed-length blocks.

Three kinds of record, in any mix:

- a ``.txt`` file: one document (or one per line with ``per_line=True``, blank lines skipped);
- a ``.jsonl`` line ``{"text": ...}``: one document;
- a ``.jsonl`` line ``{"prompt": ..., "completion": ...}``: the loss covers the completion only.

Every file is read and checked before anything is tokenised, so bad data (a missing field, an empty
file, bytes that are not UTF-8, a line that is not JSON) stops with the file and line named before
a training step has run. Documents are tokenised, each followed by the end-of-text token, joined, and
cut into blocks of ``seq_len`` tokens; the last block is padded (padding carries no loss), so no
token is dropped. :class:`PackedDataset` hands the blocks out in an order fixed by the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neoxja.jsonfile import decode_utf8
from neoxja.loss import IGNORE_INDEX  # label of a position that carries no loss (as in transformers)


class DataError(ValueError):
    """Training data that cannot be used, with the file (and line) that holds the problem."""


@dataclass(frozen=True)
class Record:
    """One training document: ``prompt`` (no loss, may be empty) followed by ``text`` (with loss)."""

    text: str
    prompt: str = ""
    source: str = ""  # "file:line", for messages


def _decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return decode_utf8(raw, path, drop_bom=True)
    except ValueError as err:
        raise DataError(str(err)) from None


def _jsonl_record(path: Path, number: int, line: str) -> Record:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not a JSON line ({err.msg} at column {err.colno})") from err
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, found a {type(item).__name__}")
    if "text" in item:
        fields = {"text": item["text"]}
    elif "prompt" in item or "completion" in item:
        missing = [key for key in ("prompt", "completion") if key not in item]
        if missing:
            raise DataError(f"{where}: a prompt/completion record needs {' and '.join(missing)}")
        fields = {"prompt": item["prompt"], "completion": item["completion"]}
    else:
        keys = ", ".join(map(repr, item)) or "none"
        raise DataError(f'{where}: needs "text", or "prompt" and "completion" (keys found: {keys})')
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, found {type(value).__name__}")
    if "text" in fields:
        return Record(fields["text"], source=where)
    if not fields["completion"]:
        raise DataError(f"{where}: empty 'completion' (nothing to learn from)")
    return Record(fields["completion"], prompt=fields["prompt"], source=where)


def read_records(paths: Sequence[str | os.PathLike], per_line: bool = False) -> list[Record]:
    """Every record of ``paths`` (``.txt`` or ``.jsonl`` files, or directories of them, sorted).

    ``per_line`` makes each non-blank line of a ``.txt`` file a document of its own.
    Raises :class:`DataError` naming the file and line of the first problem.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise DataError(f"{path}: a directory with no .txt or .jsonl file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    records: list[Record] = []
    for path in files:
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{path}: unknown kind of data file (use .txt or .jsonl)")
        text = _decode_utf8(path, path.read_bytes())
        before = len(records)
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    records.append(_jsonl_record(path, number, line))
        elif per_line:
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    records.append(Record(line, source=f"{path}:{number}"))
        elif text.strip():
            records.append(Record(text, source=f"{path}:1"))
        if len(records) == before:
            raise DataError(f"{path}: empty (no document in it)")
    return records


def tokenize_records(
    records: Sequence[Record], tokenizer: Any, num_workers: int = 1
) -> list[tuple[list, list]]:
    """``(ids, labels)`` per record: prompt ids (label ``IGNORE_INDEX``), text ids, end-of-text.

    Large inputs are tokenised in ``num_workers`` processes (the tokenizer's ``encode_batch``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text token to separate documents with")
    texts = [record.text for record in records]
    prompts = [record.prompt for record in records if record.prompt]
    encoded = tokenizer.encode_batch(texts + prompts, num_workers=num_workers)
    text_ids, prompt_ids = iter(encoded[: len(texts)]), iter(encoded[len(texts) :])
    pairs = []
    for record in records:
        ids = next(text_ids)
        prompt = next(prompt_ids) if record.prompt else []
        pairs.append((prompt + ids + [eos], [IGNORE_INDEX] * len(prompt) + ids + [eos]))
    return pairs


def pack(pairs: Sequence[tuple[list, list]], seq_len: int, pad_id: int) -> PackedDataset:
    """Join the ``(ids, labels)`` pairs and cut them into blocks of ``seq_len`` tokens; the last
    block is filled with ``pad_id`` tokens whose labels are ``IGNORE_INDEX``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and its successor), got {seq_len}")
    ids = [token for pair_ids, _ in pairs for token in pair_ids]
    labels = [label for _, pair_labels in pairs for label in pair_labels]
    if not ids:
        raise DataError("no tokens to train on")
    blocks = -(-len(ids) // seq_len)
    padding = blocks * seq_len - len(ids)
    input_ids = torch.tensor(ids + [pad_id] * padding, dtype=torch.long).view(blocks, seq_len)
    targets = torch.tensor(labels + [IGNORE_INDEX] * padding, dtype=torch.long).view(blocks, seq_len)
    return PackedDataset(input_ids, targets)


@dataclass
class PackedDataset:
    """Blocks of ``seq_len`` tokens and their labels (``IGNORE_INDEX`` where there is no loss)."""

    input_ids: torch.Tensor  # [blocks, seq_len]
    labels: torch.Tensor  # [blocks, seq_len]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens that carry a loss."""
        return int((self.labels != IGNORE_INDEX).sum())

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The blocks' order in ``epoch``: a permutation fixed by ``seed`` and ``epoch`` alone."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=generator)

    def rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of the blocks at ``indices``."""
        return self.input_ids[indices], self.labels[indices]


def load_dataset(
    paths: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_len: int,
    *,
    per_line: bool = False,
    num_workers: int = 1,
) -> PackedDataset:
    """Read, check, tokenise and pack ``paths`` (see the module's docstring)."""
    records = read_records(paths, per_line=per_line)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack(tokenize_records(records, tokenizer, num_workers), seq_len, pad)
