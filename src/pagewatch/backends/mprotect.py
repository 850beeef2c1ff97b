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
* The backend owns the protection of the tracked pages: an ``mprotect`` of them by the
  program is undone by the next collect, and ``close()`` leaves them read-write.
* A written page splits the mapping (one VMA per run of writable pages): more than about
  ``vm.max_map_count / 2`` isolated written pages between two collects makes the handler
  fall back to un-protecting whole trackers (every page reported once).
* A first write to a page costs a signal and two system calls (microseconds).
* The ``SIGSEGV`` handler is installed when the first tracker starts and re-installed by a
  new tracker if something replaced it; a handler installed later without chaining takes
  the faults away from it.
* After ``fork()`` the child's copy of a tracker keeps tracking the child's memory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from .. import _native
from ..dirty import DirtyPages
from ..errors import InvalidRange, PagewatchError, TargetGone
from ..kernel.constants import PAGE_SIZE
from ..kernel.maps import maps
from ._memory import check_mapped, no_huge_pages
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


def _max_pages(max_pages: int | None) -> int:
    if max_pages is None:
        return -1
    if max_pages < 0:
        raise ValueError(f"max_pages must be >= 0, not {max_pages}")
    return max_pages


class MprotectBackend(Backend):
    name = "mprotect"
    rank = 3
    summary = "PROT_READ + a SIGSEGV handler in C that records the page and un-protects it"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _trial()

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        extra = _exec_bit(region)
        if huge_pages == "split":
            no_huge_pages(region)
        self._lock = threading.Lock()
        try:
            self._id: int | None = _native.mp_watch(region.start, region.npages, extra)
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                check_mapped(region)
            raise PagewatchError(f"cannot write-protect [{region.start:#x}, {region.end:#x}): "
                                 f"{exc.strerror}", exc.errno) from exc
        with _live_lock:
            _live.add(self)

    def _check_open(self) -> int:
        if self.closed or self._id is None:
            raise ValueError(f"this {self.name} tracker is closed")
        return self._id

    def reset(self) -> None:
        self.collect(reset=True)

    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        limit = _max_pages(max_pages)
        with self._lock:
            wid = self._check_open()
            self._check_alive(wid)
            runs, err = _native.mp_collect(wid, reset, limit)
            if err:
                # The pages that could not be re-protected stay marked: reported again.
                self._check_alive(wid)
                if err != errno.ENOMEM:  # ENOMEM and mapped: vm.max_map_count, retried later
                    raise PagewatchError(f"mprotect of written pages failed: "
                                         f"{os.strerror(err)}", err)
        return DirtyPages(runs, self.region.start, self.region.npages, normalised=True)

    def _check_alive(self, wid: int) -> None:
        try:
            check_mapped(self.region)
        except TargetGone:
            # Stop watching now: the addresses may be reused by another mapping.
            self._id = None
            self.closed = True
            _native.mp_unwatch(wid)
            raise

    def close(self) -> None:
        with self._lock:
            if self._id is not None:
                _native.mp_unwatch(self._id)
                self._id = None
            self.closed = True
        with _live_lock:
            _live.discard(self)


@functools.cache  # one trial per process: its answer does not change
def _trial() -> tuple[bool, str]:
    """Track one page for real: protect, write, collect, close."""
    buf = mmap.mmap(-1, 2 * PAGE_SIZE)
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
        return False, f"the mprotect trial failed: {exc}"
    finally:
        buf.close()


def covers(start: int, end: int) -> bool:
    """Whether live mprotect trackers cover all of ``[start, end)``: such pages show as
    read-only in ``/proc/self/maps`` but are writable memory (we protected them)."""
    with _live_lock:
        spans = sorted((b.region.start, b.region.end) for b in _live if not b.closed)
    cursor = start
    for lo, hi in spans:
        if lo > cursor:
            break
        cursor = max(cursor, hi)
        if cursor >= end:
            return True
    return cursor >= end


def _span(target: Any) -> tuple[int, int]:
    from ..tracker import Tracker, region_of

    if isinstance(target, Tracker):
        return target.region.start, target.region.length
    if isinstance(target, MprotectBackend):
        return target.region.start, target.region.length
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
