"""Putting tools and tool results in front of the model: its own template when it knows tools, else ours.

A chat template that reads a `tools` variable (Qwen2.5, Llama 3.1, Hermes,
SmolLM3, Mistral's newer ones) was tuned with tool definitions in a form of
its own, so the definitions go to it untouched (`tools` as OpenAI sends
them) with assistant calls as HF templates expect them (`arguments` as an
object). For any other template (SmolLM2, TinyLlama, ChatML stand-ins) the
tools become a system-prompt text, `FALLBACK_TOOL_PROMPT`, that asks for a
bare JSON reply; earlier calls are shown as that JSON and each `tool` result
becomes a user message, so templates that insist on user/assistant turns
still render.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
import jinja2.meta

from ember.constraints.tool_calls import ToolPlan

FALLBACK_TOOL_PROMPT = """You can call functions. These are the functions available, as JSON schemas:
{functions}

To call {how}, reply with only this JSON and nothing else:
{example}
{when}"""

_WHEN = {
    "auto": "If no function is needed, answer normally in plain text.",
    "required": "You must call at least one function now.",
    "function": "You must call {name} now.",
}


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template reads a `tools` variable (parsed, never run)."""
    if not chat_template or "tools" not in chat_template:
        return False
    try:
        syntax = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(syntax)


def prepare_tool_messages(
    messages: list[dict[str, Any]], plan: ToolPlan, *, native: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages to render, extra template variables) for a chat request with tools or tool history."""
    if native:
        prepared = [_native_message(message) for message in messages]
        extra = {"tools": [f.to_openai() for f in plan.functions]} if plan.active else {}
        return prepared, extra
    prepared = _fallback_history(messages, plan)
    if plan.active:
        prompt = fallback_system_prompt(plan)
        if prepared and prepared[0].get("role") == "system":
            prepared[0] = {**prepared[0], "content": f"{_text(prepared[0].get('content'))}\n\n{prompt}"}
        else:
            prepared.insert(0, {"role": "system", "content": prompt})
    return prepared, {}


def fallback_system_prompt(plan: ToolPlan) -> str:
    functions = "\n".join(
        json.dumps(
            {"name": f.name, "description": f.description, "parameters": f.parameters}, ensure_ascii=False
        )
        for f in plan.functions
    )
    name = plan.forced_name or plan.functions[0].name
    one = f'{{"name": "{name}", "arguments": {{...}}}}'
    example = f"[{one}, ...]" if plan.parallel else one
    how = "one or more functions" if plan.parallel else "a function"
    when = _WHEN[plan.choice].format(name=plan.forced_name)
    return FALLBACK_TOOL_PROMPT.format(functions=functions, how=how, example=example, when=when)


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    message = dict(message)
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        message["tool_calls"] = [_native_call(call) for call in calls]
        if message.get("content") is None:
            message["content"] = ""
    if message.get("content") is None:
        message["content"] = ""
    return message


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # leave the text: the template shows what the client sent
    return {**call, "function": function}


def _fallback_history(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool_call_id -> function name, to label results
    prepared: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                names[call.get("id", "")] = function.get("name", "")
                arguments = function.get("arguments", "{}")
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError:
                    pass
                calls.append({"name": function.get("name", ""), "arguments": arguments})
            shown = calls if plan.parallel or len(calls) > 1 else calls[0]
            text = _text(message.get("content"))
            json_text = json.dumps(shown, ensure_ascii=False)
            prepared.append({"role": "assistant", "content": f"{text}\n{json_text}" if text else json_text})
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id", ""), "the function")
            line = f"Function result ({name}): {_text(message.get('content'))}"
            if prepared and prepared[-1].get("_tool_results"):
                prepared[-1]["content"] += "\n" + line
            else:
                prepared.append({"role": "user", "content": line, "_tool_results": True})
        else:
            prepared.append({**message, "content": _text(message.get("content"))})
    for message in prepared:
        message.pop("_tool_results", None)
    return prepared


def _text(content: Any) -> str:
    """Message content as text: a string, or OpenAI content parts of type text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
