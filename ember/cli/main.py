"""`ember` command line: one subcommand per verb, errors as one line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ember.errors import EmberError

# Subcommands whose module may be absent from a trimmed install; any other import error in one is a bug.
OPTIONAL_SUBCOMMANDS = ("chat", "bench", "serve", "pull")


def build_parser() -> argparse.ArgumentParser:
    from ember.cli import generate, info

    parser = argparse.ArgumentParser(
        prog="ember", description="Local LLM inference: generate, chat, benchmark."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(subcommands)
    info.add_parser(subcommands)
    for module_name in OPTIONAL_SUBCOMMANDS:
        full_name = f"ember.cli.{module_name}"
        try:
            module = __import__(full_name, fromlist=["add_parser"])
        except ModuleNotFoundError as error:
            if error.name != full_name:  # the module is there but something it needs is not
                raise
            continue
        module.add_parser(subcommands)
    for subparser in subcommands.choices.values():
        # `ember generate --debug ...` works too: every error message suggests --debug.
        try:
            subparser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
            )
        except argparse.ArgumentError:  # the subcommand has its own --debug
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # before parsing: an error while building the parser shows its traceback
    try:
        parser = build_parser()
    except Exception as error:
        return _report(error, debug)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as error:
        return _report(error, debug)


def _report(error: BaseException, debug: bool) -> int:
    """One line on stderr (the traceback too with --debug); exit status 1."""
    if isinstance(error, BrokenPipeError):
        return _quiet_broken_pipe()
    if debug:
        traceback.print_exception(error)
    if isinstance(error, EmberError):
        print(f"error: {error}", file=sys.stderr)
    elif not debug:  # an ember bug or an environment problem: still one line unless --debug
        print(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def _quiet_broken_pipe() -> int:
    """The reader of stdout left (`ember generate ... | head`): stop quietly, as Unix tools do.

    stdout is pointed at /dev/null so that Python's final flush does not fail a second time.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
