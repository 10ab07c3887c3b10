""":func:`neoxja.train`: fine-tune from a model directory (or a loaded model) and data files in one call,
as ``neoxja train`` does from the command line."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from neoxja.saving import replace_directory, write_pretrained
from neoxja.tuner.data import PackedDataset, check_data, load_dataset
from neoxja.tuner.distributed import is_main_process
from neoxja.tuner.lora import LoraArguments, check_peft
from neoxja.tuner.output import check_output_dir, same_directory
from neoxja.tuner.trainer import DTYPE_MIXED_PRECISION, FLOAT16_WEIGHTS, TrainingArguments, TrainResult
from neoxja.tuner.trainer import train as train_blocks

DataArg = str | os.PathLike | Sequence[str | os.PathLike] | PackedDataset
WEIGHT_DTYPES = tuple(DTYPE_MIXED_PRECISION)


def _paths(data: DataArg) -> list[str | os.PathLike]:
    return [data] if isinstance(data, (str, os.PathLike)) else list(data)


def _dataset(data: DataArg, tokenizer: Any, seq_len: int, per_line: bool, num_workers: int) -> PackedDataset:
    if isinstance(data, PackedDataset):
        return data
    paths = _paths(data)
    return load_dataset(paths, tokenizer, seq_len, per_line=per_line, num_workers=num_workers, checked=True)


def check_weight_dtype(dtype: str | None, mixed_precision_given: bool) -> None:
    """A ``ValueError`` for a ``dtype`` (the weights') other than float32 when ``mixed_precision`` is
    not given too: ``dtype`` named the autocast dtype before it meant the weights' (as everywhere else),
    so an old call or command line must not silently train bfloat16 weights instead of autocasting."""
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if dtype not in (None, "float32") and not mixed_precision_given:
        short = DTYPE_MIXED_PRECISION[dtype]
        raise ValueError(
            f"dtype {dtype} is the dtype of the weights now; for the autocast it meant before, use "
            f"mixed precision {short} (--mixed-precision {short}); to train {dtype} weights, say "
            f"--mixed-precision no (or {short}) as well"
        )


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
    dtype: str | None = None,
    **training_args: Any,
) -> TrainResult:
    """Fine-tune ``model`` (a loaded causal LM, a directory or a Hub id) on ``data`` (``.txt``/``.jsonl``
    paths or a :class:`PackedDataset`) and write the result into ``output_dir``.

    ``lora`` (True, a :class:`LoraArguments` or its fields as a dict) trains a LoRA adapter instead of
    every weight; ``merge`` then also writes the base with the adapter merged into
    ``output_dir/merged``. Other keyword arguments are :class:`TrainingArguments` fields
    (``mixed_precision``, ``save_total_limit``, ``overwrite_output_dir``, ...).

    ``output_dir`` must be empty or new, unless ``resume`` continues the run there or
    ``overwrite_output_dir=True`` starts over (then it may be the model's own directory for full
    fine-tuning: the result replaces the model in one step, never leaving the directory without one;
    not with LoRA). A model given by name is loaded on ``device`` (default: a GPU if there is one)
    in ``dtype`` (the weights' dtype, default float32; another needs ``mixed_precision`` given too,
    see :func:`check_weight_dtype`). ``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``, ``"bfloat16"``)
    loads that model's linear layers in the format and trains LoRA on them (QLoRA); with ``merge``
    the adapter is then merged into the float32 base, loaded again unquantized.

    Everything is checked before the model is loaded: the arguments, the output directory, peft
    (with LoRA), and every data file (read whole, nothing tokenised).
    """
    if lora is True:
        lora = LoraArguments()
    elif isinstance(lora, dict):
        lora = LoraArguments(**lora)
    elif lora is False:
        lora = None
    by_name = isinstance(model, (str, os.PathLike))
    if lora is not None and by_name and same_directory(model, output_dir):
        raise ValueError(
            f"the output directory {output_dir} is the model directory: the LoRA adapter written there "
            f"would replace the base model it is applied to; choose another output directory"
        )
    if quantize is not None and lora is None:
        raise ValueError("quantize= trains a LoRA adapter on frozen quantized weights: pass lora= too")
    if merge and lora is None:
        raise ValueError("merge=True merges a LoRA adapter: pass lora= too")
    check_weight_dtype(dtype, "mixed_precision" in training_args)
    if dtype == "float16" and lora is None:
        raise ValueError(FLOAT16_WEIGHTS)
    if not by_name and (device is not None or quantize is not None or dtype is not None):
        raise ValueError(
            "device=, quantize= and dtype= apply to a model given by name; move, quantize or cast a "
            "loaded model yourself"
        )
    args = TrainingArguments(output_dir=str(output_dir), lora=lora, **training_args)
    args.validate()
    check_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite_output_dir)
    if lora is not None:
        check_peft()
    source = model if by_name else None
    if source is not None and tokenizer is None:
        from neoxja.auto import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    to_tokenise = [d for d in (data, eval_data) if d is not None and not isinstance(d, PackedDataset)]
    if tokenizer is None and to_tokenise:
        raise ValueError("tokenizer= is needed to tokenise data files for a model object")
    for paths in to_tokenise:  # every file read and checked before the model loads
        check_data(_paths(paths), tokenizer, per_line=per_line)
    if source is not None:
        from neoxja.auto import AutoModelForCausalLM
        from neoxja.devices import resolve_device

        extra = {"weight_format": quantize} if quantize is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or "float32", device=resolve_device(device, "auto"), **extra
        )
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
