"""Windows write-watch semantics (``GetWriteWatch`` / ``ResetWriteWatch``) for ported code.

As on Windows, write watching is chosen at allocation: :func:`alloc` is
``VirtualAlloc(MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH)``, and a range not allocated by it
is an error.  Addresses are returned in ascending order, the granularity is the page size.

Where Windows fails with ``ERROR_INVALID_PARAMETER``, these raise :class:`ValueError`
(:class:`~pagewatch.InvalidRange` for ranges): a zero size, a range that is not in one
write-watched allocation (not allocated by :func:`alloc`, running past its end, or freed),
``max_count`` below 1, and ``reset_write_watch`` of a zero size.  Changing the protection of
watched pages (``mprotect``) leaves the watch state as it was, as on Windows, with every
backend but ``mprotect``, which reports pages whose protection the program changed as
written (it cannot know whether they were).

``get_write_watch(..., reset=True)`` is ``WRITE_WATCH_FLAG_RESET``: atomic, a page written
while it runs is reported now or by the next call.  :func:`reset_write_watch` alone has the
race Microsoft documents: a write between a ``get_write_watch`` without reset and it is
forgotten, so prefer ``reset=True``.
"""

from __future__ import annotations

import mmap
import operator
import threading

import numpy as np

from . import _native
from .errors import InvalidRange
from .kernel.constants import PAGE_SIZE
from .tracker import Tracker

__all__ = ["WatchedMemory", "alloc", "free", "get_write_watch", "reset_write_watch"]


class WatchedMemory:
    """Memory allocated for write watching: ``buffer`` (an ``mmap``), ``address``, ``size``."""

    def __init__(self, size: int, backend: str) -> None:
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self.buffer = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.address: int = _native.buffer_info(self.buffer)[0]
        self.tracker = Tracker(self.buffer, backend=backend)
        # Pages the tracker reported (and reset) that no get_write_watch returned yet: a
        # sub-range reset must not forget the rest of the allocation.
        self.dirty = np.zeros(self.size // PAGE_SIZE, dtype=bool)
        self.lock = threading.Lock()

    def array(self, dtype: type | np.dtype = np.uint8) -> np.ndarray:
        """The memory as a writable numpy array."""
        return np.frombuffer(self.buffer, dtype=dtype)

    def _sync(self) -> None:
        d = self.tracker.collect(reset=True)
        for s, e in d.runs.tolist():
            self.dirty[s:e] = True

    def free(self) -> None:
        free(self)


_allocations: dict[int, WatchedMemory] = {}
_registry_lock = threading.Lock()


def alloc(size: int, backend: str = "auto") -> WatchedMemory:
    """Allocate ``size`` bytes (rounded up to pages) with write watching on."""
    if size <= 0:
        raise InvalidRange(f"cannot allocate {size} bytes")
    mem = WatchedMemory(size, backend)
    with _registry_lock:
        _allocations[mem.address] = mem
    return mem


def free(mem: WatchedMemory) -> None:
    """Stop watching and release the memory."""
    with _registry_lock:
        _allocations.pop(mem.address, None)
    mem.tracker.close()
    mem.buffer.close()


def _find(base: int, size: int) -> tuple[WatchedMemory, int, int]:
    if size <= 0:
        raise InvalidRange(f"empty range at {base:#x}")
    with _registry_lock:
        for mem in _allocations.values():
            if mem.address <= base < mem.address + mem.size:
                if base + size > mem.address + mem.size:
                    raise InvalidRange(f"[{base:#x}, +{size:#x}) runs past the end of its "
                                       f"write-watched allocation at {mem.address:#x}")
                first = (base - mem.address) // PAGE_SIZE
                last = -(-(base + size - mem.address) // PAGE_SIZE)
                return mem, first, last
    raise InvalidRange(f"{base:#x} was not allocated for write watching: allocate it with "
                       "pagewatch.writewatch.alloc()")


def get_write_watch(
    base: int, size: int, *, reset: bool = False, max_count: int | None = None
) -> tuple[np.ndarray, int]:
    """Addresses of the pages of ``[base, base + size)`` written since the allocation or the
    last reset, and the granularity (the page size).

    Parameters
    ----------
    reset
        ``WRITE_WATCH_FLAG_RESET``: reset the pages returned, atomically.
    max_count
        Return at most this many addresses (the first, ascending); with ``reset`` only
        those are reset, as on Windows.  At least 1 (Windows refuses a zero count).

    Returns
    -------
    (numpy.ndarray of uint64, int)
    """
    if max_count is not None:
        if isinstance(max_count, bool):
            raise TypeError("max_count must be an integer or None, not a bool")
        max_count = operator.index(max_count)
        if max_count < 1:
            # Windows: ERROR_INVALID_PARAMETER for a zero count (a buffer of no entries).
            raise ValueError(f"max_count must be >= 1 (Windows answers a count of "
                             f"{max_count} with ERROR_INVALID_PARAMETER)")
    mem, first, last = _find(base, size)
    with mem.lock:
        mem._sync()
        pages = np.flatnonzero(mem.dirty[first:last]) + first
        if max_count is not None:
            pages = pages[:max_count]
        if reset:
            mem.dirty[pages] = False
    return (pages * PAGE_SIZE + mem.address).astype(np.uint64), PAGE_SIZE


def reset_write_watch(base: int, size: int) -> None:
    """Forget the writes to ``[base, base + size)`` (see the module note on the race)."""
    mem, first, last = _find(base, size)
    with mem.lock:
        mem._sync()
        mem.dirty[first:last] = False
