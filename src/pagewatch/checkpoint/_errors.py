"""The errors of checkpoints."""

from __future__ import annotations

from ..errors import PagewatchError

__all__ = ["CheckpointError", "CheckpointDamaged"]


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
