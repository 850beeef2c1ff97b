"""The checkpoint part of ``pagewatch bench``: incremental saves against ``np.save``.

On one array (1 GiB in ``full`` mode, 256 MiB in ``quick``), each with the data on disk
(fsync) before the clock stops:

* ``save``: :meth:`pagewatch.Checkpoint.save` after ``fraction`` (1 %) of the pages, chosen
  at random, were written — against ``np.save`` of the whole array to the same folder;
* ``load``: :func:`pagewatch.checkpoint.load` of the newest generation of a 10-generation
  chain (a base and nine such deltas) — against ``np.load`` of one full ``.npy``; both read
  files just written (the page cache), interleaved;
* ``bytes_per_page``: the bytes a delta save writes per byte of pages written (1 = nothing
  but the pages).

Each figure is taken in wall-clock time and in this process's CPU time (user + system, all
threads): on a shared machine the CPU time is the steadier one (the load's copies and
checksums are CPU work; a save's fsync waits for the disk, which only the wall clock sees).
Ratios are of medians of this one run; the pairs are interleaved (a save, then an
``np.save``; loads alternating which goes first).

``python -m pagewatch.bench.checkpoint [--full] [--dir DIR]`` runs it alone.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from .measures import GiB, MiB, stat

__all__ = ["measure", "table_rows", "SIZES"]

SIZES = {"smoke": 8 * MiB, "quick": 256 * MiB, "full": GiB}
REPS = {"smoke": 2, "quick": 3, "full": 7}
CHAIN = 10


def _array(nbytes: int) -> np.ndarray:
    """A page-aligned array of its own mapping, every page written (a pattern, not zeros)."""
    m = mmap.mmap(-1, nbytes)
    a = np.frombuffer(m, np.uint8)
    a.view(np.uint64)[:] = np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return a


def _timed(fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and its CPU seconds (this process)."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _np_save(path: str, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, a)
        f.flush()
        os.fsync(f.fileno())


def measure(mode: str = "quick", directory: str | None = None, fraction: float = 0.01,
            seed: int = 1) -> dict[str, Any]:
    """Save and load figures for one array of ``SIZES[mode]`` bytes in a temporary folder
    under ``directory`` (default: the system's temporary folder)."""
    from .. import checkpoint as ckpt

    nbytes = SIZES[mode]
    reps = REPS[mode]
    ps = mmap.PAGESIZE
    npages = nbytes // ps
    k = max(1, int(npages * fraction))
    rng = np.random.default_rng(seed)
    folder = tempfile.mkdtemp(prefix="pagewatch-bench-ck-", dir=directory)
    try:
        a = _array(nbytes)
        path = os.path.join(folder, "ck")
        npy = os.path.join(folder, "full.npy")
        saves: list[float] = []
        np_saves: list[float] = []
        save_cpu: list[float] = []
        np_save_cpu: list[float] = []
        per_page: list[float] = []
        with ckpt.Checkpoint(path, a, max_chain=CHAIN, max_chain_ratio=1.0) as ck:
            _, base_s, _ = _timed(ck.save)
            for i in range(CHAIN - 1):
                pages = rng.choice(npages, k, replace=False)
                a[pages * ps + rng.integers(0, ps, k)] += np.uint8(1)
                g, wall, cpu = _timed(ck.save)
                saves.append(wall)
                save_cpu.append(cpu)
                per_page.append(g.nbytes / (g.pages * ps))
                if i < reps:  # interleaved, so both see the same machine
                    _, wall, cpu = _timed(lambda: _np_save(npy, a))
                    np_saves.append(wall)
                    np_save_cpu.append(cpu)
            checksum = ck.checksum
        loads: list[float] = []
        np_loads: list[float] = []
        load_cpu: list[float] = []
        np_load_cpu: list[float] = []

        def ours() -> None:
            got, wall, cpu = _timed(lambda: ckpt.load(path)["arr_0"])
            loads.append(wall)
            load_cpu.append(cpu)
            if not np.array_equal(got, a):
                raise AssertionError("the newest generation loaded differs from the array")

        def numpy_load() -> None:
            _, wall, cpu = _timed(lambda: np.load(npy))
            np_loads.append(wall)
            np_load_cpu.append(cpu)

        for i in range(reps):
            for fn in ((ours, numpy_load) if i % 2 == 0 else (numpy_load, ours)):
                fn()
        chain_bytes = sum(g.nbytes for g in ckpt.generations(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    save_m, np_save_m = statistics.median(saves), statistics.median(np_saves)
    load_m, np_load_m = statistics.median(loads), statistics.median(np_loads)
    return {
        "bytes": nbytes, "fraction": fraction, "pages_per_save": k, "checksum": checksum,
        "folder": directory or tempfile.gettempdir(),
        "base_save": stat([base_s], "s"),
        "save": stat(saves, "s"), "np_save": stat(np_saves, "s"),
        "save_speedup": np_save_m / save_m,
        # Of the fastest runs: on a busy machine the steadier figure (interference only adds)
        "save_speedup_best": min(np_saves) / min(saves),
        "save_cpu": stat(save_cpu, "s"), "np_save_cpu": stat(np_save_cpu, "s"),
        "save_speedup_cpu": statistics.median(np_save_cpu) / statistics.median(save_cpu),
        "load": stat(loads, "s"), "np_load": stat(np_loads, "s"),
        "load_ratio": load_m / np_load_m,
        "load_ratio_best": min(loads) / min(np_loads),
        "load_cpu": stat(load_cpu, "s"), "np_load_cpu": stat(np_load_cpu, "s"),
        "load_ratio_cpu": statistics.median(load_cpu) / statistics.median(np_load_cpu),
        "chain_bytes": chain_bytes,
        "bytes_per_page": stat(per_page, "x"),
    }


def table_rows(r: dict[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """``(title, columns, rows, caption)`` of the report's checkpoint table."""
    from .report import figure, fmt

    size = f"{r['bytes'] / GiB:g} GiB" if r["bytes"] >= GiB else f"{r['bytes'] // MiB} MiB"
    rows = [
        [f"save, {r['fraction'] * 100:g} % of pages written ({r['pages_per_save']} random)",
         figure(r["save"]), f"np.save {figure(r['np_save'])}",
         f"{fmt(r['save_speedup'])}x faster, best runs {fmt(r['save_speedup_best'])}x "
         "(target >= 100x)"],
        ["  the same, CPU time", figure(r["save_cpu"]), f"np.save {figure(r['np_save_cpu'])}",
         f"{fmt(r['save_speedup_cpu'])}x less CPU"],
        ["load the newest of a 10-generation chain", figure(r["load"]),
         f"np.load {figure(r['np_load'])}", f"{fmt(r['load_ratio'])}x np.load, best runs "
         f"{fmt(r['load_ratio_best'])}x (target <= 1.5x)"],
        ["  the same, CPU time", figure(r["load_cpu"]), f"np.load {figure(r['np_load_cpu'])}",
         f"{fmt(r['load_ratio_cpu'])}x np.load"],
        ["bytes written per byte of pages written", figure(r["bytes_per_page"]), "",
         "target <= 1.1x"],
    ]
    caption = (f"{size} array, fsync'ed files in {r['folder']}, checksum {r['checksum']}; "
               f"the first save (a base) took {figure(r['base_save'], spread=False)} s")
    return f"checkpoint: {size}, seconds", ["", "pagewatch", "numpy", "ratio"], rows, caption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(SIZES), default="full")
    p.add_argument("--dir", help="where to write (default: the temporary folder)")
    args = p.parse_args(argv)
    r = measure(args.mode, args.dir)
    title, cols, rows, caption = table_rows(r)
    print(title)
    for row in [cols, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, (44, 24, 32, 40), strict=True)))
    print(caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
