"""Tool calls and the server's structured-output plan without a model: fields, prompts, parsing, streams."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ember.constraints import constraint_from_options
from ember.constraints.tool_calls import tool_plan
from ember.constraints.tool_prompt import prepare_tool_messages, template_supports_tools
from ember.constraints.tool_stream import ToolCallStream
from ember.errors import InvalidRequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}},
}
HERMES_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}" + (
    "{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from ember.loader import read_checkpoint, resolve_model_path

    return read_checkpoint(resolve_model_path("smollm2")).tokenizer


@pytest.mark.parametrize(
    "tools, tool_choice, parallel, message",
    [
        ("nope", None, None, "tools must be a list"),
        ([{"type": "retrieval"}], None, None, r"tools\[0\] must be an object with type 'function'"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, None, r"tools\[0\].function.name"),
        ([WEATHER, WEATHER], None, None, "defined twice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": []}}],
            None,
            None,
            "parameters must be",
        ),
        ([WEATHER], {"type": "function", "function": {"name": "other"}}, None, "not in tools"),
        ([], "required", None, "needs at least one tool"),
        ([WEATHER], "sometimes", None, "tool_choice must be"),
        ([WEATHER], "auto", "yes", "parallel_tool_calls must be a boolean"),
    ],
)
def test_bad_tool_fields_name_the_field(tools, tool_choice, parallel, message):
    with pytest.raises(InvalidRequestError, match=message):
        tool_plan(tools, tool_choice, parallel)


def test_a_named_function_is_one_call_and_required_at_most_eight():
    assert not tool_plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}).parallel
    kind, schema = tool_plan([WEATHER], "required").forced_grammar()
    assert kind == "json_schema" and schema["maxItems"] == 8


def test_choice_defaults_and_format_follow_the_template():
    assert tool_plan([WEATHER]).choice == "auto"
    assert not tool_plan(None).active
    assert not tool_plan([WEATHER], "none").active
    assert tool_plan([WEATHER], chat_template=HERMES_TEMPLATE).format == "hermes"
    assert tool_plan([WEATHER], chat_template="{{ messages }}").format == "json"


@pytest.mark.parametrize("template", [None, HERMES_TEMPLATE])
@pytest.mark.parametrize(
    "tool_choice, parallel",
    [("required", True), ("required", False), ({"type": "function", "function": {"name": "add"}}, True)],
)
def test_forced_grammars_compile_and_accept_exactly_their_calls(
    smollm2_tokenizer, template, tool_choice, parallel
):
    plan = tool_plan([WEATHER, ADD], tool_choice, parallel, chat_template=template)
    kind, value = plan.forced_grammar()
    call = {"name": "add", "arguments": {"a": 1.5}}
    body = json.dumps([call] if plan.parallel and plan.format == "json" else call, separators=(", ", ": "))
    text = f"<tool_call>\n{body}\n</tool_call>\n" if plan.format == "hermes" else body
    constraint = constraint_from_options(smollm2_tokenizer, **{kind: value})
    for token_id in smollm2_tokenizer.encode(text, add_special_tokens=False):
        constraint.accept_token(token_id)
    assert constraint.is_accepting
    # <tool_call> blocks may go on (the model then picks EOS); JSON ends with its closing bracket.
    assert constraint.is_complete == (plan.format == "json" or not plan.parallel)
    content, calls = plan.parse(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1.5}


def test_forced_call_refuses_arguments_outside_the_schema(smollm2_tokenizer):
    plan = tool_plan([WEATHER], "required", False)
    kind, value = plan.forced_grammar()
    constraint = constraint_from_options(smollm2_tokenizer, **{kind: value})
    bad = '{"name": "get_weather", "arguments": {"days": 0}}'  # no city, days below its minimum
    with pytest.raises(Exception, match="breaks"):
        for token_id in smollm2_tokenizer.encode(bad, add_special_tokens=False):
            constraint.accept_token(token_id)


@pytest.mark.parametrize(
    "text, names, content",
    [
        (
            '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "add", "arguments": {}}]',
            ["get_weather", "add"],
            None,
        ),
        ('  {"name": "add", "parameters": {"a": 2}}', ["add"], None),
        ('{"tool_calls": [{"name": "add", "arguments": "{\\"a\\": 3}"}]}', ["add"], None),
        ('{"name": "unknown", "arguments": {}}', [], '{"name": "unknown", "arguments": {}}'),
        ('{"answer": 42}', [], '{"answer": 42}'),
        ("It is sunny.", [], "It is sunny."),
    ],
)
def test_auto_replies_parse_into_calls_or_stay_text(text, names, content):
    plan = tool_plan([WEATHER, ADD], "auto")
    parsed_content, calls = plan.parse(text)
    assert [c["function"]["name"] for c in calls] == names
    assert parsed_content == content
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_hermes_blocks_parse_with_the_text_around_them():
    plan = tool_plan([WEATHER, ADD], "auto", chat_template=HERMES_TEMPLATE)
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = plan.parse(text)
    assert content == "Let me look." and calls[0]["function"]["name"] == "get_weather"


def _streamed(plan, text: str, step: int):
    stream = ToolCallStream(plan)
    deltas = []
    for start in range(0, len(text), step):
        deltas += stream.feed(text[start : start + step])
    deltas += stream.finish()
    return stream, deltas


def _assemble(deltas):
    calls, content = {}, ""
    for delta in deltas:
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            entry = calls.setdefault(piece["index"], {"name": None, "arguments": "", "id": None})
            if "id" in piece:
                assert entry["id"] is None  # the header comes once, first
                entry["id"], entry["name"] = piece["id"], piece["function"]["name"]
            entry["arguments"] += piece["function"].get("arguments", "")
    return calls, content


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize("template", [None, HERMES_TEMPLATE])
def test_forced_calls_stream_header_then_argument_pieces(step, template):
    plan = tool_plan([WEATHER, ADD], "required", True, chat_template=template)
    calls_text = [
        '{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "days": 3}}',
        '{"name": "add", "arguments": {"a": [1, {"b": "}"}]}}',
    ]
    if plan.format == "hermes":
        text = "".join(f"<tool_call>\n{call}\n</tool_call>\n" for call in calls_text)
    else:
        text = "[" + ", ".join(calls_text) + "]"
    stream, deltas = _streamed(plan, text, step)
    calls, content = _assemble(deltas)
    assert content == "" and stream.finish_reason == "tool_calls"
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "add"]
    assert json.loads(calls[0]["arguments"]) == {"city": 'Pa"ris {x}', "days": 3}
    assert json.loads(calls[1]["arguments"]) == {"a": [1, {"b": "}"}]}
    if step == 1:
        assert (
            sum(1 for d in deltas for p in d["tool_calls"] if p["index"] == 0) > 3
        )  # arguments came in pieces


def test_a_forced_call_cut_short_keeps_the_engine_finish_reason():
    plan = tool_plan([WEATHER], "required", False)
    stream, deltas = _streamed(plan, '{"name": "get_weather", "arguments": {"city": "Os', 4)
    assert stream.finish_reason is None  # the route keeps "length"


def test_auto_streams_prose_at_once_and_decides_json_at_the_end():
    plan = tool_plan([WEATHER, ADD], "auto")
    stream = ToolCallStream(plan)
    assert stream.feed("It is") == [{"content": "It is"}]
    stream, deltas = _streamed(plan, '{"answer": 42}', 2)
    assert deltas == [{"content": '{"answer": 42}'}] and stream.finish_reason is None
    stream, deltas = _streamed(plan, ' {"name": "add", "arguments": {"a": 2}}', 5)
    calls, content = _assemble(deltas)
    assert content == "" and calls[0]["name"] == "add" and stream.finish_reason == "tool_calls"


def test_auto_hermes_streams_text_then_the_call():
    plan = tool_plan([ADD], "auto", chat_template=HERMES_TEMPLATE)
    text = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
    stream, deltas = _streamed(plan, text, 2)
    calls, content = _assemble(deltas)
    assert content == "Sure. " and calls[0]["name"] == "add"


def test_inactive_plans_pass_text_through():
    stream, deltas = _streamed(tool_plan([WEATHER], "none"), "hello", 2)
    assert "".join(d["content"] for d in deltas) == "hello" and stream.finish_reason is None


def test_which_templates_support_tools(smollm2_tokenizer):
    assert template_supports_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not template_supports_tools(smollm2_tokenizer.chat_template)
    assert not template_supports_tools("Use the tools wisely. {{ messages }}")
    assert not template_supports_tools(None)


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and 2+3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "5"},
]


def test_fallback_prompt_renders_tools_and_history_through_a_plain_template(smollm2_tokenizer):
    from ember.chat_template import ChatTemplate

    plan = tool_plan([WEATHER, ADD], "auto")
    messages, variables = prepare_tool_messages(HISTORY, plan, native=False)
    assert variables == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"])[1] == {"name": "add", "arguments": {"a": 2}}
    assert messages[3]["content"] == "Function result (get_weather): -3 C\nFunction result (add): 5"
    text = ChatTemplate.for_tokenizer(smollm2_tokenizer).render(messages)
    assert "Function result (add): 5" in text and "You can call functions" in text


def test_native_templates_get_tools_and_argument_objects():
    plan = tool_plan([WEATHER], "auto", chat_template=HERMES_TEMPLATE)
    messages, variables = prepare_tool_messages(HISTORY, plan, native=True)
    assert variables["tools"][0]["function"]["name"] == "get_weather"
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[2]["content"] == "" and messages[3]["role"] == "tool"


# ------------------------------------------------------------------ the server's plan


class _Handle:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def test_server_plan_translates_the_openai_fields(smollm2_tokenizer):
    from ember.server.errors import ApiError
    from ember.server.protocol import ChatCompletionRequest, CompletionRequest
    from ember.server.structured import plan

    handle = _Handle(smollm2_tokenizer)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": schema, "strict": True},
            },
        }
    )
    chat_plan = plan(request, handle, "chat")
    assert chat_plan.new_constraint() is not chat_plan.new_constraint()
    assert chat_plan.parse_reply('{"x": 1}', "stop") == {} and chat_plan.stream_parser() is None

    completion = CompletionRequest.model_validate({"prompt": "a", "guided_choice": ["left", "right"]})
    assert plan(completion, handle, "completions").new_constraint() is not None

    for body, param in [
        ({"guided_regex": "a+", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_json": {"type": "strin"}}, "guided_json"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": [WEATHER], "tool_choice": "maybe"}, "tool_choice"),
    ]:
        request = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], **body}
        )
        with pytest.raises(ApiError) as caught:
            plan(request, handle, "chat")
        assert caught.value.status_code == 400 and caught.value.param == param


def test_server_plan_for_forced_tools_constrains_and_parses(smollm2_tokenizer):
    from ember.server.protocol import ChatCompletionRequest
    from ember.server.structured import plan

    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Oslo?"}], "tools": [WEATHER], "tool_choice": "required"}
    )
    chat_plan = plan(request, _Handle(smollm2_tokenizer), "chat")
    assert "You must call at least one function now." in chat_plan.messages[0]["content"]
    constraint = chat_plan.new_constraint()
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    for token_id in smollm2_tokenizer.encode(text, add_special_tokens=False):
        constraint.accept_token(token_id)
    assert constraint.is_complete
    reply = chat_plan.parse_reply(text, "stop")
    assert reply["finish_reason"] == "tool_calls" and reply["content"] is None
    jsonschema.validate(
        json.loads(reply["tool_calls"][0]["function"]["arguments"]), WEATHER["function"]["parameters"]
    )
