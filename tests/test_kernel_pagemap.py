"""PAGEMAP_SCAN through ``pagewatch.kernel``: the ground of the kernel's own selftest
``tools/testing/selftests/mm/pagemap_ioctl.c``, from Python.

Raw single calls (:func:`pagemap_scan_once`) pin what the kernel itself does, early stops and
``walk_end`` included; the looping :func:`pagemap_scan` pins what pagewatch promises on top
(the kernel's early stops are invisible, ``max_pages`` is exact, bad arguments get a clear
error before the kernel sees them).  Comments name the selftest group each test stands for.

Memory is mapped with mmap(2) through ctypes, not the ``mmap`` module, so tests can move,
split and unmap it.  Anonymous and file areas get ``MADV_NOHUGEPAGE`` unless a test wants
THP, so page counts are exact on kernels whose THP mode is ``always``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pagewatch import _native
from pagewatch.errors import InvalidRange, PagewatchError, Unsupported
from pagewatch.kernel import (
    PageCategory,
    Pagemap,
    ScanFlag,
    UffdFeature,
    Userfaultfd,
    decode_pagemap,
    maps,
    pagemap_scan,
    pagemap_scan_once,
    read_pagemap,
)
from pagewatch.kernel.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
)

P = PAGE_SIZE
WPALLOWED = int(PageCategory.WPALLOWED)
WRITTEN = int(PageCategory.WRITTEN)
FILE = int(PageCategory.FILE)
PRESENT = int(PageCategory.PRESENT)
SWAPPED = int(PageCategory.SWAPPED)
PFNZERO = int(PageCategory.PFNZERO)
HUGE = int(PageCategory.HUGE)
#: The selftest's PAGEMAP_BITS_ALL: the categories every kernel with PAGEMAP_SCAN accepts.
BITS_ALL = 0x7F
WP = int(ScanFlag.WP_MATCHING)
CHECK = int(ScanFlag.CHECK_WPASYNC)
RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_HUGETLB = 0x40000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
IPC_PRIVATE, IPC_CREAT, IPC_RMID, SHM_HUGETLB = 0, 0o1000, 0, 0o4000
MS_SYNC = 4
SECONDS = float(os.environ.get("PAGEWATCH_TEST_SECONDS", "1"))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


PMD_SIZE = int(_read("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") or 0)
THP_MODE = _read("/sys/kernel/mm/transparent_hugepage/enabled") or "unavailable"


# ---- what this kernel offers: tried, not guessed from its version ------------------------

def _why_no_scan() -> str:
    try:
        with Pagemap() as pm:
            pagemap_scan_once(pm, 0, 0)
    except OSError as exc:
        return (f"PAGEMAP_SCAN refused a zero-length scan ({errno.errorcode.get(exc.errno or 0)}): "
                "the ioctl came in Linux 6.7")
    return ""


def _why_no_async() -> str:
    why = _why_no_scan()
    if why:
        return why
    try:
        Userfaultfd(int(UffdFeature.WP_ASYNC)).close()
    except OSError as exc:
        return f"no async userfaultfd write-protect here: {exc}"
    return ""


NO_SCAN = _why_no_scan()
NO_ASYNC = _why_no_async()
needs_scan = pytest.mark.skipif(bool(NO_SCAN), reason=NO_SCAN or "n/a")
needs_async = pytest.mark.skipif(bool(NO_ASYNC), reason=NO_ASYNC or "n/a")


# ---- memory mapped with mmap(2) directly ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_FAILED = ctypes.c_void_p(-1).value


def _check_ptr(r: int | None, what: str) -> int:
    if r is None or r == _FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return int(r)


class Area:
    """Pages mapped with mmap(2), touched from C (ctypes), unmapped at teardown."""

    def __init__(self, addr: int, npages: int, unmap: Callable[[], object] | None = None,
                 ) -> None:
        self.addr = addr
        self.npages = npages
        self._unmap = unmap or (lambda: _libc.munmap(self.addr, self.size))
        self.mapped = True
        self.huge = False  #: THP or hugetlb: written state may be huge-page granular

    @classmethod
    def map(cls, npages: int, *, prot: int = RW, flags: int = ANON, fd: int = -1,
            addr: int | None = None, align: int = 0, thp: bool = False) -> Area:
        size = npages * P
        if align:  # map more, then trim to an aligned start
            raw = _check_ptr(_libc.mmap(None, size + align, prot, flags, fd, 0), "mmap")
            start = -(-raw // align) * align
            if start > raw:
                _libc.munmap(raw, start - raw)
            if raw + size + align > start + size:
                _libc.munmap(start + size, raw + size + align - start - size)
        else:
            start = _check_ptr(_libc.mmap(addr, size, prot, flags | (MAP_FIXED if addr else 0),
                                          fd, 0), "mmap")
        area = cls(start, npages)
        if not flags & MAP_HUGETLB:
            try:  # exact page granularity even where THP is "always"
                _native.madvise(start, size, MADV_HUGEPAGE if thp else MADV_NOHUGEPAGE)
            except OSError:
                if thp:
                    area.unmap()
                    raise
        return area

    @property
    def size(self) -> int:
        return self.npages * P

    @property
    def end(self) -> int:
        return self.addr + self.size

    def page(self, i: int) -> int:
        return self.addr + i * P

    def write(self, *pages: int, value: int = 1) -> None:
        for i in pages:
            ctypes.memset(self.page(i), value, 1)

    def fill(self, lo: int = 0, hi: int | None = None, value: int = 0xFF) -> None:
        hi = self.npages if hi is None else hi
        ctypes.memset(self.page(lo), value, (hi - lo) * P)

    def read(self, *pages: int) -> None:
        for i in pages:
            ctypes.string_at(self.page(i), 1)

    def unmap(self) -> None:
        if self.mapped:
            self._unmap()
            self.mapped = False


def runs(regions: np.ndarray, area: Area) -> list[tuple[int, int]]:
    """``(first, end)`` page indices of PAGEMAP_SCAN rows, relative to ``area``."""
    return [((int(s) - area.addr) // P, (int(e) - area.addr) // P) for s, e, _ in regions]


def npages(regions: np.ndarray) -> int:
    return int(((regions[:, 1] - regions[:, 0]) // np.uint64(P)).sum()) if len(regions) else 0


def get(pm: Pagemap, a: Area, lo: int = 0, hi: int | None = None, **kw: object) -> np.ndarray:
    """The written pages of ``a[lo:hi]``, without reset (the tracking masks)."""
    kw.setdefault("return_mask", WRITTEN)
    return pagemap_scan(pm, a.page(lo), a.page(a.npages if hi is None else hi),
                        category_mask=WRITTEN, check_wpasync=True, **kw)  # type: ignore[arg-type]


def reset(pm: Pagemap, a: Area, lo: int = 0, hi: int | None = None, **kw: object) -> np.ndarray:
    """Get and reset (``WP_MATCHING``): the selftest's wp_addr_range, with output."""
    return get(pm, a, lo, hi, wp_matching=True, **kw)


def arm(uffd: Userfaultfd, a: Area) -> None:
    """The selftest's wp_init: register for write-protect and protect every page."""
    uffd.register(a.addr, a.size)
    uffd.writeprotect(a.addr, a.size)


@pytest.fixture
def pm() -> Iterator[Pagemap]:
    with Pagemap() as p:
        yield p


@pytest.fixture
def area() -> Iterator[Callable[..., Area]]:
    made: list[Area] = []

    def make(npages: int, **kw: object) -> Area:
        a = Area.map(npages, **kw)  # type: ignore[arg-type]
        made.append(a)
        return a

    yield make
    for a in reversed(made):
        a.unmap()


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    if NO_ASYNC:
        pytest.skip(NO_ASYNC)
    with Userfaultfd() as u:
        yield u


@pytest.fixture
def tracked(area: Callable[..., Area], uffd: Userfaultfd) -> Callable[..., Area]:
    """Memory registered for async write-protect and armed: nothing reads as written."""

    def make(npages: int, **kw: object) -> Area:
        a = area(npages, **kw)
        arm(uffd, a)
        return a

    return make


def thp_area(area: Callable[..., Area], pm: Pagemap, nhuge: int) -> Area:
    """``nhuge`` PMD-aligned huge pages with MADV_HUGEPAGE, written so THPs fault in."""
    if not PMD_SIZE:
        pytest.skip("no transparent huge pages (no /sys/kernel/mm/transparent_hugepage)")
    try:
        a = area(nhuge * PMD_SIZE // P, align=PMD_SIZE, thp=True)
    except OSError as exc:
        pytest.skip(f"madvise(MADV_HUGEPAGE) refused: {exc}")
    a.fill(value=0)
    a.huge = True
    huge = pagemap_scan(pm, a.addr, a.end, category_mask=HUGE, return_mask=HUGE)
    if runs(huge, a) != [(0, a.npages)]:
        pytest.skip(f"no THP appeared on a 2 MiB-aligned MADV_HUGEPAGE range (THP mode: "
                    f"{THP_MODE}; memory fragmented?)")
    return a


def _meminfo(key: str) -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


@pytest.fixture(scope="module")
def hugetlb() -> Iterator[int]:
    """Reserve a few default-size hugetlb pages (root only), restore the sysctl after.
    Gives the huge page size."""
    size_kb = _meminfo("Hugepagesize")
    if size_kb <= 0:
        pytest.skip("no hugetlb: /proc/meminfo has no Hugepagesize")
    path = "/proc/sys/vm/nr_hugepages"
    old = _read(path)
    want = 4
    changed = False
    if _meminfo("HugePages_Free") < want:
        try:
            with open(path, "w") as f:
                f.write(f"{int(old or 0) + want}\n")
            changed = True
        except OSError as exc:
            pytest.skip(f"cannot reserve hugetlb pages via {path} ({exc.strerror}): needs root")
    try:
        if _meminfo("HugePages_Free") < want:
            pytest.skip(f"the kernel could not reserve {want} hugetlb pages of {size_kb} kB")
        yield size_kb * 1024
    finally:
        if changed:
            with open(path, "w") as f:
                f.write(f"{old}\n")


# =============================================================================================
# sanity_tests_sd, part 1: every argument the kernel rejects, raw
# =============================================================================================

@needs_scan
@pytest.mark.parametrize("size", [0, 88, 95, 97, 104, 2**64 - 1])
def test_kernel_rejects_an_argument_size_other_than_96(pm: Pagemap, area: Callable[..., Area],
                                                       size: int) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr, a.end, return_mask=WRITTEN, vec_len=4, size=size)
    assert exc.value.errno == errno.EINVAL
    assert pagemap_scan_once(pm, a.addr, a.end, return_mask=WRITTEN, vec_len=4, size=96)[0] >= 0


@needs_scan
@pytest.mark.parametrize("flags", [1 << 2, WP | CHECK | 0xFF, 1 << 63, 2**64 - 1])
def test_kernel_rejects_unknown_flag_bits(pm: Pagemap, area: Callable[..., Area],
                                          flags: int) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr, a.end, flags=flags, category_mask=WRITTEN,
                          return_mask=WRITTEN, vec_len=4)
    assert exc.value.errno == errno.EINVAL


@needs_scan
@pytest.mark.parametrize("field", ["category_mask", "category_inverted",
                                   "category_anyof_mask", "return_mask"])
@pytest.mark.parametrize("bit", [0x1000, 1 << 40, 1 << 63])
def test_kernel_rejects_mask_bits_outside_its_categories(pm: Pagemap, area: Callable[..., Area],
                                                         field: str, bit: int) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr, a.end, vec_len=4, **{field: bit | WRITTEN})
    assert exc.value.errno == errno.EINVAL


@needs_scan
@pytest.mark.parametrize("offset", [1, 8, P // 2, P - 1])
def test_kernel_rejects_an_unaligned_start(pm: Pagemap, area: Callable[..., Area],
                                           offset: int) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr + offset, a.end, return_mask=WRITTEN, vec_len=4)
    assert exc.value.errno == errno.EINVAL


@needs_scan
def test_kernel_rejects_a_null_vec_with_a_nonzero_vec_len(pm: Pagemap,
                                                          area: Callable[..., Area]) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr, a.end, return_mask=WRITTEN, vec_len=4, vec_addr=0)
    # EINVAL since the 6.7 release; a late draft of the patch said EFAULT.
    assert exc.value.errno in (errno.EINVAL, errno.EFAULT)


@needs_scan
def test_kernel_rejects_end_below_start_with_efault(pm: Pagemap,
                                                    area: Callable[..., Area]) -> None:
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.page(2), a.page(1), return_mask=WRITTEN, vec_len=4)
    assert exc.value.errno == errno.EFAULT


@needs_scan
@pytest.mark.parametrize("where", ["end", "start"])
def test_kernel_rejects_a_range_beyond_task_size_with_efault(pm: Pagemap,
                                                             area: Callable[..., Area],
                                                             where: str) -> None:
    a = area(4)
    start, end = (a.addr, 1 << 63) if where == "end" else (1 << 63, (1 << 63) + P)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, start, end, return_mask=WRITTEN, vec_len=4)
    assert exc.value.errno == errno.EFAULT


@needs_scan
def test_kernel_rejects_an_output_vec_in_kernel_space_with_efault(pm: Pagemap,
                                                                  area: Callable[..., Area],
                                                                  ) -> None:
    # The feature probe of the kernel's vm_util.c: everything else valid, so EFAULT.
    a = area(4)
    with pytest.raises(OSError) as exc:
        pagemap_scan_once(pm, a.addr, a.end, return_mask=WRITTEN, vec_len=1, vec_addr=-P)
    assert exc.value.errno == errno.EFAULT


@needs_scan
@pytest.mark.parametrize("flags", [0, WP | CHECK])
@pytest.mark.parametrize("vec_len", [0, 8])
def test_zero_length_range_is_valid_and_walk_end_is_start(pm: Pagemap, tracked: Callable[..., Area],
                                                          flags: int, vec_len: int) -> None:
    # sanity_tests_sd "Zero range size is valid", "Walk_end: Same start and end ..."
    a = tracked(8)
    a.fill()
    ret, walk_end, regions = pagemap_scan_once(pm, a.page(3), a.page(3), flags=flags,
                                               category_mask=WRITTEN, return_mask=WRITTEN,
                                               vec_len=vec_len)
    assert (ret, walk_end, len(regions)) == (0, a.page(3), 0)
    assert len(get(pm, a)) == 1  # nothing was reset


@needs_scan
@pytest.mark.parametrize("vec_addr", [-1, 0])
def test_vec_len_zero_is_valid_and_outputs_nothing(pm: Pagemap, area: Callable[..., Area],
                                                   vec_addr: int) -> None:
    # sanity_tests_sd "output buffer can be 0" (with a buffer, and with vec NULL)
    a = area(8)
    a.fill()
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=BITS_ALL,
                                               return_mask=BITS_ALL, vec_addr=vec_addr)
    assert (ret, walk_end, len(regions)) == (0, a.end, 0)


@needs_async
def test_vec_len_zero_with_wp_matching_still_protects(pm: Pagemap,
                                                      tracked: Callable[..., Area]) -> None:
    # The selftest's wp_addr_range: WP_MATCHING without output (small pages only: with a
    # partial THP this path oopses kernels before 6.17 / 6.12.50).
    a = tracked(8)
    a.write(1, 5)
    assert pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, category_mask=WRITTEN,
                             return_mask=WRITTEN)[0] == 0
    assert runs(get(pm, a), a) == []


@needs_scan
def test_unmapped_region_scans_empty_without_error(pm: Pagemap, area: Callable[..., Area]) -> None:
    # unmapped_region_tests: a hole with no VMA is skipped silently.
    a = area(64)
    a.unmap()
    not_written = BITS_ALL & ~WRITTEN
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=not_written,
                                               return_mask=not_written, vec_len=64)
    assert (ret, walk_end) == (0, a.end)
    assert len(pagemap_scan(pm, a.addr, a.end, return_mask=BITS_ALL)) == 0
    assert len(pagemap_scan(pm, a.addr, a.end, check_wpasync=True, wp_matching=True,
                            category_mask=WRITTEN)) == 0


# =============================================================================================
# The friendly pagemap_scan: clear errors, before the kernel where it can
# =============================================================================================

def test_pagemap_scan_refuses_an_unaligned_start_before_the_kernel(pm: Pagemap,
                                                                   area: Callable[..., Area],
                                                                   ) -> None:
    a = area(4)
    with pytest.raises(InvalidRange, match="not aligned") as exc:
        pagemap_scan(pm, a.addr + 8, a.end)
    assert exc.value.errno is None  # refused in Python: works without PAGEMAP_SCAN too


def test_pagemap_scan_refuses_end_below_start_before_the_kernel(pm: Pagemap,
                                                                area: Callable[..., Area]) -> None:
    a = area(4)
    with pytest.raises(InvalidRange, match="below start") as exc:
        pagemap_scan(pm, a.page(2), a.page(1))
    assert exc.value.errno is None


@pytest.mark.parametrize("start,end", [(-P, P), (0, 2**64), (P, 2**64 + 2 * P),
                                       (0, 2**64 - 1)])
def test_pagemap_scan_refuses_addresses_outside_64_bits(pm: Pagemap, start: int,
                                                        end: int) -> None:
    # Passed on as they are, they would wrap in the struct and scan another range.
    with pytest.raises(InvalidRange) as exc:
        pagemap_scan(pm, start, end)
    assert exc.value.errno is None


@pytest.mark.parametrize("field", ["category_mask", "category_inverted",
                                   "category_anyof_mask", "return_mask"])
@pytest.mark.parametrize("value", [0x1000, 1 << 63, -1])
def test_pagemap_scan_refuses_bits_that_are_no_category_with_value_error(
        pm: Pagemap, area: Callable[..., Area], field: str, value: int) -> None:
    a = area(4)
    with pytest.raises(ValueError, match=field) as exc:
        pagemap_scan(pm, a.addr, a.end, **{field: value})  # type: ignore[arg-type]
    assert not isinstance(exc.value, OSError)  # not the kernel's EINVAL: refused before it


def test_pagemap_scan_refuses_a_negative_max_pages(pm: Pagemap, area: Callable[..., Area]) -> None:
    a = area(4)
    with pytest.raises(ValueError, match="max_pages"):
        pagemap_scan(pm, a.addr, a.end, max_pages=-1)


@needs_scan
@pytest.mark.parametrize("cat", list(PageCategory), ids=lambda c: str(c.name))
def test_pagemap_scan_reports_a_category_this_kernel_lacks_as_invalid_range(
        pm: Pagemap, area: Callable[..., Area], cat: PageCategory) -> None:
    # SOFT_DIRTY is 6.8+, GUARD 6.16+: pagewatch knows them, the kernel may not.  Whatever
    # the kernel says to the raw call, the friendly one says the same, in its own words.
    a = area(4)
    try:
        pagemap_scan_once(pm, a.addr, a.end, category_anyof_mask=int(cat), vec_len=4)
        accepted = True
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        accepted = False
    if accepted:
        pagemap_scan(pm, a.addr, a.end, category_anyof_mask=int(cat))
    else:
        with pytest.raises(InvalidRange, match="category bit this kernel does not know") as e:
            pagemap_scan(pm, a.addr, a.end, category_anyof_mask=int(cat))
        assert e.value.errno == errno.EINVAL


@needs_scan
def test_pagemap_scan_turns_the_kernels_efault_into_invalid_range(pm: Pagemap) -> None:
    with pytest.raises(InvalidRange, match="outside the address space") as exc:
        pagemap_scan(pm, 1 << 63, (1 << 63) + P)
    assert exc.value.errno == errno.EFAULT


@needs_scan
def test_check_wpasync_on_an_unregistered_range_fails(pm: Pagemap,
                                                      area: Callable[..., Area]) -> None:
    a = area(4)
    a.fill()
    for flags in (CHECK, CHECK | WP):  # even without WP_MATCHING
        with pytest.raises(OSError) as raw:
            pagemap_scan_once(pm, a.addr, a.end, flags=flags, category_mask=WRITTEN,
                              return_mask=WRITTEN, vec_len=4)
        assert raw.value.errno == errno.EPERM
    with pytest.raises(InvalidRange, match="not registered for async write-protect") as exc:
        pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN, check_wpasync=True)
    assert exc.value.errno == errno.EPERM


@pytest.mark.skipif(not NO_SCAN, reason="this kernel has PAGEMAP_SCAN")
def test_pagemap_scan_without_the_ioctl_raises_unsupported(pm: Pagemap,
                                                           area: Callable[..., Area]) -> None:
    a = area(4)
    with pytest.raises(Unsupported, match="PAGEMAP_SCAN") as exc:
        pagemap_scan(pm, a.addr, a.end)
    assert exc.value.errno == errno.ENOTTY


@needs_scan
def test_pagemap_scan_takes_a_pid_self_or_an_open_pagemap(pm: Pagemap,
                                                          area: Callable[..., Area]) -> None:
    a = area(4)
    a.write(1)
    want = pagemap_scan(pm, a.addr, a.end, category_mask=PRESENT, return_mask=PRESENT)
    assert runs(want, a) == [(1, 2)]
    for target in ("self", os.getpid()):
        got = pagemap_scan(target, a.addr, a.end, category_mask=PRESENT, return_mask=PRESENT)
        assert np.array_equal(got, want)


@needs_scan
def test_pagemap_scan_of_an_empty_range_is_an_empty_uint64_table(pm: Pagemap) -> None:
    out = pagemap_scan(pm, P * 16, P * 16)
    assert out.shape == (0, 3) and out.dtype == np.uint64


# =============================================================================================
# Get, reset, CHECK_WPASYNC (sanity_tests_sd, base_tests on anonymous memory, test_simple)
# =============================================================================================

@needs_async
def test_get_without_reset_reports_the_same_pages_again(pm: Pagemap,
                                                        tracked: Callable[..., Area]) -> None:
    a = tracked(16)
    a.write(0, 3, 4, 15)
    first = get(pm, a)
    assert runs(first, a) == [(0, 1), (3, 5), (15, 16)]
    assert np.array_equal(get(pm, a), first)
    assert (first[:, 2] == WRITTEN).all()


@needs_async
def test_get_with_wp_matching_resets_so_a_rescan_is_empty(pm: Pagemap,
                                                          tracked: Callable[..., Area]) -> None:
    a = tracked(16)
    a.write(2, 9)
    assert runs(reset(pm, a), a) == [(2, 3), (9, 10)]
    assert runs(get(pm, a), a) == []
    a.write(9)
    assert runs(get(pm, a), a) == [(9, 10)]


@needs_async
def test_check_wpasync_on_a_registered_range_succeeds(pm: Pagemap,
                                                      tracked: Callable[..., Area]) -> None:
    a = tracked(4)
    a.write(1)
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, flags=CHECK,
                                               category_mask=WRITTEN, return_mask=WRITTEN,
                                               vec_len=4)
    assert (ret, walk_end, runs(regions, a)) == (1, a.end, [(1, 2)])


@needs_async
def test_written_state_follows_a_hundred_protect_write_cycles(pm: Pagemap,
                                                              tracked: Callable[..., Area],
                                                              ) -> None:
    # test_simple
    a = tracked(1)
    for _ in range(100):
        assert pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                 return_mask=WRITTEN, vec_len=1)[0] == 0
        a.write(0)
        assert pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                 return_mask=WRITTEN, vec_len=1)[0] == 1
        reset(pm, a)


@needs_async
def test_every_other_page_written_gives_one_region_per_page(pm: Pagemap,
                                                            tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Repeated pattern of written and non-written pages"
    a = tracked(200)
    _native.poke(a.addr, a.size, 2 * P, 1)
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                               return_mask=WRITTEN, vec_len=100)
    assert (ret, walk_end) == (100, a.end)
    assert runs(regions, a) == [(i, i + 1) for i in range(0, 200, 2)]


@needs_async
def test_a_pattern_collected_in_parts_adds_up(pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Repeated pattern of written and non-written pages in parts"
    n = 200
    a = tracked(n)
    _native.poke(a.addr, a.size, 2 * P, 1)
    ret1 = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, max_pages=n // 2 - 2,
                             category_mask=WRITTEN, return_mask=WRITTEN, vec_len=n)[0]
    ret2 = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN, return_mask=WRITTEN,
                             vec_len=2)[0]
    ret3 = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, category_mask=WRITTEN,
                             return_mask=WRITTEN, vec_len=n)[0]
    assert (ret1, ret2, ret3) == (n // 2 - 2, 2, 2)


@needs_async
def test_max_pages_half_then_the_rest(pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Repeated pattern of written and non-written pages max_pages"
    n = 200
    a = tracked(n)
    _native.poke(a.addr, a.size, 2 * P, 1)
    a.write(n - 1)
    ret = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, max_pages=n // 2,
                            category_mask=WRITTEN, return_mask=WRITTEN, vec_len=n)[0]
    ret2, _, rest = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK,
                                      category_mask=WRITTEN, return_mask=WRITTEN, vec_len=n)
    assert (ret, ret2, runs(rest, a)) == (n // 2, 1, [(n - 1, n)])


@needs_async
def test_getting_and_clearing_two_pages_leaves_the_others_written(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "only get 2 written pages and clear them as well"
    n = 50
    a = tracked(n)
    a.fill()
    ret, _, got = pagemap_scan_once(pm, a.page(1), a.page(3), flags=WP | CHECK, max_pages=2,
                                    category_mask=WRITTEN, return_mask=WRITTEN, vec_len=1)
    assert (ret, runs(got, a)) == (1, [(1, 3)])
    assert runs(get(pm, a), a) == [(0, 1), (3, n)]


@needs_async
def test_two_registered_mappings_reset_independently(pm: Pagemap,
                                                     tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Two regions"
    m0, m1 = tracked(20), tracked(20)
    m0.fill(value=ord("a"))
    m1.fill(value=ord("b"))
    reset(pm, m0)
    assert runs(get(pm, m0), m0) == []
    assert runs(get(pm, m1), m1) == [(0, 20)]


@needs_async
def test_three_max_pages_calls_add_up_to_every_write(pm: Pagemap,
                                                     tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Smaller max_pages"
    n = 1050
    a = tracked(n)
    _native.poke(a.addr, a.size, 2 * P, 1)
    total = 0
    for _ in range(3):
        ret, _, regions = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK,
                                            max_pages=n // 5, category_mask=WRITTEN,
                                            return_mask=WRITTEN, vec_len=n // 2)
        assert ret == len(regions) and npages(regions) == ret
        total += ret
    assert total == n // 2


@needs_async
def test_looping_on_walk_end_with_a_small_vec_reads_every_write(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Smaller vec": the caller loop the kernel's contract asks for
    n, vec_len = 2000, 50
    a = tracked(n)
    rng = np.random.default_rng(20231101)
    for _ in range(5):
        pages = np.flatnonzero(rng.random(n) < 0.5)
        for i in pages.tolist():
            a.write(i)
        seen: list[tuple[int, int]] = []
        cursor, calls = a.addr, 0
        while cursor < a.end:
            ret, cursor, regions = pagemap_scan_once(pm, cursor, a.end, flags=WP | CHECK,
                                                     category_mask=WRITTEN,
                                                     return_mask=WRITTEN, vec_len=vec_len)
            assert ret <= vec_len
            seen += runs(regions, a)
            calls += 1
        expect = {int(i) for i in pages}
        assert {i for s, e in seen for i in range(s, e)} == expect
        assert calls > 1  # the vec did fill mid-walk


@needs_async
@pytest.mark.parametrize("max_pages", ["1", "N-1", "N", "N+1"])
def test_max_pages_is_exact_and_walk_end_points_past_the_last_page(
        pm: Pagemap, tracked: Callable[..., Area], max_pages: str) -> None:
    n = 8  # written pages: 0, 2, ..., 14 of 16
    a = tracked(2 * n)
    _native.poke(a.addr, a.size, 2 * P, 1)
    limit = {"1": 1, "N-1": n - 1, "N": n, "N+1": n + 1}[max_pages]
    want = min(limit, n)
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                               return_mask=WRITTEN, max_pages=limit,
                                               vec_len=2 * n)
    assert ret == want and runs(regions, a) == [(2 * i, 2 * i + 1) for i in range(want)]
    # Stopped by max_pages: walk_end is the next written page, where output was refused.
    assert walk_end == (a.page(2 * want) if limit < n else a.end)
    # pagewatch: exactly that many pages, and with WP_MATCHING only those are reset.
    got = reset(pm, a, max_pages=limit)
    assert runs(got, a) == [(2 * i, 2 * i + 1) for i in range(want)]
    assert runs(get(pm, a), a) == [(2 * i, 2 * i + 1) for i in range(want, n)]


@needs_async
@pytest.mark.parametrize("max_pages", [1, 499, 500, 999, 1000, 2**64 - 1])
def test_max_pages_truncates_a_run_and_walk_end_follows(pm: Pagemap,
                                                        tracked: Callable[..., Area],
                                                        max_pages: int) -> None:
    # sanity_tests_sd walk_end: "Max pages specified", "Half max pages", "1 max page",
    # "max pages" (-1), all pages written
    n = 1000
    a = tracked(n)
    a.fill()
    want = min(max_pages, n)
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                               return_mask=WRITTEN, max_pages=max_pages,
                                               vec_len=n)
    assert (ret, runs(regions, a), walk_end) == (1, [(0, want)], a.page(want))
    got = pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN, max_pages=max_pages)
    assert runs(got, a) == [(0, want)]


@needs_async
def test_walk_end_of_a_dense_range_with_a_vec_of_one_is_end(pm: Pagemap,
                                                            tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "Walk_end: vec of minimum length": one run fills one slot
    a = tracked(100)
    a.fill()
    for vec_len, max_pages in ((1, 0), (1, 100), (100, 0)):
        ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                                   return_mask=WRITTEN, max_pages=max_pages,
                                                   vec_len=vec_len)
        assert (ret, walk_end, runs(regions, a)) == (1, a.end, [(0, 100)])


@needs_async
@pytest.mark.parametrize("vec_len,max_pages,stop", [
    (1, 0, 2), (1, 100, 2), (50, 100, None), (100, 100, None), (100, 50, None), (100, 1, 2)])
def test_vec_full_mid_walk_stops_at_the_next_match(pm: Pagemap, tracked: Callable[..., Area],
                                                   vec_len: int, max_pages: int,
                                                   stop: int | None) -> None:
    # sanity_tests_sd "Walk_end sparse: ...": every other page of 100 written (50 pages)
    a = tracked(100)
    _native.poke(a.addr, a.size, 2 * P, 1)
    ret, walk_end, regions = pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                                               return_mask=WRITTEN, max_pages=max_pages,
                                               vec_len=vec_len)
    n = min(vec_len, max_pages or 100, 50)
    assert ret == n and runs(regions, a) == [(2 * i, 2 * i + 1) for i in range(n)]
    assert walk_end == (a.end if stop is None else a.page(stop))


@needs_async
def test_pagemap_scan_hides_a_full_vec_and_returns_every_run(pm: Pagemap,
                                                             tracked: Callable[..., Area]) -> None:
    a = tracked(1000)
    _native.poke(a.addr, a.size, 2 * P, 1)
    # A capacity below the run count makes both the kernel and the buffer stop and resume.
    got = pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN, capacity=16)
    assert runs(got, a) == [(i, i + 1) for i in range(0, 1000, 2)]
    regions, walk_end, pages = _native.pagemap_scan(pm.fileno(), a.addr, a.end, 0, WRITTEN, 0,
                                                    0, WRITTEN, 0, 16, True)
    assert (walk_end, pages, len(regions)) == (a.end, 500, 500)


@needs_async
def test_max_pages_counts_pages_across_runs(pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(300)
    a.fill(10, 290)
    a.write(5)
    assert runs(get(pm, a, max_pages=100), a) == [(5, 6), (10, 109)]
    assert runs(reset(pm, a, max_pages=100), a) == [(5, 6), (10, 109)]
    assert runs(get(pm, a), a) == [(109, 290)]


# =============================================================================================
# Masks (sanity_tests)
# =============================================================================================

@needs_async
@pytest.mark.parametrize("flags", [0, WP | CHECK])
@pytest.mark.parametrize("masks", [
    dict(category_mask=BITS_ALL, return_mask=BITS_ALL),
    dict(category_anyof_mask=BITS_ALL, return_mask=BITS_ALL),
    dict(category_inverted=BITS_ALL, return_mask=BITS_ALL),
    dict(category_mask=BITS_ALL, category_anyof_mask=BITS_ALL, return_mask=BITS_ALL),
    dict(category_mask=WRITTEN, return_mask=WRITTEN),
    dict(return_mask=WRITTEN),
], ids=["required", "anyof", "inverted", "required+anyof", "tracking", "no-selection"])
def test_every_mask_combination_is_accepted(pm: Pagemap, tracked: Callable[..., Area],
                                            flags: int, masks: dict[str, int]) -> None:
    # sanity_tests "WP op can be specified with !PAGE_IS_WRITTEN", "required_mask specified",
    # ..., sanity_tests_sd "no selection mask is specified", "PAGEMAP_BITS_ALL can be
    # specified with PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC"
    a = tracked(10)
    a.write(2)
    ret, walk_end, _ = pagemap_scan_once(pm, a.addr, a.end, flags=flags, vec_len=10, **masks)
    assert ret >= 0 and walk_end == a.end


@needs_async
def test_no_return_mask_reports_nothing_on_a_clean_range(pm: Pagemap,
                                                         tracked: Callable[..., Area]) -> None:
    # sanity_tests_sd "no return mask is specified"
    a = tracked(10)
    assert pagemap_scan_once(pm, a.addr, a.end, category_mask=WRITTEN,
                             category_anyof_mask=WRITTEN, vec_len=10)[0] == 0


@needs_async
def test_zero_return_mask_merges_every_match_into_uncategorised_runs(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(10)
    a.write(1, 2, 3, 6)
    a.read(4)  # present, zero page, not written: breaks the run
    got = pagemap_scan(pm, a.addr, a.end, category_mask=PRESENT, return_mask=0)
    assert runs(got, a) == [(1, 5), (6, 7)] and (got[:, 2] == 0).all()
    got = pagemap_scan(pm, a.addr, a.end, category_mask=PRESENT, return_mask=PFNZERO)
    assert runs(got, a) == [(1, 4), (4, 5), (6, 7)]
    assert got[:, 2].tolist() == [0, PFNZERO, 0]


@needs_async
@pytest.mark.parametrize("masks", [
    dict(category_anyof_mask=BITS_ALL),
    dict(category_mask=WRITTEN | PRESENT),
    dict(category_mask=WRITTEN, category_anyof_mask=PRESENT),
], ids=["anyof", "required", "required+anyof"])
def test_written_present_pages_are_selected_by_each_mask_kind(
        pm: Pagemap, tracked: Callable[..., Area], masks: dict[str, int]) -> None:
    # sanity_tests "Get sd and present pages with anyof_mask / required_mask / both"
    a = tracked(10)
    a.fill()
    got = pagemap_scan(pm, a.addr, a.end, return_mask=BITS_ALL, **masks)  # type: ignore[arg-type]
    assert runs(got, a) == [(0, 10)]
    assert int(got[0, 2]) & (WRITTEN | PRESENT) == WRITTEN | PRESENT


@needs_async
@pytest.mark.parametrize("cat", [WRITTEN, PRESENT], ids=["written", "present"])
def test_inverting_a_required_category_excludes_the_pages_that_have_it(
        pm: Pagemap, tracked: Callable[..., Area], cat: int) -> None:
    # sanity_tests "Don't get sd pages", "Don't get present pages"
    a = tracked(10)
    a.fill()
    assert len(pagemap_scan(pm, a.addr, a.end, category_mask=cat, category_inverted=cat,
                            return_mask=BITS_ALL)) == 0


@needs_async
def test_inverted_written_selects_the_pages_not_written(pm: Pagemap,
                                                        tracked: Callable[..., Area]) -> None:
    a = tracked(10)
    a.fill(0, 4)
    clean = pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN, category_inverted=WRITTEN,
                         return_mask=WRITTEN | PRESENT)
    assert {i for s, e in runs(clean, a) for i in range(s, e)} == set(range(4, 10))
    # Reported categories are the page's own, not the inverted ones.
    assert not (clean[:, 2] & np.uint64(WRITTEN)).any()


@needs_async
def test_return_mask_limits_the_reported_categories(pm: Pagemap,
                                                    tracked: Callable[..., Area]) -> None:
    # sanity_tests "Find written present pages with return mask"
    a = tracked(10)
    a.fill()
    ret, _, got = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK,
                                    category_anyof_mask=BITS_ALL, return_mask=WRITTEN,
                                    vec_len=10)
    assert (ret, runs(got, a), int(got[0, 2])) == (1, [(0, 10)], WRITTEN)
    full = pagemap_scan(pm, a.addr, a.end, return_mask=BITS_ALL)
    assert runs(full, a) == [(0, 10)]
    assert int(full[0, 2]) == WPALLOWED | PRESENT  # the WP_MATCHING above reset them


@needs_async
def test_categories_of_a_registered_anonymous_range(pm: Pagemap,
                                                    tracked: Callable[..., Area]) -> None:
    a = tracked(8)
    a.write(0)
    a.read(1)
    got = pagemap_scan(pm, a.addr, a.page(2), return_mask=BITS_ALL)
    cats = {r: int(c) for r, c in zip(runs(got, a), got[:, 2], strict=True)}
    assert cats == {(0, 1): WPALLOWED | WRITTEN | PRESENT,
                    (1, 2): WPALLOWED | PRESENT | PFNZERO}


@needs_scan
def test_read_only_file_mapping_reports_file_pages(pm: Pagemap, area: Callable[..., Area],
                                                   tmp_path: os.PathLike[str]) -> None:
    # sanity_tests "Memory mapped file": a read-only mmap of a file, every page read
    path = os.path.join(tmp_path, "ro")
    size = 3 * P + 100
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        a = area(4, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE, fd=fd)
    finally:
        os.close(fd)
    a.read(0, 1, 2, 3)
    not_written = BITS_ALL & ~WRITTEN
    got = pagemap_scan(pm, a.addr, a.addr + size, category_anyof_mask=not_written,
                       return_mask=not_written)
    assert runs(got, a) == [(0, 4)]  # end rounded up to the page
    assert int(got[0, 2]) & (FILE | PRESENT) == FILE | PRESENT


@needs_async
def test_written_private_file_mapping_is_reported_after_msync(pm: Pagemap,
                                                              tracked: Callable[..., Area],
                                                              tmp_path: os.PathLike[str]) -> None:
    # sanity_tests "Read/write to memory"
    path = os.path.join(tmp_path, "rw")
    with open(path, "wb") as f:
        f.write(b"c" * 10 * P)
    fd = os.open(path, os.O_RDWR)
    try:
        a = tracked(10, flags=mmap.MAP_PRIVATE, fd=fd)
    finally:
        os.close(fd)
    a.fill(value=ord("z"))
    _native.msync(a.addr, a.size, MS_SYNC)
    got = pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN,
                       category_anyof_mask=PRESENT | SWAPPED | FILE, return_mask=BITS_ALL)
    assert runs(got, a) == [(0, 10)] and int(got[0, 2]) & WRITTEN


# =============================================================================================
# base_tests, on every memory type the selftest uses
# =============================================================================================

KINDS = ["anon", "anon-large", "thp", "file-private", "file-shared", "memfd-shared",
         "memfd-private", "hugetlb-private", "hugetlb-memfd", "hugetlb-sysv"]


def _sysv_hugetlb(size: int) -> Area:
    shmid = _libc.shmget(IPC_PRIVATE, size, IPC_CREAT | SHM_HUGETLB | 0o600)
    if shmid < 0:
        e = ctypes.get_errno()
        pytest.skip(f"shmget(SHM_HUGETLB) refused: {os.strerror(e)}")
    try:
        addr = _check_ptr(_libc.shmat(shmid, None, 0), "shmat")
    finally:
        _libc.shmctl(shmid, IPC_RMID, None)  # gone once detached
    return Area(addr, size // P, unmap=lambda: _libc.shmdt(addr))


@pytest.fixture(params=KINDS)
def memory(request: pytest.FixtureRequest, area: Callable[..., Area], uffd: Userfaultfd,
           pm: Pagemap, tmp_path: os.PathLike[str]) -> Iterator[Area]:
    """Memory of each kind base_tests runs on, registered and armed (wp_init)."""
    kind: str = request.param
    fd = -1
    sysv = None
    try:
        if kind == "anon":
            a = area(10)
        elif kind == "anon-large":
            a = area(512 * 10)
        elif kind == "thp":
            a = thp_area(area, pm, 1)
        elif kind.startswith("file"):
            path = os.path.join(tmp_path, "mem")
            with open(path, "wb") as f:
                f.write(b"c" * 10 * P)
            fd = os.open(path, os.O_RDWR)
            a = area(10, flags=mmap.MAP_PRIVATE if kind.endswith("private") else mmap.MAP_SHARED,
                     fd=fd)
        elif kind.startswith("memfd"):
            fd = os.memfd_create("pagewatch-test")
            os.ftruncate(fd, 10 * P)
            a = area(10, flags=mmap.MAP_PRIVATE if kind.endswith("private") else mmap.MAP_SHARED,
                     fd=fd)
        else:
            hsize: int = request.getfixturevalue("hugetlb")
            if kind == "hugetlb-private":
                a = area(hsize // P, flags=ANON | MAP_HUGETLB)
            elif kind == "hugetlb-memfd":
                fd = os.memfd_create("pagewatch-test", os.MFD_HUGETLB)
                os.ftruncate(fd, hsize)
                a = area(hsize // P, flags=mmap.MAP_SHARED, fd=fd)
            else:
                a = sysv = _sysv_hugetlb(hsize)
            a.huge = True
    finally:
        if fd >= 0:
            os.close(fd)
    arm(uffd, a)
    yield a
    if sysv is not None:
        uffd.close()
        sysv.unmap()


@needs_async
def test_fresh_armed_memory_reports_nothing_written(pm: Pagemap, memory: Area) -> None:
    assert runs(reset(pm, memory), memory) == []
    assert runs(get(pm, memory), memory) == []


@needs_async
def test_writing_every_page_reports_one_run_of_all_pages(pm: Pagemap, memory: Area) -> None:
    memory.fill()
    assert runs(get(pm, memory), memory) == [(0, memory.npages)]


@needs_async
def test_writing_all_but_the_edges_reports_the_middle_then_nothing(pm: Pagemap,
                                                                   memory: Area) -> None:
    n = memory.npages
    memory.fill()
    reset(pm, memory)
    memory.fill(1, n - 1, value=0)
    got = runs(reset(pm, memory), memory)
    assert len(got) == 1
    lo, hi = got[0]
    assert lo in (0, 1) and hi in (n - 1, n)  # huge-page granularity tolerated
    if not memory.huge:
        assert got == [(1, n - 1)]
    assert runs(get(pm, memory), memory) == []


@needs_async
def test_one_written_middle_page_is_reported(pm: Pagemap, memory: Area) -> None:
    n = memory.npages
    memory.fill()
    reset(pm, memory)
    memory.write(n // 2)
    got = runs(get(pm, memory), memory)
    assert len(got) == 1 and got[0][0] <= n // 2 < got[0][1]
    if not memory.huge:
        assert got == [(n // 2, n // 2 + 1)]


@needs_async
def test_two_written_middle_pages_scanned_alone_are_exactly_those(pm: Pagemap,
                                                                  memory: Area) -> None:
    n = memory.npages
    memory.fill()
    reset(pm, memory, return_mask=WRITTEN | HUGE)
    memory.write(n // 2, n // 2 + 1)
    got = get(pm, memory, n // 2, n // 2 + 2, return_mask=WRITTEN | HUGE)
    assert runs(got, memory) == [(n // 2, n // 2 + 2)]


# =============================================================================================
# Huge pages: THP (hpage_unit_tests) and hugetlb
# =============================================================================================

@needs_async
def test_thp_armed_reports_nothing_then_one_run_of_exactly_written(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    a = thp_area(area, pm, 2)
    arm(uffd, a)
    assert runs(reset(pm, a), a) == []
    assert runs(get(pm, a), a) == []
    a.fill()
    ret, _, got = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, category_mask=WRITTEN,
                                    return_mask=WRITTEN, vec_len=a.npages)
    assert (ret, runs(got, a), int(got[0, 2])) == (1, [(0, a.npages)], WRITTEN)


@needs_async
def test_thp_one_written_page_is_reported(pm: Pagemap, area: Callable[..., Area],
                                          uffd: Userfaultfd) -> None:
    a = thp_area(area, pm, 2)
    arm(uffd, a)
    a.write(a.npages // 2)
    got = runs(get(pm, a), a)
    assert len(got) == 1 and got[0][0] <= a.npages // 2 < got[0][1]


@needs_async
def test_thp_partial_wp_splits_the_huge_page(pm: Pagemap, area: Callable[..., Area],
                                             uffd: Userfaultfd) -> None:
    # Registered but not armed: each PMD is one written huge page.  Protecting half of one
    # makes the kernel split it and protect only that half.
    a = thp_area(area, pm, 2)
    uffd.register(a.addr, a.size)
    h = PMD_SIZE // P
    assert runs(get(pm, a, return_mask=WRITTEN | HUGE), a) == [(0, 2 * h)]
    got = reset(pm, a, 0, h // 2, return_mask=WRITTEN | HUGE)
    assert runs(got, a) == [(0, h // 2)]
    assert runs(get(pm, a), a) == [(h // 2, 2 * h)]
    huge = pagemap_scan(pm, a.addr, a.end, category_mask=HUGE, return_mask=HUGE)
    assert runs(huge, a) == [(h, 2 * h)]  # the first is split; the second stayed whole


@needs_async
def test_thp_max_pages_of_half_a_huge_page_gets_and_resets_exactly_that(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    # hpage_unit_tests "get half huge page" on an intact (written, never protected) THP
    a = thp_area(area, pm, 2)
    uffd.register(a.addr, a.size)
    h = PMD_SIZE // P
    assert npages(reset(pm, a, max_pages=h // 2)) == h // 2
    assert npages(get(pm, a)) == 2 * h - h // 2


@needs_async
@pytest.mark.parametrize("how", ["range", "max_pages"])
def test_thp_clearing_the_first_half_leaves_the_second_written(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd, how: str) -> None:
    # hpage_unit_tests "clear first half of huge page" (with a range, and with a limited
    # buffer: max_pages)
    a = thp_area(area, pm, 2)
    arm(uffd, a)
    reset(pm, a)
    n = a.npages
    a.fill(value=0)
    if how == "range":
        reset(pm, a, 0, n // 2)
    else:
        assert npages(reset(pm, a, max_pages=n // 2)) == n // 2
    assert runs(get(pm, a), a) == [(n // 2, n)]


@needs_async
def test_thp_clearing_the_second_half_leaves_the_first_written(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    # hpage_unit_tests "clear second half huge page"
    a = thp_area(area, pm, 2)
    arm(uffd, a)
    n = a.npages
    a.fill()
    assert npages(reset(pm, a, n // 2, n, max_pages=n // 2)) == n // 2
    assert runs(get(pm, a), a) == [(0, n // 2)]


@needs_async
def test_hugetlb_partial_page_wp_makes_no_progress(pm: Pagemap, area: Callable[..., Area],
                                                  uffd: Userfaultfd, hugetlb: int) -> None:
    # The kernel cannot protect part of a hugetlb page: it backs out with walk_end = start
    # and no error.  pagewatch turns the stall into an error that says what to do.
    a = area(hugetlb // P, flags=ANON | MAP_HUGETLB)
    a.write(0)
    uffd.register(a.addr, a.size)
    ret, walk_end, _ = pagemap_scan_once(pm, a.addr, a.page(1), flags=WP | CHECK,
                                         category_mask=WRITTEN, return_mask=WRITTEN, vec_len=4)
    assert (ret, walk_end) == (0, a.addr)
    with pytest.raises(PagewatchError, match="hugetlb"):
        reset(pm, a, 0, 1)
    # The tracker's one-call collect raises it as OSError(EAGAIN) with the walk_end.
    with pytest.raises(OSError) as info:
        _native.collect_runs(pm.fileno(), a.addr, a.page(1), WP | CHECK, WRITTEN)
    assert (info.value.errno, info.value.filename, info.value.filename2) == (
        errno.EAGAIN, "PAGEMAP_SCAN", a.addr)
    assert runs(get(pm, a), a) == [(0, a.npages)]  # nothing was protected
    assert runs(reset(pm, a), a) == [(0, a.npages)]  # the whole page can be
    assert runs(get(pm, a), a) == []


# =============================================================================================
# Zero page (zeropfn_tests) and unpopulated pages (unpopulated_scan_test)
# =============================================================================================

@needs_scan
def test_read_faulted_pages_are_the_zero_page(pm: Pagemap, area: Callable[..., Area]) -> None:
    a = area(8)
    a.read(0, 1, 2, 3)
    got = pagemap_scan(pm, a.addr, a.end, category_mask=PFNZERO, return_mask=PFNZERO | PRESENT)
    assert runs(got, a) == [(0, 4)] and int(got[0, 2]) == PFNZERO | PRESENT
    a.write(2)
    got = pagemap_scan(pm, a.addr, a.end, category_mask=PFNZERO, return_mask=PFNZERO)
    assert runs(got, a) == [(0, 2), (3, 4)]


@needs_async
def test_reading_an_armed_page_maps_the_zero_page_and_is_not_written(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(8)
    a.read(0, 1)
    assert runs(get(pm, a), a) == []
    got = pagemap_scan(pm, a.addr, a.page(2), return_mask=PFNZERO | WRITTEN)
    assert runs(got, a) == [(0, 2)] and int(got[0, 2]) == PFNZERO
    a.write(1)
    assert runs(get(pm, a), a) == [(1, 2)]


@needs_scan
def test_thp_read_fault_maps_the_huge_zero_page(pm: Pagemap, area: Callable[..., Area]) -> None:
    if not PMD_SIZE:
        pytest.skip("no transparent huge pages")
    if _read("/sys/kernel/mm/transparent_hugepage/use_zero_page") != "1":
        pytest.skip("transparent_hugepage/use_zero_page is off: no huge zero page")
    a = area(PMD_SIZE // P, align=PMD_SIZE, thp=True)
    a.read(0)
    got = pagemap_scan(pm, a.addr, a.end, category_mask=PRESENT,
                       return_mask=PFNZERO | HUGE | PRESENT)
    if runs(got, a) != [(0, a.npages)] or not int(got[0, 2]) & HUGE:
        pytest.skip(f"a read fault mapped no huge zero page (THP mode: {THP_MODE})")
    if not int(got[0, 2]) & PFNZERO:
        pytest.skip("this kernel reports the huge zero page as PRESENT, not PFNZERO (fixed in "
                    "6.16, 'fix PAGE_IS_PFNZERO detection for the huge zero folio')")
    assert int(got[0, 2]) == PFNZERO | HUGE | PRESENT


def _sync_uffd(features: int) -> Userfaultfd:
    try:
        return Userfaultfd(features)
    except OSError as exc:
        pytest.skip(f"no userfaultfd with features {features:#x}: {exc}")


def _wp_bits(a: Area) -> list[bool]:
    return decode_pagemap(read_pagemap("self", a.addr, a.end)).uffd_wp.tolist()


@pytest.mark.parametrize("features", [0, int(UffdFeature.WP_UNPOPULATED),
                                      int(UffdFeature.WP_ASYNC)],
                         ids=["sync", "sync+WP_UNPOPULATED", "WP_ASYNC"])
def test_writeprotect_marks_never_touched_pages_only_with_wp_unpopulated(
        area: Callable[..., Area], features: int) -> None:
    # UFFDIO_WRITEPROTECT skips none PTEs of anonymous memory unless WP_UNPOPULATED is on
    # (WP_ASYNC turns it on).  Pagemap bit 57 shows it.  Nothing writes to the range here:
    # a write to a protected page in sync mode would wait for a handler forever.
    a = area(8)
    a.write(0)
    with _sync_uffd(features) as u:
        try:
            arm(u, a)
        except OSError as exc:
            pytest.skip(f"uffd write-protect of anonymous memory refused: {exc}")
        unpopulated = bool(u.features & UffdFeature.WP_UNPOPULATED)
        assert unpopulated == (features != 0)
        assert _wp_bits(a) == [True] + [unpopulated] * 7


def test_never_touched_page_written_after_a_writeprotect_without_wp_unpopulated_reads_written(
        area: Callable[..., Area]) -> None:
    # Without WP_UNPOPULATED the never-touched page is not protected: its first write is not
    # trapped (even in sync mode) and the page reads as written and unprotected.
    a = area(8)
    a.write(0)
    with _sync_uffd(0) as u:
        try:
            arm(u, a)
        except OSError as exc:
            pytest.skip(f"uffd write-protect of anonymous memory refused: {exc}")
        a.write(1)  # not protected: no fault to wait on
        bits = decode_pagemap(read_pagemap("self", a.addr, a.page(2)))
        assert bits.present.tolist() == [True, True]
        assert bits.uffd_wp.tolist() == [True, False]
        if not NO_SCAN:
            got = {i for s, e in runs(pagemap_scan("self", a.addr, a.end,
                                                   category_mask=WRITTEN), a)
                   for i in range(s, e)}
            assert 1 in got and 0 not in got


@needs_async
def test_never_touched_page_written_after_arming_with_wp_async_is_reported(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(8)
    assert _wp_bits(a) == [True] * 8  # markers on never-touched pages
    assert runs(get(pm, a), a) == []
    a.write(5)
    assert runs(get(pm, a), a) == [(5, 6)]
    assert _wp_bits(a) == [True] * 5 + [False] + [True] * 2


@needs_async
def test_madv_dontneed_counts_as_a_write(pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # unpopulated_scan_test: zapping anonymous memory drops the uffd-wp bit (its content did
    # change, to zeroes), so the tracking scan reports it.
    a = tracked(16)
    a.fill()
    reset(pm, a)
    _native.madvise(a.page(2), 4 * P, MADV_DONTNEED)
    assert runs(get(pm, a), a) == [(2, 6)]
    # The generic path (any richer mask) agrees only on kernels with the 2026 fix "fix
    # PAGEMAP_SCAN written state for unpopulated ptes": pagewatch uses the exact masks.
    rich = pagemap_scan(pm, a.addr, a.end, category_mask=WRITTEN,
                        category_anyof_mask=WRITTEN | PRESENT, return_mask=WRITTEN)
    if runs(rich, a) != [(2, 6)]:
        pytest.skip("this kernel's generic PAGEMAP_SCAN path reports zapped PTEs as not "
                    "written (fixed in 2026: 'fix PAGEMAP_SCAN written state for "
                    "unpopulated ptes')")
    assert runs(reset(pm, a), a) == [(2, 6)]
    assert runs(get(pm, a), a) == []


# =============================================================================================
# mprotect_tests, userfaultfd_tests, transact_test
# =============================================================================================

@needs_async
def test_mprotect_and_a_remapped_page_do_not_hide_writes(pm: Pagemap, area: Callable[..., Area],
                                                         uffd: Userfaultfd) -> None:
    # mprotect_tests
    a = area(2)
    arm(uffd, a)
    a.fill(value=1)
    assert runs(get(pm, a), a) == [(0, 2)]
    reset(pm, a)
    assert runs(get(pm, a), a) == []
    # Replace the second page by a new mapping, register and arm it.
    second = Area.map(1, addr=a.page(1))
    arm(uffd, second)
    _native.mprotect(a.addr, P, PROT_NONE)
    _native.mprotect(a.addr, 2 * P, mmap.PROT_READ)
    _native.mprotect(a.addr, 2 * P, RW)
    a.fill(value=2)
    _native.mprotect(a.addr, P, PROT_NONE)
    _native.mprotect(a.addr, P, mmap.PROT_READ)
    _native.mprotect(a.addr, P, RW)
    assert runs(get(pm, a), a) == [(0, 2)]
    reset(pm, a)
    a.fill(value=ord("A"))
    assert runs(get(pm, a), a) == [(0, 2)]


@needs_async
def test_pages_of_a_prot_none_range_mprotected_in_stripes_are_not_written(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    # userfaultfd_tests
    n = 16
    a = area(n, prot=PROT_NONE)
    arm(uffd, a)
    stripe = n // 8
    for i, prot in enumerate([RW, mmap.PROT_READ, RW, mmap.PROT_READ, RW, PROT_NONE, RW,
                              mmap.PROT_READ]):
        _native.mprotect(a.page(i * stripe), stripe * P, prot)
    reset(pm, a, n // 16, n - n // 16 - n // 8)
    reset(pm, a)
    ret = pagemap_scan_once(pm, a.addr, a.end, flags=WP | CHECK, max_pages=n - 2,
                            category_mask=WRITTEN, return_mask=WRITTEN, vec_len=1)[0]
    assert ret == 0


@needs_async
def test_concurrent_get_and_reset_loses_no_write(pm: Pagemap, tracked: Callable[..., Area]) -> None:
    # transact_test: writers hit their pages while the collector gets-and-resets.  Every
    # write is reported by the concurrent collect or the next one; a page may be reported by
    # both (the kernel can hand a fault back after a reset), never by neither.
    nthreads, per_thread, writes = 4, 32, 8
    a = tracked(nthreads * per_thread)
    start = threading.Barrier(nthreads + 1, timeout=300)
    end = threading.Barrier(nthreads + 1, timeout=300)
    stop = threading.Event()

    def writer(t: int) -> None:
        base = a.page(t * per_thread)
        while True:
            start.wait()
            if stop.is_set():
                return
            _native.poke(base, writes * P, P, t + 1)  # GIL released: truly concurrent
            end.wait()

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(nthreads)]
    for th in threads:
        th.start()
    expected = {t * per_thread + i for t in range(nthreads) for i in range(writes)}
    reset(pm, a)
    deadline = time.monotonic() + SECONDS
    rounds = extra = 0
    try:
        while rounds < 20 or time.monotonic() < deadline:
            start.wait()
            first = reset(pm, a)
            end.wait()
            second = reset(pm, a)
            pages = [i for r in (first, second) for s, e in runs(r, a) for i in range(s, e)]
            assert set(pages) == expected, f"round {rounds}"
            extra += len(pages) - len(expected)
            rounds += 1
    finally:
        stop.set()
        start.wait()
        for th in threads:
            th.join(10)
    assert rounds >= 20 and extra >= 0


# =============================================================================================
# fork, mremap, munmap, several VMAs
# =============================================================================================

def _in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child; return what it returned (or its exception)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            try:
                out = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = f"{type(exc).__name__}: errno={getattr(exc, 'errno', None)} {exc}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


@needs_async
def test_fork_child_vmas_lose_their_registration(pm: Pagemap,
                                                 tracked: Callable[..., Area]) -> None:
    a = tracked(4)
    a.write(0)

    def child() -> str:
        try:
            pagemap_scan("self", a.addr, a.end, category_mask=WRITTEN, check_wpasync=True)
        except InvalidRange as exc:
            cats = pagemap_scan("self", a.addr, a.end, return_mask=WPALLOWED)
            return f"errno={exc.errno} wpallowed={len(cats) and int(cats[:, 2].max())}"
        return "scan succeeded"

    assert _in_child(child) == f"errno={errno.EPERM} wpallowed=0"


@needs_async
def test_fork_parent_keeps_tracking_and_reports_its_cow_writes(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(4)
    a.write(0, 1, 2)
    reset(pm, a)

    def child() -> str:
        a.write(2, 3)  # the child's copies: not the parent's pages
        return "ok"

    assert _in_child(child) == "ok"
    assert runs(get(pm, a), a) == []
    a.write(1, value=5)  # a COW fault in the parent (the child shared the page)
    assert runs(reset(pm, a), a) == [(1, 2)]
    assert runs(get(pm, a), a) == []


def _mremap(a: Area, dst: Area) -> None:
    r = _check_ptr(_libc.mremap(a.addr, a.size, a.size, MREMAP_MAYMOVE | MREMAP_FIXED, dst.addr),
                   "mremap")
    assert r == dst.addr
    a.mapped = False  # its pages live at dst now


@needs_async
def test_mremap_moves_the_range_out_of_its_registration(pm: Pagemap, area: Callable[..., Area],
                                                       uffd: Userfaultfd) -> None:
    # Without UFFD_FEATURE_EVENT_REMAP the moved VMA loses its uffd context.
    a = area(4)
    arm(uffd, a)
    a.write(0)
    dst = area(4)
    _mremap(a, dst)
    with pytest.raises(InvalidRange, match="not registered") as exc:
        get(pm, dst)
    assert exc.value.errno == errno.EPERM
    # Without CHECK_WPASYNC, WP_MATCHING silently skips the whole VMA: a written page goes
    # unreported.  That is why pagewatch always asks for the check.
    skipped = pagemap_scan(pm, dst.addr, dst.end, category_mask=WRITTEN, wp_matching=True)
    assert runs(skipped, dst) == []
    plain = pagemap_scan(pm, dst.addr, dst.end, category_mask=PRESENT,
                         return_mask=WRITTEN | WPALLOWED)
    assert runs(plain, dst) == [(0, 1)] and int(plain[0, 2]) == WRITTEN


@needs_async
def test_munmap_of_a_tracked_range_leaves_a_hole_that_scans_empty(
        pm: Pagemap, tracked: Callable[..., Area]) -> None:
    a = tracked(8)
    a.write(0, 3, 7)
    assert _libc.munmap(a.page(2), 4 * P) == 0
    assert runs(get(pm, a, 2, 6), a) == []  # no VMA: no error, nothing reported
    assert runs(reset(pm, a), a) == [(0, 1), (7, 8)]
    # A new mapping in the hole is not registered.
    Area.map(4, addr=a.page(2))
    with pytest.raises(InvalidRange) as exc:
        get(pm, a)
    assert exc.value.errno == errno.EPERM


@needs_async
def test_a_range_spanning_several_vmas_is_registered_and_scanned_as_one(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    # Private anonymous | shared anonymous | private memfd: three VMAs that cannot merge.
    a = area(6)
    Area.map(2, addr=a.page(2), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    fd = os.memfd_create("pagewatch-test")
    try:
        os.ftruncate(fd, 2 * P)
        Area.map(2, addr=a.page(4), flags=mmap.MAP_PRIVATE, fd=fd)
    finally:
        os.close(fd)
    vmas = [m for m in maps() if m.start < a.end and m.end > a.addr]
    assert [(max(m.start, a.addr), min(m.end, a.end)) for m in vmas] == [
        (a.page(i), a.page(i + 2)) for i in (0, 2, 4)]
    assert [m.perms[3] for m in vmas] == ["p", "s", "p"]
    arm(uffd, a)  # one register and one writeprotect across the three
    a.write(1, 2, 4)
    # Runs merge across VMA boundaries when their reported categories are equal.
    assert runs(reset(pm, a), a) == [(1, 3), (4, 5)]
    assert runs(get(pm, a), a) == []
    cats = pagemap_scan(pm, a.addr, a.end, category_mask=PRESENT, return_mask=FILE)
    assert {r: int(c) for r, c in zip(runs(cats, a), cats[:, 2], strict=True)}[(2, 3)] == FILE  # shmem


@needs_async
def test_an_unregistered_vma_inside_the_range_fails_check_wpasync(
        pm: Pagemap, area: Callable[..., Area], uffd: Userfaultfd) -> None:
    a = area(6)
    Area.map(2, addr=a.page(2), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    uffd.register(a.addr, 2 * P)
    uffd.register(a.page(4), 2 * P)
    a.fill()
    with pytest.raises(InvalidRange) as exc:
        get(pm, a)
    assert exc.value.errno == errno.EPERM
    assert runs(get(pm, a, 0, 2), a) == [(0, 2)]
    assert runs(get(pm, a, 4, 6), a) == [(4, 6)]


# =============================================================================================
# Soft-dirty: pagemap bit 55 and PAGE_IS_SOFT_DIRTY (the selftest soft-dirty.c's cross-check)
# =============================================================================================

def _why_no_soft_dirty() -> str:
    """'' when CONFIG_MEM_SOFT_DIRTY is on: every new VMA then shows VmFlags 'sd'."""
    a = Area.map(1)
    try:
        current = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    current = lo <= a.addr < hi
                elif current and line.startswith("VmFlags:"):
                    if "sd" in line.split()[1:]:
                        return ""
                    break
    finally:
        a.unmap()
    return ("no soft-dirty: new mappings carry no VM_SOFTDIRTY flag (kernel built without "
            "CONFIG_MEM_SOFT_DIRTY, or an arch without it)")


NO_SOFT_DIRTY = _why_no_soft_dirty()
needs_soft_dirty = pytest.mark.skipif(bool(NO_SOFT_DIRTY), reason=NO_SOFT_DIRTY or "n/a")


def _soft_dirty_after_clear_and_write(with_scan: bool) -> str:
    """In a child (clear_refs is process-wide): clear, write page 1 of 4, report bit 55 and,
    with ``with_scan``, the pages PAGEMAP_SCAN calls SOFT_DIRTY."""
    def child() -> str:
        a = Area.map(4)
        a.fill()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4\n")
        a.write(1)
        bits = decode_pagemap(read_pagemap("self", a.addr, a.end)).soft_dirty.tolist()
        out = f"bits={bits}"
        if with_scan:
            sd = int(PageCategory.SOFT_DIRTY)
            got = pagemap_scan("self", a.addr, a.end, category_mask=sd, return_mask=sd)
            out += f" scan={runs(got, a)}"
        return out

    return _in_child(child)


@needs_soft_dirty
def test_soft_dirty_bit_55_is_cleared_by_clear_refs_and_set_by_a_write() -> None:
    assert _soft_dirty_after_clear_and_write(False) == "bits=[False, True, False, False]"


@needs_soft_dirty
@needs_scan
def test_soft_dirty_category_agrees_with_pagemap_bit_55(pm: Pagemap, area: Callable[..., Area],
                                                        ) -> None:
    try:
        pagemap_scan_once(pm, 0, 0, category_mask=int(PageCategory.SOFT_DIRTY))
    except OSError:
        pytest.skip("PAGEMAP_SCAN has no PAGE_IS_SOFT_DIRTY here (it came in Linux 6.8)")
    assert _soft_dirty_after_clear_and_write(True) == (
        "bits=[False, True, False, False] scan=[(1, 2)]")


# =============================================================================================
# Guard pages (the pagemap_scan test of the selftest guard-regions.c)
# =============================================================================================

MADV_GUARD_INSTALL = 102


@needs_scan
def test_guard_pages_are_reported_as_guard_one_region_each(pm: Pagemap,
                                                           area: Callable[..., Area]) -> None:
    guard = int(PageCategory.GUARD)
    try:
        pagemap_scan_once(pm, 0, 0, category_mask=guard)
    except OSError:
        pytest.skip("PAGEMAP_SCAN has no PAGE_IS_GUARD here (it came in Linux 6.16)")
    a = area(10)
    try:
        for i in range(0, 10, 2):
            _native.madvise(a.page(i), P, MADV_GUARD_INSTALL)
    except OSError as exc:
        pytest.skip(f"madvise(MADV_GUARD_INSTALL) refused: {exc}")
    ret, _, got = pagemap_scan_once(pm, a.addr, a.end, category_mask=guard, return_mask=guard,
                                    vec_len=10)
    assert ret == 5 and runs(got, a) == [(i, i + 1) for i in range(0, 10, 2)]
    assert (got[:, 2] == guard).all()
    assert decode_pagemap(read_pagemap("self", a.addr, a.end)).guard.tolist() == [
        i % 2 == 0 for i in range(10)]
