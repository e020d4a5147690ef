"""Who is streaming a reply: a process identity that survives pid reuse.

A reply left in status 'streaming' is either being written right now by a
live process or was cut off when its writer died. The identity is host, pid
and the process's start time (from /proc), so a recycled pid does not pass
for the old writer.
"""

from __future__ import annotations

import os
import socket


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces; the fields after its ')' are plain.
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_identity(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def writer_is_alive(writer: str | None) -> bool:
    """Whether the process that wrote `writer` still runs (unknown or other hosts count as gone)."""
    if not writer:
        return False
    host, _, rest = writer.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit() or start == "?":
        return False
    return _start_time(int(pid_text)) == start


THIS_WRITER = process_identity()
