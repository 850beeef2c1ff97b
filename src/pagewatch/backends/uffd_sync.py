"""``uffd-sync``: userfaultfd write-protect with a handler thread in C.

The tracked pages are registered with a userfaultfd in write-protect mode and protected.
A write blocks its thread in the kernel and queues a message; a handler thread written in
C (no Python, no GIL on this path) reads it, records the page in every tracker containing
it and un-protects the page, which wakes the writer.  ``collect(reset=True)`` clears each
written page's mark first and re-protects it second, under a mutex shared with the thread,
so a write is reported by the collect it races or by the next one.

One userfaultfd and one thread serve every ``uffd-sync`` tracker of the process (the
kernel allows one userfaultfd per mapping); the thread stops when the last tracker closes.

Kernel writes
-------------
When this process may create a userfaultfd that also handles faults taken *inside the
kernel* (root, ``CAP_SYS_PTRACE``, ``vm.unprivileged_userfaultfd=1`` or write access to
``/dev/userfaultfd``), a system call writing into a protected page (``read``, ``readv``,
``recv_into``) waits for the handler thread like any other writer and is reported:
:attr:`UffdSync.kernel_writes` is then True.  Otherwise the userfaultfd is
``UFFD_USER_MODE_ONLY`` and such a call fails with ``EFAULT``; wrap it in
:func:`pagewatch.backends.mprotect.writable`.  (``PAGEWATCH_UFFD_USER_MODE_ONLY=1`` forces
the user-mode-only form, to test that case as root.)

Limits
------
* ``madvise(MADV_DONTNEED)`` drops the protection of anonymous pages with their content,
  so a later write to them faults nowhere.  Each collect therefore reads the uffd-wp bit
  of the pages it holds clean (``/proc/self/pagemap`` bit 57, one read of 8 bytes per
  page): a page that lost it is reported as written (its content changed: zeros, or a
  write) and protected again.
* Kernels without ``UFFD_FEATURE_WP_UNPOPULATED`` (before 6.4) ignore protection on pages
  never touched, so every page is mapped (read) when tracking starts.
* The registration is the mapping's identity: memory unmapped and mapped anew at the same
  address is not registered, and the next collect raises :class:`~pagewatch.TargetGone`.
* A mapping already registered with another userfaultfd cannot be tracked (``EBUSY``):
  a ``uffd-async`` tracker's pages, for one; the error names that tracker.
* After ``fork()`` the child has no handler thread and its mappings lose the registration
  (no ``UFFD_FEATURE_EVENT_FORK``), so it runs unhindered; its copies of the trackers
  refuse to collect (``PagewatchError``: create a new tracker in the child).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref

from .. import _native
from ..dirty import DirtyPages
from ..errors import (
    InvalidRange,
    PagewatchError,
    TargetGone,
    Unsupported,
    is_transient,
    transient_error,
)
from ..kernel.constants import PAGE_SIZE, UFFD_USER_MODE_ONLY, UffdFeature
from ..kernel.uffd import Userfaultfd
from ._memory import (
    busy_error,
    check_mapped,
    forget_replaced,
    kernel_answer,
    replaced_error,
)
from .base import Backend, Hub, HubLock, Region
from .mprotect import writable

__all__ = ["UffdSync", "writable", "BACKEND"]

_WP = int(UffdFeature.PAGEFAULT_FLAG_WP)
_WP_UNPOPULATED = int(UffdFeature.WP_UNPOPULATED)


def _create() -> tuple[int, str, bool]:
    """A non-blocking userfaultfd, able to handle kernel faults if allowed:
    ``(fd, how, kernel_writes)``."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    tried: list[str] = []
    if not os.environ.get("PAGEWATCH_UFFD_USER_MODE_ONLY"):
        for how, fn in (("syscall", _native.userfaultfd),
                        ("/dev/userfaultfd", _native.userfaultfd_dev)):
            try:
                return fn(flags), how, True
            except OSError as exc:
                if is_transient(exc):
                    raise transient_error("creating a userfaultfd", exc) from exc
                tried.append(f"{how}: {exc.strerror}")
    for how, fn in (("syscall, user-mode only", _native.userfaultfd),
                    ("/dev/userfaultfd, user-mode only", _native.userfaultfd_dev)):
        try:
            return fn(flags | UFFD_USER_MODE_ONLY), how, False
        except OSError as exc:
            if is_transient(exc):
                raise transient_error("creating a userfaultfd", exc) from exc
            tried.append(f"{how}: {exc.strerror}")
    raise Unsupported("userfaultfd", "it was refused (" + "; ".join(tried) + ")",
                      "Use the mprotect or compare backend")


class _Hub(Hub):
    """The process's one userfaultfd, its handler thread and the live trackers (``lock``,
    ``members``, what they cover: :class:`~.base.Hub`)."""

    def __init__(self) -> None:
        super().__init__()
        self.uffd: Userfaultfd | None = None
        self.how = ""
        self.kernel_writes = False
        self.populate = False
        self._pagemap = -1

    def pagemap(self) -> int:
        if self._pagemap < 0:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return self._pagemap

    def open(self) -> Userfaultfd:
        if self.uffd is not None:
            return self.uffd
        self.pagemap()
        uffd = None
        for features in (_WP | _WP_UNPOPULATED, _WP):
            fd, how, kernel = _create()
            try:
                uffd = Userfaultfd(features, fd=fd)  # closes fd if refused
                break
            except Unsupported:
                if features == _WP:
                    raise
        assert uffd is not None
        _native.us_start(uffd.fileno())
        self.uffd, self.how, self.kernel_writes = uffd, how, kernel
        self.populate = not (uffd.features & UffdFeature.WP_UNPOPULATED)
        return uffd

    def live(self) -> list[UffdSync]:
        return [m for m in self.members if not m.closed and m.gone is None]

    def forget_replaced(self, start: int, end: int) -> None:
        """Live trackers over ``[start, end)`` whose memory was replaced are gone: a new
        tracker there must not take over their watches."""
        for m in self.live():
            if m.region.start < end and m.region.end > start:
                try:
                    m._verify()
                except TargetGone as exc:
                    m._went(exc)

    def stop_if_idle(self) -> None:
        if not any(not m.closed for m in self.members) and self.uffd is not None:
            _native.us_stop()
            self.uffd.close()
            self.uffd = None

    def after_fork_in_child(self) -> None:
        for m in list(self.members):
            m._id = None  # the C side forgot the watches
        self.members = weakref.WeakSet()
        if self.uffd is not None:
            self.uffd.close()  # it acts on the parent's memory
            self.uffd = None
        if self._pagemap >= 0:
            os.close(self._pagemap)  # /proc/self of the parent
            self._pagemap = -1
        self.lock = HubLock()
        self.pid = os.getpid()


_hub = _Hub()


class UffdSync(Backend):
    name = "uffd-sync"
    rank = 2
    summary = "userfaultfd write-protect, a C handler thread records and un-protects"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _trial()

    def __init__(self, region: Region, *, huge_pages: str = "split") -> None:
        super().__init__(region, huge_pages=huge_pages)
        self._id: int | None = None
        self._lock = threading.Lock()
        self._split_huge_pages()
        with _hub.lock:
            forget_replaced(region.start, region.end)  # (may stop an idle hub)
            uffd = _hub.open()
            try:
                # Registering again with the same userfaultfd is allowed: no coverage logic.
                try:
                    uffd.register(region.start, region.length)
                except InvalidRange as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    raise Unsupported(
                        "uffd-sync on this memory", "synchronous userfaultfd write-protect "
                        "covers anonymous, shmem and hugetlbfs memory only (not regular "
                        "files)", "Use uffd-async (any memory), mprotect or compare",
                        exc.errno) from exc
                except PagewatchError as exc:
                    if exc.errno == errno.EBUSY:
                        raise busy_error(self, exc) from exc
                    raise
                try:
                    self._id = _native.us_watch(region.start, region.npages, _hub.populate)
                except OSError as exc:
                    for s, e in _hub.uncovered(self, region.start, region.end):
                        try:
                            uffd.unregister(s, e - s)
                        except OSError:
                            pass
                    raise PagewatchError(f"cannot write-protect [{region.start:#x}, "
                                         f"{region.end:#x}): {exc.strerror}", exc.errno) from exc
            except BaseException:
                self.closed = True
                _hub.stop_if_idle()
                self._restore_advice()
                raise
            _hub.members.add(self)

    @property
    def kernel_writes(self) -> bool:
        """Whether system calls writing into tracked pages are reported (True) or fail with
        ``EFAULT`` (False: a user-mode-only userfaultfd)."""
        return _hub.kernel_writes

    def _gone_or_error(self, err: int, what: str) -> PagewatchError:
        check_mapped(self.region)
        if err == errno.ENOENT:
            return replaced_error(self.region, "it is not registered with pagewatch's "
                                  "userfaultfd any more", err)
        return PagewatchError(f"{what} failed: {os.strerror(err)}", err)

    def _verify(self) -> None:
        """Pages that lost their protection behind our back are reported, and protected
        again; memory no longer registered is gone (raised)."""
        wid = self._id
        if wid is None:
            return
        _, err = _native.us_verify(wid, _hub.pagemap(), _hub.populate)
        if err:
            raise self._gone_or_error(err, "UFFDIO_WRITEPROTECT of unprotected pages")

    def _collect(self, reset: bool, max_pages: int | None) -> DirtyPages:
        with self._lock:
            wid = self._id
            if wid is None:
                raise ValueError(f"this {self.name} tracker is closed")
            check_mapped(self.region)
            self._verify()
            runs, err = _native.us_collect(wid, reset, -1 if max_pages is None else max_pages)
            if err:
                raise self._gone_or_error(err, "UFFDIO_WRITEPROTECT of written pages")
        return self._result(runs)

    def _release(self) -> None:
        with _hub.lock, self._lock:
            _hub.members.discard(self)
            if self._id is None:
                return
            wid, self._id = self._id, None
            _native.us_unwatch(wid)
            uffd = _hub.uffd
            if uffd is not None:
                for s, e in _hub.uncovered(self, self.region.start, self.region.end):
                    try:
                        uffd.unregister(s, e - s)
                    except OSError:
                        pass  # unmapped meanwhile
            _hub.stop_if_idle()


@kernel_answer
def _trial() -> tuple[bool, str]:
    """Track one page for real: register, protect, write, collect, close."""
    buf = mmap.mmap(-1, 2 * PAGE_SIZE)
    try:
        addr = _native.buffer_info(buf)[0]
        b = UffdSync(Region(addr, 2 * PAGE_SIZE))
        try:
            buf[PAGE_SIZE] = 1
            got = b.collect().pages().tolist()
        finally:
            b.close()
        if got != [1]:
            return False, f"a write to a protected page was reported as pages {got}"
        kernel = ("kernel writes handled" if _hub.kernel_writes else
                  "user-mode only: system calls writing tracked pages get EFAULT")
        unpop = "" if not _hub.populate else "; no WP_UNPOPULATED: pages are pre-mapped"
        return True, f"a write to a protected page was caught by the handler thread ({kernel}{unpop})"
    except (Unsupported, PagewatchError) as exc:
        if is_transient(exc):
            raise
        return False, str(exc)
    except OSError as exc:
        if is_transient(exc):
            raise transient_error("the uffd-sync trial", exc) from exc
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            return False, f"userfaultfd write-protect is not usable: {exc.strerror}"
        return False, f"the uffd-sync trial failed: {exc}"
    finally:
        buf.close()


os.register_at_fork(after_in_child=_hub.after_fork_in_child)

BACKEND = UffdSync
