"""The mapping-count table (README, "Track another process"): attach and collect of a target
with N one-page mappings (``tests/targets/manymaps.c``) against raw C scans of the same
memory, interleaved: one ``PAGEMAP_SCAN`` per tracked range, and one over the whole span of
the N mappings (the kernel skips the holes).  Not a test: a measurement, run by hand::

    .venv/bin/python -m tests.evidence.maptable [1000,2000,4000,10000] [REPEATS]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from pagewatch import _native
from pagewatch.kernel.pagemap import PageCategory, ScanFlag
from pagewatch.process import ProcessTracker
from tests.targets.common import Target, build

RESET = int(ScanFlag.CHECK_WPASYNC) | int(ScanFlag.WP_MATCHING)
WRITTEN = int(PageCategory.WRITTEN)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def row(n: int, reps: int) -> str:
    t = Target([str(build("manymaps")), str(n)])
    base, stride = map(int, t.read().split())
    try:
        t0 = time.perf_counter()
        p = ProcessTracker(t.pid)
        attach = _ms(t0)
        with p:
            p.collect()
            fd = p._pagemap.fileno()
            ranges = np.ascontiguousarray(p._plan[2])
            span = np.array([[base, base + n * stride]], np.int64)
            got: tuple[list[float], list[float], list[float]] = ([], [], [])
            for i in range(reps + 1):  # the first round warms up
                for k in ([0, 1, 2] if i % 2 else [2, 1, 0]):
                    assert t.cmd("w 1") == "ok"  # every mapping written again
                    t0 = time.perf_counter()
                    if k == 0:
                        d = p.collect()
                        el = _ms(t0)
                        assert d.count >= n, d.count
                    else:
                        rows, _, errs = _native.pagemap_scan_ranges(
                            fd, ranges if k == 1 else span, RESET, WRITTEN, 0, 0, WRITTEN)
                        el = _ms(t0)
                        assert not errs.any() and (k == 1 or len(rows) == n)
                    if i:
                        got[k].append(el)
            ours, raw, one = (statistics.median(x) for x in got)
    finally:
        t.close()
    return (f"{n:>6} {len(ranges):>6} {attach:>10.1f} {ours:>11.2f} {raw:>17.2f} "
            f"{ours / raw:>6.2f} {one:>17.2f} {ours / one:>6.2f}")


def main() -> None:
    sizes = sys.argv[1] if len(sys.argv) > 1 else "1000,2000,4000,10000"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    print(f"{'N':>6} {'maps':>6} {'attach ms':>10} {'collect ms':>11} "
          f"{'raw per-range ms':>17} {'ratio':>6} {'raw one-ioctl ms':>17} {'ratio':>6}")
    for n in (int(x) for x in sizes.split(",")):
        print(row(n, reps), flush=True)


if __name__ == "__main__":
    main()
