"""Where a checkpoint's generations live.

:class:`Store` is what the checkpoint needs of a place: list the committed generations,
read one, commit a new one (all or nothing), replace one (compaction), remove one, and keep
other writers out.  :class:`LocalStore` is a directory of a local file system, one file per
generation; another store (an object store, Icechunk) implements the same methods.

Why a directory of files and no manifest: a generation becomes visible by one ``rename``
of a complete, fsync'ed file, so the directory listing *is* the list of committed
generations; a save costs two fsyncs (the file, then the directory), compaction replaces one
file the same way, and pruning deletes files.  An append-only single file would need a
header rewrite per save and could not give back the space of pruned generations.

Why a delta is written with direct I/O (``O_DIRECT``): through the page cache, each of its
pages takes a page of memory the kernel has not used lately; on a virtual machine whose host
takes back the guest's free memory (Firecracker with free page reporting, as here) the first
touch of such a page costs ~10 us, so a 1 % save of 1 GiB spent 26 of its 31 ms copying
into the page cache.  Direct I/O writes from blocks of this process's own memory, reused
from save to save (``_Staged``); the file's room is allocated first and the blocks are
queued by Linux AIO as they fill, up to 16 in flight (a thread calling ``pwrite`` kept one
in flight: the same save took 8-9 ms, 6-7.5 ms now, its 10 MiB alone 3.6 ms of disk time).
A base goes through the page cache, like ``np.save``'s file: every load of its chain reads
it whole.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import mmap
import os
import re
from types import TracebackType
from typing import Any

import numpy as np

from .. import _native
from ._errors import CheckpointError

__all__ = ["Store", "LocalStore", "GenerationReader", "GenerationWriter"]


class GenerationReader(abc.ABC):
    """Random access to one committed generation's bytes."""

    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def pread_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; a file cut short raises ``EOFError``."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self) -> GenerationReader:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class GenerationWriter(abc.ABC):
    """A generation being written: invisible until :meth:`commit` returns."""

    @abc.abstractmethod
    def write(self, data: Any) -> None: ...

    def reserve(self) -> np.ndarray | None:
        """Where the next bytes may be put in place instead of through :meth:`write`: a
        writable uint8 array (at least a page), or ``None`` (the default: write only).
        What is put there is written by :meth:`advance`."""
        return None

    def advance(self, n: int) -> None:
        """The first ``n`` bytes of the last :meth:`reserve` are the next bytes of the file."""
        raise NotImplementedError("this writer reserves nothing")

    def expect(self, nbytes: int) -> None:  # noqa: B027 - optional
        """About ``nbytes`` will be written in all (a hint: room may be made ahead)."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the generation durable and visible, in one step."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was written."""


class Store(abc.ABC):
    """The place a checkpoint lives in."""

    @abc.abstractmethod
    def generations(self) -> list[int]:
        """The committed generation numbers, ascending."""

    @abc.abstractmethod
    def open(self, generation: int) -> GenerationReader: ...

    @abc.abstractmethod
    def create(self, generation: int, replace: bool = False, *,
               delta: bool = False) -> GenerationWriter:
        """A writer for a new generation (``replace``: for one that exists, compaction;
        ``delta``: it holds only the pages written since its parent, a hint)."""

    @abc.abstractmethod
    def remove(self, generation: int) -> None: ...

    def prefetch(self, generation: int) -> None:  # noqa: B027 - optional
        """Start bringing a generation's bytes near (advice: a load will read them soon);
        may block a while, never fails.  The default does nothing."""

    @abc.abstractmethod
    def lock(self) -> None:
        """Become the only writer, or raise :class:`CheckpointError`."""

    @abc.abstractmethod
    def unlock(self) -> None: ...

    @abc.abstractmethod
    def exists(self) -> bool: ...

    def __str__(self) -> str:
        return type(self).__name__


_NAME = re.compile(r"^(\d{8,})\.pwg$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileReader(GenerationReader):
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    def size(self) -> int:
        return self._size

    def pread_into(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B")
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise EOFError(f"cut short at {offset + done}")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


#: a direct-I/O block: page-aligned memory, a multiple of any logical block size in use
BLOCK = 1 << 20
#: what a direct write's offset and length are rounded to
ALIGN = 4096
#: the first write goes out once this much is filled, so the disk starts sooner
FIRST = 256 << 10
#: blocks, so writes in flight, at most.  Measured here (tests/evidence/checkpoint_depth.py,
#: a 1 % save of 1 GiB, 10 MiB): 7.4-7.5 ms with 16, 7.3-7.5 with 8, 8.0-8.1 with 4,
#: 8.5-8.6 with 2, 10.3-10.8 with none (in line)
DEPTH = 16


class _Aio:
    """This process's Linux AIO context: ``io_submit`` queues a direct write and returns, so
    the disk has several at once while the saver fills the next block, and no thread of
    ours runs beside the saver.  Made at first use in each process (a fork's child cannot
    use its parent's); where there is none (a kernel without ``CONFIG_AIO``, ``aio-max-nr``
    reached, a seccomp filter) :meth:`open` says False and the saver writes in line."""

    def __init__(self) -> None:
        self._ctx: int | None = None
        self._pid = 0

    def open(self) -> bool:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                self._ctx = _native.aio_setup(DEPTH)
            except OSError:
                self._ctx = None
        return self._ctx is not None

    def submit(self, fd: int, block: np.ndarray, offset: int, tag: int) -> None:
        """Queue the write of ``block`` at ``offset``; it must stay unchanged until reaped."""
        assert self._ctx is not None
        _native.aio_pwrite(self._ctx, fd, block, offset, tag)

    def reap(self, wait: int, interruptible: bool = True) -> list[tuple[int, int]]:
        """At least ``wait`` completions, as ``(tag, bytes written or -errno)``."""
        assert self._ctx is not None
        return _native.aio_reap(self._ctx, wait, DEPTH, interruptible)

    def close(self) -> None:
        """Wait for every write in flight and drop the context (and its completions not
        reaped); the next :meth:`open` makes a new one."""
        ctx, mine = self._ctx, self._pid == os.getpid()
        self._ctx, self._pid = None, 0  # first: an interrupt below leaves no dead context
        if ctx is not None and mine:
            with contextlib.suppress(OSError):
                _native.aio_destroy(ctx)


class _Staged:
    """The bytes of one file gathered in the store's page-aligned blocks, each written with
    ``O_DIRECT`` through AIO while the next ones fill (in line where there is no AIO); a
    block is refilled only once its write has completed.  A write the file system refuses
    (``EINVAL``: direct I/O unsupported, or a larger block size) clears ``O_DIRECT`` and is
    redone through the page cache: the file is the same bytes either way."""

    def __init__(self, fd: int, store: LocalStore) -> None:
        self._fd = fd
        self._store = store
        self._aio = store._aio if store._aio.open() else None
        self._depth = DEPTH if self._aio is not None else 2
        self._cur = 0
        self._fill = 0
        self.length = 0  # bytes handed out to be written so far
        self._end = 0  # the file's size: allocated ahead or written, whichever is further
        # block -> (offset, bytes, O_DIRECT or not) in flight
        self._busy: dict[int, tuple[int, int, bool]] = {}
        self._direct = True  # the file was opened with O_DIRECT; cleared on a refusal
        self._error: BaseException | None = None

    def expect(self, nbytes: int) -> None:
        """About ``nbytes`` will be written: allocate the file's blocks for them now.  A
        direct write inside the file goes to the disk beside the others; one extending it
        runs in ``io_submit``, in line (ext4 takes its lock exclusive for those)."""
        n = nbytes - nbytes % ALIGN
        if n > self._end:
            try:
                _native.fallocate(self._fd, 0, self._end, n - self._end)
            except OSError:  # EOPNOTSUPP and the like: the writes extend the file instead
                # (ENOSPC part way: ext4 keeps what it allocated, and the size with it)
                self._end = max(self._end, os.fstat(self._fd).st_size)
                return
            self._end = n

    def reserve(self) -> np.ndarray:
        return self._store._block(self._cur)[self._fill:]

    def advance(self, n: int) -> None:
        self._fill += n
        if self._fill == BLOCK or (self.length == 0 and self._fill >= FIRST):
            self._submit(self._fill - self._fill % ALIGN)

    def write(self, data: Any) -> None:
        src = np.frombuffer(data, np.uint8)
        while src.size:
            room = self.reserve()
            n = min(room.size, src.size)
            room[:n] = src[:n]
            src = src[n:]
            self.advance(n)

    def _submit(self, n: int, size: int | None = None) -> None:
        """Write the current block's first ``n`` bytes (``size`` bytes: ``n`` and zeros up
        to an aligned end); bytes filled past ``n`` move to the start of the next block once
        that block's own write has completed."""
        i, off, write = self._cur, self.length, size or n
        block = self._store._block(i)
        if self._error is None:
            if self._aio is None:
                self._write(block[:write], off)
            else:
                # Booked first: an interrupt right after the submit must not lose it
                self._busy[i] = (off, write, self._direct)
                try:
                    self._aio.submit(self._fd, block[:write], off, i)
                except OSError as exc:
                    del self._busy[i]
                    if not self._refused(exc.errno, self._direct):
                        raise
                    self._write(block[:write], off)
        self._end = max(self._end, off + write)
        carry = self._fill - n
        self.length += n
        nxt = (i + 1) % self._depth
        while nxt in self._busy:
            self._reap(1)
        if carry:
            self._store._block(nxt)[:carry] = block[n:n + carry]
        self._cur = nxt
        self._fill = carry
        if self._error is not None:
            raise self._error

    def _write(self, data: np.ndarray, offset: int) -> None:
        """In line: where there is no AIO, and to redo what a completion left undone."""
        try:
            _pwrite_all(self._fd, data.data, offset)
        except OSError as exc:
            if not self._refused(exc.errno, self._direct):
                raise
            _pwrite_all(self._fd, data.data, offset)

    def _refused(self, err: int | None, direct: bool) -> bool:
        """Whether ``err``, from a write made with ``O_DIRECT`` or not, is a refusal of
        direct I/O; direct I/O is then off for this file (the writes in flight beside that
        one were made with it too: each is refused and redone)."""
        if err != errno.EINVAL or not direct:
            return False
        if self._direct:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct = False
        return True

    def _reap(self, wait: int, interruptible: bool = True) -> None:
        assert self._aio is not None
        # Every completion is taken off the books first, so an error handling one leaves
        # the others counted right.  (An interrupt may still come between the reap and
        # this: the save then fails, and stop() waits by closing the context, not by
        # counting.)
        done = [(tag, res, *self._busy.pop(tag))
                for tag, res in self._aio.reap(wait, interruptible)]
        for tag, res, off, n, direct in done:
            try:
                if res < 0 and not self._refused(-res, direct):
                    raise OSError(-res, os.strerror(-res))
                if res < n:  # refused (redone through the page cache), or short
                    got = max(res, 0)
                    self._write(self._store._block(tag)[got:n], off + got)
            except OSError as exc:
                if self._error is None:
                    self._error = exc

    def finish(self) -> int:
        """Write what is left (its last block rounded up with zeros), wait for every write,
        cut the file to its length if it is longer; returns the length."""
        if self._fill:
            fill = self._fill
            size = -(-fill // ALIGN) * ALIGN
            self._store._block(self._cur)[fill:size] = 0
            self._submit(fill, size)
        while self._busy:
            self._reap(1, interruptible=False)
        if self._error is not None:
            raise self._error
        if self._end != self.length:  # zeros written past the end, or room left unused
            os.ftruncate(self._fd, self.length)
        return self.length

    def stop(self) -> None:
        """After a failure: wait for the writes in flight, whose blocks the next save
        refills.  Not by counting completions (an interrupt may have come between a reap
        and its bookkeeping): closing the context waits for all of its writes and drops
        their completions; the next save makes a new one."""
        self._busy.clear()
        if self._aio is not None:
            self._aio.close()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _FileWriter(GenerationWriter):
    def __init__(self, store: LocalStore, generation: int, replace: bool, direct: bool
                 ) -> None:
        self._store = store
        self._final = store.file(generation)
        if not replace and os.path.exists(self._final):
            raise CheckpointError(f"{self._final} exists: another writer saved generation "
                                  f"{generation}")
        self._tmp = self._final + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._staged: _Staged | None = None
        if direct:
            try:
                self._fd = os.open(self._tmp, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                    raise
            else:
                self._staged = _Staged(self._fd, store)
                return
        self._fd = os.open(self._tmp, flags, 0o644)

    def write(self, data: Any) -> None:
        if self._staged is not None:
            self._staged.write(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            n = os.write(self._fd, view)
            view = view[n:]

    def reserve(self) -> np.ndarray | None:
        return None if self._staged is None else self._staged.reserve()

    def expect(self, nbytes: int) -> None:
        if self._staged is not None:
            self._staged.expect(nbytes)

    def advance(self, n: int) -> None:
        if self._staged is None:
            raise NotImplementedError("this writer reserves nothing")
        self._staged.advance(n)

    def commit(self) -> None:
        # The data is on disk before the name points at it; the name is on disk before
        # commit returns (so the next generation, which needs this one, never outlives it).
        # Direct I/O needs the fsync too: the file's size and blocks, and the disk's cache.
        if self._staged is not None:
            self._staged.finish()
            self._staged = None
        if self._store.durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self._tmp, self._final)
        if self._store.durable:
            _fsync_dir(self._store.path)

    def abort(self) -> None:
        try:
            if self._staged is not None:
                staged, self._staged = self._staged, None
                staged.stop()
        finally:
            self._close_unlink()

    def _close_unlink(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


class LocalStore(Store):
    """A directory: ``00000000.pwg``, ``00000001.pwg``, ... one file per generation, and
    ``lock`` (an ``flock`` held by the one writer).  ``*.tmp`` files are saves that never
    committed; the writer removes them when it takes the lock.

    ``durable=False`` skips the two fsyncs of a commit (and of a removal): a generation is
    still all or nothing if the process is killed (the rename is the commit), but a power
    cut or a kernel crash may lose the newest generations, or leave a file whose name
    survived and whose data did not (loading names it as damaged).  For scratch
    checkpoints and tests.

    ``direct`` says which generations are written with direct I/O (``O_DIRECT``, see the
    module's docstring): ``None`` (default) a durable store's deltas, ``True`` every
    generation, ``False`` none.  The files are the same bytes either way; a file system
    without direct I/O gets them through the page cache.  Writing directly, the store keeps
    1 MiB blocks of memory for its life, as many as its largest generation filled (16 at
    most), and an AIO context until :meth:`unlock`.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True,
                 direct: bool | None = None) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self.direct = direct
        self._lock_fd = -1
        self._blocks: list[np.ndarray] = []
        self._aio = _Aio()

    def _block(self, i: int) -> np.ndarray:
        """Direct-I/O block ``i``, made when first needed (as many as a save's writes in
        flight: at most ``DEPTH``) and kept for the store's life: memory touched before
        costs nothing to touch again."""
        while len(self._blocks) <= i:
            # Private: a fork's child saving into its own blocks must not write into these
            self._blocks.append(np.frombuffer(mmap.mmap(
                -1, BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8))
        return self._blocks[i]

    def __str__(self) -> str:
        return self.path

    def file(self, generation: int) -> str:
        return os.path.join(self.path, f"{generation:08d}.pwg")

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {self.path}") from None
        except NotADirectoryError:
            raise CheckpointError(f"{self.path} is not a checkpoint (a checkpoint is a "
                                  "directory)") from None
        return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)

    def open(self, generation: int) -> GenerationReader:
        try:
            return _FileReader(self.file(generation))
        except FileNotFoundError:
            raise CheckpointError(f"no generation {generation} in {self.path}") from None

    def create(self, generation: int, replace: bool = False, *,
               delta: bool = False) -> GenerationWriter:
        direct = self.direct if self.direct is not None else (delta and self.durable)
        return _FileWriter(self, generation, replace, direct)

    def prefetch(self, generation: int) -> None:
        # A delta written with direct I/O is not in the page cache: have the kernel read it
        # while the load copies the base (the pages it reads in are allocated here)
        with contextlib.suppress(OSError):
            fd = os.open(self.file(generation), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def remove(self, generation: int) -> None:
        os.unlink(self.file(generation))
        if self.durable:
            _fsync_dir(self.path)

    def lock(self) -> None:
        if self._lock_fd >= 0:
            raise CheckpointError(f"{self.path} is in use by another writer (a Checkpoint "
                                  "or a compaction holds this store's lock)")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} exists and is not a checkpoint directory")
        if not os.path.isdir(self.path):
            os.makedirs(self.path, exist_ok=True)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointError(f"{self.path} is in use by another writer (a Checkpoint "
                                      "or a compaction holds its lock)") from None
            raise
        self._lock_fd = fd
        for name in os.listdir(self.path):
            if name.endswith(".pwg.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))

    def unlock(self) -> None:
        self._aio.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
