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
into the page cache.  Direct I/O writes from two blocks of this process's own memory, reused
from save to save, while the next block fills (``_Staged``): the same save takes ~7 ms, the
disk's time for its 10 MiB.  A base goes through the page cache, like ``np.save``'s file:
every load of its chain reads it whole.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import mmap
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

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


class _Worker:
    """A thread of the store's running the writes handed to it, in order; it lives as long
    as the store's lock (a thread per save cost a save ~0.2 ms more)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Whether the thread runs, started now if needed; False: no thread can be started
        (at interpreter exit, Python 3.12+; a thread limit): the caller writes itself."""
        if self._thread is not None and self._thread.is_alive():
            return True
        self._q = queue.SimpleQueue()  # a fork's child: the old thread is not in it
        self._thread = threading.Thread(target=self._loop, name="pagewatch-write",
                                        daemon=True)
        try:
            self._thread.start()
        except RuntimeError:
            self._thread = None
            return False
        return True

    def put(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (after :meth:`start` said True)."""
        self._q.put(job)
        # Let the worker take the GIL now, reach its write and release the GIL there:
        # else it waits until this thread blocks, which filling the next block does not.
        time.sleep(0)

    def drain(self) -> None:
        """Return once every job queued so far has run."""
        if self._thread is not None and self._thread.is_alive():
            done = threading.Event()
            self._q.put(done.set)
            done.wait()

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            job()

    def stop(self) -> None:
        if self._thread is not None:
            if self._thread.is_alive():
                self._q.put(None)
                self._thread.join()
            self._thread = None


class _Staged:
    """The bytes of one file gathered in two aligned blocks, each written with ``O_DIRECT``
    by the store's worker while the other fills.  A write the file system refuses
    (``EINVAL``: direct I/O unsupported, or a larger block size) clears ``O_DIRECT`` and is
    retried through the page cache: the file is the same bytes either way."""

    def __init__(self, fd: int, blocks: list[np.ndarray], worker: _Worker) -> None:
        self._fd = fd
        self._blocks = blocks
        self._worker = worker
        self._cur = 0
        self._fill = 0
        self.length = 0  # bytes handed to the worker so far
        self._idle = [threading.Event(), threading.Event()]
        for e in self._idle:
            e.set()
        self._error: BaseException | None = None

    def reserve(self) -> np.ndarray:
        return self._blocks[self._cur][self._fill:]

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
        """Hand the current block's first ``n`` bytes to the worker (``size`` bytes written:
        ``n`` and zeros up to an aligned end); bytes filled past ``n`` move to the start of
        the other block once its write is done."""
        i, off, write = self._cur, self.length, size or n
        if self._worker.start():
            self._idle[i].clear()
            self._worker.put(lambda: self._write(i, write, off))
        else:
            self._write(i, write, off)
        carry = self._fill - n
        self.length += n
        self._cur ^= 1
        self._idle[self._cur].wait()  # the other block's write is done: it may be refilled
        if carry:
            self._blocks[self._cur][:carry] = self._blocks[i][n:n + carry]
        self._fill = carry
        if self._error is not None:
            raise self._error

    def _write(self, i: int, n: int, offset: int) -> None:
        try:
            if self._error is None:
                _pwrite_all(self._fd, self._blocks[i][:n].data, offset)
        except BaseException as exc:  # noqa: BLE001 - raised by the filling thread
            self._error = exc
        finally:
            self._idle[i].set()

    def finish(self) -> int:
        """Write what is left (its last block rounded up with zeros, then the file cut to
        its length); returns the length."""
        if self._fill:
            fill = self._fill
            size = -(-fill // ALIGN) * ALIGN
            self._blocks[self._cur][fill:size] = 0
            self._submit(fill, size)
        self.stop()
        if self._error is not None:
            raise self._error
        os.ftruncate(self._fd, self.length)
        return self.length

    def stop(self) -> None:
        """Wait for the writes in flight (on an error too).  By the worker's queue, not the
        blocks' events: an interrupt between an event's clear and its job's queueing would
        leave that event cleared for ever."""
        self._worker.drain()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            continue
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
                self._staged = _Staged(self._fd, *store._direct())
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
        if self._staged is not None:
            self._staged.stop()
            self._staged = None
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
    without direct I/O gets them through the page cache.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True,
                 direct: bool | None = None) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self.direct = direct
        self._lock_fd = -1
        self._blocks: list[np.ndarray] | None = None
        self._worker = _Worker()

    def _direct(self) -> tuple[list[np.ndarray], _Worker]:
        # Kept for the store's life: memory touched before costs nothing to touch again.
        if self._blocks is None:
            # Private: a fork's child saving into its own blocks must not write into these
            self._blocks = [np.frombuffer(mmap.mmap(-1, BLOCK, flags=mmap.MAP_PRIVATE
                                                    | mmap.MAP_ANONYMOUS), np.uint8)
                            for _ in range(2)]
        return self._blocks, self._worker

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
        self._worker.stop()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
