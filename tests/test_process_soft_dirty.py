"""ProcessTracker's soft-dirty path: every reset is made while all threads of the target stop.

Reading pagemap bit 55 and writing ``clear_refs`` are two system calls; a write between them
would be lost.  ``remote.freeze.frozen`` stops every thread of the target (ptrace, no SIGSTOP) for
that window.  The freeze itself is tested on every kernel; the soft-dirty tests need
``CONFIG_MEM_SOFT_DIRTY`` (the kernel matrix runs them on Debian 6.1 and 6.12).

The no-lost-write tests let the target run while it is collected and take the ground truth
*inside* each freeze (a snapshot of its writable memory through ``/proc/PID/mem``, between the
read of the bits and their reset): every page whose content differs between two consecutive
snapshots must have been reported by the collect that ends the interval.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pagewatch as pw
from pagewatch import _native, cli, process
from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.maps import Mapping, maps
from pagewatch.process import ProcessTracker
from pagewatch.remote import procfs
from pagewatch.remote import soft_dirty as sd_module
from pagewatch.remote import tree as tree_mod
from pagewatch.remote.attach import UFFD_FLAG_SETS
from pagewatch.remote.freeze import frozen
from tests.targets.common import (
    HOLD_TRACE,
    PATTERN_STEPS,
    SLEEPING,
    SYS_READ,
    Target,
    build,
    duration,
    paced_pattern,
    pattern_target,
    python_target,
    python_workload,
)
from tests.test_process_truth import Snapshot, Verdict, judge, snapshot

sd_ok, sd_why = process.soft_dirty_available()
soft_dirty = [pytest.mark.backend("soft-dirty"),
              pytest.mark.skipif(not sd_ok, reason=f"soft-dirty unavailable: {sd_why}")]
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="the ptrace parts are implemented for x86-64 only")]


def states(pid: int) -> dict[int, str]:
    """State letter of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
    return out


def read_mem(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        return os.pread(f.fileno(), size, addr)


def wait_until(cond: Any, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def counting_again(pid: int, addr: int, n: int) -> Any:
    """A condition: each of the ``n`` counters at ``addr`` has moved since now."""
    before = read_mem(pid, addr, 8 * n)
    return lambda: all(read_mem(pid, addr + 8 * i, 8) != before[8 * i:8 * i + 8]
                       for i in range(n))


@pytest.fixture
def target() -> Iterator[Target]:
    build("pattern")
    t = pattern_target()
    yield t
    t.close()


# Busy threads, each counting in its own slot of a shared array (the address is printed).
COUNTERS = """
import ctypes, sys, threading
n = int(sys.argv[1])
slots = (ctypes.c_uint64 * 8)()
def count(i):
    while True:
        slots[i] += 1
for i in range(n):
    threading.Thread(target=count, args=(i,), daemon=True).start()
print(ctypes.addressof(slots), flush=True)
sys.stdin.read()
"""

# A thread that never stops making short-lived threads.
SPAWNER = """
import sys, threading
def spawn():
    while True:
        ts = [threading.Thread(target=lambda: sum(range(2000))) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
threading.Thread(target=spawn, daemon=True).start()
print("up", flush=True)
sys.stdin.read()
"""


# ---- the freeze (any kernel) -----------------------------------------------------------------

def test_a_freeze_stops_every_thread_and_the_thaw_lets_them_run_on() -> None:
    t = Target([sys.executable, "-c", COUNTERS, "3"])
    try:
        addr = int(t.read())
        size = 3 * 8
        wait_until(lambda: len(states(t.pid)) == 4)
        for _ in range(3):
            with frozen(t.pid) as info:
                assert set(states(t.pid).values()) == {"t"}  # ptrace-stopped, every one
                before = read_mem(t.pid, addr, size)
                time.sleep(0.05)
                assert read_mem(t.pid, addr, size) == before  # nothing ran meanwhile
            assert info["threads"] == 4 and info["gone"] == 0 and info["rounds"] >= 2
            assert info["stop_ms"] >= info["held_ms"] > 0
            wait_until(lambda: "t" not in states(t.pid).values())
            wait_until(counting_again(t.pid, addr, 3))
    finally:
        t.close()


def test_threads_created_during_a_freeze_are_stopped_too() -> None:
    t = Target([sys.executable, "-c", SPAWNER])
    try:
        assert t.read() == "up"
        rounds = []
        for _ in range(max(10, int(10 * duration()))):
            with frozen(t.pid) as info:
                first = states(t.pid)
                time.sleep(0.005)
                again = states(t.pid)
            assert set(first.values()) == {"t"}, first
            assert again == first  # no thread appeared, none ran to its end
            rounds.append(info["rounds"])
        assert t.proc.poll() is None
        print(f"\nlistings per freeze: {rounds}")
    finally:
        t.close()


def test_the_targets_parent_sees_no_stop_and_a_stopped_target_stays_stopped(
        target: Target) -> None:
    assert target.cmd("w 1 1") == "ok"
    for _ in range(3):
        with frozen(target.pid):
            pass
    assert os.waitpid(target.pid, os.WUNTRACED | os.WNOHANG) == (0, 0)  # no job-control stop
    target.proc.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(target.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    with frozen(target.pid) as info:
        pass
    assert info["group_stopped"] == 1
    time.sleep(0.05)
    assert states(target.pid)[target.pid] == "T"  # back in its group-stop
    assert os.waitpid(target.pid, os.WUNTRACED | os.WNOHANG) == (0, 0)  # not reported again
    target.proc.send_signal(signal.SIGCONT)
    assert target.cmd("w 1 2") == "ok"


def test_a_freeze_racing_the_exit_of_a_run_child_finds_it_gone_never_refused() -> None:
    """Released from its exit stop, a ``pagewatch run`` child exits while the run may still
    freeze it for a collect: the kernel refuses PTRACE_SEIZE of an exiting thread (EPERM), and
    our tracer thread, which the freeze then asks to stop it, may have reaped it meanwhile.
    That is the end of the target, never a refusal: CI's 6.12 guest failed ``run`` with
    PermissionDenied there.  (The window is a few instructions wide: this loop exercises the
    path on every run but catches the race itself only now and then.)"""
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(30):
        pid, release_w, err_fd = tree_mod._fork_held(["true"], {})
        pidfd = os.pidfd_open(pid)
        handle, _ = _native.tracer_start(pid, release_w, pidfd, list(UFFD_FLAG_SETS))
        status, released = None, False
        try:
            deadline = time.monotonic() + 300
            while status is None and time.monotonic() < deadline:
                ev = _native.tracer_event(handle)
                if ev is None:
                    if released:
                        try:
                            with frozen(pid):
                                outcomes["frozen"] += 1
                        except pw.TargetGone:
                            outcomes["gone"] += 1
                    else:
                        time.sleep(0.001)
                    continue
                kind, a, *_ = ev
                if kind == tree_mod.EV_EXEC:
                    if a >= 0:
                        os.close(a)
                    _native.tracer_release(handle)
                elif kind == tree_mod.EV_EXIT:
                    _native.tracer_release(handle)
                    released = True
                elif kind == tree_mod.EV_GONE:
                    status = a
        finally:
            unread = _native.tracer_stop(handle)
            os.close(pidfd)
            os.close(err_fd)
        if status is None:
            status = unread
        assert status is not None and os.waitstatus_to_exitcode(status) == 0
    assert outcomes["frozen"] + outcomes["gone"] > 0, "no freeze raced an exit"


def test_a_sleep_and_a_read_cut_short_by_freezes_are_restarted(target: Target) -> None:
    # Long enough for three freezes however slow the machine: each waits until the target
    # sleeps again (a freeze that found it elsewhere would test nothing).
    target.send("sleep 3000")
    for _ in range(3):
        target.wait_in_syscall(*SLEEPING)
        with frozen(target.pid):
            pass
    word, rc, err, elapsed = target.read().split()
    assert (word, rc, err) == ("slept", "0", "0")  # not EINTR
    assert float(elapsed) >= 3.0  # the rest of the sleep was slept
    for _ in range(3):  # now it waits in read(0, ...)
        target.wait_in_syscall(SYS_READ)
        with frozen(target.pid):
            pass
    assert target.cmd("w 2 1") == "ok"


def test_a_thread_traced_by_a_debugger_is_refused_naming_it_and_nothing_stays_stopped() -> None:
    t = Target([sys.executable, "-c", COUNTERS, "2"])
    holder = None
    try:
        addr = int(t.read())
        wait_until(lambda: len(states(t.pid)) == 3)
        tid = max(states(t.pid))  # a thread other than the leader
        holder = subprocess.Popen([sys.executable, "-c", HOLD_TRACE, str(tid)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "tracing"
        with pytest.raises(pw.PermissionDenied) as exc, frozen(t.pid):
            pass
        assert (f"thread {tid} of process {t.pid} is already traced by process {holder.pid}"
                in str(exc.value))
        assert "detach that debugger" in str(exc.value)
        assert states(t.pid)[t.pid] != "t"  # what the failed freeze had seized was let go
        wait_until(counting_again(t.pid, addr, 2))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        t.close()


def test_a_dead_process_cannot_be_frozen() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(pw.TargetGone), frozen(proc.pid):
        pass


def test_the_run_tracer_stops_the_child_it_holds(tmp_path: Path) -> None:
    """``pagewatch run`` keeps its child's leader seized from a tracer thread; a freeze asks
    that thread to stop it (at the exec hold, and while it runs)."""
    out, enough = tmp_path / "out", tmp_path / "enough"
    # It runs until the test has frozen it often enough (a file appears), not for a time.
    code = ("import os, threading, time, sys\n"
            "def work(): sum(range(3_000_000))\n"
            "ts = [threading.Thread(target=work) for _ in range(2)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            f"while not os.path.exists({str(enough)!r}): sum(range(10000))\n"
            f"open({str(out)!r}, 'w').write('done')\n"
            "sys.exit(5)\n")
    pid, release_w, err_fd = tree_mod._fork_held([sys.executable, "-c", code], {})
    pidfd = os.pidfd_open(pid)
    handle, evfd = _native.tracer_start(pid, release_w, pidfd, list(UFFD_FLAG_SETS))
    infos: list[dict[str, Any]] = []
    status = None
    try:
        deadline = time.monotonic() + 300
        while status is None and time.monotonic() < deadline:
            ev = _native.tracer_event(handle)
            if ev is None:
                if infos and len(infos) < 6 and os.path.exists(f"/proc/{pid}"):
                    with frozen(pid) as info:  # while it runs
                        assert states(pid)[pid] == "t"
                    infos.append(info)
                    if len(infos) == 6:
                        enough.touch()
                time.sleep(0.01)
                continue
            kind, a, *_ = ev
            if kind == tree_mod.EV_EXEC:
                if a >= 0:
                    os.close(a)
                with frozen(pid) as info:  # held at the exec stop by the tracer
                    assert states(pid)[pid] == "t"
                infos.append(info)
                _native.tracer_release(handle)
            elif kind == tree_mod.EV_EXIT:
                _native.tracer_release(handle)
            elif kind == tree_mod.EV_GONE:
                status = a
    finally:
        _native.tracer_stop(handle)
        os.close(pidfd)
        os.close(err_fd)
        if status is None:  # else the tracer thread has reaped it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status is not None and os.waitstatus_to_exitcode(status) == 5
    assert out.read_text() == "done"
    assert len(infos) == 6 and all(i["by_tracer"] == 1 for i in infos), infos


def test_hugetlb_memory_is_recognised_by_its_device(hugetlb_pages: int) -> None:
    t = Target([sys.executable, "-c", HUGETLB, str(hugetlb_pages)])
    try:
        addrs = [int(x) for x in t.read().split()]
        devices = sd_module.hugetlb_devices(t.pid)
        hugetlb = {m.start for m in maps(t.pid)
                   if sd_module._dev(m.dev, 16) in devices}
        assert hugetlb == set(addrs)  # MAP_HUGETLB and a MFD_HUGETLB memfd; nothing else
    finally:
        t.close()


# ---- soft-dirty (kernels with CONFIG_MEM_SOFT_DIRTY) -----------------------------------------

def writable(pid: int) -> list[Mapping]:
    return [m for m in maps(pid) if m.writable and m.path not in process.SPECIAL_MAPPINGS]


class Truth:
    """Snapshots of the target's writable memory taken inside each freeze, just before the
    bits are reset (``clear_refs`` is wrapped), to judge each collect against."""

    def __init__(self, pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pid = pid
        self.snaps: list[Snapshot] = []
        self.snap_ms: list[float] = []  #: time each snapshot added to the stop
        real = sd_module.clear_refs

        def snapshot_then_clear(p: int | str, value: int) -> None:
            t0 = time.perf_counter()
            self.snaps.append(snapshot(pid, writable(pid)))
            self.snap_ms.append((time.perf_counter() - t0) * 1e3)
            real(p, value)

        monkeypatch.setattr(sd_module, "clear_refs", snapshot_then_clear)


def track_running(proc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
                  interval: float, resume: Callable[[int], object] = lambda judged: None,
                  max_intervals: int = 200) -> tuple[Verdict, list[float]]:
    """Collect from the running target every ``interval`` s and judge every collect;
    ``resume(n)`` after each (``n`` judged so far) gives a paced target its next part."""
    truth = Truth(proc.pid, monkeypatch)
    v = Verdict()
    stops = []
    with ProcessTracker(proc.pid, backend="soft-dirty") as p:
        assert p.backend == "soft-dirty" and len(truth.snaps) == 1
        resume(0)
        for _ in range(max_intervals):
            time.sleep(interval)
            if proc.poll() is not None:
                break
            try:
                d = p.collect()
            except pw.TargetGone:
                break
            assert d.stop_ms is not None and len(truth.snaps) >= 2
            stops.append(d.stop_ms - truth.snap_ms[-1])  # the stop a collect alone makes
            judge(truth.snaps[-2], truth.snaps[-1], d, v)
            resume(v.intervals)
    return v, stops


def freeze_times(stops: list[float]) -> str:
    if not stops:
        return "no freeze"
    return (f"target stopped per reset (without the test's snapshot): median "
            f"{statistics.median(stops):.2f} ms, max {max(stops):.2f} ms over {len(stops)} "
            "resets")


@pytest.mark.parametrize("_", [0], ids=["soft-dirty"])
class TestSoftDirty:
    pytestmark = soft_dirty

    def test_exactly_the_pages_written_then_nothing(self, target: Target, _: int) -> None:
        addr, _n = (int(x) for x in target.cmd("addr").split())
        # A first thread before tracking: its stack is cached and reused by the next one (a
        # new stack could merge with the buffer's VMA, which then reads soft-dirty whole).
        target.cmd("thread 255 0")
        with ProcessTracker(target.pid, backend="soft-dirty") as p:
            assert p.attach_stop_ms is not None and p.attach_stop_ms > 0
            p.collect()
            target.cmd("w 3 1")
            target.cmd("kread 7")  # read(2) into the page: a write by the kernel
            target.cmd("thread 9 2")  # a write by a thread that is gone by the collect
            d = p.collect()
            got = {int(a - addr) // PAGE_SIZE for a in d.addresses().tolist()
                   if addr <= a < addr + 256 * PAGE_SIZE}
            assert got == {3, 7, 9}
            assert d.stop_ms is not None and d.stop_ms > 0
            assert p.last_freeze["threads"] == 1 and p.last_freeze["unfrozen"] == 0
            d = p.collect()
            assert not [a for a in d.addresses().tolist() if addr <= a < addr + 256 * PAGE_SIZE]
            stops = [p.collect().stop_ms or 0.0 for _ in range(10)]
            assert stops == [s for s in stops if s > 0]
            print(f"\nidle pattern target: {freeze_times(stops)}")

    def test_no_write_of_the_pattern_target_is_lost_while_it_runs(
            self, monkeypatch: pytest.MonkeyPatch, _: int) -> None:
        rounds = max(300, int(400 * duration()))
        expected = subprocess.run([str(build("pattern")), "run", str(rounds)],
                                  capture_output=True, text=True, check=True).stdout
        target = paced_pattern(rounds, stdout=subprocess.PIPE)
        proc = target.proc
        try:
            v, stops = track_running(proc, monkeypatch, 0.02, lambda judged: target.step())
            target.finish()
            out = proc.communicate(timeout=600)[0].decode()
        finally:
            proc.kill()
            proc.wait()
        print(f"\npattern target (2 threads), collected while running: {v}; "
              f"{freeze_times(stops)}")
        # One part of its work per interval: it cannot end before PATTERN_STEPS - 1 of them.
        assert v.intervals >= PATTERN_STEPS - 1, "the target ended too soon to be judged"
        assert v.changed > 0
        assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
        assert out == expected  # stopped at every reset, it computes the same thing

    def test_a_multithreaded_python_workload_loses_no_write_and_ends_right(
            self, monkeypatch: pytest.MonkeyPatch, _: int) -> None:
        target = python_workload()
        proc = target.proc
        try:
            # It works until its stdin closes: after 4 intervals judged.
            v, stops = track_running(proc, monkeypatch, 0.1,
                                     lambda judged: judged >= 4 and target.finish())
            target.finish()
            out = proc.communicate(timeout=600)[0].decode()
        finally:
            proc.kill()
            proc.wait()
        print(f"\npython dict/list workload (3 threads), collected while running: {v}; "
              f"{freeze_times(stops)}")
        assert v.intervals >= 4
        assert v.changed > 100
        assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
        assert out == "done\n"

    def test_memory_replaced_at_a_tracked_address_is_reported_whole_new_memory_by_its_data(
            self, _: int) -> None:
        t = python_target(REMAP)
        try:
            addr = int(t.read())
            with ProcessTracker(t.pid, backend="soft-dirty") as p:
                assert t.cmd("fill") == "ok"  # 16 pages of data, tracked from here
                d = p.collect()
                assert pages_at(d, addr, 16) == set(range(16))
                assert t.cmd("replace") == "ok"  # mmap(MAP_FIXED) over it: all zero now
                d = p.collect()
                assert pages_at(d, addr, 16) == set(range(16))  # every page changed
                assert d.find(addr) is not None and d.find(addr)[0] in d.new  # type: ignore
                assert pages_at(p.collect(), addr, 16) == set()
                fresh = int(t.cmd("fresh"))  # new memory elsewhere, pages 1 and 5 written
                d = p.collect()
                assert pages_at(d, fresh, 16) == {1, 5}  # its data, not its empty pages
                assert t.cmd("poke 2") == "ok"
                assert pages_at(p.collect(), fresh, 16) == {2}
        finally:
            t.close()

    def test_hugetlb_mappings_are_listed_as_skipped_since_they_have_no_bit_per_page(
            self, hugetlb_pages: int, _: int) -> None:
        from pagewatch.kernel.pagemap import read_pagemap

        t = Target([sys.executable, "-c", HUGETLB, str(hugetlb_pages)])
        try:
            addrs = [int(x) for x in t.read().split()]
            with ProcessTracker(t.pid, backend="soft-dirty") as p:
                skipped = {s.mapping.start: s.reason for s in p.skipped}
                assert set(addrs) <= set(skipped) and "hugetlb" in skipped[addrs[0]]
                assert t.cmd("w") == "ok"
                d = p.collect()
                assert all(d.find(a) is None for a in addrs)
                assert {s.mapping.start for s in d.skipped} >= set(addrs)
                # Why: after the reset, a write leaves bit 55 of a hugetlb page clear.
                for a in addrs:
                    assert not read_pagemap(t.pid, a, a + PAGE_SIZE)[0] & (1 << 55)
            with pytest.raises(pw.Unsupported, match="hugetlb"):
                ProcessTracker(t.pid, backend="soft-dirty", strict=True)
        finally:
            t.close()

    def test_a_debugger_on_a_thread_refuses_the_attach_naming_it(self, _: int) -> None:
        t = Target([sys.executable, "-c", COUNTERS, "1"])
        holder = None
        try:
            t.read()
            wait_until(lambda: len(states(t.pid)) == 2)
            tid = max(states(t.pid))
            holder = subprocess.Popen([sys.executable, "-c", HOLD_TRACE, str(tid)],
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "tracing"
            with pytest.raises(pw.PermissionDenied, match=f"traced by process {holder.pid}"):
                ProcessTracker(t.pid, backend="soft-dirty")
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            t.close()

    def test_pagewatch_run_collects_a_threaded_command_through_its_tracer(
            self, tmp_path: Path, capfd: pytest.CaptureFixture[str], _: int) -> None:
        out = tmp_path / "run.jsonl"
        code = ("import ctypes, os, threading, time\n"
                "b = bytearray(2000 * 4096)\n"
                "addr = ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b))\n"
                "def fill(lo, hi):\n"
                "    for i in range(lo, hi):\n"
                "        b[i * 4096] = 1\n"
                "        if i % 50 == 0: time.sleep(0.002)\n"
                "ts = [threading.Thread(target=fill, args=(k * 1000, k * 1000 + 1000))\n"
                "      for k in range(2)]\n"
                "[t.start() for t in ts]; [t.join() for t in ts]\n"
                "print(addr, len(b), flush=True)\n"
                "os._exit(4)\n")
        rc = cli.main(["run", "--backend", "soft-dirty", "--interval", "0.02", "-o", str(out),
                       "--", sys.executable, "-c", code])
        captured = capfd.readouterr()
        assert rc == 4
        addr, size = (int(x) for x in captured.out.split())
        objs = [json.loads(x) for x in out.read_text().splitlines()]
        assert objs[0]["type"] == "attach" and objs[0]["backend"] == "soft-dirty"
        intervals = [o for o in objs if o["type"] == "interval"]
        assert len(intervals) >= 3
        got = set()
        for o in intervals:
            for m in o["mappings"]:
                base = m["start"] // PAGE_SIZE
                for first, n in m["runs"]:
                    got.update(range(base + first, base + first + n))
        want = set(range(-(-addr // PAGE_SIZE), (addr + size) // PAGE_SIZE))
        assert want <= got, f"{len(want - got)} written pages were not reported"
        assert "exited with code 4" in captured.err


@pytest.fixture
def hugetlb_pages() -> Iterator[int]:
    """Two default-size hugetlb pages reserved (root), the sysctl restored after; gives the
    huge page size."""
    size = 0
    for line in (procfs._read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("Hugepagesize:"):
            size = int(line.split()[1]) * 1024
    if not size:
        pytest.skip("no hugetlb: /proc/meminfo has no Hugepagesize")
    path = "/proc/sys/vm/nr_hugepages"
    old = (procfs._read_text(path) or "0").strip()
    try:
        with open(path, "w") as f:
            f.write(f"{int(old) + 2}\n")
    except OSError as exc:
        pytest.skip(f"cannot reserve hugetlb pages via {path} ({exc.strerror}): needs root")
    try:
        yield size
    finally:
        with open(path, "w") as f:
            f.write(f"{old}\n")


HUGETLB = """
import ctypes, mmap, os, sys
size = int(sys.argv[1])
a = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)  # MAP_HUGETLB
fd = os.memfd_create("pagewatch-test", os.MFD_HUGETLB)
os.ftruncate(fd, size)
b = mmap.mmap(fd, size)
for m in (a, b):
    m[0] = 1
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr(a), addr(b), flush=True)
for line in sys.stdin:
    a[4096 * 3] = b[4096 * 3] = 2
    print("ok", flush=True)
"""


def pages_at(d: process.ProcessDirty, addr: int, npages: int) -> set[int]:
    end = addr + npages * PAGE_SIZE
    return {int(a - addr) // PAGE_SIZE for a in d.addresses().tolist() if addr <= a < end}


REMAP = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
RW, FLAGS, FIXED, PG = 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, 0x10, 4096
# Guard pages around it (PROT_NONE) so that it never merges with a neighbour.
base = libc.mmap(None, 18 * PG, 0, FLAGS, -1, 0)
addr = base + PG
libc.mmap(addr, 16 * PG, RW, FLAGS | FIXED, -1, 0)
print(addr, flush=True)
fresh = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "fill":
        ctypes.memset(addr, 7, 16 * PG)
        print("ok", flush=True)
    elif cmd[0] == "replace":
        libc.mmap(addr, 16 * PG, RW, FLAGS | FIXED, -1, 0)
        print("ok", flush=True)
    elif cmd[0] == "fresh":
        b = libc.mmap(None, 18 * PG, 0, FLAGS, -1, 0)
        fresh = b + PG
        libc.mmap(fresh, 16 * PG, RW, FLAGS | FIXED, -1, 0)
        ctypes.memset(fresh + 1 * PG, 1, 10)
        ctypes.memset(fresh + 5 * PG, 1, 10)
        print(fresh, flush=True)
    elif cmd[0] == "poke":
        ctypes.memset(fresh + int(cmd[1]) * PG, 2, 10)
        print("ok", flush=True)
"""
