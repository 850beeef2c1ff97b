"""Region: a range of this process's memory, and the region of any trackable object.

Below both :mod:`pagewatch.tracker` and :mod:`pagewatch.backends`: each imports it, neither
imports the other for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import _native
from .errors import InvalidRange
from .kernel.constants import PAGE_SIZE

__all__ = ["Region", "region_of"]


@dataclasses.dataclass(frozen=True)
class Region:
    """A range of this process's memory, ``[address, address + size)``, tracked at the
    pages that cover it: ``[start, end)``, page-aligned."""

    address: int
    size: int

    @property
    def start(self) -> int:
        return self.address - self.address % PAGE_SIZE

    @property
    def end(self) -> int:
        return -(-(self.address + self.size) // PAGE_SIZE) * PAGE_SIZE

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.length // PAGE_SIZE


def region_of(target: Any) -> tuple[Region, memoryview | None]:
    """The :class:`Region` of a target, and a view that keeps a buffer's memory alive.

    ``target`` is a :class:`Region`, anything with a ``region`` attribute holding one (a
    tracker), or a writable, contiguous object with the buffer protocol.
    """
    if not isinstance(target, Region) and isinstance(getattr(target, "region", None), Region):
        return target.region, None
    if isinstance(target, Region):
        if target.size <= 0:
            raise InvalidRange(f"empty range at {target.address:#x}")
        if target.address < 0:
            raise InvalidRange(f"negative address {target.address:#x}")
        return target, None
    try:
        view = memoryview(target)
    except TypeError:
        raise TypeError(f"cannot track {_a(target)} object: pass an object with the "
                        "buffer protocol (numpy array, bytearray, mmap, memoryview) or "
                        "pagewatch.Region(address, size)") from None
    try:
        address, nbytes, readonly = _native.buffer_info(view)
    except BufferError:
        raise InvalidRange(f"this {type(target).__name__} object is not one contiguous block of "
                           "memory: track its base array or a contiguous copy") from None
    if readonly:
        raise InvalidRange(f"this {type(target).__name__} object is read-only: nothing can write it")
    if nbytes == 0:
        raise InvalidRange(f"this {type(target).__name__} object is empty")
    return Region(address, nbytes), view


def _a(target: object) -> str:
    """``a bytes``, ``an int``: the article and the type name, for messages."""
    name = type(target).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
