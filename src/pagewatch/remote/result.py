"""What a collect of another process returns: :class:`ProcessDirty`, and what it names
(:class:`SkippedMapping`, :class:`TargetExec`)."""

from __future__ import annotations

import bisect
import collections.abc
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _intervals
from ..dirty import DirtyPages
from ..errors import TargetGone
from ..kernel.constants import PAGE_SIZE
from ..kernel.maps import Mapping

__all__ = ["ProcessDirty", "SkippedMapping", "TargetExec"]

_EMPTY_RUNS = np.empty((0, 2), np.int64)


class TargetExec(TargetGone):
    """The process executed a new program: the memory that was tracked is gone.

    Create a new :class:`ProcessTracker` to track the new program.
    """

    __module__ = "pagewatch"


@dataclasses.dataclass(frozen=True)
class SkippedMapping:
    """A mapping that could not be tracked, and why."""

    mapping: Mapping
    reason: str
    errno: int | None = None

    def __str__(self) -> str:
        m = self.mapping
        return f"{m.start:#x}-{m.end:#x} {m.perms} {m.path or '(anonymous)'}: {self.reason}"


class _Layout:
    """Mappings in address order, with their bounds as lists and arrays (kept while the
    target's maps do not change, so a collect does not rebuild them)."""

    __slots__ = ("mappings", "starts", "start_array", "end_array")

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = mappings
        self.starts = [m.start for m in mappings]
        self.start_array = np.array(self.starts, np.int64)
        self.end_array = np.array([m.end for m in mappings], np.int64)


class ProcessDirty(collections.abc.Mapping[Mapping, DirtyPages]):
    """What one collect found: for each tracked mapping, the pages written.

    A read-only mapping ``Mapping -> DirtyPages`` (each ``DirtyPages`` has ``base`` = the
    mapping's start and covers the whole mapping) with the totals and the context.  The
    runs of all mappings are held in one array; a mapping's ``DirtyPages`` is made when
    asked for, so a collect of tens of thousands of mappings costs no object per mapping.

    Attributes
    ----------
    pid
        The process.
    time
        ``time.monotonic()`` when the collect ended.
    elapsed
        Seconds since the previous reset (or the attach).
    new
        Mappings seen for the first time at this collect; they are reported whole (every page
        that holds data of its own), as nothing tells what was written before.
    skipped
        Mappings that could not be tracked, with the reason.
    backend
        ``"uffd-async"`` or ``"soft-dirty"``.
    stop_ms
        How long this collect stopped the target, in milliseconds (``soft-dirty`` with a
        reset: every thread, from the first interrupt to the last detach); None when it did
        not stop it.
    """

    def __init__(self, pid: int, entries: dict[Mapping, DirtyPages] | None = None, *,
                 time: float, elapsed: float, new: frozenset[Mapping] = frozenset(),
                 skipped: tuple[SkippedMapping, ...] = (), backend: str = "",
                 mappings: list[Mapping] | _Layout | None = None,
                 runs: np.ndarray | None = None) -> None:
        self.pid = pid
        self.time = time
        self.elapsed = elapsed
        self.new = new
        self.skipped = skipped
        self.backend = backend
        self.stop_ms: float | None = None
        if entries is not None:
            mappings = sorted(entries, key=lambda m: m.start)
            parts = [np.asarray(entries[m].runs) * PAGE_SIZE + m.start for m in mappings]
            runs = np.concatenate(parts) if parts else _EMPTY_RUNS
        if not isinstance(mappings, _Layout):
            mappings = _Layout(mappings or [])
        self._set(mappings, _EMPTY_RUNS if runs is None else runs)

    def _set(self, layout: _Layout, runs: np.ndarray) -> None:
        """Hold ``runs`` (absolute ``[start, end)`` addresses, any order, overlapping or not)
        cut at the mappings' bounds, as page indices from each mapping's start."""
        self._maps = layout.mappings  # in address order, disjoint
        self._starts = layout.starts
        self._cache: dict[int, DirtyPages] = {}
        nm = len(self._maps)
        mstart, mend = layout.start_array, layout.end_array
        merged = _intervals.normalise(runs)
        # Each merged run is cut into one piece per mapping it overlaps.
        first = np.searchsorted(mend, merged[:, 0], side="right")
        last = np.searchsorted(mstart, merged[:, 1], side="left")
        count = np.maximum(last - first, 0)
        which = np.repeat(np.arange(len(merged)), count)
        owner = np.repeat(first, count) + (
            np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count))
        lo = np.maximum(merged[which, 0], mstart[owner]) - mstart[owner]
        hi = np.minimum(merged[which, 1], mend[owner]) - mstart[owner]
        self._lo = lo // PAGE_SIZE
        self._hi = (hi + PAGE_SIZE - 1) // PAGE_SIZE
        self._bounds = np.searchsorted(owner, np.arange(nm + 1), side="left")
        self._pages = int((self._hi - self._lo).sum())

    def _at(self, i: int) -> DirtyPages:
        d = self._cache.get(i)
        if d is None:
            m = self._maps[i]
            a, b = self._bounds[i], self._bounds[i + 1]
            runs = np.stack([self._lo[a:b], self._hi[a:b]], axis=1)
            d = DirtyPages(runs, m.start, (m.end - m.start) // PAGE_SIZE, normalised=True)
            self._cache[i] = d
        return d

    def _index(self, key: object) -> int:
        if isinstance(key, Mapping):
            i = bisect.bisect_left(self._starts, key.start)
            if i < len(self._maps) and self._maps[i] == key:
                return i
        raise KeyError(key)

    def __getitem__(self, key: Mapping) -> DirtyPages:
        return self._at(self._index(key))

    def __contains__(self, key: object) -> bool:
        try:
            self._index(key)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def __len__(self) -> int:
        """Number of tracked mappings (written or not): a ProcessDirty is a mapping from
        them; ``count`` is the number of pages written."""
        return len(self._maps)

    def _written_indices(self) -> list[int]:
        return np.flatnonzero(np.diff(self._bounds) > 0).tolist()

    @property
    def count(self) -> int:
        """Pages written, all mappings together (``DirtyPages.count`` is the same figure for
        one mapping)."""
        return self._pages

    @property
    def pages(self) -> int:
        """Deprecated: the older name of :attr:`count`.  One meaning per name: ``pages`` is
        the array of page indices (``DirtyPages.pages()``), ``count`` the number."""
        warnings.warn("ProcessDirty.pages is now ProcessDirty.count (DirtyPages.pages() is "
                      "the array of page indices)", DeprecationWarning, stacklevel=2)
        return self._pages

    @property
    def nbytes(self) -> int:
        """Bytes in the written pages."""
        return self._pages * PAGE_SIZE

    def written(self) -> dict[Mapping, DirtyPages]:
        """Only the mappings with at least one written page."""
        return {self._maps[i]: self._at(i) for i in self._written_indices()}

    def top(self, n: int = 10) -> list[tuple[Mapping, DirtyPages]]:
        """The ``n`` mappings with the most written pages, most first."""
        items = sorted(self.written().items(), key=lambda kv: (-len(kv[1]), kv[0].start))
        return items[:n]

    def by_path(self) -> dict[str, int]:
        """Written pages per mapping name (``path``, ``[heap]``, ``""`` for anonymous)."""
        out: dict[str, int] = collections.defaultdict(int)
        for m, d in self.written().items():
            out[m.path] += len(d)
        return dict(out)

    def addresses(self) -> np.ndarray:
        """``uint64`` address of every written page, ascending."""
        parts = [d.addresses() for d in self.written().values()]
        if not parts:
            return np.empty(0, np.uint64)
        return np.sort(np.concatenate(parts))

    def find(self, address: int) -> tuple[Mapping, DirtyPages] | None:
        """The mapping holding ``address`` and its written pages, or None."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._maps[i].end:
            return self._maps[i], self._at(i)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary: totals and, per written mapping, the runs of written pages
        as ``[first page, page count]`` relative to the mapping's start."""
        maps_out = []
        for m, d in self.written().items():
            runs = d.runs
            maps_out.append({
                "start": m.start, "end": m.end, "perms": m.perms, "path": m.path,
                "pages": len(d), "new": m in self.new,
                "runs": np.stack([runs[:, 0], runs[:, 1] - runs[:, 0]], axis=1).tolist(),
            })
        return {"pid": self.pid, "backend": self.backend, "elapsed": round(self.elapsed, 6),
                "pages": self._pages, "bytes": self.nbytes, "mappings_tracked": len(self),
                "mappings": maps_out}

    def __repr__(self) -> str:
        return (f"<ProcessDirty pid={self.pid} {self._pages} pages written in "
                f"{len(self._written_indices())} of {len(self)} mappings over "
                f"{self.elapsed:.3f} s>")

