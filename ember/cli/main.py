"""`ember` command line: one subcommand per verb, errors as one line."""

from __future__ import annotations

import argparse
import sys
import traceback

from ember.errors import EmberError


def build_parser() -> argparse.ArgumentParser:
    from ember.cli import generate, info

    parser = argparse.ArgumentParser(
        prog="ember", description="Local LLM inference: generate, chat, benchmark."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(subcommands)
    info.add_parser(subcommands)
    for module_name in ("chat", "bench", "serve", "pull"):
        try:
            module = __import__(f"ember.cli.{module_name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except EmberError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # an ember bug or an environment problem: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(
                f"error: {type(error).__name__}: {error} (run with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
