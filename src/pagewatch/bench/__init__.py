"""``pagewatch bench``: every way of tracking writes, measured side by side against the floor.

>>> from pagewatch import bench
>>> result = bench.run(bench.Config.quick())          # doctest: +SKIP
>>> print(bench.report.render_text(result))           # doctest: +SKIP

:func:`run` returns one JSON-ready dict (what ``--json`` writes):

``machine``, ``probe``, ``config``
    Where and how it ran (``probe`` is :func:`pagewatch.probe` ``.as_dict()``).
``floor``
    The C reference, no pagewatch: ``write[<bytes>]`` holds ``plain`` (untracked writes)
    and, per mechanism set up in C, ``uffd-async`` (the kernel's own fault), ``mprotect``,
    ``uffd-sync``, ``soft-dirty`` first-write costs for each pattern;
    ``fresh_touch`` (page allocation); ``reset`` and ``collect`` (the minimal PAGEMAP_SCAN call, ``scan_floor``).
``backends[<name>]``
    ``available``, ``reason``, then ``write`` (ns/page per pattern), ``reset`` (ms/GiB per
    size), ``collect`` (ms per written fraction, ``reset`` and ``noreset``), ``precision``
    (written / reported / false positives / false negatives per case).
``python_overhead``
    ``Tracker.collect()`` against the minimal C collect (one PAGEMAP_SCAN ioctl into a
    vector large enough, ``_native.scan_floor``), interleaved: ``ratio`` at 16,384 written
    pages in 1 GiB (target 1.1), and under ``small`` the same at 4 KiB and 2 MiB with one
    page written (target 3).
``overlap``
    One collect by one of 100 trackers of the same 256 MiB against a lone tracker's,
    interleaved: ``ratio`` (target 3).
``setup``
    Creating and closing a tracker of a fresh 16 GiB mapping against the kernel's
    register + write-protect + unregister of the same size: ``tracker_per_16GiB``, ``ratio``.
``alternatives[<key>]``
    Hashing every page and copy-and-compare, measured like the backends.
``ratios``
    Derived: each backend's write cost against a plain write, the kernel's fault and the
    ``uffd-async`` backend.

Every figure is ``{"median", "min", "max", "n", "unit", "samples"}`` (:func:`stat`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import measures, report
from .measures import FRACTIONS, PATTERNS, GiB, MiB, fraction_key, size_key, stat

__all__ = ["Config", "run", "plan", "stat", "derive", "machine", "measures", "report", "PATTERNS",
           "FRACTIONS", "fraction_key", "size_key", "MiB", "GiB"]

#: ``progress(done, total, label)``: called before each step and once at the end
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class Config:
    """What to measure, and how big and how often.

    ``caps`` bounds the region of the slow backends (name -> bytes): their first writes
    cost 5-50 times more, and 1 GiB of them would take seconds per run.
    """

    mode: str
    write_bytes: int
    reset_sizes: tuple[int, ...]
    collect_bytes: int
    alternative_bytes: int
    fractions: tuple[float, ...] = FRACTIONS
    overhead_bytes: int = GiB
    overhead_pages: int = 16384
    overhead_pairs: int = 41
    small_pairs: int = 401
    overlap_bytes: int = 256 * MiB
    overlap_trackers: int = 100
    overlap_pages: int = 4096
    overlap_pairs: int = 11
    setup_bytes: int = 16 * GiB
    setup_reps: int = 3
    precision_pages: int = 4096
    fresh_bytes: int = 64 * MiB
    reps: int = 5
    slow_reps: int = 3
    alternative_reps: int = 3
    caps: dict[str, int] = dataclasses.field(default_factory=dict)
    backends: tuple[str, ...] | None = None
    seed: int = 1

    @classmethod
    def quick(cls, **kw: Any) -> Config:
        """Under a minute on a 2-core machine: 1 GiB for the fast backends."""
        base: dict[str, Any] = dict(
            mode="quick", write_bytes=GiB,
            reset_sizes=(64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB, GiB),
            collect_bytes=GiB, alternative_bytes=256 * MiB,
            caps={"uffd-sync": 16 * MiB, "mprotect": 64 * MiB, "compare": 256 * MiB})
        base.update(kw)
        return cls(**base)

    @classmethod
    def full(cls, **kw: Any) -> Config:
        """Reset up to 4 GiB, more repeats, bigger regions for the slow backends."""
        base: dict[str, Any] = dict(
            mode="full", write_bytes=GiB,
            reset_sizes=(64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB, GiB, 2 * GiB, 4 * GiB),
            collect_bytes=GiB, alternative_bytes=GiB, reps=11, slow_reps=5,
            alternative_reps=5, overhead_pairs=101, small_pairs=1001, overlap_pairs=41,
            setup_reps=7,
            caps={"uffd-sync": 256 * MiB, "mprotect": 128 * MiB})
        base.update(kw)
        return cls(**base)

    @classmethod
    def smoke(cls, **kw: Any) -> Config:
        """Seconds, on tiny regions: checks the harness, not the machine."""
        base: dict[str, Any] = dict(
            mode="smoke", write_bytes=MiB, reset_sizes=(256 * 1024, MiB), collect_bytes=MiB,
            alternative_bytes=MiB, overhead_bytes=4 * MiB, overhead_pages=64,
            overhead_pairs=3, small_pairs=5, overlap_bytes=MiB, overlap_trackers=5,
            overlap_pages=16, overlap_pairs=3, setup_bytes=64 * MiB, setup_reps=2,
            precision_pages=64, fresh_bytes=MiB, reps=2, slow_reps=2, alternative_reps=2)
        base.update(kw)
        return cls(**base)

    def size_for(self, backend: str, want: int) -> int:
        """``want`` bytes, or less for a backend with a cap."""
        return min(want, self.caps.get(backend, want))

    def reset_sizes_for(self, backend: str) -> tuple[int, ...]:
        cap = self.caps.get(backend)
        if cap is None:
            return self.reset_sizes
        return tuple(s for s in self.reset_sizes if s <= cap) or (cap,)

    def reps_for(self, backend: str) -> int:
        return self.slow_reps if backend in self.caps else self.reps

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reset_sizes"] = list(self.reset_sizes)
        d["fractions"] = list(self.fractions)
        d["backends"] = list(self.backends) if self.backends is not None else None
        return d


def machine() -> dict[str, Any]:
    """Facts about this machine that a reader of the figures needs."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    virt = ""
    try:
        with open("/proc/cpuinfo") as f:
            virt = "hypervisor" if " hypervisor" in f.read() else "bare metal"
    except OSError:
        pass
    try:
        import xxhash

        xx = str(xxhash.VERSION)
    except ImportError:
        xx = None
    from .. import __version__

    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None

    return {
        "kernel": platform.release(), "arch": platform.machine(), "cpu": model,
        "cpus": os.cpu_count(), "memory_bytes": mem, "virtualisation": virt,
        "python": sys.version.split()[0], "numpy": np.__version__, "xxhash": xx,
        "pagewatch": __version__, "page_size": measures.PAGE_SIZE,
        "hugepage_size": measures.hugepage_size(),
        # Other work on the machine moves the figures (uffd-sync most: its handler thread
        # must be scheduled for every first write).
        "load_average": load,
    }


# ---- the plan ----------------------------------------------------------------------------

Step = tuple[str, Callable[[dict[str, Any]], None]]


def _guard(result: dict[str, Any], label: str, where: dict[str, Any], key: str,
           fn: Callable[[], Any]) -> None:
    """``where[key] = fn()``; a failure is recorded there and in ``result["errors"]``
    instead of ending the run (a backend may be half-built while others are measured)."""
    try:
        where[key] = fn()
    except (OSError, ValueError, RuntimeError, AssertionError, ImportError, MemoryError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
        where[key] = {"error": msg}
        result["errors"][label] = msg


def plan(cfg: Config, result: dict[str, Any]) -> list[Step]:
    """The steps of one run, in order; each fills its part of ``result``."""
    from ..backends.base import BACKENDS, backends

    infos = {b.name: b for b in backends()}
    names = list(cfg.backends) if cfg.backends is not None else list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {', '.join(unknown)}: choose from "
                         f"{', '.join(BACKENDS)}")
    caps = result["probe"]
    async_ok = bool(caps["uffd_wp_async"]["available"])
    sync_ok = bool(caps["uffd_features"].get("PAGEFAULT_FLAG_WP", {}).get("available"))
    soft_ok = bool(caps["soft_dirty"]["available"])
    thp = str(caps.get("thp", "never"))
    rng = np.random.default_rng(cfg.seed)
    floor: dict[str, Any] = result["floor"]
    floor.setdefault("write", {})
    steps: list[Step] = []

    # The floor, at every region size a backend is measured on.
    raw_at: dict[int, list[str]] = {}
    main = cfg.write_bytes
    raw_at.setdefault(main, [])
    for mech, ok in (("uffd-async", async_ok), ("soft-dirty", soft_ok),
                     ("mprotect", True), ("uffd-sync", sync_ok)):
        if ok:
            raw_at.setdefault(cfg.size_for(mech, main), []).append(mech)
    for name in names:
        raw_at.setdefault(cfg.size_for(name, main), [])

    def step(label: str, where: dict[str, Any], key: str, fn: Callable[[], Any]) -> Step:
        return label, lambda r: _guard(r, label, where, key, fn)

    for size in sorted(raw_at, reverse=True):
        mechs = raw_at[size]
        if async_ok and "uffd-async" not in mechs:
            mechs.insert(0, "uffd-async")  # the kernel's fault at every size
        reps = cfg.slow_reps if any(m in cfg.caps for m in mechs) else cfg.reps
        steps.append(step(f"floor: writes on {_size(size)} ({', '.join(['plain', *mechs])})",
                          floor["write"], size_key(size),
                          functools.partial(measures.floor_writes, size, reps, rng, mechs)))
    steps.append(step("floor: first touch", floor, "fresh_touch", functools.partial(
        measures.floor_fresh_touch, cfg.fresh_bytes, cfg.slow_reps)))
    if async_ok:
        # Every size a backend's reset is measured at gets its kernel reference.
        reset_sizes = sorted({s for n in names for s in cfg.reset_sizes_for(n)}
                             | set(cfg.reset_sizes))
        steps.append(step("floor: reset (minimal PAGEMAP_SCAN call)", floor, "reset", functools.partial(
            measures.floor_reset, reset_sizes, cfg.reps)))
        steps.append(step("floor: collect (minimal PAGEMAP_SCAN call)", floor, "collect",
                          functools.partial(measures.floor_collect, cfg.collect_bytes,
                                            cfg.fractions, cfg.reps, rng)))
    else:
        result["notes"].append(f"no kernel floor for reset/collect: async uffd-wp is not "
                               f"available ({caps['uffd_wp_async']['reason']})")

    for name in names:
        info = infos.get(name)
        entry: dict[str, Any] = {"available": bool(info and info.available),
                                 "reason": info.reason if info else "not registered",
                                 "summary": info.summary if info else ""}
        result["backends"][name] = entry
        if not entry["available"]:
            continue
        wsize = cfg.size_for(name, cfg.write_bytes)
        csize = cfg.size_for(name, cfg.collect_bytes)
        entry["sizes"] = {"write": wsize, "collect": csize,
                          "reset": list(cfg.reset_sizes_for(name))}
        if name in cfg.caps and cfg.caps[name] < cfg.write_bytes:
            result["notes"].append(
                f"{name} is measured on {_size(cfg.caps[name])} regions, not "
                f"{_size(cfg.write_bytes)}: {_WHY_SLOW.get(name, 'it is slow')} "
                f"({cfg.mode} mode)")
        reps = cfg.reps_for(name)
        steps += [
            step(f"{name}: write", entry, "write",
                 functools.partial(measures.backend_write, name, wsize, reps, rng)),
            step(f"{name}: reset", entry, "reset", functools.partial(
                measures.backend_reset, name, cfg.reset_sizes_for(name), reps)),
            step(f"{name}: collect", entry, "collect", functools.partial(
                measures.backend_collect, name, csize, cfg.fractions, reps, rng)),
            step(f"{name}: precision", entry, "precision", functools.partial(
                measures.backend_precision, name, cfg.precision_pages, rng, thp)),
        ]

    if "uffd-async" in names and infos.get("uffd-async") and infos["uffd-async"].available:
        steps.append(step("python overhead (Tracker.collect / minimal C collect)", result,
                          "python_overhead", functools.partial(
                              measures.python_overhead, cfg.overhead_bytes,
                              cfg.overhead_pages, cfg.overhead_pairs, cfg.small_pairs)))
        steps.append(step(f"{cfg.overlap_trackers} overlapping trackers / a lone one", result,
                          "overlap", functools.partial(
                              measures.overlapping_trackers, cfg.overlap_bytes,
                              cfg.overlap_trackers, cfg.overlap_pages, cfg.overlap_pairs)))
        steps.append(step(f"tracker setup + close of {_size(cfg.setup_bytes)}", result,
                          "setup", functools.partial(
                              measures.tracker_setup, cfg.setup_bytes, cfg.setup_reps)))
    for key in measures.ALTERNATIVES:
        steps.append(step(f"alternative: {key}", result["alternatives"], key, functools.partial(
            measures.alternative_collect, key, cfg.alternative_bytes, cfg.fractions,
            cfg.alternative_reps, rng)))
    from . import checkpoint as checkpoint_bench  # incremental saves vs np.save, np.load

    steps.append(step("checkpoint: save and load against np.save and np.load", result,
                      "checkpoint", functools.partial(checkpoint_bench.measure, cfg.mode)))
    from . import checkpoint_icechunk as icechunk_bench  # to a local S3 server, vs a full write

    why = icechunk_bench.available()
    if cfg.mode == "smoke":  # a server of its own and full writes: seconds the smoke run lacks
        why = "in smoke mode (quick and full measure it)"
    if why:
        result["notes"].append(f"not measured: checkpoint to Icechunk: {why}")
    else:
        steps.append(step("checkpoint: Icechunk on a local S3 server, 1 % written against a "
                          "full write", result, "checkpoint_icechunk",
                          functools.partial(icechunk_bench.measure, cfg.mode)))
    if cfg.alternative_bytes != cfg.collect_bytes:
        result["notes"].append(f"the alternatives are measured on {_size(cfg.alternative_bytes)}"
                               f" ({cfg.mode} mode); they read every byte, so their cost "
                               "grows with the region")
    return steps


#: why a backend is measured on smaller regions than the others
_WHY_SLOW = {
    "uffd-sync": "each first write sleeps until a handler thread un-protects the page",
    "mprotect": "each first write takes a signal and an mprotect call",
    "compare": "its reset copies and its collect reads every byte",
}


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


# ---- derived figures ----------------------------------------------------------------------

def _median(d: Any) -> float | None:
    if isinstance(d, dict) and isinstance(d.get("median"), (int, float)):
        return float(d["median"])
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def derive(result: dict[str, Any]) -> dict[str, Any]:
    """The ratios the report prints, from the medians of ``result``: for each backend and
    pattern, its tracked-write cost as a multiple of a plain write and of the kernel's own
    fault (both on a region of the same size), and of the ``uffd-async`` backend."""
    floor_w = result.get("floor", {}).get("write", {})
    ua = result.get("backends", {}).get("uffd-async", {}).get("write", {}).get("patterns", {})
    out: dict[str, Any] = {}
    for name, entry in result.get("backends", {}).items():
        w = entry.get("write") if isinstance(entry, dict) else None
        if not isinstance(w, dict) or "patterns" not in w:
            continue
        fl = floor_w.get(size_key(w["bytes"]), {})
        per: dict[str, Any] = {}
        for p, s in w["patterns"].items():
            m = _median(s)
            per[p] = {
                "x_plain": _ratio(m, _median(fl.get("plain", {}).get(p))),
                "x_kernel_fault": _ratio(m, _median(
                    fl.get("uffd-async", {}).get("write", {}).get(p))),
                "x_uffd_async": _ratio(m, _median(ua.get(p))),
            }
        out[name] = per
    return out


# ---- the run ---------------------------------------------------------------------------------

def run(cfg: Config | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for; returns the JSON-ready result (module doc)."""
    from ..kernel.probe import probe

    cfg = cfg or Config.quick()
    started = time.time()
    result: dict[str, Any] = {
        "pagewatch_bench": 1,
        "mode": cfg.mode,
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "machine": machine(),
        "probe": probe().as_dict(),
        "config": cfg.as_dict(),
        "floor": {},
        "backends": {},
        "python_overhead": None,
        "overlap": None,
        "setup": None,
        "alternatives": {},
        "notes": [],
        "errors": {},
    }
    steps = plan(cfg, result)
    for i, (label, fn) in enumerate(steps):
        if progress:
            progress(i, len(steps), label)
        fn(result)
    if progress:
        progress(len(steps), len(steps), "done")
    result["ratios"] = derive(result)
    try:
        result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result["duration_s"] = time.time() - started
    return result

