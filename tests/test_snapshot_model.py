"""Snapshot against a plain numpy model: random sequences of writes of every kind, restores,
updates, diffs, overlapping snapshots, a plain Tracker beside them, MADV_DONTNEED by the
program and fork().  After every restore both memories equal the model byte for byte.

Two memories of ``NPAGES`` pages: ``mem[0]`` from :func:`pagewatch.snapshot_array` (its first
aligned snapshot restores by dropping pages, the others copy back) and ``mem[1]``, ordinary
anonymous memory.  Snapshots cover random byte ranges of either, unaligned ones included.
Fixed seed (``derandomize``); smaller in the kernel matrix's emulated guests.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.mprotect import writable
from pagewatch.kernel.constants import MADV_DONTNEED, PAGE_SIZE
from tests.conftest import backend_params

NPAGES = 24
SIZE = NPAGES * PAGE_SIZE
MAX_SNAPSHOTS = 4
IN_MATRIX = bool(os.environ.get("PAGEWATCH_KERNEL_MATRIX", "").replace("host", ""))
#: examples x steps: ~5 s per backend on the host; fewer in the emulated guests
EXAMPLES, STEPS = (5, 25) if IN_MATRIX else (20, 40)
#: backends that report a page MADV_DONTNEED zeroed without a write (mprotect and uffd-sync
#: see only writes: the dropped page is not reported, so no snapshot can restore it)
SEES_DONTNEED = ("uffd-async", "compare")


#: how many times each rule ran in this process (the test prints it: the test's size)
CALLS: collections.Counter[str] = collections.Counter()
F = TypeVar("F", bound=Callable[..., Any])


def counted(f: F) -> F:
    @functools.wraps(f)
    def run(*args: Any, **kw: Any) -> Any:
        CALLS[f.__name__] += 1
        return f(*args, **kw)
    return run  # type: ignore[return-value]


class _Snap:
    def __init__(self, snap: pw.Snapshot, mem: int, lo: int, hi: int,
                 baseline: np.ndarray) -> None:
        self.snap, self.mem, self.lo, self.hi, self.baseline = snap, mem, lo, hi, baseline


def _make_machine(backend: str) -> type[RuleBasedStateMachine]:
    class SnapshotModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            anon = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.mem = [pw.snapshot_array(SIZE, np.uint8), np.frombuffer(anon, np.uint8)]
            self.model = [np.zeros(SIZE, np.uint8), np.zeros(SIZE, np.uint8)]
            self.memfd = np.zeros(SIZE, np.uint8)  # what mem[0]'s memfd holds
            self.snaps: list[_Snap] = []
            self.trackers = [pw.Tracker(m, backend=backend) for m in self.mem]
            self.seen = [m.copy() for m in self.model]  # content at each tracker's last collect
            # pages a "dontneed" restore dropped since each tracker's last collect: not
            # writes, so the tracker need not report them (Snapshot's Limits)
            self.dropped = [np.zeros(NPAGES, bool), np.zeros(NPAGES, bool)]
            self.pipe = os.pipe()
            self.counter = 0

        @initialize(a=st.integers(1, SIZE - 1))
        def two_snapshots_to_start_with(self, a: int) -> None:
            # mem[0] whole: restores by dropping pages; mem[1] from an unaligned byte on
            self.write_numpy(0, a // 2, PAGE_SIZE)
            self.write_numpy(1, a, 2 * PAGE_SIZE)
            self.new_snapshot(0, 0, SIZE, True)
            self.new_snapshot(1, a, SIZE - a // 3, False)

        def _value(self) -> int:
            self.counter = self.counter % 255 + 1
            return self.counter

        # ---- writes of every kind -----------------------------------------------------
        @rule(m=st.integers(0, 1), off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * PAGE_SIZE))
        @counted
        def write_numpy(self, m: int, off: int, n: int) -> None:
            v = self._value()
            self.mem[m][off:off + n] = v
            self.model[m][off:off + n] = v

        @rule(m=st.integers(0, 1), where=st.lists(st.integers(0, SIZE - 1), min_size=2,
                                                  max_size=8))
        @counted
        def write_scattered_numpy(self, m: int, where: list[int]) -> None:
            v = self._value()
            self.mem[m][where] = v
            self.model[m][where] = v

        @rule(m=st.integers(0, 1), off=st.integers(0, SIZE - 1), n=st.integers(1, 64))
        @counted
        def write_memoryview(self, m: int, off: int, n: int) -> None:
            data = bytes((self._value() + i) % 256 for i in range(n))[:SIZE - off]
            memoryview(self.mem[m])[off:off + len(data)] = data
            self.model[m][off:off + len(data)] = np.frombuffer(data, np.uint8)

        @rule(m=st.integers(0, 1), off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * PAGE_SIZE))
        @counted
        def write_readv(self, m: int, off: int, n: int) -> None:
            n = min(n, SIZE - off)
            data = bytes([self._value()]) * n
            os.write(self.pipe[1], data)
            view = memoryview(self.mem[m])[off:off + n]
            guard = writable(view) if backend == "mprotect" else contextlib.nullcontext()
            with guard:
                got = os.readv(self.pipe[0], [view])
            view.release()
            assert got == n
            self.model[m][off:off + n] = np.frombuffer(data, np.uint8)

        @rule(m=st.integers(0, 1), page=st.integers(0, NPAGES - 1),
              npages=st.integers(1, 4), stride=st.sampled_from([8, 512, PAGE_SIZE]))
        @counted
        def write_c(self, m: int, page: int, npages: int, stride: int) -> None:
            npages = min(npages, NPAGES - page)
            v = self._value()
            start = page * PAGE_SIZE
            _native.poke(self.mem[m].ctypes.data + start, npages * PAGE_SIZE, stride, v, 8)
            view = self.model[m][start:start + npages * PAGE_SIZE].view(np.uint64)
            view[::stride // 8] = v

        # ---- the program drops pages, forks -----------------------------------------------
        @precondition(lambda self: backend in SEES_DONTNEED)
        @rule(page=st.integers(0, NPAGES - 1), npages=st.integers(1, 3))
        @counted
        def dontneed_anonymous(self, page: int, npages: int) -> None:
            npages = min(npages, NPAGES - page)
            _native.madvise(self.mem[1].ctypes.data + page * PAGE_SIZE, npages * PAGE_SIZE,
                            MADV_DONTNEED)
            self.model[1][page * PAGE_SIZE:(page + npages) * PAGE_SIZE] = 0

        @rule(page=st.integers(0, NPAGES - 1), now=st.integers(0, 4))
        @counted
        def fork_a_child_that_writes_its_copy(self, page: int, now: int) -> None:
            if now:  # fork one time in five: it costs milliseconds
                return
            CALLS["forks"] += 1
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for m in self.mem:
                        m[page * PAGE_SIZE:] = 0xEE
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0

        # ---- snapshots --------------------------------------------------------------------
        @precondition(lambda self: len(self.snaps) < MAX_SNAPSHOTS)
        @rule(m=st.integers(0, 1), a=st.integers(0, SIZE - 1), b=st.integers(1, SIZE),
              aligned=st.booleans())
        @counted
        def new_snapshot(self, m: int, a: int, b: int, aligned: bool) -> None:
            lo, hi = min(a, b - 1), max(a + 1, b)
            if aligned:
                lo, hi = lo // PAGE_SIZE * PAGE_SIZE, -(-hi // PAGE_SIZE) * PAGE_SIZE
            pages = range(lo // PAGE_SIZE, -(-hi // PAGE_SIZE))
            dropping = [s for s in self.snaps if s.mem == m and s.snap.method == "dontneed"
                        and set(pages) & set(range(s.lo // PAGE_SIZE, s.hi // PAGE_SIZE))]
            try:
                snap = pw.Snapshot(self.mem[m][lo:hi], backend=backend)
            except ValueError as exc:  # it could not see the other's restores: refused
                assert dropping and "dropping" in str(exc)
                return
            assert not dropping
            if snap.method == "dontneed":
                self.memfd[lo:hi] = self.model[m][lo:hi]
            self.snaps.append(_Snap(snap, m, lo, hi, self.model[m][lo:hi].copy()))

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1), check=st.booleans())
        @counted
        def restore(self, i: int, check: bool) -> None:
            s = self.snaps[i % len(self.snaps)]
            rewritten = s.snap.restore(check=check)
            if s.snap.method == "dontneed":  # not writes: a tracker beside may miss them
                first = s.lo // PAGE_SIZE
                self.dropped[s.mem][first:first + rewritten.npages] |= rewritten.bitmap()
            self.model[s.mem][s.lo:s.hi] = s.baseline
            for m in (0, 1):
                bad = np.flatnonzero(self.mem[m] != self.model[m])
                assert not len(bad), (f"after restore of {s.snap!r} [{s.lo}, {s.hi}) of mem "
                                      f"{s.mem}: mem {m} differs at {len(bad)} bytes, first "
                                      f"{bad[:5].tolist()}")

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1), m=st.integers(0, 1),
              off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * PAGE_SIZE))
        @counted
        def write_then_restore(self, i: int, m: int, off: int, n: int) -> None:
            self.write_numpy(m, off, n)
            self.restore(i, False)

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1))
        @counted
        def scribble_all_then_restore(self, i: int) -> None:
            """Every byte of the target written: the restore shows the whole baseline."""
            s = self.snaps[i % len(self.snaps)]
            self.write_numpy(s.mem, s.lo, s.hi - s.lo)
            self.restore(i, False)

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1),
              where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8))
        @counted
        def write_scattered_then_update(self, i: int, where: list[float]) -> None:
            s = self.snaps[i % len(self.snaps)]
            self.write_scattered_numpy(s.mem, [s.lo + int(w * (s.hi - s.lo)) for w in where])
            self.update(i)

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1))
        @counted
        def update(self, i: int) -> None:
            s = self.snaps[i % len(self.snaps)]
            s.snap.update()
            s.baseline = self.model[s.mem][s.lo:s.hi].copy()
            if s.snap.method == "dontneed":
                self.memfd[s.lo:s.hi] = s.baseline

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1))
        @counted
        def diff_reports_every_page_that_differs(self, i: int) -> None:
            s = self.snaps[i % len(self.snaps)]
            reported = s.snap.diff().bitmap()
            first = s.lo // PAGE_SIZE
            for off in np.flatnonzero(self.mem[s.mem][s.lo:s.hi] != s.baseline):
                page = (s.lo + int(off)) // PAGE_SIZE - first
                assert reported[page], f"page {page} of {s.snap!r} differs but is not reported"

        @precondition(lambda self: self.snaps)
        @rule(i=st.integers(0, MAX_SNAPSHOTS - 1))
        @counted
        def close(self, i: int) -> None:
            self.snaps.pop(i % len(self.snaps)).snap.close()

        @rule(m=st.integers(0, 1))
        @counted
        def tracker_beside_sees_every_change(self, m: int) -> None:
            reported = self.trackers[m].collect().bitmap()
            changed = (self.mem[m] != self.seen[m]).reshape(NPAGES, PAGE_SIZE).any(axis=1)
            lost = changed & ~reported & ~self.dropped[m]
            assert not lost.any(), f"the plain tracker lost writes to {np.flatnonzero(lost)}"
            self.seen[m] = self.model[m].copy()
            self.dropped[m][:] = False

        @invariant()
        def memory_is_the_model(self) -> None:
            for m in (0, 1):
                assert np.array_equal(self.mem[m], self.model[m])

        def teardown(self) -> None:
            for s in self.snaps:
                s.snap.close()
            for t in self.trackers:
                t.close()
            for fd in self.pipe:
                os.close(fd)

    return SnapshotModel


# mprotect and compare use nothing that differs between kernels: one guest suffices
@pytest.mark.one_guest("6.1", backends=("mprotect", "compare"))
@pytest.mark.parametrize("backend", backend_params())
def test_snapshots_follow_a_numpy_model_through_random_sequences(backend: str) -> None:
    machine: Any = _make_machine(backend)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=True, deadline=None,
        database=None, suppress_health_check=list(HealthCheck),
        # a failure is reported as found (shrinking re-runs fork()s and snapshots for
        # minutes, and a kernel race shrinks badly)
        phases=(Phase.explicit, Phase.generate)))
    CALLS["examples"] = EXAMPLES
    print(f"{backend}: {sum(CALLS.values()) - EXAMPLES} steps: {dict(CALLS)}")
    CALLS.clear()
