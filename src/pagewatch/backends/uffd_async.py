"""``uffd-async``: userfaultfd async write-protect + PAGEMAP_SCAN (Linux >= 6.7).

A write to a protected page is resolved inside the kernel's fault handler, which clears
the page's uffd-wp bit: no signal, no thread, no message.  ``collect(reset=True)`` is one
PAGEMAP_SCAN with ``PM_SCAN_WP_MATCHING``: the kernel reports the pages without the bit
and sets it again under the page-table lock, so no write falls between get and reset.

All trackers of this process share one userfaultfd (the kernel allows one per VMA) and
one written-bit per page; the :class:`~.base.Hub` keeps them independent.
"""

from __future__ import annotations

import errno
import os
from typing import NoReturn

import numpy as np

from .. import _intervals, _native
from ..dirty import DirtyPages
from ..errors import InvalidRange, PagewatchError, TargetGone
from ..kernel._errors import scan_error
from ..kernel.constants import PAGE_SIZE, PageCategory, ScanFlag, UffdFeature
from ..kernel.pagemap import Pagemap, no_progress, scan_written
from ..kernel.uffd import Userfaultfd
from ._memory import busy_error, check_mapped, forget_replaced, replaced_error
from .base import Hub, HubBackend, HubLock, Region, _forks

_WRITTEN = int(PageCategory.WRITTEN)
_RESET = int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)
_GET = int(ScanFlag.CHECK_WPASYNC)
_FEATURES = int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
_collect_runs = _native.collect_runs
_new = object.__new__
# Resetting given runs: one PAGEMAP_SCAN per run (about 2.4 us each, with its TLB flush)
# while there are at most _FEW_RUNS + one per _PAGES_PER_RUN pages of the region, else one
# walk of their span (about 1.2 ns a page; measured on 1 GiB, Linux 6.18).
_FEW_RUNS = 8
_PAGES_PER_RUN = 2048


class _UffdHub(Hub):
    def __init__(self) -> None:
        super().__init__()
        self.uffd: Userfaultfd | None = None
        self.pagemap: Pagemap | None = None

    def open(self) -> tuple[Userfaultfd, Pagemap]:
        if self.uffd is None or self.uffd.closed:
            self.uffd = Userfaultfd(_FEATURES)
            self.pagemap = Pagemap("self")
        assert self.pagemap is not None
        return self.uffd, self.pagemap

    def forget_replaced(self, start: int, end: int) -> None:
        """Members whose pages in ``[start, end)`` are no longer registered (the memory was
        unmapped and new memory mapped there) are gone: they stop holding the addresses."""
        for m in list(self.members):
            lo, hi = max(start, m.region.start), min(end, m.region.end)
            if m.closed or m.gone is not None or lo >= hi:
                continue
            assert isinstance(m, UffdAsync)
            try:
                m._scan(lo, hi, reset=False)
            except TargetGone as exc:
                m._went(exc)

    def after_fork_in_child(self) -> None:
        # The uffd and /proc/self/pagemap fd still point at the parent's memory; the
        # trackers' copies refuse to work (their pid is the parent's).
        self.members.clear()
        self.shared = 0
        self.uffd = None
        self.pagemap = None
        self.lock = HubLock()
        self.pid = os.getpid()
        self._clear_log()


class UffdAsync(HubBackend):
    name = "uffd-async"
    rank = 0
    summary = "userfaultfd async write-protect + PAGEMAP_SCAN get-and-reset (Linux 6.7+)"
    hub = _UffdHub()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from ..kernel.probe import probe_wp_async

        return probe_wp_async()

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        hub = self.hub
        with hub.lock:
            uffd, self._pagemap = hub.open()
            self._fd = self._pagemap.fileno()
            self._uffd = uffd
            # New THPs would make written-state 2 MiB coarse until the first write splits
            # them; the kernel splits the existing ones on write.
            self._split_huge_pages()
            forget_replaced(region.start, region.end)
            covered = hub.covered(self, region.start, region.end)
            fresh = hub.uncovered(self, region.start, region.end)
            done: list[tuple[int, int]] = []
            try:
                for s, e in fresh:
                    try:
                        uffd.register(s, e - s)
                    except PagewatchError as exc:
                        if exc.errno == errno.EBUSY:
                            raise busy_error(self, exc) from exc
                        raise
                    done.append((s, e))
                    # WP_UNPOPULATED: never-touched pages get a marker too.
                    uffd.writeprotect(s, e - s, True)
            except BaseException:
                for s, e in done:
                    try:
                        uffd.unregister(s, e - s)
                    except OSError:
                        pass
                raise
            # Pages another tracker already covers: take their written state into that
            # tracker's pending set before protecting them for us (a reset, for the others).
            for s, e in covered:
                got = self._scan(s, e, reset=True)
                hub.harvest(self, got)
            self._join()

    def _scan(self, start: int, end: int, reset: bool, max_pages: int = 0) -> np.ndarray:
        """Written page runs of ``[start, end)``, as page indices of the region."""
        try:
            return scan_written(self._fd, start, end, self._base, reset, max_pages)
        except InvalidRange as exc:
            self._scan_failed(exc)

    def _scan_failed(self, exc: PagewatchError) -> NoReturn:
        """Raise what a failed scan means.  A page no longer registered with our
        userfaultfd (``EPERM``) is memory that was unmapped and mapped anew: the
        registration is the mapping's identity."""
        if isinstance(exc, InvalidRange) and exc.errno == errno.EPERM:
            check_mapped(self.region)
            raise replaced_error(self.region, "it is not registered with pagewatch's "
                                 "userfaultfd any more", exc.errno) from exc
        raise exc

    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        """The pages written since the last reset (see :meth:`.base.Backend.collect`)."""
        # The usual case in one frame (its fixed cost is what a small region pays): a whole
        # collect by an open tracker of this process with nothing pending.  A lone tracker
        # takes no lock: it checks instead that nobody held the hub's lock before its scan
        # and nobody took it since (every reset by another tracker happens under it, see
        # HubLock); when someone did, it takes the lock and adds what the log holds for it.
        # Everything else (and every failure) takes the template's general path.
        if (max_pages is None and (reset is True or reset is False) and not self.closed
                and self.gone is None and _forks.count == self._forks):
            hub = self.hub
            lock = hub.lock
            gen = lock.gen
            if (not lock.busy and hub.shared <= 1 and self._cursor == hub.seq
                    and not len(self._pending)):
                try:
                    runs = _collect_runs(self._fd, self._base, self._end,
                                         _RESET if reset else _GET, _WRITTEN)
                except OSError as exc:
                    self._fast_failed(exc, reset)
                if lock.gen != gen:
                    return self._raced(runs, reset)
            else:
                with lock:
                    if self._cursor != hub.seq or len(self._pending):
                        return super().collect(reset, max_pages)
                    try:
                        runs = _collect_runs(self._fd, self._base, self._end,
                                             _RESET if reset else _GET, _WRITTEN)
                    except OSError as exc:
                        self._fast_failed(exc, reset)
                    if reset and len(runs) and hub.shared > 1:
                        hub.harvest(self, runs)
            # inline, not _result(): one call less on the path a small region pays for
            d: DirtyPages = _new(DirtyPages)
            d._runs = runs
            d.base = self._base
            d.npages = self._npages
            d.page_size = PAGE_SIZE
            return d
        return super().collect(reset, max_pages)

    def copy_back(self, src: int, lo: int, hi: int) -> DirtyPages | None:
        """Snapshot's copy-back restore in one step, for a tracker with nothing pending: the
        written pages (a get), their bytes in ``[lo, hi)`` of the region copied back from
        ``src + offset``, then those pages, only those, protected again (a page written
        meanwhile elsewhere stays pending) and, as any reset, logged for the other trackers
        that cover them.  None when pages another tracker reset wait for this one, or the
        get fails: the caller then takes the general way (``collect``, copy, ``reset``),
        which reports them or says what went wrong.  Same work as the general way, without
        its steps' fixed costs (~0.1 ms: a fifth of a restore of 0.1 % of 1 GiB)."""
        if self.closed or self.gone is not None or _forks.count != self._forks:
            return None
        hub = self.hub
        with hub.lock:
            # Other trackers' resets elsewhere in the process move the log on: take it in
            # (what is for this region becomes pending) rather than refuse on a lagging cursor.
            self._take_log()
            if len(self._pending):
                return None
            try:
                runs = _collect_runs(self._fd, self._base, self._end, _GET, _WRITTEN)
            except OSError:
                return None  # nothing was changed: the general way raises what it means
            if len(runs):
                _native.copy_runs(self._base, src, runs, lo, hi)
                try:
                    hub.harvest(self, self._reset_runs(runs))
                except TargetGone as exc:
                    self._went(exc)
                    raise
        return self._result(runs)

    def _raced(self, runs: np.ndarray, reset: bool) -> DirtyPages:
        """The lock-free collect's scan ran while another tracker held the hub's lock: what
        that one reset of our pages is in the log once it lets go; add it."""
        hub = self.hub
        with hub.lock:
            pending = self._pending_runs()
            if reset:
                hub.harvest(self, runs)  # what we reset is pending for whoever joined
                self._clear_pending()
        if len(pending):
            runs = _intervals.normalise(np.concatenate([runs, pending]))
        return self._result(runs)

    def _fast_failed(self, exc: OSError, reset: bool) -> NoReturn:
        """What the fast path's failed native call means, raised as the template would."""
        try:
            self._get_failed(exc, _RESET if reset else _GET)
        except TargetGone as gone:
            self._went(gone)
            raise

    def _get_failed(self, exc: OSError, flags: int) -> NoReturn:
        if exc.filename == "msync(2)":
            check_mapped(self.region)  # the TargetGone that says what went
        if exc.filename == "PAGEMAP_SCAN" and exc.errno == errno.EAGAIN:
            raise no_progress(exc.filename2, self._base, self._end) from None
        self._scan_failed(scan_error(exc, self._base, self._end, flags))

    def _get(self, reset: bool) -> np.ndarray:
        flags = _RESET if reset else _GET
        try:  # checked mapped and scanned in one native call
            return _collect_runs(self._fd, self._base, self._end, flags, _WRITTEN)
        except OSError as exc:
            self._get_failed(exc, flags)

    def _reset_runs(self, runs: np.ndarray) -> np.ndarray:
        if not len(runs):
            return _intervals.EMPTY
        base, ps = self._base, PAGE_SIZE
        if len(runs) > _FEW_RUNS + self._npages // _PAGES_PER_RUN:
            # Many runs: one walk over their span costs less than an ioctl (and a TLB flush)
            # per run.  What it resets beyond them was written too: it stays pending.
            got = self._scan(base + int(runs[0, 0]) * ps, base + int(runs[-1, 1]) * ps,
                             reset=True)
            if not (len(got) == len(runs) and np.array_equal(got, runs)):  # else: nothing
                self._add_pending(_intervals.subtract(got, runs))
            return got
        # Few: one ioctl per run, in one native loop; nothing else is touched.
        ranges = np.ascontiguousarray(runs * ps + base, dtype=np.int64)
        regions, owner, errors = _native.pagemap_scan_ranges(self._fd, ranges, _RESET,
                                                             _WRITTEN, 0, 0, _WRITTEN)
        got = (regions[:, :2].astype(np.int64) - base) // ps
        if errors.any():
            # The others were scanned (and reset); a failed one again alone, which raises
            # what went wrong (or, if it passes now, gives its pages).
            failed = np.flatnonzero(errors)
            again = [self._scan(base + int(runs[i, 0]) * ps, base + int(runs[i, 1]) * ps,
                                reset=True) for i in failed]
            got = np.concatenate([got[~np.isin(owner, failed)], *again])
        return _intervals.normalise(got)

    def _collect_some(self, max_pages: int):  # type: ignore[no-untyped-def]
        if not self.has_pending:
            # The kernel's own max_pages: exact, and it protects only what it reports.
            self._check_alive()
            if not max_pages:  # nothing to take; still, raise if the memory was replaced
                self._scan(self.region.start, self.region.start + PAGE_SIZE, False, 1)
            got = self._scan(self.region.start, self.region.end, True, max_pages) if max_pages \
                else np.empty((0, 2), np.int64)
            self.hub.harvest(self, got)
            return self._result(got)
        return super()._collect_some(max_pages)

    def _check_alive(self) -> None:
        check_mapped(self.region)

    def _release(self) -> None:
        hub = self.hub
        with hub.lock:
            joined = self in hub.members
            self._leave()
            # A tracker whose __init__ failed (EBUSY: the pages belong to a uffd-sync tracker)
            # undid what it registered itself.  Unregistering its range again would, on some
            # kernels (6.12: not 6.18), unregister the other userfaultfd's pages.
            if not joined or os.getpid() != self.pid:
                return
            for s, e in hub.uncovered(self, self.region.start, self.region.end):
                try:
                    self._uffd.unregister(s, e - s)
                except OSError:
                    pass  # unmapped meanwhile: nothing left to unregister


os.register_at_fork(after_in_child=UffdAsync.hub.after_fork_in_child)

BACKEND = UffdAsync
