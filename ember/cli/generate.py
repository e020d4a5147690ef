"""`ember generate`: stream a continuation (or a chat reply) of one prompt to stdout."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from ember.cli.options import (
    add_model_options,
    add_sampling_options,
    load_model_from_args,
    notice,
    sampling_params_from_args,
)
from ember.cli.progress import prefill_progress
from ember.errors import EmberError


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "generate",
        help="stream text from a prompt",
        description="Stream text from a prompt. A prompt read from stdin loses the one newline "
        "at its end (the one `echo` adds), so it continues as the same words given as an argument.",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt ('-' or nothing: read stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system prompt (needs --chat)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print speed and memory at the end")
    add_model_options(parser)
    add_sampling_options(parser)
    add_constraint_options(parser)
    parser.set_defaults(run=run)


def add_constraint_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output constraint (at most one)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this schema file")
    which.add_argument("--json", action="store_true", help="the output is a JSON object")
    which.add_argument("--regex", metavar="R", help="the whole output matches this regular expression")
    which.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar file")
    which.add_argument(
        "--choice", action="append", metavar="TEXT", help="the output is one of these (repeat the flag)"
    )


def constraint_options(args: argparse.Namespace) -> dict[str, Any]:
    """`ModelHandle.stream`'s constraint keywords from the flags (files read, JSON parsed)."""
    options: dict[str, Any] = {}
    if args.json_schema is not None:
        text = _read_file(args.json_schema, "--json-schema")
        try:
            options["json_schema"] = json.loads(text)
        except json.JSONDecodeError as error:
            raise EmberError(f"--json-schema {args.json_schema} is not valid JSON: {error}") from None
    if args.json:
        options["json"] = True
    if args.regex is not None:
        options["regex"] = args.regex
    if args.grammar is not None:
        options["grammar"] = _read_file(args.grammar, "--grammar")
    if args.choice is not None:
        options["choice"] = list(args.choice)
    return options


def _read_file(path: str, flag: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise EmberError(f"{flag}: cannot read {path}: {reason}") from None


def read_prompt(argument: str | None) -> str:
    """The prompt from the command line, or from stdin ('-' or none) without the shell's final newline."""
    if argument is not None and argument != "-":
        return _checked_text(argument.encode("utf-8", errors="surrogateescape"))
    if sys.stdin.isatty():
        print("(reading the prompt from the terminal; end it with Ctrl-D)", file=sys.stderr, flush=True)
    text = _checked_text(sys.stdin.buffer.read())
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _checked_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EmberError(f"the input is not valid UTF-8 (at byte {error.start})") from None


def run(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise EmberError("--system needs --chat (a system prompt goes into the chat template)")
    params = sampling_params_from_args(args)  # bad flags fail before the model loads
    constraint = constraint_options(args)
    prompt = read_prompt(args.prompt)
    if not prompt:
        raise EmberError("the prompt is empty")
    handle = load_model_from_args(args)
    if args.chat:
        from ember.chat_template import ChatTemplate

        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        template = ChatTemplate.for_tokenizer(handle.tokenizer)
        if not template.is_model_template:
            notice(f"note: {handle.info.path.name} has no chat template; using ChatML")
        # As in chat: bos is added only when the model wants it and the template did not write it.
        prompt_ids = handle.encode(template.render(messages, add_generation_prompt=True))
    else:
        prompt_ids = handle.encode(prompt)

    update, close = prefill_progress()
    handle.engine.on_prefill_progress = update
    started = time.perf_counter()
    first_token_at = None
    final = None
    try:
        for output in handle.stream(prompt_ids, params, **constraint):
            if first_token_at is None:
                first_token_at = time.perf_counter()
                close()
            if output.text:
                sys.stdout.write(output.text)
                sys.stdout.flush()
            final = output
    finally:
        close()
        handle.engine.on_prefill_progress = None
    sys.stdout.write("\n")
    sys.stdout.flush()
    if final is not None and final.finish_reason == "error":
        raise EmberError(f"generation failed: {getattr(final, 'error', None) or 'unknown error'}")
    if args.verbose and final is not None:
        finished_at = time.perf_counter()
        computed = final.num_prompt_tokens - final.num_cached_tokens
        prefill_seconds = (first_token_at or finished_at) - started
        decode_tokens = max(final.num_generated_tokens - 1, 0)
        decode_seconds = finished_at - (first_token_at or finished_at)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"[{handle.info.format} {handle.info.quant} {str(handle.info.dtype).removeprefix('torch.')}] "
            f"load {handle.info.load_seconds:.2f} s | "
            f"prompt {computed} tok, {computed / max(prefill_seconds, 1e-9):.1f} tok/s | "
            f"generation {final.num_generated_tokens} tok, "
            f"{decode_tokens / max(decode_seconds, 1e-9):.1f} tok/s | "
            f"finish {final.finish_reason} | peak memory {peak_mib:.0f} MiB",
            file=sys.stderr,
        )
    return 0
