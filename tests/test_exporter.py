"""pagewatch exporter: the collector over ProcessTrackers, its CLI, and a real Prometheus
scraping it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pagewatch as pw
from pagewatch import exporter as ex
from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.maps import Mapping
from pagewatch.process import ProcessTracker

from .targets.common import HOLD_TRACE, build

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
PAGEWATCH = [sys.executable, "-m", "pagewatch.cli"]

pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.05
             ) -> Any:
    """Poll ``fn`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def comm_of(pid: int) -> str | None:
    info = ex.proc_info(pid)
    return None if info is None else info.comm


class Pacer:
    """tests/targets/pacer.c: writes RATE pages/s through a buffer of PAGES pages and
    reports (pages written, CLOCK_MONOTONIC ns) every 100 ms, which a thread collects."""

    def __init__(self, rate: float, pages: int, name: str = "pacer") -> None:
        binary = build("pacer")
        if name != "pacer":
            named = binary.with_name(name)
            if not named.exists():
                shutil.copy(binary, named)
            binary = named
        self.pages = pages
        self.proc = subprocess.Popen([str(binary), str(rate), str(pages)],
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().split() == ["ready", str(self.pid)]
        self.reports: list[tuple[int, float]] = []  # (pages written, monotonic seconds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "n":
                self.reports.append((int(parts[1]), int(parts[2]) / 1e9))

    def written_at(self, t: float) -> float:
        """Pages written by monotonic time ``t`` (interpolated between two reports)."""
        reps = list(self.reports)
        times = np.array([r[1] for r in reps])
        counts = np.array([r[0] for r in reps], float)
        assert times[0] <= t <= times[-1], "no report around that time"
        return float(np.interp(t, times, counts))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def pacers() -> Iterator[Callable[..., Pacer]]:
    made: list[Pacer] = []

    def make(rate: float, pages: int, name: str = "pacer") -> Pacer:
        p = Pacer(rate, pages, name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def samples(exporter: ex.Exporter) -> dict[str, list[tuple[dict[str, str], float]]]:
    """What a scrape of the exporter would read: sample name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in exporter.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(exporter: ex.Exporter, name: str, **labels: str) -> float | None:
    for got, v in samples(exporter).get(name, []):
        if all(got.get(k) == w for k, w in labels.items()):
            return v
    return None


# ---- pieces -----------------------------------------------------------------------------


def _m(path: str, perms: str = "rw-p") -> Mapping:
    return Mapping(0x1000, 0x3000, perms, 0, "00:00", 0, path)


@pytest.mark.kernel_independent
@pytest.mark.parametrize(("mapping", "kind"), [
    (_m("[heap]"), "heap"), (_m("[stack]"), "stack"), (_m(""), "anon"),
    (_m("[anon:arena]"), "anon"), (_m("", "rw-s"), "shmem"),
    (_m("/dev/zero (deleted)", "rw-s"), "shmem"), (_m("/SYSV00000000 (deleted)", "rw-s"), "shmem"),
    (_m("/memfd:buf (deleted)", "rw-s"), "shmem"), (_m("/dev/shm/x", "rw-s"), "shmem"),
    (_m("[anon_shmem:x]", "rw-s"), "shmem"), (_m("/usr/lib/libc.so.6"), "file"),
    (_m("/var/data.bin", "rw-s"), "file"), (_m("[uprobes]"), "other"),
])
def test_each_mapping_has_one_kind_label(mapping: Mapping, kind: str) -> None:
    assert ex.mapping_kind(mapping) == kind
    assert kind in ex.KINDS


@pytest.mark.kernel_independent
def test_the_working_set_counts_distinct_pages_within_each_window() -> None:
    ws = ex.WorkingSet((10.0, 60.0))
    ws.add(np.array([5, 1, 2, 3, 3], np.uint64), now=0.0)
    assert ws.counts(now=0.0) == [4, 4]
    ws.add(np.array([3, 4], np.uint64), now=30.0)       # 3 again: still one page
    assert ws.counts(now=30.0) == [2, 5]
    ws.add(np.empty(0, np.uint64), now=65.0)            # pages of t=0 leave the 1m window
    assert ws.counts(now=65.0) == [0, 2]
    ws.add(np.array([9], np.uint64), now=200.0)         # only what the longest window needs
    assert ws.counts(now=200.0) == [1, 1] and len(ws) == 1


@pytest.mark.kernel_independent
def test_runs_expand_to_every_page_number() -> None:
    runs = [np.array([[3, 5], [9, 10]], np.int64), np.array([[100, 103]], np.int64)]
    assert ex._pages_of(runs).tolist() == [3, 4, 9, 100, 101, 102]
    assert ex._pages_of([]).tolist() == []


@pytest.mark.kernel_independent
def test_windows_parse_and_label_as_prometheus_durations() -> None:
    assert ex.parse_windows("1m, 10s,5m,1m") == (10.0, 60.0, 300.0)
    assert [ex.window_label(w) for w in (10.0, 60.0, 300.0, 3600.0, 0.5, 90.0)] == [
        "10s", "1m", "5m", "1h", "0.5s", "90s"]
    for bad in ("", "0s", "x", "5d", "-1"):
        with pytest.raises(ValueError):
            ex.parse_windows(bad)


@pytest.mark.kernel_independent
def test_attach_failures_are_labelled_by_reason() -> None:
    cases = [(pw.TargetGone("gone"), "exited"),
             (pw.PermissionDenied("process 5 is already traced by process 6 (gdb)"), "traced"),
             (pw.PermissionDenied("uid 1000"), "permission"),
             (pw.Unsupported("injection", "it runs under a seccomp filter"), "seccomp"),
             (pw.Unsupported("tracking", "it is a kernel thread"), "unsupported"),
             (pw.PagewatchError("did not stop"), "error"), (RuntimeError("bug"), "error")]
    for exc, reason in cases:
        assert ex.attach_failure_reason(exc) == reason
        assert reason in ex.REASONS


@pytest.mark.kernel_independent
def test_a_selector_takes_exactly_one_criterion() -> None:
    for kw in ({}, {"name": "a", "user": 0}, {"pids": (1,), "children_of": 1}):
        with pytest.raises(ValueError):
            ex.Selector(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no user"):
        ex.Selector(user="no-such-user-pagewatch")


def test_selectors_find_the_target_and_never_this_process(
        pacers: Callable[..., Pacer]) -> None:
    target = pacers(10, 4, name="pw-sel-target")
    me = os.getpid()
    grandchild = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"],
                                  stdout=subprocess.PIPE, text=True)
    killed: list[int] = []
    try:
        assert grandchild.stdout is not None
        sleeper = int(grandchild.stdout.readline())
        killed.append(sleeper)

        def pids(sel: ex.Selector) -> set[int]:
            return {i.pid for i in sel.find()}

        assert target.pid in pids(ex.Selector(name="^pw-sel-target$"))
        assert me not in pids(ex.Selector(name=re.escape(ex.proc_info(me).comm)))  # type: ignore[union-attr]
        assert target.pid in pids(ex.Selector(user=os.geteuid()))
        assert me not in pids(ex.Selector(user=os.geteuid()))
        assert pids(ex.Selector(pids=(me, target.pid))) == {target.pid}
        below_me = pids(ex.Selector(children_of=me))
        assert {target.pid, grandchild.pid, sleeper} <= below_me and me not in below_me
        cgroup = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.startswith("0::")), None)
        if cgroup is not None:  # cgroup v2: the children inherit this process's cgroup
            found = pids(ex.Selector(cgroup="/sys/fs/cgroup" + cgroup))
            assert target.pid in found and me not in found
            assert pids(ex.Selector(cgroup=cgroup.lstrip("/"))) >= {target.pid}
    finally:
        for pid in killed:  # the grandchild, before its parent (after, it is not ours)
            os.kill(pid, signal.SIGKILL)
        grandchild.kill()
        grandchild.wait()
        if grandchild.stdout is not None:
            grandchild.stdout.close()


# ---- the collector, in this process ---------------------------------------------------------


def test_targets_are_counted_by_kind_and_an_exited_one_loses_its_series(
        pacers: Callable[..., Pacer]) -> None:
    a, b = pacers(2000, 256), pacers(500, 64)
    with ex.Exporter(ex.Selector(pids=(a.pid, b.pid)), interval=0.05) as e:
        e.run_once()
        assert value(e, "pagewatch_targets") == 2
        assert {s[0]["backend"] for s in samples(e)["pagewatch_backend_info"]} <= set(
            pw.process.BACKENDS)

        def anon(p: Pacer) -> float:
            e.run_once()
            return value(e, "pagewatch_written_bytes_total", pid=str(p.pid), kind="anon") or 0

        wait_for("a's buffer writes counted", lambda: anon(a) >= 256 * PAGE_SIZE)
        wait_for("b's buffer writes counted", lambda: anon(b) >= 64 * PAGE_SIZE)
        for kind in ex.KINDS:  # every kind has a series from the start (rate() needs it)
            assert value(e, "pagewatch_written_bytes_total", pid=str(a.pid), kind=kind) is not None
        assert (value(e, "pagewatch_tracked_bytes", pid=str(a.pid)) or 0) >= 256 * PAGE_SIZE
        stop = value(e, "pagewatch_target_stop_seconds", pid=str(a.pid))
        assert stop is not None and stop > 0
        assert value(e, "pagewatch_collect_duration_seconds_count") >= 2  # type: ignore[operator]
        b.close()
        e.run_once()
        assert value(e, "pagewatch_targets") == 1
        assert value(e, "pagewatch_written_bytes_total", pid=str(b.pid)) is None
        assert value(e, "pagewatch_write_working_set_bytes", pid=str(b.pid)) is None
        assert value(e, "pagewatch_written_bytes_total", pid=str(a.pid)) is not None


def test_the_working_set_gauge_is_the_distinct_pages_a_target_writes(
        pacers: Callable[..., Pacer]) -> None:
    pages = 300  # written again and again: the working set stays 300 pages (plus its stack)
    a = pacers(3000, pages)
    with ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.05, windows=(60.0,)) as e:
        e.run_once()
        start = len(a.reports)

        def passes_done() -> bool:
            e.run_once()
            return a.reports[-1][0] - a.reports[start][0] >= 3 * pages if len(
                a.reports) > start + 1 else False

        wait_for("three passes over the buffer", passes_done)
        ws = value(e, "pagewatch_write_working_set_bytes", pid=str(a.pid), window="1m")
        assert ws is not None
        assert pages <= ws / PAGE_SIZE <= pages + 16
        # every page was written since the attach: each is counted at least once (a page
        # written twice between two collects counts once, so not three times each)
        anon = value(e, "pagewatch_written_bytes_total", pid=str(a.pid), kind="anon")
        assert anon is not None and anon / PAGE_SIZE >= pages


def test_a_target_that_executes_a_new_program_is_tracked_again_under_its_new_name() -> None:
    sh = subprocess.Popen(["sh", "-c", "read line; exec sleep 300"], stdin=subprocess.PIPE,
                          text=True)
    try:
        with ex.Exporter(ex.Selector(pids=(sh.pid,)), interval=0.02) as e:
            e.run_once()
            assert [t.info.comm for t in e.targets.values()] == ["sh"], (
                f"now {ex.proc_info(sh.pid)}; attach failures {dict(e.attach_failures)}")
            assert sh.stdin is not None
            sh.stdin.write("go\n")
            sh.stdin.flush()
            wait_for("the new program", lambda: (ex.proc_info(sh.pid) or sh).comm == "sleep")

            def comms() -> list[str]:
                e.run_once()
                return [labels["comm"] for labels, _ in samples(e).get("pagewatch_tracked_bytes", [])]

            wait_for("sleep tracked", lambda: comms() == ["sleep"])
            assert value(e, "pagewatch_written_bytes_total", comm="sh") is None
    finally:
        sh.kill()
        sh.wait()


def test_a_target_that_executes_while_it_is_attached_is_named_by_its_new_program() -> None:
    # The name is read before the attach; a program that executes in between (as one caught
    # in execve(2) does: Linux renames it last) must not keep the old name as its label.
    sh = subprocess.Popen(["sh", "-c", "read line; exec sleep 300"], stdin=subprocess.PIPE,
                          text=True)

    def exec_then_attach(pid: int) -> ProcessTracker:
        assert sh.stdin is not None
        sh.stdin.write("go\n")
        sh.stdin.flush()
        wait_for("the new program", lambda: comm_of(pid) == "sleep", timeout=300)
        return ProcessTracker(pid)

    try:
        wait_for("sh", lambda: comm_of(sh.pid) == "sh", timeout=300)
        with ex.Exporter(ex.Selector(pids=(sh.pid,)), interval=0.02,
                         tracker=exec_then_attach) as e:
            e.run_once()
            assert [t.info.comm for t in e.targets.values()] == ["sleep"]
            assert [labels["comm"] for labels, _ in
                    samples(e).get("pagewatch_tracked_bytes", [])] == ["sleep"]
    finally:
        sh.kill()
        sh.wait()


class FlakyTrackers:
    """A tracker factory that fails with ``exc`` while ``failing`` is set, noting when."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.failing = True
        self.tries: list[float] = []

    def __call__(self, pid: int) -> ProcessTracker:
        self.tries.append(time.monotonic())
        if self.failing:
            raise self.exc
        return ProcessTracker(pid)


def test_an_attach_failure_is_counted_and_retried_with_a_doubling_back_off(
        pacers: Callable[..., Pacer]) -> None:
    a = pacers(100, 16)
    make = FlakyTrackers(pw.Unsupported("injection", "it runs under a seccomp filter"))
    with ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.02, tracker=make) as e:
        def rounds_until(n: int) -> bool:
            e.run_once()
            return len(make.tries) >= n

        wait_for("four attempts", lambda: rounds_until(4))
        assert value(e, "pagewatch_attach_failures_total", reason="seccomp") == len(make.tries)
        assert value(e, "pagewatch_targets") == 0
        gaps = np.diff(make.tries)
        for i, gap in enumerate(gaps):  # lower bounds only: a slow machine waits longer
            assert gap >= 0.02 * 2 ** i * 0.999
        make.failing = False
        wait_for("the retry that works", lambda: (e.run_once(), e.targets)[1], timeout=120)
        assert value(e, "pagewatch_targets") == 1


def test_a_traced_target_is_counted_as_traced_and_tracked_once_the_debugger_leaves(
        pacers: Callable[..., Pacer]) -> None:
    a = pacers(100, 16)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TRACE, str(a.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "tracing"
        with ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.02) as e:
            e.run_once()
            assert value(e, "pagewatch_attach_failures_total", reason="traced") == 1
            assert not e.targets
            holder.kill()
            holder.wait()
            wait_for("the target tracked after the debugger left",
                     lambda: (e.run_once(), e.targets)[1], timeout=120)
            assert value(e, "pagewatch_attach_failures_total", reason="traced") >= 1  # type: ignore[operator]
    finally:
        holder.kill()
        holder.wait()


class BlockingTracker:
    """A real tracker whose collects wait for ``release`` once ``block`` is set."""

    def __init__(self, pid: int) -> None:
        self.real = ProcessTracker(pid)
        self.backend = self.real.backend
        self.attach_stop_ms = self.real.attach_stop_ms
        self.block = threading.Event()
        self.inside = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Any:
        if self.block.is_set():
            self.inside.set()
            assert self.release.wait(120)
        return self.real.collect()

    def close(self) -> None:
        self.real.close()


def test_a_scrape_reads_the_last_round_and_never_waits_on_a_collect(
        pacers: Callable[..., Pacer]) -> None:
    a = pacers(1000, 64)
    made: list[BlockingTracker] = []

    def make(pid: int) -> Any:
        made.append(BlockingTracker(pid))
        return made[-1]

    with ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.02, tracker=make) as e:
        e.run_once()
        before = samples(e)
        made[0].block.set()
        round_ = threading.Thread(target=e.run_once)
        round_.start()
        try:
            assert made[0].inside.wait(60)
            during = samples(e)  # returns while the collect is held
            assert round_.is_alive() and not made[0].release.is_set()
            assert during == before
        finally:
            made[0].release.set()
            round_.join()
        assert samples(e) != before


def test_a_collect_that_raises_drops_the_target_and_it_is_attached_again(
        pacers: Callable[..., Pacer]) -> None:
    a = pacers(100, 16)
    made: list[ProcessTracker] = []

    def make(pid: int) -> ProcessTracker:
        made.append(ProcessTracker(pid))
        return made[-1]

    with ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.02, tracker=make) as e:
        e.run_once()

        def broken(reset: bool = True) -> Any:
            raise RuntimeError("a bug in a collect")

        made[0].collect = broken  # type: ignore[method-assign]
        e.run_once()  # does not raise
        assert not e.targets and made[0].closed
        e.run_once()
        assert len(made) == 2 and e.targets and value(e, "pagewatch_targets") == 1


def test_the_loop_thread_runs_rounds_on_its_own(pacers: Callable[..., Pacer]) -> None:
    a = pacers(100, 16)
    e = ex.Exporter(ex.Selector(pids=(a.pid,)), interval=0.02)
    try:
        e.start()
        wait_for("three rounds", lambda: e.rounds >= 3)
        assert value(e, "pagewatch_targets") == 1
    finally:
        e.close()
    assert not e.targets
    a.proc.poll()
    assert a.proc.returncode is None  # the target goes on


# ---- the command --------------------------------------------------------------------------


class ExporterProcess:
    """``pagewatch exporter ... --port 0`` in a child process; ``url`` once it serves."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*PAGEWATCH, "exporter", "--port", "0", "--address",
                                      "127.0.0.1", *args], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving (http://\S+/metrics)", line)
            if m:
                self.url = m[1]
                break
        else:
            raise AssertionError(f"the exporter did not start: {''.join(self.lines)}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(self.url, timeout=30) as r:
            text = r.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        return rc


@pytest.fixture
def exporters() -> Iterator[Callable[..., ExporterProcess]]:
    made: list[ExporterProcess] = []

    def make(*args: str) -> ExporterProcess:
        made.append(ExporterProcess(*args))
        return made[-1]

    yield make
    for e in made:
        if e.proc.poll() is None:
            e.proc.kill()
            e.proc.wait()


@pytest.mark.kernel_independent
def test_without_prometheus_client_the_command_says_what_to_install() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from pagewatch.cli import main\n"
            "sys.exit(main(['exporter', '--pid', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1  # a runtime failure: a package missing
    assert "pip install 'pagewatch[exporter]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_command_serves_metrics_never_of_itself_and_stops_on_sigterm(
        pacers: Callable[..., Pacer], exporters: Callable[..., ExporterProcess]) -> None:
    a = pacers(500, 64)
    e = exporters("--children-of", str(os.getpid()), "--interval", "0.1")
    own = str(e.proc.pid)

    def tracked() -> set[str]:
        return {labels["pid"] for labels, _ in e.scrape().get("pagewatch_tracked_bytes", [])}

    wait_for("the target served", lambda: str(a.pid) in tracked())
    assert own not in tracked()  # a child of this process like the target, never itself
    assert not [line for line in e.lines if f"pid {own} " in line]  # not even tried
    got = e.scrape()
    for name, kind in ex.METRICS.items():
        if kind == "histogram":
            assert f"{name}_bucket" in got and f"{name}_count" in got
        else:
            assert name in got, name
    assert "process_cpu_seconds_total" in got  # the exporter's own CPU, for its cost
    assert any(f"tracking pid {a.pid}" in line for line in e.lines)
    assert e.stop() == 0
    assert all(line.startswith("pagewatch: ") for line in e.lines), e.lines  # one prefix
    a.proc.poll()
    assert a.proc.returncode is None  # the target goes on
    with ProcessTracker(a.pid) as again:  # and it can be tracked again
        assert again.collect() is not None


@pytest.mark.kernel_independent
def test_the_command_writes_each_line_of_its_own_in_one_write(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Its collect thread logs from the moment serve() returns: a line written in two parts
    # (print writes its end apart) let a log line land inside it (s7's red CI, 6.1 guest).
    from pagewatch.cli import main

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    class FakeExporter:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def serve(self, port: int, address: str) -> tuple[str, int]:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return "127.0.0.1", 4242

        def close(self) -> None:
            pass

    monkeypatch.setattr(ex, "Exporter", FakeExporter)
    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["exporter", "--port", "0", "--pid", "1"]) == 0
    assert any("serving http://127.0.0.1:4242/metrics" in w for w in writes), writes
    assert all(w.endswith("\n") for w in writes if w), writes


@pytest.mark.kernel_independent
def test_bad_selections_are_one_line_errors() -> None:
    for args, phrase in ((["--name", "("], "pagewatch: exporter: missing )"),
                         (["--user", "no-such-user-pagewatch"], "pagewatch: exporter: no user"),
                         (["--pid", "0"], "pagewatch: exporter: argument --pid: 0 is not"),
                         (["--pid", "1", "--name", "x"], "not allowed with")):
        r = subprocess.run([*PAGEWATCH, "exporter", "--port", "0", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.splitlines()[-1].startswith("pagewatch: exporter: "), r.stderr


@pytest.mark.kernel_independent
def test_a_port_in_use_is_a_runtime_failure_with_the_one_prefix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*PAGEWATCH, "exporter", "--address", "127.0.0.1", "--port",
                            str(port), "--name", "^no-such-process-pagewatch$"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"pagewatch: exporter: cannot listen on 127.0.0.1:{port}: "
                           "Address already in use"), line


# ---- contrib/ -------------------------------------------------------------------------------


@pytest.mark.kernel_independent
def test_the_systemd_unit_is_valid() -> None:
    unit = (CONTRIB / "pagewatch-exporter.service").read_text()
    sections = re.findall(r"^\[(\w+)\]$", unit, re.M)
    assert sections == ["Unit", "Service", "Install"]
    exec_start = re.search(r"^ExecStart=(\S+) exporter (.*)$", unit, re.M)
    assert exec_start is not None and "$PAGEWATCH_EXPORTER_ARGS" in exec_start[2]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # the parse above is the check
        return
    # verify wants the binary to exist: point ExecStart at this checkout's
    local = Path(sys.executable).with_name("pagewatch")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagewatch-unit-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    try:
        path = folder / "pagewatch-exporter.service"
        path.write_text(unit.replace(exec_start[1], str(local)))
        r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                           timeout=120)
        report = [line for line in (r.stdout + r.stderr).splitlines()
                  if "pagewatch-exporter" in line or "Unknown" in line]
        assert r.returncode == 0 and not report, r.stdout + r.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def dashboard_queries() -> list[str]:
    board = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in board["templating"]["list"] if v["type"] == "query"]
    assert exprs
    return exprs


def served_names(scrape: dict[str, Any]) -> set[str]:
    return set(scrape)


METRIC_TOKEN = re.compile(r"\b((?:pagewatch|process)_[a-z0-9_]+)\b")


@pytest.mark.kernel_independent
def test_the_dashboard_queries_only_metrics_the_exporter_serves(
        pacers: Callable[..., Pacer], exporters: Callable[..., ExporterProcess]) -> None:
    a = pacers(100, 16)
    e = exporters("--pid", str(a.pid), "--interval", "0.1")
    wait_for("the target served", lambda: "pagewatch_tracked_bytes" in e.scrape())
    served = served_names(e.scrape())
    for expr in dashboard_queries():
        names = METRIC_TOKEN.findall(expr)
        assert names, f"no pagewatch metric in {expr!r}"
        for name in names:
            assert name in served, f"{expr!r} reads {name}, which the exporter does not serve"


# ---- against a real Prometheus ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus server of its own (own config, storage and loopback port) scraping
    ``target`` (host:port) every second."""

    def __init__(self, binary: str, folder: Path, target: str) -> None:
        config = folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: pagewatch\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("prometheus ready", self._ready, timeout=120, every=0.2)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?"
                                    f"{urllib.parse.urlencode(params)}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def by_pid(self, expr: str, at: float | None = None) -> dict[str, float]:
        return {r["metric"].get("pid", ""): float(r["value"][1]) for r in self.query(expr, at)}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.skipif(os.environ.get("PAGEWATCH_KERNEL_MATRIX", "host") != "host",
                    reason="rates against a real Prometheus need the host's speed: the matrix's "
                    "TCG guests run 5-10x slower (the host runs this test)")
def test_prometheus_measures_the_true_write_rates_working_sets_and_staleness(
        pacers: Callable[..., Pacer], exporters: Callable[..., ExporterProcess],
        tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: apt-get install prometheus (.ci/run does)")
    # 2,000 and 20,000 pages/s, each over a buffer it goes round in 2 s (10 collects): a page
    # is written once per pass, so each write falls in a collect interval of its own.
    slow, fast, gone = pacers(2000, 4000), pacers(20000, 40000), pacers(100, 100)
    e = exporters("--pid", str(slow.pid), str(fast.pid), str(gone.pid), "--interval", "0.2",
                  "--quiet")
    prom = Prometheus(binary, tmp_path, e.url.removeprefix("http://").removesuffix("/metrics"))
    try:
        ids = f'pid=~"{slow.pid}|{fast.pid}"'
        # more than ten seconds of scrapes of both targets (12 samples in the last 13 s), so
        # that samples cover the whole 10 s window (rate() extrapolates less over a window
        # whose series started inside it, and would read low)
        wait_for("12 s of scrapes", lambda: len(prom.by_pid(
            f'count_over_time(pagewatch_written_bytes_total{{kind="anon",{ids}}}[13s]) >= 12'
        )) == 2, timeout=180, every=0.5)
        at = float(prom.query("timestamp(pagewatch_targets)")[0]["value"][1])  # last scrape
        # the buffer is anonymous memory: kind="anon" (the other kinds hold the pacer's own
        # few pages per collect: its stack, its stdout buffer, libc's data)
        rates = prom.by_pid(
            f'sum by (pid) (rate(pagewatch_written_bytes_total{{kind="anon",{ids}}}[10s]))', at)
        totals = prom.by_pid(
            f"sum by (pid) (rate(pagewatch_written_bytes_total{{{ids}}}[10s]))", at)
        ws = prom.by_pid(f'pagewatch_write_working_set_bytes{{window="10s",{ids}}}', at)
        offset = time.time() - time.monotonic()  # the pacers report CLOCK_MONOTONIC
        results = {}
        for p in (slow, fast):
            t1 = at - offset
            wait_for("the pacer's report after the evaluation time",
                     lambda p=p, t1=t1: p.reports[-1][1] >= t1)
            true = (p.written_at(t1) - p.written_at(t1 - 10)) / 10 * PAGE_SIZE
            measured = rates[str(p.pid)]
            results[p.pid] = (true / PAGE_SIZE, measured / PAGE_SIZE, ws[str(p.pid)] / PAGE_SIZE)
            print(f"pid {p.pid}: true {true / PAGE_SIZE:.0f} pages/s, Prometheus rate "
                  f"{measured / PAGE_SIZE:.0f} pages/s (ratio {measured / true:.4f}; all "
                  f"kinds {totals[str(p.pid)] / PAGE_SIZE:.0f} pages/s); working "
                  f"set 10s {ws[str(p.pid)] / PAGE_SIZE:.0f} pages of a {p.pages}-page buffer")
        for p in (slow, fast):
            true, measured, working = results[p.pid]
            assert abs(measured / true - 1) <= 0.05, results
            assert p.pages <= working <= p.pages + 16, results

        # the dashboard's queries run, and return data, on this Prometheus
        for expr in dashboard_queries():
            q = (expr.replace("$__rate_interval", "10s").replace("$__interval", "10s")
                 .replace("$comm", ".*").replace("$job", "pagewatch"))
            q = re.sub(r"^label_values\((\w+), \w+\)$", r"\1", q)  # a variable's query
            assert prom.query(q), f"no data for the dashboard's {expr!r}"

        # an exited target's series go stale: gone from an instant query of now
        assert prom.by_pid(f'pagewatch_tracked_bytes{{pid="{gone.pid}"}}')
        gone.close()
        wait_for("the exited target's series stale", lambda: not prom.by_pid(
            f'pagewatch_written_bytes_total{{pid="{gone.pid}"}}'), timeout=120, every=0.5)
        assert not prom.by_pid(f'pagewatch_write_working_set_bytes{{pid="{gone.pid}"}}')
        assert prom.query("pagewatch_targets")[0]["value"][1] == "2"
        assert len(prom.by_pid(f'pagewatch_tracked_bytes{{{ids}}}')) == 2
    finally:
        prom.close()
