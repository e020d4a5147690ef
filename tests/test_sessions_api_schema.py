"""schemathesis against the sessions routes of /openapi.json: no 5xx, every response as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import STORY_MODEL, running_server

SESSION_PATHS = r"^/v1/sessions"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_schema_violation_in_the_sessions_api(tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    # The tiny story model with a 128-token context: each generated reply is cheap.
    with running_server(model=STORY_MODEL, args=["--ctx", "128", "--data-dir", str(tmp_path)]) as server:
        result = subprocess.run(
            [
                str(schemathesis),
                "run",
                server.base_url + "/openapi.json",
                "--include-path-regex",
                SESSION_PATHS,
                "--phases",
                "coverage,fuzzing",
                "--checks",
                CHECKS,
                "--max-examples",
                "15",
                "--seed",
                "7",
                "--workers",
                "1",  # one thread: CPython 3.11's ast.parse (hypothesis calls it) races in threads, gh-106905
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
                "--suppress-health-check",
                "all",
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "Traceback" not in server.output()
