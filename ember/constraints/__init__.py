"""Constrained decoding: JSON schemas, any-JSON, regexes, Lark/GBNF grammars and choices, via llguidance.

`constraint_from_options(tokenizer, json_schema=...)` gives one sequence's
`TokenConstraint` (see ember/engine/sequence.py); put it on a
`GenerationRequest(constraint=...)` and the engine masks every step's logits
with it. The tool-call pieces (prompting, the forced-call schema, parsing the
model's reply) live in `tool_calls.py` and `tool_prompt.py`.
"""

from ember.constraints.compiler import clear_compile_cache, compile_cache_size, constraint_from_options
from ember.constraints.grammar_constraint import ConstraintViolationError, GrammarConstraint
from ember.constraints.tokenizer_bridge import llguidance_tokenizer
from ember.constraints.warmup import warm_up

__all__ = [
    "ConstraintViolationError",
    "GrammarConstraint",
    "clear_compile_cache",
    "compile_cache_size",
    "constraint_from_options",
    "llguidance_tokenizer",
    "warm_up",
]
