"""The attach's stop under load (README, "What the attach shows to the target"): N attaches
to a running ``pacer`` beside three busy loops; the distribution of ``attach_stop_ms``.  Not
a test: a measurement, run by hand::

    .venv/bin/python -m tests.evidence.stoptime [N]
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from pagewatch.process import ProcessTracker
from tests.targets.common import build


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(3)]
    target = subprocess.Popen([str(build("pacer")), "200", "64"], stdout=subprocess.DEVNULL)
    stops: list[float] = []
    try:
        for _ in range(n):
            with ProcessTracker(target.pid) as p:
                stops.append(float(p.attach_stop_ms or 0.0))
    finally:
        for h in hogs:
            h.kill()
        target.kill()
    s = np.array(stops)
    print(f"{n} attaches beside 3 busy loops, load average {os.getloadavg()[0]:.1f}: stop ms "
          f"p50 {np.median(s):.2f}, p95 {np.percentile(s, 95):.2f}, "
          f"p99 {np.percentile(s, 99):.2f}, max {s.max():.2f}")


if __name__ == "__main__":
    main()
