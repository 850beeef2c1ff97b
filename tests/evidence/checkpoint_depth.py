"""How many direct writes a checkpoint save keeps in flight (README, "Why AIO and not a
writing thread"): a 1 GiB array, 1 % of its pages written before each save, saves of the
same code with ``DEPTH`` blocks of AIO (2: one write in flight while the next block fills,
as the writing thread of before did) and with no AIO at all (the saver writes each block
itself, nothing overlaps),
interleaved, 256 MiB of other memory written before each save (as ``np.save`` would leave
the caches).  Not a test: a measurement, run by hand::

    .venv/bin/python -m tests.evidence.checkpoint_depth [ROUNDS] [DIR]
"""

from __future__ import annotations

import errno
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import pagewatch.checkpoint as ckpt
from pagewatch import _native
from pagewatch.bench.checkpoint import _array
from pagewatch.checkpoint import _store

VARIANTS: list[int | None] = [16, 8, 4, 2, None]  # None: no AIO, writes in line


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    folder = tempfile.mkdtemp(prefix="pagewatch-depth-", dir=sys.argv[2] if len(sys.argv) > 2
                              else None)
    ps, nbytes = 4096, 1 << 30
    npages = nbytes // ps
    k = npages // 100
    a = _array(nbytes)
    junk = np.ones(256 << 20, np.uint8)
    rng = np.random.default_rng(1)
    real_depth, real_setup = _store.DEPTH, _native.aio_setup

    def no_aio(nr: int) -> int:
        raise OSError(errno.ENOSYS, "no AIO (measured without)")

    times: dict[int | None, list[float]] = {v: [] for v in VARIANTS}
    try:
        with ckpt.Checkpoint(os.path.join(folder, "ck"), a, max_chain=10**6,
                             max_chain_ratio=1e9) as ck:
            ck.save()
            for r in range(rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for depth in order:
                    pages = rng.choice(npages, k, replace=False)
                    a[pages * ps + rng.integers(0, ps, k)] += np.uint8(1)
                    junk += 1
                    _store.DEPTH = depth or real_depth
                    _native.aio_setup = real_setup if depth else no_aio
                    # the next save opens a context again, or finds none
                    ck._store._aio.close()  # type: ignore[union-attr]
                    t = time.perf_counter()
                    ck.save()
                    times[depth].append(time.perf_counter() - t)
    finally:
        _store.DEPTH, _native.aio_setup = real_depth, real_setup
        shutil.rmtree(folder, ignore_errors=True)
    print(f"a 1 % save of 1 GiB ({k} pages), {rounds} rounds, median [min-max] ms:")
    for depth, ts in times.items():
        name = f"{depth} in flight" if depth else "no AIO (in line)"
        print(f"  {name:18} {statistics.median(ts) * 1e3:6.2f} "
              f"[{min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f}]")


if __name__ == "__main__":
    main()
