"""uffd-async: what the default backend adds to the Tracker contract (tests/test_tracker.py)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.base import backend_class
from pagewatch.kernel.constants import MADV_DONTNEED, MADV_HUGEPAGE, PAGE_SIZE, UffdFeature
from pagewatch.kernel.uffd import Userfaultfd

ok, why = backend_class("uffd-async").available()
pytestmark = [
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not ok, reason=f"uffd-async unavailable: {why}"),
]
HUGE = 2 << 20


def pages_of(d: pw.DirtyPages) -> set[int]:
    return {int(p) for p in d.pages()}


def test_auto_picks_uffd_async_for_a_large_numpy_array() -> None:
    a = np.zeros(1 << 28, np.uint8)
    with pw.Tracker(a) as t:
        assert t.backend == "uffd-async"
        assert "best available" in t.backend_reason


def test_never_touched_pages_are_not_reported_and_their_first_write_is() -> None:
    m = mmap.mmap(-1, 64 * PAGE_SIZE)  # nothing populated: WP_UNPOPULATED markers
    with pw.Tracker(m, backend="uffd-async") as t:
        assert pages_of(t.collect()) == set()
        m[7 * PAGE_SIZE] = 1
        assert pages_of(t.collect()) == {7}
        _ = m[20 * PAGE_SIZE]  # a read fault maps the zero page: not a write
        assert pages_of(t.collect()) == set()


def test_madv_dontneed_counts_as_a_write() -> None:
    """Zapping anonymous memory changes its content (to zeros): the kernel drops the
    uffd-wp bit and the page reads as written (userfaultfd.rst, async mode)."""
    m = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = b"\x01" * len(m)
    addr = _native.buffer_info(m)[0]
    with pw.Tracker(m, backend="uffd-async") as t:
        t.reset()
        _native.madvise(addr + 3 * PAGE_SIZE, 2 * PAGE_SIZE, MADV_DONTNEED)
        assert m[3 * PAGE_SIZE] == 0
        assert pages_of(t.collect()) == {3, 4}
        m[3 * PAGE_SIZE] = 5  # and tracking goes on there
        assert pages_of(t.collect()) == {3}


def test_madv_dontneed_of_shared_memory_changes_nothing_and_reports_nothing() -> None:
    """Shared memory keeps its pages in the page cache: the zap changes no content, and
    the kernel keeps the protection (a PTE marker)."""
    m = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    m[:] = b"\x01" * len(m)
    addr = _native.buffer_info(m)[0]
    with pw.Tracker(m, backend="uffd-async") as t:
        t.reset()
        _native.madvise(addr + 3 * PAGE_SIZE, 2 * PAGE_SIZE, MADV_DONTNEED)
        assert m[3 * PAGE_SIZE] == 1
        assert pages_of(t.collect()) == set()
        m[4 * PAGE_SIZE] = 5
        assert pages_of(t.collect()) == {4}


def _huge_aligned(npages_2m: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, (npages_2m + 1) * HUGE)
    addr = _native.buffer_info(m)[0]
    return m, -(-addr // HUGE) * HUGE


def _thp_enabled() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_enabled(), reason="transparent huge pages are off on this kernel")
def test_huge_pages_split_keeps_reports_page_precise() -> None:
    m, start = _huge_aligned(2)
    _native.madvise(start, 2 * HUGE, MADV_HUGEPAGE)
    ctypes.memset(start, 1, 2 * HUGE)  # THPs, where the kernel could make them
    with pw.Tracker(pw.Region(start, 2 * HUGE), backend="uffd-async") as t:
        t.reset()
        ctypes.memset(start + 5 * PAGE_SIZE, 2, 1)
        ctypes.memset(start + HUGE + 9 * PAGE_SIZE, 2, 1)
        assert pages_of(t.collect()) == {5, 512 + 9}
    del m


@pytest.mark.skipif(not _thp_enabled(), reason="transparent huge pages are off on this kernel")
def test_huge_pages_keep_reports_whole_huge_pages_at_most() -> None:
    m, start = _huge_aligned(1)
    _native.madvise(start, HUGE, MADV_HUGEPAGE)
    with pw.Tracker(pw.Region(start, HUGE), backend="uffd-async", huge_pages="keep") as t:
        ctypes.memset(start, 1, HUGE)
        got = pages_of(t.collect())
        assert got == set(range(512))  # every page written: exact either way
        ctypes.memset(start + 3 * PAGE_SIZE, 2, 1)
        got = pages_of(t.collect())
        assert 3 in got and got <= set(range(512))
    del m


def test_a_range_held_by_another_userfaultfd_is_refused_with_the_reason() -> None:
    m = mmap.mmap(-1, 4 * PAGE_SIZE)
    addr = _native.buffer_info(m)[0]
    with Userfaultfd(int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)) as other:
        other.register(addr, 4 * PAGE_SIZE)
        with pytest.raises(pw.PagewatchError, match="another userfaultfd"):
            pw.Tracker(m, backend="uffd-async")
    with pw.Tracker(m, backend="uffd-async") as t:  # free again once the other closed
        m[0] = 1
        assert pages_of(t.collect()) == {0}


def test_a_remapped_target_is_reported_not_silently_dropped() -> None:
    """mremap moves the VMA without its uffd registration (no EVENT_REMAP): the old range is
    a hole, and the tracker says so instead of reporting nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mremap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    size = 8 * PAGE_SIZE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    t = pw.Tracker(pw.Region(addr, size), backend="uffd-async")
    new = libc.mremap(ctypes.c_void_p(addr), size, 2 * size, 1)  # MREMAP_MAYMOVE
    assert new not in (None, ctypes.c_void_p(-1).value)
    if new == addr:
        pytest.skip("the kernel grew the mapping in place")
    with pytest.raises(pw.TargetGone):
        t.collect()
    t.close()
    libc.munmap(ctypes.c_void_p(new), 2 * size)


def test_collect_in_a_forked_child_is_refused() -> None:
    m = mmap.mmap(-1, 4 * PAGE_SIZE)
    with pw.Tracker(m, backend="uffd-async") as t:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                t.collect()
            except pw.PagewatchError as exc:  # the parent's, as on every backend
                code = 0 if "parent" in str(exc) else 2
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        m[0] = 1
        assert pages_of(t.collect()) == {0}


@pytest.mark.parametrize("reset", [True, False])
def test_a_tracker_made_during_a_lone_trackers_collect_hides_no_write_from_it(
        monkeypatch: pytest.MonkeyPatch, reset: bool) -> None:
    # A lone tracker collects without the hub's lock.  Another thread may meanwhile create
    # a tracker over the same pages, which resets them (their written state goes into the
    # log for the first): the collect must still report them.  The other thread's work is
    # run inside the collect's scan, deterministically.
    from pagewatch.backends import uffd_async

    m = mmap.mmap(-1, 8 * PAGE_SIZE)
    base, _, _ = _native.buffer_info(m)
    a = pw.Tracker(m, backend="uffd-async")
    others: list[pw.Tracker] = []
    real = uffd_async._collect_runs

    def racing(*args: int) -> np.ndarray:
        if not others:
            others.append(pw.Tracker(m, backend="uffd-async"))  # resets pages 3 and 5
        return real(*args)

    try:
        m[3 * PAGE_SIZE] = 1
        m[5 * PAGE_SIZE] = 1
        monkeypatch.setattr(uffd_async, "_collect_runs", racing)
        assert pages_of(a.collect(reset=reset)) == {3, 5}
        monkeypatch.undo()
        assert pages_of(a.collect()) == (set() if reset else {3, 5})
        assert pages_of(others[0].collect()) == set()  # it started after the writes
        m[4 * PAGE_SIZE] = 1
        assert pages_of(a.collect()) == {4}
        assert pages_of(others[0].collect()) == {4}
    finally:
        for t in others:
            t.close()
        a.close()
        m.close()


def test_a_collect_whose_scan_makes_no_progress_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # The native collect raises OSError(EAGAIN, ..., walk_end as filename2) when the kernel
    # stops short of the end (a partial hugetlb page under write-protect): the collect names
    # the address, as the general path does.
    import errno

    from pagewatch.backends import uffd_async

    m = mmap.mmap(-1, 4 * PAGE_SIZE)
    base, _, _ = _native.buffer_info(m)

    def stuck(*args: int) -> np.ndarray:
        raise OSError(errno.EAGAIN, "PAGEMAP_SCAN made no progress", "PAGEMAP_SCAN", None,
                      base + PAGE_SIZE)

    with pw.Tracker(m, backend="uffd-async") as t:
        monkeypatch.setattr(uffd_async, "_collect_runs", stuck)
        for reset in (True, False):
            with pytest.raises(pw.PagewatchError, match=f"no progress at {base + PAGE_SIZE:#x}"):
                t.collect(reset=reset)
        monkeypatch.undo()
        m[0] = 1
        assert pages_of(t.collect()) == {0}
    m.close()


@pytest.mark.parametrize("reset", [True, False])
def test_a_lone_trackers_collect_is_two_python_calls_and_takes_no_lock(reset: bool) -> None:
    # The fixed cost of a small collect, counted without a clock: Tracker.collect and the
    # backend's collect, one native call between them, the hub's lock not taken (it was
    # five or six Python calls, a WeakSet's len among them, and the lock).
    import sys
    from types import FrameType
    from typing import Any

    m = mmap.mmap(-1, 16 * PAGE_SIZE)
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":  # Class.method (co_qualname is Python 3.11+)
            owner = frame.f_locals.get("self")
            prefix = f"{type(owner).__name__}." if owner is not None else ""
            calls.append(prefix + frame.f_code.co_name)
        elif event == "c_call":
            calls.append(f"C:{getattr(arg, '__qualname__', arg)}")

    with pw.Tracker(m, backend="uffd-async") as t:
        hub = t._impl.hub  # type: ignore[union-attr]
        for _ in range(3):
            m[5 * PAGE_SIZE] = 1
            gen = getattr(hub.lock, "gen", None)
            sys.setprofile(profile)
            try:
                d = t.collect(reset=reset)
            finally:
                sys.setprofile(None)
            assert pages_of(d) == {5}
            python = [c for c in calls if not c.startswith("C:")]
            assert python == ["Tracker.collect", "UffdAsync.collect"], calls
            assert hub.lock.gen == gen, "the hub's lock was taken"
            # one system-calling native call, no lock method, no numpy call
            assert [c for c in calls if c.startswith("C:")] == [
                "C:len", "C:collect_runs", "C:object.__new__", "C:setprofile"], calls
            calls.clear()
    m.close()
