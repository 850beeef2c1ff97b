"""The Backend interface, the registry of backends and the ``auto`` choice.

A backend tracks writes to one :class:`Region` of this process's memory.  Every backend:

* starts clean: after ``__init__`` nothing is reported until something is written;
* ``collect(reset=True)`` is get-and-reset with at-least-once reporting: a page written
  during a collect shows up in that collect or the next, never in neither;
* with ``max_pages=N`` returns the first N written pages (address order) and resets only
  those;
* never disturbs another tracker of the same process, whatever its range (invariant 2).

Backends that share one kernel bit per page (``uffd-async``: the uffd-wp bit;
``soft-dirty``: the soft-dirty bit, reset process-wide) keep that promise through a
:class:`Hub`: whenever a tracker resets pages, what it reset is first added to the pending
set of every other tracker that covers them.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
import threading
import weakref
from typing import ClassVar

import numpy as np

from ..dirty import DirtyPages
from ..errors import Unsupported
from ..kernel.constants import PAGE_SIZE

__all__ = [
    "Region", "Backend", "Hub", "HubBackend", "BACKENDS", "backend_class", "backends",
    "choose", "BackendInfo",
]


@dataclasses.dataclass(frozen=True)
class Region:
    """A range of this process's memory, ``[address, address + size)``, tracked at the
    pages that cover it: ``[start, end)``, page-aligned."""

    address: int
    size: int

    @property
    def start(self) -> int:
        return self.address - self.address % PAGE_SIZE

    @property
    def end(self) -> int:
        return -(-(self.address + self.size) // PAGE_SIZE) * PAGE_SIZE

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.length // PAGE_SIZE


class Backend(abc.ABC):
    """One way of tracking writes to a :class:`Region` (see the module docstring)."""

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

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend works in this process on this kernel, and why (not)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything written so far."""

    @abc.abstractmethod
    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        """The pages written since the last reset (see the module docstring)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop tracking; the memory is left as it was (writable, unprotected)."""

    def _empty(self) -> DirtyPages:
        return DirtyPages.empty(self.region.start, self.region.npages)

    def _result(self, runs: np.ndarray) -> DirtyPages:
        """DirtyPages from runs of page indices of this region, sorted and disjoint (as
        PAGEMAP_SCAN returns them)."""
        return DirtyPages(runs, self.region.start, self.region.npages, normalised=True)


class Hub:
    """State shared by every tracker of one backend in this process.

    ``lock`` serialises get-and-reset; ``members`` are the live trackers, each with a
    ``pending`` bitmap of pages another tracker reset before this one saw them.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.members: weakref.WeakSet[HubBackend] = weakref.WeakSet()
        self.pid = os.getpid()

    def harvest(self, source: HubBackend, runs: np.ndarray) -> None:
        """Add ``runs`` (page runs of ``source``'s region, just reset by it) to the pending
        set of every other member that covers them.  Call with ``lock`` held."""
        if not len(runs) or (len(self.members) == 1 and source in self.members):
            return  # nobody else to tell (iterating a WeakSet costs ~20 us per collect)
        runs = runs * PAGE_SIZE + source.region.start  # addresses: the members' bases differ
        for m in list(self.members):
            if m is source or m.closed:
                continue
            m._add_pending(runs)


class HubBackend(Backend):
    """A backend over a per-page kernel bit shared by the whole process.

    Subclasses provide ``_get(reset)`` (written runs of the own region, atomically reset
    when asked) and ``_reset_runs(runs)`` (reset exactly those runs, returning what was
    written in them), both in ``int64 (n, 2)`` runs of ``[first, end)`` page indices of the
    own region, sorted and disjoint.
    """

    hub: ClassVar[Hub]

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self.pending = np.zeros(region.npages, dtype=bool)
        self.has_pending = False  # spares a scan of the bitmap on every collect

    def _join(self) -> None:
        self.hub.members.add(self)

    def _leave(self) -> None:
        self.hub.members.discard(self)

    def _add_pending(self, runs: np.ndarray) -> None:
        """Mark the pages of ``runs`` (absolute address runs) pending."""
        lo = np.clip((runs[:, 0] - self.region.start) // PAGE_SIZE, 0, self.region.npages)
        hi = np.clip((runs[:, 1] - self.region.start + PAGE_SIZE - 1) // PAGE_SIZE, 0,
                     self.region.npages)
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            if a < b:
                self.pending[a:b] = True
                self.has_pending = True

    def _pending_pages(self) -> DirtyPages:
        if not self.has_pending:
            return self._empty()
        return DirtyPages.from_bitmap(self.pending, self.region.start)

    def _clear_pending(self) -> None:
        if self.has_pending:
            self.pending[:] = False
            self.has_pending = False

    @abc.abstractmethod
    def _get(self, reset: bool) -> np.ndarray: ...

    @abc.abstractmethod
    def _reset_runs(self, runs: np.ndarray) -> np.ndarray: ...

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"this {self.name} tracker is closed")

    def reset(self) -> None:
        self._check_open()
        with self.hub.lock:
            self.hub.harvest(self, self._get(reset=True))
            self._clear_pending()

    def collect(self, reset: bool = True, max_pages: int | None = None) -> DirtyPages:
        self._check_open()
        if max_pages is not None and max_pages < 0:
            raise ValueError(f"max_pages must be >= 0, not {max_pages}")
        with self.hub.lock:
            if max_pages is None or not reset:
                got = self._get(reset)
                if reset:
                    self.hub.harvest(self, got)
                result = self._result(got)
                if self.has_pending:  # only after another tracker reset pages we cover
                    result = result | self._pending_pages()
                if reset:
                    self._clear_pending()
            else:
                result = self._collect_some(max_pages)
        if max_pages is not None and not reset:
            result = _first_pages(result, max_pages)
        return result

    def _collect_some(self, max_pages: int) -> DirtyPages:
        """The first ``max_pages`` written pages, resetting only those."""
        everything = self._result(self._get(reset=False)) | self._pending_pages()
        chosen = _first_pages(everything, max_pages)
        if len(chosen):
            self.hub.harvest(self, self._reset_runs(chosen.runs))
            self.pending[chosen.bitmap()] = False
            self.has_pending = bool(self.pending.any())
        return chosen


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
