"""RWKV tokenizers: World ids equal the rwkv package's, exact round trips; 20B BPE; bytes; the template."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.chat_template import ChatTemplate
from ember.errors import ModelLoadError
from ember.rwkv_tokenizer import byte_tokenizer, load_rwkv_tokenizer, tokenizer_20b, world_tokenizer

TOKENIZERS = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tokenizers"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.\n\nUser: hello?",
    "中华人民共和国是一个位于东亚的国家。我们今天去公园散步吧！",
    "日本語のテキストです。カタカナとひらがな、そして漢字。",
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and combining e\u0301 \t tabs\r\n",
    "Mixed: Привет мир, مرحبا بالعالم, 안녕하세요 세계, ελληνικά",
    "",
]


@pytest.fixture(scope="module")
def world():
    return world_tokenizer(TOKENIZERS / "rwkv_vocab_v20230424.txt")


def test_world_ids_equal_the_rwkv_package(world):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # the package's tokenizer (no model import)

    reference = TRIE_TOKENIZER(str(TOKENIZERS / "rwkv_vocab_v20230424.txt"))
    for text in SAMPLES:
        ids = world.encode(text)
        assert ids == reference.encode(text), text
        assert world.decode(ids) == text
    long_text = "".join(SAMPLES) * 20
    assert world.encode(long_text) == reference.encode(long_text)


def test_world_partial_characters_decode_to_replacement(world):
    ids = world.encode("😀")
    pieces = [world.decode_bytes([token]) for token in ids]
    assert b"".join(pieces) == "😀".encode()
    assert world.decode([world.encode_bytes(b"\xf0\x9f")[0]]).endswith("\ufffd")
    assert world.eos_token_ids == [0] and world.vocab_size == 65536


def test_byte_and_20b_tokenizers():
    tokens = byte_tokenizer()
    assert tokens.encode('"in') == [34, 105, 110]
    assert tokens.decode(tokens.encode("héllo 中")) == "héllo 中"
    neox = tokenizer_20b(TOKENIZERS / "20B_tokenizer.json")
    for text in SAMPLES[:4]:
        assert neox.decode(neox.encode(text)) == text
    assert neox.chat_template and neox.eos_token_ids == [0]


def test_tokenizer_choice_and_errors(tmp_path):
    assert load_rwkv_tokenizer(256).kind == "bytes"
    with pytest.raises(ModelLoadError, match="no RWKV tokenizer is known"):
        load_rwkv_tokenizer(1234)
    with pytest.raises(ModelLoadError, match="unknown RWKV tokenizer"):
        load_rwkv_tokenizer(256, kind="sentencepiece")
    with pytest.raises(ModelLoadError, match="20B_tokenizer.json beside the model"):
        load_rwkv_tokenizer(50277, model_path=tmp_path / "model.pth")
    (tmp_path / "rwkv_vocab_v20230424.txt").write_text("1 'a' 1\n2 oops\n")
    with pytest.raises(ModelLoadError, match="not a vocabulary line"):
        load_rwkv_tokenizer(65536, model_path=tmp_path / "model.pth")


def test_tokenizer_named_at_load():
    """`ember.load(..., tokenizer=)` / `--tokenizer`: a kind or a file; one that does not fit is refused."""
    import ember

    model = TOKENIZERS.parent / "tiny-rwkv" / "tiny-rwkv-7v0-834K-FP32.bin"
    handle = ember.load(model, tokenizer="bytes")
    assert handle.tokenizer.kind == "bytes" and handle.encode('"in') == [34, 105, 110]
    with pytest.raises(ModelLoadError, match="ids up to 65529; this model's vocabulary holds 256"):
        ember.load(model, tokenizer=str(TOKENIZERS / "rwkv_vocab_v20230424.txt"))
    with pytest.raises(ModelLoadError, match="ids up to 50276"):
        ember.load(model, tokenizer=str(TOKENIZERS / "20B_tokenizer.json"))
    with pytest.raises(ModelLoadError, match="neither one of world, 20b, bytes nor an existing file"):
        ember.load(model, tokenizer="sentencepiece")
    with pytest.raises(ModelLoadError, match="only be named for RWKV files"):
        ember.load(TOKENIZERS.parent / "story", tokenizer="bytes")


def test_chat_template_is_chatrwkvs_convention():
    template = ChatTemplate(byte_tokenizer().chat_template)
    text = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi\n\n\nthere "},
            {"role": "assistant", "content": " Hello!"},
            {"role": "user", "content": "Again"},
        ]
    )
    assert text == "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Again\n\nAssistant:"
    assert byte_tokenizer().chat_stop_strings == ("\n\n",)


def test_penalty_exempt_and_banned_tokens(world):
    exempt = world.penalty_exempt_token_ids
    for text in (" ", ",", "\n\n", "2024", "。", "!"):
        assert set(world.encode(text)) <= exempt, text
    for text in (" the", "cat", "中"):
        assert world.encode(text)[0] not in exempt
    assert world.chat_banned_token_ids == frozenset({0})
