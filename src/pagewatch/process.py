"""ProcessTracker: which pages *another* process writes, while it runs.

How (``uffd-async``, Linux 6.7+)
--------------------------------
A userfaultfd acts on the memory of the process that created it, and whoever holds the file
descriptor may register and write-protect that memory; ``/proc/PID/pagemap`` then scans it.
So pagewatch

1. stops one thread of the target for a fraction of a millisecond with ``PTRACE_SEIZE`` +
   ``PTRACE_INTERRUPT``, runs ``userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)``
   inside it (through an existing ``syscall`` instruction of its ``[vdso]``: no byte of the
   target is written), takes the new descriptor with ``pidfd_getfd(2)``, runs ``close()`` of
   the target's copy, restores its registers and signal mask exactly and detaches (an
   interrupted ``read()`` or ``nanosleep()`` is restarted by the kernel as if nothing
   happened; see ``src/native/inject.c``).  All of this runs in a short-lived helper process
   (its own process group, ignoring SIGINT/SIGTERM/SIGHUP), which always completes the restore and
   passes the descriptor back over a unix socket: the death of this process, at any instant,
   never releases the target with our registers or mask (``attach_info["helper"]``);
2. registers every tracked mapping for *async* write-protect and protects it.  A write is then
   resolved inside the kernel's fault handler: nothing of ours sits on the target's fault
   path, the target never waits for us, and if pagewatch dies the kernel drops the
   registration and the target goes on;
3. collects with one ``PAGEMAP_SCAN`` per mapping (``PM_SCAN_WP_MATCHING |
   PM_SCAN_CHECK_WPASYNC``): the written pages are reported and protected again atomically.

At every collect ``/proc/PID/maps`` is read again: mappings that appeared since (``mmap``,
``brk``, ``mprotect`` to writable, a grown stack) are registered and reported *whole* the first
time they are seen -- every page that holds data of its own (present or swapped, not the zero
page, not an unmodified page of a file), since nothing tells what was written before we saw
it; memory that replaced tracked memory at the same addresses (``munmap`` + ``mmap``,
``mmap(MAP_FIXED)``, as malloc does with its arenas) is reported in full, zero pages included,
as its old content is gone; mappings that went away are dropped.  Tracked memory stays
tracked, and is scanned at each collect, whatever protection it is given later: a page written
and then made ``PROT_READ`` or ``PROT_NONE`` before the collect (the dynamic loader's RELRO, a
W^X JIT) is reported, as the written state lives in the page-table entry and survives
``mprotect``.  A read-only private mapping not tracked yet that holds data of its own (written
while it was writable, between two collects: RELRO at a ``dlopen``) is reported whole the first
time and tracked from then on (``uffd-async``; with ``soft-dirty`` only memory tracked at the
last reset is read again).  Mappings that cannot be
registered are listed in ``skipped`` with the reason (another userfaultfd holds them, a kind of
memory uffd-wp does not support, ...).

Fallback (``soft-dirty``)
-------------------------
Where the kernel has soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY``: x86-64 and a few others, not
arm64) and async write-protect is missing (before Linux 6.7): pagemap bit 55, reset by writing
4 to ``/proc/PID/clear_refs``.  The kernel has no atomic read-and-reset of these bits, so at
each reset pagewatch stops every thread of the target (:func:`frozen`: ``PTRACE_SEIZE`` +
``PTRACE_INTERRUPT`` of each thread, threads created meanwhile included; no ``SIGSTOP``, so its
parent sees nothing), reads the maps and the bits of every tracked mapping, writes
``clear_refs`` and lets the threads go.  A stopped thread waits on its way back to user mode
with no system call in progress, so no write of the target's threads -- by its code or by the
kernel on its behalf -- falls between the read of a bit and its reset.  The stop lasts the
time to stop the threads plus the pagemap read (8 bytes per tracked page); ``stop_ms`` of each
:class:`ProcessDirty` says how long it was.

What it reports: over memory tracked at the previous reset, the pages whose bit is set; the
kernel sets it on every page of memory mapped, grown or merged since (``VM_SOFTDIRTY``), empty
pages included, and all of those are reported (such memory may have replaced data at those
addresses; a merge or growth gives false positives, never a miss).  Memory not tracked at the
previous reset is reported as with ``uffd-async`` at first sight: every page holding data of
its own.  The reset is process-wide: it also resets any other soft-dirty user of the target
(such as CRIU).

What the stop cannot cover -- writes that do not come from a thread of the target and land
between the read and the reset (they are then lost):

* io_uring workers (``iou-wrk-*``, ``iou-sqp-*``): the kernel refuses them to ptrace, so they
  run on, and a read they complete into the target's memory in that window is lost
  (``last_freeze["unfrozen"]`` counts them);
* another process writing through ``process_vm_writev(2)`` or ``/proc/PID/mem`` (a debugger):
  it pins the page first (which sets the bit) and copies afterwards through the kernel's own
  mapping; if the read and reset fall between the two, the copy is not seen;
* processes sharing the memory without being threads of it (``clone(CLONE_VM)`` without
  ``CLONE_THREAD``).  A ``vfork`` child is covered: its parent thread cannot stop until the
  child has executed or exited.

A thread in an uninterruptible sleep (state ``D``: disk or NFS I/O in flight inside a system
call) is not stopped by the interrupt until the call ends; the stop waits for it, so the
kernel's copy into its buffer lands before the bits are read.  If it does not end within
``timeout``, the collect fails with nothing reset (the bits stay and the next collect reports
them).  Never seen by soft-dirty at all, stop or not: writes by devices into pinned pages
(``O_DIRECT`` reads, RDMA, vfio), content dropped without a write (``MADV_DONTNEED`` or
reclaimed ``MADV_FREE`` anonymous pages read as zero afterwards), a shared (file or shmem)
page written and then evicted from memory before the collect (its bit goes with its page-table
entry), and writes by other processes to memory shared with the target (they set their own
bits).  hugetlb memory has no per-page bit at all: its mappings are listed in ``skipped``.

Each reset interrupts every thread, as a ``SIGSTOP``/``SIGCONT`` or a debugger attaching would:
a system call cut short is restarted, but the calls Linux never restarts after a stop
(``epoll_wait``, ``semop``, ``sigtimedwait``, ``io_getevents``, ... see signal(7)) return
``EINTR``, which programs retry.  A thread traced by a debugger cannot be stopped:
:class:`~pagewatch.errors.PermissionDenied` names it.

Events
------
* **fork**: the child is not tracked (its memory is a copy without our registration); the
  parent keeps being tracked, copy-on-write faults included.
* **exec**: the tracked memory is gone with the old program: :class:`TargetExec` (a
  :class:`~pagewatch.errors.TargetGone`).  Attach again to track the new program (``pagewatch
  run`` and ``record`` do that for you).
* **exit**: :class:`~pagewatch.errors.TargetGone`; writes after the last collect cannot be
  seen (the kernel tears the page tables down at exit).  ``collected`` holds what the failed
  collect gathered before it noticed.  (``pagewatch run``, whose child stays seized by a
  tracer thread, makes a last collect at the exit stop, and injects at every exec stop.)

Limits
------
* Memory unmapped between two collects takes its writes with it: they are not reported (the
  memory no longer exists).  Memory mapped again at the same addresses is reported whole.
* While tracked, the target cannot register the tracked ranges with a userfaultfd of its own
  (``UFFDIO_REGISTER`` fails with ``EBUSY``: one userfaultfd per mapping); ranges it had
  registered before are listed in ``skipped``.
* A page written with the content it already had is reported (it was written).
* io_uring fixed buffers are pinned and written by the kernel with no fault: they are
  reported as written at every collect (read from the rings' fdinfo); other long-term pins
  (RDMA, vfio DMA) are not seen (see the README).
* Transparent huge pages of the target are left as they are: a write to a protected huge
  page splits it, so writes are reported per 4 KiB page after the first collect.
* Syscall injection is implemented for x86-64 (64-bit targets); arm64 is designed (see
  ``src/native/inject.c``) but untested.  A target under a seccomp filter is refused: its
  filter could kill it for the injected call.
* The helper that injects can itself be killed only on purpose (SIGKILL to its pid, named
  ``pagewatch-help``): during its stop of the target (~0.05-0.2 ms) that would release the
  target with modified registers.  Under Yama ``ptrace_scope=1`` without ``CAP_SYS_PTRACE``,
  a target that only this process may trace (its own descendant) refuses the helper: the
  injection then runs in a thread of this process, whose death during the stop can harm the
  target.
* Cost to the target: one write fault (about a microsecond) per page and collect interval in
  which the page is written; the stop at attach is typically 0.05 to 0.3 ms.
"""

from __future__ import annotations

import bisect
import collections.abc
import contextlib
import dataclasses
import errno
import os
import re
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np

from . import _intervals, _native
from ._lifecycle import Closeable
from .dirty import DirtyPages
from .errors import InvalidRange, PagewatchError, PermissionDenied, TargetGone, Unsupported
from .kernel._errors import proc_open_error, scan_error, zombie_parent
from .kernel.constants import (
    PAGE_SIZE,
    PM_FILE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    UFFD_USER_MODE_ONLY,
    PageCategory,
    ScanFlag,
    UffdFeature,
)
from .kernel.maps import Mapping, maps, parse_maps
from .kernel.pagemap import Pagemap, _scan, clear_refs, read_entries
from .kernel.uffd import Userfaultfd
from .rangeset import RangeSet

__all__ = ["ProcessTracker", "ProcessDirty", "SkippedMapping", "TargetExec",
           "PROCESS_BACKENDS", "BACKENDS"]

#: the ways to track another process, best first (``pagewatch.backends.BACKENDS`` is the
#: registry of the in-process backends, a dict: this tuple is a different thing)
PROCESS_BACKENDS = ("uffd-async", "soft-dirty")
BACKENDS = PROCESS_BACKENDS  # the old name, kept for code that imports it

#: kernel-provided mappings that are never tracked
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]"})

_WRITTEN = int(PageCategory.WRITTEN)
_WPALLOWED = int(PageCategory.WPALLOWED)
_HOLDS_DATA = int(PageCategory.PRESENT | PageCategory.SWAPPED)
_NOT_OWN_DATA = int(PageCategory.FILE | PageCategory.PFNZERO)
_CAP_SYS_PTRACE = 19
_EMPTY_RUNS = np.empty((0, 2), np.int64)
#: a registered buffer in an io_uring's fdinfo: "    0: 0x7f0123456000/65536"
_USER_BUF = re.compile(r"\s*\d+: 0x([0-9a-f]+)/(\d+)")
#: what a scan plan found for a mapping: fully tracked, read-only candidate, not tracked
_FULL, _CANDIDATE, _IGNORED = 1, 2, 3


class TargetExec(TargetGone):
    """The process executed a new program: the memory that was tracked is gone.

    Create a new :class:`ProcessTracker` to track the new program.
    """

    __module__ = "pagewatch"


@dataclasses.dataclass(frozen=True)
class SkippedMapping:
    """A mapping that could not be tracked, and why."""

    mapping: Mapping
    reason: str
    errno: int | None = None

    def __str__(self) -> str:
        m = self.mapping
        return f"{m.start:#x}-{m.end:#x} {m.perms} {m.path or '(anonymous)'}: {self.reason}"


class _Layout:
    """Mappings in address order, with their bounds as lists and arrays (kept while the
    target's maps do not change, so a collect does not rebuild them)."""

    __slots__ = ("mappings", "starts", "start_array", "end_array")

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = mappings
        self.starts = [m.start for m in mappings]
        self.start_array = np.array(self.starts, np.int64)
        self.end_array = np.array([m.end for m in mappings], np.int64)


class ProcessDirty(collections.abc.Mapping[Mapping, DirtyPages]):
    """What one collect found: for each tracked mapping, the pages written.

    A read-only mapping ``Mapping -> DirtyPages`` (each ``DirtyPages`` has ``base`` = the
    mapping's start and covers the whole mapping) with the totals and the context.  The
    runs of all mappings are held in one array; a mapping's ``DirtyPages`` is made when
    asked for, so a collect of tens of thousands of mappings costs no object per mapping.

    Attributes
    ----------
    pid
        The process.
    time
        ``time.monotonic()`` when the collect ended.
    elapsed
        Seconds since the previous reset (or the attach).
    new
        Mappings seen for the first time at this collect; they are reported whole (every page
        that holds data of its own), as nothing tells what was written before.
    skipped
        Mappings that could not be tracked, with the reason.
    backend
        ``"uffd-async"`` or ``"soft-dirty"``.
    stop_ms
        How long this collect stopped the target, in milliseconds (``soft-dirty`` with a
        reset: every thread, from the first interrupt to the last detach); None when it did
        not stop it.
    """

    def __init__(self, pid: int, entries: dict[Mapping, DirtyPages] | None = None, *,
                 time: float, elapsed: float, new: frozenset[Mapping] = frozenset(),
                 skipped: tuple[SkippedMapping, ...] = (), backend: str = "",
                 mappings: list[Mapping] | _Layout | None = None,
                 runs: np.ndarray | None = None) -> None:
        self.pid = pid
        self.time = time
        self.elapsed = elapsed
        self.new = new
        self.skipped = skipped
        self.backend = backend
        self.stop_ms: float | None = None
        if entries is not None:
            mappings = sorted(entries, key=lambda m: m.start)
            parts = [np.asarray(entries[m].runs) * PAGE_SIZE + m.start for m in mappings]
            runs = np.concatenate(parts) if parts else _EMPTY_RUNS
        if not isinstance(mappings, _Layout):
            mappings = _Layout(mappings or [])
        self._set(mappings, _EMPTY_RUNS if runs is None else runs)

    def _set(self, layout: _Layout, runs: np.ndarray) -> None:
        """Hold ``runs`` (absolute ``[start, end)`` addresses, any order, overlapping or not)
        cut at the mappings' bounds, as page indices from each mapping's start."""
        self._maps = layout.mappings  # in address order, disjoint
        self._starts = layout.starts
        self._cache: dict[int, DirtyPages] = {}
        nm = len(self._maps)
        mstart, mend = layout.start_array, layout.end_array
        merged = _intervals.normalise(runs)
        # Each merged run is cut into one piece per mapping it overlaps.
        first = np.searchsorted(mend, merged[:, 0], side="right")
        last = np.searchsorted(mstart, merged[:, 1], side="left")
        count = np.maximum(last - first, 0)
        which = np.repeat(np.arange(len(merged)), count)
        owner = np.repeat(first, count) + (
            np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count))
        lo = np.maximum(merged[which, 0], mstart[owner]) - mstart[owner]
        hi = np.minimum(merged[which, 1], mend[owner]) - mstart[owner]
        self._lo = lo // PAGE_SIZE
        self._hi = (hi + PAGE_SIZE - 1) // PAGE_SIZE
        self._bounds = np.searchsorted(owner, np.arange(nm + 1), side="left")
        self._pages = int((self._hi - self._lo).sum())

    def _at(self, i: int) -> DirtyPages:
        d = self._cache.get(i)
        if d is None:
            m = self._maps[i]
            a, b = self._bounds[i], self._bounds[i + 1]
            runs = np.stack([self._lo[a:b], self._hi[a:b]], axis=1)
            d = DirtyPages(runs, m.start, (m.end - m.start) // PAGE_SIZE, normalised=True)
            self._cache[i] = d
        return d

    def _index(self, key: object) -> int:
        if isinstance(key, Mapping):
            i = bisect.bisect_left(self._starts, key.start)
            if i < len(self._maps) and self._maps[i] == key:
                return i
        raise KeyError(key)

    def __getitem__(self, key: Mapping) -> DirtyPages:
        return self._at(self._index(key))

    def __contains__(self, key: object) -> bool:
        try:
            self._index(key)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def __len__(self) -> int:
        """Number of tracked mappings (written or not): a ProcessDirty is a mapping from
        them; ``count`` is the number of pages written."""
        return len(self._maps)

    def _written_indices(self) -> list[int]:
        return np.flatnonzero(np.diff(self._bounds) > 0).tolist()

    @property
    def count(self) -> int:
        """Pages written, all mappings together (``DirtyPages.count`` is the same figure for
        one mapping)."""
        return self._pages

    @property
    def pages(self) -> int:
        """Deprecated: the older name of :attr:`count`.  One meaning per name: ``pages`` is
        the array of page indices (``DirtyPages.pages()``), ``count`` the number."""
        warnings.warn("ProcessDirty.pages is now ProcessDirty.count (DirtyPages.pages() is "
                      "the array of page indices)", DeprecationWarning, stacklevel=2)
        return self._pages

    @property
    def nbytes(self) -> int:
        """Bytes in the written pages."""
        return self._pages * PAGE_SIZE

    def written(self) -> dict[Mapping, DirtyPages]:
        """Only the mappings with at least one written page."""
        return {self._maps[i]: self._at(i) for i in self._written_indices()}

    def top(self, n: int = 10) -> list[tuple[Mapping, DirtyPages]]:
        """The ``n`` mappings with the most written pages, most first."""
        items = sorted(self.written().items(), key=lambda kv: (-len(kv[1]), kv[0].start))
        return items[:n]

    def by_path(self) -> dict[str, int]:
        """Written pages per mapping name (``path``, ``[heap]``, ``""`` for anonymous)."""
        out: dict[str, int] = collections.defaultdict(int)
        for m, d in self.written().items():
            out[m.path] += len(d)
        return dict(out)

    def addresses(self) -> np.ndarray:
        """``uint64`` address of every written page, ascending."""
        parts = [d.addresses() for d in self.written().values()]
        if not parts:
            return np.empty(0, np.uint64)
        return np.sort(np.concatenate(parts))

    def find(self, address: int) -> tuple[Mapping, DirtyPages] | None:
        """The mapping holding ``address`` and its written pages, or None."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._maps[i].end:
            return self._maps[i], self._at(i)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary: totals and, per written mapping, the runs of written pages
        as ``[first page, page count]`` relative to the mapping's start."""
        maps_out = []
        for m, d in self.written().items():
            runs = d.runs
            maps_out.append({
                "start": m.start, "end": m.end, "perms": m.perms, "path": m.path,
                "pages": len(d), "new": m in self.new,
                "runs": np.stack([runs[:, 0], runs[:, 1] - runs[:, 0]], axis=1).tolist(),
            })
        return {"pid": self.pid, "backend": self.backend, "elapsed": round(self.elapsed, 6),
                "pages": self._pages, "bytes": self.nbytes, "mappings_tracked": len(self),
                "mappings": maps_out}

    def __repr__(self) -> str:
        return (f"<ProcessDirty pid={self.pid} {self._pages} pages written in "
                f"{len(self._written_indices())} of {len(self)} mappings over "
                f"{self.elapsed:.3f} s>")


# ---- permission and liveness helpers ------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _status(pid: int | str) -> dict[str, str]:
    text = _read_text(f"/proc/{pid}/status") or ""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _thread_state(pid: int, tid: int) -> str:
    text = _read_text(f"/proc/{pid}/task/{tid}/stat")
    if not text:
        return "X"
    return text.rpartition(")")[2].split()[0]


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


def _find_gadget(pid: int) -> int:
    """Address of a ``syscall`` instruction (0f 05) in the target, read-only: the [vdso] has
    several (its fallbacks), else any executable mapping does.  0 if none is there yet (a
    target inside execve): the injection looks again, and checks, once the target stopped."""
    ms = maps(pid)
    candidates = [m for m in ms if m.path == "[vdso]"]
    candidates += [m for m in ms if m.executable and m.readable
                   and m.path not in SPECIAL_MAPPINGS]
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(why_no_ptrace(pid), exc.errno, pid=pid) from exc
        raise proc_open_error(exc, pid, "mem") from exc
    try:
        for i, m in enumerate(candidates):
            try:
                data = os.pread(fd, min(m.size, 16 << 20), m.start)
            except OSError:
                continue
            if i == 0 and m.path == "[vdso]" and data[:5] != b"\x7fELF\x02":
                raise Unsupported(f"tracking process {pid}", "it runs 32-bit code (its vDSO "
                                  "is not a 64-bit ELF)")
            at = data.find(b"\x0f\x05")
            if at >= 0:
                return m.start + at
    finally:
        os.close(fd)
    return 0


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
    if st.get("Seccomp", "0") == "2":
        raise Unsupported(
            f"userfaultfd injection into process {pid}",
            "it runs under a seccomp filter, which could kill it for an unexpected "
            "userfaultfd(2) call", "Start it without the filter, or use the soft-dirty "
            "backend where the kernel has it")
    gadget = _find_gadget(pid)
    tid = _pick_thread(pid)
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd, tries, raw = _native.inject_userfaultfd(tid, pidfd, gadget,
                                                    [flags | UFFD_USER_MODE_ONLY, flags],
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


def _dev(text: str, base: int) -> tuple[int, int]:
    major, _, minor = text.partition(":")
    return int(major, base), int(minor, base)


def hugetlb_devices(pid: int) -> frozenset[tuple[int, int]]:
    """(major, minor) of every hugetlbfs file system that memory of ``pid`` can come from:
    the kernel's internal mounts (``MAP_HUGETLB``, ``SHM_HUGETLB``, ``MFD_HUGETLB``; one per
    huge page size, learnt from a memfd of each size) and the hugetlbfs mounts of its mount
    namespace."""
    global _internal_hugetlb
    if _internal_hugetlb is None:
        found = set()
        try:
            sizes = [int(d.split("-")[1][:-2]) * 1024
                     for d in os.listdir("/sys/kernel/mm/hugepages")]
        except (OSError, ValueError, IndexError):
            sizes = []
        for size in sizes:
            flags = os.MFD_CLOEXEC | os.MFD_HUGETLB | (size.bit_length() - 1) << 26
            try:
                fd = os.memfd_create("pagewatch-hugetlb-probe", flags)
            except OSError:
                continue
            st = os.fstat(fd)
            os.close(fd)
            found.add((os.major(st.st_dev), os.minor(st.st_dev)))
        _internal_hugetlb = frozenset(found)
    mounts = set()
    for line in (_read_text(f"/proc/{pid}/mountinfo") or "").splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if rest.split()[:1] == ["hugetlbfs"] and len(parts) > 2:
            try:
                mounts.add(_dev(parts[2], 10))
            except ValueError:
                continue
    return _internal_hugetlb | mounts


_HUGETLB_REASON = ("hugetlb memory has no per-page soft-dirty bit (pagemap reports only the "
                   "mapping's, which the first reset clears), so its writes cannot be seen with "
                   "soft-dirty: track it with uffd-async (Linux 6.7+)")


# ---- stopping every thread (soft-dirty resets) ---------------------------------------------

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


def soft_dirty_available() -> tuple[bool, str]:
    """Whether soft-dirty bits work on this kernel (tried once, in a child process)."""
    from .kernel.probe import probe_soft_dirty

    return probe_soft_dirty()


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


class ProcessTracker(Closeable):
    """Which pages another process writes.

    Parameters
    ----------
    pid
        The process.  Needs ptrace permission: the same user (and a Yama ``ptrace_scope`` that
        allows it) or ``CAP_SYS_PTRACE``.
    backend
        ``"auto"`` (``uffd-async``, else ``soft-dirty``), ``"uffd-async"`` or ``"soft-dirty"``.
    mappings
        ``"writable"`` (every writable mapping, private or shared; the default),
        ``"private"`` (writable private mappings only) or a function ``Mapping -> bool``.
        The kernel's ``[vvar]``, ``[vdso]`` and ``[vsyscall]`` are never tracked.
    timeout
        Seconds to wait for the target thread to stop at attach.
    strict
        Raise :class:`~pagewatch.errors.Unsupported` at attach when a mapping cannot be
        tracked, instead of listing it in ``skipped``.
    report_existing
        Report at the first collect every page that already holds data of its own (as for a
        mapping seen for the first time).  For a process that has just executed a new
        program, that is every page it wrote since.
    userfaultfd
        A userfaultfd created by the target (taken with ``pidfd_getfd``) to use instead of
        injecting one; the tracker owns it from then on.  ``pagewatch run`` passes the one
        its tracer made at the exec stop.

    Examples
    --------
    >>> with ProcessTracker(pid) as p:            # doctest: +SKIP
    ...     time.sleep(1)
    ...     d = p.collect()
    ...     for mapping, pages in d.top(3):
    ...         print(mapping.path, len(pages))
    """

    def __init__(self, pid: int, backend: str = "auto",
                 mappings: str | Callable[[Mapping], bool] = "writable", *,
                 timeout: float = 5.0, strict: bool = False, report_existing: bool = False,
                 userfaultfd: int | None = None) -> None:
        self.pid = int(pid)
        if self.pid <= 0:
            raise ValueError(f"pid must be a positive process id, not {pid!r}")
        self._report_existing = report_existing
        self._adopt = userfaultfd
        self._timeout = float(timeout)
        #: the last freeze of every thread of the target (soft-dirty): ``stop_ms`` (first
        #: interrupt to last detach), ``wait_ms`` (until all stopped), ``threads``, ...
        self.last_freeze: dict[str, Any] = {}
        self._select = _selector(mappings)
        self.strict = strict
        self.closed = False
        self._lock = threading.RLock()
        self._fds: list[int] = []
        self._uffd: Userfaultfd | None = None
        self._pagemap: Pagemap | None = None
        #: mappings that could not be tracked, keyed by (start, end)
        self._skipped: dict[tuple[int, int], SkippedMapping] = {}
        #: ranges registered with our userfaultfd (soft-dirty: tracked at the last reset)
        self._ours = RangeSet()
        #: hugetlbfs devices (soft-dirty cannot track their memory)
        self._hugetlb: frozenset[tuple[int, int]] = frozenset()
        #: absolute ``[start, end)`` runs reported at first sight, kept until a reset
        self._pending = _EMPTY_RUNS
        #: ptrace stop of the target at attach: ``stop_ms``, ``wait_ms``, ``tid``, ``flags``
        self.attach_info: dict[str, Any] = {}
        #: memory whose mappings are marked new at the first collect (``report_existing``)
        self._first_new = RangeSet()
        #: what a collect of the maps layout seen last scans (see _plan_uffd)
        self._plan: tuple[bytes, list[Mapping], np.ndarray, np.ndarray, list[Mapping],
                          _Layout] | None
        self._plan = None
        #: parsed maps lines of the last read, by their text
        self._parsed: dict[bytes, Mapping] = {}
        self._parsed_text = b""
        self._parsed_list: list[Mapping] = []
        #: per mapping of the last plan (by object: see _plan_uffd), what it was
        self._plan_memo: dict[int, tuple[Mapping, int]] = {}
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError as exc:
            raise TargetGone(f"process {self.pid} does not exist (or has exited)",
                             exc.errno, pid=self.pid) from exc
        except OSError as exc:
            raise PagewatchError(f"pidfd_open({self.pid}) failed: {exc.strerror}",
                                 exc.errno) from exc
        try:
            _refuse_kernel_thread(self.pid)
            self._open(backend, timeout)
        except BaseException:
            self._release()
            raise
        self._last_reset = time.monotonic()

    # ---- attach --------------------------------------------------------------------------
    def _open(self, backend: str, timeout: float) -> None:
        # maps and pagemap are opened first: they stay bound to this program's memory, so an
        # exec later (or during the attach) is noticed when they read empty.
        try:
            self._maps_fd = os.open(f"/proc/{self.pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(self._maps_fd)
            self._pagemap = Pagemap(self.pid)
        except PermissionDenied as exc:
            raise PermissionDenied(why_no_ptrace(self.pid), exc.errno, pid=self.pid) from exc
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(why_no_ptrace(self.pid), exc.errno, pid=self.pid) from exc
            raise proc_open_error(exc, self.pid, "maps") from exc
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown backend {backend!r} for a process: choose "
                             f"{', '.join(BACKENDS)} or 'auto'")
        env = os.environ.get("PAGEWATCH_BACKEND")
        if backend == "auto" and env in BACKENDS:
            backend = env
        reasons: list[str] = []
        if backend in ("auto", "uffd-async"):
            from .kernel.probe import probe_wp_async

            ok, why = probe_wp_async()
            if ok:
                try:
                    self._attach_uffd(timeout)
                    self.backend = "uffd-async"
                    self.backend_reason = ("asked for" if backend != "auto" else
                                           "best available") + f": {why}"
                    return
                except Unsupported as exc:
                    if backend != "auto":
                        raise
                    reasons.append(f"uffd-async: {exc}")
            elif backend == "uffd-async":
                raise Unsupported("the uffd-async backend", why,
                                  "Use backend='soft-dirty' where the kernel has it")
            else:
                reasons.append(f"uffd-async: {why}")
        if self._adopt is not None:
            os.close(self._adopt)  # not ours to use after all
            self._adopt = None
        ok, why = soft_dirty_available()
        if ok:
            self._attach_soft_dirty()
            self.backend = "soft-dirty"
            self.backend_reason = ("asked for" if backend != "auto" else "fallback") + (
                f": {why}" + (f" (not {'; '.join(reasons)})" if reasons else ""))
            return
        if backend == "soft-dirty":
            raise Unsupported("the soft-dirty backend", why,
                              "Use uffd-async (Linux 6.7+) where the kernel has it")
        reasons.append(f"soft-dirty: {why}")
        raise Unsupported(f"tracking the writes of process {self.pid}",
                          "neither way works here: " + "; ".join(reasons),
                          "It needs Linux 6.7+ (userfaultfd WP_ASYNC + PAGEMAP_SCAN) or a "
                          "kernel with CONFIG_MEM_SOFT_DIRTY")

    def _attach_uffd(self, timeout: float) -> None:
        if self._adopt is not None:
            fd, self._adopt = self._adopt, None
        else:
            fd, self.attach_info = take_userfaultfd(self.pid, self._pidfd, timeout)
            # The injected call ran in the memory the target runs in now (it cannot have been
            # inside execve then): bind maps/pagemap to that memory too.
            self._bind_current_memory()
        self._uffd = Userfaultfd(int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED), fd=fd)
        everything = self._read_all_maps()  # TargetExec if it exec'd while we attached
        ms = [m for m in everything if self._select(m) or self._written_read_only(m)]
        found = []
        for m in ms:
            runs, _ = self._register(m, [(m.start, m.end)], first_sight=self._report_existing)
            found.append(runs)
        if self._report_existing and found:
            self._pending = np.concatenate(found)
            self._first_new = RangeSet((m.start, m.end) for m in ms)
        self._check_strict()
        self._plan_uffd(self._parsed_text, everything)  # what each collect of it scans

    def _attach_soft_dirty(self) -> None:
        if self.pid == os.getpid():
            raise PagewatchError("a process cannot stop its own threads: use "
                                 "pagewatch.Tracker to track this process's own memory")
        self._hugetlb = hugetlb_devices(self.pid)
        with self._frozen():
            self._bind_current_memory()
            ms = self._soft_dirty_mappings()  # TargetExec if it exec'd meanwhile
            clear_refs(self.pid, 4)
        self.attach_info = {"stop_ms": self.last_freeze["stop_ms"], "tid": None,
                            "freeze": dict(self.last_freeze)}
        if not self._report_existing:  # else the first collect reports what they hold
            for m in ms:
                self._ours.add(m.start, m.end)
        self._check_strict()

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

    def _soft_dirty_mappings(self) -> list[Mapping]:
        """The selected mappings soft-dirty can track; the others go to ``skipped``."""
        ms = []
        self._skipped = {}
        # Selected ones, and the ones tracked at the last reset whatever their protection
        # now: a page written and then made read-only keeps its bit.
        for m in [m for m in self._read_all_maps()
                  if self._select(m) or self._ours.overlaps(m.start, m.end)]:
            try:
                hugetlb = _dev(m.dev, 16) in self._hugetlb
            except ValueError:
                hugetlb = False
            if hugetlb:
                self._skipped[(m.start, m.end)] = SkippedMapping(m, _HUGETLB_REASON)
            else:
                ms.append(m)
        return ms

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

    # ---- registration (uffd-async) ---------------------------------------------------------
    def _scan(self, start: int, end: int, **kw: Any) -> np.ndarray:
        assert self._pagemap is not None
        regions, _, _ = _scan(self._pagemap, start, end, kw.get("category_mask", 0),
                              kw.get("category_inverted", 0), kw.get("category_anyof_mask", 0),
                              kw.get("return_mask", 0), kw.get("wp_matching", False),
                              kw.get("check_wpasync", False), 0, 256, True)
        return regions

    def _unregistered(self, start: int, end: int) -> list[tuple[int, int]]:
        """Runs of ``[start, end)`` whose VMAs carry no async write-protect registration:
        holes of unregistered VMAs have no WPALLOWED category, so they match inverted."""
        rows = self._scan(start, end, category_mask=_WPALLOWED, category_inverted=_WPALLOWED)
        return [(int(a), int(b)) for a, b in _runs_of(rows).tolist()]

    def _own_data(self, m: Mapping, start: int, end: int, mask: int, anyof: int) -> np.ndarray:
        """Runs of pages that hold data of their own: for a private mapping, not the zero
        page and not an unmodified page of the file."""
        rows = self._scan(start, end, category_mask=mask, category_anyof_mask=anyof,
                          return_mask=_NOT_OWN_DATA)
        if m.private:
            rows = rows[(rows[:, 2] & np.uint64(_NOT_OWN_DATA)) == 0]
        return _runs_of(rows)

    def _register(self, m: Mapping, parts: list[tuple[int, int]], first_sight: bool
                  ) -> tuple[np.ndarray, bool]:
        """Register and protect ``parts`` of ``m``; returns what to report for them the first
        time (nothing at attach: tracking starts there) and whether any was registered."""
        assert self._uffd is not None
        found = []
        registered = False
        for s, e in parts:
            if (s, e) in self._skipped:
                continue
            try:
                self._uffd.register(s, e - s)
            except PagewatchError as exc:
                if exc.errno != errno.ENOMEM:  # ENOMEM: unmapped meanwhile, seen next time
                    self._skip(m, s, e, exc)
                continue
            self._ours.add(s, e)
            registered = True
            # Before protecting: pages holding data (after, uffd-wp markers read as swapped).
            if first_sight:
                found.append(self._own_data(m, s, e, 0, _HOLDS_DATA))
            try:
                self._uffd.writeprotect(s, e - s)  # WP_UNPOPULATED: empty pages too
            except PagewatchError:
                continue  # unmapped meanwhile
            if first_sight:
                # Pages written between that look and the protection.
                found.append(self._own_data(m, s, e, int(PageCategory.PRESENT), 0))
        return (np.concatenate(found) if found else _EMPTY_RUNS), registered

    def _skip(self, m: Mapping, s: int, e: int, exc: PagewatchError) -> None:
        part = m if (s, e) == (m.start, m.end) else dataclasses.replace(m, start=s, end=e)
        if exc.errno == errno.EBUSY:
            reason = ("already registered with another userfaultfd (the target's own, or "
                      "another tracker's; the kernel allows one per mapping): it cannot be "
                      "tracked until that one unregisters it")
        elif exc.errno == errno.EINVAL:
            reason = ("the kernel refuses write-protect on this kind of memory (VM_PFNMAP/IO "
                      "device memory, DAX, or an unaligned hugetlb range)")
        elif exc.errno == errno.EPERM:
            reason = "the mapping may never become writable (no VM_MAYWRITE)"
        else:
            reason = str(exc)
        self._skipped[(s, e)] = SkippedMapping(part, reason, exc.errno)

    def _check_strict(self) -> None:
        if self.strict and self._skipped:
            raise Unsupported(f"tracking every selected mapping of process {self.pid}",
                              "; ".join(str(s) for s in self._skipped.values()),
                              "Pass strict=False to track the others and list these in "
                              "'skipped'")

    def _written_read_only(self, m: Mapping) -> bool:
        """Whether ``m`` is a read-only private mapping, not tracked, that would be selected
        if it were writable and holds data of its own: it was written while writable (the
        dynamic loader's RELRO, a W^X JIT's code) or copied on write by a debugger's write.

        Such memory is registered and tracked from then on, and its pages reported the first
        time; at attach they are not (tracking starts there), unless ``report_existing``.
        """
        if not self._read_only_candidate(m):
            return False
        return bool(len(self._own_data(m, m.start, m.end, 0, _HOLDS_DATA)))

    def _collect_uffd(self, m: Mapping, reset: bool, register: bool = True
                      ) -> tuple[np.ndarray, bool]:
        """Written runs of mapping ``m``, and whether part of it was seen for the first time.
        Without ``register``, only the parts already tracked are scanned."""
        if register:
            new, is_new = self._register(m, self._ours.missing(m.start, m.end),
                                         first_sight=True)
        else:
            new, is_new = _EMPTY_RUNS, False
        for _attempt in range(3):
            try:
                got = [_runs_of(self._scan(s, e, category_mask=_WRITTEN, return_mask=_WRITTEN,
                                           wp_matching=reset, check_wpasync=True))
                       for s, e in self._ours.within(m.start, m.end)]
                break
            except InvalidRange as exc:
                if exc.errno != errno.EPERM:
                    raise
            # A range we registered was unmapped and mapped again (or moved by mremap): its
            # new VMA is not registered.  Its old content is gone, so all of it is reported
            # (a page that held data and now reads zero has changed too).  Register it, scan
            # again.
            replaced = [r for s, e in self._ours.within(m.start, m.end)
                        for r in self._unregistered(s, e)]
            for a, b in replaced:
                self._ours.remove(a, b)
            if register:
                more, _ = self._register(m, self._ours.missing(m.start, m.end),
                                         first_sight=True)
            else:
                more = _EMPTY_RUNS
            new = np.concatenate([new, more, np.array(replaced, np.int64).reshape(-1, 2)])
            is_new = True
        else:
            # The target keeps remapping this range: report all of it rather than miss a write.
            return np.array([[m.start, m.end]], np.int64), True
        if not reset and len(new):
            self._pending = np.concatenate([self._pending, new])
            new = _EMPTY_RUNS
        return np.concatenate([new, *got]) if got else new, is_new

    # ---- soft-dirty --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Every thread of the target stopped for the duration (see :func:`frozen`)."""
        with frozen(self.pid, self._timeout) as info:
            yield
        self.last_freeze = info

    def _read_bits(self, m: Mapping) -> list[tuple[int, bytes]]:
        """The pagemap entries of mapping ``m``, raw: ``(first page, bytes)`` chunks."""
        assert self._pagemap is not None
        fd = self._pagemap.fileno()
        lo, hi = m.start // PAGE_SIZE, m.end // PAGE_SIZE
        out = []
        step = 1 << 16  # pages per read: 512 KiB of entries
        for first in range(lo, hi, step):
            n = min(step, hi - first)
            try:
                data = read_entries(fd, first, n)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    self._raise_gone(exc.errno)
                raise PagewatchError(f"reading the pagemap of process {self.pid} failed: "
                                     f"{exc.strerror}", exc.errno) from exc
            if len(data) < n * 8:  # the memory went away (exit or exec): checked by the caller
                data += bytes(n * 8 - len(data))
            out.append((first, data))
        return out

    def _soft_dirty_runs(self, m: Mapping, chunks: list[tuple[int, bytes]]
                         ) -> tuple[np.ndarray, bool]:
        """Written runs of mapping ``m`` and whether part of it is new, from its pagemap
        entries (bit 55) and what was tracked at the last reset.

        Where ``m`` lies over memory tracked at the last reset, a page is reported when its
        soft-dirty bit is set.  That includes the empty pages of a VMA the kernel marked
        soft-dirty whole (``VM_SOFTDIRTY``: memory mapped, or a mapping grown or merged,
        since the reset): such memory may have replaced data at these addresses, so it is
        reported in full (false positives for a merge or growth, never a miss).  Elsewhere
        (memory not seen at the last reset) every page holding data of its own is reported,
        as for a first sight with ``uffd-async``: nothing tells what was written before.
        """
        lo, hi = m.start // PAGE_SIZE, m.end // PAGE_SIZE
        known = [(s // PAGE_SIZE, e // PAGE_SIZE) for s, e in self._ours.within(m.start, m.end)]
        fully_known = known == [(lo, hi)]
        is_new = not fully_known
        out = []
        for first, data in chunks:
            e = np.frombuffer(data, dtype=np.uint64)
            n = len(e)
            soft_dirty = (e & np.uint64(PM_SOFT_DIRTY)) != 0
            if fully_known:
                hit = soft_dirty
                if not is_new:
                    is_new = bool((soft_dirty & ((e & np.uint64(PM_PRESENT | PM_SWAP)) == 0))
                                  .any())
            else:
                seen = np.zeros(n, bool)
                for a, b in known:
                    seen[max(a - first, 0):max(min(b - first, n), 0)] = True
                holds_data = (e & np.uint64(PM_PRESENT | PM_SWAP)) != 0
                if m.private:  # an unmodified page of a private file mapping is not its own
                    holds_data &= (e & np.uint64(PM_FILE)) == 0
                hit = np.where(seen, soft_dirty, holds_data)
            runs = _intervals.from_bitmap(hit, first)
            if len(runs):
                out.append(runs * PAGE_SIZE)
        return (np.concatenate(out) if out else _EMPTY_RUNS), is_new

    def _collect_soft_dirty_all(self, reset: bool) -> ProcessDirty:
        """One soft-dirty collect.  With ``reset``, the maps and every bit 55 are read and
        ``clear_refs`` written while every thread of the target is stopped, so that no write
        can fall between the read of a bit and its reset; the bits are turned into runs after
        the threads go on."""
        read: list[tuple[Mapping, list[tuple[int, bytes]]]] = []
        ms: list[Mapping] = []
        gone: TargetGone | None = None
        try:
            with self._frozen() if reset else contextlib.nullcontext():
                ms = self._soft_dirty_mappings()  # inside: a mapping made just before counts
                for m in ms:
                    read.append((m, self._read_bits(m)))
                if reset:
                    # The memory must still be this program's when its bits are cleared.
                    if not self._maps_alive():
                        self._raise_gone(None)
                    clear_refs(self.pid, 4)
        except TargetGone as exc:
            gone = exc
        new: set[Mapping] = set()
        done: list[tuple[Mapping, np.ndarray]] = []
        for m, chunks in read:
            runs, is_new = self._soft_dirty_runs(m, chunks)
            if is_new:
                new.add(m)
            done.append((m, runs))
        if gone is not None:
            self._raise_gone(gone.errno, self._result(done, new, False))
        if reset:
            self._ours = RangeSet()
            for m in ms:
                self._ours.add(m.start, m.end)
        result = self._result(done, new, reset)
        if reset:
            result.stop_ms = self.last_freeze.get("stop_ms")
        if not self._maps_alive():
            self._raise_gone(None, result)
        return result

    def _maps_alive(self) -> bool:
        """Whether the memory tracked is still there (the maps file opened at attach reads
        empty once the program exited or executed another)."""
        try:
            os.lseek(self._maps_fd, 0, os.SEEK_SET)
            return bool(os.read(self._maps_fd, 1))
        except OSError:
            return False

    # ---- public API ------------------------------------------------------------------------
    @property
    def skipped(self) -> list[SkippedMapping]:
        """Mappings (or parts) that could not be tracked, with the reason."""
        return list(self._skipped.values())

    @property
    def attach_stop_ms(self) -> float | None:
        """How long the target thread was stopped for the injection, in milliseconds."""
        v = self.attach_info.get("stop_ms")
        return float(v) if v is not None else None

    def mappings(self) -> list[Mapping]:
        """The selected mappings of the target, now."""
        self._check_open()
        return self._read_maps()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this ProcessTracker is closed")

    def collect(self, reset: bool = True) -> ProcessDirty:
        """The pages written since the last reset (or the attach), per mapping.

        With ``reset=True`` (the default) they are reported and protected again atomically
        (``uffd-async``): a write racing the collect is reported by this collect or the next.

        Raises
        ------
        TargetGone
            The process exited (:class:`TargetExec`: it executed a new program); its
            ``collected`` holds what this collect found before noticing.
        """
        self._check_open()
        with self._lock:
            if self.backend == "soft-dirty":
                return self._collect_soft_dirty_all(reset)
            return self._collect_uffd_all(reset)

    def _plan_uffd(self, text: bytes, everything: list[Mapping]
                   ) -> tuple[list[np.ndarray], set[Mapping]]:
        """For a maps layout not seen at the previous collect: drop what was unmapped,
        register what is new (returns its first-sight runs and mappings), and work out what
        each collect of this layout scans: the tracked parts of every mapping reported (one
        range per mapping part, never across mappings: a failed scan then concerns one
        mapping), and the read-only mappings to look at for data of their own."""
        self._forget_unmapped(everything)
        firsts: list[np.ndarray] = []
        new: set[Mapping] = set()
        entries: list[Mapping] = []
        candidates: list[Mapping] = []
        ranges: list[tuple[int, int, int]] = []
        within, select = self._ours.within, self._select
        # What the previous plan found for a mapping whose line is unchanged still holds
        # (an unchanged line gives the same Mapping object: see _maps_now).
        before = self._plan_memo
        memo: dict[int, tuple[Mapping, int]] = {}
        for m in everything:
            seen = before.get(id(m))
            if seen is not None and seen[0] is m:
                memo[id(m)] = seen
                if seen[1] == _FULL:
                    i = len(entries)
                    entries.append(m)
                    ranges.append((m.start, m.end, i))
                elif seen[1] == _CANDIDATE:
                    candidates.append(m)
                continue
            parts = within(m.start, m.end)
            if select(m):
                if parts != [(m.start, m.end)]:
                    runs, is_new = self._register(m, self._ours.missing(m.start, m.end),
                                                  first_sight=True)
                    if len(runs):
                        firsts.append(runs)
                    if is_new:
                        new.add(m)
                    parts = within(m.start, m.end)
            elif not parts:
                # Tracked memory made read-only since stays in (parts); untracked read-only
                # memory is looked at for data of its own at each collect.
                if self._read_only_candidate(m):
                    candidates.append(m)
                    memo[id(m)] = (m, _CANDIDATE)
                else:
                    memo[id(m)] = (m, _IGNORED)
                continue
            if parts == [(m.start, m.end)]:
                memo[id(m)] = (m, _FULL)
            i = len(entries)
            entries.append(m)
            ranges += [(a, b, i) for a, b in parts]
        self._plan_memo = memo
        table = np.array(ranges, np.int64).reshape(-1, 3)
        self._plan = (text, entries, np.ascontiguousarray(table[:, :2]), table[:, 2],
                      candidates, _Layout(entries))
        return firsts, new

    def _forget_plan(self) -> None:
        """What is tracked changed outside a plan: the next collect plans from scratch."""
        self._plan = None
        self._plan_memo = {}

    def _read_only_candidate(self, m: Mapping) -> bool:
        """A read-only private mapping, not tracked, that would be selected if it were
        writable (see :meth:`_written_read_only`)."""
        if (not m.private or m.writable or m.path in SPECIAL_MAPPINGS
                or (m.start, m.end) in self._skipped):
            return False
        return bool(self._select(dataclasses.replace(m, perms=m.perms[0] + "w" + m.perms[2:])))

    def _collect_uffd_all(self, reset: bool) -> ProcessDirty:
        """One uffd-async collect: one batched PAGEMAP_SCAN call (one scan per tracked part
        of each mapping, in C) and per-mapping Python work only where the layout changed."""
        assert self._pagemap is not None
        text, everything = self._maps_now()
        firsts: list[np.ndarray] = []
        new: set[Mapping] = set()
        if self._plan is None or self._plan[0] != text:
            firsts, new = self._plan_uffd(text, everything)
        assert self._plan is not None
        _, entries, ranges, owner_of_range, candidates, layout = self._plan
        extra: list[tuple[Mapping, np.ndarray]] = []
        scanned = _EMPTY_RUNS
        fd = self._pagemap.fileno()
        try:
            if candidates:
                # Read-only memory that holds data of its own now: written while writable.
                rows, owner, errs = _native.pagemap_scan_ranges(
                    fd, np.array([(m.start, m.end) for m in candidates], np.int64), 0, 0, 0,
                    _HOLDS_DATA, _NOT_OWN_DATA)
                own = owner[(rows[:, 2] & np.uint64(_NOT_OWN_DATA)) == 0] if len(rows) else owner
                for i in sorted(set(own.tolist())):
                    m = candidates[i]
                    runs, is_new = self._collect_uffd(m, reset, register=True)
                    extra.append((m, runs))
                    new.add(m)
                    self._forget_plan()  # tracked from now on: the next collect plans again
            flags = int(ScanFlag.CHECK_WPASYNC) | (int(ScanFlag.WP_MATCHING) if reset else 0)
            rows, owner, errs = _native.pagemap_scan_ranges(fd, ranges, flags, _WRITTEN, 0, 0,
                                                            _WRITTEN)
            scanned = np.asarray(rows, np.uint64)[:, :2].astype(np.int64)
            redo: set[int] = set()
            for i in np.flatnonzero(errs).tolist():
                err = int(errs[i])
                if err == errno.EPERM:
                    redo.add(int(owner_of_range[i]))  # replaced since: see _collect_uffd
                    continue
                start, end = int(ranges[i, 0]), int(ranges[i, 1])
                if err == -1:
                    raise PagewatchError(f"PAGEMAP_SCAN made no progress in [{start:#x}, "
                                         f"{end:#x}) of process {self.pid}")
                raise scan_error(OSError(err, os.strerror(err)), start, end, flags)
            if self._pagemap.exited():
                raise TargetGone(f"process {self.pid} has exited", errno.ESRCH, pid=self.pid)
            for i in sorted(redo):
                m = entries[i]
                runs, is_new = self._collect_uffd(m, reset, register=self._select(m))
                extra.append((m, runs))
                if is_new:
                    new.add(m)
                self._forget_plan()
        except TargetGone as exc:
            partial = self._make_result(entries, np.concatenate([scanned, *firsts]), new, reset)
            self._raise_gone(exc.errno, partial)
        first_runs = np.concatenate(firsts) if firsts else _EMPTY_RUNS
        if not reset and len(first_runs):
            self._pending = np.concatenate([self._pending, first_runs])
            first_runs = _EMPTY_RUNS
        mappings: list[Mapping] | _Layout = layout
        if extra:
            known = set(entries)
            mappings = sorted(entries + [m for m, _ in extra if m not in known],
                              key=lambda m: m.start)
        runs = np.concatenate([scanned, first_runs, *(r for _, r in extra)])
        if self._first_new:
            listed = mappings.mappings if isinstance(mappings, _Layout) else mappings
            new |= {m for m in listed if self._first_new.overlaps(m.start, m.end)}
            if reset:
                self._first_new = RangeSet()
        result = self._make_result(mappings, runs, new, reset)
        if not self._maps_alive():  # an exit or exec during the scans leaves them empty
            self._raise_gone(None, result)
        return result  # (strict applies at attach; later skips are in result.skipped)

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

    def _forget_unmapped(self, everything: list[Mapping]) -> None:
        """Drop what is no longer mapped.  Tracked memory that is still mapped stays tracked
        whatever its protection now (it is harvested at each collect)."""
        self._ours.keep_only([(m.start, m.end) for m in everything])
        if not self._skipped:
            return
        live = RangeSet((m.start, m.end) for m in everything if self._select(m))
        for key in [k for k in self._skipped if live.missing(*k)]:
            del self._skipped[key]

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

    def reset(self) -> None:
        """Forget what was written so far."""
        self.collect(reset=True)

    def close(self) -> None:
        """Stop tracking.

        Closing the userfaultfd makes the kernel unregister every range it registered and
        (Linux 6.9+, 6.8.10, 6.6.31) drop the write-protection: the target's memory is left as
        it was.  (On older kernels the stale protection costs one extra, silently resolved
        fault per page later written.)  Ranges are not unregistered one by one: a range that
        was unmapped and mapped again may belong to the target's own userfaultfd by now.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._release()

    def _release(self) -> None:
        if self._uffd is not None:
            self._uffd.close()
        if self._pagemap is not None:
            self._pagemap.close()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if getattr(self, "_pidfd", -1) >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"backend={getattr(self, 'backend', '?')}"
        return f"<ProcessTracker pid={self.pid} {state}>"
