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
  seen (the kernel tears the page tables down at exit).  With ``soft-dirty``, ``collected``
  holds what the failed collect read before it noticed (each read of pagemap holds the
  memory).  With ``uffd-async`` it is None: PAGEMAP_SCAN holds nothing, a scan that overlaps
  the teardown reports emptied pages as written (Linux 6.12: 9,670 of 16,384 pages never
  written), and nothing tells such a scan from one that ended just before the exit; only
  memory still mapped after the scans proves them.  (``pagewatch run``, whose child stays seized by a
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

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import PagewatchError, PermissionDenied, TargetGone, Unsupported
from .kernel._errors import proc_open_error
from .kernel.maps import Mapping
from .kernel.pagemap import Pagemap
from .kernel.uffd import Userfaultfd
from .rangeset import RangeSet
from .remote.attach import take_userfaultfd
from .remote.freeze import frozen
from .remote.procfs import _read_text, _status
from .remote.result import _EMPTY_RUNS, ProcessDirty, SkippedMapping, TargetExec, _Layout
from .remote.soft_dirty import SoftDirtyMethod, hugetlb_devices
from .remote.target import SPECIAL_MAPPINGS, _refuse_kernel_thread, _selector, why_no_ptrace
from .remote.uffd_async import UffdAsyncMethod

__all__ = ["ProcessTracker", "ProcessDirty", "SkippedMapping", "TargetExec",
           "PROCESS_BACKENDS", "BACKENDS"]
# Their old import path, kept for code outside the package (nothing inside imports them
# from here: each lives in remote/).
_REEXPORTED = (SPECIAL_MAPPINGS, _read_text, _status, frozen, hugetlb_devices,
               take_userfaultfd)

#: the ways to track another process, best first (``pagewatch.backends.BACKENDS`` is the
#: registry of the in-process backends, a dict: this tuple is a different thing)
PROCESS_BACKENDS = ("uffd-async", "soft-dirty")
BACKENDS = PROCESS_BACKENDS  # the old name, kept for code that imports it


def soft_dirty_available() -> tuple[bool, str]:
    """Whether soft-dirty bits work on this kernel (tried once, in a child process)."""
    from .kernel.probe import probe_soft_dirty

    return probe_soft_dirty()


class ProcessTracker(UffdAsyncMethod, SoftDirtyMethod):
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
            The process exited (:class:`TargetExec`: it executed a new program).  With
            ``soft-dirty`` its ``collected`` holds what this collect read before noticing;
            with ``uffd-async`` it is None: the scans may have met the exit's teardown, and
            what they report then is not what was written (see *Events*).
        """
        self._check_open()
        with self._lock:
            if self.backend == "soft-dirty":
                return self._collect_soft_dirty_all(reset)
            return self._collect_uffd_all(reset)


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
