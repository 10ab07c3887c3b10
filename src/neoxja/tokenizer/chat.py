"""Chat templates: messages rendered into one prompt by a Jinja template, as transformers' ``chat_template``.

abeja/gpt-neox-japanese-2.7b is a base model and ships no template, so neoxja has a documented
default, :data:`DEFAULT_CHAT_TEMPLATE`: a plain Japanese transcript (``ユーザー: ...`` /
``アシスタント: ...`` lines, a system message first as-is), ending with ``アシスタント: `` for the reply.
The model would go on writing the next user turn, so :data:`DEFAULT_CHAT_STOPS` ends a reply there
(a custom template brings no stop strings). ``tokenizer.apply_chat_template``, ``neoxja chat`` and
``neoxja serve`` all render through :func:`render_chat`, so one template gives one prompt everywhere,
the same text transformers' ``apply_chat_template`` renders from it.

Templates run in Jinja's immutable sandbox with transformers' settings (``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block that renders its body)
and see ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the tokenizer's special
tokens (``bos_token``, ...), ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that keeps
Japanese as it is. jinja2 comes with PyTorch; without it a clear ImportError says what to install.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}ユーザー: {{ message['content'] }}\n"
    "{% else %}アシスタント: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}アシスタント: {% endif %}"
)
DEFAULT_CHAT_STOPS = ["\nユーザー:"]

# Marks the end of the final message's content, so continue_final_message can cut the prompt there.
_CONTINUE_MARK = "\ue000neoxja-continue\ue000"


def chat_stops(template: str) -> list[str]:
    """The stop strings that end a reply rendered by ``template``: the default template's turn marker,
    none for any other template (its author knows its turns; a request's own stops still apply)."""
    return list(DEFAULT_CHAT_STOPS) if template == DEFAULT_CHAT_TEMPLATE else []


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """The compiled Jinja template (cached); a syntax error is a ``jinja2.TemplateError`` here."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise ImportError(
            'chat templates need jinja2: pip install jinja2 (or pip install "neoxja[server]")'
        ) from err

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant text): its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts with a string ``role`` (ValueError naming the bad item)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation is empty: give at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(
                f"message {i} must be a dict with a 'role' string and a 'content', got {message!r}"
            )
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """The prompt text ``template`` makes of ``messages`` (the variables the module docstring lists).

    ``continue_final_message`` ends the text right after the last message's content, so that the
    model continues that message (a prefilled reply) instead of closing it.
    """
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message do not go together: the first opens a new "
            "assistant message, the second continues the last one"
        )
    messages = check_messages(messages)
    if continue_final_message:
        last = messages[-1]
        if not isinstance(last.get("content"), str):
            raise ValueError("continue_final_message: the final message has no text 'content' to continue")
        messages[-1] = {**last, "content": last["content"] + _CONTINUE_MARK}
    text = compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
    if continue_final_message:
        if _CONTINUE_MARK not in text:
            raise ValueError("continue_final_message: the chat template does not write the final message")
        text = text[: text.rindex(_CONTINUE_MARK)].replace(_CONTINUE_MARK, "")
    return text


class ChatTemplateMixin:
    """``apply_chat_template`` and ``chat_template`` for the tokenizer (transformers' API)."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """The template to render with: ``chat_template``, else ``self.chat_template`` (from
        tokenizer_config.json), else :data:`DEFAULT_CHAT_TEMPLATE` (the model ships none)."""
        for template in (chat_template, self.chat_template):
            if template is not None:
                if not isinstance(template, str):
                    raise TypeError(f"chat_template must be a string (a Jinja template), got {template!r}")
                return template
        return DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render a conversation (a list of ``{"role", "content"}`` dicts; or a list of them) with the
        chat template, then tokenize it, as transformers' method of the same name.

        ``tokenize=False`` returns the text (a list of texts for a batch); otherwise the ids (no
        special tokens are added: the template writes any it wants), or with ``return_dict=True``
        the tokenizer's ``BatchEncoding`` (``input_ids``, ``attention_mask``). ``padding``,
        ``truncation``, ``max_length`` and ``return_tensors`` are the tokenizer's. Extra keyword
        arguments are template variables.
        """
        template = self.get_chat_template(chat_template)
        batched = (
            isinstance(conversation, Sequence)
            and not isinstance(conversation, (str, bytes))
            and len(conversation) > 0
            and isinstance(conversation[0], Sequence)
            and not isinstance(conversation[0], (str, bytes, Mapping))
        )
        conversations = list(conversation) if batched else [conversation]
        specials = {
            name: getattr(self, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        texts = [
            render_chat(
                template,
                chat,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                **{**specials, **kwargs},
            )
            for chat in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        encoded = self(  # type: ignore[operator]
            texts if batched else texts[0],
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        return encoded if return_dict else encoded["input_ids"]
