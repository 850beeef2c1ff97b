"""One generation of a checkpoint as bytes: writing it in one pass and reading it back.

The layout (README, "Checkpoints") is::

    preamble   16 bytes   b"PWCKGEN\\0", u32 format version, u32 generation number
    sections   per array: its runs (int64 [start, end) byte ranges, little-endian; absent for
               a full entry) then its data (the bytes of those runs, one after the other,
               or one zstd frame of them)
    index      UTF-8 JSON: generation, parent, time, page size, checksum and compression
               names, and per array: name, dtype descr, shape, order, byte size, kind
               ("full" or "delta"), and the offset, length and checksum of its runs and data;
               padded with spaces so the file's length is a multiple of 4 KiB
    trailer    24 bytes   u64 index offset, u32 index length, u32 CRC32 of the index,
               b"PWCKEND\\0"

The index comes last so the file is written in one pass (it holds the data's checksums); a
reader starts from the trailer.  Nothing here knows where the bytes live: a store hands in
a writer (``write``) or a reader (``size``, ``pread_into``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import _native
from ._errors import CheckpointDamaged, CheckpointError

__all__ = ["ArrayPart", "write_generation", "read_index", "read_entry", "check_entry",
           "default_checksum", "CHECKSUMS", "COMPRESSIONS"]

MAGIC = b"PWCKGEN\0"
END_MAGIC = b"PWCKEND\0"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
TRAILER = struct.Struct("<QII8s")
#: bytes copied (and hashed, and compressed) at a time: small enough to stay in cache
CHUNK = 1 << 20
#: pages put into a direct writer's block at a time (its first write goes out sooner)
PIECE = 64
#: a file's length is a multiple of this (the index is padded with spaces)
ALIGN = 4096

CHECKSUMS = ("crc32", "xxh3_64")
COMPRESSIONS = ("none", "zstd")


# ---- checksums and compression ------------------------------------------------------------

class _Hash(Protocol):
    def update(self, data: Any) -> None: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _Behind:
    """A checksum computed by a thread of its own, a chunk or more behind the reads that
    feed it: both release the GIL, so with a second CPU the hash (xxh3: ~66 ms of CPU per
    GiB here) overlaps the reads (the bench's 1 GiB chain loaded in 1.33x ``np.load``'s
    time, 1.37-1.54x with the hash in line).  The chunks fed must stay untouched until
    :meth:`hexdigest` (they are the destination's)."""

    #: entries from this size on.  Measured here (a base of N MiB loaded, 15 interleaved
    #: loads each way, thread ÷ in line): 4 MiB 1.34, 8 MiB 1.22, 16 MiB 1.14, 32 MiB 1.03,
    #: 64 MiB 1.00, 128 MiB 0.98, 256 MiB 0.97, 512 MiB 1.02 (and the 1 GiB bench above)
    MIN = 64 << 20

    def __init__(self, h: _Hash) -> None:
        self._h = h
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pagewatch-checksum",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._h.update(data)
                except BaseException as exc:  # noqa: BLE001 - raised by hexdigest
                    self._error = exc

    def update(self, data: Any) -> None:
        self._q.put(data)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.stop()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()


def _hasher(name: str) -> Callable[[], _Hash]:
    if name == "crc32":
        return _Crc32
    if name == "xxh3_64":
        try:
            import xxhash
        except ImportError:
            raise CheckpointError(
                "this checkpoint's checksums are xxh3, which needs the xxhash package: "
                "pip install 'pagewatch[xxh3]' (or load with verify=False)") from None
        return xxhash.xxh3_64
    raise CheckpointError(f"unknown checksum {name!r}: this pagewatch knows {CHECKSUMS}")


def default_checksum() -> str:
    """``"xxh3_64"`` when the xxhash package is installed (4-10x faster than zlib's CRC32,
    which decides how fast a large generation loads), else ``"crc32"``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise CheckpointError(
            "zstd compression needs the zstandard package: pip install 'pagewatch[zstd]'"
        ) from None
    return zstandard


def check_options(checksum: str, compression: str) -> None:
    """Fail before any work when a checksum or compression cannot be used here."""
    _hasher(checksum)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if compression == "zstd":
        _zstd()


# ---- writing ------------------------------------------------------------------------------

class Writer(Protocol):
    """Where a generation's bytes go.  One may also have ``reserve()`` and ``advance(n)``
    (see :class:`~pagewatch.checkpoint.GenerationWriter`): then the bytes are put straight
    into its buffer; and ``expect(n)``: told first how many bytes will come, less the index."""

    def write(self, data: Any) -> None: ...


@dataclass
class ArrayPart:
    """One array's part of a generation: all of it (``runs is None``) or some byte runs."""

    name: str
    array: np.ndarray
    runs: np.ndarray | None  # int64 (n, 2) [start, end) byte ranges, sorted and disjoint
    pages: int
    #: where a delta's bytes are gathered from, a page at a time: the memory pages under the
    #: array as (npages, page_size) uint8, the indices of the pages written (ascending),
    #: and the bytes of the first and last page that are not the array's
    gather: tuple[np.ndarray, np.ndarray, int, int] | None = None


def flat_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of a contiguous array, in memory order, as a 1-D uint8 view (no copy)."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        raise ValueError("a checkpointed array must be contiguous (C or Fortran order)")
    return a.ravel(order="K").view(np.uint8)


def array_meta(a: np.ndarray) -> dict[str, Any]:
    """What the index says of an array besides its bytes."""
    if a.dtype.hasobject:
        raise ValueError(f"arrays of Python objects ({a.dtype}) cannot be checkpointed")
    fortran = bool(a.flags.f_contiguous and not a.flags.c_contiguous)
    return {"descr": np.lib.format.dtype_to_descr(a.dtype), "shape": list(a.shape),
            "fortran": fortran, "nbytes": int(a.nbytes)}


def write_generation(out: Writer, *, generation: int, parent: int | None, time: float,
                     page_size: int, parts: list[ArrayPart], checksum: str,
                     compression: str) -> dict[str, Any]:
    """Write one generation to ``out``; returns its index (what :func:`read_index` gives).

    The bytes of each run are copied out of the live array a chunk at a time and the
    checksum is taken over that copy, so the file agrees with itself even if a writer
    changes the array meanwhile (the data is then that of some instant during the save).
    """
    new_hash = _hasher(checksum)
    pos = 0
    sink: Any = out  # reserve() and advance() are optional
    inplace = callable(getattr(sink, "reserve", None)) and sink.reserve() is not None

    def emit(data: Any) -> None:
        nonlocal pos
        out.write(data)
        pos += len(memoryview(data).cast("B"))

    expect = getattr(sink, "expect", None)
    if callable(expect) and compression == "none":
        # What follows, less the index (known exactly: not compressed): room made at once
        expect(PREAMBLE.size + sum(
            flat_bytes(p.array).size if p.runs is None
            else 16 * len(p.runs) + int((p.runs[:, 1] - p.runs[:, 0]).sum()) for p in parts))
    emit(PREAMBLE.pack(MAGIC, VERSION, generation))
    entries = []
    buf = np.empty(CHUNK, np.uint8)
    for part in parts:
        flat = flat_bytes(part.array)
        entry: dict[str, Any] = {"name": part.name, **array_meta(part.array),
                                 "kind": "full" if part.runs is None else "delta",
                                 "pages": int(part.pages)}
        if part.runs is None:
            runs = np.array([[0, flat.size]], np.int64) if flat.size else np.empty((0, 2), np.int64)
            entry["runs"] = None
        else:
            runs = np.ascontiguousarray(part.runs, dtype=np.int64).reshape(-1, 2)
            raw = runs.astype("<i8").tobytes()
            h = new_hash()
            h.update(raw)
            entry["runs"] = {"offset": pos, "count": len(runs), "length": len(raw),
                             "hash": h.hexdigest()}
            emit(raw)
        h = new_hash()
        start = pos
        comp = _zstd().ZstdCompressor(level=3).compressobj() if compression == "zstd" else None
        # In place: the bytes go straight into the writer's own buffer (direct I/O), hashed
        # there; else through a buffer of ours and ``out.write``.
        direct = inplace and comp is None

        def store(chunk: Any, h: _Hash = h, comp: Any = comp) -> None:
            data = comp.compress(chunk) if comp is not None else chunk
            if len(data):
                h.update(data)
                emit(data)

        def put(src: np.ndarray, h: _Hash = h) -> None:
            """Copy ``src`` (contiguous bytes) into the writer's buffer, hashed there."""
            nonlocal pos
            while src.size:
                room = sink.reserve()
                n = min(room.size, src.size)
                room[:n] = src[:n]
                h.update(room[:n])
                sink.advance(n)
                pos += n
                src = src[n:]

        raw_len = int((runs[:, 1] - runs[:, 0]).sum())
        if part.gather is not None:
            # Whole pages, many at a time (one gather each), less the bytes of the first and
            # last page that lie outside the array: the bytes of the runs, in order.
            mem, idx, head, tail = part.gather
            ps = mem.shape[1]
            left = raw_len
            i, stop = 0, len(idx)
            if stop and head and idx[0] == 0:  # page 0 starts before the array
                first = mem[0, head:][:left]
                put(first) if direct else store(first.data)
                left -= first.size
                i = 1
            if stop > i and tail and idx[-1] == mem.shape[0] - 1:  # it ends before the page
                stop -= 1
            while i < stop:
                if direct:
                    room = sink.reserve()
                    m = min(stop - i, room.size // ps, PIECE)
                    if m == 0:  # less than a page left in the writer's block
                        put(mem[idx[i]])
                        left -= ps
                        i += 1
                        continue
                else:
                    room = buf
                    m = min(stop - i, CHUNK // ps)
                dst = room[:m * ps].reshape(m, ps)
                np.take(mem, idx[i:i + m], axis=0, out=dst, mode="clip")  # clip: unbuffered
                if direct:
                    h.update(dst)
                    sink.advance(m * ps)
                    pos += m * ps
                else:
                    store(room[:m * ps].data)  # 1-D: a writer may count its len()
                left -= m * ps
                i += m
            if i < len(idx):  # the last page, up to the end of the array
                last = mem[idx[i], :left]
                put(last) if direct else store(last.data)
                left -= last.size
            if left != 0:
                raise AssertionError(f"{part.name}: gathered pages disagree with the runs")
        elif direct:
            for s, e in runs.tolist():
                put(flat[s:e])
        else:
            fill = 0
            for s, e in runs.tolist():
                while s < e:
                    n = min(e - s, CHUNK - fill)
                    buf[fill:fill + n] = flat[s:s + n]
                    fill += n
                    s += n
                    if fill == CHUNK:
                        store(buf.data)
                        fill = 0
            if fill:
                store(buf[:fill].data)
        if comp is not None:
            tail = comp.flush()
            if tail:
                h.update(tail)
                emit(tail)
        entry["data"] = {"offset": start, "length": pos - start, "raw_length": raw_len,
                         "hash": h.hexdigest()}
        entries.append(entry)
    index = {"format": "pagewatch-checkpoint", "version": VERSION, "generation": generation,
             "parent": parent, "time": time, "page_size": page_size, "checksum": checksum,
             "compression": compression, "arrays": entries,
             "pages": int(sum(e["pages"] for e in entries))}
    blob = json.dumps(index, separators=(",", ":")).encode()
    # Spaces (still JSON) so the file ends on a 4 KiB boundary: a direct write's last block
    # is then the file's end, with no zeros past it to cut off (an ftruncate per save)
    blob += b" " * (-(pos + len(blob) + TRAILER.size) % ALIGN)
    index_at = pos
    emit(blob)
    emit(TRAILER.pack(index_at, len(blob), zlib.crc32(blob), END_MAGIC))
    index["nbytes"] = pos
    return index


# ---- reading ------------------------------------------------------------------------------

class Reader(Protocol):
    def size(self) -> int: ...
    def pread_into(self, offset: int, buf: memoryview) -> None: ...


def _pread(r: Reader, offset: int, n: int) -> bytes:
    b = bytearray(n)
    r.pread_into(offset, memoryview(b))
    return bytes(b)


def read_index(r: Reader, generation: int) -> dict[str, Any]:
    """The index of generation ``generation`` held by ``r``, its framing checked.

    Raises
    ------
    CheckpointDamaged
        The preamble, trailer or index is damaged or the file is cut short.
    """
    def bad(part: str, why: str) -> CheckpointDamaged:
        return CheckpointDamaged(generation, None, part, why)

    size = r.size()
    if size < PREAMBLE.size + TRAILER.size:
        raise bad("file", f"only {size} bytes: cut short")
    magic, version, number = PREAMBLE.unpack(_pread(r, 0, PREAMBLE.size))
    if magic != MAGIC:
        raise bad("preamble", "not a pagewatch generation file (bad magic)")
    if version != VERSION:
        raise bad("preamble", f"format version {version}, this pagewatch reads {VERSION}")
    if number != generation:
        raise bad("preamble", f"the file says it is generation {number}")
    at, length, crc, end = TRAILER.unpack(_pread(r, size - TRAILER.size, TRAILER.size))
    if end != END_MAGIC:
        raise bad("trailer", "no end marker: the file is cut short or damaged")
    if not PREAMBLE.size <= at or at + length != size - TRAILER.size:
        raise bad("trailer", f"index at {at}+{length} does not end where the trailer starts")
    blob = _pread(r, at, length)
    if zlib.crc32(blob) != crc:
        raise bad("index", "checksum mismatch")
    try:
        index: dict[str, Any] = json.loads(blob)
        arrays = index["arrays"]
        ok = (index.get("format") == "pagewatch-checkpoint" and index["generation"] == generation
              and isinstance(arrays, list))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise bad("index", "not a valid index")
    for e in arrays:
        for part in ("runs", "data"):
            sec = e.get(part)
            if sec is not None and not (PREAMBLE.size <= sec["offset"]
                                        and sec["offset"] + sec["length"] <= at):
                raise CheckpointDamaged(generation, e["name"], part, "lies outside the file")
    index["nbytes"] = size
    return index


def _dtype(entry: dict[str, Any]) -> np.dtype:
    return np.lib.format.descr_to_dtype(entry["descr"])


def make_array(entry: dict[str, Any]) -> np.ndarray:
    """An uninitialised array with the entry's dtype, shape and order."""
    return np.empty(tuple(entry["shape"]), _dtype(entry),
                    order="F" if entry["fortran"] else "C")


def same_layout(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("descr", "shape", "fortran", "nbytes"))


def _read_runs(r: Reader, generation: int, entry: dict[str, Any], new_hash: Any,
               verify: bool) -> np.ndarray:
    name = entry["name"]
    if entry["runs"] is None:
        n = entry["nbytes"]
        return np.array([[0, n]], np.int64) if n else np.empty((0, 2), np.int64)
    sec = entry["runs"]
    raw = _pread(r, sec["offset"], sec["length"])
    if verify:
        h = new_hash()
        h.update(raw)
        if h.hexdigest() != sec["hash"]:
            raise CheckpointDamaged(generation, name, "runs", "checksum mismatch")
    if sec["length"] != 16 * sec["count"]:
        raise CheckpointDamaged(generation, name, "runs", "wrong length")
    runs = np.frombuffer(raw, "<i8").reshape(-1, 2).astype(np.int64)
    if len(runs) and not (runs[0, 0] >= 0 and runs[-1, 1] <= entry["nbytes"]
                          and (runs[:, 1] > runs[:, 0]).all()
                          and (runs[1:, 0] >= runs[:-1, 1]).all()):
        raise CheckpointDamaged(generation, name, "runs", "runs out of order or out of the array")
    return runs


def read_entry(r: Reader, index: dict[str, Any], entry: dict[str, Any], dest: np.ndarray | None,
               verify: bool = True) -> None:
    """Apply one array's part of a generation onto ``dest`` (its bytes, 1-D uint8).

    A full entry is read straight into ``dest``; a delta's data is read and checked before
    anything of it is written.  ``dest=None`` only checks.  Damage raises
    :class:`CheckpointDamaged` (``dest`` then holds garbage: the caller drops it).
    """
    generation = index["generation"]
    name = entry["name"]
    new_hash = _hasher(index["checksum"]) if verify else None
    runs = _read_runs(r, generation, entry, new_hash, verify)
    sec = entry["data"]
    raw_len = int((runs[:, 1] - runs[:, 0]).sum())
    if sec["raw_length"] != raw_len:
        raise CheckpointDamaged(generation, name, "data", "size disagrees with its runs")
    zstd = index["compression"] == "zstd"
    if not zstd and sec["length"] != raw_len:
        raise CheckpointDamaged(generation, name, "data", "wrong length")
    whole = entry["runs"] is None and not zstd and dest is not None
    # A full, uncompressed entry goes straight into dest; a delta through a buffer, checked
    # before it is scattered; a check alone (dest None) keeps nothing.
    target: np.ndarray | None = (dest if whole else
                                 None if dest is None else np.empty(raw_len, np.uint8))
    h = new_hash() if new_hash is not None else None
    if (h is not None and target is not None and not zstd and raw_len >= _Behind.MIN
            and (os.cpu_count() or 1) > 1):
        with contextlib.suppress(RuntimeError):  # no thread (interpreter exit): in line
            h = _Behind(h)  # it hashes what was read into target while the next is read
    dec = _zstd().ZstdDecompressor().decompressobj() if zstd else None
    got = 0
    off = sec["offset"]
    left = sec["length"]
    chunk = np.empty(CHUNK, np.uint8) if dec is not None or target is None else None
    try:
        while left:
            n = min(left, CHUNK)
            if dec is None:
                view = chunk[:n] if target is None else target[got:got + n]  # type: ignore[index]
                r.pread_into(off, view.data)
                if h is not None:
                    h.update(view)
                got += n
            else:
                assert chunk is not None
                r.pread_into(off, chunk[:n].data)
                if h is not None:
                    h.update(chunk[:n])
                out = dec.decompress(chunk[:n].tobytes())
                if got + len(out) > raw_len:
                    raise CheckpointDamaged(generation, name, "data", "decompresses too long")
                if target is not None:
                    target[got:got + len(out)] = np.frombuffer(out, np.uint8)
                got += len(out)
            off += n
            left -= n
    except CheckpointDamaged:
        raise
    except Exception as exc:  # noqa: BLE001 - the decompressor's errors have no common base
        if dec is None:
            raise
        raise CheckpointDamaged(generation, name, "data", f"cannot decompress: {exc}") from None
    finally:
        if isinstance(h, _Behind):
            h.stop()  # on an error too: no thread left reading memory the caller drops
    if h is not None and h.hexdigest() != sec["hash"]:
        raise CheckpointDamaged(generation, name, "data", "checksum mismatch")
    if got != raw_len:
        raise CheckpointDamaged(generation, name, "data", f"{got} bytes where {raw_len} belong")
    if dest is None or whole or target is None:
        return
    if not dest.flags.writeable:
        raise ValueError("dest is read-only")
    _native.scatter_runs(dest.ctypes.data, target, runs, dest.size)


def check_entry(r: Reader, index: dict[str, Any], entry: dict[str, Any]) -> None:
    """Re-check every checksum of one array's part (nothing is kept)."""
    read_entry(r, index, entry, None, verify=True)
