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
