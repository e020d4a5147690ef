"""Request options -> a compiled grammar -> a fresh constraint per sequence, each grammar compiled once.

Compiling means: translate the option (schema, regex, Lark/GBNF grammar,
choice list) into llguidance's grammar text, check it against the tokenizer,
and build a matcher. The checked matcher is kept in a small LRU keyed by the
tokenizer and the option's canonical text; every request then starts from a
`deep_copy` of it (microseconds), so a schema's first use costs a few
milliseconds and later uses almost nothing. A bad schema or grammar raises
`InvalidRequestError` with llguidance's own message.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance

from ember.constraints.grammar_constraint import ConstraintViolationError, GrammarConstraint
from ember.constraints.json_budget import JsonBudget, vocabulary_tables
from ember.constraints.tokenizer_bridge import llguidance_tokenizer
from ember.errors import InvalidRequestError

CACHE_SIZE = 128  # distinct (tokenizer, grammar) pairs kept compiled
MAX_GRAMMAR_CHARS = 200_000  # a schema or grammar larger than this is refused before compiling

# JSON without runs of free whitespace: small models at temperature > 0 otherwise drift into
# endless newlines inside an object. A schema's own "x-guidance" options override these.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# "Any JSON object" (OpenAI's JSON mode) as a Lark grammar rather than the schema {"type": "object"}:
# the same JSON, but numbers are bounded the way llama.cpp's json.gbnf bounds them (16 integer
# digits, 16 decimals, a 3-digit exponent), so a small model cannot run into an endless digit string.
JSON_OBJECT_GRAMMAR = r"""
start: object
?value: object | array | STRING | NUMBER | "true" | "false" | "null"
object: "{" [pair (", " pair)*] "}"
pair: STRING ": " value
array: "[" [value (", " value)*] "]"
STRING: /"(\\(["\\\/bfnrt]|u[a-fA-F0-9]{4})|[^"\\\x00-\x1F\x7F])*"/
NUMBER: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,3})?/
"""

_compiled: OrderedDict[tuple, tuple[llguidance.LLTokenizer, llguidance.LLMatcher]] = OrderedDict()
_compiled_lock = threading.Lock()


def constraint_from_options(
    tokenizer: Any,
    *,
    json_schema: dict[str, Any] | str | bool | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    choice: list[str] | None = None,
    strict: bool = True,
    max_tokens: int | None = None,
) -> GrammarConstraint | None:
    """A new constraint for one sequence, or None when no option is set.

    `json_schema`: a JSON schema (dict or JSON text); `json_object`: any JSON
    object; `regex`: the whole output matches it (Rust regex syntax);
    `grammar`: Lark as llguidance accepts it, or llama.cpp's GBNF; `choice`:
    the output is exactly one of these strings. At most one may be given.
    `strict` False lets a schema use keywords llguidance does not implement
    (they are ignored); True refuses them. `max_tokens`, the reply's token
    budget, lets JSON mode close the object in time (json_budget.py): the
    reply then parses even when it is cut ("length").
    """
    given = [
        name
        for name, value in (
            ("json_schema", json_schema),
            ("json_object", json_object or None),
            ("regex", regex),
            ("grammar", grammar),
            ("choice", choice),
        )
        if value is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"give at most one output constraint, not {' and '.join(given)}")
    kind = given[0]
    if kind == "json_object":
        canonical = "object"
    elif kind == "json_schema":
        canonical = _canonical_schema(json_schema)
    elif kind == "choice":
        canonical = _canonical_choice(choice)
    else:
        text = regex if kind == "regex" else grammar
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f"{kind} must be a non-empty string")
        canonical = text
    if len(canonical) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(
            f"the {kind} is too large ({len(canonical)} characters; at most {MAX_GRAMMAR_CHARS})"
        )
    ll_tokenizer = llguidance_tokenizer(tokenizer)
    template = _compiled_matcher(ll_tokenizer, kind, canonical, strict)
    budget = None
    if kind == "json_object" and max_tokens is not None:
        budget = JsonBudget(vocabulary_tables(ll_tokenizer), int(max_tokens))
    return GrammarConstraint(
        template.deep_copy(), ll_tokenizer.vocab_size, kind, ll_tokenizer.eos_tokens, budget
    )


def compile_cache_size() -> int:
    """How many compiled grammars are cached (for tests and metrics)."""
    with _compiled_lock:
        return len(_compiled)


def clear_compile_cache() -> None:
    with _compiled_lock:
        _compiled.clear()


def _compiled_matcher(
    ll_tokenizer: llguidance.LLTokenizer, kind: str, canonical: str, strict: bool
) -> llguidance.LLMatcher:
    key = (id(ll_tokenizer), kind, canonical, strict)
    with _compiled_lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0] is ll_tokenizer:
            _compiled.move_to_end(key)
            return hit[1]
    # Compile outside the lock (llguidance drops the GIL while building): two threads compiling
    # the same new schema at once both succeed and one result is kept.
    grammar_text = _grammar_text(kind, canonical, strict)
    problem = llguidance.LLMatcher.validate_grammar(grammar_text, ll_tokenizer)
    if problem:
        raise InvalidRequestError(f"invalid {_label(kind)}: {_tidy(problem)}")
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar_text, log_level=0)
    if matcher.is_error():
        raise InvalidRequestError(f"invalid {_label(kind)}: {_tidy(matcher.get_error())}")
    _check_first_token(matcher.deep_copy(), ll_tokenizer, kind)
    with _compiled_lock:
        _compiled[key] = (ll_tokenizer, matcher)  # the tokenizer held here keeps id() unique
        _compiled.move_to_end(key)
        while len(_compiled) > CACHE_SIZE:
            _compiled.popitem(last=False)
    return matcher


def _check_first_token(probe: llguidance.LLMatcher, ll_tokenizer: llguidance.LLTokenizer, kind: str) -> None:
    """Refuse a grammar this vocabulary cannot even begin (and warm the lexer for the first mask)."""
    vocab_size = ll_tokenizer.vocab_size
    try:
        GrammarConstraint(probe, vocab_size, kind, ll_tokenizer.eos_tokens).allowed_token_mask(vocab_size)
    except ConstraintViolationError:
        raise InvalidRequestError(
            f"this model cannot produce that {_label(kind)}: its vocabulary has no token that can begin it"
        ) from None


def _grammar_text(kind: str, canonical: str, strict: bool) -> str:
    try:
        if kind == "json_schema":
            defaults = dict(JSON_DEFAULTS, lenient=not strict)
            return llguidance.LLMatcher.grammar_from_json_schema(canonical, defaults=defaults)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_lark(JSON_OBJECT_GRAMMAR)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(canonical)
        if kind == "choice":
            options = json.loads(canonical)
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(o) for o in options)
            )
        return llguidance.grammar_from("grammar", canonical)  # Lark, or GBNF converted to Lark
    except ValueError as error:
        raise InvalidRequestError(f"invalid {_label(kind)}: {_tidy(str(error))}") from None


def _canonical_schema(schema: Any) -> str:
    """The schema as compact JSON text (key order kept: it is the order properties are written in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"invalid JSON schema: not JSON ({error})") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"invalid JSON schema: {error}") from None


def _canonical_choice(choice: Any) -> str:
    if not isinstance(choice, (list, tuple)) or not choice:
        raise InvalidRequestError("choice must be a non-empty list of strings")
    if not all(isinstance(option, str) and option for option in choice):
        raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
    return json.dumps(list(choice), ensure_ascii=False)


def _label(kind: str) -> str:
    return {
        "json_schema": "JSON schema",
        "json_object": "JSON object",
        "regex": "regex",
        "grammar": "grammar",
        "choice": "choice",
    }[kind]


def _tidy(message: str) -> str:
    """llguidance's message on one line, without the indented source excerpts and carets it adds."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and not line[0].isspace()]
    return "; ".join(lines[:4]) if lines else "rejected by the grammar engine"
