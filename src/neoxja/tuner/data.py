"""Training data: text files and JSONL read, checked, tokenised into compact arrays and packed into
fixed-length blocks, a file at a time and a piece at a time, in memory bounded by the tokens kept.

Four kinds of record, in any mix:

- a ``.txt`` file: one document (or one per line with ``per_line=True``, blank lines skipped);
- a ``.jsonl`` line ``{"text": ...}``: one document;
- a ``.jsonl`` line ``{"prompt": ..., "completion": ...}``: the loss covers the completion only;
- a ``.jsonl`` line ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered
  by the tokenizer's chat template, the loss on the assistant's turns (:mod:`neoxja.tuner.chat_data`).

Lines are split on ``"\\n"`` alone (with ``"\\r\\n"`` read as a line end): see
:mod:`neoxja.tuner.data_files`. Every file is read and checked before anything is tokenised, so bad
data (a missing field, an empty file, bytes that are not UTF-8, a line that is not JSON or nests
too deep) stops with the file and line named before a training step has run. Then the files are
read again and tokenised: documents are cut into pieces of about ``PIECE_CHARS`` characters at
places where the tokenizer provably starts afresh (:mod:`neoxja.tuner.data_cuts`), so the ids are
exactly those of each document encoded whole, and the ids go straight into one growing ``uint16``
array (``int32`` for a vocabulary of more than 65,536 ids), each document followed by the
end-of-text token. The array is cut into blocks of ``seq_len`` tokens; the last block is padded
(padding carries no loss), so no token is dropped. :class:`PackedDataset` hands the blocks out in an
order fixed by the seed.
"""

from __future__ import annotations

import os
import warnings
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from neoxja.loss import IGNORE_INDEX  # label of a position that carries no loss (as in transformers)
from neoxja.tuner.chat_data import chat_renderer, chat_texts, check_messages
from neoxja.tuner.data_cuts import cut_rule
from neoxja.tuner.data_files import Chat, DataError, Text, data_files, read_texts

__all__ = [
    "IGNORE_INDEX",
    "PIECE_CHARS",
    "DataError",
    "PackedDataset",
    "Text",
    "check_data",
    "id_storage",
    "load_dataset",
    "pack_texts",
]

# A document is encoded in pieces of at least this many characters (cut where the tokenizer starts
# afresh), so that the text and the Python ints of one piece are all that is held besides the arrays.
PIECE_CHARS = 1 << 18
_UINT16_IDS = 1 << 16


class PackedDataset:
    """Blocks of ``seq_len`` tokens and which of them carry a loss, in compact storage.

    ``PackedDataset(input_ids, labels)`` takes ``[blocks, seq_len]`` tensors, labels
    ``IGNORE_INDEX`` where there is no loss. Prepared data (:func:`load_dataset`) keeps less: the
    ids as ``uint16`` (or ``int32``), ``loss_mask`` (False where a prompt's ids carry no loss; None
    when every id does) and ``length``, the number of real tokens (what follows is padding). Labels
    are made a batch at a time by :meth:`rows`.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor | None = None,
        length: int | None = None,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            shape, dtype = tuple(input_ids.shape), input_ids.dtype
            raise ValueError(f"input_ids must be a 2-D integer tensor [blocks, seq_len], got {shape} {dtype}")
        for name, other in (("labels", labels), ("loss_mask", loss_mask)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(other.shape)}, input_ids {tuple(input_ids.shape)}")
        if labels is not None and (loss_mask is not None or length is not None):
            raise ValueError("give labels, or loss_mask and length, not both")
        if loss_mask is not None and loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be a bool tensor, got {loss_mask.dtype}")
        numel = input_ids.numel()
        if length is not None and not 0 <= length <= numel:
            raise ValueError(f"length must be within 0..{numel} (the ids held), got {length}")
        self.ids = input_ids
        self._labels = labels
        self.loss_mask = loss_mask
        self.length = numel if length is None else length

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per block."""
        return self.ids.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage the dataset holds."""
        held = (self.ids, self._labels, self.loss_mask)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @property
    def num_tokens(self) -> int:
        """Tokens that carry a loss."""
        if self._labels is not None:
            return int((self._labels != IGNORE_INDEX).sum())
        if self.loss_mask is not None:
            return int(self.loss_mask.view(-1)[: self.length].sum())
        return self.length

    @property
    def input_ids(self) -> torch.Tensor:
        """Every block's ids as one int64 tensor ``[blocks, seq_len]`` (8 bytes a token: for a look
        at small data; training reads blocks with :meth:`rows`)."""
        return self.ids.long()

    @property
    def labels(self) -> torch.Tensor:
        """Every block's labels as one int64 tensor (see :attr:`input_ids`)."""
        return self.rows(torch.arange(len(self)))[1]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The blocks' order in ``epoch``: a permutation fixed by ``seed`` and ``epoch`` alone."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=generator)

    def rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of the blocks at ``indices``, as int64."""
        ids = self.ids[indices].long()
        if self._labels is not None:
            return ids, self._labels[indices].long()
        labels = ids.clone()
        if self.loss_mask is not None:
            labels.masked_fill_(~self.loss_mask[indices], IGNORE_INDEX)
        if self.length < self.ids.numel():
            position = indices.unsqueeze(-1) * self.seq_len + torch.arange(self.seq_len)
            labels.masked_fill_(position >= self.length, IGNORE_INDEX)
        return ids, labels


def id_storage(tokenizer: Any) -> tuple[str, str]:
    """``(array typecode, reason)``: ``"H"`` (uint16) when every id the tokenizer declares (its
    ``get_vocab()`` and special tokens) is below 65,536, else ``"i"`` (int32) and why."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return "i", f"{type(tokenizer).__name__} has no get_vocab() to say how many ids it has"
    specials = (getattr(tokenizer, name, None) for name in ("eos_token_id", "pad_token_id"))
    largest = max([*get_vocab().values(), *(i for i in specials if isinstance(i, int))], default=0)
    if largest >= _UINT16_IDS:
        return "i", f"its ids go up to {largest}, beyond uint16 (65,535)"
    return "H", ""


class _Packer:
    """Documents in, one growing id array (and a loss mask when some ids carry none) out.

    Text is gathered per segment and cut into pieces of about ``PIECE_CHARS`` characters at safe
    cuts; pieces are encoded a batch at a time (``num_workers`` processes share a batch)."""

    def __init__(self, tokenizer: Any, num_workers: int) -> None:
        self.tokenizer, self.num_workers = tokenizer, num_workers
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no end-of-text token to separate documents with")
        self.typecode, reason = id_storage(tokenizer)
        if reason:
            warnings.warn(f"training data ids are kept as int32 (4 bytes a token): {reason}", stacklevel=2)
        self.rule = cut_rule(tokenizer)
        self.ids = array(self.typecode)
        self.mask: array | None = None  # 1 where an id carries loss; made at the first one without
        self.text = ""  # the current segment's text not yet cut off
        self.scanned = 0  # text[:scanned] is known to hold no safe cut past PIECE_CHARS
        self.batch: list[tuple[str, bool, bool, str]] = []  # (piece, loss, end-of-text after it, source)
        self.batch_chars = 0

    def add(self, part: Text) -> None:
        """Take one part of a document."""
        self.text += part.text
        text, start = self.text, 0
        while self.rule is not None and len(text) - start > PIECE_CHARS:
            cut = self.rule.first_cut(text, max(start + PIECE_CHARS, self.scanned))
            if not cut:
                self.scanned = len(text)
                break
            self._queue(text[start:cut], part.loss, False, part.source)
            start, self.scanned = cut, 0
        if start:
            self.text = text[start:]
            self.scanned = max(0, self.scanned - start)
        if part.segment_ends:
            self._queue(self.text, part.loss, part.document_ends, part.source)
            self.text, self.scanned = "", 0

    def finish(self, seq_len: int, pad_id: int) -> PackedDataset:
        """The packed blocks; the last one padded with ``pad_id`` (no loss)."""
        self._encode_batch()
        length = len(self.ids)
        if not length:
            raise DataError("no tokens to train on")
        padding = -length % seq_len
        self.ids.extend(array(self.typecode, [pad_id]) * padding)
        blocks = len(self.ids) // seq_len
        dtype = torch.uint16 if self.typecode == "H" else torch.int32
        ids = torch.frombuffer(self.ids, dtype=dtype).view(blocks, seq_len)
        mask = None
        if self.mask is not None:
            self.mask.frombytes(bytes(padding))
            mask = torch.frombuffer(self.mask, dtype=torch.bool).view(blocks, seq_len)
        return PackedDataset(ids, loss_mask=mask, length=length)

    def _queue(self, text: str, loss: bool, eos: bool, source: str) -> None:
        self.batch.append((text, loss, eos, source))
        self.batch_chars += len(text)
        if self.batch_chars >= PIECE_CHARS * max(1, self.num_workers):
            self._encode_batch()

    def _encode_batch(self) -> None:
        if not self.batch:
            return
        encoded = self.tokenizer.encode_batch([text for text, *_ in self.batch], num_workers=self.num_workers)
        for ids, (_, loss, eos, source) in zip(encoded, self.batch, strict=True):
            self._append(ids, loss, source)
            if eos:
                self._append([self.eos], True, source)
        self.batch, self.batch_chars = [], 0

    def _append(self, ids: list[int], loss: bool, source: str) -> None:
        limit = _UINT16_IDS if self.typecode == "H" else 1 << 31
        try:
            if self.typecode == "i" and ids and min(ids) < 0:
                raise OverflowError
            self.ids.fromlist(ids)
        except (OverflowError, TypeError):
            bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < limit), None)
            kind = "uint16" if self.typecode == "H" else "int32"
            message = f"{source}: the tokenizer gave id {bad!r}, which a {kind} id array cannot hold"
            raise DataError(message) from None
        if loss and self.mask is None:
            return
        if self.mask is None:
            self.mask = array("B", b"\x01") * (len(self.ids) - len(ids))
        self.mask.frombytes((b"\x01" if loss else b"\x00") * len(ids))


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and its successor), got {seq_len}")


def pack_texts(parts: Iterable[Text], tokenizer: Any, seq_len: int, *, num_workers: int = 1) -> PackedDataset:
    """Tokenise and pack the documents given as :class:`Text` parts (see the module's docstring)."""
    _check_seq_len(seq_len)
    packer = _Packer(tokenizer, num_workers)
    for part in parts:
        packer.add(part)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return packer.finish(seq_len, pad)


def _chat(tokenizer: Any) -> Chat:
    render = chat_renderer(tokenizer)
    return lambda value, where: chat_texts(check_messages(value, where), render, where)


def check_data(paths: Sequence[str | os.PathLike], tokenizer: Any, *, per_line: bool = False) -> None:
    """Read and check every file of ``paths`` (chat records rendered by ``tokenizer``'s template),
    tokenising nothing: a :class:`DataError` names the file and line of the first problem."""
    chat = _chat(tokenizer)
    for path in data_files(paths):
        for _ in read_texts(path, per_line, chat):
            pass


def load_dataset(
    paths: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_len: int,
    *,
    per_line: bool = False,
    num_workers: int = 1,
    checked: bool = False,
) -> PackedDataset:
    """Read and check every file of ``paths`` (unless ``checked``: :func:`check_data` did), then
    tokenise and pack them (see the module's docstring)."""
    _check_seq_len(seq_len)
    if not checked:  # every file checked before any is tokenised
        check_data(paths, tokenizer, per_line=per_line)
    chat = _chat(tokenizer)
    parts = (part for path in data_files(paths) for part in read_texts(path, per_line, chat))
    return pack_texts(parts, tokenizer, seq_len, num_workers=num_workers)
