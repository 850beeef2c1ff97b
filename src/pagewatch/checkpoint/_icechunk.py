"""A checkpoint in an Icechunk repository: Zarr v3 arrays in object storage (or a folder).

Each array of the state is a Zarr v3 array of the repository's root group, with its dtype
and shape, chunked along its memory order (see :class:`ChunkGrid`) and stored raw (the
``bytes`` codec, after a ``transpose`` codec for Fortran-ordered arrays): a chunk's stored
bytes are a contiguous range of the array's memory.  A save is one Icechunk commit on one
branch that writes only the chunks holding a page written since the previous save; every
commit is a whole state (Icechunk keeps the chunks a commit did not write from its parent),
so loading any generation reads one state and there are no chains to compact.

The commit's metadata (``"pagewatch"``) says what the generation is: its number, time,
pages, bytes written, and per array its layout, the chunks written (as runs of chunk
indices) and a checksum of their bytes, which :func:`verify` checks.  Any Zarr reader
opens the arrays (``zarr.open_array(session.store, path=name)``) without pagewatch.

Limits
------
Icechunk is optimistic: several writers may commit to one branch, and a commit whose
parent is no longer the branch's tip fails.  A save also refuses (:class:`CheckpointConflict`)
when the branch moved since this object's previous save, before it resets any tracker, so a
delta is never committed on top of someone else's state.  A chunk is the unit of writing:
a written page costs its whole chunk (see ``chunk_bytes``).  :func:`load` checks layouts,
not chunk checksums (that is :func:`verify`'s work: it reads every chunk once).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import CheckpointConflict, CheckpointDamaged, CheckpointError
from ._format import ArrayPart, _hasher, array_meta, flat_bytes, make_array

__all__ = ["IcechunkStore", "ChunkGrid", "DEFAULT_CHUNK_BYTES", "is_icechunk"]

#: Chosen by measurement (README, "Checkpoints beyond one machine"): at 1 % of the pages
#: written at random, 8 KiB chunks send 2.3x the pages' bytes in as many requests as one
#: chunk per page (a save was 44x faster than a full write on a local S3 server; 16 KiB
#: chunks: 4.1x the bytes and 13x), and a full write needs half the requests of 4 KiB
#: chunks, whose manifest entries cost half the pages' bytes again.
DEFAULT_CHUNK_BYTES = 8 << 10
FORMAT = 1
#: chunk uploads in flight at once
CONCURRENCY = 64
_KEY = "pagewatch"
_URL = re.compile(r"^(s3)://([^/]+)/?(.*)$")
_S3_OPTIONS = ("region", "endpoint_url", "allow_http", "access_key_id", "secret_access_key",
               "session_token", "anonymous", "from_env", "force_path_style",
               "network_stream_timeout_seconds", "requester_pays")
_REPO_OPTIONS = ("max_tries", "initial_backoff_ms", "max_backoff_ms")
_OWN_OPTIONS = ("save_timeout",)
#: seconds a request of a save may wait for its answer (``save_timeout``)
SAVE_TIMEOUT = 60.0
EXTRA = "pip install 'pagewatch[icechunk]'"


def _modules() -> tuple[Any, Any]:
    try:
        import icechunk
        import zarr
    except ImportError as exc:
        raise CheckpointError(f"an Icechunk checkpoint needs the icechunk and zarr packages "
                              f"({exc.name} is missing): {EXTRA}") from None
    return icechunk, zarr


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


def is_icechunk(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an Icechunk checkpoint: an ``s3://`` URL, or a folder that
    holds an Icechunk repository (``refs/`` and ``snapshots/``, or a ``repo`` file)."""
    p = os.fspath(path)
    if _URL.match(p):
        return True
    return os.path.isdir(os.path.join(p, "refs")) and (
        os.path.isdir(os.path.join(p, "snapshots")) or os.path.isfile(os.path.join(p, "repo")))


def _why(exc: BaseException) -> str:
    """The gist of an Icechunk error (its text is a multi-line report)."""
    lines = [ln.strip(" |`-x>") for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("context:", "at ")) and
             not re.match(r"^\d+:", ln)]
    if not lines:
        return type(exc).__name__
    first, last = lines[0], lines[-1]
    return first if first == last or last in first else f"{first}: {last}"


def _missing(exc: BaseException) -> bool:
    s = str(exc)
    return any(w in s for w in ("NoSuchKey", "not found", "NotFound", "No such file"))


@dataclass(frozen=True)
class ChunkGrid:
    """How one array is cut into chunks: along its memory order, so each chunk is one
    contiguous byte range of the array.

    With the memory-order shape ``ms`` (the shape, reversed for a Fortran array), the chunk
    is ``(1, ..., 1, k, ms[j+1], ..., ms[-1])``: ``j`` is the first axis whose trailing
    block fits in ``target`` bytes and ``k`` splits ``ms[j]`` into the fewest equal parts of
    at most ``target`` bytes (the last chunk of each row is barely shorter).  A chunk is
    larger than ``target`` only when one element is.
    """

    mshape: tuple[int, ...]
    fortran: bool
    axis: int
    k: int
    inner: int  # bytes of one index along ``axis``
    row: int  # bytes of one index of the axes before ``axis``
    per_row: int  # chunks along ``axis``
    count: int  # chunks in all

    @classmethod
    def of(cls, shape: tuple[int, ...], itemsize: int, fortran: bool, target: int) -> ChunkGrid:
        ms = tuple(reversed(shape)) if fortran else tuple(shape)
        if not ms:
            return cls(ms, fortran, 0, 1, itemsize, itemsize, 1, 1)
        if 0 in ms:
            return cls(ms, fortran, 0, 1, 0, 0, 0, 0)
        inner = [math.prod(ms[i + 1:]) * itemsize for i in range(len(ms))]
        j = next((i for i in range(len(ms)) if inner[i] <= target), len(ms) - 1)
        parts = -(-ms[j] // max(1, target // inner[j]))  # of at most target bytes each
        k = -(-ms[j] // parts)
        per_row = -(-ms[j] // k)
        return cls(ms, fortran, j, k, inner[j], ms[j] * inner[j], per_row,
                   math.prod(ms[:j]) * per_row)

    @property
    def chunk_bytes(self) -> int:
        """Bytes of a full chunk (an edge chunk is stored padded to this size)."""
        return self.k * self.inner if self.mshape else self.inner

    def zarr_chunks(self) -> tuple[int, ...]:
        if not self.mshape:
            return ()
        if 0 in self.mshape:
            return tuple(max(1, n) for n in self.mshape)
        mem = (1,) * self.axis + (self.k,) + self.mshape[self.axis + 1:]
        return tuple(reversed(mem)) if self.fortran else mem

    def span(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges ``[lo, hi)`` of chunks ``q``."""
        lead, c = np.divmod(q, self.per_row)
        lo = lead * self.row + c * self.k * self.inner
        return lo, np.minimum(lo + self.k * self.inner, (lead + 1) * self.row)

    def of_bytes(self, x: np.ndarray) -> np.ndarray:
        """The chunk holding each byte offset ``x``."""
        lead, within = np.divmod(x, self.row)
        return lead * self.per_row + within // (self.k * self.inner)

    def dirty(self, runs: np.ndarray) -> np.ndarray:
        """Runs ``[first, end)`` of the chunks that hold any of the byte ``runs`` (sorted,
        disjoint), merged."""
        runs = np.asarray(runs, np.int64).reshape(-1, 2)
        if not len(runs) or not self.count:
            return np.empty((0, 2), np.int64)
        if not self.mshape:
            return np.array([[0, 1]], np.int64)
        qa = self.of_bytes(runs[:, 0])
        qb = self.of_bytes(runs[:, 1] - 1) + 1
        reach = np.maximum.accumulate(qb)
        new = np.ones(len(qa), bool)
        new[1:] = qa[1:] > reach[:-1]
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], len(qa)) - 1
        return np.stack([qa[starts], reach[ends]], axis=1)

    def key(self, name: str, q: int) -> str:
        """The Zarr v3 key (default chunk key encoding) of chunk ``q``."""
        if not self.mshape:
            return f"{name}/c"
        lead, c = divmod(q, self.per_row)
        coords = list(np.unravel_index(lead, self.mshape[:self.axis])) if self.axis else []
        mem = [*map(int, coords), c] + [0] * (len(self.mshape) - self.axis - 1)
        if self.fortran:
            mem.reverse()
        return name + "/c/" + "/".join(map(str, mem))


def _expand(runs: np.ndarray) -> np.ndarray:
    if not len(runs):
        return np.empty(0, np.int64)
    lengths = runs[:, 1] - runs[:, 0]
    offsets = np.repeat(runs[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(int(lengths.sum()), dtype=np.int64)


def _grid(entry: Mapping[str, Any]) -> ChunkGrid:
    dt = np.lib.format.descr_to_dtype(entry["descr"])
    return ChunkGrid.of(tuple(entry["shape"]), dt.itemsize, entry["fortran"],
                        entry["chunk_bytes"])


class IcechunkStore:
    """An Icechunk repository holding a checkpoint: ``s3://bucket/prefix`` or a local folder.

    Parameters
    ----------
    url
        ``s3://bucket/prefix`` (any S3-compatible service: give ``endpoint_url``) or the path
        of a folder (made if missing).
    storage_options
        For S3: ``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``,
        ``session_token``, ``anonymous``, ``from_env``, ``allow_http`` (default: true for an
        ``http://`` endpoint), ``force_path_style`` (default: true with an endpoint),
        ``network_stream_timeout_seconds``, ``requester_pays``; for any storage:
        ``max_tries``, ``initial_backoff_ms``, ``max_backoff_ms`` (Icechunk's retries);
        ``save_timeout`` (seconds, default 60): a request of a save (a chunk, the commit)
        that has no answer by then fails the save.  Icechunk's own
        ``network_stream_timeout_seconds`` does not cover a server that stops answering
        (paused, partitioned away): without this bound such a save would wait forever.
        Credentials not given come from the environment (``AWS_ACCESS_KEY_ID``, ...).
    branch
        The Icechunk branch the generations are committed to.
    chunk_bytes
        The target size of a chunk of an array written from now on (an existing array keeps
        the chunks it was created with until it is written whole again).

    Raises
    ------
    CheckpointError
        icechunk or zarr missing (names the extra to install), or a bad option.
    """

    def __init__(self, url: str | os.PathLike[str], *,
                 storage_options: Mapping[str, Any] | None = None, branch: str = "main",
                 chunk_bytes: int | None = None) -> None:
        ic, _ = _modules()
        self.url = os.fspath(url)
        self.branch = branch
        self.chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        if self.chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        opts = dict(storage_options or {})
        known = _S3_OPTIONS + _REPO_OPTIONS + _OWN_OPTIONS
        bad = sorted(set(opts) - set(known))
        if bad:
            raise CheckpointError(f"unknown storage option(s) {', '.join(bad)}: an Icechunk "
                                  f"checkpoint takes {', '.join(known)}")
        self.save_timeout = float(opts.pop("save_timeout", SAVE_TIMEOUT))
        retries = {k: opts.pop(k) for k in _REPO_OPTIONS if k in opts}
        m = _URL.match(self.url)
        if m:
            if opts.get("endpoint_url"):
                opts.setdefault("allow_http", str(opts["endpoint_url"]).startswith("http://"))
                opts.setdefault("force_path_style", True)
            self._storage = ic.s3_storage(bucket=m.group(2), prefix=m.group(3).strip("/") or None,
                                          **opts)
        else:
            if "://" in self.url:
                raise CheckpointError(f"{self.url}: an Icechunk checkpoint is an s3:// URL or "
                                      "a local folder")
            if opts:
                raise CheckpointError(f"storage options {', '.join(sorted(opts))} are for "
                                      "s3:// URLs, not a local folder")
            self.url = os.path.abspath(self.url)
            self._storage = ic.local_filesystem_storage(self.url)
        self._config = None
        if retries:
            self._config = ic.RepositoryConfig(storage=ic.StorageSettings(
                retries=ic.StorageRetriesSettings(**retries)))
        self._repo: Any = None

    def __str__(self) -> str:
        return self.url

    # ---- the repository -------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        ic, _ = _modules()
        try:
            return fn(*args, **kw)
        except ic.IcechunkError as exc:
            raise CheckpointError(f"{self.url}: {what} failed: {_why(exc)}") from exc

    def _await(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """``await fn(...)`` bounded by ``save_timeout`` (Icechunk waits forever on a server
        that stopped answering)."""
        ic, _ = _modules()

        async def go() -> Any:
            return await asyncio.wait_for(fn(*args, **kw), self.save_timeout)

        try:
            return _sync(go())
        except ic.IcechunkError as exc:
            raise CheckpointError(f"{self.url}: {what} failed: {_why(exc)}") from exc
        except (asyncio.TimeoutError, TimeoutError):
            raise CheckpointError(f"{self.url}: {what} had no answer within "
                                  f"{self.save_timeout:g} s (save_timeout): is the object "
                                  "store reachable?") from None

    def repository(self, create: bool = False) -> Any:
        """The ``icechunk.Repository`` (made when ``create`` and missing)."""
        if self._repo is not None:
            return self._repo
        ic, _ = _modules()
        if not create:
            # Reading: Icechunk's blocking calls.  Its async ones leave a task that may call
            # into Python after the interpreter finalised (a Rust panic, SIGABRT, at the exit
            # of a short-lived process such as the CLI); a save needs them for save_timeout.
            if not self._call("looking for the repository", ic.Repository.exists,
                              self._storage):
                raise CheckpointError(f"no checkpoint at {self.url} (no Icechunk repository)")
            self._repo = self._call("opening the repository", ic.Repository.open,
                                    self._storage, config=self._config)
            return self._repo
        if self._await("looking for the repository", ic.Repository.exists_async,
                       self._storage):
            self._repo = self._await("opening the repository", ic.Repository.open_async,
                                     self._storage, config=self._config)
        elif create:
            self._repo = self._await("creating the repository", ic.Repository.create_async,
                                     self._storage, config=self._config)
        else:
            raise CheckpointError(f"no checkpoint at {self.url} (no Icechunk repository)")
        return self._repo

    def exists(self) -> bool:
        ic, _ = _modules()
        return bool(self._call("looking for the repository", ic.Repository.exists,
                               self._storage))

    def lock(self) -> None:
        """Nothing: Icechunk's commits are optimistic (see the module's Limits)."""

    def unlock(self) -> None:
        pass

    def commits(self) -> list[tuple[str, dict[str, Any]]]:
        """``(snapshot id, record)`` of each pagewatch generation on the branch, oldest first."""
        repo = self.repository()

        def walk() -> list[tuple[str, dict[str, Any]]]:
            out = []
            for info in repo.ancestry(branch=self.branch):
                rec = (info.metadata or {}).get(_KEY)
                if isinstance(rec, dict) and "generation" in rec:
                    out.append((info.id, rec))
            return out[::-1]

        return list(self._call(f"reading the history of branch {self.branch!r}", walk))

    def generations(self) -> list[int]:
        return [rec["generation"] for _, rec in self.commits()]

    def records(self) -> list[dict[str, Any]]:
        return [rec for _, rec in self.commits()]

    def _find(self, generation: int) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        commits = self.commits()
        if not commits:
            raise CheckpointError(f"{self.url} holds no generation")
        have = [rec["generation"] for _, rec in commits]
        if generation < 0:
            if -generation > len(have):
                raise CheckpointError(f"{self.url} holds {len(have)} generations, not "
                                      f"{-generation}")
            i = len(have) + generation
        elif generation in have:
            i = have.index(generation)
        else:
            from . import _ranges
            raise CheckpointError(f"no generation {generation} in {self.url}: it holds "
                                  f"{_ranges(have)}")
        return commits[i][0], commits[i][1], [rec for _, rec in commits[:i + 1]]

    # ---- writing --------------------------------------------------------------------------
    def begin(self, expect: str | None, writer: str) -> _Save:
        """Open a writable session on the branch, refusing when its tip is not ``expect``
        (this writer's previous commit), unless the tip is this writer's own commit whose
        answer was lost."""
        repo = self.repository(create=True)
        session = self._await("opening a session", repo.writable_session_async, self.branch)
        tip = session.snapshot_id
        if expect is not None and tip != expect:
            info = self._await("reading the branch tip", repo.lookup_snapshot_async, tip)
            rec = (info.metadata or {}).get(_KEY) or {}
            if rec.get("writer") != writer:
                gen = rec.get("generation")
                what = f"generation {gen}" if gen is not None else f"snapshot {tip}"
                raise CheckpointConflict(
                    f"{self.url}: another writer committed {what} to branch {self.branch!r} "
                    "after this checkpoint's last save: nothing was written or reset.  Open a "
                    "new Checkpoint to continue from the branch's state (its first save "
                    "writes everything), or save to another branch", theirs=tip, ours=expect)
        return _Save(self, session)

    # ---- reading --------------------------------------------------------------------------
    def load(self, generation: int) -> dict[str, np.ndarray]:
        _, zarr = _modules()
        sid, rec, _ = self._find(generation)
        n = rec["generation"]
        repo = self.repository()
        session = self._call(f"checking out generation {n}", repo.readonly_session,
                             snapshot_id=sid)
        out: dict[str, np.ndarray] = {}
        for e in rec["arrays"]:
            out[e["name"]] = self._read_array(zarr, session.store, n, e)
        return out

    def _read_array(self, zarr: Any, store: Any, n: int, e: dict[str, Any]) -> np.ndarray:
        ic, _ = _modules()
        name = e["name"]
        want = make_array(e)
        try:
            z = zarr.open_array(store=store, path=name, mode="r")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise CheckpointDamaged(n, name, "metadata", f"no Zarr array {name!r} in its "
                                    f"snapshot ({exc})") from None
        except ic.IcechunkError as exc:
            raise CheckpointError(f"{self.url}: reading array {name!r} of generation {n} "
                                  f"failed: {_why(exc)}") from exc
        if tuple(z.shape) != want.shape or np.dtype(z.dtype).newbyteorder("=") != \
                want.dtype.newbyteorder("="):
            raise CheckpointDamaged(n, name, "metadata", f"the Zarr array is {z.dtype}"
                                    f"{list(z.shape)}, the generation says {want.dtype}"
                                    f"{list(want.shape)}")
        try:
            data = np.asarray(z[...])
        except ic.IcechunkError as exc:
            if _missing(exc):
                raise CheckpointDamaged(n, name, "data", f"a chunk is missing: {_why(exc)}"
                                        ) from None
            raise CheckpointError(f"{self.url}: reading array {name!r} of generation {n} "
                                  f"failed: {_why(exc)}") from exc
        want[...] = data
        return want

    def verify(self, checksum_of: Any = None) -> list[CheckpointDamaged]:
        """Read every chunk each generation wrote, once, against its checksum; a generation
        that needs a damaged one's chunks is named too (part ``chain``)."""
        ic, zarr = _modules()
        repo = self.repository()
        problems: list[CheckpointDamaged] = []
        bad: set[int] = set()
        since: dict[str, list[int]] = {}  # per array: generations since its last full write
        for sid, rec in self.commits():
            n = rec["generation"]
            session = self._call(f"checking out generation {n}", repo.readonly_session,
                                 snapshot_id=sid)
            mine: list[CheckpointDamaged] = []
            chain: CheckpointDamaged | None = None
            for e in rec["arrays"]:
                name = e["name"]
                try:
                    z = zarr.open_array(store=session.store, path=name, mode="r")
                    if list(z.shape) != list(e["shape"]):
                        raise CheckpointDamaged(n, name, "metadata", "the Zarr array's shape "
                                                f"{list(z.shape)} is not {e['shape']}")
                    self._check_chunks(session.store, n, e, rec)
                except CheckpointDamaged as exc:
                    mine.append(exc)
                except (FileNotFoundError, KeyError, ValueError) as exc:
                    mine.append(CheckpointDamaged(n, name, "metadata", f"no Zarr array: {exc}"))
                gens = since.setdefault(name, [])
                if e["kind"] == "full":
                    gens.clear()
                gens.append(n)
                hurt = sorted(set(gens[:-1]) & bad)
                if hurt and chain is None:
                    chain = CheckpointDamaged(n, name, "chain", "may hold chunks of damaged "
                                              f"generation {hurt[-1]}")
            for name in list(since):
                if name not in {e["name"] for e in rec["arrays"]}:
                    del since[name]
            if mine:
                problems.append(mine[0])
                bad.add(n)
            elif chain is not None:
                problems.append(chain)
                bad.add(n)
        return problems

    def _check_chunks(self, store: Any, n: int, e: dict[str, Any], rec: dict[str, Any]) -> None:
        ic, _ = _modules()
        from zarr.core.buffer import default_buffer_prototype

        grid = _grid(e)
        qs = _expand(np.asarray(e["chunks"], np.int64).reshape(-1, 2))
        lo, hi = grid.span(qs)
        h = _hasher(rec["checksum"])()
        proto = default_buffer_prototype()

        async def fetch_all(batch: range) -> list[Any]:
            return await asyncio.gather(*(store.get(grid.key(e["name"], int(qs[i])),
                                                    prototype=proto) for i in batch))

        for start in range(0, len(qs), 256):
            batch = range(start, min(start + 256, len(qs)))
            try:
                got = _sync(fetch_all(batch))
            except ic.IcechunkError as exc:
                if _missing(exc):
                    raise CheckpointDamaged(n, e["name"], "data", f"a chunk is missing: "
                                            f"{_why(exc)}") from None
                raise CheckpointError(f"{self.url}: reading generation {n} failed: "
                                      f"{_why(exc)}") from exc
            for i, buf in zip(batch, got, strict=True):
                if buf is None:
                    raise CheckpointDamaged(n, e["name"], "data", f"chunk {int(qs[i])} "
                                            f"({grid.key(e['name'], int(qs[i]))}) is missing")
                raw = buf.to_bytes()
                size = int(hi[i] - lo[i])
                if len(raw) < size:
                    raise CheckpointDamaged(n, e["name"], "data", f"chunk {int(qs[i])} holds "
                                            f"{len(raw)} bytes, not {size}")
                h.update(raw[:size])
        if h.hexdigest() != e["hash"]:
            raise CheckpointDamaged(n, e["name"], "data", f"checksum mismatch over the "
                                    f"{len(qs)} chunks it wrote")


class _Save:
    """One save in progress: a writable session; nothing is visible until :meth:`commit`."""

    def __init__(self, store: IcechunkStore, session: Any) -> None:
        self.store = store
        self.session = session
        self.parent = session.snapshot_id
        self.generation = -1

    def commit(self, *, generation: int, parent: int | None, time: float, writer: str,
               parts: list[ArrayPart], checksum: str, page_size: int,
               previous: Mapping[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]]:
        """Write each part's chunks and commit; ``previous``: the arrays of the generation
        this one builds on (``None``: a base on whatever the branch holds)."""
        ic, zarr = _modules()
        st = self.store
        self.generation = generation
        group = st._call("opening the root group", zarr.open_group, store=self.session.store,
                         mode="a")
        keep = {p.name for p in parts}
        old = previous if previous is not None else {
            k: {} for k in st._call("listing arrays", lambda: list(group.array_keys()))}
        entries = []
        total = 0
        try:
            for name in old:
                if name not in keep:
                    del group[name]
            for p in parts:
                e, sent = self._write(zarr, group, p, checksum,
                                      None if previous is None else previous.get(p.name))
                entries.append(e)
                total += sent
            # A commit needs a change, and a save with no page written has none: the root
            # group says which generation it is (a few bytes of metadata).
            group.attrs.update({_KEY: {"generation": generation, "format": FORMAT}})
        except ic.IcechunkError as exc:
            raise CheckpointError(f"{st.url}: saving generation {generation} failed, nothing "
                                  f"of it is committed: {_why(exc)}") from exc
        rec = {"format": FORMAT, "generation": generation, "parent": parent, "time": time,
               "page_size": page_size, "checksum": checksum, "writer": writer,
               "kind": "base" if parent is None else "delta", "nbytes": total,
               "pages": sum(p.pages for p in parts), "arrays": entries}
        async def commit() -> str:
            return str(await asyncio.wait_for(self.session.commit_async(
                f"pagewatch generation {generation}", metadata={_KEY: rec}), st.save_timeout))

        try:
            sid = _sync(commit())
        except (asyncio.TimeoutError, TimeoutError):
            raise CheckpointError(f"{st.url}: committing generation {generation} had no "
                                  f"answer within {st.save_timeout:g} s (save_timeout): the "
                                  "branch holds the previous generations; whether this one "
                                  "was committed, generations() tells once the object store "
                                  "answers") from None
        except ic.ConflictError as exc:
            raise CheckpointConflict(
                f"{st.url}: another writer committed to branch {st.branch!r} while "
                f"generation {generation} was being saved (Icechunk: {_why(exc)}): this save "
                "is not committed; the other writer's generations are intact.  Open a new "
                "Checkpoint to continue from the branch's state",
                theirs=getattr(exc, "actual_parent", None), ours=self.parent) from None
        except ic.IcechunkError as exc:
            raise CheckpointError(f"{st.url}: committing generation {generation} failed: "
                                  f"{_why(exc)}.  The branch holds the previous generations; "
                                  "whether this one was committed before the failure, "
                                  "generations() tells") from exc
        return sid, rec

    def _write(self, zarr: Any, group: Any, p: ArrayPart, checksum: str,
               prev: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
        a = p.array
        meta = array_meta(a)
        full = p.runs is None or prev is None or not all(
            prev.get(k) == meta[k] for k in ("descr", "shape", "fortran", "nbytes"))
        chunk_bytes = self.store.chunk_bytes if full else prev["chunk_bytes"]  # type: ignore[index]
        fortran = meta["fortran"] and a.ndim > 1
        grid = ChunkGrid.of(a.shape, a.dtype.itemsize, fortran, chunk_bytes)
        if full:
            if p.name in group:
                del group[p.name]
            self._create(zarr, group, p.name, a, grid)
            chunks = np.array([[0, grid.count]], np.int64) if grid.count else np.empty((0, 2),
                                                                                       np.int64)
        else:
            chunks = grid.dirty(p.runs)  # type: ignore[arg-type]
        h = _hasher(checksum)()
        sent = self._upload(p.name, flat_bytes(a), grid, _expand(chunks), h)
        e = {"name": p.name, **meta, "fortran": meta["fortran"], "kind": "full" if full else "delta",
             "pages": p.pages, "chunk_bytes": chunk_bytes,
             "chunks": chunks.tolist(), "hash": h.hexdigest()}
        return e, sent

    def _create(self, zarr: Any, group: Any, name: str, a: np.ndarray, grid: ChunkGrid) -> None:
        from zarr.codecs import BytesCodec, TransposeCodec

        filters = []
        if grid.fortran:
            filters = [TransposeCodec(order=tuple(range(a.ndim))[::-1])]
        kw: dict[str, Any] = {}
        if a.dtype.byteorder == ">":
            kw["serializer"] = BytesCodec(endian="big")
        try:
            z = group.create_array(name, shape=a.shape, dtype=a.dtype,
                                   chunks=grid.zarr_chunks(), filters=filters,
                                   compressors=None, fill_value=None, **kw)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"array {name!r} ({a.dtype}) cannot be a Zarr v3 array: "
                                  f"{exc}") from None
        codecs = [c["name"] for c in z.metadata.to_dict()["codecs"]]
        if codecs not in (["bytes"], ["transpose", "bytes"]):
            raise CheckpointError(f"array {name!r} ({a.dtype}) would be stored with codecs "
                                  f"{codecs}: pagewatch writes raw chunks only")

    def _upload(self, name: str, flat: np.ndarray, grid: ChunkGrid, qs: np.ndarray,
                h: Any) -> int:
        from zarr.core.buffer import cpu

        if not len(qs):
            return 0
        lo, hi = grid.span(qs)
        full = grid.chunk_bytes
        store = self.session.store
        it = iter(range(len(qs)))
        sent = 0

        def payload(i: int) -> bytes:
            b = flat[int(lo[i]):int(hi[i])]
            h.update(b)  # in chunk order: payloads are made in order, one at a time
            raw = b.tobytes()
            if len(raw) < full:
                raw += bytes(full - len(raw))
            return raw

        async def worker() -> None:
            nonlocal sent
            for i in it:
                raw = payload(i)
                sent += len(raw)
                await asyncio.wait_for(store.set(grid.key(name, int(qs[i])),
                                                 cpu.Buffer.from_bytes(raw)),
                                       self.store.save_timeout)

        async def run() -> None:
            await asyncio.gather(*(worker() for _ in range(min(CONCURRENCY, len(qs)))))

        try:
            _sync(run())
        except (asyncio.TimeoutError, TimeoutError):
            raise self.timed_out("writing a chunk") from None
        return sent

    def timed_out(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.store.url}: saving generation {self.generation} failed, "
                               f"nothing of it is committed: {what} had no answer within "
                               f"{self.store.save_timeout:g} s (save_timeout): is the object "
                               "store reachable?")


def iter_records(store: IcechunkStore) -> Iterator[dict[str, Any]]:
    """Each generation's record in the shape ``pagewatch checkpoint ls`` prints."""
    for sid, rec in store.commits():
        r = dict(rec)
        r["snapshot"] = sid
        r["compression"] = "none"
        r["arrays"] = [dict(e, kind="delta" if e["kind"] == "delta" else "full")
                       for e in rec["arrays"]]
        yield r


def new_writer() -> str:
    return uuid.uuid4().hex
