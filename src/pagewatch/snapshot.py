"""Snapshot: put memory back to a saved state by rewriting only the pages written since.

A :class:`Snapshot` keeps a baseline of its target and a :class:`~pagewatch.Tracker` on it.
``restore()`` asks the tracker which pages were written and puts back only those;
``update()`` makes the current content the baseline, copying only the written pages.
It is built on the tracker's public API alone (``collect``), so it works with every
backend.

Two ways to restore, chosen per target and reported (``method``, ``method_reason``):

``"copy"``
    The baseline is a private anonymous copy of the target's pages; ``restore()`` copies
    the written runs back (C, GIL released), clipped to the target's own bytes.  Works for
    any target.  Memory: one copy of the target (``nbytes_baseline``).
``"dontneed"``
    For memory from :func:`snapshot_array`: a private (copy-on-write) mapping of a memfd
    that holds the baseline.  ``restore()`` drops the written pages (``MADV_DONTNEED``),
    so they fall back to the memfd's content with no copy at all; the next write to such a
    page copies it again (a page fault plus a 4 KiB copy).  ``update()`` writes the written
    pages into the memfd.  Memory: the memfd (the baseline) plus the target's private
    copies of the pages written before the snapshot and since the last restore.

Limits
------
* ``restore()`` and ``update()`` expect the target to be quiescent, as ``np.copyto``
  does; the contract with writers that do not pause is in :class:`Snapshot`'s Notes.
* A ``MADV_DONTNEED`` by the program is not a write.  On memory from
  :func:`snapshot_array` the pages fall back to the memfd: a ``"dontneed"`` snapshot stays
  exact (the memfd is its baseline), a ``"copy"`` snapshot does not see the change.  On
  ordinary anonymous memory the pages read as zero: the ``uffd-async`` and ``compare``
  backends report them (and ``restore()`` puts them back); ``mprotect`` and ``uffd-sync``
  do not, so a snapshot with those backends misses such a change.
* A restore by dropping pages is not a write: nothing else observing those pages sees
  them go back to the baseline.  So a second snapshot of pages a ``"dontneed"`` snapshot
  covers is refused (create both with ``method="copy"``), and a :class:`~pagewatch.Tracker`
  beside a ``"dontneed"`` snapshot reports a page it reverted only when it was written
  after that tracker's last collect.  ``"copy"`` restores are writes: every tracker and
  snapshot of the same memory sees them.
* Creating a snapshot reads the whole target (the baseline): keep writers paused then too.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import mmap
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from ._lifecycle import Closeable
from .dirty import DirtyPages
from .errors import PagewatchError
from .kernel.constants import MADV_DONTNEED, PAGE_SIZE
from .tracker import Region, Tracker, region_of

__all__ = ["Snapshot", "snapshot_array", "METHODS"]

#: the restore methods, in the order ``auto`` prefers them
METHODS = ("dontneed", "copy")


# ---- memory pagewatch allocated: snapshot_array ---------------------------------------------

@dataclasses.dataclass
class _Area:
    """One :func:`snapshot_array` mapping: a private mapping of the memfd ``fd``."""

    start: int
    length: int
    fd: int
    #: the live snapshot parts on it; a "dontneed" one keeps its baseline in the memfd
    parts: weakref.WeakSet[Any] = dataclasses.field(default_factory=weakref.WeakSet)

    def live_parts(self) -> list[Any]:
        return [p for p in self.parts if p.tracker is not None]


_AREAS: dict[int, _Area] = {}
# Reentrant: _forget_area runs from a weakref finalizer, which the garbage collector can call
# on a thread that holds the lock already (any allocation under it may collect): a plain Lock
# deadlocked the snapshot model test there.
_AREAS_LOCK = threading.RLock()


def _forget_area(start: int, fd: int) -> None:
    with _AREAS_LOCK:
        area = _AREAS.get(start)
        if area is not None and area.fd == fd:
            del _AREAS[start]
    os.close(fd)


def snapshot_array(shape: int | Sequence[int], dtype: Any = np.float64) -> np.ndarray:
    """A zero-filled array in memory laid out for the fastest :meth:`Snapshot.restore`.

    The array is a private mapping of a memfd.  The first :class:`Snapshot` of it (whole
    array, or any part that starts and ends on page boundaries) keeps its baseline in the
    memfd and restores by dropping the written pages (``method == "dontneed"``): no copy.

    Parameters
    ----------
    shape
        As for :func:`numpy.zeros`.
    dtype
        As for :func:`numpy.zeros`.

    Returns
    -------
    numpy.ndarray
        Writable, C-contiguous, page-aligned; its memory is freed with the array.

    Examples
    --------
    >>> import pagewatch as pw
    >>> a = pw.snapshot_array((1024, 1024), "float32")
    >>> with pw.Snapshot(a) as snap:
    ...     a[3] = 1.0
    ...     _ = snap.restore()
    ...     snap.method
    'dontneed'
    >>> float(a.sum())
    0.0
    """
    dt = np.dtype(dtype)
    shp = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = math.prod(shp)
    nbytes = count * dt.itemsize
    length = max(PAGE_SIZE, -(-nbytes // PAGE_SIZE) * PAGE_SIZE)
    fd = os.memfd_create("pagewatch-snapshot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        mm = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    start = _native.buffer_info(mm)[0]
    with _AREAS_LOCK:
        _AREAS[start] = _Area(start, length, fd)
    weakref.finalize(mm, _forget_area, start, fd)
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shp)


def _area_of(region: Region) -> _Area | None:
    with _AREAS_LOCK:
        for area in list(_AREAS.values()):  # a finalizer may drop one meanwhile
            if area.start <= region.start and region.end <= area.start + area.length:
                return area
    return None


# ---- memory checks ------------------------------------------------------------------------

def _available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (what can be had without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise PagewatchError("/proc/meminfo has no MemAvailable line")


# ---- one target ------------------------------------------------------------------------

class _Part:
    """The snapshot of one contiguous target."""

    def __init__(self, region: Region, view: memoryview | None, method: str,
                 method_reason: str, area: _Area | None) -> None:
        self.region = region
        self.view = view
        self.method = method
        self.method_reason = method_reason
        self.area = area
        self.lo = region.address - region.start
        self.hi = self.lo + region.size
        self.baseline: mmap.mmap | None = None
        self.tracker: Tracker | None = None
        self.pending = DirtyPages.empty(region.start, region.npages)

    def start(self, backend: str, huge_pages: str) -> None:
        r = self.region
        everything = np.array([[0, r.npages]], np.int64)
        target = Region(r.address, r.size) if self.view is None else self.view
        if self.area is not None:
            self.area.parts.add(self)
        if self.method == "dontneed":
            assert self.area is not None
            # The memfd becomes the baseline: the current content goes in.  The target's
            # private copies stay (they hold the same bytes): dropping them would be no
            # write, and a tracker that keeps its written state in the page table
            # (soft-dirty) would lose the writes made before this snapshot.
            self.baseline = mmap.mmap(self.area.fd, r.length, flags=mmap.MAP_SHARED,
                                      offset=r.start - self.area.start)
            _native.copy_runs(self._baseline_addr, r.start, everything, 0, r.length)
            self.tracker = Tracker(target, backend=backend, huge_pages=huge_pages)
        else:
            # Tracking starts before the copy: a write during it is reported, and restore
            # rewrites that page whatever the copy caught.
            self.tracker = Tracker(target, backend=backend, huge_pages=huge_pages)
            self.baseline = mmap.mmap(-1, r.length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            _native.copy_runs(self._baseline_addr, r.start, everything, self.lo, self.hi)

    @property
    def _baseline_addr(self) -> int:
        assert self.baseline is not None
        return _native.buffer_info(self.baseline)[0]

    @property
    def t(self) -> Tracker:
        if self.tracker is None:
            raise ValueError("this snapshot is closed")
        return self.tracker

    def diff(self) -> DirtyPages:
        return self.t.collect(reset=False) | self.pending

    def restore(self, check: bool) -> DirtyPages:
        t = self.t
        if self.method == "dontneed":
            # Reset first, then drop: a write after the drop faults in a fresh copy of the
            # memfd page and is reported; a write between the two is undone and reported.
            written = t.collect(reset=True) | self.pending
            self.pending = written.empty(written.base, written.npages)
            if written:
                _native.madvise_runs(t.base, written.runs, MADV_DONTNEED)
            if t.backend == "compare" and written:
                # compare sees content: the pages just dropped differ from what it saw.
                self._settle(written, check=True)
            return written
        # copy: copy back first (the pages are writable: no fault), then reset the pages
        # copied, only those: pages written meanwhile elsewhere stay reported, never lost.
        if not check and not self.pending:
            done = t._copy_back(self._baseline_addr, self.lo, self.hi)  # the same, one step
            if done is not None:
                return done
        written = t.collect(reset=False) | self.pending
        if written:
            _native.copy_runs(t.base, self._baseline_addr, written.runs, self.lo, self.hi)
        self._settle(written, check=check or t.backend == "compare")
        return written

    def _settle(self, rewritten: DirtyPages, check: bool) -> None:
        """Reset the pages rewritten (only those: a page written elsewhere meanwhile stays
        reported by the tracker); with ``check``, keep pending the rewritten pages that
        differ from the baseline after the reset (written again since the rewrite)."""
        t = self.t
        self.pending = rewritten.empty(rewritten.base, rewritten.npages)
        if rewritten:
            t.reset(rewritten)
        if check and rewritten:
            # After the reset a new write is tracked; one that landed before it is in the
            # page's bytes now.  (compare needs this always: it resets by content.)
            lo, hi = (0, self.region.length) if self.method == "dontneed" else (self.lo, self.hi)
            again = _native.differing_pages(t.base, self._baseline_addr, rewritten.runs, lo, hi)
            if len(again):
                self.pending = self.pending | DirtyPages.from_pages(
                    again, rewritten.base, rewritten.npages)

    def update(self) -> DirtyPages:
        t = self.t
        written = t.collect(reset=True) | self.pending
        self.pending = written.empty(written.base, written.npages)
        if not written:
            return written
        if self.method == "dontneed":
            # into the memfd; the private copies hold the same bytes and stay (see start())
            _native.copy_runs(self._baseline_addr, t.base, written.runs, 0, self.region.length)
        else:
            _native.copy_runs(self._baseline_addr, t.base, written.runs, self.lo, self.hi)
        return written

    def close(self) -> None:
        try:
            if self.tracker is not None:
                self.tracker.close()
        finally:
            self.tracker = None
            if self.area is not None:
                self.area.parts.discard(self)
            if self.baseline is not None:
                self.baseline.close()
                self.baseline = None
            if self.view is not None:
                self.view.release()
                self.view = None


def _overlap(a: Region, b: Region) -> bool:
    return a.start < b.end and b.start < a.end


def _choose_method(region: Region, want: str,
                   siblings: list[Region]) -> tuple[str, str, _Area | None]:
    """The method for ``region``; ``siblings`` are the other targets of the same snapshot."""
    area = _area_of(region)
    if area is not None and any(p.method == "dontneed" and _overlap(p.region, region)
                                for p in area.live_parts()):
        raise ValueError(
            "another snapshot restores these pages by dropping them (method 'dontneed'), "
            "which no other snapshot can see: close it first, or create both with "
            "method='copy'")
    if want == "copy":
        return "copy", "asked for (method='copy')", area
    if area is None:
        why = "the target is not memory from pagewatch.snapshot_array()"
    elif region.address != region.start or region.address + region.size != region.end:
        why = ("the target does not start and end on page boundaries (dropping its first or "
               "last page would revert its neighbours too)")
    elif any(_overlap(r, region) for r in [*(p.region for p in area.live_parts()),
                                           *siblings]):
        why = ("another snapshot shares these pages, and would not see pages dropped by "
               "this one")
    else:
        return "dontneed", ("memory from snapshot_array(): written pages are dropped and fall "
                            "back to the memfd that holds the baseline"), area
    if want == "dontneed":
        raise ValueError(f"method='dontneed' is not possible here: {why}")
    return "copy", f"written runs are copied back from a private copy: {why}", area


# ---- the public class ------------------------------------------------------------------

class Snapshot(Closeable):
    """A saved state of memory, restored by rewriting only the pages written since.

    Parameters
    ----------
    target
        Anything :class:`~pagewatch.Tracker` accepts (numpy array, ``bytearray``,
        ``mmap.mmap``, :class:`~pagewatch.Region`), or a ``dict`` or ``list`` of them: one
        snapshot of a whole state.  Its content now is the baseline.
    backend
        The tracker's backend (see :class:`~pagewatch.Tracker`).
    huge_pages
        ``"split"`` (default) or ``"keep"``: transparent huge pages stay, restore copies
        whole 2 MiB pages back (still exact, coarser).
    method
        ``"auto"`` (default): ``"dontneed"`` for memory from :func:`snapshot_array`,
        ``"copy"`` otherwise; or ask for one (``"dontneed"`` where impossible is a
        ``ValueError``).

    Attributes
    ----------
    method : str
        ``"copy"`` or ``"dontneed"`` (``"mixed"`` for a dict or list whose targets differ).
    method_reason : str
        Why.
    backend : str
        The tracker's backend.
    nbytes_baseline : int
        Bytes the baseline holds: the private copy (``"copy"``) or the memfd
        (``"dontneed"``, shared with the target's unwritten pages).

    Raises
    ------
    PagewatchError
        ``ENOMEM``: the copies the baseline needs exceed the memory available now.

    Notes
    -----
    **Exactness.**  After ``restore()`` the target equals the baseline byte for byte, and
    the next ``diff()`` of a page-aligned target is empty.  Only the target's own bytes are
    written: a target that shares its first or last page with other data has those
    neighbours left alone (they are still *reported* by ``diff()``, which is per page).

    **Concurrent writers.**  ``restore()`` and ``update()`` expect the target to be
    quiescent, as ``np.copyto`` would; ``diff()`` may run at any time.  When a thread (or
    the kernel) writes the target during ``restore()`` anyway:

    * a write to a page that ``restore()`` does not rewrite is never lost: it stays, and the
      next ``diff()`` reports it (the next ``restore()`` undoes it);
    * ``method="dontneed"``: a write to a page being dropped is undone (it landed before the
      drop) or reported by the next ``diff()`` (after it): never lost;
    * ``method="copy"``: a write to a page being copied back may land after the copy and
      before the tracker's reset; it then survives *unreported* and the target differs
      from the baseline where no ``diff()`` shows it.  A writer whose store faulted just
      before the restore began (``mprotect``, ``uffd-sync``: the page is reported before
      the store lands) is such a write.  ``restore(check=True)`` closes this: the
      rewritten pages are compared with the baseline after the reset, and those that
      differ stay reported;
    * a write racing ``update()`` is reported by the next ``diff()``; the baseline holds the
      page's content from before or after that write.

    Examples
    --------
    >>> import numpy as np, pagewatch as pw
    >>> state = np.zeros(1 << 20)
    >>> with pw.Snapshot(state) as snap:
    ...     for episode in range(3):
    ...         state[episode * 1000] = 1.0          # the environment runs
    ...         rewritten = snap.restore()           # and is reset
    ...     print(float(state.sum()), len(rewritten))
    0.0 1
    """

    def __init__(self, target: Any, backend: str = "auto", huge_pages: str = "split",
                 method: str = "auto") -> None:
        if method not in ("auto", *METHODS):
            raise ValueError(f"method must be 'auto' or one of {METHODS}, not {method!r}")
        self._parts: list[_Part] = []
        self._keys: list[Any] | None
        if isinstance(target, Mapping):
            self._keys, items = list(target.keys()), list(target.values())
            self._kind = "dict"
        elif isinstance(target, (list, tuple)):
            self._keys, items = None, list(target)
            self._kind = "list"
        else:
            self._keys, items = None, [target]
            self._kind = "one"
        if not items:
            raise ValueError("nothing to snapshot: the dict or list is empty")
        parts: list[_Part] = []
        try:
            found = [region_of(item) for item in items]
            regions = [r for r, _ in found]
            for i, (region, view) in enumerate(found):
                others = regions[:i] + regions[i + 1:]
                parts.append(_Part(region, view, *_choose_method(region, method, others)))
            need = sum(p.region.length for p in parts if p.method == "copy")
            avail = _available_memory()
            if need > avail:
                raise PagewatchError(
                    f"the baseline needs {need / 2**20:.1f} MiB of copies and only "
                    f"{avail / 2**20:.1f} MiB are available now: snapshot less, free memory, "
                    "or allocate the target with pagewatch.snapshot_array() (its baseline "
                    "needs no copy)", errno.ENOMEM)
            for p in parts:
                p.start(backend, huge_pages)
                self._parts.append(p)
        except BaseException:
            for p in parts:
                p.close()
            raise
        self.backend: str = self._parts[0].t.backend
        methods = {p.method for p in self._parts}
        self.method: str = methods.pop() if len(methods) == 1 else "mixed"
        reasons = list(dict.fromkeys(p.method_reason for p in self._parts))
        self.method_reason: str = "; ".join(reasons)
        self.nbytes_baseline: int = sum(p.region.length for p in self._parts)

    def _shape(self, results: list[DirtyPages]) -> Any:
        if self._kind == "one":
            return results[0]
        if self._kind == "dict":
            assert self._keys is not None
            return dict(zip(self._keys, results, strict=True))
        return results

    def _live(self) -> list[_Part]:
        if not self._parts:
            raise ValueError("this snapshot is closed")
        return self._parts

    def diff(self) -> Any:
        """The pages written since the baseline (or the last restore); nothing is reset.

        Returns
        -------
        DirtyPages
            Or a ``dict``/``list`` of them, shaped as the target.
        """
        return self._shape([p.diff() for p in self._live()])

    def restore(self, check: bool = False) -> Any:
        """Put the baseline back into the pages written since; the target is then equal to
        the baseline.

        Parameters
        ----------
        check
            With ``method="copy"``: after the reset, compare the rewritten pages with the
            baseline, so that a write racing this restore is always undone or reported by
            the next :meth:`diff` (see Notes).  Costs a second read of those pages.

        Returns
        -------
        DirtyPages
            The pages rewritten (or a ``dict``/``list`` of them, shaped as the target).
        """
        return self._shape([p.restore(check) for p in self._live()])

    def update(self) -> Any:
        """Make the current content the baseline (only the written pages are copied).

        Returns
        -------
        DirtyPages
            The pages whose baseline changed (or a ``dict``/``list`` of them).
        """
        return self._shape([p.update() for p in self._live()])

    def close(self) -> None:
        """Stop tracking and free the baseline; the target keeps its content."""
        parts, self._parts = self._parts, []
        err: BaseException | None = None
        for p in parts:
            try:
                p.close()
            except BaseException as exc:  # noqa: BLE001 - close every part, raise the first
                err = err or exc
        if err is not None:
            raise err

    @property
    def closed(self) -> bool:
        return not self._parts

    def __repr__(self) -> str:
        if self.closed:
            return "<Snapshot closed>"
        return (f"<Snapshot {self.method} {self.backend} {len(self._parts)} target(s) "
                f"{self.nbytes_baseline} bytes>")
