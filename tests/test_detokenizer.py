"""Streaming text: whole characters only, spaces kept, stop strings held back."""

from __future__ import annotations

import pytest
import tokenizers

from ember.engine.detokenizer import StreamingDetokenizer
from ember.engine.stop_strings import StopStringMatcher
from ember.formats.safetensors_folder import read_hf_folder
from ember.tokenizer import Tokenizer
from tests.conftest import STORY_MODEL

SAMPLE = "Once upon a time, Lily saw 世界 and 😀👍🏽 in a café.\n  Spaced   out\ttabs."


@pytest.fixture(scope="module")
def story_tokenizer():
    return read_hf_folder(STORY_MODEL).tokenizer


def test_streamed_pieces_concatenate_to_the_full_decode(story_tokenizer):
    prompt = story_tokenizer.encode("Hello there.")
    continuation = story_tokenizer.encode(SAMPLE, add_special_tokens=False)
    detokenizer = StreamingDetokenizer(story_tokenizer, context_token_ids=prompt)
    pieces = [detokenizer.add(token) for token in continuation] + [detokenizer.flush()]
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    full = story_tokenizer.decode(prompt + continuation, skip_special_tokens=True)
    prompt_text = story_tokenizer.decode(prompt, skip_special_tokens=True)
    assert prompt_text + "".join(pieces) == full
    # Byte-fallback characters take several tokens: some steps must have held text back.
    assert sum(1 for piece in pieces if piece == "") > 0


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """A word-level tokenizer whose decoder drops the leading space of the text, as SentencePiece's does."""
    words = ["\u2581Once", "\u2581upon", "\u2581a", "\u2581time", "<unk>"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[], add_bos=False)


def test_leading_space_of_first_generated_token_is_kept():
    tokenizer = _sentencepiece_style_tokenizer()
    *prompt, time_token = tokenizer.encode("Once upon a time")
    assert tokenizer.decode([time_token]) == "time"  # decoded alone, the space is lost
    detokenizer = StreamingDetokenizer(tokenizer, context_token_ids=prompt)
    assert detokenizer.add(time_token) == " time"
    assert detokenizer.add(time_token) == " time"


def test_stop_matcher_holds_back_possible_prefixes():
    matcher = StopStringMatcher(["<|end|>", "STOP"])
    emitted = [matcher.feed(piece) for piece in ["Hello <", "|en", "d|> world"]]
    assert emitted == ["Hello ", "", ""]
    assert matcher.stopped


def test_stop_matcher_releases_false_alarms():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("ART") == "START"
    assert matcher.feed("ST") == ""
    assert matcher.flush() == "ST"
    assert not matcher.stopped


def test_stop_matcher_earliest_stop_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"
