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
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import os
import re
from types import TracebackType
from typing import Any

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
    def create(self, generation: int, replace: bool = False) -> GenerationWriter:
        """A writer for a new generation (``replace``: for one that exists, compaction)."""

    @abc.abstractmethod
    def remove(self, generation: int) -> None: ...

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


class _FileWriter(GenerationWriter):
    def __init__(self, store: LocalStore, generation: int, replace: bool) -> None:
        self._store = store
        self._final = store.file(generation)
        if not replace and os.path.exists(self._final):
            raise CheckpointError(f"{self._final} exists: another writer saved generation "
                                  f"{generation}")
        self._tmp = self._final + ".tmp"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                           0o644)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.write(self._fd, view)
            view = view[n:]

    def commit(self) -> None:
        # The data is on disk before the name points at it; the name is on disk before
        # commit returns (so the next generation, which needs this one, never outlives it).
        if self._store.durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self._tmp, self._final)
        if self._store.durable:
            _fsync_dir(self._store.path)

    def abort(self) -> None:
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
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self._lock_fd = -1

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

    def create(self, generation: int, replace: bool = False) -> GenerationWriter:
        return _FileWriter(self, generation, replace)

    def remove(self, generation: int) -> None:
        os.unlink(self.file(generation))
        if self.durable:
            _fsync_dir(self.path)

    def lock(self) -> None:
        if self._lock_fd >= 0:
            return
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
