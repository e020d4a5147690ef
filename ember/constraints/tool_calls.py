"""OpenAI function calling: the request's tools, the grammar of a forced call, and reading calls back.

A `ToolPlan` is built once per request from `tools`, `tool_choice` and
`parallel_tool_calls`. It decides three things:

- the *format* the model writes calls in: `"hermes"` (`<tool_call>\\n{json}\\n</tool_call>`
  blocks, for chat templates that use those tags: Qwen2.5, Hermes, SmolLM3...) or
  `"json"` (a bare JSON array of calls `[{"name": ..., "arguments": {...}}]`, or one
  object when parallel calls are off: what the fallback prompt asks for, and what
  Llama-3-style templates produce);
- for `tool_choice` "required" or a named function, the grammar that forces a call
  whose `arguments` validate against the function's `parameters` schema;
- how to turn the finished text back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ember.errors import InvalidRequestError

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_CALLS = 8  # calls in one forced reply: a small model otherwise repeats its call until max_tokens
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# The schema options the forced-call grammar compiles with (compact JSON, no free whitespace).
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolFunction:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema for the arguments object

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolPlan:
    functions: list[ToolFunction]
    choice: str  # "auto", "none", "required" or "function"
    forced_name: str | None  # with choice "function": the one function to call
    parallel: bool  # several calls in one reply
    format: str  # "json" or "hermes"

    @property
    def active(self) -> bool:
        """Whether tools take part at all (False for no tools, or tool_choice "none")."""
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call (then it is constrained and always parses)."""
        return self.active and self.choice in ("required", "function")

    def function(self, name: str) -> ToolFunction | None:
        return next((f for f in self.functions if f.name == name), None)

    def forced_grammar(self) -> tuple[str, Any] | None:
        """For a forced call: ("json_schema", schema) or ("grammar", lark text); None otherwise."""
        if not self.forced:
            return None
        targets = [self.function(self.forced_name)] if self.choice == "function" else self.functions
        calls = [_call_schema(f) for f in targets]
        one_call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.format == "hermes":
            block = " ".join(
                [json.dumps(HERMES_OPEN + "\n"), "%json", json.dumps({**one_call, "x-guidance": _X_GUIDANCE})]
            )
            repeat = " call?" * (MAX_CALLS - 1) if self.parallel else ""
            return (
                "grammar",
                f"start: call{repeat}\ncall: {block} {json.dumps(chr(10) + HERMES_CLOSE + chr(10))}",
            )
        if self.parallel:
            return "json_schema", {"type": "array", "items": one_call, "minItems": 1, "maxItems": MAX_CALLS}
        return "json_schema", one_call

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished reply; calls that do not parse stay in the content."""
        if not self.active:
            return text, []
        if self.format == "hermes":
            found = [
                (match, _call_from_value(self, _loads(match.group(1))))
                for match in _HERMES_BLOCK.finditer(text)
            ]
            calls = [call for _, call in found if call is not None]
            if not calls:
                return text, []
            content = _HERMES_BLOCK.sub(
                lambda m: "" if _call_from_value(self, _loads(m.group(1))) else m.group(0), text
            )
            return content.strip() or None, calls
        stripped = text.strip()
        if not stripped.startswith(("[", "{")):
            return text, []
        try:
            value, end = json.JSONDecoder().raw_decode(stripped)
        except json.JSONDecodeError:
            return text, []
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        values = value if isinstance(value, list) else [value]
        calls = [_call_from_value(self, v) for v in values]
        if not calls or any(call is None for call in calls):
            return text, []
        rest = stripped[end:].strip()
        return rest or None, calls


def tool_plan(
    tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None, *, chat_template: str | None = None
) -> ToolPlan:
    """Validate the request's tool fields (InvalidRequestError names the field) into a plan."""
    functions = _functions(tools)
    choice, forced_name = _choice(tool_choice, functions)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("parallel_tool_calls must be a boolean")
    template = chat_template or ""
    call_format = "hermes" if HERMES_OPEN in template else "json"
    # A named function is one call (as OpenAI does); otherwise several unless the request says not.
    parallel = parallel_tool_calls is not False and choice != "function"
    return ToolPlan(functions, choice, forced_name, parallel, call_format)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_call_object(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _functions(tools: Any) -> list[ToolFunction]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of {type: function, function: {...}} objects")
    functions: list[ToolFunction] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"{where} must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if any(f.name == name for f in functions):
            raise InvalidRequestError(f"{where}.function.name {name!r} is defined twice")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description must be a string")
        functions.append(ToolFunction(name, description, parameters))
    return functions


def _choice(tool_choice: Any, functions: list[ToolFunction]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if functions else "none"), None
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not functions:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool in tools")
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        name = (
            (tool_choice.get("function") or {}).get("name")
            if isinstance(tool_choice.get("function"), dict)
            else None
        )
        if not isinstance(name, str):
            raise InvalidRequestError("tool_choice.function.name must be a string")
        if not any(f.name == name for f in functions):
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools")
        return "function", name
    raise InvalidRequestError(
        "tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}"
    )


def _call_schema(function: ToolFunction) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call_from_value(plan: ToolPlan, value: Any) -> dict[str, Any] | None:
    """An OpenAI tool call from {"name", "arguments"} (or "parameters"), when the name is a known tool."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if plan.function(value["name"]) is None:
        return None
    if plan.choice == "function" and value["name"] != plan.forced_name:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        parsed = _loads(arguments)
        if not isinstance(parsed, dict):
            return None
        arguments = parsed
    if not isinstance(arguments, dict):
        return None
    return tool_call_object(value["name"], json.dumps(arguments, ensure_ascii=False))
