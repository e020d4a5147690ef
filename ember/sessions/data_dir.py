"""Where ember keeps a user's data (the session store) on disk."""

import os
from pathlib import Path

from ember.errors import EmberError

HOME_VARIABLE = "EMBER_HOME"
SESSIONS_FILENAME = "sessions.sqlite3"


def default_data_dir(override: str | None = None) -> Path:
    """The per-user data directory, created if missing (private to the user).

    Chosen by, first to last: `override` (a command-line flag), $EMBER_HOME,
    $XDG_DATA_HOME/ember, ~/.local/share/ember. The environment is read at call
    time, never at import. A relative $XDG_DATA_HOME is ignored, as the XDG
    specification requires.
    """
    if override:
        directory = Path(override).expanduser()
    elif os.environ.get(HOME_VARIABLE):
        directory = Path(os.environ[HOME_VARIABLE]).expanduser()
    elif os.environ.get("XDG_DATA_HOME") and Path(os.environ["XDG_DATA_HOME"]).is_absolute():
        directory = Path(os.environ["XDG_DATA_HOME"]) / "ember"
    else:
        directory = Path.home() / ".local" / "share" / "ember"
    if directory.exists() and not directory.is_dir():
        raise EmberError(f"data directory {directory} exists but is not a directory")
    try:
        # 0o700: conversations are private; only applies to directories we create.
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise EmberError(f"cannot create data directory {directory}: {error.strerror or error}") from error
    return directory


def default_store_path(override: str | None = None) -> Path:
    """The session store file inside the data directory chosen by `default_data_dir`."""
    return default_data_dir(override) / SESSIONS_FILENAME
