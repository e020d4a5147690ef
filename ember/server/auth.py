"""API keys: who may call the server, and which user a request speaks for.

Keys come from `--api-key` (repeatable), `--api-keys-file` (one key per line,
optionally followed by whitespace and a user name; `#` starts a comment) and
EMBER_API_KEY (read by the CLI, never at import). With no key configured every
request is the user "local". Keys are compared in constant time against every
configured key, so timing reveals neither a key nor which one matched.

`AuthMiddleware` answers 401 (OpenAI's shape) on every HTTP route except the
public ones (/health, the page and its static files). WebSocket routes check
their own credentials with `websocket_user`, because browsers cannot send
headers there: the `token` query parameter is accepted as well.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request, WebSocket
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.errors import EmberError
from ember.server.errors import ApiError, error_response

LOCAL_USER = "local"  # the user when the server runs without keys
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def _anonymous_name(key: str) -> str:
    """A stable user id for a key given without a name: never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class ApiKeys:
    users_by_key: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_sources(
        cls, keys: Iterable[str] = (), keys_file: str | Path | None = None, environment_key: str | None = None
    ) -> ApiKeys:
        users: dict[str, str] = {}
        for key in [*keys, *([environment_key] if environment_key else [])]:
            key = key.strip()
            if not key:
                raise EmberError("an API key cannot be empty")
            users[key] = _anonymous_name(key)
        if keys_file is not None:
            users.update(_read_keys_file(Path(keys_file)))
        return cls(users)

    @property
    def enabled(self) -> bool:
        return bool(self.users_by_key)

    def user_for(self, token: str | None) -> str | None:
        """The user of `token`, or None when it matches no key (constant time in the token)."""
        if not self.enabled:
            return LOCAL_USER
        if not token:
            return None
        offered = token.encode()
        found = None
        for key, user in self.users_by_key.items():
            if hmac.compare_digest(offered, key.encode()) and found is None:
                found = user
        return found


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise EmberError(f"cannot read the API keys file {path}: {error.strerror or error}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        key = parts[0]
        user = parts[1].strip() if len(parts) > 1 else _anonymous_name(key)
        if not user:
            raise EmberError(f"{path}:{number}: empty user name")
        users[key] = user
    if not users:
        raise EmberError(f"the API keys file {path} holds no key")
    return users


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_public_path(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AuthMiddleware:
    """Checks `Authorization: Bearer KEY` on HTTP requests; stores the user in `scope["state"]["user"]`."""

    def __init__(self, app: ASGIApp, api_keys: ApiKeys):
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # WebSocket routes call websocket_user themselves
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        user = self.api_keys.user_for(bearer_token(headers.get("authorization")))
        if user is None and not (scope["method"] == "OPTIONS" or is_public_path(scope["path"])):
            message = (
                "invalid API key"
                if headers.get("authorization")
                else "this server needs an API key: send 'Authorization: Bearer KEY'"
            )
            response = error_response(
                401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


def current_user(request: Request) -> str:
    """FastAPI dependency: the stable identity of the request's API key ("local" without keys).

    Raises 401 on a public route reached without a valid key, so a route that
    depends on it is never open by accident.
    """
    user = getattr(request.state, "user", None)
    if user is None:
        api_keys: ApiKeys = request.app.state.api_keys
        user = api_keys.user_for(bearer_token(request.headers.get("authorization")))
    if user is None:
        raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
    return user


def user_for_token(app_state: object, token: str | None) -> str | None:
    """The user of a token given in a WebSocket's first message (None: refuse)."""
    return app_state.api_keys.user_for(token)  # type: ignore[attr-defined]


def websocket_user(websocket: WebSocket) -> str | None:
    """The user of a WebSocket from its Authorization header or `token` query parameter (None: refuse).

    Without keys configured this is always "local". A route that also accepts a
    first `{"type": "auth", "token"}` message calls `user_for_token` with it
    when this returns None.
    """
    api_keys: ApiKeys = websocket.app.state.api_keys
    token = bearer_token(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    return api_keys.user_for(token)
