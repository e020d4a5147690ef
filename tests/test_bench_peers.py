"""Finding a llama.cpp build that runs here: a build that crashes is skipped, with the reason."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ember import peers
from ember.server import benchmark


def _fake_build(root: Path, name: str, body: str) -> Path:
    bin_dir = root / name / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("llama-bench", "llama-server"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS_CACHE", tmp_path)
    return tmp_path


def test_a_crashing_build_is_skipped_for_one_that_runs(cache, tmp_path):
    crashing = _fake_build(cache, "llama.cpp", "kill -SEGV $$")
    working = _fake_build(cache, "llama.cpp-noamx", "echo '[]'")
    found = peers.find_llama_cpp(tmp_path / "model.gguf")
    assert found.bin_dir == working
    assert found.rejected == {str(crashing): "killed by SIGSEGV"}
    assert found.tool("llama-server") == working / "llama-server"
    with pytest.raises(peers.PeerError, match="lacks llama-cli"):
        found.tool("llama-cli")


def test_no_build_that_runs_is_one_clear_error(cache, tmp_path):
    _fake_build(cache, "llama.cpp", "echo 'unknown model' >&2; exit 3")
    with pytest.raises(peers.PeerError, match="exit status 3: unknown model"):
        peers.find_llama_cpp(tmp_path / "model.gguf")
    with pytest.raises(peers.PeerError, match="no llama-bench in"):
        peers.find_llama_cpp(tmp_path / "model.gguf", explicit=tmp_path / "missing")


def test_no_build_at_all_says_how_to_make_one(cache, tmp_path):
    with pytest.raises(peers.PeerError, match="build-llamacpp.sh"):
        peers.find_llama_cpp(tmp_path / "model.gguf")


def test_server_benchmark_exits_with_one_line_when_llama_server_is_missing(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code = benchmark.main(["--gguf", str(gguf), "--llama-server", str(tmp_path / "nope"), "--quick"])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: no llama-server at {tmp_path / 'nope'}"


def test_server_report_judges_ratios_and_each_servers_own_bounds(capsys):
    ember = {"decode_1": 150.0, "prefill_512": 500.0, "long_prefill_gap_ratio": 3.0, "chat_ttft_ratio": 2.0}
    llama = {"decode_1": 100.0, "prefill_512": 250.0, "long_prefill_gap_ratio": 400.0, "chat_ttft_ratio": 1.0}
    rows = {row["figure"]: row for row in benchmark.report(ember, llama)["rows"]}
    assert rows["decode_1"]["ratio"] == 1.5 and rows["decode_1"]["target"] == "meets >= 1.5x"
    assert rows["prefill_512"]["target"] == "misses >= 2.5x"
    assert rows["long_prefill_gap_ratio"]["target"] == "ember meets <= 5x; llama-server misses <= 5x"
    assert rows["chat_ttft_ratio"]["target"] == "ember misses <= 1.5x; llama-server meets <= 1.5x"
    alone = {row["figure"]: row for row in benchmark.report(None, llama)["rows"]}
    assert alone["decode_1"]["ember"] is None and alone["decode_1"]["ratio"] is None
    assert "decode_1" in capsys.readouterr().out


def test_a_server_that_dies_at_start_is_reported_with_its_signal(tmp_path):
    from ember.server.benchmark_process import ServerFailed, ServerProcess, free_port

    command = ["sh", "-c", "echo 'loading'; kill -SEGV $$"]
    with pytest.raises(ServerFailed, match="killed by SIGSEGV(.|\n)*loading"):
        with ServerProcess("fake server", command, free_port()):
            pass
