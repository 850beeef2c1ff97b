"""``pagewatch run --follow-forks``: every process of the tree, each from its first instruction.

The target ``tests/targets/forker.c`` (see its docstring) starts children by fork, vfork + exec
and fork under a seccomp filter; each writes a known set of pages of a known mapping and says
which (``ROLE PID ADDR`` on stdout).  The pages reported for each process in that mapping
must be exactly its own set: a page too many (the parent's writes, the pages a child only
inherited) or too few (a child tracked late) fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagewatch._native
from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessDirty
from pagewatch.remote import tree as tree_mod
from tests.targets.common import build, in_emulated_guest

wp_ok, wp_why = probe_wp_async()
PAGEWATCH = [sys.executable, "-m", "pagewatch.cli"]
NPAGES = 64  # forker.c's mapping
X86_64 = pytest.mark.skipif(os.uname().machine != "x86_64",
                            reason="syscall injection is implemented for x86-64 only")
pytestmark = [X86_64]
needs_uffd_async = [pytest.mark.backend("uffd-async"),
                    pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def pages_of(objs: list[dict[str, Any]], pid: int, addr: int) -> set[int]:
    """Pages (indices in forker's mapping at ``addr``) reported for ``pid``."""
    lo = addr // PAGE_SIZE
    out: set[int] = set()
    for o in objs:
        if o["type"] != "interval" or o["pid"] != pid:
            continue
        for m in o["mappings"]:
            base = m["start"] // PAGE_SIZE
            for first, n in m["runs"]:
                out.update(p - lo for p in range(base + first, base + first + n)
                           if lo <= p < lo + NPAGES)
    return out


def pattern(mod: int, rem: int) -> set[int]:
    return {p for p in range(NPAGES) if p % mod == rem}


class TreeRun:
    """One ``pagewatch run -F -- forker tree N``: what each process said and what was
    recorded."""

    def __init__(self, folder: Path, children: int, interval: float = 0.05) -> None:
        self.out = folder / "tree.jsonl"
        r = subprocess.run([*PAGEWATCH, "run", "-F", "--interval", str(interval), "-o",
                            str(self.out), "--", str(build("forker")), "tree", str(children)],
                           capture_output=True, text=True, timeout=600)
        self.rc, self.stderr = r.returncode, r.stderr
        self.said: dict[str, tuple[int, int]] = {}
        for line in r.stdout.splitlines():
            role, pid, addr = line.split()
            self.said[role] = (int(pid), int(addr))
        self.objs = lines(self.out)
        self.children = children

    def want(self) -> dict[str, set[int]]:
        """The pages each tracked role writes in its mapping (forker.c's tree)."""
        roles = {f"child{i}": pattern(i + 2, 0) for i in range(self.children)}
        return {**roles, "exec": pattern(3, 1), "parent": pattern(7, 3)}

    def story(self, role: str) -> str:
        """What the recording says of ``role``'s process (a failure's explanation)."""
        pid, addr = self.said[role]
        lo = addr // PAGE_SIZE
        said = []
        for o in self.objs:
            if o.get("pid") != pid:
                continue
            if o["type"] == "interval":
                o = {**o, "mappings": [{"start_page": m["start"] // PAGE_SIZE - lo,
                                        "runs": m["runs"]} for m in o["mappings"]]}
            said.append(json.dumps(o))
        return f"{role} (pid {pid}, its pages from page {lo}):\n" + "\n".join(said)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> TreeRun:
    if not wp_ok:
        pytest.skip(f"uffd-async unavailable: {wp_why}")
    return TreeRun(tmp_path_factory.mktemp("tree"), 2 if in_emulated_guest() else 3)


@pytest.mark.backend("uffd-async")
def test_follow_forks_reports_each_forked_childs_writes_exactly(tree: TreeRun) -> None:
    assert tree.rc == 5, tree.stderr
    # The parent's own writes, after its children's: neither theirs nor the ones it inherited.
    for role, want in tree.want().items():
        if role != "exec":  # the vforked child: its own test
            pid, addr = tree.said[role]
            assert pages_of(tree.objs, pid, addr) == want, tree.story(role)


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_follow_forks_collecting_every_millisecond_reports_each_process_exactly(
        tmp_path: Path) -> None:
    # Collects then fall between any two events of the tree: a process's exit stop and its
    # end above all (a collect there read memory being torn down, on 6.12).
    for k in range(4 if in_emulated_guest() else 10):
        (tmp_path / str(k)).mkdir()
        run = TreeRun(tmp_path / str(k), 2, interval=0.001)
        assert run.rc == 5, run.stderr
        for role, want in run.want().items():
            pid, addr = run.said[role]
            assert pages_of(run.objs, pid, addr) == want, run.story(role)


@pytest.mark.backend("uffd-async")
def test_follow_forks_tracks_a_vforked_child_from_its_exec(tree: TreeRun) -> None:
    pid, addr = tree.said["exec"]
    assert pages_of(tree.objs, pid, addr) == tree.want()["exec"]
    fork = [o for o in tree.objs if o["type"] == "fork" and o["pid"] == pid]
    assert fork and fork[0]["ppid"] == tree.said["parent"][0]
    assert fork[0]["shares_memory_of"] == tree.said["parent"][0]  # vfork: until its exec
    attach = [o for o in tree.objs if o["type"] == "attach" and o["pid"] == pid]
    assert attach and attach[-1]["command"][1:] == ["write", "3"]


@pytest.mark.backend("uffd-async")
def test_a_child_that_cannot_be_tracked_is_named_with_the_reason(tree: TreeRun) -> None:
    # The sandboxed child was tracked before it set its seccomp filter; its child inherits
    # the filter, and pagewatch never injects into a process under one.
    sandboxed, _ = tree.said["sandboxed"]
    grandchild, _ = tree.said["grandchild"]
    untracked = [o for o in tree.objs if o["type"] == "untracked"]
    assert [o["pid"] for o in untracked] == [grandchild]
    assert untracked[0]["ppid"] == sandboxed and "seccomp filter" in untracked[0]["reason"]
    assert f"not tracked: pid {grandchild}" in tree.stderr
    assert "seccomp filter" in tree.stderr
    assert any(o["type"] == "attach" and o["pid"] == sandboxed for o in tree.objs)


@pytest.mark.backend("uffd-async")
def test_the_recording_has_one_line_per_process_event_and_each_exit(tree: TreeRun) -> None:
    pids = {pid for pid, _ in tree.said.values()}
    exits = {o["pid"]: o["code"] for o in tree.objs if o["type"] == "exit"}
    assert set(exits) == pids  # every process, the command's own last
    assert exits[tree.said["parent"][0]] == 5 and tree.objs[-1]["type"] == "exit"
    assert all(code == 0 for pid, code in exits.items() if pid != tree.said["parent"][0])
    forks = {o["pid"] for o in tree.objs if o["type"] == "fork"}
    assert forks == pids - {tree.said["parent"][0]}
    # Every interval line names its process, and is about a process tracked then.
    assert {o["pid"] for o in tree.objs if o["type"] == "interval"} <= pids
    # The summary lists every process with its end.
    for _, (pid, _) in tree.said.items():
        assert f" {pid} " in tree.stderr
    assert f"processes: {len(pids)}" in tree.stderr


@pytest.mark.backend("uffd-async")
def test_report_of_a_followed_recording_sums_up_each_process(tree: TreeRun) -> None:
    r = subprocess.run([*PAGEWATCH, "report", "--json", str(tree.out)], capture_output=True,
                       text=True, check=True)
    rep = json.loads(r.stdout)
    assert rep["pid"] == tree.said["parent"][0]  # the command's own, as before
    procs = {p["pid"]: p for p in rep["processes"]}
    assert set(procs) == {pid for pid, _ in tree.said.values()}
    child0 = procs[tree.said["child0"][0]]
    assert child0["write_working_set"]["pages"] >= len(pattern(2, 0))
    assert procs[tree.said["grandchild"][0]]["untracked"]
    text = subprocess.run([*PAGEWATCH, "report", str(tree.out)], capture_output=True,
                          text=True, check=True).stdout
    assert "processes:" in text and str(tree.said["child0"][0]) in text


@pytest.mark.backend("uffd-async")
def test_plot_of_a_followed_recording_draws_one_process(tree: TreeRun, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "x.png"
    child = tree.said["child1"][0]
    r = subprocess.run([*PAGEWATCH, "plot", str(tree.out), "-o", str(png), "--pid",
                        str(child)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0 and f"pid {child}" in r.stderr


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_without_follow_forks_only_the_command_is_tracked(tmp_path: Path) -> None:
    out = tmp_path / "one.jsonl"
    r = subprocess.run([*PAGEWATCH, "run", "-o", str(out), "--", str(build("forker")), "tree",
                        "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 5, r.stderr
    objs = lines(out)
    parent = int(r.stdout.split("parent ")[1].split()[0])
    assert {o["pid"] for o in objs if "pid" in o} == {parent}
    assert not [o for o in objs if o["type"] in ("fork", "untracked")]
    assert "processes:" not in r.stderr


@pytest.mark.kernel_independent
def test_follow_forks_with_soft_dirty_is_a_clear_error_naming_the_backend() -> None:
    r = subprocess.run([*PAGEWATCH, "run", "-F", "--backend", "soft-dirty", "--no-output",
                        "--", "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--follow-forks with the soft-dirty backend is not available" in r.stderr


@pytest.mark.skipif(wp_ok, reason="this kernel has uffd-async: --follow-forks works")
def test_follow_forks_where_the_kernel_lacks_uffd_async_is_a_clear_error() -> None:
    r = subprocess.run([*PAGEWATCH, "run", "-F", "--no-output", "--", "true"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "needs the uffd-async backend" in r.stderr and "soft-dirty" in r.stderr


@pytest.mark.kernel_independent
@pytest.mark.parametrize("command", ["record", "top"])
def test_follow_forks_of_a_running_process_is_refused_with_what_to_do(command: str) -> None:
    r = subprocess.run([*PAGEWATCH, command, "-F", "--pid", str(os.getpid())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give -- CMD" in r.stderr


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
def test_top_follow_forks_shows_the_pages_of_each_process_of_the_tree() -> None:
    # Into a pipe: plain rows, each with the pid of its process; forker's own lines are in
    # the same output ("ROLE PID ADDR").
    r = subprocess.run([*PAGEWATCH, "top", "-F", "--interval", "0.05", "--rows", "100", "--",
                        str(build("forker")), "tree", "2"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 5, r.stderr  # the command's exit code, as top -- CMD
    said = {x.split()[0]: (int(x.split()[1]), int(x.split()[2])) for x in r.stdout.splitlines()
            if x.split() and x.split()[0] in ("parent", "child0", "child1", "exec",
                                              "sandboxed", "grandchild")}
    # pages/s, MiB/s, total, size MiB, perms, pid, name, start
    totals: dict[tuple[int, int], tuple[int, float]] = {}
    for x in r.stdout.splitlines():
        f = x.split()
        if len(f) >= 8 and f[0].isdigit() and f[-1].startswith("0x"):
            key = (int(f[-3]), int(f[-1], 16))
            total = max(totals.get(key, (0, 0.0))[0], int(f[2]))  # total pages so far
            totals[key] = (total, float(f[3]))
    assert "pid mapping" in r.stdout
    for role in ("child0", "child1", "exec"):
        pid, addr = said[role]
        # The row of the mapping that holds forker's pages (size shown to 0.1 MiB).
        rows = [n for (p, start), (n, mib) in totals.items()
                if p == pid and start <= addr and
                start + (mib + 0.05) * (1 << 20) >= addr + NPAGES * PAGE_SIZE]
        assert rows and max(rows) > 0, (role, totals)
    assert f"not tracked: pid {said['grandchild'][0]}" in r.stderr


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.skipif(shutil.which("gzip") is None or shutil.which("sort") is None,
                    reason="needs gzip and sort")
def test_follow_forks_of_a_shell_pipeline_reports_the_pages_of_its_programs(
        tmp_path: Path) -> None:
    n = 20_000 if in_emulated_guest() else 200_000
    script = (f"seq 1 {n} > numbers; gzip -c numbers > numbers.gz; "
              "sort -r numbers > sorted; wc -l < sorted")
    out = tmp_path / "sh.jsonl"
    r = subprocess.run([*PAGEWATCH, "run", "-F", "-o", str(out), "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(n)
    objs = lines(out)
    names: dict[int, str] = {}
    for o in objs:
        if o["type"] == "attach" and o["command"]:
            names[o["pid"]] = os.path.basename(o["command"][0])
    written: dict[str, int] = {}
    for o in objs:
        if o["type"] == "interval":
            name = names.get(o["pid"], "?")
            written[name] = written.get(name, 0) + o["pages"]
    # Each program wrote pages of its own (its stack, its data, libc's: still mapped at its
    # exit stop, where its last collect is made).  How many depends on the interval: memory
    # a program frees (munmap) before a collect is gone, and so are its writes.
    for prog in ("seq", "gzip", "sort", "wc"):
        assert written.get(prog, 0) > 0, (prog, written)
    for prog in ("gzip", "sort"):
        assert f"{prog} " in r.stderr or f"/{prog} " in r.stderr


# ---- the monitor's death harms no process of the tree -------------------------------------

def _run_tree_killed_at(n: int, rounds: int) -> tuple[int, str]:
    """``run -F`` of ``forker kids 2``, its monitor SIGKILLed by the tracer helper right
    before the helper's ``n``-th ptrace call; returns the monitor's status and what the tree
    printed (read to its end: every process of the tree has exited)."""
    env = dict(os.environ, PAGEWATCH_TEST_FAULT=str(n))
    p = subprocess.Popen([*PAGEWATCH, "run", "-F", "--interval", "0.05", "-o", os.devnull,
                          "--", str(build("forker")), "kids", "2", str(rounds)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout is not None
    out = p.stdout.read()  # EOF: the monitor and every process of the tree are gone
    return p.wait(timeout=600), out


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}")
@pytest.mark.one_guest("6.12")
def test_the_monitor_killed_at_each_ptrace_call_of_a_followed_tree_harms_no_process() -> None:
    # Each kill lands right before one ptrace call of the helper that follows the tree: the
    # seize, each injection into the command and into each forked child (at its first stop),
    # the fork, exit and signal stops.  Every process of the tree then finishes its work
    # unharmed (its sum right, no signal blocked, none of our descriptors), and the parent
    # sees both children exit 0.  The walk ends at the first call number past the last call.
    stride = 24 if in_emulated_guest() else 3
    rounds = 100 if in_emulated_guest() else 300
    kills, n = 0, 1
    while True:
        status, out = _run_tree_killed_at(n, rounds)
        said = out.split("\n")
        assert not [x for x in said if x.startswith("harmed")], (n, out)
        assert sum(x.startswith("ok ") for x in said) == 3 and "done 2" in said, (n, out)
        if status != -signal.SIGKILL:
            assert status == 3, (n, status)
            break
        kills += 1
        n += stride
        assert n < 2000, "the walk never ended"
    # The walk went through the tree's injections (the command's, then each child's: about
    # 70 calls in all), not only the start.
    assert kills >= 1 and 1 + (kills - 1) * stride >= 40, (kills, stride)


class CountingTracker:
    """Stands for a process's tracker in a :class:`~pagewatch.remote.tree.ProcessTree`: counts its collects."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.collects = 0
        self.closed = False

    def collect(self) -> ProcessDirty:
        assert not self.closed, "collected after close"
        self.collects += 1
        return ProcessDirty(self.pid, time=0.0, elapsed=0.0, new=frozenset(), skipped=(),
                            backend="uffd-async", mappings=[],
                            runs=np.empty((0, 2), np.int64))

    def close(self) -> None:
        self.closed = True


def _run_with(monkeypatch: pytest.MonkeyPatch, threads: int) -> tuple[tree_mod.ProcessTree,
                                                                       CountingTracker]:
    monkeypatch.setattr(pagewatch._native, "tracer_release", lambda handle: None)
    monkeypatch.setattr(tree_mod, "_threads", lambda pid: threads)
    run = tree_mod.ProcessTree(["x"], backend="uffd-async", interval=0.01, follow=True)
    run.handle = None
    proc = run.procs[4242] = tree_mod.Proc(4242, 1, ["x"])
    tracker = CountingTracker(4242)
    proc.tracker = tracker  # type: ignore[assignment]
    return run, tracker


@pytest.mark.kernel_independent
def test_a_process_let_go_from_its_exit_stop_is_never_collected_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Its memory is being torn down from then on: on Linux 6.12 a collect then reported
    # every page of some mappings written (the follow-forks test, 1 run in ~20 at 1 ms).
    run, tracker = _run_with(monkeypatch, threads=1)
    run._event(tree_mod.EV_EXIT, 0, 0, 0.0, 4242)
    assert tracker.collects == 1 and tracker.closed
    run._collect_all()
    assert tracker.collects == 1
    assert not run.tracking()


@pytest.mark.kernel_independent
def test_a_leader_that_exits_before_its_threads_is_still_collected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run, tracker = _run_with(monkeypatch, threads=3)
    run._event(tree_mod.EV_EXIT, 0, 0, 0.0, 4242)
    run._collect_all()
    assert tracker.collects == 2 and not tracker.closed
