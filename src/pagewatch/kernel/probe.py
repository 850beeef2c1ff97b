"""What this kernel offers, found by trying each feature (as CRIU's kerndat does).

Version numbers are only used to word a reason: every answer comes from a real attempt.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import platform
from typing import Any

from .. import _native
from ..errors import PagewatchError, is_transient, transient_error
from .constants import PAGE_SIZE, PM_SOFT_DIRTY, PageCategory, UffdFeature
from .uffd import open_userfaultfd

__all__ = ["Capability", "Capabilities", "probe"]

# When each feature came, to say "needs Linux X" in a reason.
_UFFD_SINCE = {
    "PAGEFAULT_FLAG_WP": "5.7", "EVENT_FORK": "4.11", "EVENT_REMAP": "4.11",
    "EVENT_REMOVE": "4.11", "MISSING_HUGETLBFS": "4.11", "MISSING_SHMEM": "4.11",
    "EVENT_UNMAP": "4.11", "SIGBUS": "4.14", "THREAD_ID": "4.14", "MINOR_HUGETLBFS": "5.13",
    "MINOR_SHMEM": "5.14", "EXACT_ADDRESS": "5.18", "WP_HUGETLBFS_SHMEM": "5.19",
    "WP_UNPOPULATED": "6.4", "POISON": "6.6", "WP_ASYNC": "6.7", "MOVE": "6.8",
}
_CATEGORY_SINCE = {"SOFT_DIRTY": "6.8", "GUARD": "6.16"}


@dataclasses.dataclass(frozen=True)
class Capability:
    """One feature: whether it works here, and why (or why not)."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Everything :func:`probe` found.  ``as_dict()`` is what ``pagewatch probe --json``
    prints; its keys are documented in the README."""

    kernel: str
    arch: str
    page_size: int
    userfaultfd: Capability
    userfaultfd_how: str
    unprivileged_userfaultfd: int | None
    uffd_features: dict[str, Capability]
    uffd_wp_async: Capability
    pagemap_scan: Capability
    pagemap_scan_categories: dict[str, Capability]
    soft_dirty: Capability
    thp: str
    hugetlb_pages: int

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Capability):
                v = v.as_dict()
            elif isinstance(v, dict):
                v = {k: c.as_dict() for k, c in v.items()}
            out[f.name] = v
        return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _probe_userfaultfd() -> tuple[Capability, str, dict[str, Capability]]:
    try:
        fd, how = open_userfaultfd()
    except OSError as exc:  # Unsupported / PermissionDenied carry the reason
        none = Capability(False, "no userfaultfd")
        return Capability(False, str(exc)), "", {n: none for n in _UFFD_SINCE}
    try:
        # features=0 asks for nothing and is answered with everything the kernel supports.
        granted, _ = _native.uffdio_api(fd, 0)
    except OSError as exc:
        none = Capability(False, f"UFFDIO_API failed: {exc.strerror}")
        return Capability(False, f"UFFDIO_API failed: {exc.strerror}"), how, {
            n: none for n in _UFFD_SINCE}
    finally:
        os.close(fd)
    feats = {}
    for feat in UffdFeature:
        name = str(feat.name)
        if granted & feat:
            feats[name] = Capability(True, "granted by UFFDIO_API")
        else:
            feats[name] = Capability(
                False, f"not offered by this kernel's UFFDIO_API (needs Linux "
                f"{_UFFD_SINCE.get(name, '?')}+ built with the option it depends on)")
    return Capability(True, f"created with the {how}; {_kernel_faults()}"), how, feats


def _kernel_faults() -> str:
    """Whether this process may create a userfaultfd that handles faults taken by the kernel
    (a ``read(2)`` into a protected page) -- the one question where 'user-mode only' matters:
    uffd-sync handles such writes with it and fails them with EFAULT without it; uffd-async
    sees them either way (the written state is in the page table, no fault is handled)."""
    tried = []
    for how, fn in (("syscall", _native.userfaultfd), ("/dev/userfaultfd",
                                                         _native.userfaultfd_dev)):
        try:
            os.close(fn(os.O_CLOEXEC | os.O_NONBLOCK))
            return (f"kernel-mode faults allowed too (the {how} without UFFD_USER_MODE_ONLY): "
                    "uffd-sync handles writes made by system calls")
        except OSError as exc:
            tried.append(f"{how}: {exc.strerror}")
    return ("user-mode faults only (UFFD_USER_MODE_ONLY; without it: " + "; ".join(tried)
            + "): uffd-sync fails system calls writing tracked pages with EFAULT; "
            "uffd-async sees them all the same")


def _probe_wp_async() -> Capability:
    """Register, protect, write and scan a page for real."""
    from .uffd import Userfaultfd

    try:
        uffd = Userfaultfd(int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED))
    except OSError as exc:
        if is_transient(exc):
            raise
        return Capability(False, str(exc))
    buf = mmap.mmap(-1, 2 * PAGE_SIZE)
    try:
        addr = _native.buffer_info(buf)[0]
        uffd.register(addr, 2 * PAGE_SIZE)
        uffd.writeprotect(addr, 2 * PAGE_SIZE)
        buf[PAGE_SIZE] = 1
        try:
            ret, _, regions = _native.pagemap_scan_once(
                _PM.fd,
                addr, addr + 2 * PAGE_SIZE, 2, 2, 0, 0, 2, 0, 4)
        except OSError as exc:
            if is_transient(exc):
                raise
            return Capability(False, f"uffd-wp async registered, but PAGEMAP_SCAN failed: "
                              f"{exc.strerror}")
        if ret == 1 and int(regions[0][0]) == addr + PAGE_SIZE:
            return Capability(True, "a write to a protected page was seen by PAGEMAP_SCAN")
        return Capability(False, f"PAGEMAP_SCAN reported {regions.tolist()} after one write")
    except OSError as exc:
        if is_transient(exc):
            raise
        return Capability(False, str(exc))
    finally:
        uffd.close()
        buf.close()


class _PagemapFd:
    def __init__(self) -> None:
        self._fd = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:
            self._fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_PM = _PagemapFd()
_BAD_VEC = -4096  # a kernel address: access_ok fails, so a valid call ends in EFAULT


def _probe_pagemap_scan() -> tuple[Capability, dict[str, Capability]]:
    """The selftests' probe: vec pointing at kernel space gives EFAULT once every argument
    passed validation, EINVAL for an unknown category bit, ENOTTY without the ioctl."""

    def attempt(mask: int) -> int:
        try:
            _native.pagemap_scan_once(_PM.fd, 0, PAGE_SIZE, 0, mask, 0, 0, 0, 0, 1, _BAD_VEC)
        except OSError as exc:
            if is_transient(exc):
                raise
            return exc.errno or 0
        return 0

    cats = {}
    e = attempt(0)
    if e != errno.EFAULT:
        why = {errno.ENOTTY: "this kernel has no PAGEMAP_SCAN ioctl (it came in Linux 6.7)",
               errno.EINVAL: "PAGEMAP_SCAN rejected a minimal call"}.get(
                   e, f"unexpected answer to the probe call ({errno.errorcode.get(e, e)})")
        none = Capability(False, "no PAGEMAP_SCAN")
        return Capability(False, why), {str(c.name): none for c in PageCategory}
    for cat in PageCategory:
        name = str(cat.name)
        r = attempt(int(cat))
        if r == errno.EFAULT:
            cats[name] = Capability(True, "accepted by PAGEMAP_SCAN")
        else:
            cats[name] = Capability(False, f"PAGEMAP_SCAN rejects it "
                                    f"({errno.errorcode.get(r, r)}; needs Linux "
                                    f"{_CATEGORY_SINCE.get(name, '6.7')}+)")
    return Capability(True, "the ioctl answered on /proc/self/pagemap"), cats


def _soft_dirty_child(w: int) -> None:
    """In a forked child (clear_refs is process-wide): map, clear, write, read bit 55."""
    code = b"E"
    try:
        buf = mmap.mmap(-1, PAGE_SIZE)
        buf[0] = 1
        addr = _native.buffer_info(buf)[0]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4\n")
        with open("/proc/self/pagemap", "rb", buffering=0) as pm:
            before = int.from_bytes(os.pread(pm.fileno(), 8, addr // PAGE_SIZE * 8), "little")
            buf[0] = 2
            after = int.from_bytes(os.pread(pm.fileno(), 8, addr // PAGE_SIZE * 8), "little")
        code = b"%d%d" % (bool(before & PM_SOFT_DIRTY), bool(after & PM_SOFT_DIRTY))
    except OSError as exc:
        code = b"E" + str(exc).encode()
    finally:
        os.write(w, code)
        os._exit(0)


def _probe_soft_dirty() -> Capability:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        _soft_dirty_child(w)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    if answer == "01":
        return Capability(True, "a write after clear_refs set pagemap bit 55")
    if answer == "00":
        return Capability(False, "a write after clear_refs did not set pagemap bit 55: this "
                          "kernel was built without CONFIG_MEM_SOFT_DIRTY (or the arch has "
                          "none, as arm64)")
    if answer == "11":
        return Capability(False, "clear_refs 4 did not clear pagemap bit 55")
    return Capability(False, f"the soft-dirty trial failed: {answer[1:] or 'no answer'}")


_wp_async_cache: Capability | None = None


def probe_wp_async() -> tuple[bool, str]:
    """Whether async write-protect works here (tried once per process, then cached)."""
    global _wp_async_cache
    if _wp_async_cache is None:
        # Only the kernel's answers are kept: a passing shortage (EMFILE...) is raised, and
        # the next call tries again.
        try:
            scan, _ = _probe_pagemap_scan()
            _wp_async_cache = _probe_wp_async() if scan else Capability(
                False, f"needs PAGEMAP_SCAN: {scan.reason}")
        except OSError as exc:
            if is_transient(exc) and not isinstance(exc, PagewatchError):
                raise transient_error("trying async write-protect", exc) from exc
            raise
        finally:
            _PM.close()
    return _wp_async_cache.available, _wp_async_cache.reason


_soft_dirty_cache: Capability | None = None


def probe_soft_dirty() -> tuple[bool, str]:
    """Whether soft-dirty bits work here (tried once per process, in a child, then cached)."""
    global _soft_dirty_cache
    if _soft_dirty_cache is None:
        _soft_dirty_cache = _probe_soft_dirty()
    return _soft_dirty_cache.available, _soft_dirty_cache.reason


def probe() -> Capabilities:
    """Try every feature pagewatch can use and say which work here, each with a reason."""
    uffd, how, feats = _probe_userfaultfd()
    try:
        scan, cats = _probe_pagemap_scan()
        wp_async = _probe_wp_async() if (scan and feats["WP_ASYNC"]) else Capability(
            False, "needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+): " + (
                feats["WP_ASYNC"].reason if not feats["WP_ASYNC"] else scan.reason))
    finally:
        _PM.close()
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled") or "unavailable"
    if "[" in thp:
        thp = thp[thp.index("[") + 1:thp.index("]")]
    unpriv = _read("/proc/sys/vm/unprivileged_userfaultfd")
    return Capabilities(
        kernel=platform.release(),
        arch=platform.machine(),
        page_size=PAGE_SIZE,
        userfaultfd=uffd,
        userfaultfd_how=how,
        unprivileged_userfaultfd=int(unpriv) if unpriv is not None else None,
        uffd_features=feats,
        uffd_wp_async=wp_async,
        pagemap_scan=scan,
        pagemap_scan_categories=cats,
        soft_dirty=_probe_soft_dirty(),
        thp=thp,
        hugetlb_pages=int(_read("/proc/sys/vm/nr_hugepages") or 0),
    )
