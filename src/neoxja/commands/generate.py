"""``neoxja generate`` (continue one prompt) and ``neoxja chat`` (continue text interactively).

Both stream the continuation to stdout as it is decoded. Sampling arguments are checked by
argparse, so a bad value is reported with its option name before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neoxja.hub import DEFAULT_MODEL, HubUnavailableError

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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--tokenizer/--dtype/--device, shared by the commands that load a model."""
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
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Length and sampling options passed to ``model.generate``."""
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=128, help="tokens to generate (default: 128)"
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.7,
        help="sampling temperature; 0 means greedy decoding (default: 0.7)",
    )
    parser.add_argument("--top-k", type=_non_negative_int, default=None, help="keep the K most likely tokens")
    parser.add_argument("--top-p", type=_probability, default=None, help="nucleus sampling, in (0, 1]")
    parser.add_argument(
        "--repetition-penalty", type=_positive_float, default=None, help="> 1 discourages repeats"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` and ``chat`` sub-commands."""
    generate = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue PROMPT with the model, streaming the continuation to stdout as it comes.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(chat)
    add_sampling_arguments(chat)
    chat.add_argument(
        "--fresh", action="store_true", help="continue each line on its own instead of the whole conversation"
    )
    chat.set_defaults(func=run_chat)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and tokenizer named by ``--model``/``--tokenizer``/``--dtype``/``--device``."""
    from neoxja.pipelines import load_model_and_tokenizer, resolve_device

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device)
    # Half-precision matmuls are slow on CPUs, so there the stored dtype is only used when asked for.
    dtype = args.dtype or ("float32" if device.type == "cpu" else "auto")
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, dtype=dtype, device=device)
    except HubUnavailableError as err:
        raise HubUnavailableError(
            f"{err} For example: neoxja {args.command} --model /path/to/gpt-neox-japanese-2.7b ... "
            f"(a directory with config.json, the weights, vocab.txt and emoji.json)."
        ) from err
    return model, tokenizer


def generate_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments from the command-line options."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
        if args.top_k is not None:
            kwargs["top_k"] = args.top_k
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if getattr(tokenizer, "pad_token_id", None) is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


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
    """``neoxja generate``: print the continuation of PROMPT."""
    import torch

    # From stdin, the newline that ends the input (echo, a file) is not part of the prompt.
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("PROMPT is empty; give some text for the model to continue")
    model, tokenizer = load(args)
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    kwargs = generate_kwargs(args, tokenizer)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    stream(model, tokenizer, input_ids, kwargs, [])
    print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """``neoxja chat``: read a line, continue it (and the conversation so far), repeat."""
    import torch

    model, tokenizer = load(args)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kwargs = generate_kwargs(args, tokenizer)
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
