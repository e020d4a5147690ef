"""Render a conversation to prompt text with the model's own Jinja chat template.

Models ship their prompt format as a Jinja template written for transformers'
`apply_chat_template`; rendering it the same way (same environment, globals and
filters) is what makes a prompt here identical to the one the model was tuned
on. Templates come from downloaded files, so they run in Jinja's sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from ember.tokenizer import Tokenizer

# Used when a model carries no template: ChatML, the format of Qwen, SmolLM and many others,
# and a plain, readable one for models tuned on none at all.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's own template (as in the instruction-tuned Gemma 3 checkpoints' tokenizer_config.json), for
# Gemma 3 GGUF files that carry none: turns are `<start_of_turn>user|model ... <end_of_turn>`, and a
# system message is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(
        self,
        template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        is_model_template: bool = True,
    ):
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._is_model_template = is_model_template
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as error:
            raise ModelLoadError(
                f"the chat template does not compile: {error.message} (line {error.lineno})"
            ) from None

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The model's template, or ChatML (`is_model_template` False) when it has none."""
        template = tokenizer.chat_template
        return cls(
            template if template else CHATML_TEMPLATE,
            tokenizer.bos_token,
            tokenizer.eos_token,
            is_model_template=bool(template),
        )

    @property
    def is_model_template(self) -> bool:
        """True for the model's own template, False when ChatML stands in for a missing one."""
        return self._is_model_template

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages`; `extra` become template variables (`tools`, `enable_thinking`...).

        A template that rejects the conversation (its `raise_exception`, a missing field) is the
        request's fault, so it surfaces as `InvalidRequestError` with the template's message.
        """
        variables: dict[str, Any] = {"tools": None, **extra}
        # An absent token stays undefined, as in transformers, so `{% if bos_token %}` reads false.
        if self.bos_token is not None:
            variables.setdefault("bos_token", self.bos_token)
        if self.eos_token is not None:
            variables.setdefault("eos_token", self.eos_token)
        variables["messages"] = messages
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as error:
            raise InvalidRequestError(
                f"chat template error: {error.message or type(error).__name__}"
            ) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            # e.g. `'...' + message['content']` when content is not a string
            raise InvalidRequestError(f"chat template cannot render these messages: {error}") from None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` escapes HTML and non-ASCII characters; templates expect plain JSON."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, closing a path to Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _Namespace
    return environment
