"""``pagewatch bench --snapshot``: Snapshot's restore and update against the alternatives.

For each written fraction (0.1 %, 1 %, 10 %, 100 % of the pages) and each pattern
(``random`` pages, ``runs`` of 256 contiguous pages at random places), one round is: write
the pages (one byte each, C), then put the memory back.  Measured, each in the same round
structure and the same process:

``copyto``
    ``np.copyto(a, saved)`` of the whole array: what people do today.
``floor``
    a C loop copying exactly the written pages back (``copy_runs`` with the runs known in
    advance): the least any copy-back can cost.
``copy[<backend>]`` / ``dontneed[<backend>]``
    :meth:`Snapshot.restore` with each method (``dontneed`` on :func:`snapshot_array`
    memory) and ``update`` after the same writes.
``fork``
    a fork()-based snapshot (Redis BGSAVE's trick): the parent stays as the baseline, a child
    runs the round's writes in its copy-on-write memory and exits; timed from fork to reap.

Each figure is timed from Python with ``time.perf_counter_ns``.  ``restore`` times the reset
alone; ``cycle`` times writes + reset, since ``dontneed`` moves the copy into the next
round's first writes (each re-faults a page from the memfd) and ``fork`` has no separate
reset.  Ratios (``ratios``) are taken from medians of this one run.
"""

from __future__ import annotations

import functools
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _native
from ..backends.base import backend_class
from ..kernel.constants import PAGE_SIZE
from ..snapshot import Snapshot, snapshot_array
from .measures import GiB, MiB, fraction_key, stat

__all__ = ["run", "render_text", "FRACTIONS", "PATTERNS", "RUN_PAGES"]

FRACTIONS = (0.001, 0.01, 0.1, 1.0)
PATTERNS = ("random", "runs")
RUN_PAGES = 256  #: pages per contiguous run of the ``runs`` pattern (1 MiB)
#: the slow backends snapshot smaller arrays (their first writes cost a signal or a
#: context switch per page): bytes
CAPS = {"uffd-sync": 64 * MiB, "mprotect": 64 * MiB, "compare": 256 * MiB,
        "soft-dirty": 256 * MiB}

Progress = Callable[[int, int, str], None]


def _pages(pattern: str, fraction: float, npages: int, rng: np.random.Generator) -> np.ndarray:
    k = min(npages, max(1, round(fraction * npages)))
    if k == npages:
        return np.arange(npages, dtype=np.int64)
    if pattern == "random":
        return np.sort(rng.choice(npages, size=k, replace=False)).astype(np.int64)
    nruns = -(-k // RUN_PAGES)
    slots = npages // RUN_PAGES
    chosen = np.sort(rng.choice(slots, size=min(nruns, slots), replace=False))
    pages = (chosen[:, None] * RUN_PAGES + np.arange(RUN_PAGES)).ravel()
    return pages[:k].astype(np.int64)


def _runs(pages: np.ndarray) -> np.ndarray:
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], brk))]
    ends = pages[np.concatenate((brk - 1, [len(pages) - 1]))] + 1
    return np.stack([starts, ends], axis=1).astype(np.int64)


def _anonymous(nbytes: int) -> np.ndarray:
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, np.uint8)


class _Round:
    """Writes the round's pages with a new byte each time."""

    def __init__(self, pages: np.ndarray) -> None:
        self.pages = pages
        self.value = 0

    def write(self, a: np.ndarray) -> None:
        self.value = self.value % 255 + 1
        _native.write_pages(a.ctypes.data, len(a) // PAGE_SIZE, order=self.pages,
                            value=self.value)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def _then(first: Callable[[], Any], second: Callable[[], Any]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()
    return both


def _nothing() -> None:
    pass


def _measure(reps: int, before: Callable[[], Any], op: Callable[[], Any]) -> list[float]:
    out = []
    for _ in range(reps):
        before()
        out.append(_timed(op))
    return out


def _fork_cycle(a: np.ndarray, r: _Round) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            r.write(a)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _case(nbytes: int, plain: np.ndarray, saved: np.ndarray, arrays: dict[str, np.ndarray],
          pages: np.ndarray, backends: Sequence[str], reps: int,
          tick: Callable[[str], None], label: str) -> dict[str, Any]:
    """Every way of putting the memory back after writing ``pages``."""
    runs = _runs(pages)
    r = _Round(pages)
    row: dict[str, Any] = {"pages": len(pages), "runs": len(runs)}
    src, dst = saved.ctypes.data, plain.ctypes.data

    def copyto() -> None:
        np.copyto(plain, saved)

    def floor() -> None:
        _native.copy_runs(dst, src, runs, 0, nbytes)

    tick(f"{label}: copyto, floor, fork")
    def write_plain() -> None:
        r.write(plain)

    for name, fn in (("copyto", copyto), ("floor", floor)):
        row[name] = {"restore": stat(_measure(reps, write_plain, fn), "ms"),
                     "cycle": stat(_measure(reps, _nothing, _then(write_plain, fn)), "ms")}
    row["fork"] = {"cycle": stat(_measure(reps, _nothing, lambda: _fork_cycle(plain, r)),
                                 "ms")}
    for backend in backends:
        for method, a in arrays.items():
            tick(f"{label}: {method} [{backend}]")
            write = functools.partial(r.write, a)
            with Snapshot(a, backend=backend) as snap:
                assert snap.method == method, snap.method_reason
                restore = _measure(reps, write, snap.restore)
                cycle = _measure(reps, _nothing, _then(write, snap.restore))
                update = _measure(reps, write, snap.update)
                snap.restore()
            row[f"{method}[{backend}]"] = {"restore": stat(restore, "ms"),
                                           "cycle": stat(cycle, "ms"),
                                           "update": stat(update, "ms")}
    return row


def _one_size(nbytes: int, backends: Sequence[str], fractions: Sequence[float],
              patterns: Sequence[str], reps: int, rng: np.random.Generator,
              tick: Callable[[str], None]) -> dict[str, Any]:
    npages = nbytes // PAGE_SIZE
    plain = _anonymous(nbytes)
    plain[::PAGE_SIZE] = 1  # every page present, as in a running program
    saved = plain.copy()
    arrays = {"copy": plain, "dontneed": snapshot_array(nbytes, np.uint8)}
    arrays["dontneed"][::PAGE_SIZE] = 1
    out: dict[str, Any] = {}
    for pattern in patterns:
        for f in fractions:
            key = f"{pattern}/{fraction_key(f)}"
            out[key] = _case(nbytes, plain, saved, arrays, _pages(pattern, f, npages, rng),
                             backends, reps, tick, f"snapshot {nbytes // MiB} MiB {key}")
    return out


def _available(names: Sequence[str] | None) -> list[str]:
    from ..backends.base import BACKENDS

    got = []
    for name in names or BACKENDS:
        ok, _ = backend_class(name).available()
        if ok:
            got.append(name)
    return got


def run(nbytes: int = GiB, backends: Sequence[str] | None = None,
        fractions: Sequence[float] = FRACTIONS, patterns: Sequence[str] = PATTERNS,
        reps: int = 3, seed: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Measure restore and update (see the module docstring); returns a JSON-ready dict:
    ``sizes[<bytes>][<pattern>/<fraction>][<what>]`` figures, ``backends`` measured at each
    size, and ``ratios`` derived from the medians."""
    names = _available(backends)
    rng = np.random.default_rng(seed)
    sizes: dict[int, list[str]] = {}
    for name in names:
        sizes.setdefault(min(nbytes, CAPS.get(name, nbytes)), []).append(name)
    steps = sum(len(fractions) * len(patterns) * (1 + 2 * len(b)) for b in sizes.values())
    done = [0]

    def tick(label: str) -> None:
        if progress is not None:
            progress(done[0], steps, label)
        done[0] += 1

    result: dict[str, Any] = {"config": {"bytes": nbytes, "reps": reps, "seed": seed,
                                         "fractions": list(fractions),
                                         "patterns": list(patterns)},
                              "sizes": {}, "backends": {str(k): v for k, v in sizes.items()}}
    for size, names_here in sorted(sizes.items(), reverse=True):
        result["sizes"][str(size)] = _one_size(size, names_here, fractions, patterns, reps, rng,
                                               tick)
    if progress is not None:
        progress(steps, steps, "done")
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Per size, case and method: restore / floor, copyto / restore, and the cycle ratios."""
    out: dict[str, Any] = {}
    for size, cases in result["sizes"].items():
        for key, row in cases.items():
            if not isinstance(row, dict) or "floor" not in row:
                continue
            floor = row["floor"]["restore"]["median"]
            copyto = row["copyto"]["restore"]["median"]
            for what, fig in row.items():
                if not (isinstance(fig, dict) and "update" in fig):
                    continue
                rest = fig["restore"]["median"]
                out[f"{size}/{key}/{what}"] = {
                    "restore_vs_floor": rest / floor if floor else None,
                    "copyto_vs_restore": copyto / rest if rest else None,
                    "cycle_vs_floor_cycle": fig["cycle"]["median"]
                    / row["floor"]["cycle"]["median"],
                    "fork_cycle_vs_cycle": row["fork"]["cycle"]["median"]
                    / fig["cycle"]["median"],
                }
    return out


def render_text(result: dict[str, Any]) -> str:
    """One table per size: medians in ms, and the ratios."""
    lines = ["Snapshot: put memory back after writing a fraction of its pages (median ms; "
             "restore = reset alone, cycle = writes + reset)"]
    for size, cases in result["sizes"].items():
        lines.append("")
        lines.append(f"{int(size) // MiB} MiB, backends {', '.join(result['backends'][size])}")
        lines.append(f"{'case':<14} {'what':<22} {'restore':>9} {'cycle':>9} {'update':>9} "
                     f"{'vs floor':>9} {'copyto/x':>9}")
        for key, row in cases.items():
            if not isinstance(row, dict) or "floor" not in row:
                continue
            floor = row["floor"]["restore"]["median"]
            copyto = row["copyto"]["restore"]["median"]
            for what, fig in row.items():
                if not isinstance(fig, dict):
                    continue
                rest = fig.get("restore", {}).get("median")
                cyc = fig["cycle"]["median"]
                upd = fig.get("update", {}).get("median")
                vs = f"{rest / floor:8.2f}x" if rest is not None and floor else ""
                ct = f"{copyto / rest:8.1f}x" if rest else ""
                lines.append(f"{key:<14} {what:<22} "
                             f"{'' if rest is None else f'{rest:9.3f}':>9} {cyc:9.3f} "
                             f"{'' if upd is None else f'{upd:9.3f}':>9} {vs:>9} {ct:>9}")
    return "\n".join(lines)
