"""`ember pull`, `list`, `rm` against a fake Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py), no internet.

The `ember` processes get `HF_ENDPOINT` pointed at the fake hub, a private `EMBER_HOME` (the model store) and
`HF_HOME` (no stored token), and speak to it through huggingface_hub exactly as they would to the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import STORY_MODEL, smollm2_gguf_path
from fake_hub import FakeHub

EMBER = [sys.executable, "-m", "ember.cli.main"]
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY_FILES = {path.name: path for path in STORY_MODEL.iterdir()}


def _small_gguf(path: Path, rows: int = 64, file_type: str = "MOSTLY_Q8_0") -> Path:
    """A valid (not runnable) GGUF whose header says Q8_0: a second quantization in the repo."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((rows, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def hub(tmp_path):
    fake = FakeHub()
    fake.add_repo("tiny/story", STORY_FILES)
    fake.add_repo(
        "tiny/smol-GGUF",
        {
            SMOLLM2_NAME: smollm2_gguf_path(),
            "SmolLM2-135M-Instruct.Q8_0.gguf": _small_gguf(tmp_path / "small.gguf"),
            "README.md": b"# SmolLM2 GGUF\n",
        },
    )
    fake.add_repo("acme/private-story", STORY_FILES, token="hf_secret_token")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "ember-home"


def _env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        EMBER_HOME=str(home),
        HF_HOME=str(home.parent / "hf-home"),  # no stored token, no shared cache
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_TELEMETRY="1",
        **extra,
    )
    return env


def _ember(*args: str, env: dict[str, str], stdin: str = "", preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EMBER, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180, preexec_fn=preexec
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error: the last stderr line (progress bars come before it)."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, result
    return lines[-1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store(home: Path) -> Path:
    return home / "models"


def _part_files(home: Path) -> list[Path]:
    return sorted((_store(home) / ".downloads").rglob("*.part"))


def _listed(home: Path) -> dict[str, dict]:
    """What `ember list --json` prints, read in this process (listing never touches the network)."""
    from ember.model_store import list_models

    return {model.name: model.to_dict() for model in list_models(_store(home))}


def test_pull_gguf_by_quant_fetches_only_that_file_and_lists_it(hub, home):
    env = _env(home, hub.url)
    result = _ember("pull", "tiny/smol-GGUF:Q4_1", env=env)
    assert result.returncode == 0, result.stderr
    assert "pulled tiny/smol-GGUF:Q4_1" in result.stdout
    pulled = _store(home) / "tiny" / "smol-GGUF" / "Q4_1" / SMOLLM2_NAME
    assert _sha256(pulled) == _sha256(smollm2_gguf_path())
    served = {request.path for request in hub.cdn_gets()}
    assert served == {f"/cdn/{hub.repos['tiny/smol-GGUF'].files[SMOLLM2_NAME].sha256}"}  # not the Q8_0 one
    assert _part_files(home) == []

    listed = _listed(home)
    entry = listed["tiny/smol-GGUF:Q4_1"]
    assert (entry["architecture"], entry["format"], entry["quantization"]) == ("llama", "gguf", "Q4_1")
    assert entry["parameters"] == 134_515_008
    assert entry["size_bytes"] == pulled.stat().st_size and entry["path"] == str(pulled)
    assert listed["smollm2"]["builtin"] is True and listed["smollm2"]["quantization"] == "Q4_1"

    # The other quantization is its own model beside the first.
    result = _ember("pull", "tiny/smol-GGUF:q8_0", env=env)
    assert result.returncode == 0, result.stderr
    listed = _listed(home)
    assert listed["tiny/smol-GGUF:Q8_0"]["quantization"] == "Q8_0"
    assert listed["tiny/smol-GGUF:Q8_0"]["parameters"] == 64 * 32
    # Without a tag the name is ambiguous now, and says which names exist.
    result = _ember("generate", "--model", "tiny/smol-GGUF", "hi", env=env)
    assert result.returncode == 1 and "several pulled variants" in _error_line(result)


def test_pull_safetensors_folder_then_generate_offline_by_name(hub, home):
    env = _env(home, hub.url)
    result = _ember("pull", "tiny/story", env=env)
    assert result.returncode == 0, result.stderr
    folder = _store(home) / "tiny" / "story" / "safetensors"
    for name, original in STORY_FILES.items():
        assert _sha256(folder / name) == _sha256(original), name
    assert (folder / "ember-model.json").exists()
    # A second pull at the same commit downloads nothing.
    before = len(hub.cdn_gets())
    result = _ember("pull", "tiny/story", env=env)
    assert result.returncode == 0 and "up to date" in result.stderr
    assert len(hub.cdn_gets()) == before

    prompt = ["-t", "0", "-n", "12", "Once upon a time"]
    # With the hub up and reachable, a run by name still sends it nothing.
    requests_before = len(hub.requests)
    online = _ember("generate", "--model", "tiny/story", *prompt, env=env)
    assert online.returncode == 0, online.stderr
    assert len(hub.requests) == requests_before
    hub.stop()
    offline_env = _env(home, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    offline = _ember("generate", "--model", "tiny/story", *prompt, env=offline_env)
    assert offline.returncode == 0, offline.stderr
    import ember

    direct = "".join(ember.load(STORY_MODEL).generate("Once upon a time", temperature=0, max_tokens=12))
    assert offline.stdout == online.stdout == direct + "\n"
    assert len(offline.stdout.strip()) > len("Once upon a time")


@pytest.mark.slow
def test_transfer_broken_in_the_middle_resumes_on_the_next_pull(hub, home):
    """The connection drops at 52 MiB of 94 and the retry is refused: the pull fails, keeping 50 MiB
    (huggingface_hub writes in 10 MiB chunks); the next pull asks for the rest with a Range request."""
    env = _env(home, hub.url)
    sha256 = hub.repos["tiny/smol-GGUF"].files[SMOLLM2_NAME].sha256
    hub.break_transfer("tiny/smol-GGUF", SMOLLM2_NAME, after_bytes=52 << 20, refusals=1)
    result = _ember("pull", "tiny/smol-GGUF:Q4_1", env=env)
    assert result.returncode == 1
    error = _error_line(result)
    assert error.startswith("error: download of ") and "run the same `ember pull` again to resume" in error
    (part,) = _part_files(home)
    kept = part.stat().st_size
    assert 0 < kept <= 52 << 20
    assert not (_store(home) / "tiny" / "smol-GGUF").exists()  # not a model yet

    hub.requests.clear()
    result = _ember("pull", "tiny/smol-GGUF:Q4_1", env=env)
    assert result.returncode == 0, result.stderr
    assert [request.range for request in hub.cdn_gets()] == [f"bytes={kept}-"]
    pulled = _store(home) / "tiny" / "smol-GGUF" / "Q4_1" / SMOLLM2_NAME
    assert _sha256(pulled) == sha256
    assert _part_files(home) == []


def test_ctrl_c_keeps_the_download_and_the_next_pull_resumes(hub, home, tmp_path):
    """SIGINT while the transfer hangs at 21 MiB of 24: exit 130, 20 MiB kept (whole 10 MiB chunks)."""
    big = _small_gguf(tmp_path / "big.gguf", rows=192 << 10, file_type="ALL_F32")  # 24 MiB of float32
    hub.add_repo("tiny/big-GGUF", {"big-F32.gguf": big})
    release = threading.Event()
    hub.break_transfer("tiny/big-GGUF", "big-F32.gguf", after_bytes=21 << 20, stall=release)
    env = _env(home, hub.url)
    parts_directory = _store(home) / ".downloads" / "tiny--big-GGUF--F32"
    stderr_file = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe nobody reads while polling
    process = subprocess.Popen(
        [*EMBER, "pull", "tiny/big-GGUF:F32"], env=env, stdout=subprocess.DEVNULL, stderr=stderr_file
    )
    try:
        deadline = time.monotonic() + 150  # a bound on a hung test, not a speed check
        while sum(part.stat().st_size for part in parts_directory.glob("*.part")) < 20 << 20:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr_file.seek(0)
        stderr = stderr_file.read()
        stderr_file.close()
    assert process.returncode == 130
    assert "interrupted: the bytes so far are kept" in stderr
    (part,) = parts_directory.glob("*.part")
    assert part.stat().st_size == 20 << 20
    assert not (_store(home) / "tiny" / "big-GGUF").exists()

    hub.requests.clear()
    result = _ember("pull", "tiny/big-GGUF:F32", env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming big-F32.gguf at 20.0 MiB" in result.stderr
    assert [request.range for request in hub.cdn_gets()] == [f"bytes={20 << 20}-"]
    assert _sha256(_store(home) / "tiny" / "big-GGUF" / "F32" / "big-F32.gguf") == _sha256(big)


def test_connection_dropped_once_is_retried_within_the_pull(hub, home):
    hub.break_transfer("tiny/story", "model.safetensors", after_bytes=1 << 20)
    result = _ember("pull", "tiny/story", env=_env(home, hub.url))
    assert result.returncode == 0, result.stderr
    folder = _store(home) / "tiny" / "story" / "safetensors"
    assert _sha256(folder / "model.safetensors") == _sha256(STORY_MODEL / "model.safetensors")
    assert len(hub.cdn_gets()) == 2


def test_checksum_mismatch_is_reported_and_nothing_is_kept(hub, home):
    hub.corrupt_declared_hash("tiny/story", "model.safetensors")
    env = _env(home, hub.url)
    result = _ember("pull", "tiny/story", env=env)
    assert result.returncode == 1
    error = _error_line(result)
    assert error.startswith("error: checksum mismatch for model.safetensors") and "discarded" in error
    assert not (_store(home) / "tiny").exists()
    assert _part_files(home) == []
    assert "tiny/story" not in _listed(home)


def test_unknown_and_private_repos_are_one_line_errors(hub, home):
    env = _env(home, hub.url)
    result = _ember("pull", "tiny/no-such-model", env=env)
    assert result.returncode == 1
    assert _error_line(result) == f"error: repository tiny/no-such-model was not found on {hub.url}"

    result = _ember("pull", "acme/private-story", env=env)
    assert result.returncode == 1
    error = _error_line(result)
    assert "or it is private" in error and "HF_TOKEN" in error
    assert not _store(home).joinpath("acme").exists()
    result = _ember("pull", "acme/private-story", env=_env(home, hub.url, HF_TOKEN="hf_secret_token"))
    assert result.returncode == 0, result.stderr
    assert (_store(home) / "acme" / "private-story" / "safetensors" / "model.safetensors").exists()
    # The token goes to the Hub, never to the CDN (another origin).
    resolves = [request for request in hub.requests if request.path.startswith("/acme/private-story/res")]
    assert resolves and all(request.authorization == "Bearer hf_secret_token" for request in resolves)
    assert hub.cdn_gets() and all(request.authorization is None for request in hub.cdn_gets())


def test_no_network_offline_mode_and_a_missing_quant_are_one_line_errors(hub, home):
    env = _env(home, hub.url)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = _ember("pull", "tiny/story", env=_env(home, dead))
    assert result.returncode == 1
    assert _error_line(result).startswith(f"error: cannot reach the Hub at {dead} (no network?)")

    result = _ember("pull", "tiny/story", env=_env(home, hub.url, HF_HUB_OFFLINE="1"))
    assert result.returncode == 1 and "HF_HUB_OFFLINE is set" in _error_line(result)

    result = _ember("pull", "tiny/smol-GGUF:Q2_K", env=env)
    assert result.returncode == 1
    assert "choose one of: tiny/smol-GGUF:Q4_1, tiny/smol-GGUF:Q8_0" in _error_line(result)


def _file_size_limit(limit: int):
    def apply() -> None:
        # Writes past the limit fail with EFBIG (instead of the default SIGXFSZ killing the process),
        # as writes to a full disk fail with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_stops_the_pull_and_the_next_one_resumes(hub, home):
    env = _env(home, hub.url)
    # Too little free space for what is left to fetch: refused before downloading anything.
    script = (
        "import sys, ember.hub; ember.hub.free_bytes = lambda directory: 1000; "
        "from ember.cli.main import main; sys.exit(main(['pull', 'tiny/story']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 1
    assert _error_line(result).startswith("error: not enough disk space: the download needs 2.")
    assert hub.cdn_gets() == []

    # The disk fills up in the middle of the weights: stopped, the bytes so far kept for the next pull.
    result = _ember("pull", "tiny/story", env=env, preexec=_file_size_limit(1 << 20))
    assert result.returncode == 1
    assert "the file size limit was reached: model.safetensors stopped at 1.0 MiB" in _error_line(result)
    weights_sha256 = hub.repos["tiny/story"].files["model.safetensors"].sha256
    part = _store(home) / ".downloads" / "tiny--story--safetensors" / f"{weights_sha256}.part"
    assert part.stat().st_size == 1 << 20
    assert not (_store(home) / "tiny").exists()

    hub.requests.clear()
    result = _ember("pull", "tiny/story", env=env)
    assert result.returncode == 0, result.stderr
    assert [request.range for request in hub.cdn_gets()] == [f"bytes={1 << 20}-"]
    folder = _store(home) / "tiny" / "story" / "safetensors"
    assert _sha256(folder / "model.safetensors") == _sha256(STORY_MODEL / "model.safetensors")


def test_list_and_rm(hub, home, monkeypatch, capsys):
    from ember.cli.main import main

    env = _env(home, hub.url)
    for name in ("tiny/story", "tiny/smol-GGUF:Q8_0"):
        result = _ember("pull", name, env=env)
        assert result.returncode == 0, result.stderr
    monkeypatch.setenv("EMBER_HOME", str(home))

    capsys.readouterr()
    assert main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "NAME",
        "ARCHITECTURE",
        "PARAMETERS",
        "FORMAT",
        "QUANTIZATION",
        "SIZE",
        "WHERE",
    ]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["tiny/story"][1:6] == ["llama", "656K", "safetensors", "float32", "2.6"]
    assert rows["tiny/smol-GGUF:Q8_0"][1:5] == ["llama", "2K", "gguf", "Q8_0"]
    assert "(built-in)" in " ".join(rows["smollm2"])

    # rm asks first; "n" (or no answer) keeps the model.
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("n\n"))
    assert main(["rm", "tiny/story"]) == 1
    assert (_store(home) / "tiny" / "story").exists()
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    assert main(["rm", "tiny/story"]) == 1
    assert "without confirmation" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n"))
    assert main(["rm", "tiny/story"]) == 0
    assert not (_store(home) / "tiny" / "story").exists()
    assert (_store(home) / "tiny" / "smol-GGUF" / "Q8_0").exists()

    capsys.readouterr()
    assert main(["rm", "tiny/story", "--yes"]) == 1
    assert "no pulled model named 'tiny/story'" in capsys.readouterr().err
    assert main(["rm", "smollm2", "--yes"]) == 1
    assert "built-in model" in capsys.readouterr().err
    assert main(["rm", "tiny/smol-GGUF", "--yes"]) == 0  # the repository's only variant
    assert not (_store(home) / "tiny").exists()  # empty repository folders go too
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    remaining = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "smollm2" in [entry["name"] for entry in remaining]
    assert all(entry["builtin"] for entry in remaining)
