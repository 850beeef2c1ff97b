"""``/proc/PID/pagemap``: the PAGEMAP_SCAN ioctl, classic reads, ``clear_refs``.

The kernel stops a PAGEMAP_SCAN early when its output fills, when ``max_pages`` is reached
or for its own reasons; :func:`pagemap_scan` loops (in C) until ``walk_end == end`` so the
caller never sees those stops.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
from typing import Protocol

import numpy as np

from .. import _native
from .._lifecycle import Closeable
from ..errors import InvalidRange, PagewatchError, TargetGone
from ._errors import proc_open_error, scan_error
from .constants import (
    PAGE_SIZE,
    PM_FILE,
    PM_GUARD,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
    PageCategory,
    ScanFlag,
)

__all__ = [
    "Pagemap",
    "pagemap_scan",
    "pagemap_scan_once",
    "read_pagemap",
    "read_entries",
    "decode_pagemap",
    "PagemapBits",
    "clear_refs",
]

_ALL_CATEGORIES = int(
    PageCategory.WPALLOWED | PageCategory.WRITTEN | PageCategory.FILE | PageCategory.PRESENT
    | PageCategory.SWAPPED | PageCategory.PFNZERO | PageCategory.HUGE | PageCategory.SOFT_DIRTY
    | PageCategory.GUARD
)


class _HasFileno(Protocol):
    def fileno(self) -> int:
        ...  # pragma: no cover


class Pagemap(Closeable):
    """An open ``/proc/PID/pagemap`` (``pid`` may be ``"self"``).

    Opening needs ptrace read access to the process (``PTRACE_MODE_READ``); the same file
    descriptor also lets PAGEMAP_SCAN write-protect that process's registered ranges.
    """

    def __init__(self, pid: int | str = "self") -> None:
        self.pid = pid
        self._pidfd = -1
        try:
            self._fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise proc_open_error(exc, pid, "pagemap") from exc
        if isinstance(pid, int) and pid != os.getpid():
            # Kernels before ~6.18 answer a scan or read of an exited process with an empty
            # result, not ESRCH: a pidfd tells us it is gone.
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:
                pass

    def exited(self) -> bool:
        """Whether the process has exited (a zombie too); False when that cannot be told."""
        if self._pidfd < 0:
            return False
        return bool(select.select([self._pidfd], [], [], 0)[0])

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the pagemap file is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


def _check_masks(**masks: int) -> None:
    for name, value in masks.items():
        if value < 0 or value & ~_ALL_CATEGORIES:
            raise ValueError(f"{name}={value:#x} has bits that are not PAGE_IS_* categories "
                             f"(known: {_ALL_CATEGORIES:#x})")


def _check_range(start: int, end: int) -> int:
    """Validate as the kernel does, but with a clear message; returns ``end`` page-rounded."""
    if start < 0 or end < 0:
        raise InvalidRange(f"negative address in [{start:#x}, {end:#x})")
    if start % PAGE_SIZE:
        raise InvalidRange(f"start {start:#x} is not aligned to the page size ({PAGE_SIZE})")
    if end < start:
        raise InvalidRange(f"end {end:#x} is below start {start:#x}")
    # The kernel rounds end up to a page; so do we, so walk_end can be compared with it.
    end = -(-end // PAGE_SIZE) * PAGE_SIZE
    if end >= 1 << 64:  # would wrap in the 64-bit struct field and scan a different range
        raise InvalidRange(f"end {end:#x} does not fit in a 64-bit address")
    return end


def _fd_of(target: int | str | _HasFileno) -> tuple[int, Pagemap | None]:
    if isinstance(target, (int, str)):
        pm = Pagemap(target)
        return pm.fileno(), pm
    return target.fileno(), None


def pagemap_scan(
    target: int | str | _HasFileno,
    start: int,
    end: int,
    *,
    category_mask: int = 0,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = int(PageCategory.WRITTEN),
    wp_matching: bool = False,
    check_wpasync: bool = False,
    max_pages: int = 0,
    capacity: int = 256,
) -> np.ndarray:
    """Scan ``[start, end)`` of a process's page tables with PAGEMAP_SCAN.

    Parameters
    ----------
    target
        A pid (or ``"self"``), or an open :class:`Pagemap` (anything with ``fileno()``).
    start, end
        The range; ``start`` must be page-aligned, ``end`` is rounded up to a page.
    category_mask, category_inverted, category_anyof_mask, return_mask
        :class:`PageCategory` masks, with the kernel's meaning: a page matches when
        ``c = categories ^ inverted`` has every bit of ``category_mask`` and, if
        ``category_anyof_mask`` is set, one of its bits.  Reported categories are
        ``categories & return_mask``.
    wp_matching
        Write-protect the matched pages (``PM_SCAN_WP_MATCHING``): get-and-reset.
    check_wpasync
        Fail (:class:`InvalidRange`) on any VMA in the range not registered for async
        write-protect (``PM_SCAN_CHECK_WPASYNC``).
    max_pages
        Report at most this many pages (0: no limit); with ``wp_matching`` only those are
        protected.  Exact: the result holds exactly ``min(max_pages, matching)`` pages.
    capacity
        Ignored (kept for callers): the output vector is sized from the range, and kept
        between calls by each thread.

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` ``uint64`` rows of ``(start, end, categories)``, in address order,
        adjacent runs with equal categories merged.

    Raises
    ------
    InvalidRange
        Unaligned start, end below start, a range the kernel refuses, or (with
        ``check_wpasync``) a VMA not registered for async write-protect.
    Unsupported
        The kernel has no PAGEMAP_SCAN (before 6.7).
    PagewatchError
        The kernel made no progress (a partial hugetlb page under ``wp_matching``).
    """
    regions, walk_end, _ = _scan(target, start, end, category_mask, category_inverted,
                                 category_anyof_mask, return_mask, wp_matching, check_wpasync,
                                 max_pages, capacity, True)
    return regions


def _scan(
    target: int | str | _HasFileno, start: int, end: int, category_mask: int,
    category_inverted: int, category_anyof_mask: int, return_mask: int, wp_matching: bool,
    check_wpasync: bool, max_pages: int, capacity: int, want_output: bool,
    pages_base: int = -1,
) -> tuple[np.ndarray, int, int]:
    """The checked PAGEMAP_SCAN loop; with ``pages_base`` >= 0 the result is ``int64 (n, 2)``
    runs of page indices from that address instead of ``(start, end, categories)`` rows."""
    _check_masks(category_mask=category_mask, category_inverted=category_inverted,
                 category_anyof_mask=category_anyof_mask, return_mask=return_mask)
    if max_pages < 0:
        raise ValueError(f"max_pages must be >= 0 (0 means no limit), not {max_pages}")
    end = _check_range(start, end)
    flags = (int(ScanFlag.WP_MATCHING) if wp_matching else 0) | (
        int(ScanFlag.CHECK_WPASYNC) if check_wpasync else 0)
    fd, owned = _fd_of(target)
    pm = owned if owned is not None else target if isinstance(target, Pagemap) else None
    try:
        regions, walk_end, pages = _native.pagemap_scan(
            fd, start, end, flags, category_mask, category_inverted, category_anyof_mask,
            return_mask, max_pages, capacity, want_output, pages_base)
        if pm is not None and pm.exited():
            raise TargetGone(f"process {pm.pid} has exited: its pagemap no longer describes "
                             "its memory", errno.ESRCH, collected=regions)
    except OSError as exc:
        if isinstance(exc, TargetGone):
            raise
        raise scan_error(exc, start, end, flags) from exc
    finally:
        if owned is not None:
            owned.close()
    if walk_end < end and not (max_pages and pages >= max_pages):
        raise no_progress(walk_end, start, end)
    return regions, walk_end, pages


_WRITTEN = int(PageCategory.WRITTEN)
_RESET_FLAGS = int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)
_GET_FLAGS = int(ScanFlag.CHECK_WPASYNC)


def scan_written(fd: int, start: int, end: int, base: int, reset: bool,
                 max_pages: int = 0, check_mapped: bool = False) -> np.ndarray:
    """The written pages of ``[start, end)`` (page-aligned, checked by the caller) of this
    process's uffd-wp-async memory, get-and-reset with ``reset``: ``int64 (n, 2)`` runs of
    page indices from ``base``.  The tracker's collect: one native call, no keyword
    parsing, no validation beyond the kernel's; errors as :func:`pagemap_scan` raises them.

    With ``check_mapped``, the range is first checked to be all mapped (a scan passes over
    holes without a word): if it is not, the ``OSError`` (``ENOMEM``, ``filename``
    ``"msync(2)"``) is raised as it is, for the caller to say what went.
    """
    flags = _RESET_FLAGS if reset else _GET_FLAGS
    try:
        runs, walk_end, pages = _native.scan_runs(fd, start, end, base, flags, _WRITTEN,
                                                  max_pages, check_mapped)
    except OSError as exc:
        if exc.filename == "msync(2)":
            raise
        raise scan_error(exc, start, end, flags) from exc
    if walk_end < end and not (max_pages and pages >= max_pages):
        raise no_progress(walk_end, start, end)
    return runs


def no_progress(walk_end: int, start: int, end: int) -> PagewatchError:
    """The error for a PAGEMAP_SCAN loop the kernel stopped short of ``end``."""
    return PagewatchError(
        f"PAGEMAP_SCAN made no progress at {walk_end:#x} in [{start:#x}, {end:#x}): the "
        "kernel backs out of a partial hugetlb page under write-protect; align the range "
        "to the huge page size (or protect hugetlb ranges with UFFDIO_WRITEPROTECT)")


def pagemap_scan_once(
    target: int | str | _HasFileno,
    start: int,
    end: int,
    *,
    flags: int = 0,
    category_mask: int = 0,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    max_pages: int = 0,
    vec_len: int = 0,
    vec_addr: int = -1,
    size: int | None = None,
) -> tuple[int, int, np.ndarray]:
    """One PAGEMAP_SCAN ioctl, unvalidated, exactly as given: for tests and probes.

    ``vec_addr=-1`` passes a buffer of ``vec_len`` runs; any other value is passed as the
    ``vec`` pointer itself.  Returns ``(ret, walk_end, regions)``; raises ``OSError``.
    """
    fd, owned = _fd_of(target)
    try:
        kw = {} if size is None else {"size": size}
        return _native.pagemap_scan_once(
            fd, start, end, flags, category_mask, category_inverted, category_anyof_mask,
            return_mask, max_pages, vec_len, vec_addr, **kw)
    finally:
        if owned is not None:
            owned.close()


def read_entries(fd: int, first_page: int, n: int) -> bytes:
    """``n`` classic pagemap entries (8 bytes each) from page ``first_page`` of an open
    pagemap, raw; fewer when the file ends first (the process's memory is gone).  The one
    read loop of the classic format.  Raises OSError."""
    data = b""
    offset = first_page * 8
    while len(data) < n * 8:
        chunk = os.pread(fd, n * 8 - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_pagemap(pid: int | str, start: int, end: int) -> np.ndarray:
    """The classic pagemap entries of the pages of ``[start, end)``: one ``uint64`` a page."""
    end = _check_range(start, end)
    n = (end - start) // PAGE_SIZE
    with Pagemap(pid) as pm:
        data = read_entries(pm.fileno(), start // PAGE_SIZE, n)
        if pm.exited():
            raise TargetGone(f"process {pid} has exited: its pagemap no longer describes its "
                             "memory", errno.ESRCH)
    if len(data) != n * 8:
        raise InvalidRange(f"could read only {len(data) // 8} of {n} pagemap entries")
    return np.frombuffer(data, dtype=np.uint64).copy()


@dataclasses.dataclass(frozen=True)
class PagemapBits:
    """Classic pagemap entries decoded, one numpy array per field."""

    present: np.ndarray
    swapped: np.ndarray
    soft_dirty: np.ndarray
    exclusive: np.ndarray
    uffd_wp: np.ndarray
    guard: np.ndarray
    file: np.ndarray
    pfn: np.ndarray


def decode_pagemap(entries: np.ndarray) -> PagemapBits:
    """Decode pagemap entries (bit 63 present, 62 swapped, 61 file/shared-anon, 58 guard,
    57 uffd-wp, 56 exclusive, 55 soft-dirty, 0-54 PFN, zero without CAP_SYS_ADMIN)."""
    e = np.asarray(entries, dtype=np.uint64)

    def bit(mask: int) -> np.ndarray:
        return (e & np.uint64(mask)) != 0

    present = bit(PM_PRESENT)
    return PagemapBits(
        present=present,
        swapped=bit(PM_SWAP),
        soft_dirty=bit(PM_SOFT_DIRTY),
        exclusive=bit(PM_MMAP_EXCLUSIVE),
        uffd_wp=bit(PM_UFFD_WP),
        guard=bit(PM_GUARD),
        file=bit(PM_FILE),
        pfn=np.where(present, e & np.uint64(PM_PFN_MASK), np.uint64(0)),
    )


def clear_refs(pid: int | str, value: int) -> None:
    """Write ``value`` to ``/proc/PID/clear_refs`` (4 clears every soft-dirty bit)."""
    try:
        fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise proc_open_error(exc, pid, "clear_refs") from exc
    try:
        os.write(fd, f"{value}\n".encode())
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise TargetGone(f"process {pid} exited before clear_refs", exc.errno) from exc
        raise PagewatchError(f"/proc/{pid}/clear_refs refused {value!r}: {exc.strerror} "
                             "(valid values are 1 to 5; 4 clears the soft-dirty bits)",
                             exc.errno) from exc
    finally:
        os.close(fd)
