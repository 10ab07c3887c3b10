"""The training loop of ``neoxja train`` and :func:`neoxja.train`: full fine-tuning or LoRA, one
process or many under ``torchrun``.

One step is one optimizer update over ``batch_size * grad_accum * world_size`` blocks, taken in
order from the seed's permutation of the blocks (epoch after epoch). The loss of a step is the mean
over every token of those blocks that carries a loss, whichever process or micro-batch holds it,
so 2 processes with batch B compute what 1 process with batch 2B does, and a resumed run what an
uninterrupted one does (the step fixes the data position; the checkpoint holds the rest).
Training changes the model it is given, as transformers' Trainer does; the random-number state of
the caller is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neoxja.saving import new_file_mode, remove_stale_saves, replace_directory, write_pretrained
from neoxja.tuner import checkpoints
from neoxja.tuner.data import IGNORE_INDEX, PackedDataset
from neoxja.tuner.distributed import World, join, no_sync, wrap
from neoxja.tuner.lora import LoraArguments, apply_lora
from neoxja.tuner.optim import SCHEDULES, make_optimizer, make_scheduler
from neoxja.tuner.output import check_output_dir, clear_earlier_run, same_directory

# --mixed-precision (accelerate's and TRL's values): the dtype the forward autocasts to.
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A dtype's name -> the mixed precision of that dtype: TrainingArguments(dtype=...), the name of
# mixed_precision before issue 24, and its values (and the weights' dtypes neoxja.train loads in).
DTYPE_MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
# Held-out loss this many times a run when eval data is given without eval_every.
EVALS_PER_RUN = 10


@dataclass
class TrainingArguments:
    """What ``neoxja train`` takes; each field is the flag of the same name."""

    output_dir: str
    steps: int | None = None  # optimizer steps; default: ``epochs`` (1 when neither is given)
    epochs: float | None = None
    batch_size: int = 8  # blocks per process and micro-batch
    grad_accum: int = 1
    lr: float = 5e-5
    warmup: int = 0  # steps
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # autocast to bf16, or fp16 (GPU, with a gradient scaler); weights stay
    grad_checkpointing: bool = False
    eval_every: int | None = None  # default: EVALS_PER_RUN times a run when there is eval data
    eval_batch_size: int | None = None
    save_every: int | None = None
    save_total_limit: int | None = None  # keep the N newest checkpoints (default: all)
    overwrite_output_dir: bool = False  # start over in a directory that holds an earlier run
    log_every: int = 1
    seed: int = 0
    resume: str | None = None
    lora: LoraArguments | None = None
    fsdp: bool = False
    progress: bool = True
    dtype: str | None = None  # the old name of mixed_precision: float32, bfloat16, float16

    def __post_init__(self) -> None:
        if self.dtype is None:
            return
        if self.dtype not in DTYPE_MIXED_PRECISION:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_MIXED_PRECISION)}, got {self.dtype!r}")
        meant = DTYPE_MIXED_PRECISION[self.dtype]
        if self.mixed_precision not in ("no", meant):
            raise ValueError(
                f"dtype={self.dtype!r} (the old name of mixed_precision) contradicts "
                f"mixed_precision={self.mixed_precision!r}: pass mixed_precision alone"
            )
        warnings.warn(
            f"TrainingArguments(dtype=...) is now mixed_precision={meant!r}", DeprecationWarning, stacklevel=3
        )
        self.mixed_precision, self.dtype = meant, None

    def validate(self) -> None:
        """A ``ValueError`` naming the first argument that cannot be used."""
        for name in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("steps", "eval_every", "save_every", "eval_batch_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None), got {self.max_grad_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.lora is not None:
            self.lora.validate()


@dataclass
class TrainResult:
    """The trained model (peft-wrapped with LoRA), its last step, and the last losses."""

    model: nn.Module
    step: int
    loss: float | None
    eval_loss: float | None
    metrics: list[dict[str, Any]]


def token_loss_sum(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each next token that carries a loss, and how many there are. The
    model computes it from its hidden states a chunk at a time, never holding the whole logits
    (and under gradient checkpointing recomputes them in backward)."""
    out = model(input_ids=input_ids, labels=labels, skip_logits=True, num_items_in_batch=1)
    return out.loss, count_targets(labels)


def count_targets(labels: torch.Tensor) -> int:
    """How many next tokens of ``labels`` rows carry a loss (every position but each row's first)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class _Rows:
    """The block indices of each step: the seed's permutation of the blocks, epoch after epoch."""

    def __init__(self, data: PackedDataset, seed: int, per_step: int) -> None:
        self.data, self.seed, self.per_step = data, seed, per_step
        self._orders: dict[int, torch.Tensor] = {}

    def of_step(self, step: int) -> torch.Tensor:
        rows, start, blocks = [], step * self.per_step, len(self.data)
        for position in range(start, start + self.per_step):  # a step may run into the next epoch
            epoch, offset = divmod(position, blocks)
            if epoch not in self._orders:
                self._orders = {epoch: self.data.order(self.seed, epoch)}  # only the current one is kept
            rows.append(self._orders[epoch][offset])
        return torch.stack(rows)


def total_steps(args: TrainingArguments, blocks: int, per_step: int) -> int:
    """``args.steps``, or the steps of ``args.epochs`` passes over ``blocks`` (1 epoch by default)."""
    if args.steps is not None:
        return args.steps
    return max(1, math.ceil((args.epochs or 1.0) * blocks / per_step))


def _autocast(args: TrainingArguments, device: torch.device) -> AbstractContextManager:
    dtype = MIXED_PRECISION[args.mixed_precision]
    if dtype == torch.float32:
        return nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("mixed precision fp16 needs a CUDA GPU (and its gradient scaler): use bf16")
    return torch.autocast(device.type, dtype=dtype)


FLOAT16_WEIGHTS = (
    "float16 weights cannot be trained (their updates underflow): load them in float32 or bfloat16 "
    "and use mixed precision fp16, or train a LoRA adapter on them"
)


def check_trainable(model: nn.Module) -> None:
    """A ``ValueError`` when weights to train are float16: without float32 master weights their small
    updates vanish (and the gradient scaler refuses them); bfloat16 and float32 weights train."""
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise ValueError(FLOAT16_WEIGHTS)


def evaluate(model: nn.Module, data: PackedDataset, batch_size: int, world: World, autocast: Any) -> float:
    """Mean held-out loss over every token of ``data`` that carries one (shared out over processes)."""
    was_training = model.training
    model.eval()
    summed, count = torch.zeros((), dtype=torch.float64, device=world.device), 0
    mine = torch.arange(world.rank, len(data), world.size)
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            ids, labels = data.rows(mine[start : start + batch_size])
            with autocast:
                loss, tokens = token_loss_sum(model, ids.to(world.device), labels)
            summed += loss.double()  # no host sync per batch
            count += tokens
    model.train(was_training)
    loss, count = world.sum(torch.stack([summed, summed.new_tensor(count)])).tolist()
    return loss / count if count else float("nan")


def train(
    model: nn.Module,
    train_data: PackedDataset,
    args: TrainingArguments,
    eval_data: PackedDataset | None = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Train ``model`` on ``train_data`` as ``args`` say; write checkpoints, the metrics log
    (``metrics.jsonl``) and the result (model or adapter, and ``tokenizer``) into ``args.output_dir``.

    An output directory that holds anything is refused unless ``args.resume`` continues the run
    there or ``args.overwrite_output_dir`` starts over (see :mod:`neoxja.tuner.output`)."""
    args.validate()
    check_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite_output_dir)
    device = next(model.parameters()).device
    world = join(device)
    devices = [world.device.index or 0] if world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(args.seed + world.rank)
        return _Run(model, train_data, args, eval_data, tokenizer, world).loop()


class _Run:
    """One training run: the model, optimizer and schedule, and what is logged and saved."""

    def __init__(
        self,
        model: nn.Module,
        data: PackedDataset,
        args: TrainingArguments,
        eval_data: PackedDataset | None,
        tokenizer: Any,
        world: World,
    ) -> None:
        self.args, self.data, self.eval_data, self.tokenizer, self.world = (
            args,
            data,
            eval_data,
            tokenizer,
            world,
        )
        self.out = Path(args.output_dir)
        self.source = getattr(getattr(model, "config", None), "name_or_path", None)  # where it was read
        model.to(world.device)
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = apply_lora(model, args.lora) if args.lora is not None else model
        check_trainable(self.model)
        self.model.train()
        self.per_step = args.batch_size * args.grad_accum * world.size
        self.total = total_steps(args, len(data), self.per_step)
        self.rows = _Rows(data, args.seed, self.per_step)
        self.eval_every = args.eval_every
        if eval_data is not None and self.eval_every is None:
            self.eval_every = max(1, math.ceil(self.total / EVALS_PER_RUN))
        self.bar: Any = None
        checkpoint = checkpoints.find_checkpoint(args.resume) if args.resume else None
        state = None
        if checkpoint is not None:  # checked whole before anything is loaded or trained
            state = checkpoints.load_state(checkpoint, self.total)
            self._load_weights(checkpoint)  # before sharding: every process reads the whole weights
        self.wrapped = wrap(self.model, world, args.fsdp)
        # After wrapping: FSDP replaces the parameters by their shards, which the optimizer must hold.
        self.optimizer = make_optimizer(self.model, args.lr, args.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, args.schedule, args.warmup, self.total)
        self.autocast = _autocast(args, world.device)
        self.scaler = torch.amp.GradScaler("cuda") if args.mixed_precision == "fp16" else None
        self.step = 0
        if checkpoint is not None:
            self._resume(checkpoint / checkpoints.STATE_FILE, state)
        self.metrics: list[dict[str, Any]] = []

    # ----- the loop ---------------------------------------------------------------------------------

    def loop(self) -> TrainResult:
        args, world = self.args, self.world
        if world.is_main:
            if args.overwrite_output_dir:  # after every check: nothing is removed for a refused run
                in_place = bool(self.source) and same_directory(self.source, self.out)
                clear_earlier_run(self.out, keep_adapter=in_place)
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_saves(self.out)  # what saves of killed runs left behind
        self.bar = bar = self._progress()
        loss = eval_loss = None
        while self.step < self.total:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # what this step uses
            loss, grad_norm = self._one_step()
            self.step += 1
            seconds = time.perf_counter() - started
            record = {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": self.per_step * self.data.seq_len / seconds,
            }
            if self.step % args.log_every == 0 or self.step == self.total:
                self._log(record)
            if self.eval_data is not None and self.step % self.eval_every == 0:
                eval_loss = self._evaluate()
            if args.save_every and self.step % args.save_every == 0:
                self._save_checkpoint()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
        if bar is not None:
            bar.close()
        if self.eval_data is not None and self.step % self.eval_every:
            eval_loss = self._evaluate()
        self._save_result()
        return TrainResult(self.model, self.step, loss, eval_loss, self.metrics)

    def _one_step(self) -> tuple[float, float | None]:
        args, world = self.args, self.world
        rows = self.rows.of_step(self.step).view(args.grad_accum, world.size, args.batch_size)
        count = count_targets(self.data.rows(rows.flatten())[1])  # every process counts the whole step
        summed = torch.zeros((), dtype=torch.float64, device=world.device)
        for micro in range(args.grad_accum):
            ids, labels = self.data.rows(rows[micro, world.rank])
            with no_sync(self.wrapped, micro == args.grad_accum - 1), self.autocast:
                loss, _ = token_loss_sum(self.wrapped, ids.to(world.device), labels)
            # DDP averages gradients over the processes: scale by their number to get the step's mean.
            scaled = loss * (world.size / max(count, 1))
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            summed += loss.detach().double()
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if args.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(world.sum(summed)) / max(count, 1), grad_norm

    def _evaluate(self) -> float:
        batch = self.args.eval_batch_size or self.args.batch_size
        loss = evaluate(self.wrapped, self.eval_data, batch, self.world, self.autocast)
        perplexity = math.exp(min(loss, 700))
        self._log({"step": self.step, "eval_loss": loss, "eval_perplexity": perplexity})
        if self.world.is_main:  # as it goes, on stderr (above the progress bar when there is one)
            line = f"step {self.step}/{self.total}: held-out loss {loss:.4f}, perplexity {perplexity:.2f}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        return loss

    # ----- logging, saving, resuming ---------------------------------------------------------------

    def _progress(self) -> Any:
        if not (self.args.progress and self.world.is_main):
            return None
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal only, so that logs and pipes get the held-out lines alone
        return tqdm(total=self.total, initial=self.step, desc="training", unit=" steps", disable=None)

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.world.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _model_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole weights, gathered from every process (all must call this); else
        None: the model's own ``state_dict``."""
        if not self.args.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name and whole (gathered under FSDP), so that it
        resumes with or without FSDP and on any number of processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=whole)

    def _write_weights(self, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
        """The model (or adapter) and the tokenizer in their usual formats (rank 0), into the fresh
        ``directory`` that a checkpoint or the final save swaps in afterwards."""
        from neoxja.network import GPTNeoXJapanesePreTrainedModel

        if isinstance(self.model, GPTNeoXJapanesePreTrainedModel):
            write_pretrained(self.model, directory, state_dict=state)
        else:  # peft's model: the adapter
            self.model.save_pretrained(directory, state_dict=state)
        adapter = directory / "adapter_model.safetensors"
        if adapter.is_file():  # peft writes it through safetensors, which makes 0600 files
            os.chmod(adapter, new_file_mode(directory))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def _save_checkpoint(self) -> None:
        weights, optimizer = self._model_state(), self._optimizer_state()
        if not self.world.is_main:
            return
        state = {
            "step": self.step,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoints.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "total_steps": self.total,
            "world_size": self.world.size,
        }
        saved = checkpoints.save_checkpoint(
            self.out, self.step, lambda d: self._write_weights(d, weights), state
        )
        if self.args.save_total_limit is not None:
            checkpoints.prune_checkpoints(self.out, self.args.save_total_limit, saved)

    def _resume(self, path: Path, state: dict[str, Any]) -> None:
        """Restore optimizer, schedule, scaler and random state from ``state`` (read from ``path``),
        after checking that the optimizer state fits this model's parameters."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(param): name for name, param in self.model.named_parameters()}
        groups = [
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[id(p)] for p in group["params"]],
            }
            for group in self.optimizer.param_groups
        ]
        shapes = {name: param.shape for name, param in self.model.named_parameters()}
        checkpoints.check_optimizer_state(state["optimizer"], {"param_groups": groups}, shapes, path)
        whole = StateDictOptions(full_state_dict=True)
        restore = [
            (
                "'optimizer'",
                lambda: set_optimizer_state_dict(
                    self.model, self.optimizer, state["optimizer"], options=whole
                ),
            ),
            ("'scheduler'", lambda: self.scheduler.load_state_dict(state["scheduler"])),
        ]
        if self.scaler is not None and state.get("scaler"):
            restore.append(("'scaler'", lambda: self.scaler.load_state_dict(state["scaler"])))
        if (
            state.get("world_size", 1) == self.world.size
        ):  # another world size draws dropout differently anyway
            restore.append(("'rng'", lambda: checkpoints.set_rng_state(state["rng"])))
        for key, apply in restore:
            try:
                apply()
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
                raise ValueError(f"{path}: {key} cannot be restored ({str(err).splitlines()[0]})") from err
        self.step = state["step"]
        # The schedule of this run's steps, at the resumed step: with a larger --steps than the run
        # that saved it, the rest follows the longer schedule (no step at the old end's lr, no jump
        # after it); with the same steps this is the lr that the saved scheduler set.
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(self.step)

    def _load_weights(self, checkpoint: Path) -> None:
        """The weights of ``checkpoint`` into the model, each name and shape checked (file named)."""
        if self.args.lora is not None:
            self._load_adapter(checkpoint)
            return
        from neoxja.checkpoint import find_weight_files, iter_checkpoint
        from neoxja.hub import HubOptions

        # The reader from_pretrained uses: any layout save_pretrained wrote (shards included), checked.
        expected = self.model.state_dict()
        state: dict[str, torch.Tensor] = {}
        for path, name, tensor in iter_checkpoint(find_weight_files(checkpoint, HubOptions())):
            if name not in expected:
                raise ValueError(f"{path}: {name} is not a weight of the model being trained")
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{path}: {name} has shape {list(tensor.shape)}, the model's {list(expected[name].shape)}"
                )
            state[name] = tensor
        tied = getattr(self.model.config, "tie_word_embeddings", True)
        missing = [key for key in expected if key not in state and not (tied and key == "embed_out.weight")]
        if missing:
            raise ValueError(
                f"{checkpoint}: the checkpoint lacks weights of the model: {', '.join(missing[:10])}"
            )
        self.model.load_state_dict(state, strict=False)
        self.model.tie_weights()

    def _load_adapter(self, checkpoint: Path) -> None:
        """The LoRA weights of ``checkpoint`` (peft's ``adapter_model.safetensors``) into the model."""
        from peft import set_peft_model_state_dict

        from neoxja.checkpoint_files import iter_safetensors

        path = checkpoint / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors (not a LoRA checkpoint)")
        try:
            result = set_peft_model_state_dict(self.model, dict(iter_safetensors(path)))
        except RuntimeError as err:  # shapes of another rank or target set
            raise ValueError(f"{path}: does not fit this LoRA setup ({str(err).splitlines()[0]})") from err
        if result.unexpected_keys:
            raise ValueError(
                f"{path}: tensors this LoRA setup lacks: {', '.join(result.unexpected_keys[:10])}"
            )
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing:
            raise ValueError(f"{path}: lacks LoRA weights of this setup: {', '.join(missing[:10])}")

    def _save_result(self) -> None:
        """The result replaces ``--out`` in one step (the run's other files carried over), so that an
        interrupted save never leaves a directory without a model, even when ``--out`` is ``--model``."""
        weights = self._model_state()
        if self.world.is_main:
            with replace_directory(self.out) as staging:
                self._write_weights(staging, weights)
                summary = {"step": self.step, "args": asdict(self.args)}
                text = json.dumps(summary, indent=2, default=str) + "\n"
                (staging / "training_args.json").write_text(text, encoding="utf-8")
