"""A server process for a benchmark: started on 127.0.0.1, waited for, and never left behind.

The benchmark starts llama-server and `ember serve` as children. However the
benchmark ends (normally, an exception, Ctrl-C, SIGTERM, or even SIGKILL of the
benchmark itself: the child gets SIGTERM from the kernel through
PR_SET_PDEATHSIG), the child is stopped. Its output goes to a log file so a
failure can say why (the last lines, or the signal that killed it).
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ember.errors import EmberError

READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
PR_SET_PDEATHSIG = 1


class ServerFailed(EmberError):
    """A benchmarked server did not start, or died while it was measured."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `with ServerProcess(...)` blocks stop their servers."""

    def handle(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)


class ServerProcess:
    """`with ServerProcess(name, command, port):` runs the server until the block ends."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str = "/health"):
        self.name = name
        self.command = command
        self.port = port
        self.ready_path = ready_path
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="ember-bench-server-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        try:
            self.process = subprocess.Popen(
                self.command,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as error:
            raise ServerFailed(f"could not start {self.name} ({self.command[0]}): {error}") from error
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerFailed(f"{self.name} was not ready within {READY_TIMEOUT_S} s{self._log_tail()}")

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        """ServerFailed, with the reason and the end of its log, if the server has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerFailed(
                f"{self.name} {exit_reason(self.process.returncode)}: {' '.join(self.command)}"
                f"{self._log_tail()}"
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def remove_log(self) -> None:
        Path(self.log.name).unlink(missing_ok=True)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        tail = "\n  ".join(text[-lines:])
        return f"\n  (log {self.log.name}, last lines:)\n  {tail}" if tail else ""
