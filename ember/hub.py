"""`ember pull`: download a model from the Hugging Face Hub into the model store, resumably and verified.

huggingface_hub does the talking: `HfApi.model_info` lists the repository's files at one commit,
`get_hf_file_metadata` HEADs each file (its ETag, size and CDN location; for LFS files the ETag is the
sha256), and `http_get` streams it with its own progress bar, its own retries and `Range` resume after a
broken connection. Two things huggingface_hub 2.x does not do are done here:

- **resume across runs**: its downloads go to a process-unique temporary file that is deleted on failure, so
  here each file streams into `<models>/.downloads/<etag>.part`, which survives Ctrl-C, a lost network or a
  full disk; the next `ember pull` continues from its size with a `Range` request;
- **checksum verification**: it checks only the size; here every file is hashed against its ETag (sha256 for
  LFS files, the git blob sha1 for small ones) and a mismatch deletes the download and stops the pull.

The files move into the store, and the manifest that makes them a model is written, only once every file is
complete and verified. huggingface_hub is imported only here, so no other command can reach the network.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from ember.errors import EmberError
from ember.hub_selection import Selection, select_files
from ember.model_store import (
    LocalModel,
    downloads_directory,
    install_variant,
    model_name,
    parse_model_name,
    read_manifest,
    resolve_pulled_model,
    variant_directory,
    write_manifest,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 8 << 20
_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached",
}


class PullError(EmberError):
    """A download could not be done: the repository, the network, the token or the disk."""


class ChecksumMismatchError(PullError):
    """A downloaded file's bytes do not hash to what the Hub declares."""


@dataclass
class RemoteFile:
    name: str  # path in the repository
    size: int | None
    url: str  # where the bytes are (the CDN for LFS files)
    etag: str  # sha256 (LFS) or git blob sha1
    same_origin: bool  # the token may be sent to `url`


def pull(
    spec: str,
    file_pattern: str | None = None,
    revision: str = "main",
    root: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> LocalModel:
    """Fetch `owner/repo[:QUANT]` (or its files matching `file_pattern`) into the store; returns the model."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    from huggingface_hub import HfApi, constants

    repo_id, tag = parse_model_name(spec)
    if constants.is_offline_mode():
        raise PullError("HF_HUB_OFFLINE is set, so pull cannot reach the Hub; unset it to download")
    with _hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    names = [sibling.rfilename for sibling in info.siblings or []]
    selection = select_files(repo_id, names, tag, file_pattern)
    if selection.note:
        say(selection.note)
    name = model_name(repo_id, selection.tag)
    key = f"{repo_id.replace('/', '--')}--{selection.tag}"
    downloads = downloads_directory(root)
    parts_directory = downloads / key  # this variant's .part files: only its own (locked) pull touches them
    parts_directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(downloads / f"{key}.lock", name):
        directory = variant_directory(repo_id, selection.tag, root)
        if _is_current(read_manifest(directory), info.sha, selection, directory):
            say(f"{name} is up to date (revision {info.sha[:12]})")
            return resolve_pulled_model(name, root)
        with _hub_errors(repo_id, revision):
            remote_files = [_remote_file(repo_id, info.sha, file_name) for file_name in selection.files]
        _check_disk_space(remote_files, parts_directory)
        try:
            parts = [_download(remote, parts_directory, say) for remote in remote_files]
        except ChecksumMismatchError:
            # The repository (or a proxy) serves damaged data: start the next attempt from nothing.
            shutil.rmtree(parts_directory, ignore_errors=True)
            raise
        manifest = {
            "name": name,
            "repo_id": repo_id,
            "revision": info.sha,
            "load": selection.load,
            "files": [
                {"name": PurePosixPath(r.name).name, "repo_path": r.name, "size": r.size, "etag": r.etag}
                for r in remote_files
            ],
        }
        _install(parts, manifest, downloads, repo_id, selection.tag, root)
        shutil.rmtree(parts_directory, ignore_errors=True)
    return resolve_pulled_model(name, root)


def _install(
    parts: list[Path], manifest: dict[str, Any], downloads: Path, repo_id: str, tag: str, root: Path | None
) -> None:
    """Verified parts -> a staging folder with the manifest -> the store, in renames (same file system)."""
    staging = downloads / f"{uuid.uuid4().hex[:12]}.staging"
    staging.mkdir()
    try:
        for part, entry in zip(parts, manifest["files"], strict=True):
            os.replace(part, staging / entry["name"])
        write_manifest(staging, manifest)
        install_variant(staging, repo_id, tag, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_current(
    manifest: dict[str, Any] | None, commit: str | None, selection: Selection, directory: Path
) -> bool:
    if manifest is None or commit is None or manifest.get("revision") != commit:
        return False
    wanted = {PurePosixPath(name).name for name in selection.files}
    present = {entry.get("name") for entry in manifest.get("files", [])}
    return wanted <= present and all((directory / file_name).exists() for file_name in wanted)


def _remote_file(repo_id: str, commit: str, file_name: str) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, file_name, revision=commit)
    metadata = get_hf_file_metadata(url, retry_on_errors=True)
    if not metadata.etag:
        raise PullError(f"the Hub gave no checksum (ETag) for {file_name}; refusing an unverifiable download")
    location = metadata.location or url
    same_origin = urlparse(location).netloc == urlparse(url).netloc
    return RemoteFile(file_name, metadata.size, location, metadata.etag, same_origin)


def _check_disk_space(remote_files: list[RemoteFile], downloads: Path) -> None:
    needed = 0
    for remote in remote_files:
        part = _part_path(downloads, remote)
        have = part.stat().st_size if part.exists() else 0
        needed += max((remote.size or 0) - have, 0)
    free = free_bytes(downloads)
    if needed > free:
        raise PullError(
            f"not enough disk space: the download needs {_mib(needed)} and {downloads} has {_mib(free)} free"
        )


def free_bytes(directory: Path) -> int:
    """Free space where the downloads go (a function of its own so tests can pretend the disk is full)."""
    return shutil.disk_usage(directory).free


def _part_path(downloads: Path, remote: RemoteFile) -> Path:
    return downloads / f"{remote.etag}.part"


def _download(remote: RemoteFile, downloads: Path, say: Callable[[str], None]) -> Path:
    """Stream one file into its `.part` file (continuing a previous run's), verify it, return the path."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = _part_path(downloads, remote)
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have > remote.size:
        part.unlink()
        have = 0
    if have and have != remote.size:
        say(f"resuming {remote.name} at {_mib(have)} of {_mib(remote.size or 0)}")
    headers = build_hf_headers()
    if not remote.same_origin:  # a signed CDN address: the token stays with the Hub
        headers.pop("authorization", None)
    try:
        with open(part, "ab") as file:
            http_get(
                remote.url,
                file,
                resume_size=have,
                headers=headers,
                expected_size=remote.size,
                displayed_filename=PurePosixPath(remote.name).name,
            )
    except OSError as error:
        got = part.stat().st_size if part.exists() else 0
        if error.errno in _DISK_ERRORS:
            raise PullError(
                f"{_DISK_ERRORS[error.errno]}: {remote.name} stopped at {_mib(got)} of "
                f"{_mib(remote.size or 0)} in {downloads}; free some space and run the same `ember pull` "
                "again to resume"
            ) from None
        if str(error).startswith("Consistency check failed"):  # the server sent more or less than it said
            part.unlink(missing_ok=True)
            raise PullError(
                f"{remote.name} arrived with the wrong size and was discarded; pull again"
            ) from None
        raise _interrupted(remote, got, error) from None
    except Exception as error:  # httpx2 transport errors are not OSErrors
        got = part.stat().st_size if part.exists() else 0
        if type(error).__module__.split(".")[0] in ("httpx2", "httpx", "huggingface_hub"):
            raise _interrupted(remote, got, error) from None
        raise
    _verify(part, remote)
    return part


def _interrupted(remote: RemoteFile, got: int, error: BaseException) -> PullError:
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", None):
        reason = f"the server answered {response.status_code}"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PullError(
        f"download of {remote.name} stopped at {_mib(got)} of {_mib(remote.size or 0)} ({reason}); "
        "run the same `ember pull` again to resume"
    )


def _verify(part: Path, remote: RemoteFile) -> None:
    """Hash the whole file against its ETag; a mismatch deletes it (it can never become a model)."""
    etag = remote.etag.lower()
    if _SHA256.fullmatch(etag):
        digest, kind = hashlib.sha256(), "sha256"
    elif _GIT_SHA1.fullmatch(etag):
        digest, kind = hashlib.sha1(b"blob %d\0" % part.stat().st_size), "git sha1"
    else:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(f"{remote.name} has an ETag that is not a checksum ({remote.etag!r})")
    with open(part, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"checksum mismatch for {remote.name}: the Hub declares {kind} {etag[:16]}..., the download "
            f"hashes to {digest.hexdigest()[:16]}...; the file was discarded (pull again; if it repeats, the "
            "repository or a proxy is serving damaged data)"
        )


@contextmanager
def _exclusive(lock_path: Path, name: str):
    """One pull of a model at a time: two would append to the same `.part` files."""
    with open(lock_path, "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another `ember pull` is downloading {name} right now") from None
        yield


@contextmanager
def _hub_errors(repo_id: str, revision: str):
    """huggingface_hub's exceptions (many lines, with URLs) as one line a user can act on."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        raise PullError(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} and pull with a token "
            "(set HF_TOKEN or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401 and get_token() is None:
            raise PullError(
                f"repository {repo_id} was not found on {endpoint}, or it is private: to pull a private "
                "repository set HF_TOKEN (or run `hf auth login`)"
            ) from None
        if status == 401:
            raise PullError(f"repository {repo_id} was not found, or your token cannot read it") from None
        raise PullError(f"repository {repo_id} was not found on {endpoint}") from None
    except RevisionNotFoundError:
        raise PullError(f"{repo_id} has no revision {revision!r}") from None
    except RemoteEntryNotFoundError as error:
        raise PullError(f"a file of {repo_id} is missing on the Hub: {error.response.url}") from None
    except OfflineModeIsEnabled:
        raise PullError("HF_HUB_OFFLINE is set, so pull cannot reach the Hub; unset it to download") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError) as error:
        raise PullError(f"cannot reach the Hub at {endpoint} (no network?): {error}") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "an error"
        raise PullError(
            f"the Hub answered {status} for {repo_id}: {str(error).strip().splitlines()[0]}"
        ) from None


def _mib(num_bytes: int) -> str:
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.2f} GiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"
