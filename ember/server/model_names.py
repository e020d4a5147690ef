"""Which `model` names a request may use: the served id, its aliases, the file's name."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ember.server.errors import ApiError


def accepted_model_names(app: FastAPI) -> set[str]:
    settings = app.state.settings
    names = {settings.model_name, *settings.model_aliases}
    handle = app.state.service.handle
    if handle is not None:
        path = Path(handle.info.path)
        names.update({str(path), path.name, path.stem})
    return names


def check_model_name(app: FastAPI, name: str | None) -> None:
    """404 in OpenAI's shape for a model this server does not serve (None or "" means the served one)."""
    if not name:
        return
    if name not in accepted_model_names(app):
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {app.state.settings.model_name!r}",
            param="model",
            code="model_not_found",
        )
