"""Chat messages -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

import weakref
from typing import Any

from ember.chat_template import ChatTemplate
from ember.handle import ModelHandle
from ember.server.errors import ApiError
from ember.server.protocol import ChatMessage

_templates: weakref.WeakKeyDictionary[ModelHandle, ChatTemplate] = weakref.WeakKeyDictionary()


def chat_template(handle: ModelHandle) -> ChatTemplate:
    """The handle's template, compiled once."""
    template = _templates.get(handle)
    if template is None:
        template = _templates[handle] = ChatTemplate.for_tokenizer(handle.tokenizer)
    return template


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the template expects them: text content, `developer` read as `system`."""
    result = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            pieces = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ApiError(
                        400,
                        f"messages.{index}.content: only text parts are supported, not {part.type!r}",
                        param=f"messages.{index}.content",
                        code="unsupported_content",
                    )
                pieces.append(part.text)
            content = "".join(pieces)
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content if content is not None else "",
        }
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def render_chat_prompt(
    handle: ModelHandle,
    messages: list[ChatMessage] | list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **template_variables: Any,
) -> list[int]:
    """Token ids of the rendered conversation (bos only where wanted and not already written)."""
    dicts = [m if isinstance(m, dict) else None for m in messages]
    if any(d is None for d in dicts):
        dicts = message_dicts(messages)  # type: ignore[arg-type]
    text = chat_template(handle).render(
        dicts, add_generation_prompt=add_generation_prompt, **template_variables
    )
    return handle.encode(text)
