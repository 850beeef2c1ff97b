"""The Backend interface, the registry of backends and the ``auto`` choice.

A backend tracks writes to one :class:`Region` of this process's memory.  Every backend:

* starts clean: after ``__init__`` nothing is reported until something is written;
* ``collect(reset=True)`` is get-and-reset with at-least-once reporting: a page written
  during a collect shows up in that collect or the next, never in neither;
* with ``max_pages=N`` returns the first N written pages (address order) and resets only
  those;
* ``reset(runs)`` forgets the writes to those pages only: writes elsewhere stay reported
  (a backend whose kernel state resets the whole region at once keeps the others itself);
* never disturbs another tracker of the same process, whatever its range (invariant 2).

Backends that share one kernel bit per page (``uffd-async``: the uffd-wp bit;
``soft-dirty``: the soft-dirty bit, reset process-wide) keep that promise through a
:class:`Hub`: whenever a tracker resets pages, what it reset becomes pending for every
other tracker that covers them (one shared log, taken in by each when it collects).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import operator
import os
import threading
import weakref
from typing import Any, ClassVar

import numpy as np

from .. import _intervals
from .._lifecycle import Closeable
from .._region import Region
from ..dirty import DirtyPages, dirty_pages_of
from ..errors import PagewatchError, TargetGone, Unsupported
from ..kernel.constants import PAGE_SIZE
from ..rangeset import RangeSet
from ._memory import HugePageAdvice

__all__ = [
    "Region", "Backend", "Hub", "HubLock", "HubBackend", "BACKENDS", "backend_class", "backends",
    "choose", "BackendInfo",
]


class _Forks:
    """How many fork()s lie between the first process and this one (0 in the first): a
    tracker made in another generation is a parent's copy.  Counted by Python's at-fork
    hook, which ``os.fork()`` and ``multiprocessing`` run (so do the hubs' own)."""

    count = 0

    @classmethod
    def bump(cls) -> None:
        cls.count += 1


_forks = _Forks
os.register_at_fork(after_in_child=_Forks.bump)


class Backend(Closeable, abc.ABC):
    """One way of tracking writes to a :class:`Region` (see the module docstring).

    The public methods are templates: :meth:`collect` and :meth:`reset` check, in one place,
    that the tracker is open, belongs to this process (not a fork child's copy) and its
    memory is still there, validate ``max_pages``, then call the backend's ``_collect`` /
    ``_reset``; :meth:`close` runs ``_close`` once and gives back the huge-page advice.
    """

    #: the name users pass as ``backend=``
    name: ClassVar[str]
    #: best first: ``auto`` takes the available backend with the lowest rank
    rank: ClassVar[int]
    #: one line on how it works, for ``pagewatch backends`` and the docs
    summary: ClassVar[str] = ""

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        self.region = region
        self.huge_pages = huge_pages
        self.closed = False
        self.pid = os.getpid()
        self._forks = _forks.count
        #: the TargetGone this tracker met: raised again by every later collect
        self.gone: TargetGone | None = None
        self._advice: HugePageAdvice | None = None
        #: written pages a ``reset(runs)`` reset beyond ``runs`` (page runs, normalised):
        #: reported by the next collect (see ``_reset_pages``)
        self._kept: np.ndarray | None = None

    def _split_huge_pages(self) -> None:
        """``huge_pages="split"``: keep transparent huge pages off the region until close."""
        if self.huge_pages == "split" and self._advice is None:
            self._advice = HugePageAdvice(self.region)

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend works in this process on this kernel, and why (not)."""

    # ---- the templates ----------------------------------------------------------------

    def check_usable(self) -> None:
        """Raise unless this tracker can collect: open, this process's, memory not gone."""
        if self.closed:
            raise ValueError(f"this {self.name} tracker is closed")
        if _forks.count != self._forks:  # os.getpid() here: a syscall every collect
            raise PagewatchError("this tracker belongs to the parent process: after fork() "
                                 "the child must create its own tracker")
        if self.gone is not None:
            raise TargetGone(self.gone.message, self.gone.errno)

    def limit(self, max_pages: object) -> int | None:
        """``max_pages`` validated: ``None`` (every page) or an int in ``[0, npages)``."""
        if max_pages is None:
            return None
        if isinstance(max_pages, bool):
            raise TypeError("max_pages must be an integer or None, not a bool")
        try:
            n = operator.index(max_pages)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("max_pages must be an integer or None, not "
                            f"{type(max_pages).__name__}") from None
        if n < 0:
            raise ValueError(f"max_pages must be >= 0, not {n}")
        return None if n >= self.region.npages else n  # more than there are: all of them

    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        """The pages written since the last reset (see the module docstring)."""
        # The checks inlined for the usual case (each step is paid on every collect).
        limit = None if max_pages is None else self.limit(max_pages)
        if self.closed or _forks.count != self._forks or self.gone is not None:
            self.check_usable()
        try:
            if self._kept is None:
                return self._collect(reset is True or bool(reset), limit)
            return self._collect_kept(bool(reset), limit)
        except TargetGone as exc:
            self._went(exc)
            raise

    def reset(self, runs: np.ndarray | None = None) -> None:
        """Forget everything written so far; with ``runs`` (normalised page runs of the
        region), only what was written to those pages."""
        self.check_usable()
        try:
            if runs is None:
                self._reset()
                self._kept = None
            elif len(runs):
                self._reset_pages(runs)
        except TargetGone as exc:
            self._went(exc)
            raise

    def _reset_pages(self, runs: np.ndarray) -> None:
        """``reset(runs)``.  Here for backends whose state resets the whole region at once:
        reset it all and keep what was written outside ``runs`` for the next collect."""
        got = self._collect(True, None).runs
        if self._kept is not None:
            got = _intervals.normalise(np.concatenate([got, self._kept]))
        rest = _intervals.subtract(got, runs)
        self._kept = rest if len(rest) else None

    def _collect_kept(self, reset: bool, max_pages: int | None) -> DirtyPages:
        """``collect`` when a ``reset(runs)`` left pages to report."""
        assert self._kept is not None
        got = self._collect(reset, None).runs
        everything = self._result(_intervals.normalise(np.concatenate([got, self._kept])))
        chosen = everything if max_pages is None else _first_pages(everything, max_pages)
        if reset:
            rest = _intervals.subtract(everything.runs, chosen.runs)
            self._kept = rest if len(rest) else None
        return chosen

    def _went(self, exc: TargetGone) -> None:
        """The memory went away: remember it, and stop watching its addresses, which a new
        mapping may take (a new tracker there must not find them held)."""
        if self.gone is None:
            self.gone = exc
            try:
                self._release()
            except OSError:
                pass

    def close(self) -> None:
        """Stop tracking; the memory is left as it was (writable, unprotected, its huge-page
        advice given back)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.gone is None:
                self._release()
        finally:
            self._restore_advice()

    def _restore_advice(self) -> None:
        if self._advice is not None and os.getpid() == self.pid:
            self._advice.restore()
        self._advice = None

    @abc.abstractmethod
    def _collect(self, reset: bool, max_pages: int | None) -> DirtyPages:
        """``collect`` once checked; ``max_pages`` is ``None`` or below the page count."""

    def _reset(self) -> None:
        self._collect(True, None)

    @abc.abstractmethod
    def _release(self) -> None:
        """Stop watching (called once, by ``close`` or on ``TargetGone``; also in a fork
        child, where it must not disturb the parent)."""

    def _empty(self) -> DirtyPages:
        return DirtyPages.empty(self.region.start, self.region.npages)

    def _result(self, runs: np.ndarray) -> DirtyPages:
        """DirtyPages from runs of page indices of this region, normalised (as
        PAGEMAP_SCAN returns them)."""
        return dirty_pages_of(runs, self.region.start, self.region.npages)


class HubLock:
    """The hub's reentrant lock, which also says when someone holds it (``busy``: the
    holds not yet released) and how often it was taken (``gen``).

    Every reset of tracked pages (get-and-reset of a collect, a tracker's set-up taking over
    pages another one covers) happens while holding it, and ``gen`` moves *before* the
    holder resets anything.  So a lock-free reader (the lone tracker's collect) that saw
    ``busy == 0`` before its own scan and the same ``gen`` after it knows that nobody reset
    pages under it meanwhile, and that the log held everything reset before.
    """

    __slots__ = ("_lock", "busy", "gen")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.busy = 0
        self.gen = 0

    def __enter__(self) -> HubLock:
        self._lock.acquire()
        self.busy += 1
        self.gen += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy -= 1
        self._lock.release()


class Hub:
    """State shared by every tracker of one backend in this process.

    ``lock`` serialises get-and-reset; ``members`` are the live trackers.

    What one tracker resets, the others must still report: the **pending log**.  Each
    reset appends its runs (absolute page numbers) once, as one numpy array, whatever the
    number of trackers; each member keeps a cursor (the log position it has taken in) and
    takes what lies past it, clipped to its region, only when it collects.  A member's own
    resets are never reported back to it: it takes the log in before it appends, and its
    cursor then moves past its entry.  Every ``COMPACT_EVERY`` appends the log drops what
    every member has taken and merges the entries no cursor separates (one union per span),
    so its length stays bounded by the number of distinct cursors, and an idle member's
    backlog is one array, not one per collect of the others.
    """

    #: compact the log after this many appends
    COMPACT_EVERY = 16

    def __init__(self) -> None:
        self.lock = HubLock()
        #: the live trackers (HubBackends, but for uffd-sync's hub, which shares only the
        #: lock, the members and what they cover)
        self.members: weakref.WeakSet[Any] = weakref.WeakSet()
        #: ``len(members)`` as of the last join or leave: never below it (a member that dies
        #: without leaving only leaves it high), so ``shared <= 1`` means no other member.
        #: The collect path reads it instead of the WeakSet's ``len`` (a Python call).
        self.shared = 0
        self.pid = os.getpid()
        self._clear_log()

    def _clear_log(self) -> None:
        #: sequence number of the last entry appended
        self.seq = 0
        #: entries, oldest first: the sequence number of their last append, and their runs
        #: of absolute page numbers (normalised) with the bounds of those runs
        self.log: list[tuple[int, int, int, np.ndarray]] = []
        self._appended = 0

    def harvest(self, source: HubBackend, runs: np.ndarray) -> None:
        """``runs`` (page runs of ``source``'s region, just reset by it) are pending for
        every other member that covers them.  Call with ``lock`` held."""
        source._take_log()
        if len(runs) and not (len(self.members) == 1 and source in self.members):
            absolute = runs + source._first_page
            self.seq += 1
            self.log.append((self.seq, int(absolute[0, 0]), int(absolute[-1, 1]), absolute))
            self._appended += 1
            if self._appended >= self.COMPACT_EVERY:
                self._compact()
        source._cursor = self.seq

    def _compact(self) -> None:
        self._appended = 0
        cursors = {m._cursor for m in list(self.members) if not m.closed and m._cursor >= 0}
        low = min(cursors, default=self.seq)
        out: list[tuple[int, int, int, np.ndarray]] = []
        group: list[tuple[int, int, int, np.ndarray]] = []
        for entry in self.log:
            if entry[0] <= low:
                continue  # every member has taken it in
            group.append(entry)
            if entry[0] in cursors:  # a member's cursor sits after this entry: a boundary
                out.append(_merged(group))
                group = []
        if group:
            out.append(_merged(group))
        self.log = out

    def pending_for(self, member: HubBackend) -> list[np.ndarray]:
        """The log entries past ``member``'s cursor, clipped to its pages (absolute page
        numbers).  Call with ``lock`` held."""
        lo, hi, cursor = member._first_page, member._end_page, member._cursor
        out = []
        for seq, first, last, runs in reversed(self.log):
            if seq <= cursor:
                break
            if first < hi and last > lo:
                part = _intervals.clip(runs, lo, hi)
                if len(part):
                    out.append(part)
        return out

    def others(self, exclude: Backend) -> RangeSet:
        """The addresses the live members other than ``exclude`` track."""
        return RangeSet((m.region.start, m.region.end) for m in list(self.members)
                        if m is not exclude and not m.closed and m.gone is None)

    def covered(self, exclude: Backend, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` another live member covers."""
        return self.others(exclude).within(start, end)

    def uncovered(self, exclude: Backend, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` no other live member covers."""
        return self.others(exclude).missing(start, end)


def _merged(group: list[tuple[int, int, int, np.ndarray]]) -> tuple[int, int, int, np.ndarray]:
    if len(group) == 1:
        return group[0]
    runs = _intervals.normalise(np.concatenate([g[3] for g in group]))
    return group[-1][0], int(runs[0, 0]), int(runs[-1, 1]), runs


class HubBackend(Backend):
    """A backend over a per-page kernel bit shared by the whole process.

    Subclasses provide ``_get(reset)`` (written runs of the own region, atomically reset
    when asked) and ``_reset_runs(runs)`` (reset those runs, returning what it reset: the
    written pages in them, and any written page beyond them that it reset too, which it
    makes pending for itself), both in ``int64 (n, 2)`` runs of ``[first, end)`` page indices of the
    own region, sorted and disjoint.

    Pending pages (reset by another tracker before this one saw them) are the hub's log
    past ``_cursor`` and ``_pending``, runs of this region's pages taken in from it.
    """

    hub: ClassVar[Hub]

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self._base = region.start
        self._end = region.end
        self._npages = region.npages
        self._first_page = self._base // PAGE_SIZE
        self._end_page = self._end // PAGE_SIZE
        self._pending: np.ndarray = _intervals.EMPTY
        self._cursor = -1  # not a member yet: nothing in the log is for it

    def _join(self) -> None:
        if self._cursor < 0:
            self._cursor = self.hub.seq
        self.hub.members.add(self)
        self.hub.shared = len(self.hub.members)

    def _leave(self) -> None:
        self.hub.members.discard(self)
        self.hub.shared = len(self.hub.members)

    def _take_log(self) -> None:
        """Move the log entries past this member's cursor into ``_pending``."""
        hub = self.hub
        if self._cursor < 0 or self._cursor == hub.seq:
            return
        parts = hub.pending_for(self)
        self._cursor = hub.seq
        if parts:
            parts = [p - self._first_page for p in parts]
            if len(self._pending):
                parts.append(self._pending)
            self._pending = _intervals.normalise(np.concatenate(parts))

    def _add_pending(self, runs: np.ndarray) -> None:
        """Make ``runs`` (page runs of this region) pending."""
        if len(runs):
            self._pending = _intervals.normalise(np.concatenate([self._pending, runs]))

    @property
    def has_pending(self) -> bool:
        """Whether pages another tracker reset wait to be reported by this one."""
        self._take_log()
        return bool(len(self._pending))

    def _pending_runs(self) -> np.ndarray:
        self._take_log()
        return self._pending

    def _clear_pending(self) -> None:
        self._pending = _intervals.EMPTY

    @abc.abstractmethod
    def _get(self, reset: bool) -> np.ndarray: ...

    @abc.abstractmethod
    def _reset_runs(self, runs: np.ndarray) -> np.ndarray: ...

    def _reset(self) -> None:
        with self.hub.lock:
            self.hub.harvest(self, self._get(reset=True))
            self._clear_pending()

    def _reset_pages(self, runs: np.ndarray) -> None:
        with self.hub.lock:
            self.hub.harvest(self, self._reset_runs(runs))
            self._pending = _intervals.subtract(self._pending_runs(), runs)

    def _collect(self, reset: bool, max_pages: int | None) -> DirtyPages:
        hub = self.hub
        if max_pages is None:
            # The common case, kept short (its fixed cost is what a small region pays):
            # nothing pending, so the result is the get itself.
            with hub.lock:
                got = self._get(reset)
                if self._cursor == hub.seq and not len(self._pending):
                    if reset and len(got) and hub.shared > 1:
                        hub.harvest(self, got)
                    return dirty_pages_of(got, self._base, self._npages)
                pending = self._pending_runs()
                if reset:
                    hub.harvest(self, got)
                    self._pending = _intervals.EMPTY
                return self._result(_intervals.normalise(np.concatenate([got, pending])))
        with hub.lock:
            if not reset:
                got = self._get(reset)
                pending = self._pending_runs()
                if reset:
                    self.hub.harvest(self, got)
                    self._pending = _intervals.EMPTY
                if len(pending):  # only after another tracker reset pages we cover
                    got = _intervals.normalise(np.concatenate([got, pending]))
                result = self._result(got)
            else:
                result = self._collect_some(max_pages)
        if max_pages is not None and not reset:
            result = _first_pages(result, max_pages)
        return result

    def _collect_some(self, max_pages: int) -> DirtyPages:
        """The first ``max_pages`` written pages, resetting only those."""
        everything = _intervals.normalise(np.concatenate([self._get(reset=False),
                                                          self._pending_runs()]))
        chosen = _intervals.take_first(everything, max_pages)
        if len(chosen):
            self.hub.harvest(self, self._reset_runs(chosen))
            self._pending = _intervals.subtract(self._pending, chosen)
        return self._result(chosen)


def _first_pages(d: DirtyPages, n: int) -> DirtyPages:
    if len(d) <= n:
        return d
    return DirtyPages.from_pages(d.pages()[:n], d.base, d.npages, d.page_size)


# ---- registry ------------------------------------------------------------------------

#: name -> module defining it (imported on first use, so a broken one cannot break others)
BACKENDS: dict[str, str] = {
    "uffd-async": "uffd_async",
    "soft-dirty": "soft_dirty",
    "uffd-sync": "uffd_sync",
    "mprotect": "mprotect",
    "compare": "compare",
}


def backend_class(name: str) -> type[Backend]:
    """The class of the backend called ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of "
                         f"{', '.join(BACKENDS)} or 'auto'")
    mod = importlib.import_module(f"{__package__}.{BACKENDS[name]}")
    cls: type[Backend] = mod.BACKEND
    return cls


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str
    rank: int
    summary: str


def backends() -> list[BackendInfo]:
    """Every backend, best first, with whether it works here and why (not)."""
    out = []
    for name in BACKENDS:
        try:
            cls = backend_class(name)
            ok, why = cls.available()
            out.append(BackendInfo(name, ok, why, cls.rank, cls.summary))
        except (ImportError, AttributeError) as exc:
            out.append(BackendInfo(name, False, f"not built: {exc}", 99, ""))
    return sorted(out, key=lambda b: b.rank)


def choose(name: str = "auto") -> tuple[type[Backend], str]:
    """The backend class for ``name`` (``auto``: the best available) and why it was taken.

    The environment variable ``PAGEWATCH_BACKEND`` overrides ``auto``.
    """
    env = os.environ.get("PAGEWATCH_BACKEND")
    if name == "auto" and env:
        cls = backend_class(env)
        ok, why = cls.available()
        if not ok:
            raise Unsupported(f"backend {env!r} (from PAGEWATCH_BACKEND)", why)
        return cls, f"PAGEWATCH_BACKEND={env}: {why}"
    if name != "auto":
        try:
            cls = backend_class(name)
        except ImportError as exc:
            raise Unsupported(f"backend {name!r}", f"not built: {exc}") from exc
        ok, why = cls.available()
        if not ok:
            alts = [b.name for b in backends() if b.available]
            raise Unsupported(f"backend {name!r}", why,
                              f"Available here: {', '.join(alts) or 'none'}")
        return cls, f"asked for: {why}"
    skipped: list[str] = []
    for info in backends():
        if info.available:
            reason = f"best available: {info.reason}"
            if skipped:
                reason += " (not " + "; not ".join(skipped) + ")"
            return backend_class(info.name), reason
        skipped.append(f"{info.name}: {info.reason}")
    raise Unsupported("write tracking", "no backend works here: " + "; ".join(skipped))
