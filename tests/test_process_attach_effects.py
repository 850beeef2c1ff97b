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


@pytest.mark.parametrize("backend", ["auto", "soft-dirty", "uffd-async"])
def test_a_zombie_target_is_named_a_zombie_with_the_parent_that_has_not_reaped_it(
        backend: str) -> None:
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while state(proc.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.005)
        with pytest.raises(pw.TargetGone, match=rf"process {proc.pid} is a zombie.*"
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
