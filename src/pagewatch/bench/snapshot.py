"""``pagewatch bench --snapshot``: Snapshot's restore and update against the alternatives.

For each written fraction (0.1 %, 1 %, 10 %, 100 % of the pages) and each pattern
(``random`` pages, ``runs`` of 256 contiguous pages at random places), one round is: write
the pages (one byte each, C), then put the memory back.  Measured, each in the same round
structure and the same process:

``copyto``
    ``np.copyto(a, saved)`` of the whole array: what people do today.
``floor``
    a C loop copying exactly the written pages back (``copy_runs`` with the runs known in
    advance): the copy alone, no finding out which pages.
``floor_scan``
    the least a restore can do, all in C (``_native.restore_floor``) on a mapping of its
    own with raw async uffd-wp, from a saved copy of its own: one ``PAGEMAP_SCAN`` for the written pages and a
    ``memcpy`` of each run from the baseline (then, untimed, a scan that protects them
    again for the next round).
``floor_rearm``
    the same with that second scan timed: the whole work of a restore that leaves the
    memory tracked, in C.
``copy[<backend>]`` / ``dontneed[<backend>]``
    :meth:`Snapshot.restore` with each method (``dontneed`` on :func:`snapshot_array`
    memory) and ``update`` after the same writes.
``fork``
    a fork()-based snapshot (Redis BGSAVE's trick): the parent stays as the baseline, a child
    runs the round's writes in its copy-on-write memory and exits; timed from fork to reap.

Each figure is timed from Python with ``time.perf_counter_ns`` (the C floors inside C),
and the restores also in thread CPU time (``time.thread_time_ns``; the C floors'
``CLOCK_THREAD_CPUTIME_ID``): on a shared machine the steadier figure, since a restore is
CPU work (scans, copies, system calls) and the CPU time leaves out the waits for a CPU.
The restores are interleaved: every repeat runs each way once, in an order drawn anew
(seeded), so a change in the machine's load hits them alike and no way always follows the
same other; each floor has a mapping and a saved copy no other way touches (as a Snapshot's
baseline is its own); figures are medians.  ``restore`` times the
reset alone; ``cycle`` times writes + reset, since ``dontneed`` moves the copy into the next
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
from ..kernel.constants import PAGE_SIZE, PageCategory, ScanFlag
from ..snapshot import Snapshot, snapshot_array
from .measures import GiB, Mapping, MiB, RawAsync, fraction_key, stat

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


def _timed2(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and thread CPU milliseconds of ``fn()``."""
    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6, (time.thread_time_ns() - c0) / 1e6


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


class _Floor:
    """One C floor with a scan: a mapping of its own under raw async uffd-wp, and a saved
    copy of its own (no other way touches either: a way runs faster right after another
    that touched the same memory, and Snapshot's baseline is its own too)."""

    def __init__(self, nbytes: int) -> None:
        self.m = Mapping(nbytes)
        try:
            self.a = self.m.array()
            self.a[::PAGE_SIZE] = 1  # every page present, as the targets'
            self.saved = self.a.copy()
            self.raw = RawAsync(self.m)
        except BaseException:
            self.m.close()
            raise
        self.raw.scan(reset=True)

    def restore(self, rearm: bool) -> tuple[float, float]:
        ns, _, _, cpu = _native.restore_floor(
            self.raw.pm, self.m.addr, self.m.addr + self.m.nbytes, self.m.addr,
            self.saved.ctypes.data, rearm, _GET, _WRITTEN)
        if not rearm:
            self.raw.scan(reset=True)  # untimed: protect them again for the next round
        return float(ns) / 1e6, float(cpu) / 1e6

    def close(self) -> None:
        self.raw.close()
        self.m.close()


_GET = int(ScanFlag.CHECK_WPASYNC)
_WRITTEN = int(PageCategory.WRITTEN)


def _floors_for(nbytes: int) -> tuple[_Floor, _Floor] | None:
    """The two scan floors (without and with the re-protect), or None where raw async
    uffd-wp does not work."""
    try:
        first = _Floor(nbytes)
    except OSError:
        return None
    try:
        return first, _Floor(nbytes)
    except BaseException:
        first.close()
        raise


Way = tuple[Callable[[], Any], Callable[[], tuple[float, float]]]


def _rounds(reps: int, ways: dict[str, Way]) -> dict[str, tuple[list[float], list[float]]]:
    """``reps`` rounds; in each, every way once (its writes, then its timed restore), in
    an order drawn anew each round (seeded).  One warm-up round first, not kept.  Per way:
    the wall-clock and the thread CPU milliseconds.

    Drawn, not rotated: a rotation keeps each way's predecessor, and a way runs faster
    right after one that touched the same memory (the floor that re-protects, always after
    the one that does not on the same mapping and pages, took 1.4 ms where it took 1.9 ms
    after other work, and made Snapshot's copy-back look 1.44x it instead of 1.1x)."""
    names = list(ways)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    order = np.random.default_rng(len(names))
    for i in range(reps + 1):
        for n in order.permutation(names).tolist():
            before, timed = ways[n]
            before()
            wall, cpu = timed()
            if i:
                out[n][0].append(wall)
                out[n][1].append(cpu)
    return out


def _case(nbytes: int, plain: np.ndarray, saved: np.ndarray, arrays: dict[str, np.ndarray],
          floor_maps: tuple[_Floor, _Floor] | None, pages: np.ndarray, backends: Sequence[str], reps: int,
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

    def write_plain() -> None:
        r.write(plain)

    def timed(fn: Callable[[], Any]) -> Callable[[], tuple[float, float]]:
        return lambda: _timed2(fn)

    shared: dict[str, Way] = {
        "copyto": (write_plain, timed(copyto)), "floor": (write_plain, timed(floor))}
    if floor_maps is not None:
        scan, rearm = floor_maps
        shared["floor_scan"] = (lambda: r.write(scan.a), lambda: scan.restore(False))
        shared["floor_rearm"] = (lambda: r.write(rearm.a), lambda: rearm.restore(True))
    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in shared}
    tick(f"{label}: copyto, floor, fork")
    for name, fn in (("copyto", copyto), ("floor", floor)):
        row[name] = {"cycle": stat(_measure(reps, _nothing, _then(write_plain, fn)), "ms")}
    row["fork"] = {"cycle": stat(_measure(reps, _nothing, lambda: _fork_cycle(plain, r)),
                                 "ms")}
    for backend in backends:
        snaps: dict[str, Snapshot] = {}
        try:
            for method, a in arrays.items():
                snaps[method] = Snapshot(a, backend=backend)
                assert snaps[method].method == method, snaps[method].method_reason
            tick(f"{label}: restores [{backend}], interleaved")
            ways = dict(shared)
            for method, snap in snaps.items():
                ways[f"{method}[{backend}]"] = (functools.partial(r.write, arrays[method]),
                                                timed(snap.restore))
            got = _rounds(reps, ways)
            for n in shared:
                samples[n][0].extend(got[n][0])
                samples[n][1].extend(got[n][1])
            for method, snap in snaps.items():
                tick(f"{label}: {method} [{backend}] cycle, update")
                write = functools.partial(r.write, arrays[method])
                cycle = _measure(reps, _nothing, _then(write, snap.restore))
                update = _measure(reps, write, snap.update)
                snap.restore()
                wall, cpu = got[f"{method}[{backend}]"]
                row[f"{method}[{backend}]"] = {"restore": stat(wall, "ms"),
                                               "restore_cpu": stat(cpu, "ms"),
                                               "cycle": stat(cycle, "ms"),
                                               "update": stat(update, "ms")}
        finally:
            for snap in snaps.values():
                snap.close()
    for n, (wall, cpu) in samples.items():
        row.setdefault(n, {}).update(restore=stat(wall, "ms"), restore_cpu=stat(cpu, "ms"))
    return row


def _one_size(nbytes: int, backends: Sequence[str], fractions: Sequence[float],
              patterns: Sequence[str], reps: int, rng: np.random.Generator,
              tick: Callable[[str], None]) -> dict[str, Any]:
    npages = nbytes // PAGE_SIZE
    plain = _anonymous(nbytes)
    plain[::PAGE_SIZE] = 1  # every page present, as in a running program
    saved = plain.copy()
    arrays = {"copy": _anonymous(nbytes), "dontneed": snapshot_array(nbytes, np.uint8)}
    for a in arrays.values():
        a[::PAGE_SIZE] = 1
    floor_maps = _floors_for(nbytes)
    out: dict[str, Any] = {}
    try:
        for pattern in patterns:
            for f in fractions:
                key = f"{pattern}/{fraction_key(f)}"
                out[key] = _case(nbytes, plain, saved, arrays, floor_maps,
                                 _pages(pattern, f, npages, rng), backends, reps, tick,
                                 f"snapshot {nbytes // MiB} MiB {key}")
    finally:
        for floor in floor_maps or ():
            floor.close()
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
    steps = sum(len(fractions) * len(patterns) * (1 + 3 * len(b)) for b in sizes.values())
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


def _median(row: dict[str, Any], what: str, measure: str = "restore") -> float | None:
    fig = row.get(what, {}).get(measure)
    return None if fig is None else float(fig["median"])


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Per size, case and method: restore over each floor (the copy alone, one scan and the
    copy, the same and the scan that protects again), copyto / restore, and the cycle
    ratios; all from medians of this one run."""
    out: dict[str, Any] = {}
    for size, cases in result["sizes"].items():
        for key, row in cases.items():
            if not isinstance(row, dict) or "floor" not in row:
                continue
            floor = _median(row, "floor")
            for what, fig in row.items():
                if not (isinstance(fig, dict) and "update" in fig):
                    continue
                rest = fig["restore"]["median"]
                out[f"{size}/{key}/{what}"] = {
                    "restore_vs_floor": _over(rest, floor),
                    "restore_vs_floor_scan": _over(rest, _median(row, "floor_scan")),
                    "restore_vs_floor_rearm": _over(rest, _median(row, "floor_rearm")),
                    "restore_vs_floor_scan_cpu": _over(_median(row, what, "restore_cpu"),
                                                       _median(row, "floor_scan", "restore_cpu")),
                    "restore_vs_floor_rearm_cpu": _over(
                        _median(row, what, "restore_cpu"),
                        _median(row, "floor_rearm", "restore_cpu")),
                    "copyto_vs_restore": _over(_median(row, "copyto"), rest),
                    "cycle_vs_floor_cycle": _over(fig["cycle"]["median"],
                                                  _median(row, "floor", "cycle")),
                    "fork_cycle_vs_cycle": _over(_median(row, "fork", "cycle"),
                                                 fig["cycle"]["median"]),
                }
    return out


def _x(v: float | None, width: int = 8, digits: int = 2) -> str:
    return " " * (width + 1) if v is None else f"{v:{width}.{digits}f}x"


def render_text(result: dict[str, Any]) -> str:
    """One table per size: medians in ms, and the ratios."""
    lines = ["Snapshot: put memory back after writing a fraction of its pages (median ms; "
             "restore = reset alone, interleaved; cycle = writes + reset)",
             "floors, all C: floor = memcpy of the runs known; floor_scan = one PAGEMAP_SCAN "
             "+ memcpy; floor_rearm = that + the scan that protects them again"]
    for size, cases in result["sizes"].items():
        lines.append("")
        lines.append(f"{int(size) // MiB} MiB, backends {', '.join(result['backends'][size])}")
        lines.append(f"{'case':<14} {'what':<22} {'restore':>9} {'cycle':>9} {'update':>9} "
                     f"{'/floor':>9} {'/scan':>9} {'/rearm':>9} {'copyto/x':>9} "
                     f"{'cpu ms':>9} {'cpu/scan':>9} {'cpu/rearm':>9}")
        for key, row in cases.items():
            if not isinstance(row, dict) or "floor" not in row:
                continue
            floors = [_median(row, f) for f in ("floor", "floor_scan", "floor_rearm")]
            cpu_floors = [_median(row, f, "restore_cpu") for f in ("floor_scan", "floor_rearm")]
            copyto = _median(row, "copyto")
            for what, fig in row.items():
                if not isinstance(fig, dict):
                    continue
                rest = _median(row, what)
                cyc = _median(row, what, "cycle")
                upd = _median(row, what, "update")
                vs = [_x(_over(rest, f)) if what.endswith("]") else _x(None) for f in floors]
                ct = _x(_over(copyto, rest), 8, 1) if what != "copyto" else _x(None)
                cpu = _median(row, what, "restore_cpu")
                vc = [_x(_over(cpu, f)) if what.endswith("]") else _x(None) for f in cpu_floors]
                lines.append(f"{key:<14} {what:<22} "
                             f"{'' if rest is None else f'{rest:9.3f}':>9} "
                             f"{'' if cyc is None else f'{cyc:9.3f}':>9} "
                             f"{'' if upd is None else f'{upd:9.3f}':>9} {' '.join(vs)} {ct} "
                             f"{'' if cpu is None else f'{cpu:9.3f}':>9} {' '.join(vc)}")
    return "\n".join(lines)
