"""The errors of checkpoints."""

from __future__ import annotations

from typing import Any

from ..errors import PagewatchError

__all__ = ["CheckpointError", "CheckpointDamaged", "CheckpointConflict"]


class CheckpointError(PagewatchError):
    """A checkpoint cannot be used as asked (no such generation, held by another writer,
    an optional package missing, ...)."""

    __module__ = "pagewatch.checkpoint"

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.message,)


class CheckpointDamaged(CheckpointError):
    """A generation's bytes are not what was written: the message names the generation, the
    array (when the damage is inside one) and the part (``preamble``, ``trailer``,
    ``index``, ``runs``, ``data``, ``file``, ``chain``).

    Loading never returns data of a damaged generation, nor of one that needs it.

    Attributes
    ----------
    generation : int
    array : str or None
    part : str
    reason : str
    """

    __module__ = "pagewatch.checkpoint"

    def __init__(self, generation: int, array: str | None, part: str, reason: str) -> None:
        self.generation = generation
        self.array = array
        self.part = part
        self.reason = reason
        where = f"generation {generation}"
        if array is not None:
            where += f", array {array!r}"
        super().__init__(f"checkpoint damaged: {where}, {part}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[int, str | None, str, str]]:  # type: ignore[override]
        return type(self), (self.generation, self.array, self.part, self.reason)


class CheckpointConflict(CheckpointError):
    """Another writer committed to the checkpoint's branch since this writer's previous
    save (an Icechunk checkpoint: commits are optimistic, not locked).  The save committed
    nothing and reset no tracker; every generation already committed is intact.

    Attributes
    ----------
    theirs : str or None
        The snapshot the branch points to now (Icechunk's snapshot id), when known.
    ours : str or None
        The snapshot this writer's save was based on.
    """

    __module__ = "pagewatch.checkpoint"

    def __init__(self, message: str, *, theirs: str | None = None,
                 ours: str | None = None) -> None:
        self.theirs = theirs
        self.ours = ours
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return _conflict, (self.message, self.theirs, self.ours)


def _conflict(message: str, theirs: str | None, ours: str | None) -> CheckpointConflict:
    return CheckpointConflict(message, theirs=theirs, ours=ours)
