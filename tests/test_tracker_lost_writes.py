"""Writes that were lost or wrongly reported (issue 10), each pinned on every backend it
concerns.  The repros these come from are in /work/shared/repros/ (01-10, soak_r1/r2/r5).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.base import backend_class
from pagewatch.kernel.constants import MADV_DONTNEED, MADV_HUGEPAGE, PAGE_SIZE
from tests.conftest import backend_params
from tests.conftest import page_list as pages

_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED_NOREPLACE = 0x100000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


every_backend = pytest.mark.parametrize("backend", backend_params())


def only(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("backend", backend_params(names))


def raw_map(npages: int, at: int | None = None, flags: int = _PRIVATE, fd: int = -1) -> int:
    """An mmap by address (at ``at``, which must be free, if given)."""
    extra = _MAP_FIXED_NOREPLACE if at is not None else 0
    p = libc.mmap(at, npages * PAGE_SIZE, _RW, flags | extra, fd, 0)
    assert p not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    if at is not None and p != at:
        libc.munmap(p, npages * PAGE_SIZE)
        pytest.fail("the kernel did not map at the address asked for")
    return int(p)


def poke(addr: int, value: int = 1) -> None:
    ctypes.memset(addr, value, 1)


# ---- 1. MADV_DONTNEED ----------------------------------------------------------------------

@every_backend
def test_a_write_after_madv_dontneed_is_reported(backend: str,
                                                 track: Callable[..., pw.Tracker]) -> None:
    """uffd-sync lost every later write to zapped pages: the zap drops the uffd-wp bit of
    anonymous pages, so the next write faulted nowhere (repro 01)."""
    m = mmap.mmap(-1, 8 * PAGE_SIZE, flags=_PRIVATE)
    a = np.frombuffer(m, np.uint8)
    a[:] = 7
    t = track(m, backend)
    t.reset()
    _native.madvise(int(_native.buffer_info(m)[0]), 8 * PAGE_SIZE, MADV_DONTNEED)
    for i in range(3):
        a[2 * PAGE_SIZE] = i + 1
        got = pages(t.collect())
        # The first collect may report the zapped pages too: their content changed (zeros).
        assert 2 in got and (i == 0 or got == [2]), (i, got)
    assert pages(t.collect()) == []


# ---- 2. the program's own mprotect -----------------------------------------------------------

@every_backend
def test_pages_the_program_mprotects_and_back_are_reported_when_written(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    """mprotect lost writes to pages that were clean when the program made them read-only
    and writable again: they were left writable and untracked (repro 02)."""
    m = mmap.mmap(-1, 8 * PAGE_SIZE, flags=_PRIVATE)
    a = np.frombuffer(m, np.uint8)
    addr = int(_native.buffer_info(m)[0])
    t = track(m, backend)
    _native.mprotect(addr, 4 * PAGE_SIZE, mmap.PROT_READ)
    _native.mprotect(addr, 4 * PAGE_SIZE, _RW)
    first = pages(t.collect())
    assert set(first) <= {0, 1, 2, 3}  # may be reported once: protection was lost
    for i in range(3):
        a[2 * PAGE_SIZE] = i + 1
        a[6 * PAGE_SIZE] = i + 1
        assert pages(t.collect()) == [2, 6]


@only("mprotect")
def test_mprotect_reports_pages_the_program_made_writable_as_written(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    """Protection lost behind the tracker's back: a write could have gone there unseen, so
    the pages are reported (once) and protected again."""
    m = mmap.mmap(-1, 8 * PAGE_SIZE, flags=_PRIVATE)
    addr = int(_native.buffer_info(m)[0])
    t = track(m, backend)
    _native.mprotect(addr + PAGE_SIZE, 2 * PAGE_SIZE, _RW)
    m[PAGE_SIZE] = 1  # no fault: the program made it writable
    assert pages(t.collect()) == [1, 2]
    assert pages(t.collect()) == []
    m[2 * PAGE_SIZE] = 1
    assert pages(t.collect()) == [2]


# ---- 3. compare's failed collect ---------------------------------------------------------------

@only("compare")
def test_a_failed_compare_collect_loses_nothing_and_is_not_target_gone(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    """A collect that failed part-way had already taken the pages before the failure into
    its snapshot (never reported again), and said "unmapped" of mapped memory (repro 04)."""
    m = mmap.mmap(-1, 40 * PAGE_SIZE, flags=_PRIVATE)
    a = np.frombuffer(m, np.uint8)
    addr = int(_native.buffer_info(m)[0])
    t = track(m, backend)
    a[0] = 1
    a[20 * PAGE_SIZE] = 1
    _native.mprotect(addr + 30 * PAGE_SIZE, PAGE_SIZE, 0)  # PROT_NONE
    with pytest.raises(pw.PagewatchError, match="cannot be read") as info:
        t.collect()
    assert not isinstance(info.value, pw.TargetGone)
    assert info.value.errno == errno.EFAULT
    _native.mprotect(addr + 30 * PAGE_SIZE, PAGE_SIZE, _RW)
    assert pages(t.collect(max_pages=1)) == [0]
    assert pages(t.collect()) == [20]
    assert pages(t.collect()) == []


# ---- 4. max_pages, validated in one place -------------------------------------------------------

@every_backend
def test_max_pages_takes_any_integer_and_beyond_the_pages_means_all(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    """uffd-async truncated 2**64 + 1 to 1 in C, reset a page then raised; numpy integers
    were a TypeError there only; 2**63 overflowed on three backends (repros 05, 06)."""
    m = mmap.mmap(-1, 8 * PAGE_SIZE, flags=_PRIVATE)
    a = np.frombuffer(m, np.uint8)
    t = track(m, backend)
    other = track(m, backend)
    for limit in (np.int64(2), np.uint64(2), 2):
        a[0] ^= 1
        a[3 * PAGE_SIZE] ^= 1
        a[5 * PAGE_SIZE] ^= 1
        assert pages(t.collect(max_pages=limit)) == [0, 3]
        assert pages(t.collect()) == [5]
    assert pages(other.collect()) == [0, 3, 5]
    for limit in (8, 9, 2**63, 2**64 + 1, 10**30):
        a[0] ^= 1
        a[7 * PAGE_SIZE] ^= 1
        assert pages(t.collect(max_pages=limit)) == [0, 7], limit
        assert pages(other.collect(max_pages=limit, reset=False)) == [0, 7]
        assert pages(other.collect()) == [0, 7]
    a[1] ^= 1
    assert pages(t.collect(max_pages=0)) == []
    for bad, err in ((-1, ValueError), (-(2**70), ValueError), (1.5, TypeError),
                     ("2", TypeError), (True, TypeError)):
        with pytest.raises(err, match="max_pages"):
            t.collect(max_pages=bad)  # type: ignore[arg-type]
    assert pages(t.collect()) == [0], "a refused call resets nothing"


# ---- 5. a new mapping at the same address --------------------------------------------------------

@only("uffd-async", "uffd-sync")
def test_private_memory_replaced_at_the_same_address_raises_target_gone(
        backend: str) -> None:
    """The userfaultfd registration is the mapping's identity: new memory is not registered
    (repros 07, soak_r3)."""
    n = 16
    p = raw_map(n)
    t = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    poke(p + PAGE_SIZE)
    libc.munmap(p, n * PAGE_SIZE)
    raw_map(n, at=p)
    poke(p + 7 * PAGE_SIZE)
    try:
        with pytest.raises(pw.TargetGone, match="new memory mapped"):
            t.collect(max_pages=0)  # (the model-based test found uffd-async silent here)
        with pytest.raises(pw.TargetGone):
            t.collect()  # and stays so
    finally:
        t.close()
        libc.munmap(p, n * PAGE_SIZE)


@every_backend
def test_shared_memory_replaced_at_the_same_address_raises_target_gone(backend: str) -> None:
    """A memfd (or any file, or shared anonymous memory) mapped anew has another inode."""
    n = 8
    fds = []
    for _ in range(2):
        fd = os.memfd_create("pw-test")
        os.ftruncate(fd, n * PAGE_SIZE)
        fds.append(fd)
    p = raw_map(n, flags=mmap.MAP_SHARED, fd=fds[0])
    t = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    poke(p + PAGE_SIZE)
    libc.munmap(p, n * PAGE_SIZE)
    raw_map(n, at=p, flags=mmap.MAP_SHARED, fd=fds[1])
    poke(p + 2 * PAGE_SIZE)
    try:
        with pytest.raises(pw.TargetGone, match="new memory mapped"):
            t.collect()
    finally:
        t.close()
        libc.munmap(p, n * PAGE_SIZE)
        for fd in fds:
            os.close(fd)


@only("mprotect", "compare")
def test_private_memory_replaced_at_the_same_address_loses_no_write(backend: str) -> None:
    """New private anonymous memory at the same address looks, in every file the kernel
    offers, like the old one made writable: no TargetGone, but nothing is lost either
    (mprotect reports the whole new memory once, compare every page whose content
    differs), and tracking goes on over the new memory."""
    n = 8
    p = raw_map(n)
    ctypes.memset(p, 3, n * PAGE_SIZE)
    t = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    libc.munmap(p, n * PAGE_SIZE)
    raw_map(n, at=p)
    poke(p + 2 * PAGE_SIZE)
    try:
        got = pages(t.collect())
        assert 2 in got
        assert got == (list(range(n)))
        poke(p + 5 * PAGE_SIZE, 9)
        assert pages(t.collect()) == [5]
    finally:
        t.close()
        libc.munmap(p, n * PAGE_SIZE)


# ---- 6. /proc/self/mem ----------------------------------------------------------------------------

@only("mprotect")
def test_mprotect_does_not_see_a_write_through_proc_self_mem(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    """Pinned, as its module documents: FOLL_FORCE writes through the protection without a
    fault (repro 08).  The other backends see it (uffd: the kernel's fault goes through
    the userfaultfd; compare: by content)."""
    m = mmap.mmap(-1, 4 * PAGE_SIZE, flags=_PRIVATE)
    addr = int(_native.buffer_info(m)[0])
    t = track(m, backend)
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\x07" * 8, addr + 2 * PAGE_SIZE) == 8
    finally:
        os.close(fd)
    assert m[2 * PAGE_SIZE] == 7
    assert pages(t.collect()) == []
    m[2 * PAGE_SIZE] = 8  # the page is still tracked
    assert pages(t.collect()) == [2]


@only("uffd-async", "compare")
def test_a_write_through_proc_self_mem_is_reported(
        backend: str, track: Callable[..., pw.Tracker]) -> None:
    m = mmap.mmap(-1, 4 * PAGE_SIZE, flags=_PRIVATE)
    addr = int(_native.buffer_info(m)[0])
    t = track(m, backend)
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, b"\x07" * 8, addr + 2 * PAGE_SIZE)
    finally:
        os.close(fd)
    assert pages(t.collect()) == [2]


# ---- 8. a tracker that met TargetGone frees its address -------------------------------------------

@only("uffd-async", "uffd-sync")
def test_a_tracker_gone_without_close_does_not_hold_its_address(backend: str) -> None:
    """A uffd-async tracker that met TargetGone and was not closed kept its pages "covered":
    a new tracker on new memory there was never registered (soak_r1)."""
    n = 64
    p = raw_map(n)
    t1 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    libc.munmap(p, n * PAGE_SIZE)
    with pytest.raises(pw.TargetGone):
        t1.collect()
    raw_map(n, at=p)
    t2 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    try:
        poke(p + 5 * PAGE_SIZE)
        assert pages(t2.collect()) == [5]
    finally:
        t2.close()
        t1.close()
        libc.munmap(p, n * PAGE_SIZE)


@only("uffd-async", "uffd-sync")
def test_a_new_tracker_over_replaced_memory_is_not_fooled_by_a_stale_one(backend: str) -> None:
    """The old tracker never collected after the replacement: the new one must still
    register the new memory, and the old one must say its memory is gone."""
    n = 16
    p = raw_map(n)
    t1 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    libc.munmap(p, n * PAGE_SIZE)
    raw_map(n, at=p)
    t2 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=backend)
    try:
        poke(p + 3 * PAGE_SIZE)
        assert pages(t2.collect()) == [3]
        with pytest.raises(pw.TargetGone):
            t1.collect()
        poke(p + 4 * PAGE_SIZE)
        assert pages(t2.collect()) == [4]
    finally:
        t2.close()
        t1.close()
        libc.munmap(p, n * PAGE_SIZE)


@pytest.mark.parametrize("old, new", [("uffd-sync", "uffd-async"), ("uffd-async", "uffd-sync")])
def test_a_stale_tracker_is_found_by_a_new_tracker_of_the_other_userfaultfd_backend(
        old: str, new: str) -> None:
    """Found by the model-based test: the new backend's protection of the new memory hid
    the replacement from the old tracker (uffd-sync reads the uffd-wp bit, which uffd-async
    sets too), which then reported nothing, silently."""
    for name in (old, new):
        ok, why = backend_class(name).available()
        if not ok:
            pytest.skip(f"{name} unavailable here: {why}")
    n = 8
    p = raw_map(n)
    t1 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=old)
    libc.munmap(p, n * PAGE_SIZE)
    raw_map(n, at=p)
    t2 = pw.Tracker(pw.Region(p, n * PAGE_SIZE), backend=new)
    try:
        poke(p + 3 * PAGE_SIZE)
        assert pages(t2.collect()) == [3]
        with pytest.raises(pw.TargetGone):
            t1.collect()
    finally:
        t2.close()
        t1.close()
        libc.munmap(p, n * PAGE_SIZE)


# ---- 9. a passing descriptor shortage is not cached --------------------------------------------------

@pytest.mark.one_guest("6.1")  # EMFILE is the same on every kernel
def test_a_descriptor_shortage_at_the_first_trial_is_not_cached() -> None:
    """An EMFILE during the first availability trial made uffd-async, uffd-sync (and
    ProcessTracker) unavailable for good, with advice about a sysctl (soak_r2)."""
    code = textwrap.dedent("""
        import mmap, os, resource, sys
        import numpy as np, pagewatch as pw
        from pagewatch.backends.base import backend_class
        a = np.frombuffer(mmap.mmap(-1, 1 << 16), np.uint8)
        name = sys.argv[1]
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fill = []
        try:
            while True:
                fill.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(fill.pop())  # one descriptor free: the trial runs out in the middle
        try:
            pw.Tracker(a, backend=name)
            print("first: ok")
        except pw.PagewatchError as e:
            print("first:", type(e).__name__, e.errno, "sysctl" in str(e))
        for fd in fill:
            os.close(fd)
        print("available:", backend_class(name).available()[0])
        pw.Tracker(a, backend=name).close()
        print("second: ok")
    """)
    for name in ("uffd-async", "uffd-sync", "mprotect"):
        ok, why = backend_class(name).available()
        if not ok:
            continue
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True,
                             text=True, check=False)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] in ("first: ok",
                            f"first: PagewatchError {errno.EMFILE} False"), lines
        assert lines[1:] == ["available: True", "second: ok"], (name, lines)


# ---- 10. close gives the huge-page advice back ------------------------------------------------------

def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text[text.find("[") + 1:text.find("]")]


def _vma_of(addr: int) -> tuple[int, int, list[str]]:
    cur: tuple[int, int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                cur = (a, b) if a <= addr < b else None
            elif line.startswith("VmFlags") and cur:
                # (sd: soft-dirty's own mark on the mapping, cleared by its reset)
                return cur[0], cur[1], [f for f in line.split()[1:] if f != "sd"]
    raise AssertionError("not mapped")


@every_backend
@pytest.mark.parametrize("advice", ["none", "hugepage"])
def test_close_leaves_the_huge_page_advice_and_the_mapping_as_they_were(
        backend: str, advice: str) -> None:
    """close() left MADV_NOHUGEPAGE on the range, split off its mapping (soak_r5)."""
    n = 4 << 20
    p = raw_map(n // PAGE_SIZE)
    try:
        if advice == "hugepage":
            _native.madvise(p, n, MADV_HUGEPAGE)
        ctypes.memset(p, 1, n)
        inner = p + (1 << 20)
        before = _vma_of(inner)
        t = pw.Tracker(pw.Region(inner, 1 << 20), backend=backend)
        if backend != "compare":  # (which compares content: huge pages change nothing)
            assert "hg" not in _vma_of(inner)[2], "split: no huge pages while tracked"
        poke(inner + 5 * PAGE_SIZE, 2)
        assert pages(t.collect()) == [5]
        t.close()
        if advice == "none" and thp_mode() == "always" and backend != "compare":
            # Documented: no call clears the advice, and page-precise tracking needed it.
            assert "nh" in _vma_of(inner)[2]
        else:
            assert _vma_of(inner) == before
    finally:
        libc.munmap(p, n)


# ---- 11. see test_writewatch.py ---------------------------------------------------------------------

# ---- 12. other users of SIGSEGV, and fork --------------------------------------------------------------

_PRE = """
import faulthandler, mmap, signal, sys, threading, time
import numpy as np, pagewatch as pw
m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(m, np.uint8)
t = pw.Tracker(m, backend="mprotect")
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PRE + textwrap.dedent(code)],
                          capture_output=True, text=True, check=False)


@only("mprotect")
def test_a_handler_installed_after_a_tracker_gives_the_faults_back_at_the_next_collect(
        backend: str) -> None:
    """faulthandler.enable() or signal.signal(SIGSEGV) after a tracker took its faults
    away: the process died or hung (repro 09).  Every collect installs the handler again,
    chaining to the newcomer for faults that are not ours."""
    for setup in ("faulthandler.enable()",
                  "signal.signal(signal.SIGSEGV, lambda *x: None)"):
        out = _run(f"""
            {setup}
            t.collect()
            a[4096] = 1
            a[3 * 4096] = 1
            print(t.collect().pages().tolist())
        """)
        assert (out.returncode, out.stdout) == (0, "[1, 3]\n"), (setup, out.stderr)


@only("mprotect")
def test_faulthandler_still_reports_a_real_crash_through_the_tracker_handler(
        backend: str) -> None:
    out = _run("""
        faulthandler.enable()
        t.collect()
        a[4096] = 1
        import ctypes
        ctypes.string_at(0)  # a real crash, not ours
    """)
    assert out.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in out.stderr  # faulthandler's traceback


@only("mprotect")
def test_a_write_right_after_a_handler_is_installed_from_python_is_reported(
        backend: str) -> None:
    """faulthandler.enable() or signal.signal(SIGSEGV) and then a write to a tracked page,
    no collect between: the write went to the newcomer (faulthandler: the process died of
    SIGSEGV; a Python handler: the thread hung).  The tracker's handler is put back on top
    at once, chaining to the newcomer."""
    for setup in ("faulthandler.enable()",
                  "signal.signal(signal.SIGSEGV, lambda *x: None)"):
        out = subprocess.run([sys.executable, "-c", _PRE + textwrap.dedent(f"""
            {setup}
            a[4096] = 1
            print("survived", t.collect().pages().tolist())
        """)], capture_output=True, text=True, check=False, timeout=300)
        assert (out.returncode, out.stdout) == (0, "survived [1]\n"), (setup, out.stderr)


@only("mprotect")
def test_a_handler_installed_by_c_code_is_taken_back_at_the_next_collect(
        backend: str) -> None:
    """Pinned, as the module documents: a handler installed through ``sigaction`` by C code
    (here libc's, through ctypes) is not seen until the next collect, which chains to it."""
    out = _run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        sa = (ctypes.c_char * 152)()  # struct sigaction, zeroed: SIG_DFL
        assert libc.sigaction(signal.SIGSEGV, sa, None) == 0
        t.collect()  # takes the faults back
        a[4096] = 1
        print(t.collect().pages().tolist())
        assert libc.sigaction(signal.SIGSEGV, sa, None) == 0
        a[2 * 4096] = 1
        print("survived")
    """)
    assert out.returncode == -signal.SIGSEGV, out.stderr
    assert out.stdout == "[1]\n"


@only("mprotect")
def test_mprotect_starts_beside_a_thread_that_blocks_sigsegv_for_a_moment(backend: str) -> None:
    """A thread that starts or exits blocks every signal for a moment (glibc): one just
    joined was refused (CI, host suite under load).  A block that ends is waited out."""
    out = _run("""
        t.close()
        ready = threading.Event()
        def moment():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSEGV})
            ready.set()
            time.sleep(0.5)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGSEGV})
        th = threading.Thread(target=moment)
        th.start()
        ready.wait()
        pw.Tracker(m, backend="mprotect").close()
        th.join()
        print("started")
    """)
    assert (out.returncode, out.stdout) == (0, "started\n"), out.stderr


@only("mprotect")
def test_mprotect_refuses_to_start_while_a_thread_blocks_sigsegv(backend: str) -> None:
    out = _run("""
        t.close()
        ready, done = threading.Event(), threading.Event()
        def blocker():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSEGV})
            ready.set()
            done.wait()
        th = threading.Thread(target=blocker)
        th.start()
        ready.wait()
        try:
            pw.Tracker(m, backend="mprotect")
            print("started")
        except pw.PagewatchError as e:
            print("refused:", "block SIGSEGV" in str(e))
        done.set()
        th.join()
        pw.Tracker(m, backend="mprotect").close()
        print("then ok")
    """)
    assert (out.returncode, out.stdout) == (0, "refused: True\nthen ok\n"), out.stderr


@every_backend
def test_a_fork_child_copy_of_a_tracker_refuses_and_the_parent_goes_on(backend: str) -> None:
    """One behaviour on every backend (mprotect and compare went on in the child)."""
    m = mmap.mmap(-1, 8 * PAGE_SIZE, flags=_PRIVATE)
    with pw.Tracker(m, backend=backend) as t:
        m[PAGE_SIZE] = 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                m[2 * PAGE_SIZE] = 1
                for call in (t.collect, t.reset):
                    try:
                        call()
                        code = 2
                        break
                    except pw.PagewatchError as exc:
                        code = 0 if "parent" in str(exc) else 3
                t.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        m[3 * PAGE_SIZE] = 1
        assert pages(t.collect()) == [1, 3]



@every_backend
def test_changes_not_made_by_this_process_stores_are_seen_by_compare_only(backend: str) -> None:
    """Pinned, as the README documents: an alias mapping of the same memfd, ``pwrite`` to
    the file, another process writing shared memory (repro 10)."""
    n = 8
    fd = os.memfd_create("pw-alias")
    os.ftruncate(fd, n * PAGE_SIZE)
    a = mmap.mmap(fd, n * PAGE_SIZE)
    b = mmap.mmap(fd, n * PAGE_SIZE)  # a second mapping of the same pages
    shm = mmap.mmap(-1, n * PAGE_SIZE)  # shared anonymous, written by a child
    ta = pw.Tracker(a, backend=backend)
    ts = pw.Tracker(shm, backend=backend)
    try:
        b[PAGE_SIZE] = 1
        os.pwrite(fd, b"\x09", 2 * PAGE_SIZE)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            shm[3 * PAGE_SIZE] = 1
            os._exit(0)
        os.waitpid(pid, 0)
        seen = backend == "compare"
        assert pages(ta.collect()) == ([1, 2] if seen else [])
        assert pages(ts.collect()) == ([3] if seen else [])
        a[4 * PAGE_SIZE] = 1  # this process's own store: every backend
        assert pages(ta.collect()) == [4]
    finally:
        ta.close()
        ts.close()
        for m in (a, b, shm):
            m.close()
        os.close(fd)
