"""The ``pagewatch`` command.  Each sub-command lives in its own module with a
``register(subparsers)`` function; a module that fails to import only loses its commands.
Only the module of the command given is imported (``COMMANDS``): ``pagewatch --help`` and
``--version`` load neither numpy nor the C extension."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, NoReturn

from ..errors import PagewatchError

#: modules whose commands make up the CLI, in the order ``--help`` lists them
COMMAND_MODULES = ["probe", "process", "report", "exporter", "bench", "checkpoint"]


class UsageError(PagewatchError):
    """Wrong arguments found by a command itself (not by argparse): ``pagewatch: COMMAND:
    ...`` and exit status 2, as argparse's own usage errors."""


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


#: the commands of each module of COMMAND_MODULES, with their one-line help: ``--help`` lists
#: them without importing anything, and a command imports only its own module.  A module
#: missing here is imported (and registered) every time.
COMMANDS: dict[str, dict[str, str]] = {
    "probe": {"probe": "test every kernel feature pagewatch can use, and say which work",
              "backends": "list the tracking backends and which work here"},
    "process": {"run": "run a command and report the pages it writes",
                "record": "record the pages a process writes to a JSONL file",
                "top": "live view of the pages a process writes, per mapping",
                "plot": "heatmap of written addresses over time, from a recording"},
    "report": {"report": "summary of a recording: top mappings, rate over time, working set"},
    "exporter": {"exporter": "serve per-process write rates to Prometheus (/metrics)"},
    "bench": {"bench": "measure every tracking backend against the C floor"},
    "checkpoint": {"checkpoint": "list, verify, compact or restore a checkpoint"},
}

#: commands whose target may be ``-- CMD [ARGS...]`` after their options (run has its own)
TAKES_A_COMMAND = ("record", "top")

EPILOG = """\
the workflow:
  pagewatch run -- python3 app.py         track a command from its first instruction; writes
                                          pagewatch-app.PID.jsonl and prints a summary
  pagewatch record --pid 1234             record a running process (Ctrl-C ends it)
  pagewatch report pagewatch-app.PID.jsonl  top mappings, rate over time, write working set
  pagewatch plot pagewatch-app.PID.jsonl  address x time heatmap (pagewatch-app.PID.png)
  pagewatch top --pid 1234                live view per mapping
  pagewatch probe                         what this kernel offers, and why not

exit status, every command: 0 done; 1 a failure (the message says which and what to do);
2 wrong usage; run, record -- CMD and top -- CMD: the command's own exit status.  Every
message starts with "pagewatch: ".  "pagewatch COMMAND --help" for each command."""


class _Version(argparse.Action):
    """``--version``: reads the package metadata only when asked (importlib.metadata costs
    more than the rest of the start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kw: Any) -> None:
        from .. import __version__

        print(f"pagewatch {__version__}")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other message: ``pagewatch: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        command = self.prog.split(" ", 1)[1:] if self.prog != "pagewatch" else []
        where = f"{command[0]}: " if command else ""
        self.exit(2, f"pagewatch: {where}{message}\n")


def _chosen(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the module of the command it names is imported (the
    other commands are listed with their help line), without, every module is."""
    parser = _Parser(
        prog="pagewatch",
        description="Which pages of memory were written since a point in time: in a command "
        "you start, in a running process, or in your own (the Python API).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    chosen = _chosen(argv) if argv is not None else None
    for name in COMMAND_MODULES:
        stubs = COMMANDS.get(name)
        if argv is not None and stubs is not None and chosen not in stubs:
            for command, text in stubs.items():
                sub.add_parser(command, help=text, add_help=False)
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``pagewatch`` command; ``argv`` None: this process's own arguments (the command
    itself, which then also ends the process)."""
    if argv is not None:
        return _main(argv)
    rc = _main(sys.argv[1:])
    if "icechunk" in sys.modules:
        # Icechunk's runtime threads may still touch Python objects while the interpreter
        # finalizes; one that does takes the process down with SIGABRT after the command has
        # done its work (seen: 'checkpoint verify' on S3 printed its result, then rc -6, beside
        # a CPU hog).  Everything is said and closed by now: end without finalizing.
        end_unfinalized(rc)
    return rc


def end_unfinalized(rc: int) -> NoReturn:
    """End the process with status ``rc`` once its output is flushed, without finalizing the
    interpreter (where a native runtime's threads may still run: see :func:`main`)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader gone (| head): nothing more to say to it
            pass
    os._exit(rc)


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    tail = None
    if _chosen(argv) in TAKES_A_COMMAND and "--" in argv:  # record/top -- CMD [ARGS...]
        at = argv.index("--")
        argv, tail = argv[:at], argv[at + 1:]
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, so the message names the command
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)).choices
        where = commands.get(str(getattr(args, "command", "")), parser)
        where.error(f"unrecognized arguments: {' '.join(extra)}")
    if tail is not None:
        args.cmd = tail
    try:
        rc: int = args.func(args)
    except UsageError as exc:
        print(f"pagewatch: {exc}", file=sys.stderr)
        return 2
    except PagewatchError as exc:
        print(f"pagewatch: {exc}", file=sys.stderr)
        return 1
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
