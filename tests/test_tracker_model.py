"""A model-based test of Tracker: random sequences of operations against a plain-Python model.

The model records, per tracker, the pages it MUST report (written since its last reset) and
the pages it MAY report (their state was lost, or their content changed without a store:
``MADV_DONTNEED``, the program's own ``mprotect``, new memory at the same address), and
whether its memory is gone (then every collect must raise :class:`~pagewatch.TargetGone`).
Every collect is checked against it: ``must <= got <= must | may``, and with ``max_pages``
the first pages in address order.

Operations: writes of every kind (a numpy store, a memoryview store, ``os.readv`` into the
memory: a write by the kernel, a C writer: ``_native.poke``), collect (with and without
reset, with ``max_pages``), reset, trackers opened and closed over overlapping ranges (one
backend per run, and one run mixing backends that can share pages), and what the program
itself does to its memory: ``mprotect`` away and back, ``madvise(MADV_DONTNEED)``,
``munmap`` + a new mapping at the same address, and ``fork`` with a child that writes.

Fixed seed (``derandomize``), bounded size; smaller in the kernel matrix's emulated guests
(``PAGEWATCH_KERNEL_MATRIX`` set there).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.base import backend_class
from pagewatch.backends.mprotect import writable
from pagewatch.kernel.constants import MADV_DONTNEED, PAGE_SIZE

NPAGES = 12
MAX_TRACKERS = 4
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10

IN_GUEST = bool(os.environ.get("PAGEWATCH_KERNEL_MATRIX"))
EXAMPLES = 5 if IN_GUEST else 20
STEPS = 15 if IN_GUEST else 40

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# uffd-sync and uffd-async cannot share a page (one userfaultfd per mapping): the mixed
# run takes one of them with the two that coexist with both.
_ALONE = ["uffd-async", "soft-dirty", "uffd-sync", "mprotect", "compare"]


def _available(name: str) -> bool:
    try:
        return backend_class(name).available()[0]
    except ImportError:
        return False


class _Tracked:
    """A live tracker and its model."""

    def __init__(self, tracker: pw.Tracker, backend: str, first: int, end: int) -> None:
        self.tracker = tracker
        self.backend = backend
        self.first, self.end = first, end
        self.must: set[int] = set()
        self.may: set[int] = set()
        self.gone = False

    def covers(self, page: int) -> bool:
        return self.first <= page < self.end

    def pages(self, first: int, end: int) -> set[int]:
        return {p - self.first for p in range(max(first, self.first), min(end, self.end))}


class TrackerModel(RuleBasedStateMachine):
    backends: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.addr = 0
        self.live: list[_Tracked] = []
        self.value = 0
        self.pipe_r, self.pipe_w = os.pipe()

    # ---- the memory ----------------------------------------------------------------------

    @initialize()
    def map_memory(self) -> None:
        p = libc.mmap(None, NPAGES * PAGE_SIZE, _RW, _PRIVATE, -1, 0)
        assert p not in (None, ctypes.c_void_p(-1).value)
        self.addr = int(p)
        ctypes.memset(self.addr, 1, NPAGES * PAGE_SIZE)  # populated: every kind reports alike

    def _next(self) -> int:
        self.value = self.value % 250 + 2  # never 0 or 1: a write always changes the page
        return self.value

    def _written(self, first: int, end: int, *, kind: str = "must") -> None:
        for t in self.live:
            getattr(t, kind).update(t.pages(first, end))

    def _replaced(self, first: int, end: int) -> None:
        """The content of the pages was replaced (zeros) without a store: each tracker may
        report them; compare, exact by content, reports a page written before only if its
        content still differs from its snapshot."""
        for t in self.live:
            pages = t.pages(first, end)
            t.may.update(pages)
            if t.backend == "compare":
                t.may.update(t.must & pages)
                t.must -= pages

    def teardown(self) -> None:
        try:
            for t in self.live:
                if not t.gone:
                    self._check(t, t.tracker.collect(), None)
        finally:
            for t in self.live:
                t.tracker.close()
            if self.addr:
                libc.munmap(self.addr, NPAGES * PAGE_SIZE)
            os.close(self.pipe_r)
            os.close(self.pipe_w)

    # ---- trackers ------------------------------------------------------------------------

    @precondition(lambda self: len(self.live) < MAX_TRACKERS)
    @rule(data=st.data(), first=st.integers(0, NPAGES - 1), n=st.integers(1, NPAGES),
          unaligned=st.booleans())
    def open_tracker(self, data: Any, first: int, n: int, unaligned: bool) -> None:
        backend = data.draw(st.sampled_from(self.backends))
        end = min(NPAGES, first + n)
        cut = 100 if unaligned else 0  # the same pages, from inside the first to the last
        region = pw.Region(self.addr + first * PAGE_SIZE + cut, (end - first) * PAGE_SIZE - 2 * cut)
        clash = {"uffd-sync": "uffd-async", "uffd-async": "uffd-sync"}.get(backend)
        if any(t.backend == clash and not t.gone and t.first < end and t.end > first
               for t in self.live):
            with pytest.raises(pw.PagewatchError, match=f"registered with a {clash} tracker"):
                pw.Tracker(region, backend=backend)
            return
        self.live.append(_Tracked(pw.Tracker(region, backend=backend), backend, first, end))

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, MAX_TRACKERS - 1))
    def close_tracker(self, i: int) -> None:
        t = self.live.pop(i % len(self.live))
        t.tracker.close()
        with pytest.raises(ValueError, match="closed"):
            t.tracker.collect()

    # ---- writes --------------------------------------------------------------------------

    @rule(page=st.integers(0, NPAGES - 1), off=st.integers(0, PAGE_SIZE - 1),
          kind=st.sampled_from(["numpy", "memoryview", "kernel", "c"]))
    def write(self, page: int, off: int, kind: str) -> None:
        import numpy as np

        at = self.addr + page * PAGE_SIZE + off
        v = self._next()
        if kind == "numpy":
            np.ctypeslib.as_array((ctypes.c_uint8 * 1).from_address(at))[0] = v
        elif kind == "memoryview":
            memoryview((ctypes.c_uint8 * 1).from_address(at)).cast("B")[0] = v
        elif kind == "c":
            _native.poke(at, 1, 1, v)
        else:  # the kernel writes (readv from a pipe), inside writable() as documented
            os.write(self.pipe_w, bytes([v]))
            buf = (ctypes.c_uint8 * 1).from_address(at)
            with writable(pw.Region(at, 1)):
                assert os.readv(self.pipe_r, [memoryview(buf).cast("B")]) == 1
        self._written(page, page + 1)

    # ---- collect and reset -----------------------------------------------------------------

    def _check(self, t: _Tracked, got_d: pw.DirtyPages, limit: int | None) -> set[int]:
        got = {int(p) for p in got_d.pages()}
        allowed = t.must | t.may
        assert got <= allowed, (t.backend, "reported, never written", sorted(got - allowed))
        if limit is None:
            assert t.must <= got, (t.backend, "lost writes", sorted(t.must - got))
        else:
            assert len(got) <= limit
            if len(got) < limit:
                assert t.must <= got, (t.backend, "lost writes", sorted(t.must - got))
            elif got:
                below = {p for p in t.must if p < max(got)}
                assert below <= got, (t.backend, "not the first pages", sorted(below - got))
        return got

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, MAX_TRACKERS - 1), reset=st.booleans(),
          limit=st.none() | st.integers(0, NPAGES + 2))
    def collect(self, i: int, reset: bool, limit: int | None) -> None:
        t = self.live[i % len(self.live)]
        if t.gone:
            with pytest.raises(pw.TargetGone):
                t.tracker.collect(reset=reset, max_pages=limit)
            return
        got = self._check(t, t.tracker.collect(reset=reset, max_pages=limit), limit)
        if reset:
            t.must -= got
            t.may -= got
            if limit is None:
                t.may.clear()

    @precondition(lambda self: bool(self.live))
    @rule()
    def collect_every_tracker(self) -> None:
        for t in self.live:
            if t.gone:
                with pytest.raises(pw.TargetGone):
                    t.tracker.collect()
            else:
                self._check(t, t.tracker.collect(), None)
                t.must.clear()
                t.may.clear()

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, MAX_TRACKERS - 1))
    def reset(self, i: int) -> None:
        t = self.live[i % len(self.live)]
        if t.gone:
            with pytest.raises(pw.TargetGone):
                t.tracker.reset()
            return
        t.tracker.reset()
        t.must.clear()
        t.may.clear()

    # ---- what the program does to its memory --------------------------------------------------

    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, 4),
          prot=st.sampled_from([mmap.PROT_READ, 0]))
    def program_mprotects_and_back(self, first: int, n: int, prot: int) -> None:
        end = min(NPAGES, first + n)
        _native.mprotect(self.addr + first * PAGE_SIZE, (end - first) * PAGE_SIZE, prot)
        _native.mprotect(self.addr + first * PAGE_SIZE, (end - first) * PAGE_SIZE, _RW)
        # mprotect cannot tell whether a write went there meanwhile: it reports them
        for t in self.live:
            if t.backend == "mprotect":
                t.may.update(t.pages(first, end))

    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, 4))
    def program_drops_pages(self, first: int, n: int) -> None:
        end = min(NPAGES, first + n)
        _native.madvise(self.addr + first * PAGE_SIZE, (end - first) * PAGE_SIZE,
                        MADV_DONTNEED)
        self._replaced(first, end)

    @rule()
    def program_maps_new_memory_at_the_same_address(self) -> None:
        libc.munmap(self.addr, NPAGES * PAGE_SIZE)
        p = libc.mmap(self.addr, NPAGES * PAGE_SIZE, _RW, _PRIVATE | _MAP_FIXED, -1, 0)
        assert p == self.addr
        for t in self.live:
            if t.backend in ("uffd-async", "uffd-sync"):
                t.gone = True  # not registered: the registration is the identity
        # mprotect and compare: the kernel shows nothing that tells new private memory
        # from the old: mprotect reports it whole, compare what differs from its snapshot
        self._replaced(0, NPAGES)

    @rule(pages=st.lists(st.integers(0, NPAGES - 1), max_size=3))
    def fork_and_the_child_writes(self, pages: list[int]) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                for p in pages:
                    ctypes.memset(self.addr + p * PAGE_SIZE, 9, 1)
                for t in self.live:
                    try:
                        t.tracker.collect()
                        code = 2
                    except pw.PagewatchError as exc:
                        if "parent" not in str(exc):
                            code = 3
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # Private memory: the child wrote its own copy; the parent's trackers see nothing.

    @invariant()
    def memory_is_mapped(self) -> None:
        if self.addr:
            _native.msync(self.addr, NPAGES * PAGE_SIZE, 1)  # MS_ASYNC: fails on a hole


def _runs() -> list[object]:
    runs = []
    for name in _ALONE:
        runs.append(pytest.param([name], id=name, marks=[
            pytest.mark.backend(name),
            pytest.mark.skipif(not _available(name), reason=f"{name} unavailable here")]))
    sync = "uffd-async" if _available("uffd-async") else "uffd-sync"
    mixed = [sync, "uffd-sync", "mprotect", "compare"]
    runs.append(pytest.param([b for b in mixed if _available(b)], id="mixed"))
    return runs


@pytest.mark.parametrize("backends", _runs())
def test_trackers_keep_the_model_of_what_was_written(backends: list[str]) -> None:
    machine = type(f"Model_{'_'.join(backends)}", (TrackerModel,), {"backends": backends})
    test = machine.TestCase
    # No shrinking: it can take minutes (past the suite's timeout); a failure prints its
    # steps (at most STEPS) as they ran.
    test.settings = settings(derandomize=True, max_examples=EXAMPLES, stateful_step_count=STEPS,
                             deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
    test().runTest()
