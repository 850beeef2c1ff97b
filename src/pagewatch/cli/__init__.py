"""The ``pagewatch`` command.  Each sub-command lives in its own module with a
``register(subparsers)`` function; a module that fails to import only loses its commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import PagewatchError

#: modules whose commands make up the CLI, in the order ``--help`` lists them
COMMAND_MODULES = ["probe", "process", "bench"]


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
    return rc


if __name__ == "__main__":
    sys.exit(main())
