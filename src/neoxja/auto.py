"""Auto classes: ``AutoModelForCausalLM.from_pretrained(...)`` and friends, as in the seed's examples.

neoxja implements one architecture, so the Auto classes only check that a directory or Hub id
really holds a GPT-NeoX-Japanese model (``model_type`` in ``config.json``, ``tokenizer_class`` in
``tokenizer_config.json``) and then hand over to the concrete class. Anything else is refused with
a message that names the type found, instead of failing later with a confusing shape error.
"""

from __future__ import annotations

import os
from typing import Any

from neoxja.hub import HubOptions, resolve_file
from neoxja.jsonfile import read_json_object
from neoxja.tuner.lora import adapter_base, is_adapter_dir

MODEL_TYPE = "gpt_neox_japanese"
TOKENIZER_CLASSES = ("GPTNeoXJapaneseTokenizer", "GPTNeoXJapaneseTokenizerFast")


def _read_json(name_or_path: str | os.PathLike, filename: str, kwargs: dict) -> dict | None:
    """Read ``filename`` of a model directory / Hub id without consuming the caller's kwargs."""
    path = resolve_file(name_or_path, filename, HubOptions.pop_from(dict(kwargs)))
    if path is None:
        return None
    return read_json_object(path, f"a {filename} object")


def check_model_type(name_or_path: str | os.PathLike, kwargs: dict, *, required: bool = True) -> None:
    """Raise ``ValueError`` unless ``config.json`` of ``name_or_path`` declares this model type.

    With ``required=False`` a missing ``config.json`` is accepted (a tokenizer-only directory).
    """
    config = _read_json(name_or_path, "config.json", kwargs)
    if config is None and is_adapter_dir(name_or_path):  # a LoRA adapter: its base model decides
        check_model_type(adapter_base(name_or_path), kwargs, required=required)
        return
    if config is None:
        if required:
            raise OSError(f"{str(name_or_path)!r} has no config.json, so it is not a model directory")
        return
    found = config.get("model_type")
    if found != MODEL_TYPE:
        raise ValueError(
            f"{name_or_path}: config.json has model_type={found!r}, but neoxja supports only "
            f"model_type={MODEL_TYPE!r} (GPT-NeoX-Japanese)"
        )


class AutoConfig:
    """``AutoConfig.from_pretrained(dir | hub id)`` -> :class:`neoxja.GPTNeoXJapaneseConfig`."""

    def __init__(self) -> None:
        raise OSError("use AutoConfig.from_pretrained(name_or_path) to create a configuration")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load the configuration of a GPT-NeoX-Japanese model directory or Hub id."""
        from neoxja.configuration import GPTNeoXJapaneseConfig

        check_model_type(pretrained_model_name_or_path, kwargs)
        return GPTNeoXJapaneseConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> Any:
        """A fresh configuration for ``model_type`` (only ``"gpt_neox_japanese"``) with ``kwargs`` set."""
        from neoxja.configuration import GPTNeoXJapaneseConfig

        if model_type != MODEL_TYPE:
            raise ValueError(
                f"model_type={model_type!r} is not supported; neoxja supports only {MODEL_TYPE!r}"
            )
        return GPTNeoXJapaneseConfig(**kwargs)


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(dir | hub id)`` -> :class:`neoxja.GPTNeoXJapaneseTokenizer`."""

    def __init__(self) -> None:
        raise OSError("use AutoTokenizer.from_pretrained(name_or_path) to create a tokenizer")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load the tokenizer of a GPT-NeoX-Japanese model directory or Hub id.

        ``tokenizer_config.json`` (when present) must name a GPT-NeoX-Japanese tokenizer class and
        ``config.json`` (when present) this model type; a directory holding only ``vocab.txt`` and
        ``emoji.json`` is accepted as is.
        """
        from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

        tokenizer_config = _read_json(pretrained_model_name_or_path, "tokenizer_config.json", kwargs)
        found = (tokenizer_config or {}).get("tokenizer_class")
        if found is not None and found not in TOKENIZER_CLASSES:
            raise ValueError(
                f"{pretrained_model_name_or_path}: tokenizer_config.json has tokenizer_class={found!r}, but "
                f"neoxja supports only {TOKENIZER_CLASSES[0]!r} (model_type={MODEL_TYPE!r})"
            )
        if found is None:
            check_model_type(pretrained_model_name_or_path, kwargs, required=False)
        return GPTNeoXJapaneseTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)


class _AutoModelBase:
    """Shared ``from_pretrained`` / ``from_config`` of the model Auto classes."""

    _class_name = ""

    def __init__(self) -> None:
        raise OSError(f"use {type(self).__name__}.from_pretrained(name_or_path) to create a model")

    @classmethod
    def _model_class(cls) -> type:
        import neoxja.modeling

        return getattr(neoxja.modeling, cls._class_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a GPT-NeoX-Japanese checkpoint (directory or Hub id); kwargs go to the model class
        (``quantization_config=BitsAndBytesConfig(...)`` and ``device_map`` included)."""
        check_model_type(pretrained_model_name_or_path, kwargs)
        return cls._model_class().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any:
        """A randomly initialised model for ``config`` (no weights are read)."""
        found = getattr(config, "model_type", None)
        if found != MODEL_TYPE:
            raise ValueError(f"config has model_type={found!r}; neoxja supports only {MODEL_TYPE!r}")
        return cls._model_class()(config, **kwargs)


class AutoModel(_AutoModelBase):
    """``AutoModel.from_pretrained(...)`` -> :class:`neoxja.GPTNeoXJapaneseModel` (no LM head)."""

    _class_name = "GPTNeoXJapaneseModel"


class AutoModelForCausalLM(_AutoModelBase):
    """``AutoModelForCausalLM.from_pretrained(...)`` -> :class:`neoxja.GPTNeoXJapaneseForCausalLM`."""

    _class_name = "GPTNeoXJapaneseForCausalLM"
