"""The Tracker contract, pinned for every backend available on this kernel.

Each test runs once per backend; a backend this kernel lacks is skipped with the reason
its ``available()`` gives (the kernel matrix runs it where it exists).
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
import time

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native
from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.uffd import Userfaultfd

SECONDS = float(os.environ.get("PAGEWATCH_TEST_SECONDS", "1.5"))
MIN_ROUNDS = 6


def aligned(npages: int) -> mmap.mmap:
    """Page-aligned private anonymous memory (what numpy arrays live in), so page i of the
    tracker is page i of the target."""
    return mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def pages_of(d: pw.DirtyPages) -> set[int]:
    return {int(p) for p in d.pages()}


# ---- ground truth ------------------------------------------------------------------------

N = 256
rng = np.random.default_rng(7)
PATTERNS = {
    "sequential": list(range(10, 60)),
    "strided": list(range(0, N, 16)),
    "random": sorted({int(x) for x in rng.integers(0, N, 40)}),
    "first-last": [0, N - 1],
    "every-page": list(range(N)),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_collect_reports_exactly_the_pages_written(backend: str, pattern: str) -> None:
    m = aligned(N)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1  # populated: soft-dirty reports new mappings whole (VM_SOFTDIRTY)
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        assert pages_of(t.collect()) == set()
        for p in PATTERNS[pattern]:
            a[p * PAGE_SIZE + 123] = 2
        assert pages_of(t.collect()) == set(PATTERNS[pattern])
        assert pages_of(t.collect()) == set()


def _sync_wp_takes(m: mmap.mmap) -> bool:
    """Whether synchronous uffd-wp can register this memory (anonymous, shmem -- tmpfs,
    also under an overlay -- or hugetlbfs), asked of the kernel directly."""
    try:
        with Userfaultfd(0) as u:
            u.register(_native.buffer_info(m)[0], len(m))
        return True
    except pw.PagewatchError:
        return False


@pytest.mark.parametrize("kind", ["shared-anonymous", "file-shared", "file-private"])
def test_shared_and_file_mappings_are_tracked(backend: str, kind: str, tmp_path: object) -> None:
    size = 32 * PAGE_SIZE
    if kind == "shared-anonymous":
        m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    else:
        path = os.path.join(str(tmp_path), "data")
        with open(path, "wb") as f:
            f.write(b"\x01" * size)
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED if kind == "file-shared"
                          else mmap.MAP_PRIVATE)
    m[:] = b"\x01" * size
    if backend == "uffd-sync" and not _sync_wp_takes(m):
        with pytest.raises(pw.Unsupported):
            pw.Tracker(m, backend=backend)
        return
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        for p in (0, 7, 31):
            m[p * PAGE_SIZE + 1] = 2
        assert pages_of(t.collect()) == {0, 7, 31}
        assert pages_of(t.collect()) == set()


def test_collect_without_reset_keeps_pages_pending(backend: str) -> None:
    m = aligned(16)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        a[3 * PAGE_SIZE] = 9
        assert pages_of(t.collect(reset=False)) == {3}
        assert pages_of(t.collect(reset=False)) == {3}
        a[5 * PAGE_SIZE] = 9
        assert pages_of(t.collect()) == {3, 5}
        assert pages_of(t.collect()) == set()


def test_reset_forgets_earlier_writes(backend: str) -> None:
    m = aligned(16)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as t:
        a[PAGE_SIZE] = 2
        t.reset()
        assert pages_of(t.collect()) == set()
        a[2 * PAGE_SIZE] = 2
        assert pages_of(t.collect()) == {2}


def test_max_pages_returns_the_first_pages_and_resets_only_those(backend: str) -> None:
    m = aligned(64)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    written = [4, 9, 10, 30, 31, 32, 63]
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        for p in written:
            a[p * PAGE_SIZE] = 2
        assert pages_of(t.collect(max_pages=1)) == {4}
        assert pages_of(t.collect(max_pages=3)) == {9, 10, 30}
        assert pages_of(t.collect(reset=False, max_pages=2)) == {31, 32}
        assert pages_of(t.collect(max_pages=100)) == {31, 32, 63}
        assert pages_of(t.collect(max_pages=0)) == set()
        a[0] = 3
        assert pages_of(t.collect(max_pages=0)) == set()
        assert pages_of(t.collect()) == {0}


@pytest.mark.parametrize("nruns", [3, 40], ids=["few-runs", "many-runs"])
def test_reset_of_given_pages_forgets_only_those_and_the_others_stay_reported(
        backend: str, nruns: int) -> None:
    # uffd-async resets a few runs one ioctl each and many runs by one walk of their span
    # (the others inside that span must stay reported): both ways, every backend.
    npages = 4 * nruns + 8
    m = aligned(npages)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        written = list(range(1, 4 * nruns, 2))  # every other page: isolated runs
        for p in written:
            a[p * PAGE_SIZE] = 2
        got = t.collect(reset=False)
        assert pages_of(got) == set(written)
        chosen = pw.DirtyPages.from_pages(np.array(written[::2]), got.base, got.npages)
        t.reset(chosen)
        a[(npages - 1) * PAGE_SIZE] = 3  # a write after the reset, outside the pages
        assert pages_of(t.collect(max_pages=1)) == {written[1]}
        assert pages_of(t.collect()) == set(written[3::2]) | {npages - 1}
        assert pages_of(t.collect()) == set()
        t.reset(t.collect(reset=False))  # nothing written: nothing to do
        with pytest.raises(ValueError, match="this tracker's region"):
            t.reset(pw.DirtyPages.from_pages(np.array([1]), got.base, got.npages + 1))


def test_a_reset_of_given_pages_leaves_them_reported_to_an_overlapping_tracker(
        backend: str) -> None:
    m = aligned(32)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as one, pw.Tracker(m, backend=backend) as two:
        one.reset()
        two.reset()
        for p in (2, 5, 6, 20):
            a[p * PAGE_SIZE] = 2
        one.reset(pw.DirtyPages.from_pages(np.array([2, 5, 6]), one.base, 32))
        assert pages_of(one.collect()) == {20}
        assert pages_of(two.collect()) == {2, 5, 6, 20}


def test_an_unaligned_target_is_tracked_at_the_pages_that_cover_it(backend: str) -> None:
    m = aligned(8)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    view = a[100:3 * PAGE_SIZE + 5]  # pages 0..3 of the mapping
    with pw.Tracker(view, backend=backend) as t:
        t.reset()
        assert t.offset == 100 and t.region.npages == 4
        view[-1] = 7  # byte 3*PAGE_SIZE+4 of the mapping: page 3
        d = t.collect()
        assert pages_of(d) == {3}
        assert (3 * PAGE_SIZE + 4) in d and 100 not in d


# ---- no lost write under concurrency -----------------------------------------------------

def test_no_write_is_lost_while_writers_race_collect(backend: str) -> None:
    """Writers change pages continuously (Python threads, and C outside the GIL) while the
    main thread collects with reset.  Snapshots taken right after each collect prove that a
    page whose content changed between snapshots i-1 and i was reported by collect i or
    i+1: the change happened after collect i-1 returned."""
    npages = 512
    m = aligned(npages)
    a = np.frombuffer(m, np.uint64)
    a[:] = 0
    words_per_page = PAGE_SIZE // 8
    stop = threading.Event()

    def py_writer(seed: int) -> None:
        r = np.random.default_rng(seed)
        counter = 0
        while not stop.is_set():
            for p in r.integers(0, npages, 64):
                counter += 1
                a[int(p) * words_per_page + seed] = counter  # always a new value
            time.sleep(0)

    addr = _native.buffer_info(m)[0]

    def c_writer() -> None:
        # A new value every sweep: a page never returns to a content it had (A-B-A), which
        # the compare backend could not see (see its docstring) and the snapshots neither.
        v = 0
        while not stop.is_set():
            v += 1
            _native.poke(addr + 200 * PAGE_SIZE + 64, 100 * PAGE_SIZE, 3 * PAGE_SIZE, v, 8)

    with pw.Tracker(m, backend=backend) as t:
        threads = [threading.Thread(target=py_writer, args=(s,)) for s in (1, 2)]
        threads.append(threading.Thread(target=c_writer))
        for th in threads:
            th.start()
        collects: list[set[int]] = []
        snaps: list[np.ndarray] = []
        # At least MIN_ROUNDS rounds however slow the machine (a loaded TCG guest gave 2 in
        # SECONDS), at most 60 s.
        start = time.monotonic()
        try:
            while (time.monotonic() < start + SECONDS or len(snaps) < MIN_ROUNDS) \
                    and time.monotonic() < start + 60:
                collects.append(pages_of(t.collect()))
                snaps.append(a.copy())
        finally:
            stop.set()
            for th in threads:
                th.join()
        collects.append(pages_of(t.collect()))
    assert len(snaps) >= MIN_ROUNDS, f"{len(snaps)} rounds in 60 s: too few to mean anything"
    changed_total = 0
    for i in range(1, len(snaps)):
        before = snaps[i - 1].reshape(npages, words_per_page)
        after = snaps[i].reshape(npages, words_per_page)
        changed = set(np.flatnonzero((before != after).any(axis=1)).tolist())
        changed_total += len(changed)
        lost = changed - (collects[i] | collects[i + 1])
        assert not lost, f"round {i}: pages {sorted(lost)[:10]} changed but were never reported"
    assert changed_total > 0, "the writers changed nothing: the test proved nothing"


# ---- writes by the kernel ----------------------------------------------------------------

def test_a_write_by_the_kernel_is_reported(backend: str) -> None:
    if backend == "mprotect":
        _a_write_by_the_kernel_fails_with_efault_under_mprotect()
        return
    m = aligned(8)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    try:
        with pw.Tracker(m, backend=backend) as t:
            t.reset()
            os.write(w, b"x" * 100)
            n = os.readv(r, [memoryview(m)[2 * PAGE_SIZE:2 * PAGE_SIZE + 100]])
            assert n == 100
            s1.sendall(b"y" * 10)
            s2.recv_into(memoryview(m)[5 * PAGE_SIZE:5 * PAGE_SIZE + 10])
            assert pages_of(t.collect()) == {2, 5}
    finally:
        for fd in (r, w):
            os.close(fd)
        s1.close()
        s2.close()


def _a_write_by_the_kernel_fails_with_efault_under_mprotect() -> None:
    """mprotect's documented limit: a protected page is read-only to the kernel too."""
    m = aligned(8)
    np.frombuffer(m, np.uint8)[:] = 1
    r, w = os.pipe()
    try:
        with pw.Tracker(m, backend="mprotect") as t:
            t.reset()
            os.write(w, b"x" * 100)
            with pytest.raises(OSError) as info:
                os.readv(r, [memoryview(m)[2 * PAGE_SIZE:2 * PAGE_SIZE + 100]])
            assert info.value.errno == errno.EFAULT
            assert pages_of(t.collect()) == set()
    finally:
        os.close(r)
        os.close(w)


# ---- independent trackers ----------------------------------------------------------------

def test_overlapping_trackers_do_not_disturb_each_other(backend: str) -> None:
    m = aligned(64)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as outer:
        outer.reset()
        a[10 * PAGE_SIZE] = 2  # written before the inner tracker exists
        with pw.Tracker(memoryview(m)[8 * PAGE_SIZE:24 * PAGE_SIZE], backend=backend) as inner:
            inner.reset()
            a[12 * PAGE_SIZE] = 2
            a[40 * PAGE_SIZE] = 2
            assert pages_of(inner.collect()) == {4}  # page 12 of the mapping
            a[13 * PAGE_SIZE] = 2
            assert pages_of(outer.collect()) == {10, 12, 13, 40}
            assert pages_of(inner.collect()) == {5}
            inner.reset()
            assert pages_of(outer.collect()) == set()
            a[14 * PAGE_SIZE] = 2
        # closing the inner tracker leaves the outer one whole
        a[15 * PAGE_SIZE] = 2
        assert pages_of(outer.collect()) == {14, 15}


def test_trackers_of_different_backends_coexist(backend: str) -> None:
    other = "compare" if backend != "compare" else "uffd-async"
    ok, why = next((b.available, b.reason) for b in pw.list_backends() if b.name == other)
    if not ok:
        pytest.skip(f"{other} unavailable: {why}")
    m = aligned(16)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as t1, pw.Tracker(m, backend=other) as t2:
        t1.reset()
        t2.reset()
        a[3 * PAGE_SIZE] = 5
        assert pages_of(t1.collect()) == {3}
        a[4 * PAGE_SIZE] = 5
        assert pages_of(t2.collect()) == {3, 4}
        assert pages_of(t1.collect()) == {4}


# ---- lifecycle and bad input -------------------------------------------------------------

def test_a_closed_tracker_refuses_to_collect_and_leaves_memory_writable(backend: str) -> None:
    m = aligned(4)
    t = pw.Tracker(m, backend=backend)
    t.close()
    t.close()  # idempotent
    m[0] = 1  # still writable
    with pytest.raises(ValueError, match="closed"):
        t.collect()


def test_munmap_of_a_tracked_target_is_an_error_not_a_crash(backend: str) -> None:
    addr = _native.buffer_info(mm := aligned(8))[0]
    np.frombuffer(mm, np.uint8)[:] = 1
    t = pw.Tracker(pw.Region(addr, 8 * PAGE_SIZE), backend=backend)
    t.reset()
    mm.close()  # munmap
    with pytest.raises(pw.TargetGone, match="unmapped"):
        t.collect()
    t.close()


def test_fork_of_a_tracking_process_leaves_the_child_working(backend: str) -> None:
    m = aligned(8)
    a = np.frombuffer(m, np.uint8)
    a[:] = 1
    with pw.Tracker(m, backend=backend) as t:
        t.reset()
        pid = os.fork()
        if pid == 0:  # child: its copy of the memory must be writable and keep values
            code = 1
            try:
                a[3 * PAGE_SIZE] = 42
                code = 0 if a[3 * PAGE_SIZE] == 42 else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a[2 * PAGE_SIZE] = 5
        assert 2 in pages_of(t.collect())


@pytest.mark.parametrize("target, err", [
    (b"read-only bytes", pw.InvalidRange),
    (bytearray(), pw.InvalidRange),
    (np.zeros((64, 64), np.uint8)[:, ::2], pw.InvalidRange),
    (pw.Region(0, PAGE_SIZE), pw.InvalidRange),
    (pw.Region(PAGE_SIZE * 16, 0), pw.InvalidRange),
    (12345, TypeError),
])
def test_bad_targets_are_refused_with_a_reason(backend: str, target: object,
                                                err: type[Exception]) -> None:
    with pytest.raises(err) as info:
        pw.Tracker(target, backend=backend)
    assert len(str(info.value)) > 10


def test_a_read_only_mapping_is_refused(backend: str) -> None:
    m = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ)
    addr = _native.buffer_info(m)[0]
    with pytest.raises(pw.InvalidRange, match="not writable"):
        pw.Tracker(pw.Region(addr, PAGE_SIZE), backend=backend)


def test_unknown_backend_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backend 'nope'.*uffd-async"):
        pw.Tracker(bytearray(PAGE_SIZE), backend="nope")


def test_an_unavailable_backend_raises_unsupported_with_its_reason() -> None:
    missing = [b for b in pw.list_backends() if not b.available]
    if not missing:
        pytest.skip("every backend is available on this kernel")
    with pytest.raises(pw.Unsupported) as info:
        pw.Tracker(bytearray(PAGE_SIZE), backend=missing[0].name)
    assert missing[0].reason in str(info.value)


def test_pagewatch_backend_environment_variable_overrides_auto(
        monkeypatch: pytest.MonkeyPatch) -> None:
    avail = [b.name for b in pw.list_backends() if b.available]
    last = avail[-1]
    monkeypatch.setenv("PAGEWATCH_BACKEND", last)
    with pw.Tracker(bytearray(PAGE_SIZE * 2)) as t:
        assert t.backend == last
        assert "PAGEWATCH_BACKEND" in t.backend_reason
