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
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.kernel.maps import Mapping
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessDirty, ProcessTracker
from tests.targets.common import build, duration, stop

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


def track_and_judge(proc: subprocess.Popen[bytes], interval: float, max_intervals: int = 40
                    ) -> Verdict:
    v = Verdict()
    stop(proc.pid)
    with ProcessTracker(proc.pid) as p:
        d = p.collect()
        prev = snapshot(proc.pid, list(d))
        os.kill(proc.pid, signal.SIGCONT)
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
    return v


def test_the_known_pattern_target_loses_no_write_and_ends_with_the_right_output() -> None:
    exe = str(build("pattern"))
    rounds = str(max(200, int(300 * duration())))
    expected = subprocess.run([exe, "run", rounds], capture_output=True, text=True,
                              check=True).stdout
    proc = subprocess.Popen([exe, "run", rounds], stdout=subprocess.PIPE)
    try:
        v = track_and_judge(proc, 0.05)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
        proc.wait()
    print(f"\npattern target: {v}")
    assert v.intervals >= 3, "the target ended too soon to be judged"
    assert v.changed > 0
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert out == expected  # tracked or not, the target computes the same thing


PYTHON_WORKLOAD = """
import json, random, sys, threading, time
end = time.monotonic() + float(sys.argv[1])
def work(seed):
    r = random.Random(seed)
    d, lists = {}, []
    while time.monotonic() < end:
        for _ in range(2000):
            d[r.randrange(1 << 20)] = [r.random() for _ in range(4)]
        lists.append(sorted(d)[:5000])
        if len(lists) > 20:
            lists.pop(0)
        json.dumps({str(k): v for k, v in list(d.items())[:500]})
        if len(d) > 200_000:
            d.clear()
threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done")
"""


def test_a_multithreaded_python_workload_loses_no_write() -> None:
    seconds = max(1.0, 2 * duration())
    proc = subprocess.Popen([sys.executable, "-c", PYTHON_WORKLOAD, str(seconds)],
                            stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)  # let it start its threads
        v = track_and_judge(proc, 0.1)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
        proc.wait()
    print(f"\npython dict/list workload (3 threads): {v}")
    assert v.intervals >= 3
    assert v.changed > 100
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert out == "done\n"


def test_gnu_sort_of_a_big_file_loses_no_write(tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(tmp_path, "lines.txt")
    r = random.Random(1)
    with open(src, "w") as f:
        for _ in range(max(400_000, int(600_000 * duration()))):
            f.write(f"{r.getrandbits(64):020d} {r.random()}\n")
    expected = subprocess.run(["sort", "-S", "64M", "--parallel=2", src], check=True,
                              capture_output=True).stdout
    proc = subprocess.Popen(["sort", "-S", "64M", "--parallel=2", src],
                            stdout=subprocess.PIPE)
    chunks: list[bytes] = []
    import threading

    def drain() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):  # type: ignore[union-attr]
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        v = track_and_judge(proc, 0.05)
        proc.wait(60)
        reader.join(60)
    finally:
        proc.kill()
        proc.wait()
    print(f"\nsort: {v}")
    assert v.intervals >= 2, "sort ended too soon to be judged"
    assert not v.missed, f"{len(v.missed)} changed pages were not reported: {v.missed[:10]}"
    assert b"".join(chunks) == expected
