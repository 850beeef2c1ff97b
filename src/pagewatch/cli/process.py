"""``pagewatch run``, ``record``, ``top`` and ``plot``: the pages another process writes.

Every command writes (with ``--output``) one JSON object per line:

* ``{"type": "attach", "pid", "command", "backend", "backend_reason", "stop_ms", "interval",
  "skipped": [...]}`` when tracking starts (again after an exec);
* ``{"type": "interval", "t", "dt", "pid", "pages", "bytes", "mappings": [{"start", "end",
  "perms", "path", "pages", "new", "runs": [[first page, count], ...]}, ...]}`` per interval,
  with only the mappings written in it (page numbers relative to the mapping's start);
* ``{"type": "exec", "t", "pid"}`` and ``{"type": "exit", "t", "pid", "code"}`` for those
  events (the command's own exit line is the last line).

With ``--follow-forks`` (``run``, ``record -- CMD``, ``top -- CMD``) the recording holds every
process of the tree: each line above carries the ``pid`` of the process it is about (attach
lines add ``ppid``), the intervals of every process are interleaved (one interval line per
process written in it), and two more kinds of line say how the tree grew:

* ``{"type": "fork", "t", "pid", "ppid", "command"}`` when a process starts (plus
  ``"shares_memory_of": PPID`` for a vfork child, whose writes are its parent's until it
  executes a program: its attach line follows its exec);
* ``{"type": "untracked", "t", "pid", "ppid", "command", "reason"}`` for a process that
  could not be tracked (it is never dropped silently).

Readers written for one process keep working: the command's own process is the first attach
line's ``pid``, and ``report`` and ``plot`` read its lines (``report`` adds a ``processes``
table, ``plot --pid`` draws another process).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from ..errors import PagewatchError, TargetGone, Unsupported
from ..remote.procfs import _read_text
from ..remote.tree import (
    Proc,
    ProcessTree,
    StopRequest,
    _exit_code,
)
from . import UsageError, check_writable, positive_float, positive_int

if TYPE_CHECKING:  # numpy, the C extension and the tracker load when a command runs, not
    import numpy as np  # for --help (issue 14: start-up)

    from ..process import ProcessDirty, ProcessTracker

MiB = 1 << 20
#: bytes per page (kernel.constants.PAGE_SIZE, without importing the kernel bindings)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")



def _interval(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument("--interval", type=positive_float, default=default, metavar="S",
                        help=f"seconds between collects (default {default:g})")


def _force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite the output file if it exists")


TARGET = ("the process: --pid PID (a running one), or -- CMD [ARGS...] (started now, tracked "
          "from its first instruction)")


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", default="auto",
                        choices=["auto", "uffd-async", "soft-dirty"],
                        help="how to track (default: the best that works here)")
    common.add_argument("--mappings", default="writable", choices=["writable", "private"],
                        help="which mappings: every writable one (default) or private only")
    common.add_argument("-F", "--follow-forks", action="store_true",
                        help="track every process the command starts too (fork, vfork, "
                        "clone, exec in any thread), each from its first instruction, as "
                        "strace -f does (needs uffd-async; -- CMD only)")

    r = sub.add_parser(
        "run", parents=[common], help="run a command and report the pages it writes",
        description="Start CMD stopped right after exec, track it from its first instruction "
        "to its exit, write a recording (pagewatch-CMD.PID.jsonl unless --output or "
        "--no-output), print a summary on stderr and exit with its exit code.",
        epilog="example: pagewatch run -- python3 -c \"b = bytearray(50_000_000)\"")
    _interval(r, 0.5)
    out = r.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", metavar="FILE.jsonl",
                     help="the recording: one JSON line per interval (default "
                     "pagewatch-CMD.PID.jsonl in the current folder)")
    out.add_argument("--no-output", action="store_true", help="write no recording")
    _force(r)
    r.add_argument("--top", type=positive_int, default=5, metavar="N",
                   help="mappings listed in the summary (default 5)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the command to run, after --")
    r.set_defaults(func=cmd_run)

    rec = sub.add_parser(
        "record", parents=[common], help="record the pages a process writes to a JSONL file",
        usage="pagewatch record [options] (--pid PID | -- CMD [ARGS...])",
        description="Track a running process (--pid) or a command started now (-- CMD) and "
        "write one JSON line per interval with the written page runs of each mapping, to "
        "pagewatch-NAME.PID.jsonl unless --output says otherwise (-o - : stdout).  Ctrl-C or "
        "SIGTERM ends it cleanly, after a last collect; a running process goes on untouched.",
        epilog="examples: pagewatch record --pid 1234 --duration 10\n"
        "          pagewatch record -- python3 app.py")
    _interval(rec, 1.0)
    rec.add_argument("--pid", type=positive_int, dest="pid_option", metavar="PID",
                     help="the running process to record")
    rec.add_argument("pid", type=positive_int, nargs="?", metavar="PID",
                     help="the same as --pid PID (the older form)")
    rec.add_argument("--duration", type=positive_float, default=None, metavar="S",
                     help="stop after S seconds (default: until Ctrl-C or the process exits)")
    rec.add_argument("--count", type=positive_int, default=None, metavar="N",
                     help="stop after N intervals (default: until Ctrl-C or the process exits)")
    rec.add_argument("--output", "-o", metavar="FILE.jsonl",
                     help="where to write (default pagewatch-NAME.PID.jsonl; - : stdout)")
    _force(rec)
    rec.set_defaults(func=cmd_record, cmd=None)

    top = sub.add_parser(
        "top", parents=[common], help="live view of the pages a process writes, per mapping",
        usage="pagewatch top [options] (--pid PID | -- CMD [ARGS...])",
        description="Show written pages/s and MiB/s per mapping, refreshed every interval.  "
        "On a terminal (needs the 'rich' package: pip install 'pagewatch[cli]') keys change "
        "the order (p: pages/s, t: total pages, s: size, a: address), space pauses, q quits; "
        "elsewhere (a pipe, a file) it prints plain rows every interval.  Ctrl-C or SIGTERM "
        "quits.",
        epilog="examples: pagewatch top --pid 1234\n          pagewatch top -- python3 app.py")
    _interval(top, 1.0)
    top.add_argument("--pid", type=positive_int, dest="pid_option", metavar="PID",
                     help="the running process to show")
    top.add_argument("pid", type=positive_int, nargs="?", metavar="PID",
                     help="the same as --pid PID (the older form)")
    top.add_argument("--rows", type=positive_int, default=20, help="mappings shown (default 20)")
    top.add_argument("--count", type=positive_int, default=None, metavar="N",
                     help="quit after N refreshes")
    top.add_argument("--sort", choices=list(SORTS), default="pages",
                     help="order of the rows (default pages: pages/s)")
    top.set_defaults(func=cmd_top, cmd=None)

    plot = sub.add_parser(
        "plot", help="heatmap of written addresses over time, from a recording",
        description="Draw the pages written (address x time) and the write rate over time "
        "(needs matplotlib: pip install 'pagewatch[plot]').",
        epilog="example: pagewatch plot pagewatch-python3.1234.jsonl  "
        "(writes pagewatch-python3.1234.png)")
    plot.add_argument("file", metavar="FILE.jsonl",
                      help="a recording written by pagewatch run or record")
    plot.add_argument("-o", "--output", metavar="heat.png",
                      help="the image (default: FILE with .png for .jsonl)")
    _force(plot)
    plot.add_argument("--rows", type=positive_int, default=400,
                      help="address bins of the heatmap (default 400)")
    plot.add_argument("--pid", type=positive_int, default=None, metavar="PID",
                      help="the process to draw, in a recording of several (--follow-forks; "
                      "default: the command's own)")
    plot.set_defaults(func=cmd_plot)


# ---- shared pieces ------------------------------------------------------------------------


def _name(path: str) -> str:
    return path or "anonymous"


class Stats:
    """Per-interval counts, the write working set and per-mapping totals (``by_process``:
    of several processes, whose mappings and pages are told apart by their pid)."""

    def __init__(self, by_process: bool = False) -> None:
        self.per_interval: list[int] = []
        self.t0 = time.monotonic()
        self.by_process = by_process
        self._sets: list[np.ndarray] = []
        self.by_mapping: dict[Any, list[Any]] = {}  # key -> [label, pages, set parts, pid]

    def add(self, d: ProcessDirty, new_interval: bool = True) -> None:
        """Count a collect: as an interval of its own, or (``new_interval=False``) into the
        last one (another process collected in the same interval)."""
        import numpy as np

        if new_interval or not self.per_interval:
            self.per_interval.append(d.count)
        else:
            self.per_interval[-1] += d.count
        tag = np.uint64(d.pid << 48) if self.by_process else np.uint64(0)
        for m, pages in d.written().items():
            addrs = pages.addresses()
            self._sets.append(addrs | tag if self.by_process else addrs)
            key: Any = m.path if m.path in ("[heap]", "[stack]") else (m.path, m.start)
            if self.by_process:
                key = (d.pid, key)
            entry = self.by_mapping.setdefault(key, [m, 0, [], d.pid])
            entry[0] = m
            entry[1] += len(pages)
            entry[2].append(addrs)

    def pages(self) -> int:
        return sum(self.per_interval)

    def working_set(self) -> int:
        import numpy as np

        if not self._sets:
            return 0
        return len(np.unique(np.concatenate(self._sets)))

    def top(self, n: int) -> list[tuple[Any, int, int, int]]:
        """The ``n`` mappings written most: ``(mapping, pages, distinct pages, pid)``."""
        import numpy as np

        rows = [(m, total, len(np.unique(np.concatenate(parts))), pid)
                for m, total, parts, pid in self.by_mapping.values()]
        rows.sort(key=lambda r: -r[1])
        return rows[:n]


class JsonLines:
    def __init__(self, out: IO[str] | None) -> None:
        self.out = out

    def write(self, obj: dict[str, Any]) -> None:
        if self.out is not None:
            self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self.out.flush()


def _attach_line(p: ProcessTracker, interval: float, command: list[str] | None
                 ) -> dict[str, Any]:
    return {"type": "attach", "pid": p.pid, "command": command, "backend": p.backend,
            "backend_reason": p.backend_reason, "stop_ms": p.attach_stop_ms,
            "interval": interval,
            "skipped": [{"start": s.mapping.start, "end": s.mapping.end,
                         "path": s.mapping.path, "reason": s.reason} for s in p.skipped]}


def _interval_line(d: ProcessDirty, t0: float) -> dict[str, Any]:
    out = {"type": "interval", "t": round(d.time - t0, 6), "dt": round(d.elapsed, 6)}
    out.update(d.to_dict())
    return out


class Session:
    """Collect from a process every interval until it exits (or ``until`` says stop),
    attaching again after an exec."""

    def __init__(self, pid: int, args: argparse.Namespace, interval: float,
                 out: JsonLines, command: list[str] | None = None,
                 on_collect: Callable[[ProcessDirty], None] | None = None,
                 stop: StopRequest | None = None) -> None:
        self.stop = stop or StopRequest()
        self.pid = pid
        self.args = args
        self.interval = interval
        self.out = out
        self.command = command
        self.stats = Stats()
        self.on_collect = on_collect
        self.tracker = self._attach()
        self.first = self.tracker
        self.execs = 0

    def _attach(self, after_exec: bool = False) -> ProcessTracker:
        from ..process import ProcessTracker

        # After an exec, the new program's memory is all new: report what it holds.
        p = ProcessTracker(self.pid, backend=self.args.backend, mappings=self.args.mappings,
                           report_existing=after_exec)
        self.out.write(_attach_line(p, self.interval, self.command))
        return p

    def _take(self, d: ProcessDirty | None) -> None:
        if d is None:
            return
        self.stats.add(d)
        self.out.write(_interval_line(d, self.stats.t0))
        if self.on_collect is not None:
            self.on_collect(d)

    def loop(self, pidfd: int, deadline: float | None = None, count: int | None = None
             ) -> None:
        """Collect every interval until the process exits, ``deadline`` passes, ``count``
        intervals are written or ``self.stop`` (a signal handler) fires: then one last
        collect, so the writes since the previous one are in the output too."""
        from ..process import TargetExec

        next_t = time.monotonic() + self.interval
        while True:
            wait = next_t - time.monotonic()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            exited = False
            if not self.stop.stopping:
                exited = bool(self.stop.select([pidfd], wait))
            next_t += self.interval
            if next_t < time.monotonic():  # we fell behind: do not try to catch up
                next_t = time.monotonic() + self.interval
            try:
                self._take(self.tracker.collect())
            except TargetExec as exc:
                self._take(exc.collected)  # type: ignore[arg-type]
                self.out.write({"type": "exec", "t": round(time.monotonic() - self.stats.t0,
                                                            6)})
                self.tracker.close()
                self.execs += 1
                try:
                    self.tracker = self._attach(after_exec=True)
                except TargetGone:
                    return
                continue
            except TargetGone as exc:
                self._take(exc.collected)  # type: ignore[arg-type]
                return
            if exited or self.stop.stopping or (deadline is not None
                                                and time.monotonic() >= deadline):
                return
            if count is not None and len(self.stats.per_interval) >= count:
                return

    def close(self) -> None:
        self.tracker.close()


@contextlib.contextmanager
def _output(path: str | None, default: IO[str] | None) -> Iterator[JsonLines]:
    if path is None:
        yield JsonLines(default)
        return
    with open(path, "w") as f:
        yield JsonLines(f)


def _processes(procs: list[Proc]) -> list[str]:
    """The summary's lines about each process of a followed tree."""
    lines = [f"  processes: {len(procs)} (the command and {len(procs) - 1} it started; "
             "each tracked from its first instruction unless said otherwise)",
             f"  {'':<16}{'pages':>9} {'distinct':>9} {'MiB':>7}  {'pid':<8} {'end':<14} command"]
    for p in procs:
        ws = p.stats.working_set()
        if p.untracked is not None:
            counts = f"{'-':>9} {'-':>9} {'-':>7}"
        else:
            counts = f"{p.stats.pages():>9} {ws:>9} {ws * PAGE_SIZE / MiB:>7.1f}"
        name = p.name()
        name = name if len(name) <= 60 else name[:57] + "..."
        lines.append(f"  {'':<16}{counts}  {p.pid:<8} {p.ended():<14} {name}")
    for p in procs:
        if p.untracked is not None:
            lines.append(f"  not tracked: pid {p.pid} ({p.name()[:60]}): {p.untracked}")
        elif p.shares is not None:
            lines.append(f"  pid {p.pid} ({p.name()[:60]}) shared the memory of pid "
                         f"{p.shares} (vfork): its writes are counted there")
    return lines


def _summary(stats: Stats, interval: float, tracker: ProcessTracker | None, stop_ms: float | None,
             execs: int, head: str, top: int, file: IO[str], followed: bool = False,
             procs: list[Proc] | None = None) -> None:
    backend = tracker.backend if tracker is not None else "nothing (not tracked)"
    lines = [f"pagewatch: {head}; tracked with {backend}"
             + (f" (target stopped {stop_ms:.2f} ms at attach)" if stop_ms is not None else "")]
    counts = stats.per_interval
    shown = " ".join(str(c) for c in counts[:30]) + (" ..." if len(counts) > 30 else "")
    lines.append(f"  pages written per {interval:g} s interval: {shown or '(none)'}")
    ws = stats.working_set()
    lines.append(f"  write working set: {ws} distinct pages ({ws * PAGE_SIZE / MiB:.1f} MiB) "
                 f"in {len(stats.by_mapping)} mappings; {sum(counts)} page writes reported")
    rows = stats.top(top)
    if rows:
        lines.append(f"  {'top mappings:':<16}{'pages':>9} {'distinct':>9} {'MiB':>7}  mapping")
        for m, total, distinct, pid in rows:
            who = f"pid {pid}: " if stats.by_process else ""
            lines.append(f"  {'':<16}{total:>9} {distinct:>9} {distinct * PAGE_SIZE / MiB:>7.1f}"
                         f"  {who}{_name(m.path)} {m.start:#x}-{m.end:#x} {m.perms}")
    if tracker is not None and tracker.skipped:
        lines.append(f"  not tracked: {len(tracker.skipped)} mapping(s); first: "
                     f"{tracker.skipped[0]}")
    if execs:
        lines.append(f"  the process executed {execs} new program(s): each was tracked from "
                     "its first instruction (unless said otherwise above)" if followed else
                     f"  the process executed {execs} new program(s): tracked again after "
                     "each exec (its first writes are reported as pages holding data)")
    if procs is not None:
        lines += _processes(procs)
    print("\n".join(lines), file=file)


# ---- run ----------------------------------------------------------------------------------


class Run(ProcessTree):
    """``pagewatch run``: a :class:`~pagewatch.remote.tree.ProcessTree` that writes its
    recording and counts what each process wrote."""

    def __init__(self, cmd: list[str], args: argparse.Namespace, out: JsonLines,
                 follow: bool = False) -> None:
        super().__init__(cmd, backend=args.backend, mappings=args.mappings,
                         interval=args.interval, follow=follow)
        self.args, self.out = args, out
        self.stats = Stats(by_process=follow)
        self.stats.t0 = self.t0

    def new_proc(self, pid: int, ppid: int | None, command: list[str] | None) -> Proc:
        proc = super().new_proc(pid, ppid, command)
        proc.stats = Stats()
        return proc

    def collected(self, proc: Proc, d: ProcessDirty, new_interval: bool) -> None:
        proc.stats.add(d)
        self.stats.add(d, new_interval=new_interval)
        self.out.write(_interval_line(d, self.t0))

    def attached(self, proc: Proc) -> None:
        assert proc.tracker is not None
        line = _attach_line(proc.tracker, self.interval, proc.command)
        if self.follow:
            line["ppid"] = proc.ppid
        self.out.write(line)

    def record(self, event: dict[str, Any]) -> None:
        self.out.write(event)


def _command_name(cmd: list[str]) -> str:
    """The name in a default recording: the program, or the script it runs (memray's way)."""
    prog = os.path.basename(cmd[0])
    if prog.startswith("python") and len(cmd) > 1:
        if cmd[1].endswith(".py"):
            return os.path.basename(cmd[1])[:-3]
        if cmd[1] == "-m" and len(cmd) > 2:
            return cmd[2].rsplit(".", 1)[-1]
    return prog


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "target"


def _open_new(path: str, force: bool) -> IO[str]:
    """Open ``path`` for writing; an existing file only with ``force``; ``-``: stdout."""
    if path == "-":
        return sys.stdout
    check_writable(path)
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/null, a FIFO: not a file
        return open(path, "w")                          # of ours to keep
    try:
        return open(path, "w" if force else "x")
    except FileExistsError:
        raise PagewatchError(f"{path} exists: give -f/--force to overwrite it, or another "
                             "--output") from None


def _open_default(name: str, pid: int) -> tuple[IO[str], str]:
    """A new ``pagewatch-NAME.PID.jsonl`` in the current folder (never one that exists)."""
    stem = f"pagewatch-{_safe(name)}.{pid}"
    for n in range(100):
        path = f"{stem}.jsonl" if n == 0 else f"{stem}.{n}.jsonl"
        try:
            return open(path, "x"), path
        except FileExistsError:
            continue
    raise PagewatchError(f"{stem}.jsonl and 99 more names exist already: give --output")


def _next_steps(path: str | None) -> str:
    if path is None or path == "-":
        return ""
    return (f"  recording: {path}\n  next: pagewatch report {path}   "
            f"(or: pagewatch plot {path})")


def _usage(command: str, text: str) -> int:
    print(f"pagewatch: {command}: {text}", file=sys.stderr)
    return 2


def _check_follow(args: argparse.Namespace) -> None:
    """--follow-forks tracks with uffd-async only: say so before anything runs."""
    if os.uname().machine != "x86_64":
        raise Unsupported("--follow-forks", "it injects userfaultfd(2) into each new process, "
                          "which is implemented for x86-64 only")
    if args.backend == "soft-dirty":
        raise Unsupported("--follow-forks with the soft-dirty backend", "soft-dirty's reset "
                          "stops every thread of a process with ptrace, and the tracer that "
                          "follows the tree holds them already", "Use --backend uffd-async "
                          "(Linux 6.7+), or leave out --follow-forks")
    from ..kernel.probe import probe_wp_async

    ok, why = probe_wp_async()
    if not ok:
        raise Unsupported("--follow-forks", f"it needs the uffd-async backend, and {why}; "
                          "the soft-dirty backend cannot follow forks (its reset stops every "
                          "thread with ptrace, and the tracer that follows the tree holds "
                          "them already)", "Use Linux 6.7+, or leave out --follow-forks "
                          "(soft-dirty then tracks the command alone)")


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        return _usage(args.command, "give the command to run, e.g. "
                      "pagewatch run -- python3 -c \"b = bytearray(50_000_000)\"")
    follow = getattr(args, "follow_forks", False)
    if follow:
        _check_follow(args)
    no_output = getattr(args, "no_output", False)
    path: str | None = None if no_output else args.output
    f: IO[str] | None = None
    if path is not None:
        f = _open_new(path, args.force)  # before the command starts: a refusal costs nothing
    elif not no_output:
        check_writable("pagewatch.jsonl")
    # Like time(1): Ctrl-C and Ctrl-\ are for the command; pagewatch reports when it ends.
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        run = Run(cmd, args, JsonLines(f), follow=follow)
        run.start(old)
        try:
            if f is None and not no_output:
                f, path = _open_default(_command_name(cmd), run.pid)
                run.out = JsonLines(f)
            run.loop()
        finally:
            run.close()
        assert run.status is not None
        rc = _exit_code(run.status)
        run.out.write({"type": "exit", "code": rc, "pid": run.pid,
                       "t": round(time.monotonic() - run.stats.t0, 6)})
    finally:
        if f is not None and f is not sys.stdout:
            f.close()
        for s, h in old.items():
            signal.signal(s, h)
    err = run.exec_errno
    if err is not None:
        if args.output is None and path is not None:  # nothing ran: no recording of it
            os.unlink(path)
        print(f"pagewatch: {cmd[0]}: {os.strerror(err)}", file=sys.stderr)
        return rc
    if run.error:
        print(f"pagewatch: {run.error}", file=sys.stderr)
    how = (f"exited with code {rc}" if os.WIFEXITED(run.status) else
           f"was killed by signal {os.WTERMSIG(run.status)}")
    elapsed = time.monotonic() - run.stats.t0
    _summary(run.stats, run.interval, run.first, run.stop_ms, max(run.execs, 0),
             f"{cmd[0]} (pid {run.pid}) {how} after {elapsed:.2f} s", args.top, sys.stderr,
             followed=True, procs=list(run.procs.values()) if run.follow else None)
    steps = _next_steps(path)
    if steps:
        print(steps, file=sys.stderr)
    return rc


# ---- record -------------------------------------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[int | None, list[str] | None]:
    """``(pid, None)`` or ``(None, command)``, from ``--pid PID``, ``PID`` or ``-- CMD``."""
    pid = args.pid_option or args.pid
    if args.pid_option and args.pid and args.pid_option != args.pid:
        raise UsageError(f"{args.command}: two different pids ({args.pid} and --pid "
                         f"{args.pid_option})")
    cmd = args.cmd
    if cmd is not None and pid is not None:
        raise UsageError(f"{args.command}: give --pid PID or -- CMD [ARGS...], not both")
    if pid is None and not cmd:
        raise UsageError(f"{args.command}: give the process: --pid PID (a running one) or "
                         f"-- CMD [ARGS...] (started now), e.g. pagewatch {args.command} "
                         "--pid 1234")
    return pid, cmd


def cmd_record(args: argparse.Namespace) -> int:
    pid, cmd = _target(args)  # UsageError: exit status 2
    if cmd is not None:  # started now and tracked from its first instruction: as run does
        args.cmd, args.no_output, args.top = cmd, False, 5
        return cmd_run(args)
    assert pid is not None
    if args.follow_forks:
        return _usage(args.command, "--follow-forks follows a command started now: give "
                      "-- CMD [ARGS...] (a running process's children are not followed)")
    interval = args.interval
    pidfd = _pidfd(pid)
    deadline = time.monotonic() + args.duration if args.duration else None
    session: Session | None = None
    path: str | None = args.output
    try:
        if path is None:
            name = (_read_text(f"/proc/{pid}/comm") or "").strip() or "process"
            f, path = _open_default(name, pid)
        else:
            f = _open_new(path, args.force)
        if path != "-":
            print(f"pagewatch: recording pid {pid} to {path} (Ctrl-C ends it)",
                  file=sys.stderr)
        try:
            out = JsonLines(f)
            # Ctrl-C or kill(1), even during the attach: the end of the recording, not an
            # error.  A signal ignored already (SIGINT in a background job) stays ignored.
            stop = StopRequest()
            old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
                   if signal.getsignal(sig) != signal.SIG_IGN}
            try:
                session = Session(pid, args, interval, out, stop=stop)
                try:
                    session.loop(pidfd, deadline, args.count)
                finally:
                    session.close()
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        finally:
            if f is not sys.stdout:
                f.close()
        if path != "-" or not sys.stdout.isatty():
            elapsed = time.monotonic() - session.stats.t0
            _summary(session.stats, session.interval, session.first,
                     session.first.attach_stop_ms, session.execs,
                     f"recorded pid {pid} for {elapsed:.2f} s", 5, sys.stderr)
            steps = _next_steps(path)
            if steps:
                print(steps, file=sys.stderr)
        return 0
    finally:
        os.close(pidfd)


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError as exc:
        raise TargetGone(f"process {pid} does not exist (or has exited)", exc.errno,
                         pid=pid) from exc


# ---- top ----------------------------------------------------------------------------------


#: top's orders: key -> (help, the sort key of a row (mapping, pages this interval, total))
SORTS: dict[str, Any] = {
    "pages": lambda m, pages, total: -len(pages),
    "total": lambda m, pages, total: -total,
    "size": lambda m, pages, total: -(m.end - m.start),
    "address": lambda m, pages, total: m.start,
}
SORT_KEYS = {"p": "pages", "t": "total", "s": "size", "a": "address"}


def short_name(path: str) -> str:
    """What top shows of a mapping: the file's base name (the library, not its folder), the
    kernel's name as it is (``[heap]``, ``[anon:x]``), or ``anonymous``."""
    if not path:
        return "anonymous"
    if path.startswith("["):
        return path
    deleted = path.endswith(" (deleted)")
    base = os.path.basename(path[:-10] if deleted else path) or path
    return base + (" (deleted)" if deleted else "")


def _top_rows(ds: list[ProcessDirty], rows: int, totals: collections.Counter[Any], sort: str
              ) -> list[tuple[Any, Any, int, int]]:
    """The rows of one refresh: ``(mapping, pages, total pages, pid)``, over the collects of
    one process or (``--follow-forks``) of each process of the tree."""
    key = SORTS[sort]
    items = [(m, pages, totals[(d.pid, m.path, m.start)], d.pid)
             for d in ds for m, pages in d.written().items()]
    items.sort(key=lambda r: key(*r[:3]))
    return items[:rows]


def _top_title(ds: list[ProcessDirty], tree: bool = False) -> str:
    dt = max(max((d.elapsed for d in ds), default=0.0), 1e-9)
    pages, nbytes = sum(d.count for d in ds), sum(d.nbytes for d in ds)
    n = len({d.pid for d in ds})
    who = (f"{n} process{'es' if n != 1 else ''} of the tree" if tree else
           f"pid {ds[0].pid}")
    backend = ds[0].backend if ds else "-"
    return (f"{who}: {pages / dt:,.0f} pages/s, {nbytes / dt / MiB:,.2f} MiB/s "
            f"written ({backend}, {sum(len(d) for d in ds)} mappings tracked)")


def _top_where(m: Any, pid: int, tree: bool) -> str:
    return (f"{pid} " if tree else "") + f"{short_name(m.path)} {m.start:#x}"


def _top_table(ds: list[ProcessDirty], rows: int, totals: collections.Counter[Any],
               sort: str = "pages", note: str = "", tree: bool = False) -> Any:
    from rich.markup import escape
    from rich.table import Table

    dt = max(max((d.elapsed for d in ds), default=0.0), 1e-9)
    t = Table(title=escape(_top_title(ds, tree) + note), title_justify="left")
    for col, just in (("pages/s", "right"), ("MiB/s", "right"), ("total pages", "right"),
                      ("size MiB", "right"), ("perms", "left"),
                      ("pid mapping" if tree else "mapping", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for m, pages, total, pid in _top_rows(ds, rows, totals, sort):
        t.add_row(f"{len(pages) / dt:,.0f}", f"{pages.nbytes / dt / MiB:,.2f}",
                  f"{total:,}", f"{(m.end - m.start) / MiB:,.1f}",
                  m.perms, escape(_top_where(m, pid, tree)))
    return t


def _top_plain(ds: list[ProcessDirty], rows: int, totals: collections.Counter[Any], sort: str,
               t: float, tree: bool = False) -> str:
    dt = max(max((d.elapsed for d in ds), default=0.0), 1e-9)
    out = [f"t={t:.1f}s {_top_title(ds, tree)}",
           f"{'pages/s':>10} {'MiB/s':>9} {'total':>9} {'size MiB':>9} perms "
           + ("pid mapping" if tree else "mapping")]
    for m, pages, total, pid in _top_rows(ds, rows, totals, sort):
        out.append(f"{len(pages) / dt:>10.0f} {pages.nbytes / dt / MiB:>9.2f} {total:>9} "
                   f"{(m.end - m.start) / MiB:>9.1f} {m.perms:<5} {_top_where(m, pid, tree)}")
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys without Enter) when it is a terminal: its fd, else None."""
    try:
        fd = sys.stdin.fileno()
        interactive = os.isatty(fd)
    except (AttributeError, ValueError, OSError):
        interactive = False
    if not interactive:
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_top(args: argparse.Namespace) -> int:
    pid, cmd = _target(args)  # UsageError: exit status 2
    if args.follow_forks and cmd is None:
        return _usage(args.command, "--follow-forks follows a command started now: give "
                      "-- CMD [ARGS...] (a running process's children are not followed)")
    live_view = sys.stdout.isatty()
    if live_view:
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError as exc:
            raise Unsupported("pagewatch top", "the 'rich' package is not installed",
                              "Install it: pip install 'pagewatch[cli]'") from exc
    if cmd is not None:  # started held and tracked from its first instruction, as run does
        return _top_command(args, cmd, live_view)
    from ..process import ProcessTracker

    assert pid is not None
    interval = args.interval
    pidfd = _pidfd(pid)
    totals: collections.Counter[Any] = collections.Counter()
    stop = StopRequest()
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
           if signal.getsignal(sig) != signal.SIG_IGN}
    sort, paused, t0 = args.sort, False, time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            p = stack.enter_context(ProcessTracker(pid, backend=args.backend,
                                                   mappings=args.mappings))
            live = None
            if live_view:
                live = stack.enter_context(Live(console=Console(), auto_refresh=False))
            keyfd = stack.enter_context(_keys()) if live_view else None
            p.collect()
            n = 0
            last: ProcessDirty | None = None
            while args.count is None or n < args.count:
                deadline = time.monotonic() + interval
                exited = False
                while not stop.stopping:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    got = stop.select([pidfd] + ([keyfd] if keyfd is not None else []), wait)
                    if got is None:
                        break
                    ready = got
                    if pidfd in ready:
                        exited = True
                        break
                    if keyfd is not None and keyfd in ready:
                        key = os.read(keyfd, 1).decode(errors="replace").lower()
                        if key == "q":
                            stop.stopping = True
                        elif key == " ":
                            paused = not paused
                        elif key in SORT_KEYS:
                            sort = SORT_KEYS[key]
                        if live is not None and last is not None:
                            note = " - paused (space: go on)" if paused else ""
                            live.update(_top_table([last], args.rows, totals, sort, note),
                                        refresh=True)
                if stop.stopping:
                    break
                try:
                    d = p.collect()
                except TargetGone:
                    print(f"pagewatch: process {pid} has exited", file=sys.stderr)
                    break
                for m, pages in d.written().items():
                    totals[(d.pid, m.path, m.start)] += len(pages)
                if live is not None:
                    if not paused:
                        last = d
                        live.update(_top_table([d], args.rows, totals, sort), refresh=True)
                else:
                    sys.stdout.write(_top_plain([d], args.rows, totals, sort,
                                                time.monotonic() - t0))
                    sys.stdout.flush()
                n += 1
                if exited:
                    break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(pidfd)
    return 0


def _top_command(args: argparse.Namespace, cmd: list[str], live_view: bool) -> int:
    """``top -- CMD``: the command started held and tracked from its first instruction, as
    ``run`` does (no write before the attach is missed); with ``--follow-forks`` every
    process it starts too, as ``run --follow-forks``.  One refresh per interval; top ends
    with the command (and ends it, with SIGTERM, when asked to quit first), with its exit
    status."""
    tree = bool(args.follow_forks)
    if tree:
        _check_follow(args)
    totals: collections.Counter[Any] = collections.Counter()
    stop = StopRequest()
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
           if signal.getsignal(sig) != signal.SIG_IGN}
    state: dict[str, Any] = {"sort": args.sort, "paused": False, "n": 0, "last": None}
    t0 = time.monotonic()
    run = Run(cmd, args, JsonLines(None), follow=tree)
    with contextlib.ExitStack() as stack:
        live = None
        if live_view:
            from rich.console import Console
            from rich.live import Live

            live = stack.enter_context(Live(console=Console(), auto_refresh=False))
        keyfd = stack.enter_context(_keys()) if live_view else None

        def refresh(ds: list[ProcessDirty], note: str = "") -> None:
            if live is not None:
                live.update(_top_table(ds, args.rows, totals, state["sort"], note, tree=tree),
                            refresh=True)
            else:
                sys.stdout.write(_top_plain(ds, args.rows, totals, state["sort"],
                                            time.monotonic() - t0, tree=tree))
                sys.stdout.flush()

        def on_interval(ds: list[ProcessDirty]) -> None:
            for d in ds:
                for m, pages in d.written().items():
                    totals[(d.pid, m.path, m.start)] += len(pages)
            state["n"] += 1
            if not state["paused"]:
                state["last"] = ds
                refresh(ds)
            if args.count is not None and state["n"] >= args.count:
                stop.stopping = True

        def on_key(fd: int) -> None:
            key = os.read(fd, 1).decode(errors="replace").lower()
            if key == "q":
                stop.stopping = True
            elif key == " ":
                state["paused"] = not state["paused"]
            elif key in SORT_KEYS:
                state["sort"] = SORT_KEYS[key]
            if state["last"] is not None:
                refresh(state["last"], " - paused (space: go on)" if state["paused"] else "")

        run.on_interval = on_interval
        try:
            try:
                run.start(old)
            except OSError as exc:
                print(f"pagewatch: {cmd[0]}: {exc.strerror}", file=sys.stderr)
                return 1
            try:
                run.loop(stop, keyfd, on_key)
            finally:
                if not run.done() and run.status is None:  # quit: as top -- CMD, the
                    with contextlib.suppress(ProcessLookupError):  # command ends
                        os.kill(run.pid, signal.SIGTERM)
                run.close()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    if run.exec_errno is not None:
        print(f"pagewatch: {cmd[0]}: {os.strerror(run.exec_errno)}", file=sys.stderr)
    if run.error:
        print(f"pagewatch: {run.error}", file=sys.stderr)
    for p in run.procs.values():
        if p.untracked is not None:
            print(f"pagewatch: not tracked: pid {p.pid} ({p.name()[:60]}): {p.untracked}",
                  file=sys.stderr)
    assert run.status is not None
    return _exit_code(run.status)


# ---- plot ---------------------------------------------------------------------------------


def _objects(path: str) -> list[dict[str, Any]]:
    """Every JSON line of a recording (a line that is not JSON is an error naming it)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PagewatchError(f"{path}:{n} is not JSON ({exc.msg}): give a file "
                                     "written by 'pagewatch record' or 'run --output'") from exc
            obj.setdefault("_line", n)
            out.append(obj)
    return out


def main_pid(objs: list[dict[str, Any]]) -> int | None:
    """The recorded command's pid: the first attach line's (a followed recording holds
    several processes; the others came from it)."""
    for obj in objs:
        if obj.get("type") == "attach":
            return obj.get("pid")
    return next((o.get("pid") for o in objs if o.get("type", "interval") == "interval"), None)


def _load(path: str, pid: int | None = None, objs: list[dict[str, Any]] | None = None
          ) -> list[dict[str, Any]]:
    """The interval lines of a recording; with ``pid``, of that process only."""
    out = []
    for obj in objs if objs is not None else _objects(path):
        n = obj.pop("_line", "?")
        if obj.get("type", "interval") == "interval" and "mappings" in obj:
            missing = [k for k in ("pages",) if k not in obj] + sorted(
                {k for m in obj["mappings"] for k in ("start", "end", "path", "runs")
                 if k not in m})
            if missing:
                raise PagewatchError(f"{path}:{n}: an interval line without "
                                     f"{', '.join(missing)}: give a file written by "
                                     "'pagewatch record' or 'run --output'")
            if pid is None or obj.get("pid", pid) == pid:
                out.append(obj)
    if not out:
        which = f" of pid {pid}" if pid is not None else ""
        raise PagewatchError(f"{path} has no interval lines{which}: give a file written by "
                             "'pagewatch record' or 'pagewatch run --output'")
    return out


def heatmap(lines: list[dict[str, Any]], rows: int
            ) -> tuple[np.ndarray, list[tuple[int, str]], int]:
    """Fraction of each address bin written in each interval: ``(rows, intervals)``, the
    label positions (bin, name) of the larger mappings, and the pages on the address axis.
    Only mappings written at least once are on the axis, end to end, in address order."""
    import numpy as np

    spans: dict[tuple[int, int], str] = {}
    for obj in lines:
        for m in obj["mappings"]:
            spans[(m["start"], m["end"])] = m["path"]
    # Merge overlapping spans (a mapping that grew or split) into segments.
    segs: list[list[Any]] = []
    for (s, e), path in sorted(spans.items()):
        if segs and s <= segs[-1][1]:
            segs[-1][1] = max(segs[-1][1], e)
        else:
            segs.append([s, e, path])
    starts = np.array([s for s, _, _ in segs], np.int64) // PAGE_SIZE
    sizes = np.array([(e - s) // PAGE_SIZE for s, e, _ in segs], np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    total = int(sizes.sum())
    rows = max(1, min(rows, total))
    grid = np.zeros((rows, len(lines)))
    per_bin = np.bincount(np.arange(total) * rows // total, minlength=rows)
    for col, obj in enumerate(lines):
        pages = []
        for m in obj["mappings"]:
            r = np.asarray(m["runs"], np.int64).reshape(-1, 2)
            if not len(r):
                continue
            first, count = m["start"] // PAGE_SIZE + r[:, 0], r[:, 1]
            within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            pages.append(np.repeat(first, count) + within)
        if not pages:
            continue
        p = np.unique(np.concatenate(pages))
        seg = np.searchsorted(starts, p, side="right") - 1
        comp = offsets[seg] + (p - starts[seg])
        grid[:, col] = np.bincount(comp * rows // total, minlength=rows) / per_bin
    # Label the larger mappings, at least 4% of the axis apart so the names stay readable.
    labels: list[tuple[int, str]] = []
    for i in np.argsort(-sizes).tolist():
        at = int(offsets[i] * rows // total)
        if all(abs(at - b) >= max(1, rows // 25) for b, _ in labels):
            labels.append((at, _name(segs[i][2]).rsplit("/", 1)[-1]))
        if len(labels) == 12:
            break
    return grid, sorted(labels), total


def cmd_plot(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise Unsupported("pagewatch plot", "matplotlib is not installed",
                          "Install it: pip install 'pagewatch[plot]'") from exc
    if args.output is None:
        stem = args.file[:-6] if args.file.endswith(".jsonl") else args.file
        args.output = stem + ".png"
    check_writable(args.output)
    if os.path.exists(args.output) and not args.force:
        raise PagewatchError(f"{args.output} exists: give -f/--force to overwrite it, or "
                             "another --output")
    objs = _objects(args.file)
    pids = {o.get("pid") for o in objs if o.get("type", "interval") == "interval"}
    pid = args.pid if args.pid is not None else (main_pid(objs) if len(pids) > 1 else None)
    lines = _load(args.file, pid, objs)
    grid, labels, total = heatmap(lines, args.rows)
    t = np.array([obj.get("t", i) for i, obj in enumerate(lines)], float)
    dt = np.array([obj.get("dt", 1.0) or 1.0 for obj in lines], float)
    rate = np.array([obj["pages"] for obj in lines], float) * PAGE_SIZE / MiB / dt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
    t0 = t - dt
    extent = (float(t0[0]), float(t[-1]), float(grid.shape[0]), 0.0)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                   extent=extent, vmin=0, vmax=1)
    # Both panels give the colour bar the same width: their time axes stay aligned.
    fig.colorbar(im, ax=[ax, ax2], label="fraction of pages written")
    ax.set_yticks([b for b, _ in labels], [name for _, name in labels], fontsize=7)
    ax.set_ylabel(f"written mappings, end to end ({total} pages, low address on top)")
    pid = lines[0].get("pid", "?")
    ax.set_title(f"pages written by pid {pid}, per interval")
    ax2.stairs(rate, np.concatenate(([t0[0]], t)))  # each rate over its own interval
    ax2.set_ylabel("MiB/s written")
    ax2.set_xlabel("seconds")
    ax2.set_ylim(bottom=0)
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    others = f"; pid {pid} of {len(pids)} processes (--pid PID for another)" \
        if len(pids) > 1 else ""
    print(f"pagewatch: wrote {args.output} ({len(lines)} intervals, {total} pages on the "
          f"address axis{others})", file=sys.stderr)
    return 0
