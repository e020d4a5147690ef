"""schemathesis against the server's own /openapi.json: no 5xx, every response as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import STORY_MODEL, running_server

# The OpenAI API and the utility routes (the sessions API runs its own checks).
OWN_PATHS = r"^/(v1/chat/completions|v1/completions|v1/models.*|tokenize|detokenize|health|metrics)$"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    # A 128-token context keeps each generated request cheap on the tiny story model.
    with running_server(model=STORY_MODEL, args=["--ctx", "128"]) as server:
        result = subprocess.run(
            [
                str(schemathesis),
                "run",
                server.base_url + "/openapi.json",
                "--include-path-regex",
                OWN_PATHS,
                "--phases",
                "coverage,fuzzing",
                "--checks",
                CHECKS,
                "--max-examples",
                "25",
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
