"""Snapshot: restore and update rewrite only the written pages, exactly, for every backend.

The random sequences against a numpy model are in test_snapshot_model.py.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import threading

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native
from pagewatch import snapshot as snapshot_mod
from pagewatch.backends.uffd_async import UffdAsync
from pagewatch.kernel.constants import PAGE_SIZE, PM_FILE, PM_SWAP
from pagewatch.kernel.pagemap import read_pagemap
from tests.conftest import aligned_array, backend_param

MADV_HUGEPAGE = 14
MADV_PAGEOUT = 21
HUGE = 2 << 20




def make(kind: str, npages: int) -> np.ndarray:
    if kind == "anonymous":
        return aligned_array(npages)
    return pw.snapshot_array(npages * PAGE_SIZE, np.uint8)


def fill(a: np.ndarray, seed: int) -> None:
    a[:] = np.random.default_rng(seed).integers(0, 256, a.size, dtype=np.uint8)


KINDS = ["anonymous", "snapshot_array"]


# ---- exactness ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_restore_puts_the_baseline_back_and_the_next_diff_is_empty(backend: str,
                                                                   kind: str) -> None:
    a = make(kind, 64)
    fill(a, 1)
    base = a.copy()
    with pw.Snapshot(a, backend=backend) as snap:
        assert snap.method == ("dontneed" if kind == "snapshot_array" else "copy")
        a[3 * PAGE_SIZE + 7] ^= 0xFF
        a[10 * PAGE_SIZE:14 * PAGE_SIZE] = 9
        a[-1] ^= 1
        assert set(snap.diff().pages().tolist()) == {3, 10, 11, 12, 13, 63}
        rewritten = snap.restore()
        assert set(rewritten.pages().tolist()) == {3, 10, 11, 12, 13, 63}
        assert np.array_equal(a, base)
        assert not snap.diff()
        # and again: the pages restored are tracked as before
        a[10 * PAGE_SIZE] ^= 1
        assert snap.diff().pages().tolist() == [10]
        snap.restore()
        assert np.array_equal(a, base)


@pytest.mark.parametrize("kind", KINDS)
def test_update_makes_the_current_content_the_baseline(backend: str, kind: str) -> None:
    a = make(kind, 32)
    fill(a, 2)
    with pw.Snapshot(a, backend=backend) as snap:
        a[5 * PAGE_SIZE:6 * PAGE_SIZE] = 1
        assert snap.update().pages().tolist() == [5]
        assert not snap.diff()
        saved = a.copy()
        a[5 * PAGE_SIZE] = 2
        a[20 * PAGE_SIZE] ^= 3
        assert snap.restore().pages().tolist() == [5, 20]
        assert np.array_equal(a, saved)


def test_restore_of_an_unaligned_target_leaves_its_neighbours_on_shared_pages_alone(
        backend: str) -> None:
    outer = aligned_array(8)
    fill(outer, 3)
    target = outer[100:-100]  # shares page 0 and page 7 with 100 bytes each
    base = target.copy()
    with pw.Snapshot(target, backend=backend) as snap:
        target[:] = 0
        outer[:100] = 0xAA
        outer[-100:] = 0xBB
        snap.restore()
        assert np.array_equal(target, base)
        assert (outer[:100] == 0xAA).all() and (outer[-100:] == 0xBB).all()


def test_restore_by_dropping_maps_the_memfd_page_again_instead_of_copying() -> None:
    a = pw.snapshot_array(16 * PAGE_SIZE, np.uint8)
    a[:] = 7
    with pw.Snapshot(a) as snap:
        a[4 * PAGE_SIZE] = 1
        start = a.ctypes.data + 4 * PAGE_SIZE

        def is_file_page() -> bool:
            return bool(int(read_pagemap("self", start, start + PAGE_SIZE)[0]) & PM_FILE)

        assert not is_file_page()  # the write made a private copy
        snap.restore()
        assert a[4 * PAGE_SIZE] == 7
        assert is_file_page()  # read back from the memfd: no copy was made


def test_dropping_more_runs_than_one_batch_drops_every_one() -> None:
    # madvise_runs hands the kernel 1024 runs per process_madvise() (one madvise per run
    # where the kernel refuses that): a run past a batch's end, and empty runs, count.
    npages = 2 * 1100 + 2
    m = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, np.uint8)
    a[:] = 7
    starts = np.arange(0, 2 * 1100, 2)
    runs = np.stack([starts, starts + 1], axis=1)
    runs[5] = (10, 10)  # empty: skipped
    _native.madvise_runs(_native.buffer_info(m)[0], runs, mmap.MADV_DONTNEED)
    pages = a.reshape(npages, PAGE_SIZE)[:, 0]
    dropped = np.zeros(npages, bool)
    dropped[starts] = True
    dropped[10] = False
    assert not pages[dropped].any()
    assert (pages[~dropped] == 7).all()
    del pages, a
    m.close()


def test_update_of_a_snapshot_array_writes_the_memfd_so_a_page_dropped_later_reads_it(
        backend: str) -> None:
    a = pw.snapshot_array(8 * PAGE_SIZE, np.uint8)
    with pw.Snapshot(a, backend=backend) as snap:
        a[2 * PAGE_SIZE:3 * PAGE_SIZE] = 5
        snap.update()
        # the program drops the page itself: it must come back with the new baseline
        _native.madvise(a.ctypes.data + 2 * PAGE_SIZE, PAGE_SIZE, mmap.MADV_DONTNEED)
        assert (a[2 * PAGE_SIZE:3 * PAGE_SIZE] == 5).all()
        a[2 * PAGE_SIZE] = 6
        snap.restore()
        assert (a[2 * PAGE_SIZE:3 * PAGE_SIZE] == 5).all()
        assert not a[:2 * PAGE_SIZE].any() and not a[3 * PAGE_SIZE:].any()


# ---- shape, method, memory ----------------------------------------------------------------

def test_a_dict_or_list_of_targets_is_one_snapshot_with_results_shaped_alike() -> None:
    grid, agents = aligned_array(4), pw.snapshot_array(2 * PAGE_SIZE, np.uint8)
    with pw.Snapshot({"grid": grid, "agents": agents}) as snap:
        assert snap.method == "mixed"
        assert "snapshot_array" in snap.method_reason
        grid[0] = 1
        agents[PAGE_SIZE] = 1
        d = snap.diff()
        assert set(d) == {"grid", "agents"}
        assert d["grid"].pages().tolist() == [0] and d["agents"].pages().tolist() == [1]
        r = snap.restore()
        assert isinstance(r, dict) and len(r["agents"]) == 1
        assert not grid.any() and not agents.any()
    with pw.Snapshot([grid, agents]) as snap:
        grid[PAGE_SIZE] = 3
        d = snap.diff()
        assert isinstance(d, list) and d[0].pages().tolist() == [1] and not d[1]
        assert snap.nbytes_baseline == 6 * PAGE_SIZE


def test_the_method_and_its_reason_are_reported() -> None:
    plain = aligned_array(4)
    with pw.Snapshot(plain) as snap:
        assert snap.method == "copy" and "snapshot_array" in snap.method_reason
    with pytest.raises(ValueError, match="dontneed"):
        pw.Snapshot(plain, method="dontneed")
    a = pw.snapshot_array(8 * PAGE_SIZE, np.uint8)
    with pw.Snapshot(a) as first:
        assert first.method == "dontneed"
        # pages dropped by the first would go back unseen by a second: refused
        with pytest.raises(ValueError, match="dropping"):
            pw.Snapshot(a[PAGE_SIZE:], method="copy")
    with pw.Snapshot(a[10:]) as part:
        assert part.method == "copy" and "page boundaries" in part.method_reason
        with pw.Snapshot(a[PAGE_SIZE:3 * PAGE_SIZE]) as other:  # shares page 1 with part
            assert other.method == "copy" and "another snapshot" in other.method_reason
        with pw.Snapshot(a[:PAGE_SIZE]) as other:  # page 0 is part's too
            assert other.method == "copy"
    with pw.Snapshot(a[PAGE_SIZE:3 * PAGE_SIZE]) as part:
        assert part.method == "dontneed"
        with pw.Snapshot(a[4 * PAGE_SIZE:]) as other:  # no page in common
            assert other.method == "dontneed"
    with pw.Snapshot([a[:2 * PAGE_SIZE], a[PAGE_SIZE:3 * PAGE_SIZE]]) as both:
        assert both.method == "copy"
    with pw.Snapshot(a, method="copy") as snap:
        assert snap.method == "copy" and snap.method_reason == "asked for (method='copy')"
    with pytest.raises(ValueError, match="method"):
        pw.Snapshot(a, method="fork")


def test_nbytes_baseline_counts_the_pages_the_baseline_holds() -> None:
    outer = aligned_array(4)
    with pw.Snapshot(outer[10:PAGE_SIZE + 20]) as snap:  # covers 2 pages
        assert snap.nbytes_baseline == 2 * PAGE_SIZE
    with pw.Snapshot(pw.snapshot_array(3 * PAGE_SIZE + 1, np.uint8)) as snap:
        assert snap.nbytes_baseline == 4 * PAGE_SIZE


def test_a_baseline_larger_than_available_memory_fails_up_front(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = aligned_array(64)
    monkeypatch.setattr(snapshot_mod, "_available_memory", lambda: 16 * PAGE_SIZE)
    with pytest.raises(pw.PagewatchError, match="available") as info:
        pw.Snapshot(a)
    assert info.value.errno == errno.ENOMEM
    # a snapshot_array needs no copy: it is not refused
    with pw.Snapshot(pw.snapshot_array(64 * PAGE_SIZE, np.uint8)) as snap:
        assert snap.method == "dontneed"


def test_a_baseline_larger_than_the_machine_is_refused_before_anything_is_copied() -> None:
    size = snapshot_mod._available_memory() + (256 << 20)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
    try:
        with pytest.raises(pw.PagewatchError, match="MiB are available"):
            pw.Snapshot(mm)
        assert int(read_pagemap("self", _native.buffer_info(mm)[0],
                                _native.buffer_info(mm)[0] + PAGE_SIZE)[0]) >> 63 == 0
    finally:
        mm.close()


def test_a_closed_snapshot_refuses_work_and_leaves_the_target_as_it_is() -> None:
    a = aligned_array(4)
    snap = pw.Snapshot(a)
    a[0] = 1
    snap.close()
    snap.close()
    assert snap.closed and a[0] == 1
    with pytest.raises(ValueError, match="closed"):
        snap.restore()


# ---- neighbours: other snapshots, trackers, fork ------------------------------------------

def test_snapshots_and_a_tracker_on_the_same_memory_do_not_disturb_each_other(
        backend: str) -> None:
    a = aligned_array(32)
    with pw.Snapshot(a, backend=backend) as s1, pw.Tracker(a, backend=backend) as t:
        a[0:PAGE_SIZE] = 1
        with pw.Snapshot(a, backend=backend) as s2:
            a[PAGE_SIZE * 5] = 2
            s1.restore()  # writes pages 0 and 5 back: the others see that as writes
            assert not a.any()
            # compare sees content: back to what it saw first, nothing changed for it
            assert t.collect().pages().tolist() == ([] if backend == "compare" else [0, 5])
            # s2's baseline has page 0 == 1, page 5 == 0 (compare sees no change there)
            assert s2.diff().pages().tolist() == ([0] if backend == "compare" else [0, 5])
            s2.restore()
            assert a[0] == 1 and a[5 * PAGE_SIZE] == 0
            assert 0 in s1.diff().pages().tolist()
            s1.restore()
            assert not a.any()


def test_a_forked_child_writing_its_copy_leaves_the_parents_snapshot_exact(
        backend: str) -> None:
    a = make("snapshot_array", 16)
    fill(a, 4)
    base = a.copy()
    with pw.Snapshot(a, backend=backend) as snap:
        a[PAGE_SIZE] ^= 1
        pid = os.fork()
        if pid == 0:  # child: write its copy everywhere, then leave without cleanup
            try:
                a[:] = 0
                code = 0 if not a.any() else 1
            finally:
                os._exit(locals().get("code", 2))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a[2 * PAGE_SIZE] ^= 1
        assert snap.diff().pages().tolist() == [1, 2]
        snap.restore()
        assert np.array_equal(a, base)


# ---- concurrent writers -------------------------------------------------------------------

# mprotect's and compare's races use nothing that differs between kernels: one guest suffices
@pytest.mark.one_guest("6.1", backends=("mprotect", "compare"))
@pytest.mark.parametrize("kind", KINDS)
def test_a_write_racing_restore_is_undone_or_reported(backend: str, kind: str) -> None:
    """Dropping restores (snapshot_array) promise it always; copy-back with check=True."""
    # each page's first write is a fault: seconds for 1024 pages in an emulated guest
    npages = 256 if os.environ.get("PAGEWATCH_KERNEL_MATRIX", "host") != "host" else 1024
    a = make(kind, npages)
    # each page written twice, at random moments: the second write may fall inside the
    # restore that rewrites the page after the first
    order = np.random.default_rng(8).permutation(np.tile(np.arange(npages), 2))
    with pw.Snapshot(a, backend=backend) as snap:
        done = threading.Event()

        def writer() -> None:
            for p in order.tolist():
                _native.poke(a.ctypes.data + p * PAGE_SIZE, 1, 1, 0x5A)
            done.set()

        th = threading.Thread(target=writer)
        rounds = 0
        th.start()
        while not done.is_set() or rounds < 3:
            snap.restore(check=kind == "anonymous")
            rounds += 1
        th.join()
        d = snap.diff().bitmap()
        holds = a.reshape(npages, PAGE_SIZE)[:, 0] == 0x5A
        assert not (holds & ~d).any(), f"{int((holds & ~d).sum())} racing writes lost"
        snap.restore()
        assert not a.any()


# ---- huge pages and swap ---------------------------------------------------------------

def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "absent"


@pytest.mark.skipif(_thp_mode() in ("never", "absent"),
                    reason=f"transparent huge pages are {_thp_mode()} on this kernel")
def test_a_target_on_transparent_huge_pages_kept_restores_exactly(backend: str) -> None:
    mm = mmap.mmap(-1, 4 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = _native.buffer_info(mm)[0]
    start = -(-addr // HUGE) * HUGE
    _native.madvise(start, 2 * HUGE, MADV_HUGEPAGE)
    a = np.frombuffer(mm, np.uint8)[start - addr:start - addr + 2 * HUGE]
    fill(a, 5)
    base = a.copy()
    with pw.Snapshot(a, backend=backend, huge_pages="keep") as snap:
        a[100] ^= 1
        a[HUGE + 12345] ^= 1
        snap.restore()
        assert np.array_equal(a, base)
        a[HUGE - 1] ^= 1
        snap.restore()
        assert np.array_equal(a, base)
    del a
    mm.close()


def _swap_active() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1


@pytest.mark.skipif(not _swap_active(), reason="no swap is active on this machine (the kernel "
                    "matrix guests turn it on: tests/vm/guest.py)")
@pytest.mark.parametrize("kind", KINDS)
def test_pages_swapped_out_while_written_are_restored(backend: str, kind: str) -> None:
    npages = 64
    a = make(kind, npages)
    fill(a, 6)
    base = a.copy()
    with pw.Snapshot(a, backend=backend) as snap:
        a[8 * PAGE_SIZE:40 * PAGE_SIZE] = 3
        _native.madvise(a.ctypes.data, npages * PAGE_SIZE, MADV_PAGEOUT)
        swapped = read_pagemap("self", a.ctypes.data, a.ctypes.data + npages * PAGE_SIZE)
        n_swapped = int(((swapped[8:40] & np.uint64(PM_SWAP)) != 0).sum())
        assert n_swapped > 0, "MADV_PAGEOUT swapped none of the written pages out"
        assert set(range(8, 40)) <= set(snap.diff().pages().tolist())
        snap.restore()
        assert np.array_equal(a, base)


def test_a_snapshot_array_freed_by_the_collector_under_the_area_lock_does_not_deadlock() -> None:
    # The garbage collector runs finalizers on whatever thread allocates: one that frees a
    # snapshot_array while that thread holds the area lock must not wait on that lock (the
    # snapshot model test hung there with a plain Lock).
    class Cycle:
        pass

    c = Cycle()
    c.me = c  # type: ignore[attr-defined]
    c.a = pw.snapshot_array(4096, "uint8")  # type: ignore[attr-defined]
    del c

    def collect_under_the_lock() -> None:
        with snapshot_mod._AREAS_LOCK:
            gc.collect()

    t = threading.Thread(target=collect_under_the_lock, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the finalizer waited on the lock its own thread holds"


@pytest.mark.parametrize("backend", [backend_param("uffd-async")])
def test_uffd_async_copy_back_restores_in_one_step_unless_another_tracker_reset_its_pages(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = aligned_array(256)
    fill(a, 3)
    base = a.copy()
    calls: list[str] = []
    for name in ("collect", "reset"):
        real = getattr(pw.Tracker, name)
        monkeypatch.setattr(pw.Tracker, name, lambda self, *args, _real=real, _name=name,
                            **kw: (calls.append(_name), _real(self, *args, **kw))[1])
    with pw.Snapshot(a, backend=backend) as snap:
        assert snap.method == "copy"
        a[5 * PAGE_SIZE] ^= 1
        a[100 * PAGE_SIZE:103 * PAGE_SIZE] = 7
        calls.clear()
        assert set(snap.restore().pages().tolist()) == {5, 100, 101, 102}
        assert calls == []  # one step: no collect, no reset through the Tracker
        assert np.array_equal(a, base)
        assert not snap.diff()
        a[7 * PAGE_SIZE] ^= 1  # protected again: seen
        assert snap.diff().pages().tolist() == [7]
        with pw.Tracker(a, backend=backend) as other:
            # its start reset page 7 for the snapshot: pending, so the general way
            a[9 * PAGE_SIZE] ^= 1
            calls.clear()
            assert set(snap.restore().pages().tolist()) == {7, 9}
            assert "collect" in calls and "reset" in calls
            assert np.array_equal(a, base)
            # the other tracker still sees what was written, and the restore's own writes
            assert set(other.collect().pages().tolist()) == {7, 9}
            a[9 * PAGE_SIZE] ^= 1  # shared, nothing pending: one step
            calls.clear()
            assert snap.restore().pages().tolist() == [9]
            assert calls == []
            assert np.array_equal(a, base)
            assert other.collect().pages().tolist() == [9]
            # a collect by the other tracker resets the snapshot's pages too: they are then
            # pending for it, which the general way reports (one step would miss them)
            a[7 * PAGE_SIZE] ^= 1
            a[11 * PAGE_SIZE] ^= 1
            assert set(other.collect().pages().tolist()) == {7, 11}
            calls.clear()
            assert set(snap.restore().pages().tolist()) == {7, 11}
            assert "collect" in calls and "reset" in calls
            assert np.array_equal(a, base)
            assert set(other.collect().pages().tolist()) == {7, 11}
        e = aligned_array(16)
        with pw.Tracker(e, backend=backend) as elsewhere:
            e[3 * PAGE_SIZE] = 1  # its reset is logged (two trackers): the log moves on,
            seq = UffdAsync.hub.seq
            assert elsewhere.collect().pages().tolist() == [3]
            assert UffdAsync.hub.seq > seq  # and nothing of it is the snapshot's
            a[13 * PAGE_SIZE] ^= 1
            calls.clear()
            assert snap.restore().pages().tolist() == [13]
            assert calls == []
            assert np.array_equal(a, base)
