""":func:`neoxja.train`: fine-tune from a model directory (or a loaded model) and data files in one call,
as ``neoxja train`` does from the command line."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from neoxja.saving import replace_directory, write_pretrained
from neoxja.tuner.data import PackedDataset, load_dataset
from neoxja.tuner.distributed import is_main_process
from neoxja.tuner.lora import LoraArguments
from neoxja.tuner.trainer import TrainingArguments, TrainResult
from neoxja.tuner.trainer import train as train_blocks

DataArg = str | os.PathLike | Sequence[str | os.PathLike] | PackedDataset


def _dataset(data: DataArg, tokenizer: Any, seq_len: int, per_line: bool, num_workers: int) -> PackedDataset:
    if isinstance(data, PackedDataset):
        return data
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    return load_dataset(paths, tokenizer, seq_len, per_line=per_line, num_workers=num_workers)


def train(
    model: nn.Module | str | os.PathLike,
    data: DataArg,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    eval_data: DataArg | None = None,
    seq_len: int = 512,
    per_line: bool = False,
    num_workers: int = 1,
    lora: bool | LoraArguments | dict | None = None,
    merge: bool = False,
    device: Any = None,
    quantize: str | None = None,
    **training_args: Any,
) -> TrainResult:
    """Fine-tune ``model`` (a loaded causal LM, a directory or a Hub id) on ``data`` (``.txt``/``.jsonl``
    paths or a :class:`PackedDataset`) and write the result into ``output_dir``.

    ``lora`` (True, a :class:`LoraArguments` or its fields as a dict) trains a LoRA adapter instead of
    every weight; ``merge`` then also writes the base with the adapter merged into
    ``output_dir/merged``. ``output_dir`` may be the model's own directory for full fine-tuning (the
    result replaces the model in one step, never leaving the directory without one), not with LoRA.
    Other keyword arguments are :class:`TrainingArguments` fields. A model given
    by name is loaded in float32 on ``device`` (default: a GPU if there is one); ``--dtype`` in the
    arguments is the autocast dtype. ``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``, ``"bfloat16"``)
    loads that model's linear layers in the format and trains LoRA on them (QLoRA); with ``merge``
    the adapter is then merged into the float32 base, loaded again unquantized.
    """
    source = None
    if (
        lora not in (None, False)
        and isinstance(model, (str, os.PathLike))
        and same_directory(model, output_dir)
    ):
        raise ValueError(
            f"the output directory {output_dir} is the model directory: the LoRA adapter written there "
            f"would replace the base model it is applied to; choose another output directory"
        )
    if quantize is not None and (lora is None or lora is False):
        raise ValueError("quantize= trains a LoRA adapter on frozen quantized weights: pass lora= too")
    if isinstance(model, (str, os.PathLike)):
        from neoxja.auto import AutoModelForCausalLM, AutoTokenizer
        from neoxja.devices import resolve_device

        source = model
        extra = {"weight_format": quantize} if quantize is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype="float32", device=resolve_device(device, "auto"), **extra
        )
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
    elif device is not None or quantize is not None:
        raise ValueError(
            "device= and quantize= apply to a model given by name; move or quantize a loaded model yourself"
        )
    to_tokenise = [d for d in (data, eval_data) if d is not None and not isinstance(d, PackedDataset)]
    if tokenizer is None and to_tokenise:
        raise ValueError("tokenizer= is needed to tokenise data files for a model object")
    if lora is True:
        lora = LoraArguments()
    elif isinstance(lora, dict):
        lora = LoraArguments(**lora)
    elif lora is False:
        lora = None
    if merge and lora is None:
        raise ValueError("merge=True merges a LoRA adapter: pass lora= too")
    args = TrainingArguments(output_dir=str(output_dir), lora=lora, **training_args)
    args.validate()  # before any file is tokenised
    train_set = _dataset(data, tokenizer, seq_len, per_line, num_workers)
    eval_set = (
        _dataset(eval_data, tokenizer, seq_len, per_line, num_workers) if eval_data is not None else None
    )
    result = train_blocks(model, train_set, args, eval_set, tokenizer)
    if merge and result.step and is_main_process():
        if quantize is not None:
            from neoxja.auto import AutoModelForCausalLM
            from neoxja.tuner.lora import merge_adapter

            base = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
            merged = merge_adapter(base, output_dir)
        else:
            merged = result.model.merge_and_unload()
        with replace_directory(Path(output_dir) / "merged") as staging:
            write_pretrained(merged, staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
    return result


def same_directory(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing directory (through links, ``..``, bind mounts)."""
    return Path(a).is_dir() and Path(b).is_dir() and os.path.samefile(a, b)
