"""A command started held and traced from its first instruction -- with ``follow``, every
process of its tree -- and the tracker of each process's current program: what ``pagewatch
run``, ``record -- CMD`` and ``top -- CMD`` are built on.

The tracer is a helper process (``src/native/inject.c``, ``tracer_*``) that seizes the
command before its first instruction, injects a userfaultfd at every exec (and, following
forks, at every new child's first stop), holds each process at its exit stop for a last
collect, and reports these events over a pipe; :class:`ProcessTree` turns them into
:class:`~pagewatch.ProcessTracker` objects and collects every ``interval``.  What is done
with each collect and event is for a subclass to say (:meth:`ProcessTree.collected`,
:meth:`ProcessTree.attached`, :meth:`ProcessTree.record`): the CLI writes a recording.

This module loads neither numpy nor the C extension when imported (the CLI's ``--help``).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import PagewatchError, TargetGone, Unsupported
from .procfs import _read_text, _status

if TYPE_CHECKING:
    from ..process import ProcessDirty, ProcessTracker

__all__ = ["ProcessTree", "Proc", "StopRequest"]


class _Wake(Exception):
    """Raised by :class:`StopRequest` to cut the wait between two collects short."""


class StopRequest:
    """A signal handler that asks a loop to end after one last collect.  It interrupts the
    loop's wait only, never an attach or a collect (whose pages, already re-protected, would
    be lost).  Installed before the attach, so that a signal at any moment ends it cleanly."""

    def __init__(self) -> None:
        self.stopping = False
        self.waiting = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.waiting:
            raise _Wake

    #: the longest a wait blocks between two looks at ``stopping``
    SLICE = 0.25

    def select(self, fds: list[int], timeout: float | None) -> list[int] | None:
        """``select(2)`` for reading on ``fds`` for up to ``timeout`` seconds (None: until
        one is ready); the ready ones ([] at the timeout), or None once a stop was asked.
        The wait is cut in slices of :attr:`SLICE`: Python runs a handler between two
        bytecodes, so a signal that lands after the last look at ``stopping`` and before
        the system call does not interrupt it (a ``record --interval 600`` once sat out its
        600 s after a Ctrl-C that landed there, in the 6.12 guest)."""
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self.waiting = True
        try:
            while not self.stopping:
                left = self.SLICE if end is None else max(0.0, end - time.monotonic())
                ready, _, _ = select.select(fds, [], [], min(left, self.SLICE))
                if ready:
                    return ready
                if end is not None and time.monotonic() >= end:
                    return []
            return None
        except _Wake:
            return None
        finally:
            self.waiting = False


EV_ATTACHED, EV_EXEC, EV_EXIT, EV_GONE, EV_ERROR, EV_FORK, EV_END = 1, 2, 3, 4, 5, 6, 7


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _fork_held(cmd: list[str], dispositions: dict[signal.Signals, Any]
               ) -> tuple[int, int, int]:
    """Fork a child that waits for one byte on a pipe before it executes ``cmd``; returns
    ``(pid, release_fd, error_fd)``.  error_fd yields the errno of a failed exec.
    ``dispositions`` are the signal handlers pagewatch had before it ignored them: the
    command gets the default action unless they were ignored already."""
    from .. import _native

    release_r, release_w = os.pipe()
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec worked
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 125
        try:
            for sig, handler in dispositions.items():
                if handler != signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
            os.close(release_w)
            os.close(err_r)
            # Under Yama ptrace_scope=1 the tracer helper (a descendant of pagewatch, not of
            # this child) may seize it only with this exception.
            _native.allow_ptracer(os.getppid())
            if os.read(release_r, 1) == b"\x01":
                os.close(release_r)
                code = 127
                os.execvp(cmd[0], cmd)
        except OSError as exc:
            os.write(err_w, str(exc.errno).encode())
            code = 126 if exc.errno == errno.EACCES else 127
        finally:
            os._exit(code)
    os.close(release_r)
    os.close(err_w)
    return pid, release_w, err_r


def _threads(pid: int) -> int:
    """How many threads process ``pid`` has (0 when it is gone)."""
    return int(_status(pid).get("Threads") or 0)


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a process (``/proc/PID/cmdline``), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] or None


class Proc:
    """One process of a ``pagewatch run``: the tracker of its current program, what it wrote,
    how it ended.  Without ``--follow-forks`` there is one, the command."""

    def __init__(self, pid: int, ppid: int | None, command: list[str] | None) -> None:
        self.pid, self.ppid, self.command = pid, ppid, command
        self.tracker: ProcessTracker | None = None
        self.first: ProcessTracker | None = None
        #: what the user of the tree counts for it (the CLI: its Stats)
        self.stats: Any = None
        self.stop_ms: float | None = None
        self.execs = 0
        #: why it is not tracked (said in the summary and the recording), or None
        self.untracked: str | None = None
        #: the process whose memory it shares (vfork, CLONE_VM) until it executes a program
        self.shares: int | None = None
        #: its wait status once it is gone (-2: let go while still running)
        self.status: int | None = None

    def name(self) -> str:
        return " ".join(self.command) if self.command else f"pid {self.pid}"

    def ended(self) -> str:
        st = self.status
        if st is None:
            return "running"
        if st < 0:
            return "still running (let go)"
        return (f"exited {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else
                f"killed by signal {os.WTERMSIG(st)}")


class ProcessTree:
    """A command, its tracer (a helper process), the tracker of each process's current
    program (one process, or with ``follow`` every process of the tree).

    Parameters
    ----------
    cmd
        The command and its arguments (looked up in ``PATH``).
    backend, mappings
        As :class:`~pagewatch.ProcessTracker`'s (following a tree: ``uffd-async`` only).
    interval
        Seconds between two collects of every tracked process.
    follow
        Track every forked child and every exec of the tree, not only the command's
        program.
    """

    def __init__(self, cmd: list[str], *, backend: str = "auto", mappings: str = "writable",
                 interval: float = 0.5, follow: bool = False) -> None:
        self.cmd, self.follow = cmd, follow
        self.backend, self.mappings = backend, mappings
        self.interval = interval or 0.5
        self.t0 = time.monotonic()
        #: following: no collect has counted in the interval in progress yet
        self._open_interval = True
        #: called at the end of each interval with what was collected in it (each process's
        #: collects, its exec's and exit's included): top's refresh
        self.on_interval: Callable[[list[ProcessDirty]], None] | None = None
        self._frame: list[ProcessDirty] = []
        self.procs: dict[int, Proc] = {}
        self.status: int | None = None
        self.ended = False
        self.error: str | None = None
        self.exec_errno: int | None = None

    # ---- what a subclass does with what happens ----------------------------------------
    def collected(self, proc: Proc, d: ProcessDirty, new_interval: bool) -> None:
        """``proc``'s tracker reported ``d`` (``new_interval``: it opens an interval)."""

    def attached(self, proc: Proc) -> None:
        """``proc``'s current program is tracked from now on (``proc.tracker``)."""

    def record(self, event: dict[str, Any]) -> None:
        """A fork, exec, exit or untracked process, as a JSON-able dict."""

    def new_proc(self, pid: int, ppid: int | None, command: list[str] | None) -> Proc:
        """A process seen for the first time."""
        return Proc(pid, ppid, command)

    # the command's own process, as the summary shows it
    @property
    def main(self) -> Proc:
        return self.procs[self.pid]

    @property
    def first(self) -> ProcessTracker | None:
        return self.main.first

    @property
    def stop_ms(self) -> float | None:
        return self.main.stop_ms

    @property
    def execs(self) -> int:
        return self.main.execs - 1  # the first exec is the command itself

    def start(self, dispositions: dict[signal.Signals, Any]) -> None:
        from .. import _native

        self.pid, release_w, self.err_fd = _fork_held(self.cmd, dispositions)
        self.procs[self.pid] = self.new_proc(self.pid, None, self.cmd)
        self.pidfd = os.pidfd_open(self.pid)
        from .attach import UFFD_FLAG_SETS

        self.handle, self.evfd = _native.tracer_start(self.pid, release_w, self.pidfd,
                                                      list(UFFD_FLAG_SETS), self.follow)

    def _t(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def _collect(self, proc: Proc, new_interval: bool = True) -> int:
        """Collect ``proc`` (its last collect when its memory is gone: the tracker closes);
        returns the pages reported.  Following a tree, what a process's exec or exit collects
        counts in the interval in progress (with the next interval's collects)."""
        if proc.tracker is None:
            return 0
        if self.follow and new_interval:  # an event's collect, between two intervals
            new_interval = self._open_interval
            self._open_interval = False
        try:
            d: ProcessDirty | None = proc.tracker.collect()
        except TargetGone as exc:  # exec or exit seen first by the collect: events follow
            d = exc.collected  # type: ignore[assignment]
            proc.tracker.close()
            proc.tracker = None
        if d is None:
            return 0
        self.collected(proc, d, new_interval)
        self._frame.append(d)
        return d.count

    def _collect_all(self) -> None:
        """The end of an interval: every tracked process, counted as one interval."""
        first = self._open_interval
        for proc in list(self.procs.values()):
            if proc.tracker is not None:
                self._collect(proc, new_interval=first)
                first = False
        self._open_interval = True
        frame, self._frame = self._frame, []
        if self.on_interval is not None:
            self.on_interval(frame)

    def _untracked(self, proc: Proc, why: str) -> None:
        proc.untracked = why
        proc.tracker = None
        self.record({"type": "untracked", "t": self._t(), "pid": proc.pid,
                        "ppid": proc.ppid, "command": proc.command, "reason": why})

    def _track(self, proc: Proc, fd: int, c: float) -> None:
        """Track ``proc``'s program with the userfaultfd ``fd`` its tracer made (-errno when
        it could not), while the tracer holds it before its first instruction."""
        from ..process import ProcessTracker

        name = (_read_text(f"/proc/{proc.pid}/comm") or (proc.command or ["?"])[0]).strip()
        held = time.monotonic()
        try:
            if fd < 0:
                why = ("it runs under a seccomp filter, which could kill it for the "
                       "injected userfaultfd(2) call" if fd == -errno.ECANCELED else
                       f"the injected userfaultfd(2) call failed ({os.strerror(-fd)})")
                if self.backend == "uffd-async" or self.follow:
                    raise Unsupported(f"tracking {name} with uffd-async", why)
                try:  # soft-dirty needs no injection
                    proc.tracker = ProcessTracker(proc.pid, backend="soft-dirty",
                                                  mappings=self.mappings)
                except Unsupported as exc:
                    raise Unsupported(f"tracking {name}", f"uffd-async: {why}; "
                                      f"soft-dirty: {exc.reason}") from exc
            else:
                # Following, soft-dirty cannot work (its freeze needs every thread, which
                # the tracer holds): the start said so if the kernel has no uffd-async.
                backend = "uffd-async" if self.follow else self.backend
                proc.tracker = ProcessTracker(proc.pid, backend=backend,
                                              mappings=self.mappings, userfaultfd=fd)
            proc.first = proc.first or proc.tracker
            # Stopped for the injection (c) and while its mappings were registered.
            stop_ms = c / 1e6 + (time.monotonic() - held) * 1e3
            proc.tracker.attach_info.update(stop_ms=stop_ms, inject_ms=c / 1e6)
            if proc.stop_ms is None:
                proc.stop_ms = stop_ms
            self.attached(proc)
            proc.untracked = None
        except PagewatchError as exc:
            if proc.pid == self.pid and not self.follow:
                self.error = f"cannot track {name}: {exc}; it runs untracked"
                proc.tracker = None
            else:
                self._untracked(proc, str(exc))

    def _event(self, kind: int, a: int, b: int, c: float, pid: int) -> None:
        from .. import _native

        proc = self.procs.get(pid)
        if kind == EV_ERROR:
            self.error = (f"cannot trace {self.cmd[0]}: ptrace refused it "
                          f"({os.strerror(a)}); it runs untracked")
        elif kind == EV_FORK:
            ppid = b if b > 0 else None
            proc = self.procs[pid] = self.new_proc(pid, ppid, _cmdline(pid))
            line = {"type": "fork", "t": self._t(), "pid": pid, "ppid": ppid,
                    "command": proc.command}
            if a == -errno.EEXIST:  # vfork: its parent's memory, until it executes
                line["shares_memory_of"] = ppid
            self.record(line)
            try:
                if a == -errno.EEXIST:
                    proc.shares = ppid
                else:
                    self._track(proc, a, c)
            finally:
                _native.tracer_release(self.handle)
        elif kind == EV_EXEC:
            if proc is None:  # not seen before (cannot happen, but never drop a process)
                proc = self.procs[pid] = self.new_proc(pid, None, None)
            proc.execs += 1
            if proc.tracker is not None:
                self._collect(proc)  # raises nothing: the old program's memory is gone
            if proc.execs > 1 or pid != self.pid:
                self.record({"type": "exec", "t": self._t(), "pid": pid})
            if pid != self.pid:
                proc.command = _cmdline(pid) or proc.command
            proc.shares = None
            try:
                self._track(proc, a, c)
            finally:
                _native.tracer_release(self.handle)
        elif kind == EV_EXIT:
            if proc is not None:
                self._collect(proc)  # the last one: the memory is still there at the exit stop
                if proc.tracker is not None and _threads(pid) <= 1:
                    # Once let go it tears its memory down: a collect then reads that, and
                    # PAGEMAP_SCAN on Linux 6.12 (no hold on the memory's users) reported
                    # every page of some mappings as written.  Its last collect was this one.
                    # (A leader leaving before its threads keeps its tracker: they write on.)
                    proc.tracker.close()
                    proc.tracker = None
            _native.tracer_release(self.handle)
        elif kind == EV_GONE:
            if pid == self.pid:
                self.status = self._reap(a)
            if proc is not None:
                if proc.tracker is not None:  # its last collect was at its exit stop
                    proc.tracker.close()
                    proc.tracker = None
                if pid != self.pid:
                    proc.status = a
                    self.record({"type": "exit", "t": self._t(), "pid": pid,
                                    "code": _exit_code(a) if a >= 0 else None})
                else:
                    proc.status = self.status
        elif kind == EV_END:
            self.ended = True

    def done(self) -> bool:
        return self.ended if self.follow else self.status is not None

    def tracking(self) -> bool:
        return any(p.tracker is not None for p in self.procs.values())

    def loop(self, stop: StopRequest | None = None, keyfd: int | None = None,
             on_key: Callable[[int], None] | None = None) -> None:
        """Handle the tracer's events and collect every interval until the command (or with
        ``follow``, every process of the tree) has ended, or ``stop`` (a signal handler, or a
        key: ``on_key`` is called when ``keyfd`` is readable) asks to stop."""
        from .. import _native

        next_t = time.monotonic() + self.interval
        while not self.done():
            if stop is not None and stop.stopping:
                return
            timeout = next_t - time.monotonic() if self.tracking() else None
            fds = [self.evfd] + ([keyfd] if keyfd is not None else [])
            if stop is not None:
                got = stop.select(fds, timeout)
                if got is None:
                    return
                ready = got
            else:
                ready, _, _ = select.select(fds, [], [],
                                            None if timeout is None else max(0, timeout))
            if keyfd is not None and keyfd in ready and on_key is not None:
                on_key(keyfd)
            while not self.done():
                ev = _native.tracer_event(self.handle)
                if ev is None:
                    break
                self._event(*ev)
            if self.tracking() and time.monotonic() >= next_t:
                self._collect_all()
                next_t = max(next_t + self.interval, time.monotonic())
        if self._frame and self.on_interval is not None:  # the last exits' collects
            frame, self._frame = self._frame, []
            self.on_interval(frame)

    def _reap(self, seen: int) -> int:
        """The child's wait status: it is ours (the tracer helper only saw it end, ``seen``;
        -2 when it detached it first): reap it."""
        try:
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:  # reaped already (cannot happen unless a caller waited)
            return max(seen, 0)

    def close(self) -> None:
        from .. import _native

        unread = _native.tracer_stop(self.handle)
        if self.status is None:  # detached early (an error): let it finish, as the shell would
            self.status = self._reap(unread if unread is not None else -2)
            self.main.status = self.status
        for proc in self.procs.values():
            if proc.tracker is not None:
                proc.tracker.close()
                proc.tracker = None
        os.close(self.pidfd)
        data = os.read(self.err_fd, 32)  # the child is gone: EOF, or the errno of its exec
        os.close(self.err_fd)
        self.exec_errno = int(data) if data else None
