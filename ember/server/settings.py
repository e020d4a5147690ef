"""What `ember serve` was asked for: address, keys, limits, timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.server.auth import ApiKeys

DEFAULT_HOST = (
    "127.0.0.1"  # loopback unless told otherwise: a model server is not a public service by default
)
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class ServerSettings:
    model_name: str = "smollm2"  # the id /v1/models reports and requests may name
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    cors_origins: list[str] = field(default_factory=list)
    queue_timeout: float = 60.0  # seconds a request may wait for admission before a 503
    drain_timeout: float = 30.0  # seconds running replies get to finish after SIGTERM / Ctrl-C
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    store_path: Path | None = None  # the sessions' SQLite file (--data-dir or EMBER_HOME)
    model_aliases: list[str] = field(default_factory=list)  # other names accepted in `model`
