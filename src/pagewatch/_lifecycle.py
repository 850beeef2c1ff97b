"""The one close / context-manager / finaliser lifecycle of pagewatch's closeable objects."""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Closeable"]


class Closeable(abc.ABC):
    """``close()`` once (idempotent), ``with`` closes, and so does garbage collection.

    Subclasses implement :meth:`close` (which must tolerate being called again) and set
    ``closed``.
    """

    closed: bool

    @abc.abstractmethod
    def close(self) -> None:
        """Stop and release everything; calling it again does nothing."""

    def __enter__(self) -> Any:
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
