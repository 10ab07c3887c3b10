"""Chat prompts: messages rendered into one text by a Jinja template, as transformers' ``chat_template``.

abeja/gpt-neox-japanese-2.7b is a base model and ships no template, so the server has a documented
default, :data:`DEFAULT_CHAT_TEMPLATE`: a plain Japanese transcript (``ユーザー: ...`` /
``アシスタント: ...`` lines, a system message first as-is), ending with ``アシスタント: `` for the reply.
The model would go on writing the next user turn, so :data:`DEFAULT_CHAT_STOPS` ends the reply there.
``neoxja serve --chat-template FILE`` replaces both (a custom template brings no stop strings; the
request's ``stop`` still applies). Templates run in Jinja's sandbox and see ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``raise_exception``.
"""

from __future__ import annotations

from collections.abc import Callable

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


def compile_chat_template(
    template: str, bos_token: str | None = None, eos_token: str | None = None
) -> Callable[[list[dict[str, str]]], str]:
    """``render(messages) -> prompt text`` for ``template``; a syntax error is raised here, at startup."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    compiled = environment.from_string(template)
    specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(
            messages=messages, add_generation_prompt=True, raise_exception=raise_exception, **specials
        )

    return render
