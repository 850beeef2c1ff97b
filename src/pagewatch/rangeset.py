"""RangeSet: a set of addresses kept as sorted, disjoint ``[start, end)`` runs.

The one interval set of the other-process tracker (the ranges registered with its
userfaultfd, the memory tracked at the last reset).  Every operation costs O(log n) plus the
runs it touches, so tracking a target with tens of thousands of mappings stays linear in
their number (``add`` used to rebuild the whole list: attach and collect grew with its
square).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["RangeSet"]


class RangeSet:
    """Sorted, disjoint, non-touching ``[start, end)`` runs of addresses.

    Adding a run merges it with the runs it overlaps or touches; removing one cuts them.

    Parameters
    ----------
    runs
        Runs to add, in any order.

    Attributes
    ----------
    ops
        A count of the elementary steps done so far (one per call, plus one per run each
        call visits): a deterministic measure of the work, for tests of its growth.
    """

    __slots__ = ("_starts", "_ends", "ops")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.ops = 0
        for s, e in runs:
            self.add(s, e)

    # ---- reading -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of runs."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        runs = ", ".join(f"{s:#x}-{e:#x}" for s, e in list(self)[:4])
        more = f", ... ({len(self)} runs)" if len(self) > 4 else ""
        return f"RangeSet([{runs}{more}])"

    @property
    def runs(self) -> list[tuple[int, int]]:
        """The runs, in address order."""
        return list(self)

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` in the set, in address order."""
        if end <= start:
            return []
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        out = []
        n = len(starts)
        while i < n and starts[i] < end:
            out.append((max(starts[i], start), min(ends[i], end)))
            i += 1
        self.ops += 1 + len(out)
        return out

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, in address order."""
        out, cur = [], start
        for s, e in self.within(start, end):
            if s > cur:
                out.append((cur, s))
            cur = e
        if cur < end:
            out.append((cur, end))
        return out

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any address of ``[start, end)`` is in the set."""
        i = bisect.bisect_right(self._ends, start)
        self.ops += 1
        return end > start and i < len(self._starts) and self._starts[i] < end

    # ---- changing ----------------------------------------------------------------------
    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merged with the runs it overlaps or touches."""
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, start)  # first run ending at or after start
        j = bisect.bisect_right(starts, end)  # runs [i, j) overlap or touch
        self.ops += 1 + (j - i)
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Remove ``[start, end)``."""
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)  # first run ending after start
        j = bisect.bisect_left(starts, end)  # runs [i, j) overlap
        self.ops += 1 + max(j - i, 0)
        if i >= j:
            return
        new_s, new_e = [], []
        if starts[i] < start:
            new_s.append(starts[i])
            new_e.append(start)
        if ends[j - 1] > end:
            new_s.append(end)
            new_e.append(ends[j - 1])
        starts[i:j] = new_s
        ends[i:j] = new_e

    def keep_only(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Keep only what lies inside ``ranges`` (sorted, disjoint): one merge of the two
        sorted lists, O(runs + ranges)."""
        starts, ends = self._starts, self._ends
        n = len(starts)
        out_s: list[int] = []
        out_e: list[int] = []
        i = 0
        steps = 1
        for a, b in ranges:
            steps += 1
            while i < n and ends[i] <= a:
                i += 1
                steps += 1
            k = i
            while k < n and starts[k] < b:
                s, e = max(starts[k], a), min(ends[k], b)
                if out_e and out_e[-1] >= s:
                    out_e[-1] = max(out_e[-1], e)
                else:
                    out_s.append(s)
                    out_e.append(e)
                k += 1
                steps += 1
        self.ops += steps
        self._starts, self._ends = out_s, out_e

    def clear(self) -> None:
        """Remove everything."""
        self._starts, self._ends = [], []
