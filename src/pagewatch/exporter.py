"""Exporter: how fast each process of a fleet writes its memory, for Prometheus.

An :class:`Exporter` keeps one :class:`~pagewatch.process.ProcessTracker` per process that a
:class:`Selector` matches (pids, a name, a user, a cgroup, the descendants of a process).  A
thread of its own rescans the matching processes and collects every target once per
interval; between two rounds nothing of it runs.  It is a Prometheus *collector*: a scrape
reads the figures of the last finished round and never waits on a collect (the round in
progress, however slow, is published whole when it ends).

Targets come and go on their own: a process that starts matching is attached at the next
round, one that exited (or executed a new program) is dropped and its series disappear from
the next scrape (Prometheus then marks them stale); a process that cannot be attached
(permission, seccomp, already traced, ...) is counted in
``pagewatch_attach_failures_total{reason}`` and tried again with a back-off that doubles from
one interval up to five minutes.  Nothing a target does makes the exporter stop.  The
exporter never attaches to its own process.

Metrics (see :data:`METRICS`): ``pagewatch_written_bytes_total{pid,comm,kind}`` (bytes of the
pages written: a page written several times within one interval counts once),
``pagewatch_write_working_set_bytes{pid,comm,window}`` (distinct pages written in the last
window), ``pagewatch_tracked_bytes{pid,comm}``, ``pagewatch_target_stop_seconds{pid,comm}``
(how long the attach stopped the target), ``pagewatch_collect_duration_seconds`` (histogram,
one observation per target and collect), ``pagewatch_targets``,
``pagewatch_attach_failures_total{reason}`` and ``pagewatch_backend_info{backend}``.

Limits
------
* The counts have the resolution of the interval: a page written twice between two collects
  is counted once (that is the cost a migration or a checkpoint pays), so a rate can only be
  read as "pages written per interval, per second".
* The working set of a window is computed at each collect from the collect times: a window
  shorter than the interval holds the last interval's pages.  Memory: 16 bytes per distinct
  page written in the longest window, per target.
* Writes between a target's last collect and its exit are not seen (the kernel tears its
  page tables down); a target that executes a new program is attached again as a new target,
  so its counters start again from zero (``rate()`` handles that as a counter reset).
* ``comm`` is read at attach: a later ``prctl(PR_SET_NAME)`` does not rename the series.
* All the limits of :class:`~pagewatch.process.ProcessTracker` apply (what it cannot see,
  what it costs the target).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import pwd
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .errors import PermissionDenied, TargetGone, Unsupported
from .kernel.constants import PAGE_SIZE
from .kernel.maps import Mapping
from .process import ProcessDirty, ProcessTracker

__all__ = ["Exporter", "Selector", "WorkingSet", "mapping_kind", "KINDS", "METRICS",
           "attach_failure_reason", "prometheus_client", "parse_windows"]

log = logging.getLogger("pagewatch.exporter")

#: the ``kind`` label of ``pagewatch_written_bytes_total``
KINDS = ("heap", "stack", "anon", "file", "shmem", "other")

#: the ``reason`` label of ``pagewatch_attach_failures_total``
REASONS = ("permission", "traced", "seccomp", "unsupported", "exited", "error")

#: every metric the exporter serves (names as exposed, without the histogram's suffixes)
METRICS = {
    "pagewatch_written_bytes_total": "counter",
    "pagewatch_write_working_set_bytes": "gauge",
    "pagewatch_tracked_bytes": "gauge",
    "pagewatch_target_stop_seconds": "gauge",
    "pagewatch_collect_duration_seconds": "histogram",
    "pagewatch_targets": "gauge",
    "pagewatch_attach_failures_total": "counter",
    "pagewatch_backend_info": "info",
}

#: default working-set windows, in seconds
DEFAULT_WINDOWS = (10.0, 60.0, 300.0)

#: buckets of ``pagewatch_collect_duration_seconds``
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)

#: the longest wait before attaching again a process that failed (seconds)
MAX_BACKOFF = 300.0

_INSTALL_HINT = "Install it with: pip install 'pagewatch[exporter]'"
_PF_KTHREAD = 0x00200000


def prometheus_client() -> ModuleType:
    """The ``prometheus_client`` module, or :class:`~pagewatch.errors.Unsupported` saying how
    to install it (it is the optional extra ``exporter``)."""
    try:
        import prometheus_client as client
        import prometheus_client.core  # noqa: F401 - the metric families, as client.core
    except ImportError as exc:
        raise Unsupported("the Prometheus exporter", "the prometheus-client package is not "
                          "installed", _INSTALL_HINT) from exc
    return client


# ---- what a mapping is -------------------------------------------------------------------


def mapping_kind(m: Mapping) -> str:
    """The ``kind`` label of a mapping: ``heap``, ``stack``, ``anon``, ``file``, ``shmem`` or
    ``other``.

    ``shmem`` is memory shared without a file of its own: anonymous shared mappings
    (``/dev/zero (deleted)``, ``[anon_shmem:...]``), System V segments, memfds and
    ``/dev/shm`` files.  ``file`` is every other mapping of a file (private copies of its
    pages, as a program's ``.data``, or shared writes to it).  ``anon`` is private anonymous
    memory (``mmap``, malloc arenas, thread stacks, ``[anon:NAME]``).
    """
    path = m.path
    if path == "[heap]":
        return "heap"
    if path == "[stack]" or path.startswith("[stack:"):
        return "stack"
    if path.startswith("[anon_shmem:"):
        return "shmem"
    if path == "" or path.startswith("[anon:"):
        return "shmem" if m.shared else "anon"
    if path.startswith(("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/")):
        return "shmem"
    if path.startswith("/"):
        return "file"
    return "other"


# ---- the working set ---------------------------------------------------------------------


class WorkingSet:
    """Distinct pages written within the last ``window`` seconds, for several windows.

    Keeps, for each page written within the longest window, the time it was last written:
    two sorted numpy arrays, merged at each :meth:`add` (cost O(pages held + pages added)).

    Examples
    --------
    >>> ws = WorkingSet((10.0, 60.0))
    >>> ws.add(np.array([1, 2, 3], np.uint64), now=0.0)
    >>> ws.add(np.array([3, 4], np.uint64), now=30.0)
    >>> ws.counts(now=30.0)
    [2, 4]
    """

    def __init__(self, windows: Sequence[float]) -> None:
        self.windows = tuple(float(w) for w in windows)
        self._longest = max(self.windows, default=0.0)
        self._pages = np.empty(0, np.uint64)
        self._times = np.empty(0, np.float64)

    def add(self, pages: np.ndarray, now: float) -> None:
        """Pages (numbers, any order, repeats allowed) written by ``now``."""
        keep = self._times >= now - self._longest
        old_p, old_t = self._pages[keep], self._times[keep]
        new = np.unique(np.asarray(pages, np.uint64))
        if len(new):
            allp = np.concatenate([old_p, new])
            allt = np.concatenate([old_t, np.full(len(new), now)])
            order = np.argsort(allp, kind="stable")  # equal pages: the newer one last
            allp, allt = allp[order], allt[order]
            last = np.ones(len(allp), bool)
            last[:-1] = allp[1:] != allp[:-1]
            old_p, old_t = allp[last], allt[last]
        self._pages, self._times = old_p, old_t

    def counts(self, now: float) -> list[int]:
        """Distinct pages written within each window before ``now``, in window order."""
        return [int(np.count_nonzero(self._times >= now - w)) for w in self.windows]

    def __len__(self) -> int:
        return len(self._pages)


def window_label(seconds: float) -> str:
    """``10s``, ``1m``, ``5m``, ``1h``: the ``window`` label of a window."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_windows(text: str) -> tuple[float, ...]:
    """``"10s,1m,5m"`` -> ``(10.0, 60.0, 300.0)``; a bare number is seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", part)
        if not m or float(m[1]) <= 0:
            raise ValueError(f"{part!r} is not a window such as 10s, 1m or 5m")
        out.append(float(m[1]) * units[m[2] or "s"])
    if not out:
        raise ValueError("no window given")
    return tuple(sorted(set(out)))


# ---- which processes ---------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """What the selection knows of one process: its identity and what it is matched on."""

    pid: int
    start: int  #: start time in clock ticks since boot (field 22 of /proc/PID/stat)
    comm: str
    ppid: int
    state: str
    kthread: bool


def proc_info(pid: int) -> ProcInfo | None:
    """One process's ``/proc/PID/stat``, or None if it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    head, _, rest = stat.rpartition(")")
    comm = head.partition("(")[2]
    f = rest.split()
    # f[0] is field 3 (state): field N is f[N - 3]
    try:
        return ProcInfo(pid, int(f[19]), comm, int(f[1]), f[0], bool(int(f[6]) & _PF_KTHREAD))
    except (IndexError, ValueError):
        return None


def _all_pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _uid_of(user: str | int) -> int:
    if isinstance(user, int) or str(user).isdigit():
        return int(user)
    try:
        return pwd.getpwnam(str(user)).pw_uid
    except KeyError:
        raise ValueError(f"no user named {user!r}") from None


def _cgroup_path(path: str) -> str:
    """A cgroup path as ``/proc/PID/cgroup`` writes it: relative to the hierarchy's root,
    with a leading slash.  ``/sys/fs/cgroup/a/b``, ``/sys/fs/cgroup/unified/a/b``, ``a/b``
    and ``/a/b`` are the same."""
    p = os.path.normpath("/" + path.strip().lstrip("/"))
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if p == mount or p.startswith(mount + "/"):
            return p[len(mount):] or "/"
    return p


@dataclasses.dataclass(frozen=True)
class Selector:
    """Which processes to track.  Give one criterion (the command line allows one).

    Parameters
    ----------
    pids
        These processes (each as it is now: a new process that later reuses the pid is not
        taken).
    name
        A regular expression searched in the process name (``comm``, as ``pgrep`` does).
    user
        A user name or uid: the processes whose effective uid it is.
    cgroup
        A cgroup path (``/sys/fs/cgroup/system.slice/x.service`` or
        ``system.slice/x.service``): the processes in it or in the cgroups below it, as
        ``/proc/PID/cgroup`` says (the cgroup v2 hierarchy, or any v1 hierarchy).
    children_of
        A pid: its descendants, at any depth (not itself).
    """

    pids: tuple[int, ...] = ()
    name: str | None = None
    user: str | int | None = None
    cgroup: str | None = None
    children_of: int | None = None

    def __post_init__(self) -> None:
        given = [bool(self.pids), self.name is not None, self.user is not None,
                 self.cgroup is not None, self.children_of is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of pids, name, user, cgroup, children_of")
        if self.name is not None:
            re.compile(self.name)  # fail now on a bad expression
        if self.user is not None:
            _uid_of(self.user)

    def __str__(self) -> str:
        if self.pids:
            return "pid " + ", ".join(map(str, self.pids))
        if self.name is not None:
            return f"name ~ {self.name!r}"
        if self.user is not None:
            return f"user {self.user}"
        if self.cgroup is not None:
            return f"cgroup {_cgroup_path(self.cgroup)}"
        return f"descendants of {self.children_of}"

    def find(self) -> list[ProcInfo]:
        """The matching user-space processes now, never this process, zombies and kernel
        threads left out."""
        me = os.getpid()
        if self.pids:
            infos = [proc_info(p) for p in self.pids]
        else:
            infos = [proc_info(p) for p in _all_pids()]
        procs = [i for i in infos if i is not None and not i.kthread and i.state not in "ZX"]
        live = [i for i in procs if i.pid != me]
        if self.name is not None:
            pattern = re.compile(self.name)
            return [i for i in live if pattern.search(i.comm)]
        if self.user is not None:
            uid = _uid_of(self.user)
            return [i for i in live if _euid(i.pid) == uid]
        if self.cgroup is not None:
            return [i for i in live if self._in_cgroup(i.pid)]
        if self.children_of is not None:
            # the tree includes this process, so that its own descendants are reached
            children: dict[int, list[ProcInfo]] = {}
            for i in procs:
                children.setdefault(i.ppid, []).append(i)
            out, todo, seen = [], [self.children_of], {self.children_of}
            while todo:
                for c in children.get(todo.pop(), []):
                    if c.pid not in seen:
                        seen.add(c.pid)
                        out.append(c)
                        todo.append(c.pid)
            return sorted((i for i in out if i.pid != me), key=lambda i: i.pid)
        return live

    def _in_cgroup(self, pid: int) -> bool:
        assert self.cgroup is not None
        want = _cgroup_path(self.cgroup)
        for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
            path = line.split(":", 2)[-1]
            if want == "/" or path == want or path.startswith(want + "/"):
                return True
        return False


def _euid(pid: int) -> int | None:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    return None


# ---- failures ----------------------------------------------------------------------------


def attach_failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of an attach that failed with ``exc`` (one of :data:`REASONS`)."""
    if isinstance(exc, TargetGone):
        return "exited"
    if isinstance(exc, PermissionDenied):
        return "traced" if "already traced" in str(exc) else "permission"
    if isinstance(exc, Unsupported):
        return "seccomp" if "seccomp" in str(exc) else "unsupported"
    return "error"


# ---- the exporter ------------------------------------------------------------------------


class _Target:
    """One tracked process and its figures."""

    def __init__(self, info: ProcInfo, tracker: ProcessTracker, windows: Sequence[float]
                 ) -> None:
        self.info = info
        self.tracker = tracker
        self.labels = (str(info.pid), info.comm)
        self.written = dict.fromkeys(KINDS, 0)
        self.working_set = WorkingSet(windows)
        self.ws_counts = [0] * len(windows)
        self.tracked_bytes = 0
        stop = tracker.attach_stop_ms
        self.stop_seconds = stop / 1000 if stop is not None else float("nan")

    def account(self, d: ProcessDirty) -> None:
        parts = []
        for m, pages in d.written().items():
            self.written[mapping_kind(m)] += len(pages) * PAGE_SIZE
            parts.append(pages.runs + m.start // PAGE_SIZE)  # runs of page numbers
        self.working_set.add(_pages_of(parts), d.time)
        self.ws_counts = self.working_set.counts(d.time)
        self.tracked_bytes = sum(m.size for m in d)


def _pages_of(parts: list[np.ndarray]) -> np.ndarray:
    """Every page number of ``[first, end)`` runs, as ``uint64`` (no Python loop per run)."""
    if not parts:
        return np.empty(0, np.uint64)
    runs = np.concatenate(parts)
    lengths = runs[:, 1] - runs[:, 0]
    before = np.cumsum(lengths) - lengths
    return (np.repeat(runs[:, 0] - before, lengths) + np.arange(int(lengths.sum()))
            ).astype(np.uint64)


@dataclasses.dataclass
class _Backoff:
    next_try: float
    delay: float


class Exporter:
    """Tracks the processes a :class:`Selector` matches and serves their figures to
    Prometheus.

    Parameters
    ----------
    selector
        Which processes.
    interval
        Seconds between two rounds (rescan + collect of every target).
    windows
        The working-set windows, in seconds.
    backend, mappings
        Passed to each :class:`~pagewatch.process.ProcessTracker`.
    tracker
        What makes a tracker of a pid (tests replace it).

    Examples
    --------
    >>> e = Exporter(Selector(name="^postgres$"), interval=1.0)   # doctest: +SKIP
    >>> e.serve(port=9464)         # /metrics on every address, the loop in a thread
    >>> ...
    >>> e.close()
    """

    def __init__(self, selector: Selector, *, interval: float = 1.0,
                 windows: Sequence[float] = DEFAULT_WINDOWS, backend: str = "auto",
                 mappings: str = "writable",
                 tracker: Callable[[int], ProcessTracker] | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be above zero, not {interval!r}")
        self.selector = selector
        self.interval = float(interval)
        self.windows = tuple(sorted(windows))
        self._make = tracker or (lambda pid: ProcessTracker(pid, backend, mappings))
        self.targets: dict[tuple[int, int], _Target] = {}
        #: identities (pid, start) of the processes given by ``pids`` (their first sight)
        self._given: dict[int, int] = {}
        self._backoff: dict[tuple[int, int], _Backoff] = {}
        self.attach_failures = dict.fromkeys(REASONS, 0)
        self._durations = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self.rounds = 0
        self._published: list[Any] = []
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    # ---- one round -------------------------------------------------------------------------
    def run_once(self) -> None:
        """Rescan, attach what is new, collect every target, publish the figures."""
        now = time.monotonic()
        try:
            found = self.selector.find()
        except Exception:  # noqa: BLE001 - a rescan failing must not stop the exporter
            log.exception("rescan of %s failed", self.selector)
            found = []
        if self.selector.pids:
            found = [i for i in found if self._given.setdefault(i.pid, i.start) == i.start]
        wanted = {(i.pid, i.start): i for i in found}
        for key in [k for k in self._backoff if k not in wanted]:
            del self._backoff[key]
        for key, info in wanted.items():
            if key in self.targets or self._stop.is_set():
                continue
            b = self._backoff.get(key)
            if b is not None and now < b.next_try:
                continue
            self._attach(key, info, b)
        for key, target in list(self.targets.items()):
            self._collect(key, target)
        self.rounds += 1
        self._publish()

    def _attach(self, key: tuple[int, int], info: ProcInfo, b: _Backoff | None) -> None:
        try:
            tracker = self._make(info.pid)
        except Exception as exc:  # noqa: BLE001 - any failure is counted, never fatal
            reason = attach_failure_reason(exc)
            self.attach_failures[reason] += 1
            delay = min(MAX_BACKOFF, b.delay * 2) if b else self.interval
            self._backoff[key] = _Backoff(time.monotonic() + delay, delay)
            if b is None:
                log.warning("cannot track pid %d (%s), will retry: %s", info.pid, info.comm,
                            exc)
            return
        self._backoff.pop(key, None)
        # The name seen before the attach may be the one a process had before the execve(2)
        # it is in (Linux renames it after the close-on-exec that lets its parent go on); the
        # attach caught it after the exec, so its name now names the memory tracked.
        now = proc_info(info.pid)
        if now is not None and now.start == info.start:
            info = now
        self.targets[key] = _Target(info, tracker, self.windows)
        log.info("tracking pid %d (%s) with %s", info.pid, info.comm, tracker.backend)

    def _collect(self, key: tuple[int, int], target: _Target) -> None:
        t0 = time.perf_counter()
        try:
            d = target.tracker.collect()
        except TargetGone as exc:
            if isinstance(exc.collected, ProcessDirty):
                target.account(exc.collected)
            self._drop(key, "exited" if not _alive(key) else "executed a new program")
            return
        except Exception as exc:  # noqa: BLE001 - drop it; the next rescan attaches again
            log.warning("collect of pid %d (%s) failed, dropped: %s", key[0],
                        target.info.comm, exc)
            self._drop(key, None)
            return
        dt = time.perf_counter() - t0
        target.account(d)
        self._durations[bisect.bisect_left(DURATION_BUCKETS, dt)] += 1
        self._duration_sum += dt

    def _drop(self, key: tuple[int, int], why: str | None) -> None:
        target = self.targets.pop(key)
        try:
            target.tracker.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the tracker of pid %d", key[0])
        if why:
            log.info("pid %d (%s) %s: no longer tracked", key[0], target.info.comm, why)

    # ---- the figures ----------------------------------------------------------------------
    def _publish(self) -> None:
        """Build the metric families of this round; scrapes read them until the next."""
        families = self._families()
        with self._publish_lock:
            self._published = families

    def _families(self) -> list[Any]:
        core = prometheus_client().core
        written = core.CounterMetricFamily(
            "pagewatch_written_bytes", "Bytes of the pages a process wrote, by kind of memory "
            "(a page written several times within one collect interval counts once).",
            labels=["pid", "comm", "kind"])
        ws = core.GaugeMetricFamily(
            "pagewatch_write_working_set_bytes", "Bytes of the distinct pages a process "
            "wrote within the last window.", labels=["pid", "comm", "window"])
        tracked = core.GaugeMetricFamily(
            "pagewatch_tracked_bytes", "Bytes of the process's memory that is tracked.",
            labels=["pid", "comm"])
        stop = core.GaugeMetricFamily(
            "pagewatch_target_stop_seconds", "How long the attach stopped the process.",
            labels=["pid", "comm"])
        labels = [window_label(w) for w in self.windows]
        backends: set[str] = set()
        for t in self.targets.values():
            for kind in KINDS:
                written.add_metric([*t.labels, kind], t.written[kind])
            for label, n in zip(labels, t.ws_counts, strict=True):
                ws.add_metric([*t.labels, label], n * PAGE_SIZE)
            tracked.add_metric(list(t.labels), t.tracked_bytes)
            stop.add_metric(list(t.labels), t.stop_seconds)
            backends.add(t.tracker.backend)
        cumulative, buckets = 0, []
        for bound, n in zip([*DURATION_BUCKETS, float("inf")], self._durations, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        duration = core.HistogramMetricFamily(
            "pagewatch_collect_duration_seconds", "Time one collect of one process took.",
            buckets=buckets, sum_value=self._duration_sum)
        targets = core.GaugeMetricFamily("pagewatch_targets", "Processes tracked now.",
                                         value=len(self.targets))
        failures = core.CounterMetricFamily(
            "pagewatch_attach_failures", "Attaches that failed, by reason (each is retried "
            "with a back-off).", labels=["reason"])
        for reason, n in self.attach_failures.items():
            failures.add_metric([reason], n)
        info = core.InfoMetricFamily("pagewatch_backend", "How the processes are tracked.",
                                     labels=["backend"])
        for b in sorted(backends):
            info.add_metric([b], {})
        return [written, ws, tracked, stop, duration, targets, failures, info]

    def collect(self) -> Iterable[Any]:
        """The Prometheus collector protocol: the figures of the last finished round."""
        with self._publish_lock:
            return list(self._published)

    def describe(self) -> Iterable[Any]:
        """Nothing to describe up front (the registry must not run a round to learn it)."""
        return []

    # ---- running -------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run the rounds in a daemon thread, one per interval, until :meth:`close`."""
        prometheus_client()  # fail here, not in the thread
        self._publish()      # scrapes before the first round see the exporter's own series
        self._thread = threading.Thread(target=self._loop, name="pagewatch-exporter",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def _loop(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep serving whatever happens
                log.exception("exporter round failed")
            next_round += self.interval
            now = time.monotonic()
            if next_round < now:  # a round longer than the interval: no burst to catch up
                next_round = now
            self._stop.wait(next_round - now)

    def serve(self, port: int = 9464, address: str = "0.0.0.0") -> tuple[str, int]:
        """Start the rounds and an HTTP server of ``/metrics``; returns the address and port
        it listens on (``port=0`` picks a free one)."""
        client = prometheus_client()
        registry = client.CollectorRegistry(auto_describe=False)
        registry.register(self)
        client.ProcessCollector(registry=registry)  # the exporter's own CPU and memory
        self.start()
        server, _ = client.start_http_server(port, addr=address, registry=registry)
        self._server = server
        host, bound = server.server_address[:2]
        return str(host), int(bound)

    def close(self) -> None:
        """Stop the rounds and the server, and release every target (they go on as they
        were)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for key in list(self.targets):
            self._drop(key, None)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _alive(key: tuple[int, int]) -> bool:
    info = proc_info(key[0])
    return info is not None and info.start == key[1] and info.state not in "ZX"

