"""OpenAI's structured-output and tool fields -> an ember constraint, prompt and reply parser.

The routes call `plan(request, handle, endpoint)` once per request (through
`structured_hook.py`, whose docstring is the contract) when any of these
fields is set:

- `response_format`: `{"type": "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}` (OpenAI);
- `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM's
  names) and `grammar` (llama.cpp's; GBNF or Lark);
- `tools`, `tool_choice`, `parallel_tool_calls` (chat only).

The returned plan gives each choice a fresh `TokenConstraint`, the messages
and template variables that put tools in the prompt, and parses the reply
(whole, or streamed as `delta.tool_calls`). Bad input raises `ApiError` 400
naming the field, with the grammar engine's message.
"""

from __future__ import annotations

from typing import Any

from ember.constraints import constraint_from_options
from ember.constraints.tool_calls import ToolPlan, tool_plan
from ember.constraints.tool_prompt import prepare_tool_messages, template_supports_tools
from ember.constraints.tool_stream import ToolCallStream
from ember.engine.sequence import TokenConstraint
from ember.errors import InvalidRequestError
from ember.server.errors import ApiError

# Request field -> the constraint_from_options argument it sets.
GUIDED_FIELDS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "grammar": "grammar",
}


class StructuredPlan:
    """One request's structured output: what to render, how to constrain, how to read the reply."""

    def __init__(
        self,
        tokenizer: Any,
        options: dict[str, Any] | None,
        param: str | None,
        tools: ToolPlan | None = None,
        messages: list[dict[str, Any]] | None = None,
        template_variables: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ):
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens  # the reply's budget as asked: JSON mode closes within it
        self._options = options  # constraint_from_options keywords, or None for free text
        self._param = param  # the request field the constraint came from, for error messages
        self.tools = tools
        self.messages = messages
        self.template_variables = template_variables or {}
        self.new_constraint()  # compile now (cached), so a bad schema fails before anything is queued

    def new_constraint(self, max_tokens: int | None = None) -> TokenConstraint | None:
        """A fresh constraint for one choice (each sequence advances its own).

        `max_tokens`: the reply's resolved budget, when the caller knows it (else the one the
        request asked for); JSON mode closes its object within it.
        """
        if self._options is None:
            return None
        budget = max_tokens if max_tokens is not None else self._max_tokens
        try:
            return constraint_from_options(self._tokenizer, **self._options, max_tokens=budget)
        except InvalidRequestError as error:
            raise ApiError(
                400, f"{self._param}: {error}", param=self._param, code="invalid_grammar"
            ) from None

    def parse_reply(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.tools is None or not self.tools.active:
            return {}
        content, calls = self.tools.parse(text)
        if not calls:
            return {"content": content}
        return {"content": content, "tool_calls": calls, "finish_reason": "tool_calls"}

    def stream_parser(self) -> ToolCallStream | None:
        if self.tools is None or not self.tools.active:
            return None
        return ToolCallStream(self.tools)


def plan(request: Any, handle: Any, endpoint: str) -> StructuredPlan | None:
    """The structured-output plan of a validated chat or completions request (None: nothing asked)."""
    tokenizer = handle.tokenizer
    options, param = output_options(request)
    tools = None
    messages = None
    variables: dict[str, Any] = {}
    if endpoint == "chat" and (getattr(request, "tools", None) or _has_tool_history(request)):
        template = tokenizer.chat_template
        try:
            tools = tool_plan(
                getattr(request, "tools", None),
                getattr(request, "tool_choice", None),
                getattr(request, "parallel_tool_calls", None),
                chat_template=template,
            )
        except InvalidRequestError as error:
            raise ApiError(400, str(error), param=_tool_param(str(error)), code="invalid_tools") from None
        from ember.server.prompts import message_dicts  # the server's own message flattening

        native = template_supports_tools(template)
        messages, variables = prepare_tool_messages(message_dicts(request.messages), tools, native=native)
        forced = tools.forced_grammar()
        if forced is not None:  # a forced call outranks response_format: the reply must be the call
            kind, value = forced
            options, param = {kind: value}, "tools"
    if options is None and tools is None:
        return None
    budget = _asked_max_tokens(request, endpoint)
    return StructuredPlan(tokenizer, options, param, tools, messages, variables, budget)


def _asked_max_tokens(request: Any, endpoint: str) -> int | None:
    """The reply's token budget when the request sets it (completions default to OpenAI's 16).

    Unset on chat, the budget is the rest of the context, which is not known before the prompt
    is rendered; JSON mode then closes in time only if the server passes the resolved budget.
    """
    asked = getattr(request, "max_completion_tokens", None) if endpoint == "chat" else None
    if asked is None:
        asked = getattr(request, "max_tokens", None)
    if asked is None and endpoint == "completions":
        from ember.server.openai_routes import COMPLETIONS_DEFAULT_MAX_TOKENS

        asked = COMPLETIONS_DEFAULT_MAX_TOKENS
    return asked if isinstance(asked, int) and asked > 0 else None


def output_options(request: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(constraint_from_options keywords, the field they came from) for response_format and guided_*."""
    found: list[tuple[str, dict[str, Any]]] = []
    response_format = getattr(request, "response_format", None)
    if response_format is not None:
        options = _response_format_options(response_format)
        if options is not None:
            found.append(("response_format", options))
    for field, keyword in GUIDED_FIELDS.items():
        value = getattr(request, field, None)
        if value is not None:
            found.append((field, {keyword: value}))
    if not found:
        return None, None
    if len(found) > 1:
        names = " and ".join(field for field, _ in found)
        raise ApiError(
            400, f"give one output constraint, not {names}", param=found[1][0], code="invalid_request"
        )
    return found[0][1], found[0][0]


def _response_format_options(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, dict):
        raise ApiError(400, "response_format must be an object", param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(
                400,
                "response_format.json_schema must be an object with a schema",
                param="response_format.json_schema",
            )
        schema = spec.get("schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ApiError(
                400, "response_format.json_schema.strict must be a boolean", param="response_format"
            )
        if schema is None:
            return {"json_object": True}
        return {"json_schema": schema, "strict": bool(strict)}
    raise ApiError(
        400,
        f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
        param="response_format.type",
    )


def _has_tool_history(request: Any) -> bool:
    return any(
        getattr(m, "role", None) == "tool" or getattr(m, "tool_calls", None)
        for m in getattr(request, "messages", [])
    )


def _tool_param(message: str) -> str:
    for name in ("tool_choice", "parallel_tool_calls", "tools"):
        if message.startswith(name):
            return name
    return "tools"
