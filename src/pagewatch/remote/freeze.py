"""Every thread of another process stopped for an instant (ptrace, no SIGSTOP): what a
soft-dirty reset needs so that no write falls between the read of a bit and its reset
(``src/native/inject.c``'s freezer)."""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from typing import Any

from .. import _native
from ..errors import PagewatchError, PermissionDenied, TargetGone, Unsupported
from .procfs import _read_text, _status
from .target import why_no_ptrace

__all__ = ["frozen"]


#: one freeze at a time in this process: two trackers of the same target would fight over its
#: threads (a thread has one tracer)
_FREEZE_LOCK = threading.Lock()


def _tracer_of(pid: int, tid: int) -> int:
    try:
        return int(_status(f"{pid}/task/{tid}").get("TracerPid", "0") or 0)
    except ValueError:
        return 0


def _freeze_error(pid: int, timeout: float, exc: OSError) -> PagewatchError:
    tid = exc.filename2 if isinstance(exc.filename2, int) else 0
    thread = f"thread {tid} of process {pid}" if tid and tid != pid else f"process {pid}"
    if exc.errno == errno.ESRCH:
        return TargetGone(f"process {pid} has exited", exc.errno, pid=pid)
    if exc.errno == errno.EPERM:
        tracer = _tracer_of(pid, tid) if tid else 0
        if tracer:
            comm = (_read_text(f"/proc/{tracer}/comm") or "?").strip()
            return PermissionDenied(
                f"{thread} is already traced by process {tracer} ({comm}), and a thread can "
                "have only "
                "one tracer: the soft-dirty backend stops every thread of the target for an "
                "instant at each reset (so that no write falls between the read of the bits "
                "and their reset); detach that debugger or strace first", exc.errno, pid=pid)
        return PermissionDenied(why_no_ptrace(pid), exc.errno, pid=pid)
    if exc.errno == errno.ETIMEDOUT:
        return PagewatchError(
            f"{thread} did not stop within {timeout:g} s (it is in an uninterruptible sleep, "
            "state D, or a vfork parent waiting for its child), so nothing was reset: the "
            "written pages stay marked and the next collect reports them; try again, or with "
            "a longer timeout", exc.errno)
    return PagewatchError(f"stopping the threads of process {pid} failed at {exc.filename}: "
                          f"{exc.strerror}", exc.errno)


@contextlib.contextmanager
def frozen(pid: int, timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """Every thread of process ``pid`` stopped for the duration of the ``with`` block.

    Each thread is seized and interrupted with ptrace (``PTRACE_SEIZE`` +
    ``PTRACE_INTERRUPT``, from a native thread) and ``/proc/PID/task`` is listed again until no
    new thread appears; at the end each is detached.  The target's parent sees no stop (no
    ``SIGSTOP``); a syscall the interrupt cut short is restarted; a target stopped by its user
    (``SIGSTOP``, Ctrl-Z) stays stopped.  A stopped thread waits in the kernel on its way back
    to user mode, with no system call in progress: nothing it does can write its memory until
    the end of the block.  The threads of a ``pagewatch run`` child that its tracer thread holds
    are stopped by that thread.  io_uring workers cannot be stopped (the kernel refuses them to
    ptrace): they are counted in ``unfrozen``.

    The dict yielded is filled at the end: ``stop_ms`` (first interrupt to last detach),
    ``wait_ms`` (until every thread was stopped), ``held_ms`` (all stopped), ``threads``,
    ``by_tracer``, ``gone``, ``unfrozen``, ``rounds``, ``group_stopped``, ``signals``.

    Raises
    ------
    PermissionDenied
        A thread cannot be seized (another tracer, or no ptrace permission).
    PagewatchError
        A thread did not stop within ``timeout`` seconds (nothing was done while frozen).
    TargetGone
        The process exited.
    """
    info: dict[str, Any] = {}
    with _FREEZE_LOCK:
        try:
            handle = _native.freeze(int(pid), max(1, int(timeout * 1000)))
        except NotImplementedError as exc:
            raise Unsupported("stopping the threads of another process", str(exc)) from exc
        except OSError as exc:
            raise _freeze_error(int(pid), timeout, exc) from exc
        try:
            yield info
        finally:
            raw = _native.thaw(handle)
            info.update({k: v for k, v in raw.items() if not k.endswith("_ns")})
            info.update({k[:-3] + "_ms": v / 1e6 for k, v in raw.items() if k.endswith("_ns")})


# ---- the tracker ------------------------------------------------------------------------
