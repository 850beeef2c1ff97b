"""The errors pagewatch raises.  Each says what went wrong and what to do about it.

Every class derives from :class:`PagewatchError`, which derives from :class:`OSError`, so
``errno`` is kept when a system call was the cause and callers that already catch
``OSError`` keep working.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

__all__ = ["PagewatchError", "Unsupported", "PermissionDenied", "InvalidRange", "TargetGone"]


class PagewatchError(OSError):
    """Base class of every pagewatch error.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    errno
        The errno of the system call behind the error, or ``None``.

    Like psutil's errors, every one can be pickled (``__reduce__`` gives back the arguments
    it was made with, and its attributes), is shown as ``pagewatch.Name``, and says what it
    holds in its ``repr``.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, message)
        self.message = message
        self._made_with: tuple[object, ...] = (message, errno)

    def __str__(self) -> str:
        if self.errno is not None:
            return f"{self.message} [errno {self.errno}: {_errno.errorcode.get(self.errno, '?')}]"
        return str(self.message)

    def __repr__(self) -> str:
        extra = f", errno={self.errno}" if self.errno is not None else ""
        pid = getattr(self, "pid", None)
        extra += f", pid={pid}" if pid is not None else ""
        return f"pagewatch.{type(self).__name__}({self.message!r}{extra})"

    def __reduce__(self) -> tuple[object, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "_made_with"}
        return (_rebuild, (type(self), self._made_with, state))


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
        self._made_with = (feature, reason, hint, errno)


class PermissionDenied(PagewatchError):
    """A permission is missing; the message names it and how to get it.  ``pid``: the
    process concerned, when there is one."""

    def __init__(self, message: str, errno: int | None = _errno.EPERM,
                 pid: int | None = None) -> None:
        super().__init__(message, errno)
        self.pid = pid
        self._made_with = (message, errno, pid)


class InvalidRange(PagewatchError, ValueError):
    """An address range that cannot be tracked (unaligned, empty, unmapped, read-only...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message, errno)


class TargetGone(PagewatchError):
    """The tracked memory or process went away (unmapped, exited).

    ``collected`` holds what was collected before it went, when there is any; ``pid`` the
    process that went, when it was one.
    """

    def __init__(self, message: str, errno: int | None = None, collected: object = None,
                 pid: int | None = None) -> None:
        super().__init__(message, errno)
        self.collected = collected
        self.pid = pid
        self._made_with = (message, errno, collected, pid)


def _make(cls: Any, made_with: tuple[object, ...]) -> Any:
    return cls(*made_with)


def _rebuild(cls: type[PagewatchError], made_with: tuple[object, ...],
             state: dict[str, object]) -> PagewatchError:
    """Unpickle: made again with its arguments, then its attributes put back."""
    exc: PagewatchError = _make(cls, made_with)
    exc.__dict__.update(state)
    return exc


# Shown (and pickled) as pagewatch.Name: the names users import them by.
for _cls in (PagewatchError, Unsupported, PermissionDenied, InvalidRange, TargetGone):
    _cls.__module__ = "pagewatch"
del _cls

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
