"""Checks on this process's memory shared by the backends, and the huge-page advice."""

from __future__ import annotations

import errno
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from .. import _native
from .._region import Region
from ..errors import InvalidRange, PagewatchError, TargetGone
from ..kernel.constants import MADV_HUGEPAGE, MADV_NOHUGEPAGE
from ..kernel.maps import Mapping, maps

_MS_ASYNC = 1  # <sys/mman.h>


#: callables ``(start, end) -> bool``: whether a backend made ``[start, end)`` read-only
#: itself (the mprotect backend registers one), so it is writable memory all the same
protected_by_us: list[Callable[[int, int], bool]] = []


def unmapped_error(region: Region, err: int | None = errno.ENOMEM) -> TargetGone:
    return TargetGone(
        f"the tracked memory [{region.start:#x}, {region.end:#x}) was unmapped (in whole or "
        "in part) while tracked: close the tracker before freeing its target", err)


def replaced_error(region: Region, how: str, err: int | None = None) -> TargetGone:
    return TargetGone(
        f"the tracked memory [{region.start:#x}, {region.end:#x}) was unmapped and new "
        f"memory mapped at its address ({how}): close the tracker before freeing its "
        "target, and track the new memory with a new tracker", err)


def check_mapped(region: Region) -> None:
    """Raise :class:`TargetGone` if any page of ``region`` is no longer mapped.

    ``msync`` with ``MS_ASYNC`` only walks the VMAs (a no-op otherwise) and fails with
    ENOMEM on a hole, so this costs microseconds.
    """
    try:
        _native.msync(region.start, region.length, _MS_ASYNC)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise unmapped_error(region, exc.errno) from exc
        raise


def check_writable_mapping(region: Region) -> None:
    """Every page of the region must be mapped, and writable."""
    cursor = region.start
    for m in maps("self"):
        if m.end <= cursor:
            continue
        if m.start > cursor:
            break
        lo, hi = max(m.start, cursor), min(m.end, region.end)
        if not m.writable and not any(f(lo, hi) for f in protected_by_us):
            raise InvalidRange(f"[{m.start:#x}, {m.end:#x}) {m.path or '(anonymous)'} inside "
                               f"the range is not writable ({m.perms})")
        cursor = m.end
        if cursor >= region.end:
            return
    raise InvalidRange(f"[{cursor:#x}, {region.end:#x}) is not mapped: a tracked range must "
                       "lie in mapped memory")


# ---- huge-page advice --------------------------------------------------------------------

def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "never"


def huge_page_flags(start: int, end: int) -> list[tuple[int, int, str]]:
    """The transparent-huge-page advice of ``[start, end)`` from ``/proc/self/smaps``:
    ``(start, end, "hg" | "nh" | "")`` per mapping piece."""
    out: list[tuple[int, int, str]] = []
    cur: tuple[int, int] | None = None
    with open("/proc/self/smaps", "rb") as f:
        for line in f:
            if line.startswith(b"VmFlags:"):
                if cur is not None:
                    flags = line.split()[1:]
                    adv = "hg" if b"hg" in flags else "nh" if b"nh" in flags else ""
                    out.append((cur[0], cur[1], adv))
                    cur = None
                continue
            head = line.split(b" ", 1)[0]
            if b"-" in head and not head.endswith(b":"):
                try:
                    a, b = (int(x, 16) for x in head.split(b"-"))
                except ValueError:
                    continue
                cur = (max(a, start), min(b, end)) if a < end and b > start else None
                if a >= end:
                    break
    return out


_holds: list[HugePageAdvice] = []
_holds_lock = threading.Lock()


class HugePageAdvice:
    """Transparent huge pages kept off a region while tracked, and the advice that was there
    given back at :meth:`restore`.

    Only what can be given back is changed: a piece advised ``MADV_HUGEPAGE`` (``hg``) gets
    ``MADV_NOHUGEPAGE`` and ``MADV_HUGEPAGE`` again at the end.  A piece with no advice is
    left alone unless the system makes huge pages for every mapping (``enabled=always``):
    the kernel has no call that clears the advice again, so such a piece keeps
    ``MADV_NOHUGEPAGE`` after close (without it, tracking would be 2 MiB-coarse there).
    Trackers over the same pages share the original advice: the last to close restores it.
    """

    def __init__(self, region: Region) -> None:
        self.region = region
        self.pieces: list[tuple[int, int, str]] = []
        mode = _thp_mode()
        if mode == "never":
            return
        with _holds_lock:
            for s, e, adv in huge_page_flags(region.start, region.end):
                for s2, e2, orig in self._originals(s, e, adv):
                    if orig == "hg" or (orig == "" and mode == "always"):
                        self.pieces.append((s2, e2, orig))
            for s, e, _ in self.pieces:
                try:
                    _native.madvise(s, e - s, MADV_NOHUGEPAGE)
                except OSError:
                    pass  # memory that refuses the advice is tracked as it is
            _holds.append(self)

    @staticmethod
    def _originals(s: int, e: int, adv: str) -> list[tuple[int, int, str]]:
        """Split ``[s, e)`` by what live holds recorded as the original advice there."""
        out, cursor = [], s
        known = sorted((max(s, a), min(e, b), o) for h in _holds for a, b, o in h.pieces
                       if a < e and b > s)
        for a, b, o in known:
            if a > cursor:
                out.append((cursor, a, adv))
            if b > cursor:
                out.append((max(a, cursor), b, o))
                cursor = b
        if cursor < e:
            out.append((cursor, e, adv))
        return out

    def restore(self) -> None:
        with _holds_lock:
            if self not in _holds:
                return
            _holds.remove(self)
            for s, e, orig in self.pieces:
                if orig != "hg":
                    continue
                cuts = sorted((max(s, a), min(e, b)) for h in _holds for a, b, _ in h.pieces
                              if a < e and b > s)
                cursor = s
                for a, b in [*cuts, (e, e)]:
                    if a > cursor:
                        try:
                            _native.madvise(cursor, a - cursor, MADV_HUGEPAGE)
                        except OSError:
                            pass  # unmapped meanwhile
                    cursor = max(cursor, b)


# ---- mapping identity ----------------------------------------------------------------------

Identity = tuple[tuple[int, int, str, int, int, bool], ...]


def mapping_identity(region: Region, entries: list[Mapping] | None = None) -> Identity:
    """What is mapped over ``region``, as ``/proc/self/maps`` shows it: per stretch of
    addresses, the device, inode and file offset mapped at its start, and whether it is
    shared.  Splitting or merging mappings (``mprotect``, ``madvise``) leaves it unchanged;
    new memory mapped at the same address changes it wherever the kernel can tell the two
    apart: a file, ``memfd`` or shared anonymous memory (each its own inode).  Two private
    anonymous mappings at one address look the same (the kernel numbers their pages by
    address)."""
    out: list[tuple[int, int, str, int, int, bool]] = []
    for m in maps("self") if entries is None else entries:
        if m.end <= region.start:
            continue
        if m.start >= region.end:
            break
        lo, hi = max(m.start, region.start), min(m.end, region.end)
        # (no file: the kernel shows offset 0, whatever the mapping; say so for any piece)
        off = m.offset + (lo - m.start) if m.inode else 0
        shared = m.perms[3:4] == "s"
        if out and out[-1][1] == lo and out[-1][2:4] == (m.dev, m.inode) and \
                out[-1][5] == shared and (not m.inode or out[-1][4] + (lo - out[-1][0]) == off):
            out[-1] = (out[-1][0], hi, *out[-1][2:])
        else:
            out.append((lo, hi, m.dev, m.inode, off, shared))
    return tuple(out)


def check_identity(region: Region, identity: Identity,
                   entries: list[Mapping] | None = None) -> None:
    """Raise :class:`TargetGone` if other memory is mapped over ``region`` now.

    Call after :func:`check_mapped`: ``/proc/self/maps`` is read in pieces, so a read racing
    a change of the mappings (our own handlers split them) may show holes that are not
    there; only what it shows mapped is compared.
    """
    for lo, hi, dev, inode, off, shared in mapping_identity(region, entries):
        for a, b, dev0, inode0, off0, shared0 in identity:
            if a >= hi or b <= lo:
                continue
            x = max(a, lo)
            if (dev, inode, shared) != (dev0, inode0, shared0) or \
                    (inode and off + (x - lo) != off0 + (x - a)):
                raise replaced_error(region, "another file or memory object is mapped there "
                                     "now")


# ---- errors shared by the backends ----------------------------------------------------------

def busy_error(me: object, exc: OSError) -> PagewatchError:
    """``EBUSY`` registering a userfaultfd: name the tracker holding the pages."""
    import sys

    region: Region = me.region  # type: ignore[attr-defined]
    name: str = me.name  # type: ignore[attr-defined]
    holders = []
    for modname in ("pagewatch.backends.uffd_async", "pagewatch.backends.uffd_sync"):
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        hub = getattr(mod.BACKEND, "hub", None) or getattr(mod, "_hub", None)
        for m in list(getattr(hub, "members", ())):
            if m.name != name and not m.closed and m.region.start < region.end and \
                    m.region.end > region.start:
                holders.append(f"a {m.name} tracker of [{m.region.start:#x}, "
                               f"{m.region.end:#x})")
    other = ", ".join(holders) or "another userfaultfd (not pagewatch's)"
    return PagewatchError(
        f"{name} cannot track [{region.start:#x}, {region.end:#x}): its memory is "
        f"registered with {other}, and the kernel allows one userfaultfd per mapping "
        "(uffd-sync and uffd-async need different ones, so they cannot share a page). Close "
        "that tracker, track these pages with the same backend as it, or use mprotect or "
        "compare, which coexist with both", exc.errno)


_T = TypeVar("_T")


def kernel_answer(fn: Callable[[], _T]) -> Callable[[], _T]:
    """Cache ``fn``'s answer for the life of the process, unless it raised: a passing
    shortage (``EMFILE``...) is raised and the next call tries again."""
    done: list[_T] = []

    @functools.wraps(fn)
    def wrapper() -> _T:
        if not done:
            done.append(fn())
        return done[0]

    return wrapper


def forget_replaced(start: int, end: int) -> None:
    """Before a userfaultfd registers ``[start, end)``: trackers of either userfaultfd
    backend whose memory there was replaced are gone (a registration by the other backend
    would hide the replacement from them)."""
    import sys

    for modname, attr in (("pagewatch.backends.uffd_async", "BACKEND"),
                          ("pagewatch.backends.uffd_sync", "_hub")):
        mod = sys.modules.get(modname)
        if mod is not None:
            obj = getattr(mod, attr)
            getattr(obj, "hub", obj).forget_replaced(start, end)
