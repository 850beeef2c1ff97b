"""Tracking another process with soft-dirty bits (kernels with ``CONFIG_MEM_SOFT_DIRTY``,
before 6.7's async write-protect): pagemap bit 55, read and reset with every thread of the
target stopped (:mod:`.freeze`)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _intervals
from ..errors import PagewatchError, TargetGone
from ..kernel.constants import PAGE_SIZE, PM_FILE, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP
from ..kernel.maps import Mapping
from ..kernel.pagemap import clear_refs, read_entries
from ..rangeset import RangeSet
from .freeze import frozen
from .procfs import _read_text
from .result import _EMPTY_RUNS, ProcessDirty, SkippedMapping
from .target import TrackedMemory

_internal_hugetlb: frozenset[tuple[int, int]] | None = None


def _dev(text: str, base: int) -> tuple[int, int]:
    major, _, minor = text.partition(":")
    return int(major, base), int(minor, base)


def hugetlb_devices(pid: int) -> frozenset[tuple[int, int]]:
    """(major, minor) of every hugetlbfs file system that memory of ``pid`` can come from:
    the kernel's internal mounts (``MAP_HUGETLB``, ``SHM_HUGETLB``, ``MFD_HUGETLB``; one per
    huge page size, learnt from a memfd of each size) and the hugetlbfs mounts of its mount
    namespace."""
    global _internal_hugetlb
    if _internal_hugetlb is None:
        found = set()
        try:
            sizes = [int(d.split("-")[1][:-2]) * 1024
                     for d in os.listdir("/sys/kernel/mm/hugepages")]
        except (OSError, ValueError, IndexError):
            sizes = []
        for size in sizes:
            flags = os.MFD_CLOEXEC | os.MFD_HUGETLB | (size.bit_length() - 1) << 26
            try:
                fd = os.memfd_create("pagewatch-hugetlb-probe", flags)
            except OSError:
                continue
            st = os.fstat(fd)
            os.close(fd)
            found.add((os.major(st.st_dev), os.minor(st.st_dev)))
        _internal_hugetlb = frozenset(found)
    mounts = set()
    for line in (_read_text(f"/proc/{pid}/mountinfo") or "").splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if rest.split()[:1] == ["hugetlbfs"] and len(parts) > 2:
            try:
                mounts.add(_dev(parts[2], 10))
            except ValueError:
                continue
    return _internal_hugetlb | mounts


_HUGETLB_REASON = ("hugetlb memory has no per-page soft-dirty bit (pagemap reports only the "
                   "mapping's, which the first reset clears), so its writes cannot be seen with "
                   "soft-dirty: track it with uffd-async (Linux 6.7+)")


# ---- stopping every thread (soft-dirty resets) ---------------------------------------------


class SoftDirtyMethod(TrackedMemory):
    """The ``soft-dirty`` backend of :class:`~pagewatch.ProcessTracker`."""

    _hugetlb: frozenset[tuple[int, int]]
    last_freeze: dict[str, Any]

    def _attach_soft_dirty(self) -> None:
        if self.pid == os.getpid():
            raise PagewatchError("a process cannot stop its own threads: use "
                                 "pagewatch.Tracker to track this process's own memory")
        self._hugetlb = hugetlb_devices(self.pid)
        with self._frozen():
            self._bind_current_memory()
            ms = self._soft_dirty_mappings()  # TargetExec if it exec'd meanwhile
            clear_refs(self.pid, 4)
        self.attach_info = {"stop_ms": self.last_freeze["stop_ms"], "tid": None,
                            "freeze": dict(self.last_freeze)}
        if not self._report_existing:  # else the first collect reports what they hold
            for m in ms:
                self._ours.add(m.start, m.end)
        self._check_strict()


    def _soft_dirty_mappings(self) -> list[Mapping]:
        """The selected mappings soft-dirty can track; the others go to ``skipped``."""
        ms = []
        self._skipped = {}
        # Selected ones, and the ones tracked at the last reset whatever their protection
        # now: a page written and then made read-only keeps its bit.
        for m in [m for m in self._read_all_maps()
                  if self._select(m) or self._ours.overlaps(m.start, m.end)]:
            try:
                hugetlb = _dev(m.dev, 16) in self._hugetlb
            except ValueError:
                hugetlb = False
            if hugetlb:
                self._skipped[(m.start, m.end)] = SkippedMapping(m, _HUGETLB_REASON)
            else:
                ms.append(m)
        return ms


    # ---- soft-dirty --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Every thread of the target stopped for the duration (see :func:`frozen`)."""
        with frozen(self.pid, self._timeout) as info:
            yield
        self.last_freeze = info

    def _read_bits(self, m: Mapping) -> list[tuple[int, bytes]]:
        """The pagemap entries of mapping ``m``, raw: ``(first page, bytes)`` chunks."""
        assert self._pagemap is not None
        fd = self._pagemap.fileno()
        lo, hi = m.start // PAGE_SIZE, m.end // PAGE_SIZE
        out = []
        step = 1 << 16  # pages per read: 512 KiB of entries
        for first in range(lo, hi, step):
            n = min(step, hi - first)
            try:
                data = read_entries(fd, first, n)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    self._raise_gone(exc.errno)
                raise PagewatchError(f"reading the pagemap of process {self.pid} failed: "
                                     f"{exc.strerror}", exc.errno) from exc
            if len(data) < n * 8:  # the memory went away (exit or exec): checked by the caller
                data += bytes(n * 8 - len(data))
            out.append((first, data))
        return out

    def _soft_dirty_runs(self, m: Mapping, chunks: list[tuple[int, bytes]]
                         ) -> tuple[np.ndarray, bool]:
        """Written runs of mapping ``m`` and whether part of it is new, from its pagemap
        entries (bit 55) and what was tracked at the last reset.

        Where ``m`` lies over memory tracked at the last reset, a page is reported when its
        soft-dirty bit is set.  That includes the empty pages of a VMA the kernel marked
        soft-dirty whole (``VM_SOFTDIRTY``: memory mapped, or a mapping grown or merged,
        since the reset): such memory may have replaced data at these addresses, so it is
        reported in full (false positives for a merge or growth, never a miss).  Elsewhere
        (memory not seen at the last reset) every page holding data of its own is reported,
        as for a first sight with ``uffd-async``: nothing tells what was written before.
        """
        lo, hi = m.start // PAGE_SIZE, m.end // PAGE_SIZE
        known = [(s // PAGE_SIZE, e // PAGE_SIZE) for s, e in self._ours.within(m.start, m.end)]
        fully_known = known == [(lo, hi)]
        is_new = not fully_known
        out = []
        for first, data in chunks:
            e = np.frombuffer(data, dtype=np.uint64)
            n = len(e)
            soft_dirty = (e & np.uint64(PM_SOFT_DIRTY)) != 0
            if fully_known:
                hit = soft_dirty
                if not is_new:
                    is_new = bool((soft_dirty & ((e & np.uint64(PM_PRESENT | PM_SWAP)) == 0))
                                  .any())
            else:
                seen = np.zeros(n, bool)
                for a, b in known:
                    seen[max(a - first, 0):max(min(b - first, n), 0)] = True
                holds_data = (e & np.uint64(PM_PRESENT | PM_SWAP)) != 0
                if m.private:  # an unmodified page of a private file mapping is not its own
                    holds_data &= (e & np.uint64(PM_FILE)) == 0
                hit = np.where(seen, soft_dirty, holds_data)
            runs = _intervals.from_bitmap(hit, first)
            if len(runs):
                out.append(runs * PAGE_SIZE)
        return (np.concatenate(out) if out else _EMPTY_RUNS), is_new

    def _collect_soft_dirty_all(self, reset: bool) -> ProcessDirty:
        """One soft-dirty collect.  With ``reset``, the maps and every bit 55 are read and
        ``clear_refs`` written while every thread of the target is stopped, so that no write
        can fall between the read of a bit and its reset; the bits are turned into runs after
        the threads go on."""
        read: list[tuple[Mapping, list[tuple[int, bytes]]]] = []
        ms: list[Mapping] = []
        gone: TargetGone | None = None
        try:
            with self._frozen() if reset else contextlib.nullcontext():
                ms = self._soft_dirty_mappings()  # inside: a mapping made just before counts
                for m in ms:
                    read.append((m, self._read_bits(m)))
                if reset:
                    # The memory must still be this program's when its bits are cleared.
                    if not self._maps_alive():
                        self._raise_gone(None)
                    clear_refs(self.pid, 4)
        except TargetGone as exc:
            gone = exc
        new: set[Mapping] = set()
        done: list[tuple[Mapping, np.ndarray]] = []
        for m, chunks in read:
            runs, is_new = self._soft_dirty_runs(m, chunks)
            if is_new:
                new.add(m)
            done.append((m, runs))
        if gone is not None:
            self._raise_gone(gone.errno, self._result(done, new, False))
        if reset:
            self._ours = RangeSet()
            for m in ms:
                self._ours.add(m.start, m.end)
        result = self._result(done, new, reset)
        if reset:
            result.stop_ms = self.last_freeze.get("stop_ms")
        if not self._maps_alive():
            self._raise_gone(None, result)
        return result

