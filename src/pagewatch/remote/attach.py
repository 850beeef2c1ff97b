"""Getting a userfaultfd of the target's own: the ptrace injection (run by a short-lived
helper process the monitor's death cannot stop; ``src/native/inject.c``) and the checks and
error wording around it."""

from __future__ import annotations

import errno
import os
from typing import Any

from .. import _native
from ..errors import PagewatchError, PermissionDenied, TargetGone, Unsupported
from ..kernel.constants import UFFD_USER_MODE_ONLY
from .procfs import _status, _thread_state
from .target import why_no_ptrace

__all__ = ["take_userfaultfd", "UFFD_FLAG_SETS"]

#: the userfaultfd(2) flags an injection tries, in order: user-mode faults only (allowed to
#: unprivileged callers when vm.unprivileged_userfaultfd=0), then without that flag (kernels
#: before 5.11).  The injection here and pagewatch run's tracer (remote/tree.py) both use it.
UFFD_FLAG_SETS = (os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY,
                  os.O_CLOEXEC | os.O_NONBLOCK)


def _pick_thread(pid: int) -> int:
    """The thread to inject into: the main one, unless it has exited."""
    if _thread_state(pid, pid) not in "ZX":
        return pid
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as exc:
        raise TargetGone(f"process {pid} has exited", exc.errno, pid=pid) from exc
    for tid in tids:
        if _thread_state(pid, tid) not in "ZX":
            return tid
    raise TargetGone(f"process {pid} is exiting", pid=pid)


def take_userfaultfd(pid: int, pidfd: int, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Create a userfaultfd in process ``pid`` and take it; returns ``(fd, info)``.

    ``info`` has ``stop_ms`` (how long the target thread was stopped: from the first
    interrupt to the detach), ``wait_ms`` (from the interrupt until it stopped), ``held_ms``
    (from then to the detach), ``flags`` (the userfaultfd(2) flags that worked) and ``tid``.
    """
    if pid == os.getpid():
        raise PagewatchError("a process cannot ptrace itself: use pagewatch.Tracker to track "
                             "this process's own memory")
    st = _status(pid)
    if not st:
        raise TargetGone(f"process {pid} does not exist (or has exited)", errno.ESRCH, pid=pid)
    if _native.seccomp_filtered(pid):  # the tracer's own check (src/native/inject.c)
        raise Unsupported(
            f"userfaultfd injection into process {pid}",
            "it runs under a seccomp filter, which could kill it for an unexpected "
            "userfaultfd(2) call", "Start it without the filter, or use the soft-dirty "
            "backend where the kernel has it")
    # A syscall instruction to run it, found before the stop (it is checked again once the
    # target is stopped, and looked for again if it is gone: a target inside execve).
    gadget = _native.find_gadget(pid)
    tid = _pick_thread(pid)
    try:
        fd, tries, raw = _native.inject_userfaultfd(tid, pidfd, gadget, list(UFFD_FLAG_SETS),
                                                    int(timeout * 1000))
    except NotImplementedError as exc:
        raise Unsupported("userfaultfd injection", str(exc)) from exc
    except OSError as exc:
        what = exc.filename or "ptrace"
        if exc.errno == errno.ESRCH:
            raise TargetGone(f"process {pid} exited while pagewatch attached ({what})",
                             exc.errno, pid=pid) from exc
        if exc.errno == errno.EPERM and "SEIZE" in str(what):
            raise PermissionDenied(why_no_ptrace(pid), exc.errno, pid=pid) from exc
        if exc.errno == errno.ETIMEDOUT:
            raise PagewatchError(
                f"thread {tid} of process {pid} did not stop within {timeout:g} s (it is in an "
                "uninterruptible sleep, state D, or a vfork parent waiting for its child): "
                "try again, or with a longer timeout", exc.errno) from exc
        if exc.errno == errno.ENOEXEC:
            raise Unsupported(f"tracking process {pid}", "it runs 32-bit code") from exc
        if exc.errno == errno.ENOENT and "syscall instruction" in str(what):
            raise Unsupported(f"tracking process {pid}", "no syscall instruction found in "
                              "its executable memory to run the injected userfaultfd(2) "
                              "call", "Use the soft-dirty backend where the kernel has it",
                              exc.errno) from exc
        raise PagewatchError(f"injecting userfaultfd(2) into process {pid} failed at "
                             f"{what}: {exc.strerror}", exc.errno) from exc
    # The target is stopped from the first interrupt (it may take a while to stop: wait)
    # until the detach (held after it stopped): stop_ms is the whole of it.
    wait_ns, held_ns = raw["wait_ns"], raw["stop_ns"]
    info = {"tid": tid, "wait_ms": wait_ns / 1e6, "held_ms": held_ns / 1e6,
            "stop_ms": (wait_ns + held_ns) / 1e6 if wait_ns >= 0 and held_ns >= 0 else None,
            "tries": tries, "flags": None, "helper": bool(raw.get("helper")),
            "ptrace_calls": raw.get("ptrace_calls", 0)}
    if raw.get("detach_errno"):
        # The target was left as it was only if the restore worked: say it loudly.
        if fd >= 0:
            os.close(fd)
        raise PagewatchError(f"restoring process {pid} after the injection failed at "
                             f"{raw['detach_what']}: {os.strerror(raw['detach_errno'])}",
                             raw["detach_errno"])
    if fd < 0:
        errs = [f"flags {fl:#x}: {errno.errorcode.get(-r, -r)}" for fl, r in tries]
        if raw.get("getfd_errno"):
            e = raw["getfd_errno"]
            raise PermissionDenied(f"pidfd_getfd(2) could not take the userfaultfd of process "
                                   f"{pid} ({os.strerror(e)}): it needs the same ptrace "
                                   "permission as attaching", e, pid=pid)
        raise Unsupported(f"userfaultfd in process {pid}",
                          "the target's userfaultfd(2) calls failed (" + "; ".join(errs) +
                          "): the kernel lacks CONFIG_USERFAULTFD or a policy forbids it",
                          "Use the soft-dirty backend where the kernel has it",
                          -tries[-1][1] if tries else None)
    info["flags"] = next(fl for fl, r in tries if r >= 0)
    return fd, info


_internal_hugetlb: frozenset[tuple[int, int]] | None = None
