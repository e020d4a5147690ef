"""Build ember's `Tokenizer` from the `tokenizer.ggml.*` metadata of a GGUF file.

A GGUF has no `tokenizer.json`: it stores the vocabulary and its merges or
scores under llama.cpp's key names, and llama.cpp's `llama-vocab.cpp` defines
what they mean. We rebuild that tokenizer as a `tokenizers.Tokenizer`, so that
encoding runs in Rust and gives llama.cpp's ids (and transformers' GGUF
loader's, where the two agree):

- `gpt2`: byte-level BPE from tokens and merges; text is first cut by the
  regular expressions llama.cpp picks from `tokenizer.ggml.pre`.
- `llama`: SentencePiece BPE from tokens and scores: spaces become `▁`, a space
  is put before the text, characters outside the vocabulary fall back to
  `<0xNN>` byte tokens.

Tokens typed control or user-defined become added tokens, matched whole in the
raw text before the model sees it, so `<|im_start|>` in a rendered chat
template encodes to its one id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ember.errors import ModelLoadError
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp's token types, the values of `tokenizer.ggml.token_type`.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SPACE_MARK = "\u2581"  # SentencePiece writes a space as "▁"

# Tokens llama.cpp ends generation on whatever the metadata says (its "EOG" list, matched by text).
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)

# The splitting expressions of llama.cpp's `llm_tokenizer_bpe`, spelled as in the models' own
# tokenizer.json (llama.cpp rewrites `(?i:...)` only because its regex engine lacks it).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_SPLIT = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_WORDS_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizerRule:
    """How llama.cpp treats one `tokenizer.ggml.pre` value.

    `splits` run in order, each cutting the pieces the previous one left (matches and the text
    between them both become pieces). `ignore_merges` takes a whole piece that is itself a token
    as is; `add_bos` is the default when the file has no `tokenizer.ggml.add_bos_token`.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_DEFAULT_RULE = PreTokenizerRule((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"))


def _rules() -> dict[str, PreTokenizerRule]:
    groups: list[tuple[tuple[str, ...], PreTokenizerRule]] = [
        (("default",), _DEFAULT_RULE),
        (
            ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
            PreTokenizerRule((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
        ),
        (("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), PreTokenizerRule((_LLAMA3_SPLIT,))),
        (
            ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"),
            PreTokenizerRule((_QWEN2_SPLIT,)),
        ),
        (
            ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
            PreTokenizerRule((r"\p{N}", _GPT2_SPLIT)),
        ),
        (
            (
                "gpt-2",
                "phi-2",
                "jina-es",
                "jina-de",
                "gigachat",
                "jina-v2-es",
                "jina-v2-de",
                "a.x-4.0",
                "mellum",
                "jina-v1-en",
                "jina-v2-code",
                "roberta-bpe",
                "mpt",
                "olmo",
                "jais",
                "trillion",
                "granite-docling",
                "exaone4",
            ),  # fmt: skip
            PreTokenizerRule((_GPT2_SPLIT,)),
        ),
        (("falcon",), PreTokenizerRule((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]"))),
        (
            ("deepseek-coder",),
            PreTokenizerRule(
                ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
            ),
        ),
        (
            ("deepseek-v3", "hunyuan-dense"),
            PreTokenizerRule((r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_SPLIT)),
        ),
        (("tekken",), PreTokenizerRule((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "minimax-m2"), PreTokenizerRule((_GPT4O_SPLIT,))),
        (("seed-coder",), PreTokenizerRule((_SEED_CODER_SPLIT,))),
        (("poro-chat", "bloom", "gpt3-finnish"), PreTokenizerRule((_WORDS_SPLIT,))),
        (("viking",), PreTokenizerRule((_WORDS_SPLIT, r"\p{N}"))),
    ]
    return {name: rule for names, rule in groups for name in names}


PRE_TOKENIZER_RULES: dict[str, PreTokenizerRule] = _rules()


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file describes, from `read_metadata`'s plain values."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelLoadError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    raw_tokens = metadata.get("tokenizer.ggml.tokens")
    if not raw_tokens:
        raise ModelLoadError("the GGUF file has no vocabulary (tokenizer.ggml.tokens is missing or empty)")
    # llama.cpp renames empty tokens so that every id keeps a text of its own.
    tokens = [token if token else f"[EMPTY_{index}]" for index, token in enumerate(raw_tokens)]
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise ModelLoadError(
            f"the GGUF vocabulary has {len(tokens)} tokens but {len(token_types)} token types"
        )

    if kind == "gpt2":
        rule = _pre_tokenizer_rule(metadata.get("tokenizer.ggml.pre"))
        backend = _byte_level_backend(tokens, metadata.get("tokenizer.ggml.merges"), rule)
        default_ids = {"bos": None, "eos": None, "unk": None}
        default_add_bos = rule.add_bos
    elif kind == "llama":
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_backend(tokens, token_types, metadata, add_space_prefix)
        default_ids = {"bos": 1, "eos": 2, "unk": 0}
        default_add_bos = True
    else:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer kind {kind!r} (tokenizer.ggml.model); ember reads 'gpt2' and 'llama'"
        )

    bos_id = _token_id(metadata, "bos_token_id", default_ids["bos"], len(tokens))
    eos_id = _token_id(metadata, "eos_token_id", default_ids["eos"], len(tokens))
    unk_id = _token_id(metadata, "unknown_token_id", default_ids["unk"], len(tokens))
    eos_ids = _end_of_generation_ids(metadata, tokens, eos_id)
    _add_special_tokens(backend, tokens, token_types, {bos_id, unk_id, *eos_ids} - {None})

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=bool(add_bos),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _pre_tokenizer_rule(name: str | None) -> PreTokenizerRule:
    if name in PRE_TOKENIZER_RULES:
        return PRE_TOKENIZER_RULES[name]
    # llama.cpp does the same: warn, then split with its default expressions.
    logger.warning("GGUF pre-tokenizer %r is not known; splitting text with llama.cpp's default", name)
    return _DEFAULT_RULE


def _byte_level_backend(
    tokens: list[str], merge_texts: list[str] | None, rule: PreTokenizerRule
) -> tokenizers.Tokenizer:
    """Byte-level BPE: tokens are spelled in GPT-2's byte alphabet, merges rank pairs of them."""
    if not merge_texts:
        raise ModelLoadError("the GGUF 'gpt2' tokenizer has no merges (tokenizer.ggml.merges)")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for text in merge_texts:
        # As llama.cpp: the pair splits at the first space after the first character.
        cut = text.find(" ", 1)
        left, right = text[:cut], text[cut + 1 :]
        # The `tokenizers` BPE refuses merges of unknown tokens; llama.cpp never applies them either.
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=rule.ignore_merges)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in rule.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], token_types: list[int], metadata: dict[str, Any], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """SentencePiece BPE, as llama.cpp's `llm_tokenizer_spm` runs it.

    llama.cpp merges, again and again, the neighbouring pair whose joined text is the
    highest-scored token. A BPE whose merges are ranked by that score does the same. A file that
    also carries merges (converted from a tokenizer.json) gets them used as they are, as
    transformers does: they are the original order, where scores may tie.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merge_texts = metadata.get("tokenizer.ggml.merges")
    if merge_texts:
        merges = [tuple(text.split(" ", 1)) for text in merge_texts]
        merges = [(left, right) for left, right in merges if left in vocab and right in vocab]
        merges = [(left, right) for left, right in merges if left + right in vocab]
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise ModelLoadError(
                "the GGUF 'llama' tokenizer has neither scores nor merges for its vocabulary"
            )
        merges = _merges_from_scores(tokens, token_types, scores)
    unk_id = _token_id(metadata, "unknown_token_id", 0, len(tokens))
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp puts the space before every stretch of text, also after a special token; with the
    # added tokens left un-normalized, a normalizer here sees exactly those stretches.
    space_steps = [normalizers.Replace(" ", SPACE_MARK)]
    if add_space_prefix:
        space_steps.insert(0, normalizers.Prepend(SPACE_MARK))
    backend.normalizer = normalizers.Sequence(space_steps)
    decode_steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def _merges_from_scores(
    tokens: list[str], token_types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scored result first.

    Only normal and user-defined tokens take part: SentencePiece never builds control, byte or
    unused pieces by merging.
    """
    mergeable = {TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED}
    pieces = {token for token, token_type in zip(tokens, token_types, strict=True) if token_type in mergeable}
    ranked = []
    for index, token in enumerate(tokens):
        if len(token) < 2 or token_types[index] not in mergeable:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _add_special_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int], named_ids: set[int]
) -> None:
    """Control and unknown tokens (and bos/eos/unk whatever their type) are special; user-defined
    ones are matched whole but stay ordinary text, as llama.cpp and transformers treat them."""
    special = [
        AddedToken(token, special=True, normalized=False)
        for index, (token, token_type) in enumerate(zip(tokens, token_types, strict=True))
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN) or index in named_ids
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for index, (token, token_type) in enumerate(zip(tokens, token_types, strict=True))
        if token_type == TOKEN_TYPE_USER_DEFINED and index not in named_ids
    ]
    if special:
        backend.add_special_tokens(special)
    if user_defined:
        backend.add_tokens(user_defined)


def _token_id(metadata: dict[str, Any], name: str, default: int | None, vocab_size: int) -> int | None:
    token_id = metadata.get(f"tokenizer.ggml.{name}", default)
    if token_id is None or not 0 <= int(token_id) < vocab_size:
        if token_id is not None:
            logger.warning("GGUF %s %s is outside the vocabulary; ignoring it", name, token_id)
        return default if default is not None and default < vocab_size else None
    return int(token_id)


def _end_of_generation_ids(metadata: dict[str, Any], tokens: list[str], eos_id: int | None) -> list[int]:
    """eos first, then end-of-turn/message ids, then the tokens llama.cpp stops on by their text
    (llama.cpp also makes those control tokens, whatever type the file gives them)."""
    ids = [eos_id] if eos_id is not None else []
    for name in ("eot_token_id", "eom_token_id"):
        token_id = _token_id(metadata, name, None, len(tokens))
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    for index, token in enumerate(tokens):
        if token in END_OF_GENERATION_TEXTS and index not in ids:
            ids.append(index)
    return ids
