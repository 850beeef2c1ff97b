"""Turning a failed system call into a pagewatch error that says what to do."""

from __future__ import annotations

import errno

from ..errors import InvalidRange, PagewatchError, PermissionDenied, TargetGone, Unsupported


def zombie_parent(pid: int | str) -> str | None:
    """``"PPID (comm)"`` of the parent that has not reaped ``pid`` when ``pid`` is a zombie
    (it exited: no memory left), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if not fields or fields[0] != "Z":
        return None
    ppid = fields[1]
    try:
        with open(f"/proc/{ppid}/comm") as f:
            return f"{ppid} ({f.read().strip()})"
    except OSError:
        return ppid


def proc_open_error(exc: OSError, pid: int | str, what: str) -> PagewatchError:
    """The error for a failed open of ``/proc/PID/<what>``."""
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        parent = zombie_parent(pid)
        if parent is not None:
            return TargetGone(f"process {pid} is a zombie: it has exited and its parent, "
                              f"process {parent}, has not reaped it (wait(2)) yet; it has no "
                              "memory left to track", exc.errno)
        return TargetGone(f"process {pid} does not exist (or has exited): /proc/{pid}/{what}",
                          exc.errno)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(
            f"no permission to open /proc/{pid}/{what}: it needs ptrace read access to the "
            "process (same user and a Yama ptrace_scope that allows it, or CAP_SYS_PTRACE)",
            exc.errno,
        )
    return PagewatchError(f"cannot open /proc/{pid}/{what}: {exc.strerror}", exc.errno)


def scan_error(exc: OSError, start: int, end: int, flags: int) -> PagewatchError:
    """The error for a failed PAGEMAP_SCAN ioctl."""
    rng = f"[{start:#x}, {end:#x})"
    if exc.errno == errno.ENOTTY:
        return Unsupported("PAGEMAP_SCAN", "this kernel has no PAGEMAP_SCAN ioctl (it came in "
                           "Linux 6.7)", "Use the soft-dirty, uffd-sync, mprotect or compare "
                           "backend", exc.errno)
    if exc.errno == errno.EPERM and flags & 2:
        return InvalidRange(f"part of {rng} is not registered for async write-protect (was it "
                            "remapped, unmapped and mapped again, or inherited over fork?): "
                            "register it again or create a new tracker", exc.errno)
    if exc.errno == errno.EFAULT:
        return InvalidRange(f"{rng} is outside the address space the kernel accepts", exc.errno)
    if exc.errno == errno.EINVAL:
        return InvalidRange(f"PAGEMAP_SCAN rejected the arguments for {rng} (unaligned start or "
                            "a category bit this kernel does not know)", exc.errno)
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return TargetGone("the process whose pagemap this is has exited", exc.errno)
    return PagewatchError(f"PAGEMAP_SCAN of {rng} failed: {exc.strerror}", exc.errno)
