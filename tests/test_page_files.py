"""The page's shipped files: complete, local-only, and what web/src builds to (no browser, no model)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STATIC = REPO_ROOT / "ember" / "server" / "static"
WEB = REPO_ROOT / "web"


def test_the_page_ships_its_files():
    index = (STATIC / "index.html").read_text(encoding="utf-8")
    referenced = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert referenced, "index.html references no files"
    for reference in referenced:
        assert reference.startswith("static/"), f"{reference}: the page loads only its own files"
        assert (STATIC / reference.removeprefix("static/")).is_file(), f"{reference} is missing"
    assert 'type="module" src="static/app.js"' in index


def test_the_page_fetches_nothing_from_outside():
    index = (STATIC / "index.html").read_text(encoding="utf-8")
    assert "default-src 'self'" in index  # the page's own policy refuses other origins
    styles = (STATIC / "app.css").read_text(encoding="utf-8")
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", styles), "the stylesheet loads something remote"
    assert "@import" not in styles
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    for remote in re.findall(r"""(?:fetch|import)\(\s*['"`](https?://[^'"`]+)""", script):
        pytest.fail(f"the script fetches {remote}")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_committed_files_are_what_the_sources_build_to(tmp_path):
    if not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.skip("web/node_modules is not installed (web/build.sh installs it from the lockfile)")
    command = ["node", "build.mjs", str(tmp_path)]
    subprocess.run(command, cwd=WEB, check=True, capture_output=True, timeout=120)
    built = sorted(path.name for path in tmp_path.iterdir())
    assert built == sorted(path.name for path in STATIC.iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (STATIC / name).read_bytes(), (
            f"ember/server/static/{name} is stale: run web/build.sh and commit the result"
        )
