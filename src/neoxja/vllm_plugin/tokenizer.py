"""neoxja's tokenizer as a vLLM tokenizer: ``tokenizer_mode="neoxja"`` (``--tokenizer-mode neoxja``).

vLLM loads a model's tokenizer through transformers by default (``tokenizer_mode="auto"``), which
for GPT-NeoX-Japanese is transformers' Python tokenizer. neoxja's gives the same ids, much faster
(its segmentation runs in C). vLLM's tokenizer registry maps a *mode* to a class, so the plugin
registers this adapter under the mode ``"neoxja"``, and the chat renderer for that mode (vLLM's
own Jinja renderer, which renders through the tokenizer's ``apply_chat_template``).

Beyond neoxja's tokenizer the adapter gives vLLM what its tokenizer protocol asks for. The one
change of behaviour is the pair ``convert_ids_to_tokens``/``convert_tokens_to_string``, which
vLLM's incremental detokenizer streams text with: transformers' pair decodes byte tokens one by
one (a character spelt in bytes comes out as U+FFFD) and strips the text's ends; here byte tokens
keep their vocabulary names and are joined into characters, so the streamed text is ``decode()``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from neoxja.tokenizer import GPTNeoXJapaneseTokenizer
from neoxja.tokenizer.detokenize import IdDecoder

TOKENIZER_MODE = "neoxja"


def register_tokenizer() -> None:
    """Register :class:`NeoXJaVllmTokenizer` and its renderer under ``tokenizer_mode="neoxja"``.

    Called by the plugin's ``register()`` in every vLLM process; registering twice is harmless.
    """
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers import TokenizerRegistry

    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, __name__, NeoXJaVllmTokenizer.__name__)
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        # vLLM's Jinja renderer duck-types its tokenizer: it needs get_chat_template and
        # apply_chat_template, which this tokenizer has.
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")


class NeoXJaVllmTokenizer(GPTNeoXJapaneseTokenizer):
    """:class:`~neoxja.GPTNeoXJapaneseTokenizer` with the methods vLLM's ``TokenizerLike`` needs."""

    name_or_path: str = ""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_repo_id: str | os.PathLike,
        *args: Any,
        trust_remote_code: bool = False,
        revision: str | None = None,
        download_dir: str | None = None,
        **kwargs: Any,
    ) -> NeoXJaVllmTokenizer:
        """Load as vLLM asks (a model directory or Hub id, ``revision``, ``download_dir``).

        ``trust_remote_code`` is accepted and unused (nothing is imported from the model's files);
        vLLM's ``truncation_side`` reaches the tokenizer.
        """
        if args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments: {args!r}")
        kwargs.pop("config", None)  # the model's config, which vLLM hands to transformers' loaders
        tokenizer = super().from_pretrained(
            path_or_repo_id, revision=revision, cache_dir=download_dir, **kwargs
        )
        tokenizer.name_or_path = str(path_or_repo_id)
        return tokenizer  # type: ignore[return-value]

    # ------------------------------------------------------------------ sizes and flags

    @property
    def is_fast(self) -> bool:
        """True: what vLLM reads from this flag holds (no slow-tokenizer warning is due, and
        ``return_offsets_mapping`` works); its detokenizer takes the protocol's path either way."""
        return True

    @property
    def max_token_id(self) -> int:
        return len(self._decoding[0]) - 1

    @cached_property
    def max_chars_per_token(self) -> int:
        """The longest vocabulary entry: vLLM bounds a prompt's characters by tokens times this."""
        return max(len(token) for token in self.get_vocab())

    def __len__(self) -> int:
        """The number of ids (two vocabulary lines are spelt twice, so get_vocab() has fewer keys):
        vLLM detokenizes an id only when it is below ``len(tokenizer)``."""
        return self.max_token_id + 1

    def num_special_tokens_to_add(self) -> int:
        """0: encoding adds no BOS/EOS (as transformers' tokenizer of this model)."""
        return 0

    def get_added_vocab(self) -> dict[str, int]:
        """Special tokens that are not vocabulary lines (none for abeja's vocabulary)."""
        return {token: idx for token, idx in self.added_tokens_encoder.items() if idx >= len(self._lines)}

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The chat template (see neoxja's tokenizer); ``tools`` does not change it."""
        return super().get_chat_template(chat_template)

    # ------------------------------------------------------------------ streaming text

    @cached_property
    def _byte_names(self) -> dict[str, bytes]:
        """Byte token name (its vocabulary line, e.g. ``<|byte227|>``) -> its byte."""
        id_byte = self._decoding[1]
        return {self._lines[i]: bytes((b,)) for i, b in enumerate(id_byte) if b >= 0}

    def _id_to_token(self, idx: int) -> str:
        """The token string ``convert_ids_to_tokens`` gives for ``idx``: a text token's text, a byte
        token's vocabulary name, which :meth:`convert_tokens_to_string` joins into ``decode()``'s text."""
        id_text, id_byte = self._decoding
        if id_byte[idx] >= 0:
            return self._lines[idx]
        return id_text[idx]  # type: ignore[return-value]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join :meth:`convert_ids_to_tokens`'s strings as ``decode()`` joins the ids: runs of byte
        tokens become the characters they spell (U+FFFD for an unfinished or invalid one), text
        passes unchanged (nothing is stripped)."""
        decoder = IdDecoder(*self._decoding)
        byte_names = self._byte_names
        parts = []
        for token in tokens:
            byte = byte_names.get(token)
            parts.append(decoder.add_bytes(byte) if byte is not None else decoder.add_text(token))
        parts.append(decoder.finish())
        return "".join(parts)
