"""The tokenizers RWKV models use: World (greedy longest byte match), the 20B BPE, and plain bytes.

RWKV files carry no tokenizer, so the vocabulary size tells which one a model
was trained with (65536 World, 50277 the GPT-NeoX 20B BPE, 256 bytes), unless
the caller names one. The World tokenizer is BlinkDL's: at each position take
the longest vocabulary byte string that matches, so encoding is a walk down a
byte trie. Each is a `Tokenizer` (same methods the engine and chat use) with
ChatRWKV's chat convention as its template.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import tokenizers

from ember.errors import ModelLoadError
from ember.sampling import is_penalty_exempt_text
from ember.tokenizer import Tokenizer

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
TOKENIZER_20B_FILE = "20B_tokenizer.json"
KINDS = ("world", "20b", "bytes")
VOCAB_KINDS = {65536: "world", 50277: "20b", 50304: "20b", 256: "bytes"}
END_OF_TEXT = 0  # ChatRWKV's end of document in every RWKV vocabulary

# ChatRWKV's chat convention: "User: ...\n\nAssistant: ...\n\n". A blank line ends a turn, so messages
# keep single newlines only, and a reply stops at "\n\n" (see CHAT_STOP_STRINGS). A reply is written
# back exactly as generated (it usually starts with its own space), so the next turn's tokens repeat
# the state's and only the new message is read.
RWKV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] | replace('\\r\\n', '\\n') | replace('\\n\\n', '\\n')"
    " | replace('\\n\\n', '\\n') %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + content | trim + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + content | trim + '\\n\\n' }}"
    "{% elif content[:1] in [' ', '\\n'] %}{{ 'Assistant:' + content + '\\n\\n' }}"
    "{% else %}{{ 'Assistant: ' + content + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHAT_STOP_STRINGS = ("\n\n",)
# ChatRWKV's sampling habits for chat: presence and frequency penalties decaying per token, which
# spaces, punctuation and digits do not count towards. (Its ban on end-of-text mid-reply is part of
# the chat format: `chat_banned_token_ids`, applied to every turn.)
CHAT_SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 0.3,
    "presence_penalty": 0.4,
    "frequency_penalty": 0.4,
    "penalty_decay": 0.996,
    "penalty_exempt_punctuation": True,
}


def penalty_exempt_token_ids(tokenizer: ByteTrieTokenizer, vocab_size: int) -> frozenset[int]:
    """Ids whose text is only whitespace, punctuation and digits: ChatRWKV leaves them out of the
    presence and frequency penalties, so a reply may reuse spaces, commas and numbers freely."""
    return frozenset(
        token_id
        for token_id in range(1, vocab_size)
        if is_penalty_exempt_text(tokenizer.token_text(token_id))
    )


class ByteTrieTokenizer(Tokenizer):
    """Greedy longest match over a byte-string vocabulary (World), or one token per byte."""

    def __init__(self, id_to_bytes: dict[int, bytes], vocab_size: int, kind: str):
        # Not a tokenizers.Tokenizer underneath: fill in what `Tokenizer` holds without one.
        self.backend = None
        self.kind = kind
        self.bos_token_id = None
        self.eos_token_ids = [END_OF_TEXT]
        self.add_bos = False
        self.chat_template = RWKV_CHAT_TEMPLATE
        self.chat_stop_strings = CHAT_STOP_STRINGS
        self.sampling_defaults = dict(CHAT_SAMPLING_DEFAULTS)
        self.special_token_ids = frozenset({END_OF_TEXT})
        # ChatRWKV never lets a chat reply end the document mid-turn: <|endoftext|> is banned there
        self.chat_banned_token_ids = frozenset({END_OF_TEXT})
        self._vocab_size = vocab_size
        self._id_to_bytes = id_to_bytes
        # trie: byte -> [children, token id or -1]
        self._root: dict[int, list] = {}
        for token_id, piece in id_to_bytes.items():
            node = self._root
            entry = None
            for byte in piece:
                entry = node.get(byte)
                if entry is None:
                    entry = node[byte] = [{}, -1]
                node = entry[0]
            if entry is not None:
                entry[1] = token_id
        missing = [byte for byte in range(256) if self._root.get(byte, [None, -1])[1] < 0]
        if missing:
            raise ModelLoadError(f"the {kind} vocabulary lacks single-byte tokens (e.g. byte {missing[0]})")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @functools.cached_property
    def penalty_exempt_token_ids(self) -> frozenset[int]:
        return penalty_exempt_token_ids(self, len(self._id_to_bytes) + 1)

    @property
    def bos_token(self) -> str | None:
        return None

    @property
    def eos_token(self) -> str | None:
        return "<|endoftext|>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        ids: list[int] = []
        root = self._root
        position, end = 0, len(data)
        while position < end:
            node, index = root, position
            best_id, best_end = -1, position
            while index < end:
                entry = node.get(data[index])
                if entry is None:
                    break
                index += 1
                if entry[1] >= 0:
                    best_id, best_end = entry[1], index
                node = entry[0]
            ids.append(best_id)
            position = best_end
        return ids

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        pieces = self._id_to_bytes
        return b"".join(pieces.get(token_id, b"") for token_id in token_ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        # An incomplete character decodes as U+FFFD, which the streaming detokenizer waits on.
        return self.decode_bytes(list(token_ids)).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._id_to_bytes.get(token_id, b"").decode("utf-8", errors="replace")


def read_world_vocab(path: Path) -> dict[int, bytes]:
    """id -> bytes of BlinkDL's vocabulary file (lines `id <python literal> length`)."""
    id_to_bytes: dict[int, bytes] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"cannot read the RWKV World vocabulary {path}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_id = int(line[: line.index(" ")])
            literal = ast.literal_eval(line[line.index(" ") : line.rindex(" ")].strip())
            length = int(line[line.rindex(" ") :])
        except (ValueError, SyntaxError):
            raise ModelLoadError(f"{path}:{number} is not a vocabulary line") from None
        piece = literal.encode("utf-8") if isinstance(literal, str) else literal
        if not isinstance(piece, bytes) or len(piece) != length:
            raise ModelLoadError(f"{path}:{number}: the token's length is not {length}")
        id_to_bytes[token_id] = piece
    return id_to_bytes


def world_tokenizer(path: Path, vocab_size: int = 65536) -> ByteTrieTokenizer:
    return ByteTrieTokenizer(read_world_vocab(path), vocab_size, "world")


def byte_tokenizer(vocab_size: int = 256) -> ByteTrieTokenizer:
    """One token per byte (the tiny test models)."""
    return ByteTrieTokenizer({byte: bytes([byte]) for byte in range(256)}, vocab_size, "bytes")


def tokenizer_20b(path: Path, vocab_size: int = 50277) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception on bad JSON
        raise ModelLoadError(f"cannot read the 20B tokenizer {path}: {error}") from None
    tokenizer = Tokenizer(
        backend,
        bos_token_id=None,
        eos_token_ids=[END_OF_TEXT],
        add_bos=False,
        chat_template=RWKV_CHAT_TEMPLATE,
    )
    tokenizer.kind = "20b"
    tokenizer.chat_banned_token_ids = frozenset({END_OF_TEXT})  # its penalty exemptions: computed on use
    tokenizer.chat_stop_strings = CHAT_STOP_STRINGS
    tokenizer.sampling_defaults = dict(CHAT_SAMPLING_DEFAULTS)
    return tokenizer


def find_tokenizer_file(file_name: str, model_path: Path | None) -> Path | None:
    """The tokenizer file beside the model, else the copy the `rwkv` package ships (if installed)."""
    candidates = []
    if model_path is not None:
        folder = model_path if model_path.is_dir() else model_path.parent
        candidates.append(folder / file_name)
    spec = importlib.util.find_spec("rwkv")  # located without importing it
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.append(Path(location) / file_name)
    return next((path for path in candidates if path.exists()), None)


def parse_tokenizer_spec(spec: str | None) -> tuple[str | None, Path | None]:
    """`--tokenizer`'s value as (kind, file): a kind name (world, 20b, bytes) or the path of a
    World vocabulary (.txt) or a 20B tokenizer (.json), whose kind its suffix says."""
    if spec is None or spec in KINDS:
        return spec, None
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"tokenizer {spec!r} is neither one of {', '.join(KINDS)} nor an existing file")
    if path.suffix == ".txt":
        return "world", path
    if path.suffix == ".json":
        return "20b", path
    raise ModelLoadError(f"tokenizer file {path.name}: expected a World vocabulary (.txt) or a 20B .json")


def load_rwkv_tokenizer(
    vocab_size: int,
    model_path: Path | None = None,
    kind: str | None = None,
    tokenizer_path: Path | None = None,
) -> Tokenizer:
    """The tokenizer for an RWKV model: `kind` (world, 20b, bytes) or told from the vocabulary size."""
    kind = kind or VOCAB_KINDS.get(vocab_size)
    if kind is None:
        raise ModelLoadError(
            f"no RWKV tokenizer is known for a vocabulary of {vocab_size}; name one of {', '.join(KINDS)}"
        )
    if kind not in KINDS:
        raise ModelLoadError(f"unknown RWKV tokenizer {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "bytes":
        tokenizer = byte_tokenizer(vocab_size)
    else:
        file_name = WORLD_VOCAB_FILE if kind == "world" else TOKENIZER_20B_FILE
        path = Path(tokenizer_path) if tokenizer_path else find_tokenizer_file(file_name, model_path)
        if path is None or not path.exists():
            raise ModelLoadError(
                f"the RWKV {kind} tokenizer needs {file_name} beside the model file (or --tokenizer PATH)"
            )
        tokenizer = world_tokenizer(path, vocab_size) if kind == "world" else tokenizer_20b(path, vocab_size)
    largest_id = _largest_token_id(tokenizer)
    if largest_id >= vocab_size:  # its ids would index past the model's embedding
        raise ModelLoadError(
            f"the {kind} tokenizer has ids up to {largest_id}; this model's vocabulary holds {vocab_size}"
        )
    return tokenizer


def _largest_token_id(tokenizer: Tokenizer) -> int:
    if isinstance(tokenizer, ByteTrieTokenizer):
        return max(tokenizer._id_to_bytes)
    return tokenizer.backend.get_vocab_size(with_added_tokens=True) - 1
