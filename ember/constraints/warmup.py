"""Do the once-per-model work of constrained decoding when the model loads, not in the first request.

The first constrained request on a fresh tokenizer would otherwise pay for
llguidance's view of the vocabulary (about 0.25 s for SmolLM2's 49k tokens,
2.4 s for Gemma 3's 262k), JSON mode's per-token tables and the first compile;
after `warm_up` a new schema's first use costs a few milliseconds.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ember.errors import EmberError

log = logging.getLogger(__name__)

# A small schema touching what a real one uses (strings, bounded numbers, enums, arrays), so the
# grammar compiler and lexer have run once; it stays in the compile cache, harmlessly.
WARM_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def warm_up(tokenizer: Any) -> float | None:
    """Build everything a first constrained request needs for this tokenizer; the seconds it took.

    Never raises: a tokenizer constrained decoding cannot use (or a vocabulary that cannot
    spell JSON) is logged and left for the request to report; None is returned then.
    """
    from ember.constraints.compiler import constraint_from_options
    from ember.constraints.json_budget import vocabulary_tables
    from ember.constraints.tokenizer_bridge import llguidance_tokenizer

    started = time.perf_counter()
    try:
        ll_tokenizer = llguidance_tokenizer(tokenizer)
        vocabulary_tables(ll_tokenizer)
        for options in ({"json_schema": WARM_SCHEMA}, {"regex": "[a-z]{1,4}"}):
            try:
                constraint = constraint_from_options(tokenizer, **options)
                constraint.allowed_token_mask(ll_tokenizer.vocab_size)
            except EmberError:  # e.g. a vocabulary without "{": that format is refused per request
                continue
    except Exception as error:  # a warm-up must never stop a model from serving
        log.info("constrained decoding not warmed up: %s", error)
        return None
    seconds = time.perf_counter() - started
    log.debug("constrained decoding warmed up in %.0f ms", seconds * 1000)
    return seconds
