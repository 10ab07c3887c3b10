"""``neoxja generate`` (continue one prompt) and ``neoxja chat`` (continue text interactively).

Both stream to stdout (assisted decoding too) except beam search, printed at the end. Options are
checked by the Python API's rules (``GenerationConfig.validate``, its table of bad combinations)
before a model loads, and errors name the options (:func:`in_option_words`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxja.hub import DEFAULT_MODEL, HubUnavailableError

if TYPE_CHECKING:
    import torch

GENERATE_EPILOG = """\
examples:
  neoxja generate "人とAIが協調するためには、"
  neoxja generate --model ./my-model --max-new-tokens 64 --temperature 0 "吾輩は猫である。"
  neoxja generate --min-p 0.05 --stop "。" --num-return-sequences 3 --seed 0 "昔々あるところに"
  echo "今日はいい天気ですね。" | neoxja generate --seed 0 --quiet -
  neoxja generate --temperature 0 --num-beams 4 --num-return-sequences 2 "吾輩は猫である。"
  neoxja generate --temperature 0 --prompt-lookup 10 "$(cat article.txt)要約:"

The continuation goes to stdout; on a terminal a summary follows on stderr (prompt and generated
tokens with tokens/s, peak memory): --verbose always prints it, --quiet never. Sampling defaults are
those of pipeline("text-generation"); --temperature 0 decodes greedily. With --num-beams the text
is printed at the end, not streamed (the best beam is only known then); --prompt-lookup and
--assistant-model stream as plain decoding does.
"""

CHAT_EPILOG = """\
Type a message and press Enter: the model answers it. The conversation is kept as messages and
rendered by the chat template the server uses (the tokenizer's chat_template, else neoxja's plain
"ユーザー: ... / アシスタント: ..." transcript, whose replies end before the next "ユーザー:"), so the
same conversation gives the same prompt here, in tokenizer.apply_chat_template and in neoxja serve.
--raw continues the typed text itself instead (the old behaviour). Ctrl-C stops the current reply
(not the program; what was shown stays in the conversation); an empty line or Ctrl-D quits.

examples:
  neoxja chat --model ./my-model --system "あなたは親切なアシスタントです。"
  neoxja chat --model ./my-model --chat-template my-template.jinja --max-new-tokens 100
  neoxja chat --model ./my-model --raw --fresh
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
    for option in ("model", "tokenizer", "assistant_model"):
        path = getattr(args, option, None)
        if path is not None and Path(path).is_file():
            raise ValueError(f"--{option.replace('_', '-')} {path} is a file: pass its directory")


def read_text(text: str) -> str:
    """A TEXT/PROMPT argument; ``-`` reads stdin, without the newline that ends it (echo, a file)."""
    return sys.stdin.read().removesuffix("\n") if text == "-" else text


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Length, sampling and stop options passed to ``model.generate`` (checked by
    :func:`generation_settings`); defaults from :data:`TEXT_GENERATION_DEFAULTS`, as ``pipeline()``."""
    from neoxja.generation_config import TEXT_GENERATION_DEFAULTS as DEFAULTS

    parser.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        default=DEFAULTS["max_new_tokens"],
        help="most tokens to generate (--max-tokens: mlx-lm's spelling)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULTS["temperature"],
        help="sampling temperature; 0 means greedy decoding",
    )
    model_default = "default: the model's generation_config.json, else {}"
    parser.add_argument(
        "--top-k", type=int, default=None, help=f"keep the K most likely tokens ({model_default.format(50)})"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help=f"nucleus sampling, in (0, 1] ({model_default.format(1.0)})"
    )
    parser.add_argument(
        "--min-p",
        type=float,
        metavar="P",
        default=None,
        help="keep tokens at least P times as likely as the most likely one, in [0, 1] "
        f"({model_default.format('off')})",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help=f"> 1 discourages repeats ({model_default.format('1.0, off')})",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help="end the text where STR first appears, STR left out (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    summary = parser.add_mutually_exclusive_group()
    summary.add_argument(
        "--verbose",
        dest="summary",
        action="store_const",
        const=True,
        help="print a summary on stderr after each generation: tokens, tokens/s, peak memory "
        "(default: generate prints it when stderr is a terminal, chat does not)",
    )
    summary.add_argument(
        "--quiet", dest="summary", action="store_const", const=False, help="never print the summary"
    )


def add_decoding_arguments(parser: argparse.ArgumentParser, beams: bool) -> None:
    """Beam search (``beams``: generate, whose output need not stream) and assisted decoding options."""
    model_default = "default: the model's generation_config.json, else {}"
    if beams:
        parser.add_argument(
            "--num-beams",
            type=int,
            metavar="N",
            default=1,
            help="beam search with N beams (1: none); the text is printed at the end, not streamed: the "
            "best beam is only known then. With --temperature 0 it is transformers' beam search, else "
            "beam sampling",
        )
        parser.add_argument(
            "--length-penalty",
            type=float,
            default=None,
            help="beam search: a beam's log-probability is divided by its length to this power (> 0 "
            f"favours longer texts, < 0 shorter; {model_default.format(1.0)})",
        )
        parser.add_argument(
            "--early-stopping",
            choices=("true", "false", "never"),
            default=None,
            help="beam search: stop when num-beams texts are finished (true), when a better one is unlikely "
            f"(false: transformers' heuristic) or when none can be better (never) "
            f"({model_default.format('false')})",
        )
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        default=None,
        help="prompt lookup decoding: draft N tokens copied from where the text's last words appeared "
        "before and verify them in one step; the same text as without it (greedy), faster when the "
        "output repeats the prompt (default: off)",
    )
    parser.add_argument(
        "--max-matching-ngram-size",
        type=int,
        metavar="N",
        default=None,
        help="prompt lookup: the longest n-gram searched for in the prompt (default: 2, transformers')",
    )
    parser.add_argument(
        "--assistant-model",
        metavar="PATH_OR_ID",
        default=None,
        help="a small model with the model's vocabulary that drafts tokens for --model to verify, several "
        "per step (a directory or Hub id, loaded with --dtype and --device, not quantized; default: none)",
    )


# The options that are GenerationConfig settings of the same name (those a command has).
SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "num_return_sequences",
    "num_beams",
    "length_penalty",
    "max_matching_ngram_size",
)
# The settings that only act when sampling; left out of a greedy run.
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")
# The generate() arguments that messages name, and the options that set them.
OPTIONS = {
    **{name: "--" + name.replace("_", "-") for name in SETTINGS},
    "early_stopping": "--early-stopping",
    "stop_strings": "--stop",
    "seed": "--seed",
    "prompt_lookup_num_tokens": "--prompt-lookup",
    "assistant_model": "--assistant-model",
}
_ARGUMENT = re.compile(r"\b(" + "|".join(OPTIONS) + r")\b(?:=([^\s:,;)]+))?")


def in_option_words(message: str) -> str:
    """A message of the Python API's rules with each argument spelt as the option that sets it:
    ``num_beams=2`` -> ``--num-beams 2``, ``do_sample=True`` -> ``sampling (--temperature > 0)``."""
    message = _ARGUMENT.sub(lambda m: OPTIONS[m[1]] + (f" {m[2]}" if m[2] else ""), message)
    return message.replace("do_sample=True", "sampling (--temperature > 0)")


# Stands for --assistant-model in the rules checked before it loads (its vocabulary is checked after).
ASSISTANT_TO_COME = object()


def streams(settings: dict[str, Any]) -> bool:
    """Whether the command streams the text: one sequence, no beam search."""
    return settings.get("num_beams", 1) == 1 and settings.get("num_return_sequences", 1) == 1


def check_settings(settings: dict[str, Any], assistant: Any = None, vocab_size: int | None = None) -> None:
    """``GenerationConfig.validate`` on the settings and the run (streamed or not, its assistant), its
    error in option words."""
    from neoxja.generation_config import DecodingRequest, GenerationConfig

    request = DecodingRequest(streaming=streams(settings), assistant_model=assistant, vocab_size=vocab_size)
    try:
        GenerationConfig(**settings).validate(request)
    except ValueError as err:
        raise ValueError(in_option_words(str(err))) from err


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``generate`` settings of the options, checked by ``GenerationConfig.validate`` and
    ``check_seed`` (the Python API's rules) before any model is loaded; errors name the options."""
    from neoxja.generation_config import check_seed

    settings = {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}
    settings["do_sample"] = args.temperature > 0
    if getattr(args, "early_stopping", None) is not None:
        settings["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, "never")
    if args.prompt_lookup is not None:
        settings["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.stop:
        if "" in args.stop:
            raise ValueError("--stop must be a non-empty string, got ''")
        settings["stop_strings"] = list(args.stop)
    check_settings(settings, ASSISTANT_TO_COME if args.assistant_model is not None else None)
    for name, needs, alone in (
        ("length_penalty", settings.get("num_beams", 1) > 1, "--num-beams N (N > 1)"),
        ("early_stopping", settings.get("num_beams", 1) > 1, "--num-beams N (N > 1)"),
        ("max_matching_ngram_size", "prompt_lookup_num_tokens" in settings, "--prompt-lookup N"),
    ):
        if name in settings and not needs:  # generate() would ignore it (with a warning)
            raise ValueError(f"{OPTIONS[name]} only acts with {alone}")
    if args.seed is not None:
        try:
            check_seed(args.seed)
        except ValueError as err:
            raise ValueError(in_option_words(str(err))) from err
    if not settings["do_sample"]:
        settings = {name: value for name, value in settings.items() if name not in SAMPLING_ONLY}
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
    add_decoding_arguments(generate, beams=True)
    generate.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        metavar="N",
        help="sample N continuations in one batch (with --num-beams: the N best beams), each printed "
        "after a line '--- i/N ---'",
    )
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="interactive chat with the model, using the server's chat template",
        description="Chat with a loaded model: each message and reply is kept and the conversation is "
        "rendered by the chat template (--raw: continue the typed text instead).",
        epilog=CHAT_EPILOG,
    )
    add_model_arguments(chat)
    add_sampling_arguments(chat)
    add_decoding_arguments(chat, beams=False)
    chat.add_argument(
        "--system", metavar="TEXT", default=None, help="a system message that opens the conversation"
    )
    chat.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Jinja chat template file, as for neoxja serve (default: the tokenizer's chat_template, "
        "else neoxja's transcript)",
    )
    chat.add_argument(
        "--raw", action="store_true", help="continue the typed text itself: no template, no roles"
    )
    chat.add_argument(
        "--fresh", action="store_true", help="answer (or continue) each line on its own, without the history"
    )
    chat.set_defaults(func=run_chat)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, str]:
    """Where to load the model (``--device``, default ``auto``) and in which dtype (``--dtype``)."""
    from neoxja.devices import resolve_device

    device = resolve_device(args.device, default="auto")
    # Half-precision matmuls are slow on CPUs, so there the stored dtype is only used when asked for.
    return device, args.dtype or ("float32" if device.type == "cpu" else "auto")


# What a command loading a model suggests when the Hub cannot be reached: a local directory.
MODEL_EXAMPLE = (
    "--model /path/to/gpt-neox-japanese-2.7b ... "
    "(a directory with config.json, the weights, vocab.txt and emoji.json)."
)


@contextmanager
def hub_example(example: str) -> Iterator[None]:
    """A :class:`HubUnavailableError` raised inside gets ``For example: <example>`` added: the
    command line that would work without the Hub."""
    try:
        yield
    except HubUnavailableError as err:
        raise HubUnavailableError(f"{err} For example: {example}") from err


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and tokenizer named by ``--model``/``--tokenizer``/``--dtype``/``--device``."""
    from neoxja.pipelines import load_model_and_tokenizer

    check_directories(args)
    device, dtype = device_and_dtype(args)
    with hub_example(f"neoxja {args.command} {MODEL_EXAMPLE}"):
        quantize = {"weight_format": args.quantize} if getattr(args, "quantize", None) else {}
        if quantize:
            from neoxja.quantization.loading import check_requested_format

            check_requested_format(args.model, args.quantize, "--quantize")  # worded for the CLI user
        model, tokenizer = load_model_and_tokenizer(
            args.model, args.tokenizer, dtype=dtype, device=device, **quantize
        )
    return model, tokenizer


def load_assistant(args: argparse.Namespace, settings: dict[str, Any], model: Any, tokenizer: Any) -> Any:
    """``--assistant-model`` loaded as ``--model`` is (same --dtype and --device, not quantized), the
    rules checked again with it (its vocabulary must be the model's); None without the option."""
    from neoxja.pipelines import load_model_and_tokenizer

    if args.assistant_model is None:
        return None
    device, dtype = device_and_dtype(args)
    assistant, _ = load_model_and_tokenizer(args.assistant_model, tokenizer, dtype=dtype, device=device)
    check_settings(settings, assistant, model.config.vocab_size)
    return assistant


def generate_kwargs(settings: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments: the checked settings and the tokenizer's pad id."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        return dict(settings)
    return {**settings, "pad_token_id": tokenizer.pad_token_id}


def show_summary(args: argparse.Namespace, default: bool) -> bool:
    """``--verbose``/``--quiet``, else ``default``."""
    return default if args.summary is None else args.summary


def run_generate(args: argparse.Namespace) -> int:
    """``neoxja generate``: print the continuation(s) of PROMPT (after a Ctrl-C, end the line; 130)."""
    import torch

    from neoxja.commands import textgen

    prompt = read_text(args.prompt)
    if not prompt.strip():
        raise ValueError("PROMPT is empty; give some text for the model to continue")
    settings = generation_settings(args)
    model, tokenizer = load(args)
    assistant = load_assistant(args, settings, model, tokenizer)
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    kwargs = generate_kwargs(settings, tokenizer)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    stops = list(args.stop or ())
    try:
        if not streams(settings):  # several sequences, or beams: printed when all are done
            texts, timing = textgen.generate_several(model, tokenizer, input_ids, kwargs, stops)
            for number, text in enumerate(texts, 1):
                if len(texts) > 1:
                    print(f"--- {number}/{len(texts)} ---")
                print(text)
        else:
            output = textgen.StreamedText(tokenizer, stops, textgen.write_stdout)
            timing = textgen.stream_one(model, tokenizer, input_ids, kwargs, output)
            print()
    except KeyboardInterrupt:
        print()
        return 130
    if show_summary(args, sys.stderr.isatty()):
        print(timing.summary(model.device), file=sys.stderr)
    return 0


def read_chat_template(args: argparse.Namespace) -> str | None:
    """``--chat-template FILE``'s text, compiled once here so that a bad file fails before the model loads."""
    if args.chat_template is None:
        return None
    try:
        template = args.chat_template.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--chat-template {args.chat_template}: {err.strerror}") from None
    check_template(template, f"--chat-template {args.chat_template}")
    return template


def check_template(template: str, source: str) -> None:
    """Compile ``template``; a syntax error, or jinja2 missing, is a ValueError naming ``source``."""
    from neoxja.tokenizer.chat import compile_template

    try:
        compile_template(template)
    except Exception as err:  # ImportError, or jinja2's TemplateSyntaxError (whose class needs jinja2)
        raise ValueError(f"{source}: {err}") from None


def chat_prompt(
    tokenizer: Any, template: str, messages: list[dict[str, str]], room: int
) -> tuple[list[int], list[dict[str, str]]]:
    """The ids of ``messages`` rendered for a reply and the messages kept: the oldest turns after the
    system message are dropped until the prompt fits in ``room`` tokens (ValueError if even the last
    message alone does not)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        kept = system + turns
        ids = tokenizer.apply_chat_template(kept, chat_template=template, add_generation_prompt=True)
        if len(ids) <= room:
            return ids, kept
        if len(turns) == 1:
            raise ValueError(
                f"this message makes a prompt of {len(ids)} tokens; the context leaves room for {room} "
                "(lower --max-new-tokens or write less)"
            )
        turns = turns[1:]


def run_chat(args: argparse.Namespace) -> int:
    """``neoxja chat``: read a message, answer it (the conversation so far as context), repeat."""
    import torch

    from neoxja.commands import textgen
    from neoxja.tokenizer.chat import chat_stops

    settings = generation_settings(args)
    template = None if args.raw else read_chat_template(args)
    if args.raw and (args.system is not None or args.chat_template is not None):
        raise ValueError("--raw continues plain text: --system and --chat-template need the chat template")
    model, tokenizer = load(args)
    assistant = load_assistant(args, settings, model, tokenizer)
    if not args.raw:
        template = template or tokenizer.get_chat_template()
        check_template(template, "the tokenizer's chat_template")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kwargs = generate_kwargs(settings, tokenizer)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    stops = list(args.stop or ()) + ([] if template is None else chat_stops(template))
    kwargs["stop_strings"] = stops or None
    room = model.config.max_position_embeddings - args.max_new_tokens
    if room <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context")
    print(
        "Type a message; Ctrl-C stops a reply, an empty line or Ctrl-D quits."
        if template is not None
        else "Type text to continue; Ctrl-C stops a generation, an empty line or Ctrl-D quits.",
        file=sys.stderr,
    )
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(system)
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
        if template is None:
            history = line if args.fresh else history + line
            ids = tokenizer.encode(history)
            if len(ids) > room:
                print(f"[context: keeping the last {room} of {len(ids)} tokens]", file=sys.stderr)
                ids = ids[-room:]
        else:
            asked = (system if args.fresh else messages) + [{"role": "user", "content": line}]
            try:
                ids, messages = chat_prompt(tokenizer, template, asked, room)
            except ValueError as err:
                print(f"[{err}]", file=sys.stderr)
                continue
        output = textgen.StreamedText(tokenizer, stops, textgen.write_stdout)
        try:
            textgen.stream_one(model, tokenizer, torch.tensor([ids], dtype=torch.long), kwargs, output)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        else:
            print()
            if show_summary(args, False) and output.timing is not None:
                print(output.timing.summary(model.device), file=sys.stderr)
        reply = "".join(output.shown)  # what was printed stays in the context, even if interrupted
        if template is None:
            history += reply
        else:
            messages.append({"role": "assistant", "content": reply})
