"""ProcessTracker: tracking the writes of another process (attach, inject, detach)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import pagewatch as pw
from pagewatch import _native, process
from pagewatch.kernel.constants import PAGE_SIZE, PM_UFFD_WP
from pagewatch.kernel.pagemap import read_pagemap
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessDirty, ProcessTracker, TargetExec
from tests.targets.common import (
    HOLD_TRACE,
    SLEEPING,
    SYS_READ,
    Target,
    build,
    pattern_target,
    python_target,
    stop,
)

ok, why = process.soft_dirty_available()
wp_ok, wp_why = probe_wp_async()
uffd = [pytest.mark.backend("uffd-async"),
        pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")]
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]


@pytest.fixture
def target() -> Iterator[Target]:
    build("pattern")
    t = pattern_target()
    yield t
    t.close()


def buffer_of(t: Target) -> tuple[int, int]:
    addr, npages = (int(x) for x in t.cmd("addr").split())
    return addr, npages


def written(d: ProcessDirty, addr: int, npages: int = 256) -> set[int]:
    """Written pages among the ``npages`` pages at ``addr`` (indices from ``addr``); the
    mapping that holds them may be larger (the kernel merges adjacent anonymous mappings)."""
    found = d.find(addr)
    assert found is not None, f"no tracked mapping holds {addr:#x}"
    m, pages = found
    end = addr + npages * PAGE_SIZE
    return {int(a - addr) // PAGE_SIZE for a in pages.addresses().tolist() if addr <= a < end}


# ---- what is reported ----------------------------------------------------------------------

class TestReports:
    pytestmark = uffd

    def test_nothing_is_reported_until_written_then_exactly_the_pages_written(
            self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            assert p.backend == "uffd-async"
            assert p.attach_stop_ms is not None and p.attach_stop_ms > 0
            assert written(p.collect(), addr) == set()
            target.cmd("w 3 1")
            target.cmd("w 9 2")
            target.cmd("w 9 3")
            assert written(p.collect(), addr) == {3, 9}
            assert written(p.collect(), addr) == set()

    def test_writes_by_the_kernel_and_by_another_thread_are_reported(
            self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            target.cmd("kread 4")  # read(2) into the page: a write by the kernel
            target.cmd("thread 6 7")
            assert written(p.collect(), addr) == {4, 6}

    def test_a_rewrite_with_the_same_content_is_reported(self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            target.cmd("same 11")
            assert written(p.collect(), addr) == {11}

    def test_collect_without_reset_keeps_reporting_until_a_reset(self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            target.cmd("w 2 1")
            assert written(p.collect(reset=False), addr) == {2}
            target.cmd("w 5 1")
            assert written(p.collect(reset=False), addr) == {2, 5}
            p.reset()
            assert written(p.collect(), addr) == set()

    def test_totals_and_json_summary_match_the_mappings(self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            p.collect()
            for page in (1, 2, 3, 10):
                target.cmd(f"w {page} 1")
            d = p.collect()
            assert d.count == sum(len(v) for v in d.values())
            assert d.nbytes == d.count * PAGE_SIZE
            js = d.to_dict()
            entry = next(e for e in js["mappings"] if e["start"] <= addr < e["end"])
            first = (addr - entry["start"]) // PAGE_SIZE
            assert [first + 1, 3] in entry["runs"] and [first + 10, 1] in entry["runs"]
            assert js["pages"] == d.count
            assert set(int(a) for a in d.addresses()) >= {addr + 10 * PAGE_SIZE}

    def test_a_new_mapping_is_reported_whole_once_then_tracked(self, target: Target) -> None:
        with ProcessTracker(target.pid) as p:
            p.collect()
            region = int(target.cmd("mmap 8"))  # writes pages 0, 2, 4, 6
            d = p.collect()
            m, pages = d.find(region) or (None, None)
            assert m is not None and pages is not None and m in d.new
            assert written(d, region, 8) == {0, 2, 4, 6}  # only the pages holding data
            target.cmd("rw 0 3 9")
            d = p.collect()
            m2, _ = d.find(region) or (None, None)
            assert m2 not in d.new
            assert written(d, region, 8) == {3}

    def test_an_unmapped_mapping_is_dropped(self, target: Target) -> None:
        with ProcessTracker(target.pid) as p:
            region = int(target.cmd("mmap 8"))
            p.collect()
            target.cmd("munmap")
            d = p.collect()
            found = d.find(region)
            assert found is None or found[0].end - found[0].start != 8 * PAGE_SIZE

    def test_a_mapping_split_by_mprotect_stays_tracked(self, target: Target) -> None:
        addr, npages = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            assert target.cmd("mprotect 100 10") == "ok 0"
            target.cmd("w 20 1")
            target.cmd("w 150 1")
            d = p.collect()
            assert written(d, addr) == {20}
            # Read-only now, and still tracked: a write before the mprotect would be reported.
            assert written(d, addr + 100 * PAGE_SIZE, 10) == set()
            assert written(d, addr + 110 * PAGE_SIZE, 146) == {40}
            assert not d.new

    def test_a_forked_child_is_not_tracked_and_the_parent_still_is(
            self, target: Target) -> None:
        addr, _ = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            assert target.cmd("fork 7 42") == "ok 0"  # the child wrote page 7 and exited
            assert written(p.collect(), addr) == set()
            target.cmd("w 8 1")  # copy-on-write in the parent after the fork
            assert written(p.collect(), addr) == {8}

    def test_close_drops_every_protection_of_the_target(self, target: Target) -> None:
        addr, npages = buffer_of(target)
        with ProcessTracker(target.pid) as p:
            target.cmd("w 1 1")
            p.collect()
            bits = read_pagemap(target.pid, addr, addr + npages * PAGE_SIZE)
            assert (bits & PM_UFFD_WP != 0).any()
        bits = read_pagemap(target.pid, addr, addr + npages * PAGE_SIZE)
        assert not (bits & PM_UFFD_WP != 0).any()
        assert target.cmd("w 1 2") == "ok"


# ---- the target is left as it was ----------------------------------------------------------

def gadget_of(pid: int) -> int:
    return _native.find_gadget(pid)


class TestTargetIsUnharmed:
    def test_a_nanosleep_interrupted_by_the_attach_is_restarted(self, target: Target) -> None:
        target.send("sleep 1200")
        target.wait_in_syscall(*SLEEPING)
        ret, info = _native.inject_syscall(target.pid, gadget_of(target.pid), 39, (0,) * 6,
                                           5000)
        assert ret == target.pid  # getpid() ran inside the target
        time.sleep(0.2)
        _native.inject_syscall(target.pid, gadget_of(target.pid), 39, (0,) * 6, 5000)
        word, rc, err, elapsed = target.read().split()
        assert (word, rc, err) == ("slept", "0", "0")  # not EINTR, not -ERESTART_RESTARTBLOCK
        assert float(elapsed) >= 1.2  # the rest of the sleep was slept (restart_syscall)

    @pytest.mark.backend("uffd-async")
    @pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
    def test_a_read_interrupted_by_the_attach_is_restarted(self, target: Target) -> None:
        addr, _ = buffer_of(target)
        for _ in range(3):
            target.wait_in_syscall(SYS_READ)
            ProcessTracker(target.pid).close()
        assert target.cmd("w 1 1") == "ok"
        assert target.cmd("addr").split()[0] == str(addr)

    def test_registers_and_signal_mask_are_restored_exactly(self, target: Target) -> None:
        target.cmd("block 10")  # SIGUSR1
        mask = target.cmd("mask")
        assert int(mask, 16) == 1 << 9
        n = 150_000_000
        expected = target.cmd(f"spin {n}")
        target.send(f"spin {n}")  # the same register-heavy loop, injected into 20 times
        g = gadget_of(target.pid)
        for _ in range(20):
            ret, _ = _native.inject_syscall(target.pid, g, 39, (0,) * 6, 5000)
            assert ret == target.pid
        assert target.read() == expected
        assert target.cmd("mask") == mask

    @pytest.mark.parametrize("where", ["data", "null"])
    def test_an_address_that_is_not_a_syscall_instruction_is_never_run(
            self, target: Target, where: str) -> None:
        # The gadget is found before the stop: a target inside execve then had other memory.
        # At the stop it is checked and, if it is no syscall instruction, looked for again.
        addr, _ = buffer_of(target)  # writable data, not code
        bogus = addr if where == "data" else 0
        ret, _ = _native.inject_syscall(target.pid, bogus, 39, (0,) * 6, 5000)
        assert ret == target.pid
        assert target.cmd("w 1 1") == "ok"
        assert target.cmd("addr").split()[0] == str(addr)

    def test_a_stopped_target_stays_stopped_after_the_attach(self, target: Target) -> None:
        target.proc.send_signal(signal.SIGSTOP)
        stop(target.pid)  # in its group-stop, however slow the machine
        ret, info = _native.inject_syscall(target.pid, gadget_of(target.pid), 39, (0,) * 6,
                                           5000)
        assert ret == target.pid
        assert info["stop_sig"] == signal.SIGSTOP
        time.sleep(0.1)
        with open(f"/proc/{target.pid}/stat") as f:
            assert f.read().rpartition(")")[2].split()[0] == "T"
        target.proc.send_signal(signal.SIGCONT)
        assert target.cmd("w 1 1") == "ok"


@pytest.mark.skipif(not (wp_ok or ok), reason=f"no way to track another process here: "
                    f"uffd-async: {wp_why}; soft-dirty: {why}")
def test_an_attach_the_instant_the_target_starts_tracks_it_every_time() -> None:
    """subprocess.Popen returns while the child may still be inside execve (its memory half
    built, or still its vfork parent's): the attach must bind to the program that runs."""
    exe = str(build("pattern"))
    for _ in range(15):
        t = Target([exe, "cmd"])
        try:
            with ProcessTracker(t.pid) as p:
                addr, _ = buffer_of(t)
                p.collect()
                assert t.cmd("w 7 3") == "ok"
                assert 7 in written(p.collect(), addr)
        finally:
            t.close()


# ---- exec, exit, dead pids -----------------------------------------------------------------

class TestLifecycle:
    pytestmark = uffd

    def test_exec_raises_target_exec(self, target: Target) -> None:
        with ProcessTracker(target.pid) as p:
            target.send("exec")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with open(f"/proc/{target.pid}/comm") as f:
                    if f.read().strip() == "cat":
                        break
                time.sleep(0.01)
            with pytest.raises(TargetExec, match="executed a new program"):
                p.collect()

    def test_exit_raises_target_gone(self, target: Target) -> None:
        with ProcessTracker(target.pid) as p:
            target.send("exit 3")
            assert target.proc.wait(300) == 3
            with pytest.raises(pw.TargetGone, match="has exited") as exc:
                p.collect()
            assert not isinstance(exc.value, TargetExec)

    def test_an_exit_during_a_collect_hands_on_nothing_it_scanned(
            self, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
        p = ProcessTracker(target.pid)
        target.cmd("w 5 1")
        original = _native.pagemap_scan_ranges

        def scan_then_die(*args: object) -> object:
            out = original(*args)  # type: ignore[arg-type]
            if int(args[2]) & 2:  # type: ignore[call-overload]  # the written-pages scan
                target.proc.kill()
                target.proc.wait()
            return out

        monkeypatch.setattr(_native, "pagemap_scan_ranges", scan_then_die)
        with pytest.raises(pw.TargetGone) as exc:
            p.collect()
        # The scan could have walked memory being torn down (then it reports pages never
        # written): gone after the scans, nothing of them is handed on.
        assert exc.value.collected is None
        p.close()

    def test_a_dead_pid_raises_target_gone(self) -> None:
        proc = subprocess.Popen(["true"])
        proc.wait()
        with pytest.raises(pw.TargetGone, match="does not exist"):
            ProcessTracker(proc.pid)

    def test_tracking_itself_is_refused_with_the_alternative(self) -> None:
        with pytest.raises(pw.PagewatchError, match="pagewatch.Tracker"):
            ProcessTracker(os.getpid())

    @pytest.mark.parametrize("pid", [0, -1])
    def test_a_pid_that_cannot_be_a_process_is_a_value_error(self, pid: int) -> None:
        with pytest.raises(ValueError, match=f"positive process id, not {pid}"):
            ProcessTracker(pid)

    def test_a_kernel_thread_is_refused_as_one_not_as_a_missing_process(self) -> None:
        kthreadd = [p for p in os.listdir("/proc") if p.isdigit()
                    and _comm(int(p)) == "kthreadd"]
        if not kthreadd:
            pytest.skip("no kernel thread in this pid namespace (kthreadd is not visible)")
        with pytest.raises(pw.Unsupported, match=r"\(kthreadd\).*kernel thread, with no "
                           "user memory. Give the pid of a user-space process"):
            ProcessTracker(int(kthreadd[0]))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---- permissions and conflicts -------------------------------------------------------------

def run_unprivileged(fn_code: str) -> str:
    """Run ``fn_code`` in a forked child turned into uid/gid nobody; returns its output."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = eval(fn_code)
        except BaseException as exc:  # noqa: BLE001
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, str(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid nobody")
def test_an_unprivileged_tracer_gets_permission_denied_naming_the_owner(
        target: Target) -> None:
    out = run_unprivileged(f"__import__('pagewatch').ProcessTracker({target.pid})")
    assert out.startswith("PermissionDenied:"), out
    assert f"process {target.pid} belongs to uid 0" in out
    assert "same user" in out
    assert target.cmd("w 1 1") == "ok"


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid nobody")
def test_an_unprivileged_user_tracks_its_own_process_without_any_privilege() -> None:
    t = Target([str(build("pattern")), "cmd"], preexec_fn=as_nobody)
    try:
        addr, _ = buffer_of(t)
        up_r, up_w = os.pipe()  # tracker -> test: "attached" / the result
        go_r, go_w = os.pipe()  # test -> tracker: "written, collect now"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                as_nobody()
                p = ProcessTracker(t.pid)
                os.write(up_w, b"attached\n")
                os.read(go_r, 1)
                found = p.collect().find(addr)
                out = repr(found[1].addresses().tolist() if found else None)
                p.close()
            except BaseException as exc:  # noqa: BLE001
                out = f"{type(exc).__name__}: {exc}"
            os.write(up_w, out.encode())
            os._exit(0)
        os.close(up_w)
        os.close(go_r)
        with os.fdopen(up_r) as f:
            assert f.readline() == "attached\n"
            assert t.cmd("w 7 1") == "ok"
            os.write(go_w, b"1")
            out = f.read()
        os.close(go_w)
        os.waitpid(pid, 0)
        assert out.startswith("["), out
        in_buffer = {a for a in eval(out) if addr <= a < addr + 256 * PAGE_SIZE}
        assert in_buffer == {addr + 7 * PAGE_SIZE}
    finally:
        t.close()


def test_a_process_already_traced_is_refused_naming_the_tracer(target: Target) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TRACE, str(target.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "tracing"
        with pytest.raises(pw.PermissionDenied) as exc:
            ProcessTracker(target.pid)  # uffd-async injects; soft-dirty stops every thread
        assert f"already traced by process {holder.pid} (python" in str(exc.value)
    finally:
        holder.kill()
        holder.wait()
    assert target.cmd("w 1 1") == "ok"


def test_yama_ptrace_scope_is_explained_when_present(monkeypatch: pytest.MonkeyPatch,
                                                     target: Target) -> None:
    from pagewatch.remote import target as proc_target  # where why_no_ptrace reads /proc

    real = proc_target._read_text
    monkeypatch.setattr(proc_target, "_has_cap_sys_ptrace", lambda: False)
    monkeypatch.setattr(proc_target, "_is_descendant", lambda pid: False)
    for value, phrase in (("1", "only to its descendants"), ("2", "only CAP_SYS_PTRACE"),
                          ("3", "forbids every ptrace attach")):
        monkeypatch.setattr(proc_target, "_read_text", lambda path, v=value: (
            v + "\n" if path.endswith("yama/ptrace_scope") else real(path)))
        assert phrase in process.why_no_ptrace(target.pid)
    # Absent (as on this machine's kernel, without Yama): no mention of it, no crash.
    monkeypatch.setattr(proc_target, "_read_text", lambda path: (
        None if path.endswith("yama/ptrace_scope") else real(path)))
    assert "Yama" not in process.why_no_ptrace(target.pid)


OWN_TRACKER = """
import mmap, sys, time
import pagewatch as pw
from pagewatch import _native
m = mmap.mmap(-1, 32 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
t = pw.Tracker(m, backend="uffd-async")
print(_native.buffer_info(m)[0], flush=True)
time.sleep(30)
"""


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_a_mapping_held_by_the_targets_own_userfaultfd_is_skipped_with_the_reason() -> None:
    t = python_target(OWN_TRACKER)
    try:
        addr = int(t.read())
        with ProcessTracker(t.pid) as p:
            held = [s for s in p.skipped if s.mapping.start <= addr < s.mapping.end]
            assert held and held[0].errno == errno.EBUSY
            assert "another userfaultfd" in held[0].reason
            d = p.collect()
            assert d.find(addr) is None or not d.find(addr)[1]  # type: ignore[index]
            assert any(s.mapping.start <= addr < s.mapping.end for s in d.skipped)
        with pytest.raises(pw.Unsupported, match="another userfaultfd"):
            # (with "auto", a kernel with soft-dirty falls back to it: it tracks that mapping)
            ProcessTracker(t.pid, backend="uffd-async", strict=True)
    finally:
        t.close()


SECCOMP = """
import ctypes, struct, time
libc = ctypes.CDLL(None, use_errno=True)
allow = struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
insns = ctypes.create_string_buffer(allow)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(1, ctypes.addressof(insns))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
print("filtered", flush=True)
time.sleep(30)
"""


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_a_seccomp_filtered_target_is_refused_not_risked() -> None:
    t = python_target(SECCOMP)
    try:
        assert t.read() == "filtered"
        with pytest.raises(pw.Unsupported, match="seccomp filter"):
            ProcessTracker(t.pid, backend="uffd-async")
    finally:
        t.close()


def test_neither_backend_available_is_unsupported_with_both_reasons(
        monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    probe = sys.modules["pagewatch.kernel.probe"]
    monkeypatch.setattr(probe, "probe_wp_async", lambda: (False, "no WP_ASYNC (test)"))
    monkeypatch.setattr(process, "soft_dirty_available", lambda: (False, "no soft-dirty (t)"))
    with pytest.raises(pw.Unsupported) as exc:
        ProcessTracker(target.pid)
    assert "no WP_ASYNC (test)" in str(exc.value) and "no soft-dirty (t)" in str(exc.value)


# ---- soft-dirty fallback -------------------------------------------------------------------

@pytest.mark.backend("soft-dirty")
@pytest.mark.skipif(not ok, reason=f"soft-dirty unavailable: {why}")
def test_soft_dirty_fallback_reports_the_pages_written(target: Target) -> None:
    addr, _ = buffer_of(target)
    with ProcessTracker(target.pid, backend="soft-dirty") as p:
        assert p.backend == "soft-dirty"
        p.collect()
        target.cmd("w 3 1")
        target.cmd("kread 7")
        got = written(p.collect(), addr)
        assert {3, 7} <= got
        assert written(p.collect(), addr) == set()


def test_soft_dirty_reader_turns_pagemap_bits_into_runs(
        monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    """The soft-dirty path's pagemap reading, with the present bit standing in for bit 55
    (this kernel has no soft-dirty: the VM matrix runs the real test above)."""
    from pagewatch.kernel.constants import PM_PRESENT

    monkeypatch.setattr(process, "soft_dirty_available", lambda: (True, "pretend"))
    from pagewatch.remote import soft_dirty  # the backend's module reads and resets the bits

    monkeypatch.setattr(soft_dirty, "PM_SOFT_DIRTY", PM_PRESENT)
    cleared: list[int] = []
    monkeypatch.setattr(soft_dirty, "clear_refs", lambda pid, v: cleared.append(v))
    addr, _ = buffer_of(target)
    with ProcessTracker(target.pid, backend="soft-dirty") as p:
        assert p.backend == "soft-dirty" and cleared == [4]
        for page in (3, 4, 200):
            target.cmd(f"w {page} 1")
        d = p.collect()
        assert written(d, addr) == {3, 4, 200}  # the pages made present by the writes
        assert cleared == [4, 4]  # reset: clear_refs again
        p.collect(reset=False)
        assert cleared == [4, 4]
