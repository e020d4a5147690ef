"""Where pulled models live, what they are called, and how they are listed and removed.

A pulled model is a folder `<models dir>/<owner>/<repo>/<tag>/` holding the downloaded files and a
manifest (`ember-model.json`, written last, so a folder without one is not a model). Names follow Ollama:
`owner/repo:Q4_K_M` for a GGUF quantization, `owner/repo` for a safetensors folder (tag `safetensors`);
`owner/repo` alone also finds a repository's only pulled variant. Downloads in progress live in
`<models dir>/.downloads/` and are moved in only once every file is complete and verified.

Nothing here touches the network: `ember list`, `ember rm` and `--model NAME` work offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import EmberError, ModelLoadError
from ember.model_summary import ModelSummary, folder_size, summarize_model

MANIFEST_FILE = "ember-model.json"
DOWNLOADS_DIR = ".downloads"
SAFETENSORS_TAG = "safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAG = re.compile(r"[\w.-]+")


class ModelNotFoundError(ModelLoadError):
    """No local model has that name."""


@dataclass
class LocalModel:
    """One model `ember list` shows: a pulled one or a built-in one."""

    name: str  # what --model accepts
    path: Path  # what the loader opens: a .gguf file or an HF folder
    directory: Path | None  # the store folder `ember rm` deletes (None for built-in models)
    summary: ModelSummary | None  # None when the files could not be read
    error: str | None = None  # why the summary is missing
    repo_id: str | None = None
    revision: str | None = None  # the Hub commit it was pulled at

    @property
    def builtin(self) -> bool:
        return self.directory is None

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "name": self.name,
            "path": str(self.path),
            "builtin": self.builtin,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "architecture": summary.architecture if summary else None,
            "parameters": summary.num_parameters if summary else None,
            "format": summary.format if summary else None,
            "quantization": summary.quantization if summary else None,
            "size_bytes": summary.size_bytes if summary else None,
            "error": self.error,
        }


def models_dir() -> Path:
    """The store's root, chosen as the session store's data directory is (read at call time, not created):
    $EMBER_HOME/models, $XDG_DATA_HOME/ember/models or ~/.local/share/ember/models."""
    if os.environ.get("EMBER_HOME"):
        return Path(os.environ["EMBER_HOME"]).expanduser() / "models"
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "ember" / "models"
    return Path.home() / ".local" / "share" / "ember" / "models"


def parse_model_name(name: str) -> tuple[str, str | None]:
    """`owner/repo[:TAG]` -> (repo_id, tag or None); `EmberError` for anything else."""
    repo_id, _, tag = name.strip().partition(":")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise EmberError(f"{name!r} is not a model name: expected owner/repo or owner/repo:QUANT")
    if tag and (not _TAG.fullmatch(tag) or tag.startswith(".")):
        raise EmberError(f"{name!r} has a malformed tag {tag!r} (letters, digits, '_', '-', '.')")
    return repo_id, tag or None


def model_name(repo_id: str, tag: str) -> str:
    return repo_id if tag == SAFETENSORS_TAG else f"{repo_id}:{tag}"


def variant_directory(repo_id: str, tag: str, root: Path | None = None) -> Path:
    return (root or models_dir()) / repo_id / tag


def find_pulled_model(name: str, root: Path | None = None) -> Path | None:
    """The path to load for a pulled model's name, or None if `name` is not one (never an error for
    text that is not a name or a repository never pulled: the loader then reports the missing path; an
    ambiguous or unknown variant of a pulled repository is an error naming the variants there are)."""
    try:
        repo_id, _ = parse_model_name(name)
    except EmberError:
        return None
    if not any(model.repo_id.lower() == repo_id.lower() for model in _pulled_models(root)):
        return None
    return resolve_pulled_model(name, root).path


def resolve_pulled_model(name: str, root: Path | None = None) -> LocalModel:
    """The pulled model called `name`; `ModelNotFoundError` with the near names when there is none."""
    repo_id, tag = parse_model_name(name)
    candidates = [model for model in _pulled_models(root) if model.repo_id.lower() == repo_id.lower()]
    if tag is not None:
        for model in candidates:
            if model.name.lower() == model_name(repo_id, tag).lower() or (
                model.directory.name.lower() == tag.lower()
            ):
                return model
    else:
        plain = [model for model in candidates if model.directory.name == SAFETENSORS_TAG]
        if plain or len(candidates) == 1:
            return (plain or candidates)[0]
    known = ", ".join(model.name for model in candidates)
    if len(candidates) > 1 and tag is None:
        raise ModelNotFoundError(f"{name!r} has several pulled variants; name one: {known}")
    hint = f" (pulled: {known})" if known else "; see `ember list`, or fetch it with `ember pull`"
    raise ModelNotFoundError(f"no pulled model named {name!r}{hint}")


def list_models(root: Path | None = None, include_builtin: bool = True) -> list[LocalModel]:
    """Every local model: the installed built-in ones first, then the pulled ones by name, each described
    from its files (a damaged one is listed with its error rather than failing the listing)."""
    models = _builtin_models() if include_builtin else []
    pulled = sorted(_pulled_models(root), key=lambda model: model.name.lower())
    for model in models + pulled:
        if model.error is not None:
            continue
        try:
            model.summary = summarize_model(model.path)
        except EmberError as error:
            model.error = str(error)
        except OSError as error:
            model.error = f"unreadable: {error.strerror or error}"
    return models + pulled


def removable_model(name: str, root: Path | None = None) -> LocalModel:
    """The pulled model `ember rm NAME` would delete; an error for a built-in or unknown name."""
    from ember.loader import BUILTIN_MODELS

    if name.lower() in BUILTIN_MODELS:
        raise EmberError(
            f"{name!r} is a built-in model (installed as a Python package); `ember rm` removes pulled models"
        )
    return resolve_pulled_model(name, root)


def remove_model(name: str, root: Path | None = None) -> LocalModel:
    """Delete a pulled model's folder (and the repository's folders left empty); returns what it removed."""
    model = removable_model(name, root)
    # Move it out of the store first: a half-deleted folder must never look like a model.
    trash = model.directory.parent / f".removing-{uuid.uuid4().hex[:8]}"
    os.replace(model.directory, trash)
    shutil.rmtree(trash, ignore_errors=True)
    store_root = (root or models_dir()).resolve()
    parent = model.directory.parent
    while parent.resolve() != store_root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return model


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Written last by `pull`, atomically: its presence is what makes the folder a model."""
    temporary = directory / f"{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, directory / MANIFEST_FILE)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def install_variant(staging: Path, repo_id: str, tag: str, root: Path | None = None) -> Path:
    """Move a complete, verified staging folder into its place, replacing an older pull of the same name."""
    destination = variant_directory(repo_id, tag, root)
    destination.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if destination.exists():
        old = destination.parent / f".replacing-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
    os.replace(staging, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return destination


def downloads_directory(root: Path | None = None) -> Path:
    return (root or models_dir()) / DOWNLOADS_DIR


def store_size(model: LocalModel) -> int:
    return folder_size(model.directory or model.path)


def _pulled_models(root: Path | None) -> list[LocalModel]:
    root = root or models_dir()
    models = []
    for manifest_path in sorted(root.glob(f"*/*/*/{MANIFEST_FILE}")):
        directory = manifest_path.parent
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue
        manifest = read_manifest(directory)
        if manifest is None:
            continue
        repo_id = f"{directory.parent.parent.name}/{directory.parent.name}"
        load_path = directory / manifest.get("load", "")
        models.append(
            LocalModel(
                name=model_name(repo_id, directory.name),
                path=load_path if manifest.get("load") else directory,
                directory=directory,
                summary=None,
                repo_id=manifest.get("repo_id", repo_id),
                revision=manifest.get("revision"),
            )
        )
    return models


def _builtin_models() -> list[LocalModel]:
    """The built-in names whose package is installed, found without importing the package (and without
    anything that would build or assemble a file: listing must stay cheap)."""
    from ember.loader import BUILTIN_MODELS

    models = []
    for name, entry in BUILTIN_MODELS.items():
        try:
            _, module, file_name = entry
        except (TypeError, ValueError):
            continue
        spec = importlib.util.find_spec(module)
        if spec is None:
            continue
        for location in list(spec.submodule_search_locations or []):
            candidate = Path(location) / file_name
            if candidate.exists():
                models.append(LocalModel(name=name, path=candidate, directory=None, summary=None))
                break
        else:
            # A chunk package (gemma3): its file is put together in ember's cache on first use.
            from ember.formats.gguf_chunks import models_cache_dir

            assembled = models_cache_dir() / file_name
            model = LocalModel(name=name, path=assembled, directory=None, summary=None)
            if not assembled.exists():
                model.error = "installed; assembled into this file on first use"
            models.append(model)
    return models
