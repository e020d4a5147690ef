"""The one call from the OpenAI routes into structured output (`ember.server.structured`).

Structured output (JSON mode, schemas, regex, grammars, choices, tool calls)
belongs to `ember/server/structured.py`, another module's job. The routes call
`plan_structured_output` once per request; when that module does not exist
yet, a request that actually uses one of its fields gets a 400 "not supported
yet", and every other request runs unconstrained.

The contract `ember.server.structured` implements:

    def plan(request, handle, endpoint) -> plan | None    (called only when a structured field is set)
        request:  the validated ChatCompletionRequest or CompletionRequest (pydantic, ember.server.protocol)
        handle:   the ModelHandle (tokenizer, engine.vocab_size ...)
        endpoint: "chat" or "completions"
        Returns None when the request asks for nothing structured; raises ApiError or an
        EmberError (-> 400) for a bad schema, grammar or tool definition.

    A plan may define any of these (the routes use defaults for what it leaves out):
        template_variables: dict         extra chat-template variables, e.g. {"tools": [...]}   (chat)
        messages: list[dict] | None      messages to render instead of the request's (fallback tool prompt)
        new_constraint() -> TokenConstraint | None   one fresh constraint per choice (engine contract)
        parse_reply(text, finish_reason) -> dict     the finished reply as {"content": str | None,
                                         "tool_calls": [...] (optional), "finish_reason": str (optional)}
        stream_parser() -> parser        per streamed choice: parser.feed(text) -> list of delta dicts
                                         ({"content": ...} or {"tool_calls": [...]}); parser.finish() ->
                                         list of final delta dicts; then parser.finish_reason (str or None
                                         to keep the engine's)
"""

from __future__ import annotations

import importlib
from typing import Any

from ember.handle import ModelHandle
from ember.server.errors import ApiError
from ember.server.protocol import SamplingFields

STRUCTURED_MODULE = "ember.server.structured"


def _structured_module() -> Any | None:
    try:
        return importlib.import_module(STRUCTURED_MODULE)
    except ModuleNotFoundError as error:
        if error.name != STRUCTURED_MODULE:
            raise
        return None


def plan_structured_output(request: SamplingFields, handle: ModelHandle, endpoint: str) -> Any | None:
    used = request.structured_fields_set()
    if not used:
        return None  # plain text: structured output is not consulted at all
    module = _structured_module()
    if module is None or not hasattr(module, "plan"):
        raise ApiError(
            400, f"{used[0]} is not supported yet by this server", param=used[0], code="not_supported"
        )
    return module.plan(request, handle, endpoint)
