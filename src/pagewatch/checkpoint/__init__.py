"""Incremental checkpoints: save numpy state writing only the pages written since the last save.

>>> import numpy as np, pagewatch as pw
>>> grid = np.zeros((1024, 1024))
>>> ck = pw.Checkpoint("/tmp/run.pwck", {"grid": grid})     # doctest: +SKIP
>>> ck.save()            # generation 0: everything               # doctest: +SKIP
>>> grid[10] = 1.0
>>> ck.save()            # generation 1: the one page row 10 is on # doctest: +SKIP
>>> pw.checkpoint.load("/tmp/run.pwck")["grid"][10, 0]           # doctest: +SKIP
1.0

A checkpoint is a directory with one file per generation (see ``_store``); each file is a
base (every array whole) or a delta (the byte runs of the pages written since the previous
generation), described in ``_format`` and the README's "Checkpoints".

Limits
------
``save()`` copies the pages a :class:`~pagewatch.Tracker` reports, from the live arrays: like
``np.save`` it assumes nothing writes them meanwhile.  A write racing a save is not lost
(the tracker's reset comes before the copy, so the next save reports it), but the
generation then holds that page's newer bytes next to older bytes of other pages: a state
that never existed as a whole.  Tracking is by page, so a write to memory sharing a page
with an array (another small array, say) makes that page be saved again; never the reverse.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time as _time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from .._lifecycle import Closeable
from ..kernel.constants import PAGE_SIZE
from ..tracker import Tracker
from . import _format, _icechunk
from ._errors import CheckpointConflict, CheckpointDamaged, CheckpointError
from ._format import ArrayPart, array_meta, flat_bytes, make_array, same_layout
from ._icechunk import IcechunkStore
from ._store import GenerationReader, LocalStore, Store

__all__ = ["Checkpoint", "Generation", "load", "generations", "verify", "compact",
           "CheckpointError", "CheckpointDamaged", "CheckpointConflict", "Store", "LocalStore",
           "IcechunkStore"]

#: what a checkpoint may be given as: a path (or URL), a :class:`Store`, an
#: :class:`IcechunkStore`
Where = str | os.PathLike[str] | Store | IcechunkStore

#: the name a lone array (not a dict) is saved under, as ``np.savez`` names it
SINGLE = "arr_0"


class Generation(NamedTuple):
    """One saved generation."""

    number: int
    time: float
    nbytes: int
    """bytes of its file"""
    pages: int
    """pages it holds: written since the previous generation, or all of them for a base"""


def _store_of(path: Where, store: str = "auto",
              storage_options: Mapping[str, Any] | None = None,
              chunk_bytes: int | None = None) -> Store | IcechunkStore:
    """The store ``path`` names: ``store="local"`` (a folder of generation files),
    ``"icechunk"`` (an Icechunk repository: ``s3://`` URL or folder) or ``"auto"`` (an
    ``s3://`` URL or a folder holding an Icechunk repository is Icechunk, anything else
    local)."""
    if isinstance(path, (Store, IcechunkStore)):
        if storage_options or chunk_bytes is not None:
            raise ValueError("storage_options and chunk_bytes go to the store's constructor "
                             "when a store object is given")
        return path
    if store not in ("auto", "local", "icechunk"):
        raise ValueError(f"store must be 'auto', 'local' or 'icechunk', not {store!r}")
    if store == "icechunk" or (store == "auto" and _icechunk.is_icechunk(path)):
        return IcechunkStore(path, storage_options=storage_options, chunk_bytes=chunk_bytes)
    if storage_options or chunk_bytes is not None:
        raise ValueError("storage_options and chunk_bytes are options of store='icechunk'")
    if "://" in os.fspath(path):
        raise CheckpointError(f"{os.fspath(path)}: a URL needs store='icechunk' (s3://...)")
    return LocalStore(path)


def _local(store: Store | IcechunkStore, what: str) -> Store:
    if isinstance(store, IcechunkStore):
        raise CheckpointError(f"{store}: {NO_COMPACTION}")
    return store


def _gen(idx: dict[str, Any]) -> Generation:
    return Generation(idx["generation"], idx["time"], idx["nbytes"], idx["pages"])


def _index(store: Store, n: int) -> dict[str, Any]:
    with store.open(n) as r:
        return _read_index(r, n)


def _read_index(r: GenerationReader, n: int) -> dict[str, Any]:
    try:
        return _format.read_index(r, n)
    except EOFError as exc:
        raise CheckpointDamaged(n, None, "file", f"cut short ({exc})") from None


def _resolve(store: Store, generation: int) -> int:
    have = store.generations()
    if not have:
        raise CheckpointError(f"{store} holds no generation")
    if generation < 0:
        if -generation > len(have):
            raise CheckpointError(f"{store} holds {len(have)} generations, not {-generation}")
        return have[generation]
    if generation not in have:
        raise CheckpointError(f"no generation {generation} in {store}: it holds "
                              f"{_ranges(have)}")
    return generation


def _ranges(ns: list[int]) -> str:
    out: list[str] = []
    start = prev = ns[0]
    for n in [*ns[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def _chain(store: Store, n: int) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """For each array of generation ``n``: the ``(index, entry)`` to apply, oldest first
    (its last full entry, then every delta after it)."""
    idx = _index(store, n)
    want = {e["name"]: e for e in idx["arrays"]}
    plan: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {k: [] for k in want}
    pending = set(want)
    while True:
        g = idx["generation"]
        for e in idx["arrays"]:
            name = e["name"]
            if name not in pending:
                continue
            if not same_layout(e, want[name]):
                raise CheckpointDamaged(g, name, "chain", f"its layout differs from generation "
                                        f"{n}'s, which builds on it")
            plan[name].append((idx, e))
            if e["kind"] == "full":
                pending.discard(name)
        missing = pending - {e["name"] for e in idx["arrays"]}
        if missing:
            raise CheckpointDamaged(g, sorted(missing)[0], "chain",
                                    "a later generation has a delta of this array, this one "
                                    "has no entry for it")
        if not pending:
            break
        parent = idx["parent"]
        if parent is None:
            raise CheckpointDamaged(g, sorted(pending)[0], "chain", "a delta with no parent")
        try:
            idx = _index(store, parent)
        except CheckpointDamaged:
            raise
        except CheckpointError:
            raise CheckpointDamaged(g, None, "chain", f"builds on generation {parent}, which "
                                    "is missing") from None
    for v in plan.values():
        v.reverse()
    return plan


def _materialise(store: Store, n: int, verify: bool = True) -> dict[str, np.ndarray]:
    plan = _chain(store, n)
    readers: dict[int, GenerationReader] = {}
    out: dict[str, np.ndarray] = {}
    # The deltas are read after the bases: a thread asks for them first, so the disk reads
    # them while the bases are copied (a delta just saved is not in the page cache)
    later = sorted({idx["generation"] for steps in plan.values() for idx, e in steps
                    if e["kind"] == "delta"})

    def prefetch() -> None:
        with contextlib.suppress(Exception):  # advice: the reads themselves report errors
            for g in later:
                store.prefetch(g)

    ahead = threading.Thread(target=prefetch, name="pagewatch-prefetch", daemon=True)
    if later:
        with contextlib.suppress(RuntimeError):  # no thread (interpreter exit): no advice
            ahead.start()
    try:
        for name, steps in plan.items():
            arr = make_array(steps[-1][1])
            flat = flat_bytes(arr)
            for idx, e in steps:
                g = idx["generation"]
                r = readers.get(g)
                if r is None:
                    r = readers[g] = store.open(g)
                try:
                    _format.read_entry(r, idx, e, flat, verify=verify)
                except EOFError as exc:
                    raise CheckpointDamaged(g, name, "file", f"cut short ({exc})") from None
            out[name] = arr
    finally:
        for r in readers.values():
            r.close()
        if ahead.is_alive():
            ahead.join()
    return out


def load(path: Where, generation: int = -1, *, verify: bool = True, store: str = "auto",
         storage_options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one generation.

    Parameters
    ----------
    path
        The checkpoint (its directory, an ``s3://`` URL), or a :class:`Store` or
        :class:`IcechunkStore`.
    generation
        Its number, or a negative index among the generations held (``-1``: the newest).
    verify
        Check every checksum on the way (the default).  ``False`` still checks the framing
        and the index, not the data.  An Icechunk generation is checked out as one
        snapshot; its layouts are checked, its chunks' checksums only by :func:`verify`.
    store, storage_options
        See :class:`Checkpoint`.

    Returns
    -------
    dict of str to numpy.ndarray
        Every array with the dtype, shape and memory order it was saved with (a lone array
        is under ``"arr_0"``).

    Raises
    ------
    CheckpointError
        No such checkpoint or generation.
    CheckpointDamaged
        The generation, or one it builds on, is damaged or missing: the message names the
        generation, the array and the part.  No array is returned then.
    """
    st = _store_of(path, store, storage_options)
    if isinstance(st, IcechunkStore):
        return st.load(generation)
    return _materialise(st, _resolve(st, generation), verify)


def generations(path: Where, *, store: str = "auto",
                storage_options: Mapping[str, Any] | None = None) -> list[Generation]:
    """Every generation of a checkpoint, oldest first (a damaged one raises)."""
    st = _store_of(path, store, storage_options)
    if isinstance(st, IcechunkStore):
        return [_gen(r) for r in st.records()]
    return [_gen(_index(st, n)) for n in st.generations()]


def describe(path: Where, *, store: str = "auto",
             storage_options: Mapping[str, Any] | None = None
             ) -> Iterator[dict[str, Any] | CheckpointDamaged]:
    """Each generation's index (``kind``: ``"base"`` or ``"delta"``), or the damage that
    keeps it from being read; for ``pagewatch checkpoint ls``.  An Icechunk generation's
    also has ``snapshot`` (its Icechunk snapshot id)."""
    st = _store_of(path, store, storage_options)
    if isinstance(st, IcechunkStore):
        yield from _icechunk.iter_records(st)
        return
    for n in st.generations():
        try:
            idx = _index(st, n)
        except CheckpointDamaged as exc:
            yield exc
            continue
        idx["kind"] = "base" if idx["parent"] is None else "delta"
        yield idx


def verify(path: Where, *, store: str = "auto",
           storage_options: Mapping[str, Any] | None = None) -> list[CheckpointDamaged]:
    """Re-check every checksum of every generation and that each one's chain is whole.

    An Icechunk checkpoint: every chunk each generation wrote is read once and checked
    against that generation's checksum, and each array's Zarr metadata against the
    generation's layout; a generation that may hold chunks of a damaged one is named with
    part ``"chain"``.

    Returns
    -------
    list of CheckpointDamaged
        One per damaged generation (empty: all is well).  A generation that is sound but
        builds on a damaged one is listed too (part ``"chain"``).
    """
    st = _store_of(path, store, storage_options)
    if isinstance(st, IcechunkStore):
        return st.verify()
    problems: list[CheckpointDamaged] = []
    bad: set[int] = set()
    indices: dict[int, dict[str, Any]] = {}
    for n in st.generations():
        try:
            with st.open(n) as r:
                idx = _read_index(r, n)
                for e in idx["arrays"]:
                    try:
                        _format.check_entry(r, idx, e)
                    except EOFError as exc:
                        raise CheckpointDamaged(n, e["name"], "file", f"cut short ({exc})") from None
            indices[n] = idx
        except CheckpointDamaged as exc:
            problems.append(exc)
            bad.add(n)
    for n in indices:
        try:
            plan = _chain(st, n)
        except CheckpointDamaged as exc:
            if exc.generation == n or exc.generation not in bad:
                problems.append(exc)
            else:
                problems.append(CheckpointDamaged(n, exc.array, "chain", f"builds on damaged "
                                                  f"generation {exc.generation}"))
            continue
        for name, steps in plan.items():
            hurt = sorted({idx["generation"] for idx, _ in steps} & bad)
            if hurt:
                problems.append(CheckpointDamaged(n, name, "chain", f"builds on damaged "
                                                  f"generation {hurt[0]}"))
                break
    problems.sort(key=lambda p: p.generation)
    return problems


def compact(path: Where, generation: int = -1, *, prune: bool = True, store: str = "auto",
            storage_options: Mapping[str, Any] | None = None) -> Generation:
    """Fold a generation's chain into a base: rewrite it whole, in place (same number).

    Parameters
    ----------
    generation
        Which one (default the newest).
    prune
        Then remove every older generation (newest first, so a crash midway leaves each
        remaining generation loadable).

    Notes
    -----
    Takes the writer's lock: fails while a :class:`Checkpoint` writes to ``path``.  The
    rewrite is one atomic replace: a crash leaves the old delta or the new base, each the
    same state.

    Raises
    ------
    CheckpointError
        For an Icechunk checkpoint, always (it has no chains; the message says how to drop
        old generations with Icechunk).
    """
    st = _local(_store_of(path, store, storage_options), "compact")
    st.lock()
    try:
        return _compact(st, generation, prune)
    finally:
        st.unlock()


NO_COMPACTION = ("an Icechunk checkpoint has no chains to compact: every generation is a "
                 "whole Icechunk snapshot (a commit keeps the chunks it did not write from "
                 "its parent), so loading any generation reads one state.  To give back the "
                 "space of old generations, use Icechunk's own Repository.expire_snapshots() "
                 "then garbage_collect()")


def _compact(store: Store, generation: int, prune: bool) -> Generation:
    n = _resolve(store, generation)
    idx = _index(store, n)
    if idx["parent"] is None:
        new = idx
    else:
        state = _materialise(store, n)
        parts = [ArrayPart(name, a, None, -(-a.nbytes // idx["page_size"]))
                 for name, a in state.items()]
        new = _write(store, n, None, idx["time"], parts, idx["page_size"], idx["checksum"],
                     idx["compression"], replace=True)
    if prune:
        for old in reversed([g for g in store.generations() if g < n]):
            store.remove(old)
    return _gen(new)


def _write(store: Store, n: int, parent: int | None, when: float, parts: list[ArrayPart],
           page_size: int, checksum: str, compression: str, replace: bool = False
           ) -> dict[str, Any]:
    w = store.create(n, replace=replace, delta=parent is not None)
    try:
        idx = _format.write_generation(w, generation=n, parent=parent, time=when,
                                       page_size=page_size, parts=parts, checksum=checksum,
                                       compression=compression)
        w.commit()
    except BaseException:
        w.abort()
        raise
    return idx


class _Tracked:
    """One array of the state and the tracker watching it."""

    def __init__(self, array: np.ndarray, backend: str) -> None:
        self.array = array
        self.key = _key(array)
        self.meta = array_meta(array)
        flat_bytes(array)  # refuses a non-contiguous array before a tracker is made
        self.tracker = Tracker(array, backend=backend) if array.nbytes else None
        self._pages: np.ndarray | None = None

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def written(self, name: str) -> ArrayPart:
        """The pages of the array written since the last call (collect and reset, one step)
        as a delta part: byte runs clipped to the array, gathered page by page."""
        a = self.array
        if self.tracker is None:
            return ArrayPart(name, a, np.empty((0, 2), np.int64), 0)
        t = self.tracker
        d = t.collect(reset=True)
        ps = d.page_size
        runs = d.runs * ps - t.offset
        np.clip(runs, 0, a.nbytes, out=runs)
        runs = runs[runs[:, 1] > runs[:, 0]]
        if self._pages is None:
            # The memory pages under the array, its neighbours' bytes on the first and last
            # page included (they are mapped: the array lives there); only read.
            npages = t.region.npages
            raw = (ctypes.c_uint8 * (npages * ps)).from_address(t.base)
            self._pages = np.frombuffer(memoryview(raw).cast("B"), np.uint8).reshape(npages, ps)
        head = t.offset
        tail = self._pages.size - t.offset - a.nbytes
        return ArrayPart(name, a, runs, len(d), (self._pages, d.pages(), head, tail))


def _key(a: np.ndarray) -> tuple[Any, ...]:
    return (id(a), a.__array_interface__["data"][0], a.nbytes, a.dtype, a.shape, a.strides)


class Checkpoint(Closeable):
    """Save numpy arrays again and again, each save writing only the pages written since.

    Parameters
    ----------
    path
        A directory (made if missing), an ``s3://bucket/prefix`` URL (with
        ``store="icechunk"``), a :class:`Store` or an :class:`IcechunkStore`.  An existing
        checkpoint is continued: new generations are numbered after the ones it holds, and
        this object's first save is a base.
    state
        One array, or a dict of name -> array.  The dict is read again at every save: an
        array added, replaced or resized gets a full entry, a name removed is dropped.
        Arrays must be contiguous and writable (they are tracked).
    compression
        ``"none"`` or ``"zstd"`` (``pip install 'pagewatch[zstd]'``).
    checksum
        ``"xxh3_64"`` (default when ``xxhash`` is installed: ``pagewatch[xxh3]``) or
        ``"crc32"`` (zlib; loads of large generations are then checksum-bound).
    max_chain
        At most this many deltas after a base; the save after them is a base.
    max_chain_ratio
        A save is a base when the deltas since the last base hold more than this fraction
        of the state's bytes.  With ``max_chain`` it bounds what loading the newest
        generation reads: one full state, plus at most this fraction, plus one delta.
    backend
        The :class:`~pagewatch.Tracker` backend.
    store
        ``"local"``: a folder of generation files (this module's format).  ``"icechunk"``:
        an Icechunk repository of Zarr v3 arrays, in object storage (``s3://``) or a folder;
        each save is one commit writing the chunks that hold a written page
        (``pip install 'pagewatch[icechunk]'``).  ``"auto"`` (default): Icechunk for an
        ``s3://`` URL or a folder holding an Icechunk repository, else local.
    storage_options
        Icechunk only: how to reach the object store (``endpoint_url``, ``region``,
        credentials, retries, ...: see :class:`IcechunkStore`).
    chunk_bytes
        Icechunk only: the target chunk size of the Zarr arrays (default
        ``DEFAULT_CHUNK_BYTES``, 8 KiB, chosen by measurement: see the README).

    Notes
    -----
    One writer at a time: the checkpoint's lock is held until :meth:`close`.  An Icechunk
    checkpoint has no lock: a save fails with :class:`CheckpointConflict`, having written
    and reset nothing, when another writer committed to the branch since this object's
    previous save.  ``max_chain``, ``max_chain_ratio`` and ``compression`` do not apply
    to it (every commit is a whole state; chunks are stored raw).  See the module's Limits
    for writes that race a save.

    Examples
    --------
    >>> a = np.zeros(1 << 20)
    >>> with pw.Checkpoint("run.pwck", a) as ck:   # doctest: +SKIP
    ...     ck.save()
    ...     a[:10] = 1
    ...     ck.save().pages
    1
    """

    def __init__(self, path: Where, state: np.ndarray | Mapping[str, np.ndarray], *,
                 compression: str = "none", checksum: str | None = None,
                 max_chain: int = 10, max_chain_ratio: float = 0.25, backend: str = "auto",
                 store: str = "auto", storage_options: Mapping[str, Any] | None = None,
                 chunk_bytes: int | None = None) -> None:
        self.checksum = checksum or _format.default_checksum()
        _format.check_options(self.checksum, compression)
        if max_chain < 0 or not max_chain_ratio >= 0:
            raise ValueError("max_chain and max_chain_ratio must be at least 0")
        self.compression = compression
        self.max_chain = max_chain
        self.max_chain_ratio = max_chain_ratio
        self.backend = backend
        self._state = state
        self._tracked: dict[str, _Tracked] = {}
        where = _store_of(path, store, storage_options, chunk_bytes)
        if isinstance(where, IcechunkStore) and compression != "none":
            raise CheckpointError("an Icechunk checkpoint stores its chunks raw: "
                                  "compression must be 'none'")
        self._writer = _icechunk.new_writer()
        self._snapshot: str | None = None  # Icechunk: this writer's last commit
        self._saved: dict[str, dict[str, Any]] | None = None  # Icechunk: its arrays
        self._next = 0  # Icechunk: the next generation number
        self._conflict: CheckpointConflict | None = None  # Icechunk: refuse from now on
        where.lock()
        # Only now: a Checkpoint refused the lock must not release it (close, finaliser)
        self._store: Store | IcechunkStore = where
        self._last: int | None = None  # the generation the next delta builds on
        self._chain = 0  # deltas since the last base
        self._chain_bytes = 0  # their data bytes
        try:
            for name, a in self._arrays().items():
                self._tracked[name] = _Tracked(a, backend)
        except BaseException:
            self.close()
            raise

    # ---- the state ------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        s = self._state
        if isinstance(s, np.ndarray):
            items = {SINGLE: s}
        elif isinstance(s, Mapping):
            items = dict(s)
        else:
            raise TypeError("state must be a numpy array or a dict of them, not "
                            f"{type(s).__name__}")
        for name, a in items.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"array names must be non-empty strings, not {name!r}")
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name!r} is a {type(a).__name__}, not a numpy array")
        return items

    @property
    def path(self) -> str:
        return str(self._store)

    # ---- saving ---------------------------------------------------------------------------
    def save(self) -> Generation:
        """Write a new generation: a base (everything) the first time and when the chain
        policy says so, else only the pages written since the previous save.

        Returns
        -------
        Generation
            Its number, time, bytes written and pages.

        Notes
        -----
        Each array's tracker is collected and reset in one step, then the pages it reports
        are copied: a page written after that is in the next save (see the module's
        Limits).  If the save fails, nothing of it is visible and the next save is a base.
        """
        if self._store is None:
            raise ValueError("this checkpoint is closed")
        if isinstance(self._store, IcechunkStore):
            return self._save_icechunk(self._store)
        arrays = self._arrays()
        for name in [n for n in self._tracked if n not in arrays]:
            self._tracked.pop(name).close()
        total = sum(a.nbytes for a in arrays.values())
        base = (self._last is None or self._chain >= self.max_chain
                or self._chain_bytes > self.max_chain_ratio * total)
        try:
            parts = self._parts(arrays, base)  # reset first, copy after (never lose a write)
            # The lock keeps other writers out: after a save of ours the next number is
            # known; listed only at first and after a failure (whose name may be taken)
            n = (self._last + 1 if self._last is not None
                 else max(self._store.generations(), default=-1) + 1)
            idx = _write(self._store, n, None if base else self._last, _time.time(), parts,
                         PAGE_SIZE, self.checksum, self.compression)
        except BaseException:
            self._last = None  # trackers were reset: only a base is right after this
            raise
        if base:
            self._chain, self._chain_bytes = 0, 0
        else:
            self._chain += 1
            self._chain_bytes += sum(e["data"]["raw_length"] for e in idx["arrays"])
        self._last = n
        return _gen(idx)

    def _parts(self, arrays: dict[str, np.ndarray], base: bool) -> list[ArrayPart]:
        """Each array's part: whole (new, replaced, or ``base``) or the pages written since
        the last call (its tracker collected and reset in one step, before any copy)."""
        parts: list[ArrayPart] = []
        for name, a in arrays.items():
            tr = self._tracked.get(name)
            if tr is None or tr.key != _key(a):
                if tr is not None:
                    self._tracked.pop(name).close()
                tr = self._tracked[name] = _Tracked(a, self.backend)
                parts.append(ArrayPart(name, a, None, -(-a.nbytes // PAGE_SIZE)))
                continue
            part = tr.written(name)
            parts.append(ArrayPart(name, a, None, -(-a.nbytes // PAGE_SIZE)) if base else part)
        return parts

    def _save_icechunk(self, store: IcechunkStore) -> Generation:
        arrays = self._arrays()
        for name in arrays:
            if "/" in name or name.startswith("__") or not name.strip("."):
                raise CheckpointError(f"{name!r} cannot name a Zarr array (no '/', no "
                                      "leading '__', not only dots)")
        if self._conflict is not None:
            raise CheckpointConflict(self._conflict.message, theirs=self._conflict.theirs,
                                     ours=self._conflict.ours)
        for name in [n for n in self._tracked if n not in arrays]:
            self._tracked.pop(name).close()
        base = self._last is None
        # The branch is checked before any tracker is reset: a refused save loses nothing.
        try:
            txn = store.begin(None if base else self._snapshot, self._writer)
        except CheckpointConflict as exc:
            self._conflict = exc
            raise
        if base:
            self._next = max(store.generations(), default=-1) + 1
        n = self._next
        try:
            parts = self._parts(arrays, base)
            sid, rec = txn.commit(generation=n, parent=None if base else self._last,
                                  time=_time.time(), writer=self._writer, parts=parts,
                                  checksum=self.checksum, page_size=PAGE_SIZE,
                                  previous=None if base else self._saved)
        except CheckpointConflict as exc:
            self._conflict = exc
            self._last = None
            raise
        except BaseException:
            self._last = None  # trackers may have been reset: only a base is right now
            raise
        self._snapshot = sid
        self._saved = {e["name"]: e for e in rec["arrays"]}
        self._last = n
        self._next = n + 1
        return _gen(rec)

    def generations(self) -> list[Generation]:
        """Every generation of the checkpoint, oldest first."""
        return generations(self._store)

    def load(self, generation: int = -1) -> dict[str, np.ndarray]:
        """:func:`load` of this checkpoint."""
        return load(self._store, generation)

    def compact(self, generation: int = -1, *, prune: bool = True) -> Generation:
        """:func:`compact` of this checkpoint (this object holds the lock it needs)."""
        if self._store is None:
            raise ValueError("this checkpoint is closed")
        g = _compact(_local(self._store, "compact"), generation, prune)
        if g.number == self._last:
            self._chain, self._chain_bytes = 0, 0
        return g

    def restore(self, generation: int = -1) -> int:
        """Put the live arrays back to a generation, rewriting only the pages that differ.

        Every array of the state must be in that generation with the same dtype, shape
        and order; nothing is written unless all are (and the generation loaded whole and
        checked).  The next save holds what the restore rewrote.

        Returns
        -------
        int
            Pages rewritten.

        Raises
        ------
        CheckpointError
            An array is missing from the generation or has another layout.
        CheckpointDamaged
            See :func:`load`.
        """
        saved = self.load(generation)
        arrays = self._arrays()
        for name, a in arrays.items():
            if name not in saved:
                raise CheckpointError(f"generation {generation} has no array {name!r}")
            if not same_layout(array_meta(a), array_meta(saved[name])):
                raise CheckpointError(
                    f"array {name!r} is {a.dtype}{list(a.shape)} now and "
                    f"{saved[name].dtype}{list(saved[name].shape)} in generation "
                    f"{generation}: restore into arrays of the saved layout (load() gives "
                    "new ones)")
            if not a.flags.writeable:
                raise CheckpointError(f"array {name!r} is read-only")
        return sum(_rewrite_differing(a, saved[name]) for name, a in arrays.items())

    # ---- life -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (the lock is released, nothing is tracked)."""
        return getattr(self, "_store", None) is None

    def close(self) -> None:
        """Stop tracking and release the checkpoint's lock (the files stay)."""
        for tr in self._tracked.values():
            tr.close()
        self._tracked.clear()
        if self._store is not None:
            self._store.unlock()
            self._store = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Checkpoint {self._store} last generation {self._last}>"


def _rewrite_differing(live: np.ndarray, saved: np.ndarray) -> int:
    """Copy ``saved`` over ``live`` page by page (pages of memory), only where they differ."""
    dst = flat_bytes(live)
    src = flat_bytes(saved)
    if not dst.size:
        return 0
    head = -dst.__array_interface__["data"][0] % PAGE_SIZE
    head = min(head, dst.size)
    pages = 0
    if head and not np.array_equal(dst[:head], src[:head]):
        dst[:head] = src[:head]
        pages += 1
    step = 4096 * PAGE_SIZE
    pos = head
    while pos < dst.size:
        end = min(pos + step, dst.size)
        full = (end - pos) // PAGE_SIZE * PAGE_SIZE
        if full:
            d = dst[pos:pos + full].reshape(-1, PAGE_SIZE)
            s = src[pos:pos + full].reshape(-1, PAGE_SIZE)
            rows = np.flatnonzero((d != s).any(axis=1))
            if len(rows):
                d[rows] = s[rows]
                pages += len(rows)
        if pos + full < end:
            t = slice(pos + full, end)
            if not np.array_equal(dst[t], src[t]):
                dst[t] = src[t]
                pages += 1
        pos = end
    return pages
