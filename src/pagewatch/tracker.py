"""Tracker: which pages of this process's memory were written since the last reset."""

from __future__ import annotations

import sys
from typing import Any

from . import _native
from .backends.base import Backend, Region, choose
from .dirty import DirtyPages
from .errors import InvalidRange
from .kernel.maps import maps

__all__ = ["Tracker", "track", "Region", "region_of"]

_HUGE_PAGES = ("split", "keep")


def region_of(target: Any) -> tuple[Region, memoryview | None]:
    """The :class:`Region` of a target, and a view that keeps a buffer's memory alive."""
    if isinstance(target, Region):
        if target.size <= 0:
            raise InvalidRange(f"empty range at {target.address:#x}")
        if target.address < 0:
            raise InvalidRange(f"negative address {target.address:#x}")
        return target, None
    try:
        view = memoryview(target)
    except TypeError:
        raise TypeError(f"cannot track a {type(target).__name__}: pass an object with the "
                        "buffer protocol (numpy array, bytearray, mmap, memoryview) or "
                        "pagewatch.Region(address, size)") from None
    try:
        address, nbytes, readonly = _native.buffer_info(view)
    except BufferError:
        raise InvalidRange(f"this {type(target).__name__} is not one contiguous block of "
                           "memory: track its base array or a contiguous copy") from None
    if readonly:
        raise InvalidRange(f"this {type(target).__name__} is read-only: nothing can write it")
    if nbytes == 0:
        raise InvalidRange(f"this {type(target).__name__} is empty")
    return Region(address, nbytes), view


def _protected_by_mprotect(start: int, end: int) -> bool:
    """Pages an mprotect tracker made read-only are still writable memory."""
    mod = sys.modules.get("pagewatch.backends.mprotect")
    return mod is not None and bool(mod.covers(start, end))


def _check_writable_mapping(region: Region) -> None:
    """Every page of the region must be mapped, and writable."""
    cursor = region.start
    for m in maps("self"):
        if m.end <= cursor:
            continue
        if m.start > cursor:
            break
        if not m.writable and not _protected_by_mprotect(max(m.start, cursor),
                                                          min(m.end, region.end)):
            raise InvalidRange(f"[{m.start:#x}, {m.end:#x}) {m.path or '(anonymous)'} inside "
                               f"the range is not writable ({m.perms})")
        cursor = m.end
        if cursor >= region.end:
            return
    raise InvalidRange(f"[{cursor:#x}, {region.end:#x}) is not mapped: a tracked range must "
                       "lie in mapped memory")


class Tracker:
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

    def __init__(self, target: Any, backend: str = "auto", huge_pages: str = "split") -> None:
        if huge_pages not in _HUGE_PAGES:
            raise ValueError(f"huge_pages must be one of {_HUGE_PAGES}, not {huge_pages!r}")
        self.region, self._view = region_of(target)
        _check_writable_mapping(self.region)
        cls, self.backend_reason = choose(backend)
        self._impl: Backend | None = cls(self.region, huge_pages=huge_pages)
        self.backend: str = cls.name

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
        return self._b.collect(reset=reset, max_pages=max_pages)

    def close(self) -> None:
        """Stop tracking and leave the memory as it was."""
        if self._impl is not None:
            try:
                self._impl.close()
            finally:
                self._impl = None
                if self._view is not None:
                    self._view.release()
                    self._view = None

    @property
    def closed(self) -> bool:
        return self._impl is None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.backend
        return (f"<Tracker {state} [{self.region.start:#x}, {self.region.end:#x}) "
                f"{self.region.npages} pages>")


def track(target: Any, backend: str = "auto", huge_pages: str = "split") -> Tracker:
    """Start tracking writes to ``target``; see :class:`Tracker`."""
    return Tracker(target, backend=backend, huge_pages=huge_pages)
