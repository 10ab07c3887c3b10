"""The tokenizer class: construction, loading and saving, encoding (steps 1-3), offsets, decoding."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from neoxja.jsonfile import read_json_object
from neoxja.tokenizer.batch import BatchMixin, _to_tensor, _wants_truncation, check_text
from neoxja.tokenizer.chat import ChatTemplateMixin
from neoxja.tokenizer.detokenize import CLEAN_UP_SPACES, IdDecoder, normalize
from neoxja.tokenizer.rewrite import EmojiReplacer, rewrite, rewrite_traced
from neoxja.tokenizer.segment import PythonSegmenter, compiled_segmenter
from neoxja.tokenizer.vocab import (
    VERY_LARGE_INTEGER,
    VOCAB_FILES,
    VocabularyMixin,
    as_id_list,
    load_emoji,
    load_vocab,
    lt_words,
    special_tokens,
    word_ids,
)


class GPTNeoXJapaneseTokenizer(VocabularyMixin, BatchMixin, ChatTemplateMixin):
    """Tokenizer of abeja/gpt-neox-japanese-2.7b; ids identical to transformers' tokenizer.

    Args:
        vocab_file: ``vocab.txt`` (one id per line, comma-separated spelling variants).
        emoji_file: ``emoji.json`` (emoji -> group tag, tag -> representative emoji).
        unk_token, pad_token, bos_token, eos_token: special tokens (the seed's defaults).
        do_clean_text: replace URLs, e-mails, phone numbers, dates, prices and box drawing by tags.
        model_max_length: length used by ``truncation=True``/``padding="max_length"`` without
            ``max_length``.
        padding_side: ``"right"`` or ``"left"``.
        chat_template: the Jinja template of :meth:`apply_chat_template` (None: neoxja's default,
            :data:`neoxja.tokenizer.chat.DEFAULT_CHAT_TEMPLATE`); saved by :meth:`save_pretrained`.
    """

    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]
    # What _build_tables() makes from the vocabulary and the settings (not pickled).
    _DERIVED = ("_python", "_segmenter", "_segment_text", "_emoji", "_decoding", "_special_split_re")

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        emoji_file: str | os.PathLike,
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        do_clean_text: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        for name, path in (("vocab_file", vocab_file), ("emoji_file", emoji_file)):
            if not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {str(path)!r}")
        for side_name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{side_name} must be 'left' or 'right', got {side!r}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a string (a Jinja template), got {chat_template!r}")
        self.chat_template = chat_template
        self.vocab_file = str(vocab_file)
        self.emoji_file = str(emoji_file)
        self._lines = load_vocab(vocab_file)
        self.emoji = load_emoji(emoji_file)
        self.do_clean_text = bool(do_clean_text)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.unk_token, self.pad_token, self.bos_token, self.eos_token = (
            unk_token,
            pad_token,
            bos_token,
            eos_token,
        )
        self.init_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}

        self.vocab = word_ids(self._lines, vocab_file)
        # The vocabulary line -> id: get_vocab() and vocab_size, as the reference counts them.
        self.raw_vocab = dict(zip(self._lines, range(len(self._lines)), strict=True))
        self._build_tables()

    def _build_tables(self) -> None:
        """Special tokens (matched in the text before anything else; unknown ones get new ids),
        the emoji replacer and the segmenters."""
        vocab = self.vocab
        tokens = (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        self.added_tokens_encoder, self._special_split_re = special_tokens(tokens, vocab, len(self._lines))
        self.added_tokens_decoder = {i: t for t, i in self.added_tokens_encoder.items()}
        unk_id = vocab.get(self.unk_token, 0)
        self._unk_id = unk_id  # (0 when there is no unk token, as unknown tokens need some id)
        fallback_ids = (
            vocab.get("<KIGOU>", unk_id),
            vocab.get("<U2000U2BFF>", unk_id),
            [vocab.get(f"<|byte{b}|>", unk_id) for b in range(256)],
        )
        self._python = PythonSegmenter(vocab, lt_words(self._lines, vocab), *fallback_ids)
        # Step 3 in C when the extension is built (NEOXJA_PURE_PYTHON=1 forces the Python path).
        self._segmenter = compiled_segmenter(vocab, *fallback_ids)
        self._segment_text = self._segmenter.segment if self._segmenter is not None else self._python.segment
        self._emoji = EmojiReplacer(self.emoji["emoji"])

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GPTNeoXJapaneseTokenizer:
        """Load from a model directory or a Hub id (``vocab.txt``, ``emoji.json``, optional configs).

        The chat template is ``chat_template.jinja`` if there is one (transformers 5 writes it), else
        tokenizer_config.json's ``chat_template`` string.

        Hub options (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``)
        go to :func:`neoxja.hub.resolve_file`; other keyword arguments override the saved config.
        """
        from neoxja.hub import HubOptions, resolve_file

        options = HubOptions.pop_from(kwargs)
        files = {}
        for arg, filename in VOCAB_FILES.items():
            path = resolve_file(name_or_path, filename, options)
            if path is None:
                raise OSError(f"{str(name_or_path)!r} has no {filename} (needed by the tokenizer)")
            files[arg] = path
        config: dict[str, Any] = {}
        for filename in ("special_tokens_map.json", "tokenizer_config.json"):
            path = resolve_file(name_or_path, filename, options)
            if path is not None:
                config.update(read_json_object(path))
        init = {}
        for key in ("unk_token", "pad_token", "bos_token", "eos_token"):
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken written as {"content": ...}
                value = value.get("content")
            if isinstance(value, str) or (key in config and value is None):
                init[key] = value
        for key, kind in (
            ("do_clean_text", bool),
            ("model_max_length", int),
            ("padding_side", str),
            ("chat_template", str),
        ):
            if isinstance(config.get(key), kind):
                init[key] = config[key]
        path = resolve_file(name_or_path, "chat_template.jinja", options)
        if path is not None:
            init["chat_template"] = Path(path).read_text(encoding="utf-8")
        init.update(kwargs)
        return cls(files["vocab_file"], files["emoji_file"], **init)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write vocab.txt, emoji.json, tokenizer_config.json and special_tokens_map.json.

        A chat template that was set is written as tokenizer_config.json's ``chat_template`` (the key
        every transformers version reads), and into a ``chat_template.jinja`` already there (which
        would win on loading), so the two never disagree.
        transformers' ``GPTNeoXJapaneseTokenizer.from_pretrained`` loads the result.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        path = directory / "vocab.txt"
        path.write_text("\n".join(self._lines) + "\n", encoding="utf-8")
        written.append(path)
        path = directory / "emoji.json"
        path.write_text(json.dumps(self.emoji, ensure_ascii=False), encoding="utf-8")
        written.append(path)
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        config = {
            "tokenizer_class": "GPTNeoXJapaneseTokenizer",
            **special,
            "do_clean_text": self.do_clean_text,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            path = directory / "chat_template.jinja"
            if path.exists():
                path.write_text(self.chat_template, encoding="utf-8")
                written.append(path)
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            path = directory / name
            path.write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            written.append(path)
        return tuple(str(p) for p in written)

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings exactly as the reference's ``tokenize`` gives them."""
        tokens: list[str] = []
        for piece, is_special in self._split_special(check_text(text)):
            if is_special:
                tokens.append(piece)
            else:
                tokens.extend(token for _, token, _ in self._python.pieces(self._rewrite(piece)))
        return tokens

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | Any:
        """Text -> ids (no BOS/EOS is added, as in the reference); ``return_tensors="pt"`` -> (1, n)."""
        ids = self._encode(check_text(text))
        if _wants_truncation(truncation, max_length, padding=False):
            ids = self._truncate(ids, max_length)
        if return_tensors is not None:
            return _to_tensor([ids], return_tensors)
        return ids

    def _encode(self, text: str) -> list[int]:
        if self._special_split_re is None or "<" not in text:
            return self._segment_text(self._rewrite(text))
        ids: list[int] = []
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self.added_tokens_encoder[piece])
            else:
                ids.extend(self._segment_text(self._rewrite(piece)))
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """Step 1: (piece, is a special token) around the special tokens written in ``text``."""
        if self._special_split_re is None:
            return [(text, False)]
        parts = self._special_split_re.split(text)
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _rewrite(self, text: str) -> str:
        return rewrite(text, self._emoji, self.do_clean_text)

    # ------------------------------------------------------------------ offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus the (start, end) span of ``text`` each token came from.

        Spans tile the text in order: a character split into several byte tokens gives its span
        to the first of them and empty spans (end, end) to the rest.
        """
        text = check_text(text)
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self.added_tokens_encoder[piece])
                spans.append((offset, offset + len(piece)))
            else:
                traced = rewrite_traced(piece, offset, self._emoji, self.do_clean_text)
                pos = 0
                for idx, _, width in self._python.pieces(traced.text):
                    ids.append(idx)
                    if width:
                        spans.append(traced.span(pos, pos + width))
                        pos += width
                    else:
                        spans.append((spans[-1][1],) * 2)
            offset += len(piece)
        return ids, _tile(spans)

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: int | Sequence[int] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Ids -> text. Byte tokens are joined across tokens before UTF-8 decoding, spaces are kept;
        ``decode(encode(x)) == normalize(x)``. An id outside the vocabulary raises ValueError.

        ``clean_up_tokenization_spaces=True`` removes the space before English punctuation and
        contractions, like transformers' option (off by default, as there)."""
        ids = [token_ids] if isinstance(token_ids, int) else as_id_list(token_ids)
        decoder = IdDecoder(*self._decoding)
        size, check, add = len(self._decoding[0]), self._check_id, decoder.add
        skip = self.added_tokens_decoder if skip_special_tokens else ()
        parts = []
        for idx in ids:
            if type(idx) is not int or not 0 <= idx < size:
                idx = check(idx)
            if idx not in skip:
                parts.append(add(idx))
        parts.append(decoder.finish())
        text = "".join(parts)
        if clean_up_tokenization_spaces:
            for old, new in CLEAN_UP_SPACES:
                text = text.replace(old, new)
        return text

    def batch_decode(
        self,
        sequences: Iterable[Sequence[int]] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """:meth:`decode` for each sequence of a batch (list of lists or a 2-D tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def normalize(self, text: str) -> str:
        """What :meth:`decode` gives back for ``encode(text)``; see the module-level :func:`normalize`."""
        return normalize(text, self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, do_clean_text={self.do_clean_text}, "
            f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r})"
        )


def _tile(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Make consecutive spans non-overlapping: a token whose source was already covered by the
    previous one (several tokens from one rewritten piece) gets an empty span."""
    tiled, covered = [], 0
    for start, end in spans:
        start = max(start, covered)
        end = max(end, start)
        tiled.append((start, end))
        covered = end
    return tiled
