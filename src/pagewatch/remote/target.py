"""The watched program: what /proc says of it (status, permission, kind), and the memory
one tracker is bound to -- its maps and pagemap files, opened once, so that an exit or an
exec reads as "gone" -- with the liveness checks and the result every method builds."""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import time
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from .._lifecycle import Closeable
from ..errors import TargetGone, Unsupported
from ..kernel._errors import zombie_parent
from ..kernel.constants import PAGE_SIZE
from ..kernel.maps import Mapping, parse_maps
from ..kernel.pagemap import Pagemap
from ..rangeset import RangeSet
from .procfs import _read_text, _status
from .result import _EMPTY_RUNS, ProcessDirty, SkippedMapping, TargetExec, _Layout

#: kernel-provided mappings that are never tracked
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]"})

_CAP_SYS_PTRACE = 19
#: a registered buffer in an io_uring's fdinfo: "    0: 0x7f0123456000/65536"
_USER_BUF = re.compile(r"\s*\d+: 0x([0-9a-f]+)/(\d+)")


def _has_cap_sys_ptrace() -> bool:
    try:
        return bool(int(_status("self").get("CapEff", "0"), 16) >> _CAP_SYS_PTRACE & 1)
    except ValueError:
        return False


def _is_descendant(pid: int) -> bool:
    me = os.getpid()
    for _ in range(4096):
        if pid == me:
            return True
        try:
            pid = int(_status(pid).get("PPid", "0"))
        except ValueError:
            return False
        if pid <= 1:
            return False
    return False


def why_no_ptrace(pid: int) -> str:
    """Why attaching to ``pid`` with ptrace is refused, as precisely as /proc tells, and what
    to do about it."""
    st = _status(pid)
    tracer = int(st.get("TracerPid", "0") or 0)
    if tracer:
        comm = (_read_text(f"/proc/{tracer}/comm") or "?").strip()
        return (f"process {pid} is already traced by process {tracer} ({comm}), and a process "
                "can have only one tracer: detach that debugger or strace first")
    privileged = _has_cap_sys_ptrace()
    scope_text = _read_text("/proc/sys/kernel/yama/ptrace_scope")
    scope = int(scope_text) if scope_text and scope_text.strip().isdigit() else None
    if scope == 3:
        return ("Yama kernel.yama.ptrace_scope=3 forbids every ptrace attach until reboot; "
                "start the program under 'pagewatch run' instead (which needs it too) or "
                "reboot with a lower ptrace_scope")
    if scope == 2 and not privileged:
        return ("Yama kernel.yama.ptrace_scope=2 lets only CAP_SYS_PTRACE attach: run "
                "pagewatch as root (sudo) or lower the setting with "
                "'sysctl kernel.yama.ptrace_scope=1'")
    uids = st.get("Uid", "").split()
    me = os.geteuid()
    if uids and not privileged and any(int(u) != me for u in uids[:3]):
        return (f"process {pid} belongs to uid {uids[0]} (effective {uids[1]}) and pagewatch "
                f"runs as uid {me} without CAP_SYS_PTRACE: run pagewatch as the same user, "
                "or as root (sudo)")
    if scope == 1 and not privileged and not _is_descendant(pid):
        return ("Yama kernel.yama.ptrace_scope=1 lets a process attach only to its "
                "descendants: start the program under 'pagewatch run', run pagewatch with "
                "CAP_SYS_PTRACE (sudo), or set 'sysctl kernel.yama.ptrace_scope=0'")
    return (f"ptrace attach to process {pid} was refused: it may be non-dumpable (a setuid or "
            "setgid program, or prctl(PR_SET_DUMPABLE, 0)) or an LSM (SELinux, AppArmor) "
            "forbids it; run pagewatch as root (CAP_SYS_PTRACE)")




def _selector(mappings: str | Callable[[Mapping], bool]) -> Callable[[Mapping], bool]:
    if callable(mappings):
        user = mappings
        return lambda m: m.path not in SPECIAL_MAPPINGS and bool(user(m))
    if mappings == "writable":
        return lambda m: m.writable and m.path not in SPECIAL_MAPPINGS
    if mappings == "private":
        return lambda m: m.writable and m.private and m.path not in SPECIAL_MAPPINGS
    raise ValueError(f"mappings={mappings!r}: use 'writable' (every writable mapping, private "
                     "or shared), 'private' (writable private ones) or a function "
                     "Mapping -> bool")



def _runs_of(regions: np.ndarray) -> np.ndarray:
    return np.asarray(regions, dtype=np.uint64).reshape(-1, 3)[:, :2].astype(np.int64)


_PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


def _refuse_kernel_thread(pid: int) -> None:
    """A kernel thread has no user memory: say so rather than 'no such process' (its
    /proc/PID/maps reads as ESRCH)."""
    # Unreadable (gone or hidden): no fields, and the attach says which.
    stat = _read_text(f"/proc/{pid}/stat") or ""
    name, _, rest = stat.partition("(")[2].rpartition(")")
    fields = rest.split()
    # fields[0] is the state (field 3 of proc(5)), so flags (field 9) is fields[6].
    if len(fields) > 6 and int(fields[6]) & _PF_KTHREAD:
        raise Unsupported(f"tracking process {pid} ({name})", "it is a kernel thread, "
                          "with no user memory", "Give the pid of a user-space process")



class TrackedMemory(Closeable):
    """The state every way of tracking another process shares: the program's memory as the
    files opened at attach see it, what is tracked, skipped or pending, and the making of a
    :class:`ProcessDirty`.  ``ProcessTracker`` is this plus one method module per backend
    (:mod:`.uffd_async`, :mod:`.soft_dirty`)."""

    pid: int
    backend: str
    strict: bool
    _maps_fd: int
    _pidfd: int
    _fds: list[int]
    _pagemap: Pagemap | None
    _select: Callable[[Mapping], bool]
    _skipped: dict[tuple[int, int], SkippedMapping]
    _ours: RangeSet
    _pending: np.ndarray
    _last_reset: float
    _parsed: dict[bytes, Mapping]
    _parsed_text: bytes
    _parsed_list: list[Mapping]
    _timeout: float
    _report_existing: bool
    attach_info: dict[str, Any]

    def _bind_current_memory(self) -> None:
        """Inside the attach's freeze (or right after the injection): make the maps and
        pagemap files opened before it those of the memory the target runs in now.

        A process caught inside ``execve`` (``subprocess.Popen`` can return before the child's
        exec has switched memory: seen on Linux 6.1) gives files bound to its *old* memory.
        That memory may live on -- a ``vfork`` child's is its parent's -- so it reads as a
        valid but foreign program: its bits would be read while ``clear_refs`` resets the new
        program's, and every write of the target would be missed.  Every thread is stopped
        now, on its way back to user mode, so no exec is in progress: a fresh open binds the
        current memory, and if its maps differ from the old files', the old files go.
        """
        fresh = os.open(f"/proc/{self.pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            now = b"".join(iter(lambda: os.read(fresh, 1 << 16), b""))
        except OSError:
            os.close(fresh)
            return  # the checks that follow tell exit or exec
        try:
            os.lseek(self._maps_fd, 0, os.SEEK_SET)
            bound = b"".join(iter(lambda: os.read(self._maps_fd, 1 << 16), b""))
        except OSError:
            bound = b""
        if bound == now:
            os.close(fresh)
            return
        self._fds.remove(self._maps_fd)
        os.close(self._maps_fd)
        self._maps_fd = fresh
        self._fds.append(fresh)
        if self._pagemap is not None:
            self._pagemap.close()
        self._pagemap = Pagemap(self.pid)


    # ---- maps and liveness -----------------------------------------------------------------
    def _read_maps(self) -> list[Mapping]:
        """The tracked program's mappings that are selected, in address order."""
        return [m for m in self._read_all_maps() if self._select(m)]

    def _read_all_maps(self) -> list[Mapping]:
        """Every mapping of the tracked program (read through the file opened at attach, so
        that it is the same program's memory: empty once it exits or execs)."""
        return self._maps_now()[1]

    def _maps_now(self) -> tuple[bytes, list[Mapping]]:
        """The maps text now and its mappings; a line seen at the previous read is not
        parsed again."""
        chunks = []
        try:
            os.lseek(self._maps_fd, 0, os.SEEK_SET)
            while True:
                b = os.read(self._maps_fd, 1 << 18)
                if not b:
                    break
                chunks.append(b)
        except OSError as exc:
            self._raise_gone(exc.errno)
        text = b"".join(chunks)
        if not text:
            self._raise_gone(None)
        if text == self._parsed_text:
            return text, self._parsed_list
        out, self._parsed = parse_maps(text, self._parsed)
        self._parsed_text, self._parsed_list = text, out
        return text, out

    def _alive(self) -> bool:
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        r, _, _ = select.select([self._pidfd], [], [], 0)
        return not r

    def _raise_gone(self, err: int | None, collected: ProcessDirty | None = None
                    ) -> NoReturn:
        """The memory we track is gone: say whether the process exited or exec'd."""
        if self._alive():
            fresh = _read_text(f"/proc/{self.pid}/maps")
            if fresh:
                raise TargetExec(f"process {self.pid} executed a new program: the memory "
                                 "that was tracked is gone; attach again to track the new "
                                 "program", err, collected, pid=self.pid)
        parent = zombie_parent(self.pid)
        if parent is not None:
            raise TargetGone(f"process {self.pid} has exited: it is a zombie, which its "
                             f"parent, process {parent}, has not reaped (wait(2)) yet",
                             err or errno.ESRCH, collected, pid=self.pid)
        raise TargetGone(f"process {self.pid} has exited", err or errno.ESRCH, collected,
                         pid=self.pid)


    def _check_strict(self) -> None:
        if self.strict and self._skipped:
            raise Unsupported(f"tracking every selected mapping of process {self.pid}",
                              "; ".join(str(s) for s in self._skipped.values()),
                              "Pass strict=False to track the others and list these in "
                              "'skipped'")


    def _maps_alive(self) -> bool:
        """Whether the memory tracked is still there (the maps file opened at attach reads
        empty once the program exited or executed another)."""
        try:
            os.lseek(self._maps_fd, 0, os.SEEK_SET)
            return bool(os.read(self._maps_fd, 1))
        except OSError:
            return False


    def _fixed_buffers(self) -> np.ndarray:
        """The target's io_uring fixed buffers (``IORING_REGISTER_BUFFERS``), as absolute
        page runs: reported as written at every collect.

        Their pages are pinned and the kernel writes them (``READ_FIXED``, ...) through its
        own mapping of the page: no write fault, so neither the write-protect nor the
        soft-dirty bit sees those writes, and nothing tells whether they happened.  The
        buffers are listed in ``/proc/PID/fdinfo`` of each io_uring descriptor; they are
        looked for only while the maps show a ring (``anon_inode:[io_uring]``).
        """
        if b"anon_inode:[io_uring]" not in self._parsed_text:
            return _EMPTY_RUNS
        try:
            fds = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return _EMPTY_RUNS
        runs = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}") != "anon_inode:[io_uring]":
                    continue
            except OSError:
                continue
            listing = False
            for line in (_read_text(f"/proc/{self.pid}/fdinfo/{fd}") or "").splitlines():
                if line.startswith("UserBufs:"):
                    listing = True
                    continue
                found = _USER_BUF.match(line) if listing else None
                if found is None:
                    if listing:
                        break
                    continue
                start, length = int(found[1], 16), int(found[2])
                runs.append((start // PAGE_SIZE * PAGE_SIZE,
                             -(-(start + length) // PAGE_SIZE) * PAGE_SIZE))
        return np.array(runs, np.int64).reshape(-1, 2)


    def _result(self, done: list[tuple[Mapping, np.ndarray]], new: set[Mapping],
                reset: bool) -> ProcessDirty:
        runs = [r for _, r in done]
        return self._make_result([m for m, _ in done],
                                 np.concatenate(runs) if runs else _EMPTY_RUNS, new, reset)

    def _make_result(self, mappings: list[Mapping] | _Layout, runs: np.ndarray,
                     new: set[Mapping], reset: bool) -> ProcessDirty:
        """The result over ``mappings`` (in address order) of ``runs`` (absolute addresses)
        and what is pending from first sights."""
        now = time.monotonic()
        fixed = self._fixed_buffers()
        if len(self._pending) or len(fixed):
            runs = np.concatenate([runs, self._pending, fixed])
        result = ProcessDirty(self.pid, time=now, elapsed=now - self._last_reset,
                              new=frozenset(new), skipped=tuple(self._skipped.values()),
                              backend=self.backend, mappings=mappings, runs=runs)
        if reset:
            self._pending = _EMPTY_RUNS
            self._last_reset = now
        return result

