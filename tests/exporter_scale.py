"""The exporter's cost at scale: one exporter tracking 50 processes at a 1 s interval.

    .venv/bin/python -m tests.exporter_scale [--seconds 20] [--idle 49]

Starts 49 idle-ish targets (tests/targets/pacer.c writing 10 pages/s each) and one write-heavy
target (writing as fast as it can, round a 64 MiB buffer), then measures

* the heavy target's write throughput (pages per second of its own CPU time, from its own
  counters and /proc: the wall-clock rate on a shared machine measures the other load) alone, with the
  exporter tracking all 50 targets, and alone again (the two baselines are averaged);
* the exporter's CPU use (utime + stime from /proc, as a share of one core) over the run.

One run, printed as ratios; not a test (it measures speed, which a loaded machine changes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request

from .targets.common import build

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def pacer(rate: float, pages: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([str(build("pacer")), str(rate), str(pages)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline().startswith("ready")
    return p


def throughput(p: subprocess.Popen[str], seconds: float) -> float:
    """Pages the target writes per second of its own CPU time (user + system, where the
    write faults are charged) over the next ``seconds``: on a shared machine its wall-clock
    rate mostly measures the other load."""
    assert p.stdout is not None

    def report() -> tuple[int, float]:
        while True:
            parts = p.stdout.readline().split()  # type: ignore[union-attr]
            if parts and parts[0] == "n":
                return int(parts[1]), int(parts[2]) / 1e9

    n0, _ = report()
    c0 = cpu_seconds(p.pid)
    end = time.monotonic() + seconds
    n1 = n0
    while time.monotonic() < end:
        n1, _ = report()
    return (n1 - n0) / (cpu_seconds(p.pid) - c0)


def start_exporter(procs: list[subprocess.Popen[str]], interval: float
                   ) -> subprocess.Popen[str]:
    """``pagewatch exporter --pid ...`` of every target, once it tracks them all."""
    exporter = subprocess.Popen(
        [sys.executable, "-m", "pagewatch.cli", "exporter", "--port", "0", "--address",
         "127.0.0.1", "--interval", str(interval), "--quiet",
         "--pid", *[str(p.pid) for p in procs]], stderr=subprocess.PIPE, text=True)
    assert exporter.stderr is not None
    url = re.search(r"serving (\S+)", exporter.stderr.readline())[1]  # type: ignore[index]
    deadline = time.monotonic() + 120
    while True:
        with urllib.request.urlopen(url, timeout=30) as r:
            text = r.read().decode()
        if re.search(rf"^pagewatch_targets {len(procs)}\.0$", text, re.M):
            return exporter
        assert time.monotonic() < deadline, "the exporter did not track every target"
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.exporter_scale")
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=3,
                    help="phases with the exporter, each between two without")
    ap.add_argument("--idle", type=int, default=49)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()

    heavy = pacer(0, 16384)
    idle = [pacer(10, 64) for _ in range(args.idle)]
    procs = [heavy, *idle]
    exporter = None
    without, with_, cpu = [], [], []
    try:
        throughput(heavy, 2)  # warm up
        without.append(throughput(heavy, args.seconds))
        for _ in range(args.rounds):
            exporter = start_exporter(procs, args.interval)
            throughput(heavy, 2)  # settle after the attaches
            c0, w0 = cpu_seconds(exporter.pid), time.monotonic()
            with_.append(throughput(heavy, args.seconds))
            cpu.append((cpu_seconds(exporter.pid) - c0) / (time.monotonic() - w0))
            exporter.terminate()
            exporter.wait(timeout=60)
            exporter = None
            throughput(heavy, 1)
            without.append(throughput(heavy, args.seconds))
        print(f"targets: {len(procs)} ({args.idle} writing 10 pages/s, 1 write-heavy round a "
              f"64 MiB buffer), interval {args.interval:g} s, {args.rounds} phases of "
              f"{args.seconds:g} s with the exporter, each between two without")
        print("exporter CPU: " + ", ".join(f"{c * 100:.2f}" for c in cpu) +
              f" % of one core (mean {sum(cpu) / len(cpu) * 100:.2f} %)")
        print("write-heavy target, pages per CPU-second: without " +
              ", ".join(f"{x:,.0f}" for x in without) + "; with " +
              ", ".join(f"{x:,.0f}" for x in with_))
        ratio = (sum(without) / len(without)) / (sum(with_) / len(with_))
        print(f"slowdown (mean without / mean with): {ratio:.3f}x")
    finally:
        if exporter is not None:
            exporter.kill()
            exporter.wait()
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
