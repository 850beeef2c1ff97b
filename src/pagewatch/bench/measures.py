"""The measures of ``pagewatch bench``.

Every timing of a write or of a kernel call is taken inside C (``pagewatch._native``'s
bench functions, ``CLOCK_MONOTONIC``, GIL released); only ``Tracker.reset()`` /
``Tracker.collect()`` and the pure-Python alternatives are timed from Python, because
their Python cost is what is being measured.  Each measure returns plain dicts that
``json.dumps`` takes as they are; every figure is a :func:`stat` of its samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _native
from ..kernel.constants import (
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
    PageCategory,
    RegisterMode,
    ScanFlag,
    UffdFeature,
    WriteProtectMode,
)
from ..kernel.uffd import open_userfaultfd
from ..tracker import Region, Tracker

__all__ = [
    "MiB", "GiB", "PATTERNS", "PRECISION_CASES", "FRACTIONS", "STRIDE", "stat", "Pattern",
    "make_pattern", "Mapping", "RawAsync", "fraction_key", "size_key", "floor_writes",
    "floor_fresh_touch", "floor_reset", "floor_collect", "backend_write", "backend_reset",
    "backend_collect", "backend_precision", "python_overhead", "collect_vs_floor",
    "overlapping_trackers", "tracker_setup", "SMALL_CASES", "alternative_collect",
    "ALTERNATIVES", "hugepage_size",
]

MiB = 1 << 20
GiB = 1 << 30

#: the write orders of the tracked-write measure
PATTERNS = ("sequential", "strided", "random")
#: the write sets of the precision measure
PRECISION_CASES = ("sequential", "strided", "random", "edges", "none")
#: fractions of the region written before a collect
FRACTIONS = (0.0, 0.001, 0.01, 0.1, 1.0)
#: "strided" writes every STRIDE-th page
STRIDE = 16

_WRITTEN = int(PageCategory.WRITTEN)
_WP_MATCHING = int(ScanFlag.WP_MATCHING)
_PROT_NONE = 0


# ---- statistics ----------------------------------------------------------------------

def stat(samples: Sequence[float], unit: str) -> dict[str, Any]:
    """The median, min and max of ``samples``, with the samples themselves.

    Raises
    ------
    ValueError
        No samples.
    """
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("a figure needs at least one sample")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "unit": unit, "samples": xs}


def fraction_key(f: float) -> str:
    """The JSON key of a written fraction: ``0.001`` -> ``"0.001"``, ``1.0`` -> ``"1"``."""
    return f"{f:g}"


def size_key(nbytes: int) -> str:
    """The JSON key of a region size: its number of bytes."""
    return str(int(nbytes))


def _npages_for(fraction: float, npages: int) -> int:
    """Pages written for ``fraction`` of a region: at least one for a fraction above 0."""
    if fraction <= 0:
        return 0
    return min(npages, max(1, round(fraction * npages)))


# ---- memory and write orders --------------------------------------------------------------

_values = itertools.cycle(range(1, 256))


def _next_value() -> int:
    """A new byte for each round of writes, never 0 (mappings start zeroed), so every
    round changes what it writes (the ``compare`` backend sees changes, not writes)."""
    return next(_values)


def hugepage_size() -> int:
    """The PMD (transparent huge page) size, 2 MiB when the kernel does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 * MiB


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Which pages of an ``npages`` region are written, in which order: every ``step``-th
    page ascending, or the pages of ``order`` in that order."""

    name: str
    npages: int
    step: int = 1
    order: np.ndarray | None = None

    @property
    def nwrites(self) -> int:
        if self.order is not None:
            return len(self.order)
        return -(-self.npages // self.step)

    def pages(self) -> np.ndarray:
        """The distinct pages written, ascending (``int64``)."""
        if self.order is not None:
            return np.unique(self.order)
        return np.arange(0, self.npages, self.step, dtype=np.int64)


def make_pattern(name: str, npages: int, rng: np.random.Generator) -> Pattern:
    """A named write pattern over ``npages`` pages.

    ``sequential`` every page ascending; ``strided`` every 16th page; ``random`` every page
    in random order; ``random-subset`` a random 1/16 of the pages in random order;
    ``edges`` the first and the last page; ``none`` nothing.
    """
    if name == "sequential":
        return Pattern(name, npages)
    if name == "strided":
        return Pattern(name, npages, STRIDE)
    if name == "random":
        return Pattern(name, npages, order=rng.permutation(npages).astype(np.int64))
    if name == "random-subset":
        k = max(1, npages // STRIDE)
        return Pattern(name, npages, order=rng.choice(npages, k, replace=False).astype(np.int64))
    if name == "edges":
        return Pattern(name, npages, order=np.unique(np.array([0, npages - 1], np.int64)))
    if name == "none":
        return Pattern(name, npages, order=np.empty(0, np.int64))
    raise ValueError(f"unknown pattern {name!r}")


class Mapping:
    """An anonymous private read-write mapping owned by the bench, unmapped by ``close``.

    Parameters
    ----------
    nbytes
        Size, a multiple of the page size.
    huge
        Aligned to the huge page size and advised ``MADV_HUGEPAGE``; otherwise advised
        ``MADV_NOHUGEPAGE`` (what trackers with ``huge_pages="split"`` do), so every
        figure is about 4 KiB pages.
    populate
        Write every page once (with 0), so later writes fault on protection, not on
        allocation.
    """

    def __init__(self, nbytes: int, *, huge: bool = False, populate: bool = True) -> None:
        if nbytes <= 0 or nbytes % PAGE_SIZE:
            raise ValueError(f"a mapping needs a positive multiple of {PAGE_SIZE} bytes")
        self.nbytes = nbytes
        self.npages = nbytes // PAGE_SIZE
        self.addr: int = _native.bench_mmap(nbytes, hugepage_size() if huge else 0)
        self._open = True
        try:
            try:
                _native.madvise(self.addr, nbytes, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE)
            except OSError:
                pass  # no THP in this kernel: 4 KiB pages either way
            if populate:
                _native.write_pages(self.addr, self.npages, 1, None, 0)
        except BaseException:
            self.close()
            raise

    @property
    def region(self) -> Region:
        return Region(self.addr, self.nbytes)

    def write(self, p: Pattern, value: int | None = None) -> int:
        """Write one byte to each page of ``p``; returns the nanoseconds it took (in C)."""
        if p.npages != self.npages:
            raise ValueError(f"a pattern over {p.npages} pages for a {self.npages}-page mapping")
        if p.nwrites == 0:
            return 0
        ns: int = _native.write_pages(self.addr, self.npages, p.step, p.order,
                                      _next_value() if value is None else value)
        return ns

    def array(self) -> np.ndarray:
        """A ``uint8`` numpy view of the mapping (valid until ``close``)."""
        buf = (ctypes.c_uint8 * self.nbytes).from_address(self.addr)
        return np.frombuffer(memoryview(buf), dtype=np.uint8)

    def close(self) -> None:
        if self._open:
            self._open = False
            _native.bench_munmap(self.addr, self.nbytes)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawAsync:
    """Async uffd-wp on a :class:`Mapping` with the thin native calls and no pagewatch
    policy on top: the kernel floor for collect and reset."""

    def __init__(self, m: Mapping) -> None:
        self.m = m
        self.fd, _ = open_userfaultfd()
        self.pm = -1
        try:
            want = int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
            granted, _ = _native.uffdio_api(self.fd, want)
            if granted & want != want:
                raise OSError(95, "UFFDIO_API did not grant WP_ASYNC | WP_UNPOPULATED")
            _native.uffdio_register(self.fd, m.addr, m.nbytes, int(RegisterMode.WP))
            _native.uffdio_writeprotect(self.fd, m.addr, m.nbytes, int(WriteProtectMode.WP))
            self.pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def scan(self, reset: bool = True) -> tuple[int, int]:
        """One PAGEMAP_SCAN over the mapping (the minimal C call, ``_native.scan_floor``),
        timed in C: ``(ns, pages written)``."""
        ns, pages, _, _ = _native.scan_floor(self.pm, self.m.addr, self.m.addr + self.m.nbytes,
                                             _WP_MATCHING if reset else 0, _WRITTEN)
        return int(ns), int(pages)

    def close(self) -> None:
        if self.pm >= 0:
            os.close(self.pm)
            self.pm = -1
        if self.fd >= 0:
            try:
                _native.uffdio_unregister(self.fd, self.m.addr, self.m.nbytes)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawAsync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the C floor ----------------------------------------------------------------------------

#: raw mechanisms of the floor: name -> native function (addr, npages, step, order) -> dict
_RAW: dict[str, Callable[..., dict[str, int]]] = {
    "uffd-async": _native.raw_uffd_async,
    "mprotect": _native.raw_mprotect,
    "uffd-sync": _native.raw_uffd_sync,
    "soft-dirty": _native.raw_soft_dirty,
}


def floor_writes(nbytes: int, reps: int, rng: np.random.Generator,
                 raw: Sequence[str] = ("uffd-async",)) -> dict[str, Any]:
    """Write cost of each pattern on a populated region of ``nbytes``, in ns per page:
    ``plain`` untracked, and the first write under each raw mechanism of ``raw``
    (the mechanism set up in C, no pagewatch: ``uffd-async`` is the kernel's own fault).

    Also, for ``uffd-async``, what its other steps cost: ``protect_ms_per_gib``
    (UFFDIO_WRITEPROTECT of the populated range) and ``collect_ms`` (the PAGEMAP_SCAN
    get-and-reset loop after the writes).
    """
    out: dict[str, Any] = {"bytes": nbytes}
    with Mapping(nbytes) as m:
        patterns = [make_pattern(name, m.npages, rng) for name in PATTERNS]
        plain: dict[str, Any] = {}
        for p in patterns:
            m.write(p)  # warm: the first round may find pages in other caches
            plain[p.name] = stat([m.write(p) / p.nwrites for _ in range(reps)], "ns/page")
        out["plain"] = plain
        for name in raw:
            fn = _RAW[name]
            per: dict[str, Any] = {}
            extra: dict[str, list[float]] = {}
            checks: dict[str, Any] = {}
            for p in patterns:
                samples = []
                for _ in range(reps):
                    r = fn(m.addr, m.npages, p.step, p.order)
                    samples.append(r["write_ns"] / r["writes"])
                    if name == "uffd-async":
                        extra.setdefault("protect_ms_per_gib", []).append(
                            r["protect_ns"] / 1e6 * GiB / nbytes)
                        extra.setdefault(f"collect_ms_{p.name}", []).append(
                            r["collect_ns"] / 1e6)
                    checks[p.name] = {"written": len(p.pages()), "reported": int(r["pages"])}
                per[p.name] = stat(samples, "ns/page")
            entry: dict[str, Any] = {"write": per, "checks": checks}
            for k, v in extra.items():
                entry[k] = stat(v, "ms/GiB" if "per_gib" in k else "ms")
            out[name] = entry
    return out


def floor_fresh_touch(nbytes: int, reps: int) -> dict[str, Any]:
    """First touch of never-used anonymous memory (the kernel allocates and zeroes a page
    per write), untracked: ns per page, sequential."""
    samples = []
    for _ in range(reps):
        with Mapping(nbytes, populate=False) as m:
            samples.append(m.write(Pattern("sequential", m.npages)) / m.npages)
    return {"bytes": nbytes, "sequential": stat(samples, "ns/page")}


def floor_reset(sizes: Sequence[int], reps: int) -> dict[str, Any]:
    """The kernel's reset, ms per GiB: one PAGEMAP_SCAN get-and-reset loop over a range
    whose every page was written (``written``), then again with nothing written
    (``clean``)."""
    out: dict[str, Any] = {}
    for size in sizes:
        with Mapping(size) as m, RawAsync(m) as raw:
            full = Pattern("sequential", m.npages)
            written, clean = [], []
            for _ in range(reps):
                m.write(full)
                ns, _ = raw.scan(reset=True)
                written.append(ns / 1e6 * GiB / size)
                ns, _ = raw.scan(reset=True)
                clean.append(ns / 1e6 * GiB / size)
            out[size_key(size)] = {"written": stat(written, "ms/GiB"),
                                   "clean": stat(clean, "ms/GiB")}
    return {"sizes": out}


def floor_collect(nbytes: int, fractions: Sequence[float], reps: int,
                  rng: np.random.Generator) -> dict[str, Any]:
    """The kernel's collect, ms: the minimal PAGEMAP_SCAN call (``scan_floor``) over
    ``nbytes`` after writing each fraction of its pages, without reset (plain get) and with
    it (get-and-reset)."""
    out: dict[str, Any] = {}
    with Mapping(nbytes) as m, RawAsync(m) as raw:
        for f in fractions:
            k = _npages_for(f, m.npages)
            p = Pattern("random-subset", m.npages,
                        order=np.sort(rng.choice(m.npages, k, replace=False)).astype(np.int64))
            noreset, reset, found = [], [], []
            for _ in range(reps):
                raw.scan(reset=True)
                m.write(p)
                ns, pages = raw.scan(reset=False)
                noreset.append(ns / 1e6)
                ns, pages = raw.scan(reset=True)
                reset.append(ns / 1e6)
                found.append(pages)
            out[fraction_key(f)] = {"pages": k, "reported": found,
                                    "noreset": stat(noreset, "ms"), "reset": stat(reset, "ms")}
    return {"bytes": nbytes, "fractions": out}


# ---- backends, through the public Tracker API ---------------------------------------------

def backend_write(name: str, nbytes: int, reps: int, rng: np.random.Generator) -> dict[str, Any]:
    """Tracked first write, ns per page, for each pattern: reset, then the pattern written
    once in C over the tracked range (each write pays the backend's fault), then a collect
    that checks every write was seen."""
    out: dict[str, Any] = {"bytes": nbytes}
    patterns: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    with Mapping(nbytes) as m, Tracker(m.region, backend=name) as t:
        for pname in PATTERNS:
            p = make_pattern(pname, m.npages, rng)
            samples, reported = [], []
            for _ in range(reps):
                t.reset()
                samples.append(m.write(p) / p.nwrites)
                reported.append(len(t.collect()))
            patterns[pname] = stat(samples, "ns/page")
            checks[pname] = {"written": len(p.pages()), "reported": reported}
    out["patterns"] = patterns
    out["checks"] = checks
    return out


def backend_reset(name: str, sizes: Sequence[int], reps: int) -> dict[str, Any]:
    """``Tracker.reset()``, ms per GiB, for each region size: after every page was written
    (``written``) and again right after (``clean``)."""
    out: dict[str, Any] = {}
    for size in sizes:
        with Mapping(size) as m, Tracker(m.region, backend=name) as t:
            full = Pattern("sequential", m.npages)
            written, clean = [], []
            for _ in range(reps):
                m.write(full)
                t0 = time.perf_counter_ns()
                t.reset()
                written.append((time.perf_counter_ns() - t0) / 1e6 * GiB / size)
                t0 = time.perf_counter_ns()
                t.reset()
                clean.append((time.perf_counter_ns() - t0) / 1e6 * GiB / size)
            out[size_key(size)] = {"written": stat(written, "ms/GiB"),
                                   "clean": stat(clean, "ms/GiB")}
    return {"sizes": out}


def backend_collect(name: str, nbytes: int, fractions: Sequence[float], reps: int,
                    rng: np.random.Generator) -> dict[str, Any]:
    """``Tracker.collect()``, ms, after writing each fraction of a region of ``nbytes``
    (random pages): ``collect(reset=False)`` then ``collect(reset=True)`` on the same
    state; ``reported`` holds what each returned, for checking."""
    out: dict[str, Any] = {}
    with Mapping(nbytes) as m, Tracker(m.region, backend=name) as t:
        for f in fractions:
            k = _npages_for(f, m.npages)
            p = Pattern("random-subset", m.npages,
                        order=np.sort(rng.choice(m.npages, k, replace=False)).astype(np.int64))
            noreset, reset, found = [], [], []
            for _ in range(reps):
                t.reset()
                m.write(p)
                t0 = time.perf_counter_ns()
                a = t.collect(reset=False)
                noreset.append((time.perf_counter_ns() - t0) / 1e6)
                t0 = time.perf_counter_ns()
                b = t.collect(reset=True)
                reset.append((time.perf_counter_ns() - t0) / 1e6)
                found.append([len(a), len(b)])
            out[fraction_key(f)] = {"pages": k, "reported": found,
                                    "noreset": stat(noreset, "ms"), "reset": stat(reset, "ms")}
    return {"bytes": nbytes, "fractions": out}


def _compare(written: np.ndarray, reported: np.ndarray) -> dict[str, int]:
    w = np.unique(written)
    r = np.unique(reported)
    return {"written": int(len(w)), "reported": int(len(r)),
            "false_positives": int(len(np.setdiff1d(r, w, assume_unique=True))),
            "false_negatives": int(len(np.setdiff1d(w, r, assume_unique=True)))}


def _precision_cases(t: Tracker, m: Mapping, rng: np.random.Generator,
                     cases: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    first = (m.addr - t.base) // PAGE_SIZE
    for case in cases:
        p = make_pattern("random-subset" if case == "random" else case, m.npages, rng)
        t.reset()
        m.write(p)
        got = t.collect().pages() - first
        out[case] = _compare(p.pages(), got)
    return out


def _huge_pages_in(m: Mapping) -> int:
    """Pages of ``m`` mapped by PMD huge pages now (PAGEMAP_SCAN ``PAGE_IS_HUGE``)."""
    from ..kernel.pagemap import pagemap_scan

    huge = int(PageCategory.HUGE)
    r = pagemap_scan("self", m.addr, m.addr + m.nbytes, category_mask=huge, return_mask=huge)
    return int(((r[:, 1] - r[:, 0]) // PAGE_SIZE).sum()) if len(r) else 0


def backend_precision(name: str, npages: int, rng: np.random.Generator,
                      thp: str = "never") -> dict[str, Any]:
    """Pages reported against pages written, for each write set of
    :data:`PRECISION_CASES` (``random`` here is a random 1/16 of the pages), then:

    * ``thp-keep`` / ``thp-split``: a region backed by transparent huge pages, tracked
      with ``huge_pages="keep"`` / ``"split"`` (when THP is not ``never``), with the pages
      in huge pages before tracking, once tracked, and after the writes;
    * ``neighbour-mapped``: nothing written, but a new mapping made right after the
      tracked one, which the kernel may merge into its VMA (soft-dirty's documented false
      positives; other backends should be unaffected).
    """
    out: dict[str, Any] = {}
    with Mapping(npages * PAGE_SIZE) as m, Tracker(m.region, backend=name) as t:
        out.update(_precision_cases(t, m, rng, PRECISION_CASES))
    if thp != "never":
        for mode in ("keep", "split"):
            out[f"thp-{mode}"] = _guarded(functools.partial(_thp_case, name, npages, rng, mode))
    out["neighbour-mapped"] = _guarded(functools.partial(_neighbour_case, name, npages))
    return out


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One extra case: its failure is recorded in it, the other cases stand."""
    try:
        return fn()
    except (OSError, ValueError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _thp_case(name: str, npages: int, rng: np.random.Generator, mode: str) -> dict[str, Any]:
    hp = hugepage_size() // PAGE_SIZE
    n = max(npages, 2 * hp) // hp * hp
    with Mapping(n * PAGE_SIZE, huge=True) as m:
        huge_before = _huge_pages_in(m)
        with Tracker(m.region, backend=name, huge_pages=mode) as t:
            huge_tracked = _huge_pages_in(m)
            case: dict[str, Any] = _precision_cases(t, m, rng, ("strided",))["strided"]
            case["huge_pages_before"] = huge_before
            case["huge_pages_tracked"] = huge_tracked
            case["huge_pages_after"] = _huge_pages_in(m)
    return case


def _neighbour_case(name: str, npages: int) -> dict[str, Any]:
    from ..kernel.maps import maps

    size = npages * PAGE_SIZE
    # The second half stays reserved (PROT_NONE: a separate VMA, and no allocation of the
    # tracker can land there) until a new mapping replaces it; ``m`` unmaps both on exit.
    with Mapping(2 * size) as m:
        _native.mprotect(m.addr + size, size, _PROT_NONE)
        with Tracker(Region(m.addr, size), backend=name) as t:
            t.reset()
            _native.bench_mmap(size, 0, m.addr + size, True)
            _native.madvise(m.addr + size, size, MADV_NOHUGEPAGE)
            merged = any(v.start <= m.addr and v.end >= m.addr + 2 * size for v in maps("self"))
            case: dict[str, Any] = _compare(np.empty(0, np.int64), t.collect().pages())
            case["merged"] = merged
    return case


def _interleaved(a: Callable[[], None], b: Callable[[], None], pairs: int) -> None:
    """Run ``a`` and ``b`` once each to warm them, then ``pairs`` times each, alternating
    which goes first, so a drift in the machine hits both alike."""
    a()
    b()
    for i in range(pairs):
        for f in ((a, b) if i % 2 == 0 else (b, a)):
            f()


def _versus(out: dict[str, Any], mine: str, floor: str, py: list[float], raw: list[float],
            py_cpu: list[float], raw_cpu: list[float], unit: str) -> None:
    """Medians of both sides, the ratio of the medians and the ratio per pair, in wall-clock
    time and in thread CPU time (the same work without what other processes took)."""
    out[mine] = stat(py, unit)
    out[floor] = stat(raw, unit)
    out["pair_ratio"] = stat([a / b for a, b in zip(py, raw, strict=True)], "x")
    out["ratio"] = out[mine]["median"] / out[floor]["median"]
    out[f"{mine}_cpu"] = stat(py_cpu, unit)
    out[f"{floor}_cpu"] = stat(raw_cpu, unit)
    out["pair_ratio_cpu"] = stat([a / b for a, b in zip(py_cpu, raw_cpu, strict=True) if b > 0],
                                 "x")
    out["ratio_cpu"] = out[f"{mine}_cpu"]["median"] / out[f"{floor}_cpu"]["median"]


def collect_vs_floor(nbytes: int, pages: int, pairs: int, target: float) -> dict[str, Any]:
    """``Tracker.collect()`` over the minimal C collect (``_native.scan_floor``: one
    PAGEMAP_SCAN ioctl into a vector already large enough), interleaved on the same
    ``uffd-async`` region in the same state: ``pages`` pages written (every
    ``npages // pages``-th page) before each.  Times in ms.

    The floor is timed two ways: ``raw_c`` inside C, around the ioctl loop alone (what a C
    program doing nothing else pays: the ratio the target is about), and under
    ``vs_call`` around its call from Python, as the tracker is timed (the same clock reads,
    and what follows a reset's TLB flush, on both sides)."""
    out: dict[str, Any] = {"bytes": nbytes, "pages": pages, "target": target}
    with Mapping(nbytes) as m, Tracker(m.region, backend="uffd-async") as t:
        pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            p = Pattern("strided", m.npages, max(1, m.npages // pages))
            py: list[float] = []
            raw: list[float] = []
            py_cpu: list[float] = []
            raw_cpu: list[float] = []
            call: list[float] = []
            call_cpu: list[float] = []
            collect = t.collect

            def tracker() -> None:
                m.write(p)
                c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                d = collect()
                t1 = time.perf_counter_ns()
                py.append((t1 - t0) / 1e6)
                py_cpu.append((time.thread_time_ns() - c0) / 1e6)
                if len(d) != p.nwrites:
                    raise AssertionError(f"Tracker.collect() saw {len(d)} of {p.nwrites} pages")

            def native() -> None:
                m.write(p)
                c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                ns, found, _, cpu = _native.scan_floor(pm, t.region.start, t.region.end,
                                                       _WP_MATCHING, _WRITTEN)
                t1 = time.perf_counter_ns()
                call.append((t1 - t0) / 1e6)
                call_cpu.append((time.thread_time_ns() - c0) / 1e6)
                raw.append(ns / 1e6)
                raw_cpu.append(cpu / 1e6)
                if found != p.nwrites:
                    raise AssertionError(f"the raw call saw {found} of {p.nwrites} pages")

            _interleaved(tracker, native, pairs)
            for xs in (py, raw, py_cpu, raw_cpu, call, call_cpu):
                del xs[0]  # the warm-up
        finally:
            os.close(pm)
    _versus(out, "tracker_collect", "raw_c", py, raw, py_cpu, raw_cpu, "ms")
    out["vs_call"] = {"target": target}
    _versus(out["vs_call"], "tracker_collect", "raw_c_call", py, call, py_cpu, call_cpu, "ms")
    return out


#: the small-range cases of :func:`python_overhead`: (label, bytes, pages written)
SMALL_CASES = (("4 KiB, 1 page written", 4096, 1), ("2 MiB, 1 page written", 2 * MiB, 1))


def python_overhead(nbytes: int, pages: int, pairs: int,
                    small_pairs: int | None = None) -> dict[str, Any]:
    """``Tracker.collect()`` against the minimal C collect (:func:`collect_vs_floor`):
    ``pages`` written pages in ``nbytes`` (target 1.1x) at the top level, and the small
    ranges of :data:`SMALL_CASES` (target 3x) under ``small``, measured with ``small_pairs``
    pairs (their calls take microseconds: more samples for a steady median)."""
    out = collect_vs_floor(nbytes, pages, pairs, 1.1)
    small_pairs = small_pairs if small_pairs is not None else 10 * pairs
    out["small"] = {label: collect_vs_floor(size, n, small_pairs, 3.0)
                    for label, size, n in SMALL_CASES if size >= PAGE_SIZE}
    return out


def overlapping_trackers(nbytes: int, trackers: int, pages: int, pairs: int) -> dict[str, Any]:
    """One ``Tracker.collect()`` by one of ``trackers`` trackers of the same ``nbytes``,
    against the collect of a lone tracker of another ``nbytes`` mapping, interleaved; before
    each, ``pages`` pages (every ``npages // pages``-th) of the collected mapping are
    written.  The other trackers never collect: what they must still report piles up for
    them, as it does for an idle tracker.  Times in ms; target: 3x the lone tracker."""
    out: dict[str, Any] = {"bytes": nbytes, "trackers": trackers, "pages": pages, "target": 3.0}
    with contextlib.ExitStack() as stack:
        lone_m = stack.enter_context(Mapping(nbytes))
        many_m = stack.enter_context(Mapping(nbytes))
        lone = stack.enter_context(Tracker(lone_m.region, backend="uffd-async"))
        many = [stack.enter_context(Tracker(many_m.region, backend="uffd-async"))
                for _ in range(trackers)]
        p = Pattern("strided", lone_m.npages, max(1, lone_m.npages // pages))
        many_t: list[float] = []
        lone_t: list[float] = []
        many_c: list[float] = []
        lone_c: list[float] = []

        def timed(m: Mapping, t: Tracker, wall: list[float], cpu: list[float]) -> None:
            m.write(p)
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            d = t.collect()
            wall.append((time.perf_counter_ns() - t0) / 1e6)
            cpu.append((time.thread_time_ns() - c0) / 1e6)
            if len(d) != p.nwrites:
                raise AssertionError(f"a collect saw {len(d)} of {p.nwrites} pages")

        _interleaved(functools.partial(timed, many_m, many[0], many_t, many_c),
                     functools.partial(timed, lone_m, lone, lone_t, lone_c), pairs)
        for xs in (many_t, lone_t, many_c, lone_c):
            del xs[0]
        # Each idle tracker must still report every page written since it started.
        for t in many[1:]:
            got = len(t.collect())
            if got != p.nwrites:
                raise AssertionError(f"an idle overlapping tracker saw {got} of {p.nwrites}")
    _versus(out, "overlapping_collect", "lone_collect", many_t, lone_t, many_c, lone_c, "ms")
    return out


def tracker_setup(nbytes: int, reps: int) -> dict[str, Any]:
    """Creating and closing a ``uffd-async`` :class:`Tracker` of a fresh ``nbytes`` mapping
    (never touched), against the kernel's part done with the thin native calls on the same
    kind of mapping (``UFFDIO_REGISTER`` + ``UFFDIO_WRITEPROTECT``, then
    ``UFFDIO_UNREGISTER``), interleaved.  Times in ms, also given per 16 GiB."""
    out: dict[str, Any] = {"bytes": nbytes, "reps": reps}
    mine: list[float] = []
    raw: list[float] = []

    def tracker() -> None:
        with Mapping(nbytes, populate=False) as m:
            t0 = time.perf_counter_ns()
            Tracker(m.region, backend="uffd-async").close()
            mine.append((time.perf_counter_ns() - t0) / 1e6)

    def native() -> None:
        with Mapping(nbytes, populate=False) as m:
            fd, _ = open_userfaultfd()
            try:
                want = int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
                _native.uffdio_api(fd, want)
                t0 = time.perf_counter_ns()
                _native.uffdio_register(fd, m.addr, m.nbytes, int(RegisterMode.WP))
                _native.uffdio_writeprotect(fd, m.addr, m.nbytes, int(WriteProtectMode.WP))
                _native.uffdio_unregister(fd, m.addr, m.nbytes)
                raw.append((time.perf_counter_ns() - t0) / 1e6)
            finally:
                os.close(fd)

    _interleaved(tracker, native, reps)
    del mine[0], raw[0]
    out["tracker"] = stat(mine, "ms")
    out["raw_c"] = stat(raw, "ms")
    out["ratio"] = out["tracker"]["median"] / out["raw_c"]["median"]
    scale = (16 * GiB) / nbytes
    out["tracker_per_16GiB"] = stat([x * scale for x in mine], "ms")
    out["raw_c_per_16GiB"] = stat([x * scale for x in raw], "ms")
    return out


# ---- what a Python user has without pagewatch ------------------------------------------------

class _PageHashes:
    """Hash every page; a collect hashes them all again and compares."""

    def __init__(self, a: np.ndarray) -> None:
        self.view: memoryview = a.data
        self.npages = len(a) // PAGE_SIZE
        try:
            import xxhash

            fn = xxhash.xxh3_64_intdigest
            self.name = "hash (xxh3_64)"
            self._hash: Callable[[memoryview], int] = fn
        except ImportError:
            self.name = "hash (blake2b-8)"
            self._hash = lambda b: int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(),
                                                  "little")
        self.old = self._all()

    def _all(self) -> np.ndarray:
        v, h = self.view, self._hash
        return np.fromiter((h(v[o:o + PAGE_SIZE]) for o in range(0, len(v), PAGE_SIZE)),
                           dtype=np.uint64, count=self.npages)

    def reset(self) -> None:
        self.old = self._all()

    def collect(self, reset: bool = True) -> np.ndarray:
        new = self._all()
        dirty = np.flatnonzero(new != self.old)
        if reset:
            self.old = new
        return dirty


class _CopyCompare:
    """Keep a copy; a collect compares page by page with numpy (in chunks, to keep its
    temporaries small) and refreshes the copy of the changed pages."""

    name = "copy+compare (numpy)"
    chunk = 8192  # pages

    def __init__(self, a: np.ndarray) -> None:
        self.cur = a.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
        self.old = self.cur.copy()

    def reset(self) -> None:
        np.copyto(self.old, self.cur)

    def collect(self, reset: bool = True) -> np.ndarray:
        parts = []
        for lo in range(0, len(self.cur), self.chunk):
            hi = lo + self.chunk
            idx = np.flatnonzero((self.cur[lo:hi] != self.old[lo:hi]).any(axis=1)) + lo
            if reset and len(idx):
                self.old[idx] = self.cur[idx]
            parts.append(idx)
        return np.concatenate(parts)

    def close(self) -> None:
        del self.old


#: the alternatives: key -> class over a uint8 array
ALTERNATIVES: dict[str, type[Any]] = {"hash": _PageHashes, "copy-compare": _CopyCompare}


def alternative_collect(key: str, nbytes: int, fractions: Sequence[float], reps: int,
                        rng: np.random.Generator) -> dict[str, Any]:
    """What a Python user can do without pagewatch (``hash`` every page, or keep a copy
    and ``copy-compare``), measured as the backends are: ``reset`` ms per GiB, and
    ``collect`` ms after writing each fraction, with and without reset."""
    out: dict[str, Any] = {"bytes": nbytes}
    with Mapping(nbytes) as m:
        a = m.array()
        alt = ALTERNATIVES[key](a)
        out["name"] = alt.name
        try:
            alt.collect(reset=True)  # warm: the first pass pays for cold caches
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                alt.reset()
                samples.append((time.perf_counter_ns() - t0) / 1e6 * GiB / nbytes)
            out["reset"] = stat(samples, "ms/GiB")
            fr: dict[str, Any] = {}
            for f in fractions:
                k = _npages_for(f, m.npages)
                p = Pattern("random-subset", m.npages, order=np.sort(
                    rng.choice(m.npages, k, replace=False)).astype(np.int64))
                noreset, reset, found = [], [], []
                for _ in range(reps):
                    m.write(p)
                    t0 = time.perf_counter_ns()
                    x = alt.collect(reset=False)
                    noreset.append((time.perf_counter_ns() - t0) / 1e6)
                    t0 = time.perf_counter_ns()
                    y = alt.collect(reset=True)
                    reset.append((time.perf_counter_ns() - t0) / 1e6)
                    found.append([len(x), len(y)])
                fr[fraction_key(f)] = {"pages": k, "reported": found,
                                       "noreset": stat(noreset, "ms"), "reset": stat(reset, "ms")}
            out["fractions"] = fr
        finally:
            del a
            with contextlib.suppress(AttributeError):
                alt.close()
            del alt
    return out

