"""``mprotect``: read-only pages and a ``SIGSEGV`` handler in C.

The tracked pages are made ``PROT_READ``.  A write faults; the handler (C, async-signal-safe)
records the page in every tracker that contains it and makes the page writable again, and
the write goes through.  A fault at an address no tracker watches goes on to the handler
that was there before (or to the default action, which kills the process as usual).

``collect(reset=True)`` clears each written page's mark first and re-protects it second,
under a spinlock shared with the handler: a write between the two goes through unprotected
and is reported by this collect, a write after faults again and is reported by the next.
Each tracker has its own marks, so overlapping trackers never disturb each other.

Limits
------
* **Writes by the kernel fail.**  A system call that writes into a protected page
  (``read``, ``readv``, ``recv_into``, ...) gets ``EFAULT`` instead of faulting, as in
  Wine's and Boehm GC's mprotect modes.  Wrap such I/O in :func:`writable`, which marks
  the range written and keeps it writable until the block ends.
* The backend owns the protection of the tracked pages: ``close()`` leaves them read-write.
  When the program makes tracked pages writable itself with ``mprotect`` (or back to writable after
  ``PROT_READ``), each collect sees it in ``/proc/self/maps``: those pages are reported as
  written (a write could have gone there unseen) and protected again.  A write to a page
  the program made read-only is taken as ours: it succeeds and is reported.
* Memory unmapped and mapped anew at the same address: a file, ``memfd`` or shared
  mapping has another identity (device, inode, offset in ``/proc/self/maps``) and the next
  collect raises :class:`~pagewatch.TargetGone`.  New *private anonymous* memory looks like
  the old one made writable by the program (the kernel shows nothing else): its pages are
  reported as written at the next collect and tracked from then on; no write is lost.
* **Writes through ``/proc/self/mem``** (how debuggers write; ``FOLL_FORCE`` writes through
  read-only protection) do not fault and are **not reported**.  ``process_vm_writev``
  respects protection and fails with ``EFAULT``.
* A written page splits the mapping (one VMA per run of writable pages): more than about
  ``vm.max_map_count / 2`` isolated written pages between two collects makes the handler
  fall back to un-protecting whole trackers (every page reported once).
* A first write to a page costs a signal and two system calls (microseconds).
* **Other users of ``SIGSEGV``.**  The handler is installed when the first tracker starts
  and put back on top whenever something replaces it, chaining to the newcomer for faults
  that are not ours: at once after ``faulthandler.enable()`` and
  ``signal.signal(SIGSEGV, ...)`` (the first tracker wraps these two functions), and
  at the next start, collect or reset after a handler installed by C code calling
  ``sigaction`` itself.  Between such a C call and that next call, a write to a tracked
  page goes to the newcomer (a C ``faulthandler``-like handler kills the process).  A
  Python-level handler still cannot handle a real crash (the faulting instruction repeats
  and the thread hangs), as without pagewatch.  A thread that blocks
  ``SIGSEGV`` is killed by the kernel on its first write to a tracked page (a blocked
  synchronous fault cannot be delivered): a tracker refuses to start while such a thread
  exists (after 3 s: a thread that starts or exits blocks every signal for a moment).
* After ``fork()`` the child's copies of the trackers refuse to collect
  (``PagewatchError``, as every backend): the child's pages stay protected, its writes go
  through the handler and are simply let through.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from .. import _native
from .._region import region_of
from ..dirty import DirtyPages
from ..errors import InvalidRange, PagewatchError, is_transient, transient_error
from ..kernel.constants import PAGE_SIZE
from ..kernel.maps import maps
from ..rangeset import RangeSet
from ._memory import (
    check_identity,
    check_mapped,
    kernel_answer,
    mapping_identity,
    protected_by_us,
)
from .base import Backend, Region

__all__ = ["MprotectBackend", "writable", "covers", "BACKEND"]

_live: weakref.WeakSet[MprotectBackend] = weakref.WeakSet()
_live_lock = threading.Lock()


def _exec_bit(region: Region) -> int:
    """``PROT_EXEC`` if the region's pages are executable (kept while protected)."""
    execs = {m.executable for m in maps("self") if m.start < region.end and m.end > region.start}
    if len(execs) > 1:
        raise InvalidRange(f"[{region.start:#x}, {region.end:#x}) mixes executable and "
                           "non-executable mappings: the mprotect backend tracks one kind")
    return mmap.PROT_EXEC if execs == {True} else 0


_SIGSEGV_BIT = 1 << (signal.SIGSEGV - 1)


def _blocks_sigsegv(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return bool(int(line.split()[1], 16) & _SIGSEGV_BIT)
    except OSError:
        pass  # exited meanwhile
    return False


def _threads_blocking_sigsegv(grace: float = 3.0) -> list[int]:
    """Threads of this process that block ``SIGSEGV`` (a write fault would kill them) for
    ``grace`` seconds: a thread that starts or exits blocks every signal for a moment
    (glibc; a thread just joined may still be exiting), which is waited out."""
    ours = int(_native.us_info()["tid"])  # uffd-sync's thread: blocks all, writes no page
    out = [t for t in map(int, os.listdir("/proc/self/task")) if t != ours and _blocks_sigsegv(t)]
    deadline = time.monotonic() + grace
    while out and time.monotonic() < deadline:
        time.sleep(0.005)
        out = [t for t in out if _blocks_sigsegv(t)]
    return out


_hooked = False


def _hook_sigsegv_installers() -> None:
    """Once, at the first tracker: ``signal.signal`` and ``faulthandler.enable`` put the
    tracker's handler back on top right after they install theirs for ``SIGSEGV`` (it then
    chains to theirs for faults that are not ours).  Without
    this, a write to a tracked page between such a call and the next collect went to the
    newcomer: ``faulthandler`` killed the process, a Python handler hung the thread.  A
    handler installed by C code calling ``sigaction`` is taken back at the next collect."""
    global _hooked
    if _hooked:
        return
    import faulthandler
    import functools

    def after(install: Any, is_sigsegv: Any) -> Any:
        @functools.wraps(install)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            result = install(*args, **kwargs)
            if is_sigsegv(*args, **kwargs):
                _native.mp_reinstall()
            return result
        return hooked

    def signal_arg(signalnum: int, *args: Any, **kwargs: Any) -> bool:
        return signalnum == signal.SIGSEGV

    signal.signal = after(signal.signal, signal_arg)
    faulthandler.enable = after(faulthandler.enable, lambda *a, **k: True)
    _hooked = True


class MprotectBackend(Backend):
    name = "mprotect"
    rank = 3
    summary = "PROT_READ + a SIGSEGV handler in C that records the page and un-protects it"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _trial()

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self._id: int | None = None
        self._lock = threading.Lock()
        blocking = _threads_blocking_sigsegv()
        if blocking:
            raise PagewatchError(
                f"thread(s) {', '.join(map(str, blocking))} block SIGSEGV: the first write of "
                "one to a tracked page would kill the process (the kernel cannot deliver a "
                "blocked fault). Unblock SIGSEGV there, or use another backend")
        extra = _exec_bit(region)
        _hook_sigsegv_installers()
        self._identity = mapping_identity(region)
        self._split_huge_pages()
        try:
            self._id = _native.mp_watch(region.start, region.npages, extra)
        except OSError as exc:
            self._restore_advice()
            self.closed = True
            if exc.errno == errno.ENOMEM:
                check_mapped(region)
            raise PagewatchError(f"cannot write-protect [{region.start:#x}, {region.end:#x}): "
                                 f"{exc.strerror}", exc.errno) from exc
        with _live_lock:
            _live.add(self)

    def _check_alive(self) -> None:
        """Raise TargetGone if the memory went; mark pages made writable behind our back."""
        check_mapped(self.region)
        entries = [m for m in maps("self")
                   if m.end > self.region.start and m.start < self.region.end]
        check_identity(self.region, self._identity, entries)
        for m in entries:
            if m.writable:
                lo, hi = max(m.start, self.region.start), min(m.end, self.region.end)
                _native.mp_mark(lo, hi - lo)

    def _collect(self, reset: bool, max_pages: int | None) -> DirtyPages:
        with self._lock:
            wid = self._id
            if wid is None:
                raise ValueError(f"this {self.name} tracker is closed")
            self._check_alive()
            runs, err = _native.mp_collect(wid, reset, -1 if max_pages is None else max_pages)
            if err:
                # The pages that could not be re-protected stay marked: reported again.
                self._check_alive()
                if err != errno.ENOMEM:  # ENOMEM and mapped: vm.max_map_count, retried later
                    raise PagewatchError(f"mprotect of written pages failed: "
                                         f"{os.strerror(err)}", err)
        return self._result(runs)

    def _release(self) -> None:
        with self._lock:
            if self._id is not None:
                _native.mp_unwatch(self._id)
                self._id = None
        with _live_lock:
            _live.discard(self)


@kernel_answer
def _trial() -> tuple[bool, str]:
    """Track one page for real: protect, write, collect, close."""
    try:
        buf = mmap.mmap(-1, 2 * PAGE_SIZE)
    except OSError as exc:
        raise transient_error("the mprotect trial", exc) from exc
    try:
        addr = _native.buffer_info(buf)[0]
        wid = _native.mp_watch(addr, 2)
        try:
            buf[PAGE_SIZE] = 1
            runs, err = _native.mp_collect(wid, True)
        finally:
            _native.mp_unwatch(wid)
        buf[0] = 1  # writable again after close
        if err or runs.tolist() != [[1, 2]]:
            return False, f"a write to a protected page was reported as {runs.tolist()}"
        return True, "a write to a PROT_READ page was caught by the SIGSEGV handler"
    except OSError as exc:
        if is_transient(exc):
            raise transient_error("the mprotect trial", exc) from exc
        return False, f"the mprotect trial failed: {exc}"
    finally:
        buf.close()


def covers(start: int, end: int) -> bool:
    """Whether live mprotect trackers cover all of ``[start, end)``: such pages show as
    read-only in ``/proc/self/maps`` but are writable memory (we protected them)."""
    with _live_lock:
        spans = RangeSet((b.region.start, b.region.end) for b in _live if not b.closed)
    return not spans.missing(start, end)


protected_by_us.append(covers)


def _span(target: Any) -> tuple[int, int]:
    region, view = region_of(target)
    if view is not None:
        view.release()
    return region.start, region.end - region.start


@contextlib.contextmanager
def writable(target: Any) -> Iterator[None]:
    """Keep ``target``'s pages writable, and reported as written, for the block.

    For I/O done by the kernel into tracked memory, which cannot go through the ``SIGSEGV``
    handler (``read``/``readv``/``recv_into`` into a protected page fail with ``EFAULT``)::

        with writable(view):
            os.readv(fd, [view])

    Parameters
    ----------
    target
        The memory the kernel will write: a buffer (numpy array, memoryview slice,
        bytearray, mmap), a :class:`~pagewatch.Region`, or a Tracker (all its pages).

    Notes
    -----
    Every ``mprotect`` tracker (and ``uffd-sync`` tracker, whose user-mode-only form has
    the same limit) covering those pages reports them in every collect made during the
    block and in the first one after, so a write the kernel makes at any point inside the
    block is reported.  Outside every tracker this does nothing.
    """
    start, length = _span(target)
    mp_err, us_err = _native.pin(start, length)
    try:
        for err in (mp_err, us_err):
            if err and err != errno.ENOMEM:
                raise PagewatchError(f"cannot make [{start:#x}, +{length:#x}) writable: "
                                     f"{os.strerror(err)}", err)
        yield
    finally:
        _native.unpin(start, length)


BACKEND = MprotectBackend
