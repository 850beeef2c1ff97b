"""Ground truth for ProcessTracker: no written page is ever missed in a real program.

At each collect the target is stopped (SIGSTOP, every thread in state T), collected, and its
tracked mappings are read through ``/proc/PID/mem``; the difference with the previous snapshot
is what really changed.  Every changed page must have been reported (no false negative).  The
pages reported without a visible change are counted and explained: a page written back with
the same content, a page that changed and changed back, the first sight of a new mapping.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.maps import Mapping
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessDirty, ProcessTracker
from tests.targets.common import (
    PATTERN_STEPS,
    build,
    duration,
    in_emulated_guest,
    paced_pattern,
    python_workload,
    stop,
)

wp_ok, wp_why = probe_wp_async()
pytestmark = [
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}"),
    pytest.mark.skipif(os.uname().machine != "x86_64",
                       reason="syscall injection is implemented for x86-64 only"),
]

Snapshot = dict[Mapping, np.ndarray]  # mapping -> (npages, PAGE_SIZE) uint8


def snapshot(pid: int, mappings: list[Mapping]) -> Snapshot:
    out = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        for m in mappings:
            try:
                data = os.pread(f.fileno(), m.end - m.start, m.start)
            except OSError:
                continue  # not readable (PROT_NONE guard areas are not selected anyway)
            if len(data) == m.end - m.start:
                out[m] = np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)
    return out


@dataclass
class Verdict:
    intervals: int = 0
    changed: int = 0
    reported: int = 0
    fresh: int = 0  #: pages of data seen in memory new since the previous snapshot
    missed: list[str] = field(default_factory=list)
    extra: collections.Counter[str] = field(default_factory=collections.Counter)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in self.extra.most_common())
        return (f"{self.intervals} intervals, {self.changed} pages changed and {self.fresh} "
                f"holding data in new memory, {self.reported} reported, {len(self.missed)} "
                f"missed; extra pages: {extra or 'none'}")


def kind(m: Mapping) -> str:
    if m.path in ("[stack]", "[heap]"):
        return m.path
    return "anonymous" if not m.path else ("file" if m.private else "shared file")


def judge(prev: Snapshot, cur: Snapshot, d: ProcessDirty, v: Verdict) -> None:
    """Compare two snapshots with what ``d`` reported; add to ``v``."""
    reported = set(d.addresses().tolist())
    v.intervals += 1
    v.reported += len(reported)
    explained: set[int] = set()
    for m, now in cur.items():
        covered = np.zeros(len(now), bool)
        for p, before in prev.items():
            lo, hi = max(m.start, p.start), min(m.end, p.end)
            if lo >= hi:
                continue
            a = before[(lo - p.start) // PAGE_SIZE:(hi - p.start) // PAGE_SIZE]
            b = now[(lo - m.start) // PAGE_SIZE:(hi - m.start) // PAGE_SIZE]
            covered[(lo - m.start) // PAGE_SIZE:(hi - m.start) // PAGE_SIZE] = True
            changed = np.flatnonzero((a != b).any(axis=1)) * PAGE_SIZE + lo
            v.changed += len(changed)
            for addr in changed.tolist():
                explained.add(addr)
                if addr not in reported:
                    v.missed.append(f"{addr:#x} in {m.path or 'anonymous'} {m.perms}")
        # Memory seen for the first time: every page holding data of its own must be
        # reported (anonymous memory: non-zero; a file's private pages may be unmodified).
        fresh = np.flatnonzero(~covered)
        if len(fresh) and not m.path.startswith("/"):
            nonzero = fresh[now[fresh].any(axis=1)] * PAGE_SIZE + m.start
            v.fresh += len(nonzero)
            for addr in nonzero.tolist():
                explained.add(addr)
                if addr not in reported:
                    v.missed.append(f"{addr:#x} (new) in {m.path or 'anonymous'} {m.perms}")
    for addr in reported - explained:
        found = d.find(addr)
        assert found is not None
        m = found[0]
        if m in d.new:
            why = "first sight of a new mapping (or memory replaced at that address)"
        else:
            page = cur[m][(addr - m.start) // PAGE_SIZE] if m in cur else None
            why = ("zeros written over zeros" if page is not None and not page.any()
                   else "same data written back (or changed and changed back)")
        v.extra[f"{kind(m)}: {why}"] += 1


def track_and_judge(proc: subprocess.Popen[bytes], interval: float,
                    resume: Callable[[int], object] = lambda judged: None,
                    max_intervals: int = 200) -> Verdict:
    """Stop, collect and judge ``proc`` every ``interval`` s until it ends.  ``resume(n)`` is
    called each time the target is let go, ``n`` intervals judged so far: a paced target gets
    its next part of work there, so the number of intervals follows events, not the clock."""
    v = Verdict()
    stop(proc.pid)
    with ProcessTracker(proc.pid) as p:
        d = p.collect()
        prev = snapshot(proc.pid, list(d))
        os.kill(proc.pid, signal.SIGCONT)
        resume(0)
        for _ in range(max_intervals):
            time.sleep(interval)
            if proc.poll() is not None:
                break
            try:
                stop(proc.pid)
                d = p.collect()
                cur = snapshot(proc.pid, list(d))
            except (TimeoutError, FileNotFoundError, ProcessLookupError):
                break
            except Exception as exc:  # TargetGone when it exits under us
                if proc.poll() is not None or type(exc).__name__ in ("TargetGone",):
                    break
                raise
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            judge(prev, cur, d, v)
            prev = cur
            resume(v.intervals)
    return v


def test_the_known_pattern_target_loses_no_write_and_ends_with_the_right_output() -> None:
    rounds = max(200, int(300 * duration()))
    expected = subprocess.run([str(build("pattern")), "run", str(rounds)], capture_output=True,
                              text=True, check=True).stdout
    target = paced_pattern(rounds, stdout=subprocess.PIPE)
    proc = target.proc
    try:
        v = track_and_judge(proc, 0.05, lambda judged: target.step())
        target.finish()
        out = proc.communicate(timeout=600)[0].decode()
    finally:
        proc.kill()
        proc.wait()
    print(f"\npattern target: {v}")
    # One part of its work per interval: it cannot end before PATTERN_STEPS - 1 intervals.
    assert v.intervals >= PATTERN_STEPS - 1, "the target ended too soon to be judged"
    assert v.changed > 0
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert out == expected  # tracked or not, the target computes the same thing


def test_a_multithreaded_python_workload_loses_no_write() -> None:
    target = python_workload()
    proc = target.proc
    try:
        # It works until its stdin closes: after 4 intervals judged.
        v = track_and_judge(proc, 0.1, lambda judged: judged >= 4 and target.finish())
        target.finish()
        out = proc.communicate(timeout=600)[0].decode()
    finally:
        proc.kill()
        proc.wait()
    print(f"\npython dict/list workload (3 threads): {v}")
    assert v.intervals >= 4
    assert v.changed > 100
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert out == "done\n"


def test_gnu_sort_of_a_big_file_loses_no_write(tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(tmp_path, "lines.txt")
    r = random.Random(1)
    with open(src, "w") as f:
        # Emulated guests sort less: the same code paths, at a fifth of the cost.
        for _ in range(100_000 if in_emulated_guest() else max(400_000,
                                                                 int(600_000 * duration()))):
            f.write(f"{r.getrandbits(64):020d} {r.random()}\n")
    expected = subprocess.run(["sort", "-S", "64M", "--parallel=2", src], check=True,
                              capture_output=True).stdout
    # sort reads its input from a pipe fed one part per interval: it reads (and fills its
    # buffers) for at least as many intervals as there are parts, then sorts and ends.
    with open(src, "rb") as f:
        data = f.read()
    cut = [data.find(b"\n", len(data) * k // 4) + 1 for k in range(1, 4)]
    parts = [data[a:b] for a, b in zip([0, *cut], [*cut, len(data)], strict=True)]
    proc = subprocess.Popen(["sort", "-S", "64M", "--parallel=2"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    stdin = proc.stdin
    assert stdin is not None
    chunks: list[bytes] = []

    def drain() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):  # type: ignore[union-attr]
            chunks.append(chunk)

    def feed(judged: int) -> None:
        if stdin.closed:
            return
        if judged < len(parts):
            stdin.write(parts[judged])
            stdin.flush()
        if judged >= len(parts) - 1:
            stdin.close()

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        v = track_and_judge(proc, 0.05, feed)
        if not stdin.closed:
            stdin.close()
        proc.wait(600)
        reader.join(120)
    finally:
        proc.kill()
        proc.wait()
    print(f"\nsort: {v}")
    assert v.intervals >= len(parts) - 1, "sort ended too soon to be judged"
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert b"".join(chunks) == expected

