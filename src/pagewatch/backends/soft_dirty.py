"""``soft-dirty``: ``clear_refs`` 4 and pagemap bit 55, with the world stopped around them.

Writing ``4`` to ``/proc/self/clear_refs`` clears the soft-dirty bit of every page of the
process and write-protects them; the kernel sets the bit again on the next write, and
``/proc/self/pagemap`` shows it as bit 55.  Two problems, and what this backend does:

* **No atomic get-and-reset.**  A write between reading bit 55 and ``clear_refs`` would be
  cleared unseen.  So the read and the clear happen with every other thread of the process
  stopped: each is sent a real-time signal whose handler (C) acknowledges and waits until
  released, as Boehm GC stops the world.  A thread inside a system call is interrupted or
  finishes it before it acknowledges, so no write by our own threads, user-mode or
  kernel-mode, falls in the window.
* **The reset is process-wide.**  Before clearing, the bits of every other soft-dirty
  tracker's pages are read and kept in its pending set (a :class:`~.base.Hub`), so
  trackers never disturb each other; ``max_pages`` keeps the pages it does not return
  pending the same way.

Limits
------
* Writes made during the stop by something that is not one of this process's threads
  stopped by the signal are not covered: other processes writing shared memory,
  ``process_vm_writev``, io_uring and AIO kernel workers.  A thread that blocks the signal
  cannot be stopped: the collect then fails (``EDEADLK``) instead of risking a lost write,
  once the block has lasted 3 s (a thread that starts or exits blocks every signal for a
  moment: it is waited for).
* Each collect signals every other thread: a blocking system call is restarted
  (``SA_RESTART``) or, for the few the kernel never restarts (``poll``, ``select``,
  ``epoll_wait``, ``nanosleep``...), returns ``EINTR``, which Python retries (PEP 475) but
  careless C code may not.
* Anything else in the process that uses soft-dirty (``clear_refs``) resets our bits.
* False positives the kernel documents: pages of a mapping that was merged with a new or
  grown mapping read as soft-dirty until the next reset (``VM_SOFTDIRTY``; ``huge_pages=
  "split"`` sets ``MADV_NOHUGEPAGE``, which also keeps fresh anonymous mappings from
  merging with the tracked one); a transparent huge page written as a whole reports its
  512 pages; shared-memory pages swapped out lose the bit (a false negative the kernel
  documents, so ``shmem`` is best tracked otherwise).
* Not every kernel has it: ``CONFIG_MEM_SOFT_DIRTY`` (x86-64, ppc64, s390; not arm64).
"""

from __future__ import annotations

import errno
import os
import weakref

import numpy as np

from .. import _intervals, _native
from ..dirty import DirtyPages
from ..errors import PagewatchError
from ._memory import check_identity, check_mapped, mapping_identity
from .base import Hub, HubBackend, HubLock, Region

__all__ = ["SoftDirty", "BACKEND"]

_BIT = np.uint64(55)


class _SoftDirtyHub(Hub):
    def __init__(self) -> None:
        super().__init__()
        self._pagemap = -1
        self._clear_refs = -1

    def fds(self) -> tuple[int, int]:
        if self._pagemap < 0:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        if self._clear_refs < 0:
            self._clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        return self._pagemap, self._clear_refs

    def read(self, members: list[SoftDirty], clear: bool) -> list[np.ndarray]:
        """Bit 55 of every page of each member (one bool array each); with ``clear``, then
        ``clear_refs``, all with the world stopped."""
        pagemap, clear_refs = self.fds()
        starts = np.array([m.region.start for m in members], np.uint64)
        counts = np.array([m.region.npages for m in members], np.uint64)
        out = np.empty(int(counts.sum()), np.uint64)
        err, culprit, _ = _native.sd_read(pagemap, clear_refs if clear else -1, starts, counts,
                                          out)
        if err:
            why = {
                errno.EDEADLK: f"thread {culprit} blocks the stop signal, so it cannot be stopped while "
                    "the bits are read and cleared (a write it made then would be lost): "
                    "unblock the signal in it or use another backend",
                errno.ETIMEDOUT: f"thread {culprit} did not stop within 10 s",
            }.get(err, os.strerror(err))
            raise PagewatchError(f"soft-dirty collect failed, nothing was reset: {why}", err)
        dirty = ((out >> _BIT) & np.uint64(1)).astype(bool)
        return np.split(dirty, np.cumsum(counts[:-1].astype(np.int64)))

    def after_fork_in_child(self) -> None:
        # The /proc/self files were opened by the parent: they still describe it.  The
        # trackers' copies refuse to work (their pid is the parent's).
        self.members = weakref.WeakSet()
        self.shared = 0
        for fd in (self._pagemap, self._clear_refs):
            if fd >= 0:
                os.close(fd)
        self._pagemap = self._clear_refs = -1
        self.lock = HubLock()
        self.pid = os.getpid()
        self._clear_log()


_runs = _intervals.from_bitmap


class SoftDirty(HubBackend):
    name = "soft-dirty"
    rank = 1
    summary = "clear_refs + pagemap bit 55, read and cleared with the other threads stopped"
    hub = _SoftDirtyHub()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from ..kernel.probe import probe_soft_dirty

        return probe_soft_dirty()

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self._identity = mapping_identity(region)
        self._split_huge_pages()
        with self.hub.lock:
            self._join()
            try:
                self.reset()  # start clean; the others keep theirs as pending
            except BaseException:
                self._leave()
                self.closed = True
                self._restore_advice()
                raise

    def _check_alive(self) -> None:
        check_mapped(self.region)
        check_identity(self.region, self._identity)  # new memory at the same address?

    def _read_reset(self) -> np.ndarray:
        """Read and clear everything; the other members' bits go to their pending sets.
        Returns this tracker's bits.  Call with the hub lock held."""
        self._check_alive()
        members = [m for m in self.hub.members if isinstance(m, SoftDirty) and not m.closed]
        if self not in members:
            members.append(self)
        got = self.hub.read(members, clear=True)
        mine = got[members.index(self)]
        for m, bits in zip(members, got, strict=True):
            if m is not self and bits.any():
                m._add_pending(_runs(bits))
        return mine

    def _get(self, reset: bool) -> np.ndarray:
        if reset:
            return _runs(self._read_reset())
        self._check_alive()
        return _runs(self.hub.read([self], clear=False)[0])

    def _reset_runs(self, runs: np.ndarray) -> np.ndarray:
        # The kernel resets everything or nothing: reset everything, keep the rest pending.
        mine = _runs(self._read_reset())
        self._add_pending(_intervals.subtract(mine, runs))
        return _intervals.intersect(mine, runs)

    def _collect_some(self, max_pages: int) -> DirtyPages:
        everything = _intervals.normalise(np.concatenate([_runs(self._read_reset()),
                                                          self._pending_runs()]))
        chosen = _intervals.take_first(everything, max_pages)
        self._pending = _intervals.subtract(everything, chosen)
        return self._result(chosen)

    def _release(self) -> None:
        with self.hub.lock:
            self._leave()


os.register_at_fork(after_in_child=SoftDirty.hub.after_fork_in_child)

BACKEND = SoftDirty
