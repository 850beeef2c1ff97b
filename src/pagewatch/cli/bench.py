"""``pagewatch bench``: every way of tracking writes, measured side by side against the floor."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import check_writable


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure every tracking backend against the C floor",
        description="Measure each available backend (tracked first write, reset, collect, "
        "precision, Python overhead) beside a C reference floor and the alternatives "
        "without pagewatch (hashing, copy-and-compare).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="under a minute; slow backends on smaller regions (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="reset up to 4 GiB, more repeats, bigger slow-backend regions")
    # Seconds on tiny regions: for the tests and for checking the harness itself.
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help=argparse.SUPPRESS)
    p.add_argument("--backends", metavar="A,B",
                   help="measure only these backends (default: every one)")
    p.add_argument("--snapshot", action="store_true",
                   help="measure Snapshot restore/update instead (1 GiB with --full, "
                   "256 MiB by default) against np.copyto, a C floor and fork()")
    p.add_argument("--json", metavar="FILE", help="write every raw figure as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw one panel per measure (matplotlib)")
    p.set_defaults(func=run_bench, mode=None)


def run_bench(args: argparse.Namespace) -> int:
    from .. import bench
    from ..backends.base import BACKENDS

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pagewatch: bench: --plot needs matplotlib: pip install 'pagewatch[plot]'",
                  file=sys.stderr)
            return 2
    check_writable(args.json)
    check_writable(args.plot)
    kw: dict[str, Any] = {}
    if args.backends:
        names = tuple(n.strip() for n in args.backends.split(",") if n.strip())
        unknown = [n for n in names if n not in BACKENDS]
        if unknown:
            print(f"pagewatch: bench: unknown backend {', '.join(unknown)}: choose from "
                  f"{', '.join(BACKENDS)}", file=sys.stderr)
            return 2
        kw["backends"] = names
    if args.snapshot:
        from ._bench_snapshot import run_snapshot_bench

        return run_snapshot_bench(args, kw.get("backends"))
    cfg = {"quick": bench.Config.quick, "full": bench.Config.full,
           "smoke": bench.Config.smoke}[args.mode or "quick"](**kw)

    result = _run_with_progress(bench, cfg)

    try:
        bench.report.print_rich(result)
    except ImportError:
        print(bench.report.render_text(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.report.to_json(result))
        print(f"wrote {args.json}")
    if args.plot:
        from ..bench import plot

        plot.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_with_progress(bench: Any, cfg: Any) -> dict[str, Any]:
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        def say(i: int, n: int, label: str) -> None:
            print(f"[{i}/{n}] {label}", file=sys.stderr)

        result: dict[str, Any] = bench.run(cfg, progress=say)
        return result
    with Progress(TextColumn("{task.description:<55}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def tick(i: int, n: int, label: str) -> None:
            bar.update(task, completed=i, total=n, description=label)

        result = bench.run(cfg, progress=tick)
    return result
