"""Tracking another process with async userfaultfd write-protect (Linux 6.7+): register
each tracked mapping with the userfaultfd taken from the target (:mod:`.attach`), protect it,
and collect with one batched ``PAGEMAP_SCAN`` (get and re-protect, atomically)."""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

import numpy as np

from .. import _native
from ..errors import InvalidRange, PagewatchError, TargetGone
from ..kernel._errors import scan_error
from ..kernel.constants import PageCategory, ScanFlag, UffdFeature
from ..kernel.maps import Mapping
from ..kernel.pagemap import _scan
from ..kernel.uffd import Userfaultfd
from ..rangeset import RangeSet
from .attach import take_userfaultfd
from .result import _EMPTY_RUNS, ProcessDirty, SkippedMapping, _Layout
from .target import SPECIAL_MAPPINGS, TrackedMemory, _runs_of

_WRITTEN = int(PageCategory.WRITTEN)
_WPALLOWED = int(PageCategory.WPALLOWED)
_HOLDS_DATA = int(PageCategory.PRESENT | PageCategory.SWAPPED)
_NOT_OWN_DATA = int(PageCategory.FILE | PageCategory.PFNZERO)
#: what a scan plan found for a mapping: fully tracked, read-only candidate, not tracked
_FULL, _CANDIDATE, _IGNORED = 1, 2, 3


class UffdAsyncMethod(TrackedMemory):
    """The ``uffd-async`` backend of :class:`~pagewatch.ProcessTracker`."""

    _uffd: Userfaultfd | None
    _adopt: int | None
    _first_new: RangeSet
    _plan: tuple[bytes, list[Mapping], np.ndarray, np.ndarray, list[Mapping], _Layout] | None
    _plan_memo: dict[int, tuple[Mapping, int]]

    def _attach_uffd(self, timeout: float) -> None:
        if self._adopt is not None:
            fd, self._adopt = self._adopt, None
        else:
            fd, self.attach_info = take_userfaultfd(self.pid, self._pidfd, timeout)
            # The injected call ran in the memory the target runs in now (it cannot have been
            # inside execve then): bind maps/pagemap to that memory too.
            self._bind_current_memory()
        self._uffd = Userfaultfd(int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED), fd=fd)
        everything = self._read_all_maps()  # TargetExec if it exec'd while we attached
        ms = [m for m in everything if self._select(m) or self._written_read_only(m)]
        found = []
        for m in ms:
            runs, _ = self._register(m, [(m.start, m.end)], first_sight=self._report_existing)
            found.append(runs)
        if self._report_existing and found:
            self._pending = np.concatenate(found)
            self._first_new = RangeSet((m.start, m.end) for m in ms)
        self._check_strict()
        self._plan_uffd(self._parsed_text, everything)  # what each collect of it scans


    # ---- registration (uffd-async) ---------------------------------------------------------
    def _scan(self, start: int, end: int, **kw: Any) -> np.ndarray:
        assert self._pagemap is not None
        regions, _, _ = _scan(self._pagemap, start, end, kw.get("category_mask", 0),
                              kw.get("category_inverted", 0), kw.get("category_anyof_mask", 0),
                              kw.get("return_mask", 0), kw.get("wp_matching", False),
                              kw.get("check_wpasync", False), 0, 256, True)
        return regions

    def _unregistered(self, start: int, end: int) -> list[tuple[int, int]]:
        """Runs of ``[start, end)`` whose VMAs carry no async write-protect registration:
        holes of unregistered VMAs have no WPALLOWED category, so they match inverted."""
        rows = self._scan(start, end, category_mask=_WPALLOWED, category_inverted=_WPALLOWED)
        return [(int(a), int(b)) for a, b in _runs_of(rows).tolist()]

    def _own_data(self, m: Mapping, start: int, end: int, mask: int, anyof: int) -> np.ndarray:
        """Runs of pages that hold data of their own: for a private mapping, not the zero
        page and not an unmodified page of the file."""
        rows = self._scan(start, end, category_mask=mask, category_anyof_mask=anyof,
                          return_mask=_NOT_OWN_DATA)
        if m.private:
            rows = rows[(rows[:, 2] & np.uint64(_NOT_OWN_DATA)) == 0]
        return _runs_of(rows)

    def _register(self, m: Mapping, parts: list[tuple[int, int]], first_sight: bool
                  ) -> tuple[np.ndarray, bool]:
        """Register and protect ``parts`` of ``m``; returns what to report for them the first
        time (nothing at attach: tracking starts there) and whether any was registered."""
        assert self._uffd is not None
        found = []
        registered = False
        for s, e in parts:
            if (s, e) in self._skipped:
                continue
            try:
                self._uffd.register(s, e - s)
            except PagewatchError as exc:
                if exc.errno != errno.ENOMEM:  # ENOMEM: unmapped meanwhile, seen next time
                    self._skip(m, s, e, exc)
                continue
            self._ours.add(s, e)
            registered = True
            # Before protecting: pages holding data (after, uffd-wp markers read as swapped).
            if first_sight:
                found.append(self._own_data(m, s, e, 0, _HOLDS_DATA))
            try:
                self._uffd.writeprotect(s, e - s)  # WP_UNPOPULATED: empty pages too
            except PagewatchError:
                continue  # unmapped meanwhile
            if first_sight:
                # Pages written between that look and the protection.
                found.append(self._own_data(m, s, e, int(PageCategory.PRESENT), 0))
        return (np.concatenate(found) if found else _EMPTY_RUNS), registered

    def _skip(self, m: Mapping, s: int, e: int, exc: PagewatchError) -> None:
        part = m if (s, e) == (m.start, m.end) else dataclasses.replace(m, start=s, end=e)
        if exc.errno == errno.EBUSY:
            reason = ("already registered with another userfaultfd (the target's own, or "
                      "another tracker's; the kernel allows one per mapping): it cannot be "
                      "tracked until that one unregisters it")
        elif exc.errno == errno.EINVAL:
            reason = ("the kernel refuses write-protect on this kind of memory (VM_PFNMAP/IO "
                      "device memory, DAX, or an unaligned hugetlb range)")
        elif exc.errno == errno.EPERM:
            reason = "the mapping may never become writable (no VM_MAYWRITE)"
        else:
            reason = str(exc)
        self._skipped[(s, e)] = SkippedMapping(part, reason, exc.errno)


    def _written_read_only(self, m: Mapping) -> bool:
        """Whether ``m`` is a read-only private mapping, not tracked, that would be selected
        if it were writable and holds data of its own: it was written while writable (the
        dynamic loader's RELRO, a W^X JIT's code) or copied on write by a debugger's write.

        Such memory is registered and tracked from then on, and its pages reported the first
        time; at attach they are not (tracking starts there), unless ``report_existing``.
        """
        if not self._read_only_candidate(m):
            return False
        return bool(len(self._own_data(m, m.start, m.end, 0, _HOLDS_DATA)))

    def _collect_uffd(self, m: Mapping, reset: bool, register: bool = True
                      ) -> tuple[np.ndarray, bool]:
        """Written runs of mapping ``m``, and whether part of it was seen for the first time.
        Without ``register``, only the parts already tracked are scanned."""
        if register:
            new, is_new = self._register(m, self._ours.missing(m.start, m.end),
                                         first_sight=True)
        else:
            new, is_new = _EMPTY_RUNS, False
        got: list[np.ndarray] = []
        part = (m.start, m.start)
        try:
            for _attempt in range(3):
                try:
                    for part in self._ours.within(m.start, m.end):
                        # kept part by part: a part scanned (and reset) stays reported if a
                        # later one fails
                        got.append(_runs_of(self._scan(*part, category_mask=_WRITTEN,
                                                       return_mask=_WRITTEN, wp_matching=reset,
                                                       check_wpasync=True)))
                    break
                except InvalidRange as exc:
                    if exc.errno != errno.EPERM:
                        raise
                    if reset:
                        # The scan walked (and reset) the part up to the memory it refused,
                        # and its runs are lost with the error: report the whole part
                        got.append(np.array([part], np.int64))
                # A range we registered was unmapped and mapped again (or moved by mremap):
                # its new VMA is not registered.  Its old content is gone, so all of it is
                # reported (a page that held data and now reads zero has changed too).
                # Register it, scan again.
                replaced = [r for s, e in self._ours.within(m.start, m.end)
                            for r in self._unregistered(s, e)]
                for a, b in replaced:
                    self._ours.remove(a, b)
                if register:
                    more, _ = self._register(m, self._ours.missing(m.start, m.end),
                                             first_sight=True)
                else:
                    more = _EMPTY_RUNS
                new = np.concatenate([new, more, np.array(replaced, np.int64).reshape(-1, 2)])
                is_new = True
            else:
                # The target keeps remapping this range: report all of it rather than miss a write.
                if not reset and len(new):  # (and the replaced memory again after a reset)
                    self._pending = np.concatenate([self._pending, new])
                return np.array([[m.start, m.end]], np.int64), True
            if not reset and len(new):
                self._pending = np.concatenate([self._pending, new])
                new = _EMPTY_RUNS
            return np.concatenate([new, *got]) if got else new, is_new
        except BaseException:
            if reset:  # what this failed scan reset is the next collect's to report
                self._pending = np.concatenate([self._pending, new, *got,
                                                np.array([part], np.int64)])
            raise


    def _plan_uffd(self, text: bytes, everything: list[Mapping]
                   ) -> tuple[list[np.ndarray], set[Mapping]]:
        """For a maps layout not seen at the previous collect: drop what was unmapped,
        register what is new (returns its first-sight runs and mappings), and work out what
        each collect of this layout scans: the tracked parts of every mapping reported (one
        range per mapping part, never across mappings: a failed scan then concerns one
        mapping), and the read-only mappings to look at for data of their own."""
        self._forget_unmapped(everything)
        firsts: list[np.ndarray] = []
        new: set[Mapping] = set()
        entries: list[Mapping] = []
        candidates: list[Mapping] = []
        ranges: list[tuple[int, int, int]] = []
        within, select = self._ours.within, self._select
        # What the previous plan found for a mapping whose line is unchanged still holds
        # (an unchanged line gives the same Mapping object: see _maps_now).
        before = self._plan_memo
        memo: dict[int, tuple[Mapping, int]] = {}
        for m in everything:
            seen = before.get(id(m))
            if seen is not None and seen[0] is m:
                memo[id(m)] = seen
                if seen[1] == _FULL:
                    i = len(entries)
                    entries.append(m)
                    ranges.append((m.start, m.end, i))
                elif seen[1] == _CANDIDATE:
                    candidates.append(m)
                continue
            parts = within(m.start, m.end)
            if select(m):
                if parts != [(m.start, m.end)]:
                    runs, is_new = self._register(m, self._ours.missing(m.start, m.end),
                                                  first_sight=True)
                    if len(runs):
                        firsts.append(runs)
                    if is_new:
                        new.add(m)
                    parts = within(m.start, m.end)
            elif not parts:
                # Tracked memory made read-only since stays in (parts); untracked read-only
                # memory is looked at for data of its own at each collect.
                if self._read_only_candidate(m):
                    candidates.append(m)
                    memo[id(m)] = (m, _CANDIDATE)
                else:
                    memo[id(m)] = (m, _IGNORED)
                continue
            if parts == [(m.start, m.end)]:
                memo[id(m)] = (m, _FULL)
            i = len(entries)
            entries.append(m)
            ranges += [(a, b, i) for a, b in parts]
        self._plan_memo = memo
        table = np.array(ranges, np.int64).reshape(-1, 3)
        self._plan = (text, entries, np.ascontiguousarray(table[:, :2]), table[:, 2],
                      candidates, _Layout(entries))
        return firsts, new

    def _forget_plan(self) -> None:
        """What is tracked changed outside a plan: the next collect plans from scratch."""
        self._plan = None
        self._plan_memo = {}

    def _read_only_candidate(self, m: Mapping) -> bool:
        """A read-only private mapping, not tracked, that would be selected if it were
        writable (see :meth:`_written_read_only`)."""
        if (not m.private or m.writable or m.path in SPECIAL_MAPPINGS
                or (m.start, m.end) in self._skipped):
            return False
        return bool(self._select(dataclasses.replace(m, perms=m.perms[0] + "w" + m.perms[2:])))

    def _collect_uffd_all(self, reset: bool) -> ProcessDirty:
        """One uffd-async collect: one batched PAGEMAP_SCAN call (one scan per tracked part
        of each mapping, in C) and per-mapping Python work only where the layout changed."""
        assert self._pagemap is not None
        text, everything = self._maps_now()
        firsts: list[np.ndarray] = []
        new: set[Mapping] = set()
        if self._plan is None or self._plan[0] != text:
            firsts, new = self._plan_uffd(text, everything)
        assert self._plan is not None
        _, entries, ranges, owner_of_range, candidates, layout = self._plan
        extra: list[tuple[Mapping, np.ndarray]] = []
        fd = self._pagemap.fileno()
        scanned = _EMPTY_RUNS
        errored = _EMPTY_RUNS
        done = False
        try:
            if candidates:
                # Read-only memory that holds data of its own now: written while writable.
                rows, owner, errs = _native.pagemap_scan_ranges(
                    fd, np.array([(m.start, m.end) for m in candidates], np.int64), 0, 0, 0,
                    _HOLDS_DATA, _NOT_OWN_DATA)
                own = owner[(rows[:, 2] & np.uint64(_NOT_OWN_DATA)) == 0] if len(rows) else owner
                for i in sorted(set(own.tolist())):
                    m = candidates[i]
                    runs, is_new = self._collect_uffd(m, reset, register=True)
                    extra.append((m, runs))
                    new.add(m)
                    self._forget_plan()  # tracked from now on: the next collect plans again
            flags = int(ScanFlag.CHECK_WPASYNC) | (int(ScanFlag.WP_MATCHING) if reset else 0)
            rows, owner, errs = _native.pagemap_scan_ranges(fd, ranges, flags, _WRITTEN, 0, 0,
                                                            _WRITTEN)
            scanned = np.asarray(rows, np.uint64)[:, :2].astype(np.int64)
            errored = ranges[errs != 0]
            redo: set[int] = set()
            refused: dict[int, list[tuple[int, int]]] = {}
            for i in np.flatnonzero(errs).tolist():
                err = int(errs[i])
                if err == errno.EPERM:
                    redo.add(int(owner_of_range[i]))  # replaced since: see _collect_uffd
                    if reset:
                        # Its scan reset what it walked before the memory it refused, and
                        # the runs went with the error: the whole range is reported
                        refused.setdefault(int(owner_of_range[i]), []).append(
                            (int(ranges[i, 0]), int(ranges[i, 1])))
                    continue
                start, end = int(ranges[i, 0]), int(ranges[i, 1])
                if err == -1:
                    raise PagewatchError(f"PAGEMAP_SCAN made no progress in [{start:#x}, "
                                         f"{end:#x}) of process {self.pid}")
                raise scan_error(OSError(err, os.strerror(err)), start, end, flags)
            if self._pagemap.exited():
                raise TargetGone(f"process {self.pid} has exited", errno.ESRCH, pid=self.pid)
            for i in sorted(redo):
                m = entries[i]
                runs, is_new = self._collect_uffd(m, reset, register=self._select(m))
                if i in refused:
                    runs = np.concatenate([runs, np.array(refused[i], np.int64)])
                extra.append((m, runs))
                if is_new:
                    new.add(m)
                self._forget_plan()
            done = True
        except TargetGone as exc:
            self._raise_gone(exc.errno, None)  # nothing scanned can be trusted: see below
        finally:
            if not done and reset:
                # The scans reset what they reported: what this failed collect cannot
                # return is the next one's to report (a failed range whole), not lost
                self._pending = np.concatenate([self._pending, scanned, errored, *firsts,
                                                *(r for _, r in extra)])
        if not self._maps_alive():
            # The program exited or executed another during the scans.  PAGEMAP_SCAN takes
            # no hold on the memory, so a scan may have walked page tables being emptied,
            # and it reports an emptied entry as written (Linux 6.12: 9,670 pages of 16,384
            # never written).  Memory still mapped after the scans proves they ran on live
            # memory; memory gone cannot be told from memory torn down under them.
            self._raise_gone(None, None)
        first_runs = np.concatenate(firsts) if firsts else _EMPTY_RUNS
        if not reset and len(first_runs):
            self._pending = np.concatenate([self._pending, first_runs])
            first_runs = _EMPTY_RUNS
        mappings: list[Mapping] | _Layout = layout
        if extra:
            known = set(entries)
            mappings = sorted(entries + [m for m, _ in extra if m not in known],
                              key=lambda m: m.start)
        runs = np.concatenate([scanned, first_runs, *(r for _, r in extra)])
        if self._first_new:
            listed = mappings.mappings if isinstance(mappings, _Layout) else mappings
            new |= {m for m in listed if self._first_new.overlaps(m.start, m.end)}
            if reset:
                self._first_new = RangeSet()
        # (strict applies at attach; later skips are in result.skipped)
        return self._make_result(mappings, runs, new, reset)

    def _forget_unmapped(self, everything: list[Mapping]) -> None:
        """Drop what is no longer mapped.  Tracked memory that is still mapped stays tracked
        whatever its protection now (it is harvested at each collect)."""
        self._ours.keep_only([(m.start, m.end) for m in everything])
        if not self._skipped:
            return
        live = RangeSet((m.start, m.end) for m in everything if self._select(m))
        for key in [k for k in self._skipped if live.missing(*k)]:
            del self._skipped[key]

