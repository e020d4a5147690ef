"""`ember generate` and the CLI's edges: stdin prompts, pipes, --debug anywhere, flag checks, notices."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pytest

from tests.conftest import REPO_ROOT, STORY_MODEL
from tests.test_cli import EMBER, assert_one_line_error, run_ember

STORY = ["-m", str(STORY_MODEL)]


def run_with_stdin(data: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EMBER, *args], input=data, capture_output=True, timeout=120)


def test_a_prompt_from_stdin_loses_the_shells_newline():
    by_argument = run_ember("generate", *STORY, "-t", "0", "-n", "12", "Once upon a time")
    piped = run_with_stdin(b"Once upon a time\n", "generate", *STORY, "-t", "0", "-n", "12")
    assert by_argument.returncode == 0 and piped.returncode == 0, piped.stderr
    assert piped.stdout.decode() == by_argument.stdout
    dash = run_with_stdin(b"Once upon a time\r\n", "generate", *STORY, "-t", "0", "-n", "12", "-")
    assert dash.stdout.decode() == by_argument.stdout


def test_invalid_utf8_on_stdin_says_where():
    result = run_with_stdin(b"Once \xff\xfe upon", "generate", *STORY, "-n", "3")
    text = subprocess.CompletedProcess(result.args, result.returncode, "", result.stderr.decode())
    assert_one_line_error(text, "the input is not valid UTF-8 (at byte 5)")


def test_a_terminal_on_stdin_is_told_the_prompt_is_awaited():
    child = pexpect.spawn(
        sys.executable,
        [*EMBER[1:], "generate", *STORY, "-t", "0", "-n", "8"],
        cwd=str(REPO_ROOT),
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect_exact("reading the prompt from the terminal; end it with Ctrl-D")
        child.sendline("Once upon a time")
        child.sendeof()
        child.expect(pexpect.EOF)
        assert "little" in child.before or len(child.before.split()) > 4, child.before
    finally:
        child.close(force=True)


def test_debug_is_accepted_after_the_subcommand():
    result = run_ember("generate", "--debug", "-m", "/nonexistent/model", "x")
    assert result.returncode == 1
    assert "unrecognized arguments" not in result.stderr
    assert "Traceback" in result.stderr and "error: model path" in result.stderr


def test_a_closed_pipe_ends_quietly():
    process = subprocess.Popen(
        [*EMBER, "generate", *STORY, "-n", "300", "--ignore-eos", "Once upon a time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert len(process.stdout.read(20)) == 20
        process.stdout.close()  # as `| head -c 20` does
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
        process.wait()
    assert stderr == "", stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seed", "99999999999999999999999"], "--seed must be in"),
        (["--seed", "-99999999999999999999999"], "--seed must be in"),
        (["--cache-memory", "0"], "--cache-memory must be at least 1 MiB, got 0"),
        (["--cache-memory", "-1"], "--cache-memory must be at least 1 MiB, got -1"),
        (["--system", "Be brief."], "--system needs --chat"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
    ],
)
def test_bad_flags_are_one_line_errors(args, fragment):
    assert_one_line_error(run_ember("generate", *STORY, *args, "Once"), fragment)


def test_a_context_length_above_the_models_is_a_notice():
    result = run_ember("generate", *STORY, "-n", "3", "--context-length", "4096", "Once")
    assert result.returncode == 0, result.stderr
    assert "note: --context-length 4096 is more than story supports; using its 512" in result.stderr


def test_chat_without_a_model_template_says_chatml_is_used():
    result = run_ember("generate", *STORY, "--chat", "-n", "3", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("has no chat template; using ChatML") == 1


@pytest.mark.slow
def test_no_progress_bars_when_stderr_is_not_a_terminal(smollm2_gguf):
    # SmolLM2 takes more than the bars' half-second delay to load and to read a 600-token prompt.
    prompt = "The quick brown fox jumps over the lazy dog. " * 60
    result = run_ember("generate", "-m", str(smollm2_gguf), "--device", "cpu", "--chat", "-n", "1", prompt)
    assert result.returncode == 0, result.stderr
    assert "loading" not in result.stderr and "%|" not in result.stderr and "\r" not in result.stderr
    assert "ChatML" not in result.stderr  # SmolLM2 has its own template


def test_output_constraints_from_the_command_line(tmp_path):
    choices = ["--choice", "cat", "--choice", "dog"]
    choice = run_ember("generate", *STORY, "-t", "1", "--seed", "3", *choices, "A pet:")
    assert choice.returncode == 0, choice.stderr
    assert choice.stdout.strip() in ("cat", "dog")
    pattern = r"Once upon a time, (there was|a) [a-z]+\."
    regex = run_ember("generate", *STORY, "-t", "0", "-n", "40", "--regex", pattern, "Story:")
    assert regex.returncode == 0, regex.stderr
    assert re.fullmatch(pattern, regex.stdout.strip()), regex.stdout
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "string"}')
    text = run_ember("generate", *STORY, "-t", "0", "-n", "12", "--json-schema", str(schema), "x")
    assert text.returncode == 0 and text.stdout.startswith('"'), text.stderr
    schema.write_text("{bad")
    assert_one_line_error(
        run_ember("generate", *STORY, "--json-schema", str(schema), "x"), "is not valid JSON"
    )
    assert_one_line_error(run_ember("generate", *STORY, "--regex", "(", "x"), "invalid regex")


def test_output_constraints_in_the_python_api():
    import ember

    story = ember.load(STORY_MODEL)
    assert "".join(story.generate("A pet:", choice=["cat", "dog"], seed=1)) in ("cat", "dog")
    pattern = r"Once upon a time, (there was|a) [a-z]+\."
    text = "".join(story.generate("Story:", temperature=0, max_tokens=40, regex=pattern))
    assert re.fullmatch(pattern, text), text
    with pytest.raises(ember.errors.InvalidRequestError, match="at most one output constraint"):
        story.generate("x", regex="a", choice=["b"])


def test_a_subcommand_missing_a_dependency_is_an_error_not_a_missing_command(monkeypatch, capsys):
    import builtins

    from ember.cli import main as cli_main

    real_import = builtins.__import__

    def importing(missing: str):
        def fake_import(name, *args, **kwargs):
            if name == "ember.cli.serve":
                raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
            return real_import(name, *args, **kwargs)

        return fake_import

    monkeypatch.setattr(builtins, "__import__", importing("ember.cli.serve"))
    assert "serve" not in cli_main.build_parser().format_help()  # the module itself is absent: skipped
    monkeypatch.setattr(builtins, "__import__", importing("uvicorn"))
    with pytest.raises(ModuleNotFoundError, match="uvicorn"):
        cli_main.build_parser()
    assert cli_main.main(["info", str(STORY_MODEL)]) == 1
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "No module named 'uvicorn'" in error_lines[0]
