"""userfaultfd(2) and its ioctls: the write-protect half of pagewatch."""

from __future__ import annotations

import errno
import os

from .. import _native
from .._lifecycle import Closeable
from ..errors import (
    InvalidRange,
    PagewatchError,
    PermissionDenied,
    Unsupported,
    is_transient,
    transient_error,
)
from .constants import PAGE_SIZE, UFFD_USER_MODE_ONLY, RegisterMode, UffdFeature, UffdIoctl

__all__ = ["Userfaultfd", "open_userfaultfd"]


def open_userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> tuple[int, str]:
    """Create a userfaultfd; returns ``(fd, how)``.

    Tries, in order: the syscall with ``UFFD_USER_MODE_ONLY`` (allowed to anyone), the
    syscall without it (needs ``CAP_SYS_PTRACE`` or ``vm.unprivileged_userfaultfd=1``), then
    ``/dev/userfaultfd`` (gated only by the file's permissions).
    """
    errors: list[str] = []
    last = 0
    for how, fn, fl in (
        ("syscall, user-mode only", _native.userfaultfd, flags | UFFD_USER_MODE_ONLY),
        ("syscall", _native.userfaultfd, flags),
        ("/dev/userfaultfd", _native.userfaultfd_dev, flags),
    ):
        try:
            return fn(fl), how
        except OSError as exc:
            errors.append(f"{how}: {exc.strerror}")
            last = exc.errno or 0
            if is_transient(exc):
                raise transient_error("creating a userfaultfd", exc) from exc
    if all("ENOSYS" in e or "not implemented" in e for e in errors[:2]):
        raise Unsupported("userfaultfd", "this kernel was built without CONFIG_USERFAULTFD "
                          f"({'; '.join(errors)})", "Use the mprotect or compare backend", last)
    raise PermissionDenied(
        "userfaultfd was refused (" + "; ".join(errors) + "): allow it with "
        "'sysctl vm.unprivileged_userfaultfd=1', give read-write access to /dev/userfaultfd, "
        "or check the seccomp policy of this container", last)


class Userfaultfd(Closeable):
    """A userfaultfd with its API handshake done.

    Parameters
    ----------
    features
        :class:`UffdFeature` bits to ask for.  ``features`` then holds the bits enabled on
        this fd: the requested ones, plus ``WP_UNPOPULATED`` which the kernel turns on with
        ``WP_ASYNC``.  ``available`` holds every bit this kernel offers (what UFFDIO_API
        returns: the kernel enables only the requested ones).  A requested bit it does not
        offer raises :class:`Unsupported` (before 2024 kernels accepted it silently, so the
        returned mask is always checked).
    fd
        An existing userfaultfd (for example one taken from another process with
        ``pidfd_getfd``) to adopt instead of creating one.  Its memory is that of the process
        that created it.
    nonblocking
        Create it with ``O_NONBLOCK`` (reads of fault messages do not block).
    """

    def __init__(
        self,
        features: int = int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED),
        *,
        fd: int | None = None,
        nonblocking: bool = True,
    ) -> None:
        if fd is None:
            flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
            fd, self.how = open_userfaultfd(flags)
        else:
            self.how = "adopted"
        self._fd = fd
        try:
            granted, ioctls = _native.uffdio_api(fd, int(features))
        except OSError as exc:
            self.close()
            raise Unsupported(
                f"userfaultfd features {UffdFeature(features)!r}",
                "UFFDIO_API refused them (this kernel lacks one: WP_ASYNC came in 6.7, "
                "WP_UNPOPULATED in 6.4, WP_HUGETLBFS_SHMEM in 5.19; or, for an adopted fd, "
                "its one UFFDIO_API was already done)", errno=exc.errno) from exc
        missing = int(features) & ~granted
        if missing:
            self.close()
            raise Unsupported(f"userfaultfd features {UffdFeature(missing)!r}",
                              "the kernel did not grant them")
        enabled = int(features)
        if enabled & UffdFeature.WP_ASYNC:  # the kernel implies it (fs/userfaultfd.c)
            enabled |= int(UffdFeature.WP_UNPOPULATED)
        self.features = UffdFeature(enabled)
        self.available = UffdFeature(granted)
        self.ioctls = ioctls

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("this userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _check(self, start: int, length: int) -> None:
        if self._fd < 0:
            raise ValueError("this userfaultfd is closed")
        if start % PAGE_SIZE or length % PAGE_SIZE:
            raise InvalidRange(f"[{start:#x}, +{length:#x}) is not page-aligned "
                               f"(page size {PAGE_SIZE})")
        if length <= 0:
            raise InvalidRange(f"empty range at {start:#x}")

    def register(self, start: int, length: int, mode: int = int(RegisterMode.WP)) -> int:
        """Register ``[start, start+length)``; returns the ioctls allowed on it (a mask)."""
        self._check(start, length)
        try:
            ioctls: int = _native.uffdio_register(self._fd, start, length, int(mode))
        except OSError as exc:
            rng = f"[{start:#x}, {start + length:#x})"
            if exc.errno == errno.EBUSY:
                raise PagewatchError(f"{rng} is already registered with another userfaultfd "
                                     "(one uffd per VMA): close the other tracker first",
                                     exc.errno) from exc
            if exc.errno == errno.ENOMEM:
                raise InvalidRange(f"{rng} is not (wholly) mapped", exc.errno) from exc
            if exc.errno == errno.EPERM:
                raise InvalidRange(f"{rng} cannot be registered: a mapping there is not "
                                   "writable (no VM_MAYWRITE)", exc.errno) from exc
            if exc.errno == errno.EINVAL:
                raise InvalidRange(f"{rng} cannot be registered for write-protect: nothing "
                                   "is mapped there, or a mapping of a kind uffd-wp does not "
                                   "support on this kernel, or not aligned to its huge page "
                                   "size", exc.errno) from exc
            raise PagewatchError(f"UFFDIO_REGISTER of {rng} failed: {exc.strerror}",
                                 exc.errno) from exc
        if mode & RegisterMode.WP and not ioctls & (1 << UffdIoctl.WRITEPROTECT):
            self.unregister(start, length)
            raise Unsupported("UFFDIO_WRITEPROTECT on this range",
                              "the kernel registered it but does not allow write-protect there")
        return ioctls

    def unregister(self, start: int, length: int) -> None:
        """Unregister ``[start, start+length)``; its write-protection is dropped."""
        self._check(start, length)
        try:
            _native.uffdio_unregister(self._fd, start, length)
        except OSError as exc:
            raise PagewatchError(f"UFFDIO_UNREGISTER of [{start:#x}, +{length:#x}) failed: "
                                 f"{exc.strerror}", exc.errno) from exc

    def writeprotect(self, start: int, length: int, protect: bool = True) -> None:
        """Write-protect (or un-protect) ``[start, start+length)``."""
        self._check(start, length)
        try:
            _native.uffdio_writeprotect(self._fd, start, length, 1 if protect else 0)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise InvalidRange(f"[{start:#x}, +{length:#x}) is not registered for "
                                   "write-protect (or not mapped)", exc.errno) from exc
            raise PagewatchError(f"UFFDIO_WRITEPROTECT of [{start:#x}, +{length:#x}) failed: "
                                 f"{exc.strerror}", exc.errno) from exc

    def close(self) -> None:
        """Close the fd (the kernel unregisters everything it registered)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={self.features!r}>"
