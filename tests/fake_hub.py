"""A Hugging Face Hub on 127.0.0.1 for the `ember pull` tests: the real URL layout, real files, no internet.

It answers what huggingface_hub 2.x asks for, from a thread in the test process:

- `GET /api/models/{repo}[/revision/{rev}]?blobs=true`: the repository's commit and files (size, git blob id,
  LFS sha256), as `HfApi.model_info(files_metadata=True)` reads it;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: small files are served in place with the git blob sha1 as ETag;
  large (LFS) files answer 302 to a second port (the "CDN", another origin, as on the real Hub, so the client
  stops at the redirect and reads `X-Linked-Etag` / `X-Linked-Size` / `X-Repo-Commit` from it);
- `GET /cdn/{sha256}` on the CDN port, with `Range` requests answered 206.

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its exception classes. Tests can make a file's declared sha256 wrong, cut a
transfer after N bytes (optionally refusing the next attempts with 500), and read the log of requests.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_THRESHOLD = 1 << 20  # files this large or larger are "LFS" files (the Hub's rule is by extension/size)
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")


@dataclass
class HubFile:
    name: str
    data: bytes
    sha256: str  # what the Hub declares (a test may make it wrong)
    git_sha1: str

    @property
    def is_lfs(self) -> bool:
        return len(self.data) >= LFS_THRESHOLD


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    token: str | None = None  # a private repo: only this bearer token may read it


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class TransferBreak:
    after_bytes: int  # the first GET of the file stops after this many bytes
    refusals: int = 0  # then this many GETs answer 500 before the file is served again
    stall: threading.Event | None = None  # if set: hold the connection open (sending nothing) until it is set
    used: bool = False


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    breaks: dict[str, TransferBreak] = field(default_factory=dict)  # sha256 -> break

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], token: str | None = None) -> HubRepo:
        hub_files = {}
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            hub_files[name] = HubFile(
                name=name,
                data=data,
                sha256=hashlib.sha256(data).hexdigest(),
                git_sha1=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            )
        commit = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in hub_files.values()))
        repo = HubRepo(repo_id=repo_id, files=hub_files, commit=commit.hexdigest(), token=token)
        self.repos[repo_id] = repo
        return repo

    def corrupt_declared_hash(self, repo_id: str, name: str) -> None:
        """Declare a sha256 the bytes do not have (as if the transfer or the storage corrupted them)."""
        hub_file = self.repos[repo_id].files[name]
        hub_file.sha256 = hashlib.sha256(hub_file.data + b"corrupted").hexdigest()

    def break_transfer(
        self,
        repo_id: str,
        name: str,
        after_bytes: int,
        refusals: int = 0,
        stall: threading.Event | None = None,
    ) -> None:
        hub_file = self.repos[repo_id].files[name]
        self.breaks[hub_file.sha256] = TransferBreak(after_bytes=after_bytes, refusals=refusals, stall=stall)

    def file_by_sha256(self, sha256: str) -> HubFile | None:
        for repo in self.repos.values():
            for hub_file in repo.files.values():
                if hub_file.sha256 == sha256:
                    return hub_file
        return None

    def cdn_gets(self) -> list[Request]:
        return [request for request in self.requests if request.path.startswith("/cdn/")]

    # -- serving ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        handler = _handler_for(self)
        self._hub_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._cdn_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for server in (self._hub_server, self._cdn_server):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Stop serving (idempotent: a test may stop it before its fixture does)."""
        if self._stopped:
            return
        self._stopped = True
        for server in (self._hub_server, self._cdn_server):
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub_server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn_server.server_address[1]}"


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, send_body: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append(
                Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            if match := _CDN.match(path):
                return self._cdn(match.group(1), send_body)
            if match := _INFO.match(path):
                repo = self._repo(match.group(1))
                if repo is not None:
                    self._info(repo, match.group(2), "blobs" in parse_qs(url.query))
                return
            if match := _RESOLVE.match(path):
                repo = self._repo(match.group(1))
                if repo is not None:
                    self._resolve(repo, match.group(2), match.group(3), send_body)
                return
            self._error(404, "", "Not found")

        def _repo(self, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                # The Hub answers 401 RepoNotFound to a private repository without a valid token.
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _info(self, repo: HubRepo, revision: str | None, blobs: bool) -> None:
            if revision not in (None, "main", repo.commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            siblings = []
            for hub_file in repo.files.values():
                sibling: dict = {"rfilename": hub_file.name}
                if blobs:
                    sibling.update(size=len(hub_file.data), blobId=hub_file.git_sha1)
                    if hub_file.is_lfs:
                        sibling["lfs"] = {
                            "sha256": hub_file.sha256,
                            "size": len(hub_file.data),
                            "pointerSize": 134,
                        }
                siblings.append(sibling)
            body = json.dumps(
                {
                    "id": repo.repo_id,
                    "sha": repo.commit,
                    "private": repo.token is not None,
                    "siblings": siblings,
                }
            ).encode()
            self._send(200, {"Content-Type": "application/json"}, body, True)

        def _resolve(self, repo: HubRepo, revision: str, name: str, send_body: bool) -> None:
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            hub_file = repo.files.get(name)
            if hub_file is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            headers = {"X-Repo-Commit": repo.commit}
            if hub_file.is_lfs:
                headers.update(
                    {
                        "Location": f"{hub.cdn_url}/cdn/{hub_file.sha256}",
                        "X-Linked-Etag": f'"{hub_file.sha256}"',
                        "X-Linked-Size": str(len(hub_file.data)),
                        "ETag": f'"{hub_file.git_sha1}"',
                    }
                )
                return self._send(302, headers, b"", send_body)
            headers.update({"ETag": f'"{hub_file.git_sha1}"', "Content-Type": "application/octet-stream"})
            self._send(200, headers, hub_file.data, send_body)

        def _cdn(self, sha256: str, send_body: bool) -> None:
            hub_file = hub.file_by_sha256(sha256)
            if hub_file is None:
                return self._error(404, "", "Not found")
            data, start = hub_file.data, 0
            transfer_break = hub.breaks.get(sha256)
            if (
                send_body
                and transfer_break is not None
                and transfer_break.used
                and transfer_break.refusals > 0
            ):
                transfer_break.refusals -= 1
                return self._error(500, "", "Internal error")
            if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                start = int(match.group(1))
                if start >= len(data):
                    return self._error(416, "", "Range not satisfiable")
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            status = 200
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if send_body and transfer_break is not None and not transfer_break.used:
                transfer_break.used = True
                return self._send_broken(status, headers, body, transfer_break)
            self._send(status, headers, body, send_body)

        def _send(self, status: int, headers: dict[str, str], body: bytes, send_body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                view = memoryview(body)
                for offset in range(0, len(body), 1 << 20):
                    self.wfile.write(view[offset : offset + (1 << 20)])

        def _send_broken(self, status: int, headers: dict, body: bytes, broken: TransferBreak) -> None:
            """Promise the whole body, send part of it, (stall,) and drop the connection."""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body[: broken.after_bytes])
                self.wfile.flush()
            except OSError:  # the client went away first
                pass
            if broken.stall is not None:
                broken.stall.wait(timeout=120)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _error(self, status: int, code: str, message: str) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": message}).encode(), self.command != "HEAD")

    return Handler
