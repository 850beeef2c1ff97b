"""The errors pagewatch raises.  Each says what went wrong and what to do about it.

Every class derives from :class:`PagewatchError`, which derives from :class:`OSError`, so
``errno`` is kept when a system call was the cause and callers that already catch
``OSError`` keep working.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["PagewatchError", "Unsupported", "PermissionDenied", "InvalidRange", "TargetGone"]


class PagewatchError(OSError):
    """Base class of every pagewatch error.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    errno
        The errno of the system call behind the error, or ``None``.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        if self.errno is not None:
            return f"{self.message} [errno {self.errno}: {_errno.errorcode.get(self.errno, '?')}]"
        return self.message


class Unsupported(PagewatchError):
    """A feature this kernel, machine or target lacks.

    ``feature`` names it, ``reason`` says why it is missing; the message says what to use
    instead.
    """

    def __init__(
        self, feature: str, reason: str, hint: str = "", errno: int | None = None
    ) -> None:
        self.feature = feature
        self.reason = reason
        self.hint = hint
        msg = f"{feature} is not available: {reason}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg, errno)


class PermissionDenied(PagewatchError):
    """A permission is missing; the message names it and how to get it."""

    def __init__(self, message: str, errno: int | None = _errno.EPERM) -> None:
        super().__init__(message, errno)


class InvalidRange(PagewatchError, ValueError):
    """An address range that cannot be tracked (unaligned, empty, unmapped, read-only...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message, errno)


class TargetGone(PagewatchError):
    """The tracked memory or process went away (unmapped, exited).

    ``collected`` holds what was collected before it went, when there is any.
    """

    def __init__(self, message: str, errno: int | None = None, collected: object = None) -> None:
        super().__init__(message, errno)
        self.collected = collected


#: errnos that say "not now" (a passing shortage), never "not on this kernel"
TRANSIENT_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOMEM, _errno.EAGAIN,
                              _errno.EINTR})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a passing shortage (descriptors, memory), not a kernel's answer."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def transient_error(what: str, exc: OSError) -> PagewatchError:
    """The error for a passing shortage met while ``what``: says so, and what to do."""
    why = {_errno.EMFILE: "this process has no file descriptor left (EMFILE): close some, "
                          "or raise RLIMIT_NOFILE",
           _errno.ENFILE: "the system has no file descriptor left (ENFILE)",
           _errno.ENOMEM: "out of memory (ENOMEM)"}.get(
               exc.errno or 0, f"{exc.strerror} ({_errno.errorcode.get(exc.errno or 0, '?')})")
    return PagewatchError(f"{what} failed for a passing reason, not for lack of a kernel "
                          f"feature: {why}; then try again", exc.errno)
