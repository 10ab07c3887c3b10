"""The server's chat prompts: the tokenizer's chat templates (:mod:`neoxja.tokenizer.chat`) as one call.

The template, its default (:data:`DEFAULT_CHAT_TEMPLATE`, a plain Japanese transcript) and its stop
strings (:data:`DEFAULT_CHAT_STOPS`) live with the tokenizer, so that ``neoxja serve``, ``neoxja chat``
and ``tokenizer.apply_chat_template`` render the same prompt. ``neoxja serve --chat-template FILE``
replaces both (a custom template brings no stop strings; the request's ``stop`` still applies).
"""

from __future__ import annotations

from collections.abc import Callable

from neoxja.tokenizer.chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE, compile_template, render_chat

__all__ = ["DEFAULT_CHAT_STOPS", "DEFAULT_CHAT_TEMPLATE", "compile_chat_template"]


def compile_chat_template(
    template: str, bos_token: str | None = None, eos_token: str | None = None
) -> Callable[[list[dict[str, str]]], str]:
    """``render(messages) -> prompt text`` (ending in the reply's opening) for ``template``; a syntax
    error is raised here, at startup."""
    compile_template(template)
    specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(messages: list[dict[str, str]]) -> str:
        return render_chat(template, messages, add_generation_prompt=True, **specials)

    return render
