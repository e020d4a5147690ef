"""Admission: a request that waits past --queue-timeout for a free slot gets 503 with Retry-After."""

from __future__ import annotations

import httpx
import pytest
from server_harness import running_server

pytestmark = pytest.mark.timeout(120)


def test_queue_timeout_is_503_with_retry_after_and_the_server_recovers():
    with running_server(model="smollm2", args=["--max-batch", "1", "--queue-timeout", "1"]) as server:
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as occupying:
            lines = occupying.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it holds the only slot
            for stream in (False, True):
                refused = httpx.post(
                    server.base_url + "/v1/completions",
                    json={"prompt": "Hello", "max_tokens": 2, "stream": stream},
                    timeout=30,
                )
                assert refused.status_code == 503
                assert int(refused.headers["retry-after"]) > 0
                assert refused.json()["error"]["code"] == "queue_timeout"
        # The occupying stream is closed: its slot frees and new requests are served again.
        reply = httpx.post(
            server.base_url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30
        )
        assert reply.status_code == 200
        metrics = httpx.get(server.base_url + "/metrics").text
        assert "ember_queue_timeouts_total 2.0" in metrics
