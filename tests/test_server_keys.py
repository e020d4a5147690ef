"""Keys, users and startup errors, in process or with a process that never loads a model."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from ember.errors import EmberError
from ember.server.auth import LOCAL_USER, ApiKeys, AuthMiddleware, bearer_token, current_user, websocket_user


def test_keys_from_flags_file_and_environment(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha-key alice\n\n# a comment\nbeta-key   bob smith\ngamma-key\n")
    keys = ApiKeys.from_sources(["flag-key"], keys_file, environment_key="env-key")
    assert keys.enabled
    assert keys.user_for("alpha-key") == "alice"
    assert keys.user_for("beta-key") == "bob smith"
    anonymous = keys.user_for("gamma-key")
    assert anonymous.startswith("key-") and "gamma" not in anonymous
    assert anonymous == ApiKeys.from_sources(["gamma-key"]).user_for("gamma-key")  # stable
    assert keys.user_for("flag-key") != keys.user_for("env-key")
    for wrong in ("", None, "alpha-ke", "alpha-keyy", "ALPHA-KEY"):
        assert keys.user_for(wrong) is None
    assert ApiKeys().user_for(None) == LOCAL_USER


def test_bad_key_sources_are_one_line_errors(tmp_path):
    with pytest.raises(EmberError, match="cannot read the API keys file"):
        ApiKeys.from_sources([], tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(EmberError, match="holds no key"):
        ApiKeys.from_sources([], empty)
    with pytest.raises(EmberError, match="cannot be empty"):
        ApiKeys.from_sources(["  "])
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "serve", "--api-keys-file", str(tmp_path / "missing")]
        + ["--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: cannot read the API keys file")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_current_user_and_websocket_token():
    keys = ApiKeys({"k1": "alice"})
    app = FastAPI()
    app.state.api_keys = keys

    @app.get("/whoami")
    async def whoami(user: str = Depends(current_user)) -> dict:
        return {"user": user}

    @app.websocket("/socket")
    async def socket(websocket: WebSocket) -> None:
        user = websocket_user(websocket)
        if user is None:
            await websocket.close(code=4401)
            return
        await websocket.accept()
        await websocket.send_json({"user": user})
        await websocket.close()

    app.add_middleware(AuthMiddleware, api_keys=keys)
    client = TestClient(app)
    assert client.get("/whoami", headers={"Authorization": "Bearer k1"}).json() == {"user": "alice"}
    assert client.get("/whoami").status_code == 401
    with client.websocket_connect("/socket?token=k1") as connection:
        assert connection.receive_json() == {"user": "alice"}
    with client.websocket_connect("/socket", headers={"Authorization": "Bearer k1"}) as connection:
        assert connection.receive_json() == {"user": "alice"}
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/socket?token=wrong") as connection:
            connection.receive_json()


def test_a_taken_port_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ember.cli.main",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
