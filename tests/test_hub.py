"""The Hub's pending log: overlapping trackers that share one written-bit per page never
lose a write to each other's resets, and never see one twice.

Random sequences of trackers created and closed over overlapping ranges, writes, collects
(with and without reset, with and without ``max_pages``) and resets run against a model
that holds, per tracker, the pages written since its last reset; every collect must return
exactly the model's pages.  Once over a simulated kernel bit (a numpy array: fast, many
sequences, the log compacted after every other append) and once over real ``uffd-async``
memory.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.base import Backend, Hub, HubBackend, Region, backend_class
from pagewatch.dirty import DirtyPages
from pagewatch.kernel.constants import PAGE_SIZE

NPAGES = 48
FAKE_BASE = 0x100000000  # addresses of the simulated memory: never dereferenced


class _FakeHub(Hub):
    def __init__(self) -> None:
        super().__init__()
        self.bits = np.zeros(NPAGES, bool)  # the shared kernel bit: written since reset


class FakeBackend(HubBackend):
    """A HubBackend over ``_FakeHub.bits``: what uffd-async does with the uffd-wp bit."""

    name = "fake"
    rank = 99
    hub = _FakeHub()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "simulated"

    def __init__(self, region: Region) -> None:
        super().__init__(region)
        hub = self.hub
        with hub.lock:
            for s, e in hub.uncovered(self, region.start, region.end):
                self._bits(s, e, reset=True)  # protect what nobody tracks: start clean
            for s, e in hub.covered(self, region.start, region.end):
                hub.harvest(self, self._bits(s, e, reset=True))  # theirs, not ours
            self._join()

    def _bits(self, start: int, end: int, reset: bool) -> np.ndarray:
        a, b = (start - FAKE_BASE) // PAGE_SIZE, (end - FAKE_BASE) // PAGE_SIZE
        got = np.flatnonzero(self.hub.bits[a:b]) + a - self._first_page + FAKE_BASE // PAGE_SIZE
        if reset:
            self.hub.bits[a:b] = False
        return DirtyPages.from_pages(got, 0, self.region.npages).runs.copy()

    def _get(self, reset: bool) -> np.ndarray:
        return self._bits(self.region.start, self.region.end, reset)

    def _reset_runs(self, runs: np.ndarray) -> np.ndarray:
        out = [self._bits(self.region.start + s * PAGE_SIZE, self.region.start + e * PAGE_SIZE,
                          True) for s, e in runs.tolist()]
        return np.concatenate(out) if out else np.empty((0, 2), np.int64)

    def _release(self) -> None:
        with self.hub.lock:
            self._leave()


# ---- the operations and the model ---------------------------------------------------------

spans = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, NPAGES)).map(
    lambda t: (t[0], min(NPAGES, t[0] + t[1])))
ops = st.lists(st.one_of(
    st.tuples(st.just("new"), spans),
    st.tuples(st.just("write"), spans, st.integers(1, 5)),
    st.tuples(st.just("collect"), st.integers(0, 5), st.booleans(),
              st.none() | st.integers(0, 6)),
    st.tuples(st.just("reset"), st.integers(0, 5)),
    st.tuples(st.just("close"), st.integers(0, 5)),
), min_size=1, max_size=40)


def run_model(seq: list[tuple[Any, ...]], make: Callable[[int, int], Any],
              write: Callable[[int, int, int], None]) -> None:
    """Play ``seq``; ``make(first, end)`` creates a tracker over those pages of the memory,
    ``write(first, end, step)`` writes every ``step``-th page of them."""
    live: list[tuple[Any, int, int, set[int]]] = []  # tracker, first, end, pages it must report
    try:
        for op in seq:
            if op[0] == "new" and len(live) < 6:
                a, b = op[1]
                live.append((make(a, b), a, b, set()))
            elif op[0] == "write":
                (a, b), step = op[1], op[2]
                write(a, b, step)
                for _, lo, hi, must in live:
                    must.update(p - lo for p in range(a, b, step) if lo <= p < hi)
            elif live and op[0] == "collect":
                t, _, _, must = live[op[1] % len(live)]
                reset, limit = op[2], op[3]
                got = {int(p) for p in t.collect(reset=reset, max_pages=limit).pages()}
                want = must if limit is None else set(sorted(must)[:limit])
                assert got == want, (op, sorted(got), sorted(want))
                if reset:
                    must.difference_update(got)
            elif live and op[0] == "reset":
                t, _, _, must = live[op[1] % len(live)]
                t.reset()
                must.clear()
            elif live and op[0] == "close":
                t = live.pop(op[1] % len(live))[0]
                t.close()
        for t, _, _, must in live:  # nothing pending was lost on the way
            assert {int(p) for p in t.collect().pages()} == must
    finally:
        for t, *_ in live:
            t.close()


@pytest.mark.kernel_independent
@settings(derandomize=True, max_examples=400, deadline=None)
@given(ops)
def test_overlapping_trackers_on_a_shared_bit_report_exactly_their_writes(
        seq: list[tuple[Any, ...]]) -> None:
    hub = FakeBackend.hub
    hub.bits[:] = False
    old = Hub.COMPACT_EVERY
    Hub.COMPACT_EVERY = 2  # compact all the time: merges and drops under every cursor layout
    try:
        def make(a: int, b: int) -> FakeBackend:
            return FakeBackend(Region(FAKE_BASE + a * PAGE_SIZE, (b - a) * PAGE_SIZE))

        def write(a: int, b: int, step: int) -> None:
            hub.bits[a:b:step] = True

        run_model(seq, make, write)
        assert not hub.members
    finally:
        Hub.COMPACT_EVERY = old


@pytest.mark.kernel_independent
def test_an_idle_trackers_backlog_stays_one_array_whatever_the_others_collect() -> None:
    hub = FakeBackend.hub
    hub.bits[:] = False
    ts = [FakeBackend(Region(FAKE_BASE, NPAGES * PAGE_SIZE)) for _ in range(3)]
    try:
        for i in range(10 * Hub.COMPACT_EVERY):
            hub.bits[i % NPAGES] = True
            ts[0].collect()
        # ts[1] and ts[2] never collected: their backlog is merged, not one entry per collect
        assert len(hub.log) <= 1 + Hub.COMPACT_EVERY
        for t in ts[1:]:
            assert len(t.collect()) == min(NPAGES, 10 * Hub.COMPACT_EVERY)
    finally:
        for t in ts:
            t.close()


@pytest.mark.kernel_independent
def test_merging_the_log_never_hands_a_tracker_pages_it_already_took(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A log entry a tracker has taken in must not come back to it merged with a later one:
    # entries are merged only where no tracker's cursor separates them.
    monkeypatch.setattr(Hub, "COMPACT_EVERY", 1)
    hub = FakeBackend.hub
    hub.bits[:] = False
    idle, a, b, c = (FakeBackend(Region(FAKE_BASE, NPAGES * PAGE_SIZE)) for _ in range(4))
    try:
        hub.bits[1] = True
        assert a.collect().pages().tolist() == [1]  # the log: {1}, for idle, b, c
        assert b.collect().pages().tolist() == [1]  # b took {1} in
        hub.bits[2] = True
        assert c.collect().pages().tolist() == [1, 2]  # the log: {1}, {2}
        assert b.collect().pages().tolist() == [2]  # not 1 again
        assert idle.collect().pages().tolist() == [1, 2]
    finally:
        for t in (idle, a, b, c):
            t.close()


# ---- the same over real uffd-async memory ---------------------------------------------------

ok, why = backend_class("uffd-async").available()


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not ok, reason=f"uffd-async unavailable: {why}")
@settings(derandomize=True, max_examples=60, deadline=None)
@given(ops)
def test_overlapping_uffd_async_trackers_report_exactly_their_writes(
        seq: list[tuple[Any, ...]]) -> None:
    m = mmap.mmap(-1, NPAGES * PAGE_SIZE)
    base, _, _ = _native.buffer_info(m)

    def make(a: int, b: int) -> Backend:
        t = pw.Tracker(pw.Region(base + a * PAGE_SIZE, (b - a) * PAGE_SIZE),
                       backend="uffd-async")
        return t  # type: ignore[return-value]

    def write(a: int, b: int, step: int) -> None:
        _native.poke(base + a * PAGE_SIZE, (b - a) * PAGE_SIZE, step * PAGE_SIZE, 7)

    try:
        run_model(seq, make, write)
    finally:
        m.close()
