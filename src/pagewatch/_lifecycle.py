"""The one close / context-manager / finaliser lifecycle of pagewatch's closeable objects."""

from __future__ import annotations

import abc
from typing import TypeVar

__all__ = ["Closeable"]

_C = TypeVar("_C", bound="Closeable")


class Closeable(abc.ABC):
    """``close()`` once (idempotent), ``with`` closes, and so does garbage collection.

    Subclasses implement :meth:`close` (which must tolerate being called again) and provide
    ``closed`` (an attribute or a property).  The finaliser closes an object that was built
    and not closed; one whose ``__init__`` failed before ``closed`` could be told (it raised
    ``AttributeError``) is left alone: whatever it had acquired by then its ``__init__``
    releases.  A finaliser never raises.
    """

    # ``closed`` is not declared here: some subclasses set it as an attribute, others
    # compute it (a property); the finaliser reads it with getattr.

    @abc.abstractmethod
    def close(self) -> None:
        """Stop and release everything; calling it again does nothing."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "closed", True):
            return  # never fully built, or already closed
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass
