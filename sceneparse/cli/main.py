"""`sceneparse` command line: one sub-command module per job, each exposing `register(subparsers)`.

A sub-command's `register` adds its parser and sets `func=handler(args) -> int | None`.
User mistakes raise `SceneparseError`: printed as one message, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import os
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
    args, extra = parser.parse_known_args(argv)
    # `train CFG --resume PATH key=value`: argparse ends the overrides at the first option; the
    # key=value words after it are overrides too, in any order (as docs/distributed.md says)
    if extra and getattr(args, "overrides", None) is not None and all(
            "=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
    except SceneparseError as err:
        print(f"sceneparse {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a training's TrainingInterrupted says which signal: 130 or 143
        print(f"sceneparse {args.command}: interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    return int(code or 0)


def entry() -> None:
    """The process's entry point (`sceneparse`, `python -m sceneparse`): `main()`, then exit.

    A process that torchrun started with others leaves through `os._exit` once its output is
    flushed. At interpreter shutdown, after the command has finished and its process group is
    destroyed, torch's C++ side sometimes aborts ("terminate called without an active exception":
    about one exit in twenty with gloo on a busy 2-core machine, no Python frame left), and
    torchrun then fails the whole job although every rank had done its work. Everything
    sceneparse writes is closed by then (checkpoints, reports, logs); only interpreter teardown is
    skipped.
    """
    code = main()
    # (a WORLD_SIZE that is no number was reported by the command; here it only means "not torchrun")
    world_size = os.environ.get("WORLD_SIZE", "1").strip()
    if world_size.isdigit() and int(world_size) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
