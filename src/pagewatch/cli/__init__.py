"""The ``pagewatch`` command.  Each sub-command lives in its own module with a
``register(subparsers)`` function; a module that fails to import only loses its commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import PagewatchError

#: modules whose commands make up the CLI, in the order ``--help`` lists them
COMMAND_MODULES = ["probe", "process", "exporter", "bench", "checkpoint"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero (pids, counts, rows)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above zero")
    return value


def positive_float(text: str) -> float:
    """An argparse type: seconds above zero (intervals, durations)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above zero")
    return value


def check_writable(path: str | None) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PagewatchError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PagewatchError(f"cannot write {path}: permission denied")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagewatch",
        description="Which pages of memory were written since a point in time.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except PagewatchError as exc:
        print(f"pagewatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``pagewatch record PID | head``): end quietly, as cat does.
        # Python would complain again when it flushes stdout at exit: point it elsewhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it
    except OSError as exc:
        if exc.filename is None:  # not a file the user named: a bug, keep the traceback
            raise
        print(f"pagewatch: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
