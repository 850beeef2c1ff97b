"""``compare``: a private snapshot, compared page by page in C.

Nothing is protected and nothing faults: writers run at full speed on any kernel.  The
tracker keeps a copy of the tracked pages; ``collect()`` copies each live page once into a
temporary (``process_vm_readv`` on this process, so an unmapped page is an error, not a
crash), compares the copy with the snapshot and, where they differ, makes the copy the new
snapshot.  The snapshot is only ever an actual read of the page, so a write landing after
that read differs from it and is reported by the next collect: at-least-once, as the
other backends.

Semantics and costs
-------------------
* **Exact by content.**  A page counts as written when its bytes differ from the last
  collect's: writing the bytes a page already holds is not a change, and a page changed
  then changed back between two collects is not reported.  So while writers run, a
  reader that copies the reported pages after ``collect()`` may copy a content B that a
  page holds only for a moment (A, then B, then A again): no later collect reports the
  page, and the reader keeps B.  A backend that tracks writes has no such case; with
  ``compare``, copy while the writers are paused.  Writes by the kernel
  (``readv``, ``recv_into``), by other processes through shared memory and
  ``MADV_DONTNEED`` zeroing are all seen, since only content matters.
* Memory: one private copy of the tracked range (anonymous, so it can be swapped).
* ``collect()`` and ``reset()`` read every tracked page (about the speed of ``memcmp``);
  ``max_pages`` stops the scan early.
* Each tracker has its own snapshot: trackers never disturb each other.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import numpy as np

from .. import _native
from ..dirty import DirtyPages
from ..errors import PagewatchError
from ..kernel.constants import PAGE_SIZE
from ._memory import check_identity, check_mapped, mapping_identity
from .base import Backend, Region

__all__ = ["Compare", "BACKEND"]


class Compare(Backend):
    name = "compare"
    rank = 4
    summary = "a private copy compared page by page in C: any kernel, exact by content"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "needs nothing from the kernel (exact by content, collect reads every page)"

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        # Pages a failed collect had already taken into the snapshot: reported next time.
        self._pending: DirtyPages | None = None
        self._identity = mapping_identity(region)
        # An anonymous mapping of its own.  One page longer than needed: the kernel puts new
        # mappings in the first gap that fits, and a snapshot exactly the target's size
        # would fill the hole a program just freed next to it (and wants back).
        self._map = mmap.mmap(-1, region.length + PAGE_SIZE, mmap.MAP_PRIVATE)
        self._snap = np.frombuffer(self._map, dtype=np.uint8)
        self._snapshot()

    def _snapshot(self) -> None:
        self._check_alive()
        self._check_read(_native.cmp_snapshot(self.region.start, self.region.npages,
                                              self._snap))

    def _check_alive(self) -> None:
        check_mapped(self.region)
        check_identity(self.region, self._identity)

    def _check_read(self, err: int) -> None:
        """A C read of the live pages failed: they went away, or cannot be read."""
        if not err:
            return
        self._check_alive()
        if err == errno.EFAULT:
            raise PagewatchError(
                f"a page of [{self.region.start:#x}, {self.region.end:#x}) cannot be read "
                "(the program made it PROT_NONE?): compare reads every page, so tracked "
                "memory must stay readable; nothing was lost, the next collect that can "
                "read it reports what changed", err)
        raise PagewatchError(f"reading the tracked pages failed: {os.strerror(err)}", err)

    def _reset(self) -> None:
        with self._lock:
            self._snapshot()
            self._pending = None

    def _collect(self, reset: bool, max_pages: int | None) -> DirtyPages:
        with self._lock:
            self._check_alive()
            runs, err = _native.cmp_collect(self.region.start, self.region.npages, self._snap,
                                            reset, -1 if max_pages is None else max_pages)
            got = self._result(runs)
            if err:
                if reset and len(got):
                    # Those pages are in the snapshot already: keep them to report.
                    self._pending = got if self._pending is None else self._pending | got
                self._check_read(err)
            if self._pending is None:
                return got
            everything = got | self._pending
            chosen = everything if max_pages is None else _first(everything, max_pages)
            if reset:
                rest = everything.bitmap() & ~chosen.bitmap()
                self._pending = (DirtyPages.from_bitmap(rest, self.region.start)
                                 if rest.any() else None)
            return chosen

    def _release(self) -> None:
        with self._lock:
            self._snap = np.empty(0, np.uint8)
            if self._map is not None:
                self._map.close()
                self._map = None


def _first(d: DirtyPages, n: int) -> DirtyPages:
    if len(d) <= n:
        return d
    return DirtyPages.from_pages(d.pages()[:n], d.base, d.npages, d.page_size)


BACKEND = Compare
