"""Chat messages -> the text a chat model answers: OpenAI-style messages checked, then rendered by the model's
own chat template with the assistant turn opened.

Shared by `Engine.encode_chat` (generate, serve, bench) and the drafters' training data (`paradec.train.data`),
which has the target's tokenizer but no engine. The rendered text already holds the template's special tokens
(a BOS included, where the model has one): tokenize it with `add_special_tokens=False`.
"""

from __future__ import annotations

from paradec.errors import ParadecError

CHAT_ROLES = ("system", "user", "assistant", "tool")


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def check_messages(messages) -> None:
    """Raise `ParadecError` naming the first malformed message (`messages[i].role` / `.content`)."""
    if not isinstance(messages, (list, tuple)):
        raise ParadecError(
            f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {type(messages).__name__}"
        )
    if not messages:
        raise ParadecError("messages must not be empty: give at least one {'role': ..., 'content': ...} object")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ParadecError(f"messages[{index}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ParadecError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.60}")
        if not isinstance(content, str):
            raise ParadecError(f"messages[{index}].content must be a string, got {type(content).__name__}")


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The checked `messages` rendered by the tokenizer's chat template, ending with the assistant turn opened.
    The caller checks that the tokenizer has a template (its error names the model)."""
    from jinja2 import TemplateError

    check_messages(messages)
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise ParadecError(f"the chat template refused the messages: {exc}") from None
