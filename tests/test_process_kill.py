"""The monitor dying never harms the target (README, "If pagewatch dies").

Each test runs ``tests/targets/killharness.py`` (see its docstring), which kills the monitor of a
``steady`` target again and again and checks the target after each kill: it runs untraced, its
SigBlk is what it set, it holds no userfaultfd or pidfd, and at the end it prints "ok" (its
checksum over the whole run is right) and exits with status 3.

- *walk*: the monitor is SIGKILLed right before each ptrace call of one attach, in turn (the
  injection helper's fault point ``PAGEWATCH_TEST_FAULT=N``); for soft-dirty, whose freeze makes
  its ptrace calls in the monitor itself, with strace's fault injection;
- *random*: SIGKILL, SIGTERM, SIGINT to the monitor and SIGKILL to its process group, at random
  instants of its start and attach.

Kills in all: ~150 on the host (about a minute), fewer in the kernel matrix's emulated guests;
``PAGEWATCH_KILL_TESTS=600`` asks for (about) that many random kills in all, for a long run by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pagewatch as pw
from pagewatch import process
from pagewatch.kernel.probe import probe_wp_async
from tests.targets.common import build, process_backends

sd_ok, sd_why = process.soft_dirty_available()
wp_ok, wp_why = probe_wp_async()
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]

BACKENDS = process_backends()
KINDS = ["tracker", "record", "run"]


def where(kind: str, backend: Any) -> list[pytest.MarkDecorator]:
    """Where a kill test of this kind and backend runs among the emulated guests of the
    kernel matrix (the host runs them all): soft-dirty's in the 6.1 guest only (the host
    lacks soft-dirty; 6.12 would repeat the same freeze code at minutes of TCG time);
    uffd-async's of record and run on the host only: they add the CLI's processes (an
    interpreter start per kill) to the tracker's attach, which the 6.12 guest walks."""
    if backend == "soft-dirty":
        return [pytest.mark.one_guest("6.1")]
    if kind != "tracker":
        return [pytest.mark.kernel_independent]
    return []


WALKS = [pytest.param(kind, b.values[0], marks=[*b.marks, *where(kind, b.values[0])],
                      id=f"{kind}-{b.values[0]}") for kind in KINDS for b in BACKENDS]
IN_GUEST = bool(os.environ.get("PAGEWATCH_KERNEL_MATRIX", "")) and \
    os.environ.get("PAGEWATCH_KERNEL_MATRIX") != "host"


def random_kills(kind: str) -> int:
    """Random kills for one kind: the tracker's monitor is a fork (cheap), record's and run's
    start a Python interpreter each."""
    total = int(os.environ.get("PAGEWATCH_KILL_TESTS", "0") or 0)
    if total:
        return max(1, (total - 70) // 3)
    if IN_GUEST:  # TCG: 5-10x slower
        return 4
    return {"tracker": 40, "record": 20, "run": 20}[kind]


def harness(*args: str) -> dict[str, Any]:
    build("steady")
    out = subprocess.run([sys.executable, "-m", "tests.targets.killharness", *args],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{' '.join(args)}: {result['kills']} kills, {len(result['harmed'])} harmed, "
          f"{result['calls']} ptrace calls walked, {result['not_started']} not started")
    return result


@pytest.mark.parametrize("kind, backend", WALKS)
def test_the_monitor_killed_at_each_ptrace_call_of_an_attach_leaves_the_target_unharmed(
        kind: str, backend: str) -> None:
    # soft-dirty's attach and collects freeze the target from the monitor itself (a freeze
    # changes no register: the kernel's detach at the monitor's death lets it go as it was):
    # strace kills the monitor at each of those calls.  run traces from a helper in both.
    mode = "strace" if backend == "soft-dirty" and kind != "run" else "walk"
    if mode == "strace" and shutil.which("strace") is None:
        pytest.fail("strace is needed for the soft-dirty walk (apt-get install strace)")
    # In the emulated guests the tracker's helper walk takes every 4th call (seconds per kill
    # there); the host walks them all, and the strace walks (a few calls) are whole everywhere.
    stride = 4 if IN_GUEST and mode == "walk" else 1
    r = harness(kind, mode, "1", "--backend", backend, "--stride", str(stride))
    assert r["harmed"] == []
    # The walk went through a whole attach: seize, interrupt, ..., detach.
    assert r["calls"] >= (3 if mode == "strace" else 15), r
    assert r["kills"] >= r["calls"] // stride, r


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.kernel_independent  # process groups and the helper's own calls
def test_a_kill_of_the_monitors_process_group_at_each_ptrace_call_never_reaches_the_helper(
        ) -> None:
    # The helper sits in a process group of its own: a kill(-PGID) of the monitor's group (a
    # shell's job kill, a terminal's Ctrl-C) ends the monitor alone.
    r = harness("tracker", "group-walk", "1")
    assert r["harmed"] == []
    assert r["calls"] >= 15 and r["kills"] >= r["calls"], r


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.parametrize("kind", [pytest.param(k, marks=where(k, "uffd-async")) for k in KINDS])
def test_the_monitor_killed_at_random_instants_leaves_the_target_unharmed(kind: str) -> None:
    r = harness(kind, "random", str(random_kills(kind)), "--seed", "7")
    assert r["harmed"] == []
    assert r["kills"] >= random_kills(kind) // 2, r  # most signals reached a live monitor


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.kernel_independent  # counts the helper's calls, the same on every kernel
def test_the_fault_walk_covers_every_ptrace_call_strace_sees(tmp_path: Path) -> None:
    """strace, independently, counts the ptrace calls of one attach: all are the helper's
    (none the monitor's), and the fault walk of the other tests goes through as many."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is needed (apt-get install strace)")
    steady = build("steady")
    target = subprocess.Popen([str(steady)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert target.stdout is not None and target.stdin is not None
        assert target.stdout.readline().startswith("ready")
        code = ("import json, sys, pagewatch\n"
                "t = pagewatch.ProcessTracker(int(sys.argv[1]))\n"
                "print(json.dumps(t.attach_info))\n")
        log = tmp_path / "strace.log"
        out = subprocess.run([strace, "-f", "-qq", "-o", str(log), "-e", "trace=ptrace",
                              sys.executable, "-c", code, str(target.pid)],
                             capture_output=True, text=True, timeout=300, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        calls = [line for line in log.read_text().splitlines()
                 if re.search(r"\bptrace\(", line)]
        by_pid = {line.split()[0] for line in calls}
        assert info["helper"] is True
        assert len(by_pid) == 1, by_pid  # one process made them all: the helper
        assert info["ptrace_calls"] == len(calls)
        walk = harness("tracker", "walk", "1")
        assert walk["calls"] == len(calls) + 1  # + the fault after the last call
        target.stdin.write("exit\n")
        target.stdin.flush()
        assert target.stdout.readline().startswith("ok")
        assert target.wait(300) == 3
    finally:
        target.kill()
        target.wait()


def ours() -> set[tuple[str, str]]:
    """This process's sockets, pipes and anonymous-inode descriptors (userfaultfd, pidfd)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith(("socket:", "pipe:", "anon_inode:")):
            out.add((fd, link))
    return out


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_the_injection_helper_leaves_nothing_behind() -> None:
    """The helper that injects is reaped, and none of its descriptors stay in the target or
    in this process (the userfaultfd is the tracker's, and closed with it)."""
    steady = build("steady")
    target = subprocess.Popen([str(steady)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert target.stdout is not None and target.stdin is not None
        assert target.stdout.readline().startswith("ready")
        before = ours()
        with pw.ProcessTracker(target.pid) as t:
            assert t.attach_info["helper"] is True
            assert t.attach_info["ptrace_calls"] >= 15
            with open(f"/proc/{target.pid}/status") as f:
                assert "TracerPid:\t0" in f.read()
            fds = [os.readlink(f"/proc/{target.pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{target.pid}/fd")]
            assert not [x for x in fds if "anon_inode" in x]
        assert ours() <= before
        children: set[int] = set()  # the helper was reaped: no zombie left
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children |= {int(x) for x in f.read().split()}
        comms = []
        for pid in children:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comms.append(f.read().strip())
            except OSError:
                pass
        assert "pagewatch-help" not in comms
    finally:
        target.kill()
        target.wait()
