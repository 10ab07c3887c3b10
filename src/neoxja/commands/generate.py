"""``neoxja generate`` (continue one prompt) and ``neoxja chat`` (continue text interactively).

Both stream the continuation to stdout as it is decoded. Length and sampling options are checked
by the Python API's own rules (``GenerationConfig.validate``) before any model is loaded, and a bad
value is reported with its option name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxja.hub import DEFAULT_MODEL, HubUnavailableError

if TYPE_CHECKING:
    import torch

GENERATE_EPILOG = """\
examples:
  neoxja generate "人とAIが協調するためには、"
  neoxja generate --model ./my-model --max-new-tokens 64 --temperature 0 "吾輩は猫である。"
  echo "今日はいい天気ですね。" | neoxja generate --seed 0 -
"""

CHAT_EPILOG = """\
Type text and press Enter: the model continues it. Ctrl-C stops the current generation (not the
program); an empty line or Ctrl-D quits. By default the conversation so far is kept as context.

example:
  neoxja chat --model ./my-model --max-new-tokens 100
"""


def device_argument(text: str) -> torch.device:
    """``--device``: an index (``0``, ``-1``) or a name, checked at once by ``neoxja.devices``."""
    from neoxja.devices import resolve_device

    try:
        return resolve_device(int(text) if text.lstrip("-").isdigit() else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` (int or float) that must be above 0."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def add_model_arguments(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    """--model/--tokenizer/--dtype/--device (and --quantize), shared by the commands that load a model."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id or local model directory (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory or Hub id, if the model directory has none"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16", "auto"),
        help="weights' dtype (default: float32 on CPU, as stored on GPU)",
    )
    parser.add_argument(
        "--device",
        type=device_argument,
        default=None,
        help="auto, cpu, cuda, cuda:1, a GPU index (0, 1, ...) or -1 for the CPU (default: auto)",
    )
    if quantize:
        parser.add_argument(
            "--quantize",
            default=None,
            choices=("nf4", "fp4", "int8", "bfloat16"),
            help="store the linear layers in this format, quantized as they load (default: as saved)",
        )


def check_directories(args: argparse.Namespace) -> None:
    """Refuse a file given as ``--model``/``--tokenizer``: they name a directory (or a Hub id)."""
    for option in ("model", "tokenizer"):
        path = getattr(args, option, None)
        if path is not None and Path(path).is_file():
            raise ValueError(f"--{option} {path} is a file: pass its directory")


def read_text(text: str) -> str:
    """A TEXT/PROMPT argument; ``-`` reads stdin, without the newline that ends it (echo, a file)."""
    return sys.stdin.read().removesuffix("\n") if text == "-" else text


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Length and sampling options passed to ``model.generate`` (checked by :func:`generation_settings`)."""
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature; 0 means greedy decoding (default: 0.7)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="keep the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


# The options of add_sampling_arguments that are GenerationConfig settings of the same name.
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``generate`` settings of the options, checked by ``GenerationConfig.validate`` and
    ``check_seed`` (the Python API's rules) before any model is loaded; errors name the option."""
    from neoxja.generation_config import GenerationConfig, check_seed
    from neoxja.pipelines import SAMPLING_ARGS

    settings = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    settings["do_sample"] = args.temperature > 0
    try:
        GenerationConfig(**settings).validate()
        if args.seed is not None:
            check_seed(args.seed)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        if name in (*SETTINGS, "seed"):
            raise ValueError(f"--{name.replace('_', '-')} {rest}") from err
        raise
    if not settings["do_sample"]:
        settings = {name: value for name, value in settings.items() if name not in SAMPLING_ARGS}
    return settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` and ``chat`` sub-commands."""
    generate = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue PROMPT with the model, streaming the continuation to stdout as it comes.",
        epilog=GENERATE_EPILOG,
    )
    generate.add_argument("prompt", metavar="PROMPT", help="text to continue, or - to read it from stdin")
    add_model_arguments(generate)
    add_sampling_arguments(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="interactive loop: type text, the model continues it",
        description="Interactive text continuation with a loaded model.",
        epilog=CHAT_EPILOG,
    )
    add_model_arguments(chat)
    add_sampling_arguments(chat)
    chat.add_argument(
        "--fresh", action="store_true", help="continue each line on its own instead of the whole conversation"
    )
    chat.set_defaults(func=run_chat)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, str]:
    """Where to load the model (``--device``, default ``auto``) and in which dtype (``--dtype``)."""
    from neoxja.devices import resolve_device

    device = resolve_device(args.device, default="auto")
    # Half-precision matmuls are slow on CPUs, so there the stored dtype is only used when asked for.
    return device, args.dtype or ("float32" if device.type == "cpu" else "auto")


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and tokenizer named by ``--model``/``--tokenizer``/``--dtype``/``--device``."""
    from neoxja.pipelines import load_model_and_tokenizer

    check_directories(args)
    device, dtype = device_and_dtype(args)
    try:
        quantize = {"weight_format": args.quantize} if getattr(args, "quantize", None) else {}
        model, tokenizer = load_model_and_tokenizer(
            args.model, args.tokenizer, dtype=dtype, device=device, **quantize
        )
    except HubUnavailableError as err:
        raise HubUnavailableError(
            f"{err} For example: neoxja {args.command} --model /path/to/gpt-neox-japanese-2.7b ... "
            f"(a directory with config.json, the weights, vocab.txt and emoji.json)."
        ) from err
    return model, tokenizer


def generate_kwargs(settings: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments: the checked settings and the tokenizer's pad id."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        return dict(settings)
    return {**settings, "pad_token_id": tokenizer.pad_token_id}


def stream(model: Any, tokenizer: Any, input_ids: Any, kwargs: dict[str, Any], shown: list[str]) -> None:
    """Generate from ``input_ids`` (1 x T), writing the new text to stdout as it comes.

    Each piece is also appended to ``shown``, so after a Ctrl-C the caller knows what was printed.
    """
    from neoxja.generation import stream_generate

    for piece in stream_generate(model, tokenizer, input_ids.to(model.device), **kwargs):
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    """``neoxja generate``: print the continuation of PROMPT (after a Ctrl-C, end the line; 130)."""
    import torch

    prompt = read_text(args.prompt)
    if not prompt.strip():
        raise ValueError("PROMPT is empty; give some text for the model to continue")
    settings = generation_settings(args)
    model, tokenizer = load(args)
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    kwargs = generate_kwargs(settings, tokenizer)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    try:
        stream(model, tokenizer, input_ids, kwargs, [])
    except KeyboardInterrupt:
        print()
        return 130
    print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """``neoxja chat``: read a line, continue it (and the conversation so far), repeat."""
    import torch

    settings = generation_settings(args)
    model, tokenizer = load(args)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kwargs = generate_kwargs(settings, tokenizer)
    max_positions = model.config.max_position_embeddings
    keep = max_positions - args.max_new_tokens
    if keep <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context")
    print("Type text to continue; Ctrl-C stops a generation, an empty line or Ctrl-D quits.", file=sys.stderr)
    history = ""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line.strip():
            return 0
        history = line if args.fresh else history + line
        ids = tokenizer.encode(history)
        if len(ids) > keep:
            print(f"[context: keeping the last {keep} of {len(ids)} tokens]", file=sys.stderr)
            ids = ids[-keep:]
        shown: list[str] = []
        try:
            stream(model, tokenizer, torch.tensor([ids], dtype=torch.long), kwargs, shown)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        else:
            print()
        history += "".join(shown)  # what was printed stays in the context, even if interrupted
