"""Checks on this process's memory shared by the backends."""

from __future__ import annotations

import errno

from .. import _native
from ..errors import TargetGone
from ..kernel.constants import MADV_NOHUGEPAGE
from .base import Region

_MS_ASYNC = 1  # <sys/mman.h>


def check_mapped(region: Region) -> None:
    """Raise :class:`TargetGone` if any page of ``region`` is no longer mapped.

    ``msync`` with ``MS_ASYNC`` only walks the VMAs (a no-op otherwise) and fails with
    ENOMEM on a hole, so this costs microseconds.
    """
    try:
        _native.msync(region.start, region.length, _MS_ASYNC)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise TargetGone(
                f"the tracked memory [{region.start:#x}, {region.end:#x}) was unmapped (in "
                "whole or in part) while tracked: close the tracker before freeing its "
                "target", exc.errno) from exc
        raise


def no_huge_pages(region: Region) -> None:
    """Keep transparent huge pages off ``region`` (``huge_pages="split"``): write-state stays
    per 4 KiB page and a first write costs one small fault, not a 2 MiB one.  Best effort:
    memory that refuses the advice is tracked as it is."""
    try:
        _native.madvise(region.start, region.length, MADV_NOHUGEPAGE)
    except OSError:
        pass
