"""Chat records in training data: ``{"messages": [{"role": ..., "content": ...}, ...]}`` JSONL lines,
the format of mlx_lm.lora and TRL.

A conversation is rendered to text by the tokenizer's chat template
(``tokenizer.apply_chat_template(messages, tokenize=False)``: the template ``neoxja chat`` and
``neoxja serve`` render prompts with), so a model learns the transcript it is later prompted with.
The loss covers the assistant's turns only (TRL's ``assistant_only_loss``, mlx_lm's
``--mask-prompt``), as it covers a completion only: each assistant turn is learnt as the reply to
the prompt the template renders for it (``add_generation_prompt=True``), and the other turns are
context. The end-of-text token after the conversation carries a loss, as after any document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from neoxja.tuner.data_files import DataError, Text

ROLES = ("system", "user", "assistant")

# render(messages, add_generation_prompt) -> text
Render = Callable[[list[dict[str, str]], bool], str]


def chat_renderer(tokenizer: Any) -> Render:
    """``render(messages, add_generation_prompt)`` through ``tokenizer.apply_chat_template``."""
    apply = getattr(tokenizer, "apply_chat_template", None)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if apply is None:
            raise DataError(f"{type(tokenizer).__name__} has no apply_chat_template to render chat records")
        return apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """The conversation of a record's ``"messages"``; a :class:`DataError` naming ``where`` (file:line)
    and the message when it is not a list of ``{"role", "content"}`` objects with known roles and
    string contents, has no assistant turn to learn from, or starts with one (it has no prompt)."""
    if not isinstance(value, list) or not value:
        found = f"an empty {type(value).__name__}" if value == [] else f"a {type(value).__name__}"
        raise DataError(f'{where}: "messages" must be a non-empty list of messages, found {found}')
    messages = []
    for number, message in enumerate(value):
        at = f"{where}: messages[{number}]"
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise DataError(f'{at} must be an object with "role" and "content", found a {kind}')
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise DataError(f'{at} has keys other than "role" and "content": {", ".join(map(repr, extra))}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role must be one of {', '.join(ROLES)}, found {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}: content must be a string, found {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    if (
        messages[0]["role"] == "assistant"
    ):  # its prompt would be an empty conversation, which no template renders
        raise DataError(f"{where}: messages[0] is an assistant turn: start with a system or user message")
    return messages


def chat_texts(messages: list[dict[str, str]], render: Render, where: str) -> Iterator[Text]:
    """The conversation as :class:`Text` parts: what precedes each assistant turn (up to the
    generation prompt) without loss, the turn with loss, what follows without loss."""

    def text(upto: int, add_generation_prompt: bool) -> str:
        try:
            return render(messages[:upto], add_generation_prompt)
        except ImportError as err:  # no jinja2: the message says what to install
            raise DataError(f"{where}: {err}") from None
        except (ValueError, TypeError) as err:
            raise DataError(f"{where}: the chat template cannot render this record ({err})") from None
        except Exception as err:  # the template's own errors (jinja2's TemplateError, raise_exception)
            if not type(err).__module__.startswith("jinja2"):
                raise
            raise DataError(f"{where}: the chat template cannot render this record ({err})") from None

    done = ""  # the rendered text handed out so far
    turns = [number for number, message in enumerate(messages) if message["role"] == "assistant"]
    for number in turns:
        prompt, whole = text(number, True), text(number + 1, False)
        if not (prompt.startswith(done) and whole.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render messages[{number}] (an assistant turn) as a "
                f"continuation of its prompt, so its text cannot be told apart for the loss"
            )
        if len(prompt) > len(done):
            yield Text(prompt[len(done) :], loss=False, document_ends=False, source=where)
        yield Text(whole[len(prompt) :], document_ends=False, source=where)
        done = whole
    rest = text(len(messages), False)
    if not rest.startswith(done):
        raise DataError(f"{where}: the chat template renders the whole conversation unlike its start")
    yield Text(rest[len(done) :], loss=False, source=where)
