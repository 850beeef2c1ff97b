"""DirtyPages: the one result type, runs of written pages as a numpy array."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _intervals
from .kernel.constants import PAGE_SIZE

__all__ = ["DirtyPages"]


class DirtyPages:
    """The pages of a tracked region that were written, as sorted runs.

    Parameters
    ----------
    runs
        ``int64 (n, 2)`` array of ``[first, end)`` page indices relative to ``base``.
        Overlapping or touching runs are merged.
    base
        Address of page 0 of the tracked region (page-aligned).
    npages
        Number of pages in the tracked region.
    page_size
        Bytes per page.

    Notes
    -----
    ``len(d)`` is the number of written pages (``d.count``, ``len(d.pages())``, the sum of
    ``d.bitmap()``); iterating gives the byte runs ``(offset, length)``, ``len(d.runs)`` of
    them.  (A ``ProcessDirty`` is a mapping: its ``len()`` is its mappings, its ``count``
    the pages.)

    A target that does not start on a page boundary is tracked at the pages that cover it:
    page 0 starts at ``base``, which is the target's address rounded down to a page.
    """

    __slots__ = ("_runs", "base", "npages", "page_size")

    def __init__(self, runs: np.ndarray, base: int, npages: int,
                 page_size: int = PAGE_SIZE, *, normalised: bool = False) -> None:
        # normalised=True: the caller vouches the runs are sorted, disjoint and not touching
        # (PAGEMAP_SCAN output is), which skips a sort on the collect path.
        self._runs = (np.ascontiguousarray(runs, dtype=np.int64).reshape(-1, 2) if normalised
                      else _intervals.normalise(runs))
        self.base = base
        self.npages = npages
        self.page_size = page_size
        if len(self._runs) and (self._runs[0, 0] < 0 or self._runs[-1, 1] > npages):
            raise ValueError(f"runs {self._runs[0, 0]}..{self._runs[-1, 1]} fall outside the "
                             f"region's {npages} pages")

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def empty(cls, base: int, npages: int, page_size: int = PAGE_SIZE) -> DirtyPages:
        return cls(np.empty((0, 2), np.int64), base, npages, page_size)

    @classmethod
    def from_regions(cls, regions: np.ndarray, base: int, npages: int,
                     page_size: int = PAGE_SIZE) -> DirtyPages:
        """From PAGEMAP_SCAN rows ``(start, end, categories)`` of absolute addresses,
        clipped to the region."""
        r = np.asarray(regions, dtype=np.uint64).reshape(-1, 3)[:, :2].astype(np.int64)
        runs = (r - base) // page_size
        runs[:, 1] = (r[:, 1] - base + page_size - 1) // page_size
        return cls(np.clip(runs, 0, npages), base, npages, page_size)

    @classmethod
    def from_bitmap(cls, bitmap: np.ndarray, base: int,
                    page_size: int = PAGE_SIZE) -> DirtyPages:
        """From one bool per page."""
        b = np.asarray(bitmap, dtype=bool).ravel()
        return cls(_intervals.from_bitmap(b), base, len(b), page_size, normalised=True)

    @classmethod
    def from_pages(cls, pages: np.ndarray, base: int, npages: int,
                   page_size: int = PAGE_SIZE) -> DirtyPages:
        """From page indices (any order, repeats allowed)."""
        return cls(_intervals.from_pages(pages), base, npages, page_size, normalised=True)

    # ---- views ----------------------------------------------------------------------
    @property
    def runs(self) -> np.ndarray:
        """``int64 (n, 2)`` ``[first, end)`` page indices (read-only view)."""
        v = self._runs.view()
        v.flags.writeable = False
        return v

    def __len__(self) -> int:
        """Number of written pages (``count``)."""
        return int((self._runs[:, 1] - self._runs[:, 0]).sum())

    @property
    def count(self) -> int:
        """Number of written pages, as ``len(d)`` and ``ProcessDirty.count``; ``pages()`` is
        their index array."""
        return len(self)

    @property
    def nbytes(self) -> int:
        """Bytes in the written pages."""
        return len(self) * self.page_size

    def pages(self) -> np.ndarray:
        """``int64`` index of every written page, ascending."""
        if not len(self._runs):
            return np.empty(0, np.int64)
        lengths = self._runs[:, 1] - self._runs[:, 0]
        offs = np.repeat(self._runs[:, 0] - np.concatenate(([0], np.cumsum(lengths)[:-1])),
                         lengths)
        return offs + np.arange(int(lengths.sum()), dtype=np.int64)

    def offsets(self) -> np.ndarray:
        """``int64`` byte offset (from ``base``) of every written page."""
        return self.pages() * self.page_size

    def addresses(self) -> np.ndarray:
        """``uint64`` address of every written page."""
        return (self.pages() * self.page_size + self.base).astype(np.uint64)

    def bitmap(self) -> np.ndarray:
        """One bool per page of the region, True where written."""
        # +1 at each start, -1 at each end, summed: no Python loop over the runs.
        step = np.zeros(self.npages + 1, dtype=np.int8)
        step[self._runs[:, 0]] += 1
        step[self._runs[:, 1]] -= 1
        return np.cumsum(step[:-1], dtype=np.int8).astype(bool)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` in bytes of each run of written pages (``len(self.runs)``
        of them; ``len(d)`` is the pages)."""
        ps = self.page_size
        for s, e in self._runs.tolist():
            yield s * ps, (e - s) * ps

    def __contains__(self, offset: object) -> bool:
        """Whether the byte ``offset`` (from ``base``) lies in a written page."""
        if not isinstance(offset, (int, np.integer)):
            return False
        page = int(offset) // self.page_size
        i = int(np.searchsorted(self._runs[:, 0], page, side="right")) - 1
        return i >= 0 and page < int(self._runs[i, 1])

    def _check_same(self, other: DirtyPages) -> None:
        if (self.base, self.npages, self.page_size) != (other.base, other.npages,
                                                         other.page_size):
            raise ValueError("DirtyPages of different regions cannot be combined")

    def __or__(self, other: DirtyPages) -> DirtyPages:
        self._check_same(other)
        if not len(other._runs):
            return self
        if not len(self._runs):
            return other
        return DirtyPages(_intervals.normalise(np.concatenate([self._runs, other._runs])),
                          self.base, self.npages, self.page_size, normalised=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyPages):
            return NotImplemented
        return (self.base, self.npages, self.page_size) == (
            other.base, other.npages, other.page_size) and np.array_equal(self._runs,
                                                                          other._runs)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return bool(len(self._runs))

    def __repr__(self) -> str:
        return (f"<DirtyPages {len(self)} of {self.npages} pages in {len(self._runs)} runs "
                f"at {self.base:#x}>")


def dirty_pages_of(runs: np.ndarray, base: int, npages: int, *, _new: Any = object.__new__,
                   _cls: type[DirtyPages] = DirtyPages, _ps: int = PAGE_SIZE) -> DirtyPages:
    """A :class:`DirtyPages` of ``int64 (n, 2)`` C-contiguous runs the caller vouches for
    (normalised, inside the region), with no copy and no checks: the collect path."""
    d: DirtyPages = _new(_cls)
    d._runs = runs
    d.base = base
    d.npages = npages
    d.page_size = _ps
    return d
