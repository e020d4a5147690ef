"""Text <-> token ids, with the special tokens a model needs to know about.

Wraps a `tokenizers.Tokenizer` (from `tokenizer.json` or built from GGUF
metadata) and adds what the files spread over several places: bos/eos ids,
whether to prepend bos, and the chat template text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from ember.errors import ModelLoadError


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos: bool,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self.special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, bos is prepended when the model wants it.

        Special-token text inside `text` (such as `<|im_start|>` in a rendered
        chat template) is always parsed as the special token, as HF does.
        """
        if not isinstance(text, str):  # the backend's own message names a Rust type
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    @classmethod
    def from_hf_folder(cls, folder: Path, bos_token_id: int | None, eos_token_ids: list[int]) -> Tokenizer:
        """Load `tokenizer.json` plus the special-token facts of `tokenizer_config.json`."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the library raises a bare Exception on bad JSON
            raise ModelLoadError(f"cannot read {tokenizer_file}: {error}") from None

        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        bos_token_id = _token_id(backend, tokenizer_config.get("bos_token"), bos_token_id)
        config_eos = _token_id(backend, tokenizer_config.get("eos_token"), None)
        eos_ids = list(eos_token_ids)
        if config_eos is not None and config_eos not in eos_ids:
            eos_ids.append(config_eos)
        generation_config = _read_json(folder / "generation_config.json")
        generation_eos = generation_config.get("eos_token_id")
        for eos in [generation_eos] if isinstance(generation_eos, int) else generation_eos or []:
            if eos not in eos_ids:
                eos_ids.append(eos)

        if "add_bos_token" in tokenizer_config:
            add_bos = bool(tokenizer_config["add_bos_token"])
        else:
            # No explicit setting: do what the tokenizer.json post-processor does.
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == bos_token_id

        chat_template = tokenizer_config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            chat_template = template_file.read_text()
        elif chat_template is None and (folder / "chat_template.json").exists():
            chat_template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(chat_template, list):  # named templates: take the default one
            named = {entry.get("name"): entry.get("template") for entry in chat_template}
            chat_template = named.get("default") or next(iter(named.values()), None)
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            chat_template=chat_template,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from None
    return value if isinstance(value, dict) else {}


def _token_id(backend: tokenizers.Tokenizer, token: Any, default: int | None) -> int | None:
    """Id of a special token given as text or as an AddedToken-style dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return default
