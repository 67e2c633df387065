"""`sceneparse` command line: one sub-command module per job, each exposing `register(subparsers)`.

A sub-command's `register` adds its parser and sets `func=handler(args) -> int | None`.
User mistakes raise `SceneparseError`: printed as one message, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys

from sceneparse.errors import SceneparseError, user_message

# Order here is the order in `sceneparse --help`.
COMMAND_MODULES = [
    "quickstart",
    "train",
    "evaluate",
    "predict",
    "convert",
    "zoo",
    "data",
    "bench",
    "export",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="sceneparse",
        description="Semantic segmentation: train, evaluate, predict, convert, benchmark, export, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sceneparse.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SceneparseError as err:
        print(f"sceneparse {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sceneparse {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
