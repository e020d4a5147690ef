"""Start a real `ember serve` process for a test, and stop it afterwards.

    from server_harness import EmberServer, running_server

    with EmberServer(model="smollm2", args=["--api-key", "k"], env={"EMBER_HOME": str(tmp_path)}) as server:
        httpx.get(server.base_url + "/health")
        server.output()            # what it printed so far (stdout and stderr together)

    # as a pytest fixture:
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        with running_server(args=["--data-dir", str(tmp_path_factory.mktemp("data"))]) as server:
            yield server

The process binds 127.0.0.1 on a free port, and `start()` waits (bounded)
until `GET /health` answers 200; it raises with the process's output if the
server exits or does not get ready in time. `stop()` (and leaving the `with`)
sends SIGTERM, waits `grace` seconds, then SIGKILLs; it returns the exit code.
`kill()` sends SIGKILL at once (for crash tests). `restart()` starts a new
process with the same arguments on the same port and data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STORY_MODEL = REPO_ROOT.parent / "shared" / "models" / "story"
READY_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmberServer:
    """A real `ember serve` child process on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        model: str | os.PathLike = "smollm2",
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
        grace: float = 15.0,
        api_key: str | None = None,
        threads: int | None = 1,
    ):
        self.model = str(model)
        self.args = list(args or [])
        self.env = dict(env or {})
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.api_key = api_key  # sent by `client()` and `headers` when set
        self.threads = threads
        self.process: subprocess.Popen | None = None
        self._output: list[str] = []
        self._output_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._home: tempfile.TemporaryDirectory | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "ember.cli.main", "serve", "--model", self.model]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.threads is not None:
            command += ["--threads", str(self.threads)]
        if self.api_key and "--api-key" not in self.args:
            command += ["--api-key", self.api_key]
        return command + self.args

    def start(self) -> EmberServer:
        environment = dict(os.environ)
        if "EMBER_HOME" not in self.env and "--data-dir" not in self.args:
            # Never the user's own sessions: a private data directory unless the test chose one.
            self._home = tempfile.TemporaryDirectory(prefix="ember-serve-test-")
            environment["EMBER_HOME"] = self._home.name
        environment.pop("EMBER_API_KEY", None)
        environment.update(self.env)
        environment["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            with self._output_lock:
                self._output.append(line)

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr interleaved)."""
        with self._output_lock:
            return "".join(self._output)

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ember serve exited with {self.process.returncode} before it was ready:\n{self.output()}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"ember serve was not ready within {timeout or self.ready_timeout} s:\n{self.output()}"
        )

    def client(self, timeout: float = 60.0) -> httpx.Client:
        """An httpx client for this server (with the API key when one is set); close it after use."""
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def openai(self, **options):
        """An official `openai.OpenAI` client for this server."""
        import openai

        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 60.0)
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", **options)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the process is still running after `timeout` seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if self.wait(self.grace if grace is None else grace) is None:
                self.process.kill()
                self.process.wait(timeout=10)
        self._finish()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash), keeping the data directory for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.process.returncode if self.process else None

    def restart(self) -> EmberServer:
        """Stop (if running) and start again with the same arguments, port and data directory."""
        home = self._home
        self._home = None
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self._home = home
        if home is not None:
            self.env.setdefault("EMBER_HOME", home.name)
        self._output = []
        return self.start()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def __enter__(self) -> EmberServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(**options) -> Iterator[EmberServer]:
    """`EmberServer(**options)` started, and stopped on exit: for pytest fixtures (`yield` inside)."""
    server = EmberServer(**options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
