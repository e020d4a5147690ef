"""Which files of a Hub repository make the model a user asked for (`REPO`, `REPO:QUANT`, `--file PATTERN`).

Pure functions of the repository's file list, so every rule is testable without a server:
- `REPO:QUANT` picks the single-file GGUF whose name carries that quantization (`...Q4_K_M.gguf`);
- `--file PATTERN` picks the files matching a glob: one GGUF, or safetensors weights (plus the folder's
  config and tokenizer files);
- `REPO` alone takes the safetensors folder when there is one, else the only GGUF, else the Q4_K_M one
  (Ollama's default), else asks the user to choose and lists the choices.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ember.errors import EmberError
from ember.model_store import SAFETENSORS_TAG

DEFAULT_QUANT = "Q4_K_M"
# Files an HF folder needs beside its weights (those present are fetched; config.json is required).
FOLDER_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_QUANT = re.compile(r"(?:^|[._-])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)$", re.IGNORECASE)
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class SelectionError(EmberError):
    """The repository has no file (or more than one) matching what was asked."""


@dataclass
class Selection:
    tag: str  # the quantization ("Q4_K_M") or "safetensors": the model's name is repo:tag
    files: list[str]  # repository paths to download
    load: str  # the file the loader opens ("" for the folder itself)
    note: str = ""  # said to the user when ember chose among several files


def quant_of(file_name: str) -> str | None:
    """The quantization a GGUF file's name carries: `SmolLM2-135M.Q4_1.gguf` -> `Q4_1`."""
    stem = PurePosixPath(file_name).name
    stem = _SPLIT_PART.sub(".gguf", stem)
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    match = _QUANT.search(stem)
    return match.group(1).upper() if match else None


def select_files(repo_id: str, names: list[str], tag: str | None, pattern: str | None) -> Selection:
    """The files to fetch for `repo_id` given its file list; `SelectionError` says what to ask instead."""
    if tag is not None and pattern is not None:
        raise SelectionError("give either REPO:QUANT or --file PATTERN, not both")
    ggufs = [name for name in names if name.lower().endswith(".gguf") and "mmproj" not in name.lower()]
    if pattern is not None:
        return _select_by_pattern(repo_id, names, pattern)
    if tag is not None:
        if tag.lower() == SAFETENSORS_TAG:
            return _select_folder(repo_id, names, _top_level_weights(names))
        matches = [name for name in ggufs if quant_of(name) == tag.upper()]
        if not matches:
            raise SelectionError(f"{repo_id} has no GGUF file in {tag}; {_available(repo_id, ggufs, names)}")
        return _select_gguf(repo_id, matches)
    weights = _top_level_weights(names)
    if weights and "config.json" in names:
        return _select_folder(repo_id, names, weights)
    single = [name for name in ggufs if not _SPLIT_PART.search(name)]
    if len(single) == 1:
        return _select_gguf(repo_id, single)
    default = [name for name in single if quant_of(name) == DEFAULT_QUANT]
    if len(default) == 1:
        selection = _select_gguf(repo_id, default)
        others = sorted({quant_of(name) or name for name in single} - {DEFAULT_QUANT})
        selection.note = f"picked {DEFAULT_QUANT} (also available: {', '.join(others)})"
        return selection
    if ggufs:
        raise SelectionError(f"{repo_id} has several GGUF files; {_available(repo_id, ggufs, names)}")
    raise SelectionError(
        f"{repo_id} has neither GGUF files nor safetensors weights with a config.json (ember reads those two)"
    )


def _select_by_pattern(repo_id: str, names: list[str], pattern: str) -> Selection:
    lowered = pattern.lower()
    matches = [
        name
        for name in names
        if fnmatch.fnmatchcase(name.lower(), lowered)
        or fnmatch.fnmatchcase(PurePosixPath(name).name.lower(), lowered)
    ]
    if not matches:
        listing = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
        raise SelectionError(f"no file of {repo_id} matches {pattern!r}; its files: {listing}")
    ggufs = [name for name in matches if name.lower().endswith(".gguf")]
    if ggufs:
        if len(ggufs) > 1:
            raise SelectionError(f"{pattern!r} matches several GGUF files of {repo_id}: {', '.join(ggufs)}")
        return _select_gguf(repo_id, ggufs)
    weights = [name for name in matches if name.endswith(".safetensors")]
    if not weights:
        raise SelectionError(f"{pattern!r} matches no .gguf or .safetensors file of {repo_id}")
    return _select_folder(repo_id, names, weights)


def _select_gguf(repo_id: str, matches: list[str]) -> Selection:
    if any(_SPLIT_PART.search(name) for name in matches):
        raise SelectionError(
            f"{matches[0]} is split into parts ({len(matches)} files); ember reads single-file GGUFs: "
            "choose another quantization"
        )
    if len(matches) > 1:
        raise SelectionError(
            f"several GGUF files of {repo_id} match: {', '.join(matches)}; choose one with --file"
        )
    name = matches[0]
    tag = quant_of(name) or PurePosixPath(name).name[: -len(".gguf")]
    return Selection(tag=tag, files=[name], load=PurePosixPath(name).name)


def _select_folder(repo_id: str, names: list[str], weights: list[str]) -> Selection:
    if not weights:
        raise SelectionError(f"{repo_id} has no safetensors weights")
    if "config.json" not in names:
        raise SelectionError(f"{repo_id} has safetensors weights but no config.json")
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        raise SelectionError(f"{repo_id} has no tokenizer (tokenizer.json or tokenizer.model)")
    files = [name for name in FOLDER_FILES if name in names] + sorted(weights)
    return Selection(tag=SAFETENSORS_TAG, files=files, load="")


def _top_level_weights(names: list[str]) -> list[str]:
    return [name for name in names if "/" not in name and name.endswith(".safetensors")]


def _available(repo_id: str, ggufs: list[str], names: list[str]) -> str:
    quants = sorted({quant for quant in (quant_of(name) for name in ggufs) if quant})
    choices = [f"{repo_id}:{quant}" for quant in quants]
    if _top_level_weights(names) and "config.json" in names:
        choices.append(repo_id)
    if not choices:
        return "it has no GGUF file with a quantization in its name (use --file PATTERN)"
    return f"choose one of: {', '.join(choices)}"
