"""Tracker: which pages of this process's memory were written since the last reset."""

from __future__ import annotations

from typing import Any

from ._lifecycle import Closeable
from ._region import Region, region_of
from .backends._memory import check_writable_mapping
from .backends.base import Backend, choose
from .dirty import DirtyPages

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

    def reset(self) -> None:
        """Forget everything written so far."""
        self._b.reset()

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
