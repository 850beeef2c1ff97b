"""Runs: sorted, disjoint ``[start, end)`` integer intervals as ``int64 (n, 2)`` arrays.

The one implementation of arithmetic on page runs held as numpy arrays (what a collect
returns, what a tracker has pending, runs from a bitmap): every operation is vectorised, so
its cost grows with the number of runs, never with the pages they span, and never loops in
Python over the runs.  (A set of address ranges changed one range at a time is
:class:`pagewatch.rangeset.RangeSet`.)  "Normalised" runs are sorted by
start, non-empty, and neither overlap nor touch (``runs[i, 1] < runs[i + 1, 0]``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["EMPTY", "empty", "normalise", "from_bitmap", "from_pages", "clip", "intersect",
           "subtract", "complement", "take_first", "count"]

#: no runs (read-only: share it, never write into it)
EMPTY = np.empty((0, 2), np.int64)
EMPTY.flags.writeable = False


def empty() -> np.ndarray:
    """A new empty ``int64 (0, 2)`` array."""
    return np.empty((0, 2), np.int64)


def normalise(runs: np.ndarray | Iterable[tuple[int, int]]) -> np.ndarray:
    """The union of ``runs`` (any order, overlapping or touching), normalised."""
    r = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    r = r[r[:, 1] > r[:, 0]]
    if len(r) <= 1:
        return np.ascontiguousarray(r)
    if not (np.all(r[1:, 0] > r[:-1, 1])):
        # Sorted pieces (concatenations of normalised arrays) sort fast with timsort.
        r = r[np.argsort(r[:, 0], kind="stable")]
        # A run starts a new group when it begins after every earlier run ended.
        ends = np.maximum.accumulate(r[:, 1])
        new = np.empty(len(r), dtype=bool)
        new[0] = True
        new[1:] = r[1:, 0] > ends[:-1]
        first = np.flatnonzero(new)
        r = np.stack([r[first, 0], np.maximum.reduceat(r[:, 1], first)], axis=1)
    return np.ascontiguousarray(r)


def from_bitmap(bits: np.ndarray, offset: int = 0) -> np.ndarray:
    """The runs of the True entries of a ``bool`` array, as indices plus ``offset``."""
    b = np.asarray(bits, dtype=bool).ravel()
    if not len(b):
        return empty()
    edges = np.diff(b.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    out = np.stack([starts, ends], axis=1).astype(np.int64, copy=False)
    if offset:
        out += offset
    return out


def from_pages(pages: np.ndarray) -> np.ndarray:
    """The runs of a set of integers (any order, repeats allowed)."""
    p = np.unique(np.asarray(pages, dtype=np.int64))
    if not len(p):
        return empty()
    brk = np.flatnonzero(np.diff(p) != 1) + 1
    starts = p[np.concatenate(([0], brk))]
    ends = p[np.concatenate((brk - 1, [len(p) - 1]))] + 1
    return np.stack([starts, ends], axis=1)


def clip(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of normalised ``runs`` inside ``[lo, hi)`` (a view when nothing is cut)."""
    if not len(runs) or hi <= lo:
        return EMPTY
    i = int(np.searchsorted(runs[:, 1], lo, side="right"))
    j = int(np.searchsorted(runs[:, 0], hi, side="left"))
    if i >= j:
        return EMPTY
    out = runs[i:j]
    if out[0, 0] < lo or out[-1, 1] > hi:
        out = out.copy()
        out[0, 0] = max(int(out[0, 0]), lo)
        out[-1, 1] = min(int(out[-1, 1]), hi)
    return out


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The intersection of two normalised run arrays, normalised."""
    if not len(a) or not len(b):
        return empty()
    pts = np.concatenate([a[:, 0], a[:, 1], b[:, 0], b[:, 1]])
    na, nb = len(a), len(b)
    delta = np.concatenate([np.ones(na, np.int8), -np.ones(na, np.int8),
                            np.ones(nb, np.int8), -np.ones(nb, np.int8)])
    # At one point, ends before starts: runs that only touch do not intersect.
    order = np.lexsort((delta, pts))
    p = pts[order]
    depth = np.cumsum(delta[order], dtype=np.int64)
    at = np.flatnonzero(depth == 2)  # inside both; the next event ends one of them
    out = np.stack([p[at], p[at + 1]], axis=1)
    return normalise(out[out[:, 1] > out[:, 0]])


def complement(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of ``[lo, hi)`` not in normalised ``runs``."""
    if hi <= lo:
        return empty()
    r = clip(runs, lo, hi)
    starts = np.concatenate(([lo], r[:, 1]))
    ends = np.concatenate((r[:, 0], [hi]))
    out = np.stack([starts, ends], axis=1).astype(np.int64, copy=False)
    return np.ascontiguousarray(out[out[:, 1] > out[:, 0]])


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The parts of normalised ``a`` not in normalised ``b``."""
    if not len(a) or not len(b):
        return a
    return intersect(a, complement(b, int(a[0, 0]), int(a[-1, 1])))


def take_first(runs: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` integers of normalised ``runs``, as runs."""
    if n <= 0 or not len(runs):
        return EMPTY
    total = np.cumsum(runs[:, 1] - runs[:, 0])
    if total[-1] <= n:
        return runs
    k = int(np.searchsorted(total, n, side="left"))  # the run that holds the n-th
    out = runs[:k + 1].copy()
    out[k, 1] -= int(total[k]) - n
    return out


def count(runs: np.ndarray) -> int:
    """How many integers the runs hold."""
    return int((runs[:, 1] - runs[:, 0]).sum())
