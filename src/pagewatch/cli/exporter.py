"""``pagewatch exporter``: serve the write rates of a fleet of processes to Prometheus."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from ..errors import PagewatchError
from . import UsageError, positive_float, positive_int


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0-65535)")
    return value


def _windows(text: str) -> tuple[float, ...]:
    from ..exporter import parse_windows

    try:
        return parse_windows(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    e = sub.add_parser(
        "exporter", help="serve per-process write rates to Prometheus (/metrics)",
        description="Track every process that matches (one criterion) and serve, on "
        "http://ADDRESS:PORT/metrics, the bytes each one writes by kind of memory, its write "
        "working set, and the exporter's own figures.  New matching processes are picked up "
        "and exited ones dropped at every interval; one that cannot be tracked is counted and "
        "retried.  Needs prometheus-client (pip install 'pagewatch[exporter]') and ptrace "
        "permission on the targets (root, or CAP_SYS_PTRACE).  SIGTERM or Ctrl-C stops it and "
        "leaves the targets as they were.",
        epilog="example: pagewatch exporter --name '^postgres$'  (then scrape :9464/metrics)\n\n"
        "exit status: 0 stopped by SIGTERM or Ctrl-C; 1 a failure (the port cannot be\n"
        "listened on, prometheus-client is missing); 2 wrong usage (a bad selection: an\n"
        "invalid REGEX, an unknown USER).  Every message starts with \"pagewatch: \".",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=positive_int, nargs="+", metavar="PID",
                       help="these processes")
    which.add_argument("--name", metavar="REGEX",
                       help="processes whose name (comm, as pgrep) matches REGEX")
    which.add_argument("--user", metavar="USER", help="processes of USER (name or uid)")
    which.add_argument("--cgroup", metavar="PATH",
                       help="processes in the cgroup v2 PATH or below it "
                       "(/sys/fs/cgroup/system.slice/x.service or system.slice/x.service)")
    which.add_argument("--children-of", type=positive_int, metavar="PID",
                       help="descendants of PID, at any depth")
    e.add_argument("--port", type=_port, default=9464,
                   help="TCP port of /metrics (default 9464; 0: any free port, printed)")
    e.add_argument("--address", default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0: every address)")
    e.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                   help="seconds between two collects of every target (default 1)")
    e.add_argument("--windows", type=_windows, default=None, metavar="LIST",
                   help="write working-set windows (default 10s,1m,5m)")
    e.add_argument("--backend", default="auto", choices=["auto", "uffd-async", "soft-dirty"],
                   help="how to track (default: the best that works here)")
    e.add_argument("--mappings", default="writable", choices=["writable", "private"],
                   help="which mappings: every writable one (default) or private only")
    e.add_argument("--quiet", "-q", action="store_true",
                   help="log only warnings (targets that cannot be tracked)")
    e.set_defaults(func=cmd_exporter)


def cmd_exporter(args: argparse.Namespace) -> int:
    from ..exporter import DEFAULT_WINDOWS, Exporter, Selector, prometheus_client

    prometheus_client()  # the install hint, before anything else
    try:
        selector = Selector(pids=tuple(args.pid or ()), name=args.name, user=args.user,
                            cgroup=args.cgroup, children_of=args.children_of)
    except Exception as exc:  # a bad regular expression or an unknown user
        raise UsageError(f"exporter: {exc}") from exc
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="pagewatch: %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    exporter = Exporter(selector, interval=args.interval,
                        windows=args.windows or DEFAULT_WINDOWS, backend=args.backend,
                        mappings=args.mappings)
    try:
        try:
            host, port = exporter.serve(args.port, args.address)
        except OSError as exc:
            raise PagewatchError(f"exporter: cannot listen on {args.address}:{args.port}: "
                                 f"{exc.strerror}", exc.errno) from exc
        # One write with its newline: print() writes the end apart, and the collect thread's
        # log lines (which start as soon as serve() returns) would land between the two.
        sys.stderr.write(f"pagewatch: exporter serving http://{host}:{port}/metrics "
                         f"({selector}, every {args.interval:g} s)\n")
        sys.stderr.flush()
        while not stop.wait(3600):
            pass
    finally:
        exporter.close()
        for s, h in old.items():
            signal.signal(s, h)
    return 0
