"""Batches: ``__call__`` (padding, truncation, offsets, tensors), ``encode_batch`` over worker
processes, and pickling."""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from itertools import chain
from typing import Any

from neoxja.tokenizer.segment import _compiled
from neoxja.tokenizer.vocab import VERY_LARGE_INTEGER


class BatchEncoding(dict):
    """The result of calling the tokenizer: a dict (``input_ids``, ``attention_mask``, ...).

    Keys are also attributes, and :meth:`to` moves tensors to a device, like transformers'.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor value to ``device`` (in place); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


class BatchMixin:
    """The tokenizer's batch API; it needs ``_encode``, ``encode_with_offsets`` and the settings."""

    model_max_length: int
    padding_side: str
    truncation_side: str
    pad_token_id: int | None
    _segmenter: Any
    _DERIVED: tuple[str, ...]  # attributes that _build_tables() makes

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        num_workers: int = 1,
    ) -> BatchEncoding:
        """Encode one text or a batch: ``input_ids`` and ``attention_mask`` (+ offsets, length).

        ``padding``: False, True/"longest" (to the longest in the batch) or "max_length";
        ``truncation=True`` cuts to ``max_length`` (default ``model_max_length``);
        ``return_tensors="pt"`` gives torch tensors (a batch must then be rectangular);
        ``return_offsets_mapping`` adds (start, end) character spans of every token in the
        original text; ``num_workers > 1`` encodes a batch in that many processes.
        """
        single = isinstance(text, str)
        texts = [text] if single else _check_batch(text)
        if return_offsets_mapping:
            encoded = [self.encode_with_offsets(t) for t in texts]
            all_ids = [ids for ids, _ in encoded]
            all_offsets = [offs for _, offs in encoded]
        else:
            all_ids = self.encode_batch(texts, num_workers=num_workers)
            all_offsets = None
        if _wants_truncation(truncation, max_length, padding):
            all_ids = [self._truncate(ids, max_length) for ids in all_ids]
            if all_offsets is not None:
                all_offsets = [
                    self._truncate(offs, max_length)
                    for offs in all_offsets  # type: ignore[arg-type]
                ]
        masks = [[1] * len(ids) for ids in all_ids]
        target = self._pad_target(all_ids, padding, max_length, pad_to_multiple_of)
        if target is not None:
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad token: this tokenizer was created with pad_token=None")
            all_ids = [_pad(ids, target, pad_id, side) for ids in all_ids]
            masks = [_pad(mask, target, 0, side) for mask in masks]
            if all_offsets is not None:
                all_offsets = [_pad(offs, target, (0, 0), side) for offs in all_offsets]
        result = BatchEncoding()
        result["input_ids"] = all_ids
        if return_attention_mask:
            result["attention_mask"] = masks
        if all_offsets is not None:
            result["offset_mapping"] = all_offsets
        if return_length:
            result["length"] = [sum(m) for m in masks]
        if single:
            for key in list(result):
                result[key] = result[key][0]
        if return_tensors is not None:
            for key in list(result):
                value = result[key]
                result[key] = _to_tensor([value] if single else value, return_tensors)
        return result

    def _pad_target(
        self, all_ids: list[list[int]], padding: bool | str, max_length: int | None, multiple: int | None
    ) -> int | None:
        if padding is False or padding == "do_not_pad":
            return None
        if padding is True or padding == "longest":
            target = max((len(ids) for ids in all_ids), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
            if target >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length (or model_max_length in the config)")
            if target < 0:
                name = "model_max_length" if max_length is None else "max_length"
                raise ValueError(f"padding='max_length' needs a non-negative {name}, got {target}")
        else:
            raise ValueError(
                f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
            )
        if multiple:
            target = -(-target // multiple) * multiple
        return target

    def encode_batch(self, texts: Sequence[str], num_workers: int = 1) -> list[list[int]]:
        """Encode many texts; with ``num_workers > 1`` a large batch is split over that many processes.

        The batch is cut into ``num_workers`` consecutive runs; this process encodes the first
        while forked workers encode the others and send their ids back as packed int32 arrays.
        Forking costs a few milliseconds, so batches under ``_FORK_MIN_CHARS`` characters (and
        every batch where ``os.fork`` does not exist) are encoded here in one process.
        """
        texts = _check_batch(texts)
        total = sum(map(len, texts))
        if num_workers <= 1 or total < _FORK_MIN_CHARS or not hasattr(os, "fork") or len(texts) < 2:
            return [self._encode(t) for t in texts]
        import gc
        import multiprocessing as mp

        context = mp.get_context("fork")
        workers_needed = min(num_workers, len(texts)) - 1
        bounds = _balanced_cuts(texts, [_PARENT_SHARE] + [1.0] * workers_needed, total)
        workers = []
        # Freezing the GC while forking keeps the workers' collector from touching (and so
        # copying) every inherited object.
        gc.freeze()
        try:
            for a, b in zip(bounds[1:-1], bounds[2:], strict=True):
                receiver, sender = context.Pipe(duplex=False)
                worker = context.Process(target=self._encode_to_pipe, args=(texts, a, b, sender), daemon=True)
                worker.start()
                sender.close()
                workers.append((worker, receiver))
        finally:
            gc.unfreeze()
        try:
            result = [self._encode(t) for t in texts[: bounds[1]]]
            for worker, receiver in workers:
                try:
                    lengths, flat = receiver.recv_bytes(), receiver.recv_bytes()
                except EOFError:
                    worker.join()
                    code = worker.exitcode
                    raise RuntimeError(f"encode_batch: a worker process died (exit code {code})") from None
                result.extend(self._unpack(lengths, flat))
        finally:
            for worker, receiver in workers:
                receiver.close()
                worker.join()
        return result

    def _encode_to_pipe(self, texts: list[str], start: int, end: int, sender: Any) -> None:
        """Worker side of :meth:`encode_batch`: encode ``texts[start:end]``, send (lengths, ids)."""
        encoded = [self._encode(t) for t in texts[start:end]]
        if self._segmenter is not None:
            lengths, flat = _compiled.pack(encoded)
        else:
            lengths, flat = array("i", map(len, encoded)).tobytes(), array("i", chain(*encoded)).tobytes()
        sender.send_bytes(lengths)
        sender.send_bytes(flat)
        sender.close()

    def _unpack(self, lengths: bytes, flat: bytes) -> list[list[int]]:
        """The lists of ids a worker packed (the compiled path shares one int object per id)."""
        if self._segmenter is not None:
            return self._segmenter.unpack(lengths, flat)
        sizes, ids = array("i"), array("i")
        sizes.frombytes(lengths)
        ids.frombytes(flat)
        out, start = [], 0
        for size in sizes:
            out.append(ids[start : start + size].tolist())
            start += size
        return out

    def __getstate__(self) -> dict:
        """Pickling keeps the settings and the vocabulary; the tables built from them (the C
        segmenter among them, which does not pickle) are built again on loading."""
        state = self.__dict__.copy()
        for key in self._DERIVED:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_tables()

    def _truncate(self, ids: list[int], max_length: int | None) -> list[int]:
        limit = self.model_max_length if max_length is None else max_length
        if limit < 0:
            name = "model_max_length" if max_length is None else "max_length"
            raise ValueError(f"truncation needs a non-negative {name}, got {limit}")
        if len(ids) <= limit:
            return ids
        return ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]


def check_text(text: Any) -> str:
    """``text`` if it is a str; TypeError naming its type otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


def _check_batch(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def _wants_truncation(truncation: bool | str | None, max_length: int | None, padding: bool | str) -> bool:
    """transformers' rule: truncate when asked, or when only ``max_length`` is given."""
    if truncation is None:
        return max_length is not None and padding in (False, "do_not_pad")
    if truncation in (True, "longest_first", "only_first"):
        return True
    if truncation in (False, "do_not_truncate"):
        return False
    raise ValueError(f"truncation must be True, False, 'longest_first' or 'do_not_truncate': {truncation!r}")


def _pad(seq: list, target: int, value: Any, side: str) -> list:
    missing = target - len(seq)
    if missing <= 0:
        return seq
    return seq + [value] * missing if side == "right" else [value] * missing + seq


def _to_tensor(rows: list, kind: str) -> Any:
    if kind != "pt":
        raise ValueError(f"return_tensors must be 'pt' or None, got {kind!r}")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor of sequences of different lengths {sorted(lengths)}: pass padding=True"
        )
    import torch

    return torch.tensor(rows, dtype=torch.long)


# encode_batch forks workers only for batches at least this long (characters): below it, starting
# a process costs more than it saves.
_FORK_MIN_CHARS = 100_000
# The calling process also unpacks every worker's ids (about a fifth of what encoding them cost),
# so it takes a smaller run than each worker.
_PARENT_SHARE = 0.8


def _balanced_cuts(texts: list[str], weights: Sequence[float], total: int) -> list[int]:
    """Indices cutting ``texts`` into consecutive runs whose lengths are about proportional to
    ``weights``: ``cuts[k]:cuts[k + 1]`` is run k."""
    scale = total / sum(weights)
    goals = [scale * sum(weights[: k + 1]) for k in range(len(weights) - 1)]
    cuts, seen = [0], 0
    for i, text in enumerate(texts):
        if len(cuts) <= len(goals) and seen >= goals[len(cuts) - 1]:
            cuts.append(i)
        seen += len(text)
    while len(cuts) <= len(goals):  # (only when a few texts hold everything)
        cuts.append(len(texts))
    return cuts + [len(texts)]
