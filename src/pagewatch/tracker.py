"""Tracker: which pages of this process's memory were written since the last reset."""

from __future__ import annotations

from typing import Any

from ._lifecycle import Closeable
from ._region import Region, region_of
from .backends._memory import check_writable_mapping
from .backends.base import Backend, choose
from .dirty import DirtyPages
from .kernel.constants import PAGE_SIZE

__all__ = ["Tracker", "track", "Region", "region_of"]

_HUGE_PAGES = ("split", "keep")


class Tracker(Closeable):
    """Track writes to a range of this process's memory.

    Parameters
    ----------
    target
        A writable, contiguous object with the buffer protocol (numpy array, ``bytearray``,
        ``mmap.mmap``, ``memoryview``) or a :class:`Region`.  Tracking is by page: a target
        that does not start or end on a page boundary is tracked at the pages that cover
        it, so writes to its neighbours on those pages are reported too.
    backend
        ``"auto"`` (the best available; ``PAGEWATCH_BACKEND`` overrides it) or one of
        ``"uffd-async"``, ``"soft-dirty"``, ``"uffd-sync"``, ``"mprotect"``, ``"compare"``.
    huge_pages
        ``"split"`` (default): transparent huge pages are kept off the range so tracking
        stays page-precise; ``"keep"``: leave them, and accept 2 MiB-coarse reports.

    Attributes
    ----------
    backend : str
        The backend in use.
    backend_reason : str
        Why it was chosen.
    region : Region
        The pages tracked.
    """

    closed = True  # until built

    def __init__(self, target: Any, backend: str = "auto", huge_pages: str = "split") -> None:
        if huge_pages not in _HUGE_PAGES:
            raise ValueError(f"huge_pages must be one of {_HUGE_PAGES}, not {huge_pages!r}")
        self.region, self._view = region_of(target)
        check_writable_mapping(self.region)
        cls, self.backend_reason = choose(backend)
        self._impl: Backend | None = cls(self.region, huge_pages=huge_pages)
        self.backend: str = cls.name
        self.closed = False

    @property
    def _b(self) -> Backend:
        if self._impl is None:
            raise ValueError("this tracker is closed")
        return self._impl

    @property
    def base(self) -> int:
        """Address of page 0 of the tracked pages."""
        return self.region.start

    @property
    def offset(self) -> int:
        """Where the target starts inside page 0 (its address minus ``base``)."""
        return self.region.address - self.region.start

    def reset(self, pages: DirtyPages | None = None) -> None:
        """Forget everything written so far, or only what was written to ``pages``.

        Parameters
        ----------
        pages
            Pages of this tracker's region (a :class:`DirtyPages` from its ``collect``):
            only writes to those are forgotten, writes to any other page stay to be
            reported by the next ``collect``.  ``None`` (default): every page.

        Notes
        -----
        A write to one of ``pages`` that lands while this runs is forgotten or reported;
        a write that landed before is forgotten (it is what is being reset).  ``uffd-async``
        resets only those pages in the kernel (an ioctl per run, or one walk of their span
        for many runs); the other backends reset the whole region and keep the rest to
        report.

        Examples
        --------
        >>> import mmap, numpy as np, pagewatch as pw
        >>> a = np.frombuffer(mmap.mmap(-1, 4 * 4096), np.uint8)   # page-aligned
        >>> with pw.Tracker(a) as t:
        ...     a[0] = a[3 * 4096] = 1
        ...     t.reset(t.collect(reset=False, max_pages=1))
        ...     t.collect().pages().tolist()
        [3]
        """
        if pages is None:
            self._b.reset()
            return
        r = self.region
        if not isinstance(pages, DirtyPages):
            raise TypeError(f"pages must be DirtyPages, not {type(pages).__name__}")
        if (pages.base, pages.npages, pages.page_size) != (r.start, r.npages, PAGE_SIZE):
            raise ValueError("pages must be pages of this tracker's region (its base, page "
                             "count and page size)")
        self._b.reset(pages.runs)

    def _copy_back(self, src: int, lo: int, hi: int) -> DirtyPages | None:
        """Snapshot's copy-back restore in one step where the backend offers it (see
        ``backends.uffd_async.UffdAsync.copy_back``); None: take the general way."""
        impl = self._impl
        copy_back = getattr(impl, "copy_back", None)
        return None if copy_back is None else copy_back(src, lo, hi)

    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        """The pages written since the last reset.

        Parameters
        ----------
        reset
            Reset what is returned, in the same step (atomic get-and-reset): a page written
            while this runs is reported now or by the next collect, never by neither.
        max_pages
            Return at most this many pages (the first, in address order); only those are
            reset, the rest stay pending.

        Returns
        -------
        DirtyPages
        """
        impl = self._impl
        if impl is None:
            raise ValueError("this tracker is closed")
        return impl.collect(reset, max_pages)

    def close(self) -> None:
        """Stop tracking and leave the memory as it was."""
        if self._impl is not None:
            try:
                self._impl.close()
            finally:
                self._impl = None
                self.closed = True
                if self._view is not None:
                    self._view.release()
                    self._view = None

    def __enter__(self) -> Tracker:
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.backend
        return (f"<Tracker {state} [{self.region.start:#x}, {self.region.end:#x}) "
                f"{self.region.npages} pages>")


def track(target: Any, backend: str = "auto", huge_pages: str = "split") -> Tracker:
    """Start tracking writes to ``target``; see :class:`Tracker`."""
    return Tracker(target, backend=backend, huge_pages=huge_pages)
