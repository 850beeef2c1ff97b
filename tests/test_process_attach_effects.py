"""What an attach does to the target and says about it: the stop it reports, the target
states it names, the system calls its interrupt shows through."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import pagewatch as pw
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessTracker
from tests.targets.common import pattern_target

wp_ok, wp_why = probe_wp_async()
uffd = [pytest.mark.backend("uffd-async"),
        pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")]
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


@pytest.mark.parametrize("backend", ["auto", "soft-dirty", pytest.param("uffd-async", marks=uffd)])
def test_a_zombie_target_is_named_a_zombie_with_the_parent_that_has_not_reaped_it(
        backend: str) -> None:
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 300
        while state(proc.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.005)
        with pytest.raises(pw.TargetGone, match=rf"process {proc.pid} .*zombie.*"
                           rf"process {os.getpid()} \(") as exc:
            ProcessTracker(proc.pid, backend=backend)
        assert "does not exist" not in str(exc.value)
    finally:
        proc.wait()


@pytest.mark.parametrize("_", [pytest.param(0, marks=uffd)])
def test_the_stop_reported_at_attach_runs_from_the_first_interrupt_to_the_detach(
        _: int) -> None:
    t = pattern_target()
    try:
        t.cmd("addr")
        with ProcessTracker(t.pid, backend="uffd-async") as p:
            info = p.attach_info
            assert info["wait_ms"] > 0 and info["held_ms"] > 0
            assert p.attach_stop_ms == pytest.approx(info["wait_ms"] + info["held_ms"])
    finally:
        t.close()


#: x86-64 numbers of the calls the blocker target blocks in (glibc's semop is semtimedop)
_NR = {"epoll_wait": 232, "epoll_pwait": 281, "epoll_pwait2": 441, "sigwaitinfo": 128,
       "semop": 220, "epoll_wait_timeout": 232, "sigtimedwait": 128}
SYS_READ = 0


def blocked_in(pid: int, numbers: tuple[int, ...], timeout: float = 300.0) -> int:
    """Wait until the target blocks in one of the system calls ``numbers``; which one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            nr = f.read().split()[0]
        if nr.lstrip("-").isdigit() and int(nr) in numbers and state(pid) == "S":
            return int(nr)
        time.sleep(0.002)
    raise TimeoutError(f"process {pid} did not block in one of {numbers}")


def attach_while_blocked(call: str) -> tuple[int, str | None]:
    """Attach to a target blocked in ``call`` and detach; the call it is blocked in after
    (``call``'s number: restarted, 0: it returned and reads its input) and what it
    printed if it returned."""
    from tests.targets.common import Target, build

    t = Target([str(build("blocker")), call])
    try:
        assert t.read() == "ready"
        blocked_in(t.pid, (_NR[call],))
        with ProcessTracker(t.pid, backend="uffd-async") as p:
            p.collect()
        after = blocked_in(t.pid, (_NR[call], SYS_READ))
        return after, (t.read() if after == SYS_READ else None)
    finally:
        t.close()


@pytest.mark.parametrize("call", [pytest.param(c, marks=uffd) for c in
                                  ["epoll_wait", "epoll_pwait", "epoll_pwait2", "sigwaitinfo",
                                   "semop"]])
def test_a_call_linux_never_restarts_after_a_stop_is_restarted_after_the_attach_when_it_has_no_timeout(  # noqa: E501
        call: str) -> None:
    """signal(7): these return EINTR after a stop, ptrace's included.  Without a timeout the
    injection makes the kernel restart them (-ERESTARTNOHAND): the program sees nothing."""
    assert attach_while_blocked(call) == (_NR[call], None)


@pytest.mark.parametrize("call", [pytest.param(c, marks=uffd) for c in
                                  ["epoll_wait_timeout", "sigtimedwait"]])
def test_the_same_calls_with_a_timeout_return_eintr_at_the_attach(call: str) -> None:
    """The known effect, listed in the README: a restart would wait the whole timeout
    again, so they return EINTR (as after a SIGSTOP/SIGCONT); programs retry."""
    assert attach_while_blocked(call) == (SYS_READ, "ret -1 4")
