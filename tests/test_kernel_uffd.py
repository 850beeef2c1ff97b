"""Userfaultfd, the classic pagemap read and clear_refs through ``pagewatch.kernel``.

Registration is checked independently of PAGEMAP_SCAN where it can be: the ``uw`` flag in
``/proc/self/smaps`` VmFlags is VM_UFFD_WP, and pagemap bit 57 is a page's uffd-wp bit.  Those
parts run on kernels without PAGEMAP_SCAN (6.1) too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from pagewatch import _native
from pagewatch.errors import InvalidRange, PagewatchError, TargetGone, Unsupported
from pagewatch.kernel import (
    PageCategory,
    Pagemap,
    RegisterMode,
    UffdFeature,
    UffdIoctl,
    Userfaultfd,
    clear_refs,
    decode_pagemap,
    pagemap_scan,
    read_pagemap,
)
from pagewatch.kernel.constants import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
)

P = mmap.PAGESIZE
ASYNC = int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
WRITTEN = int(PageCategory.WRITTEN)
UFFD_USER_MODE_ONLY = 1


def _kernel_features() -> tuple[int, str]:
    """What UFFDIO_API offers here, asked directly (features 0), or why there is none."""
    try:
        fd = _native.userfaultfd(os.O_CLOEXEC | UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return 0, f"userfaultfd(2) refused: {exc.strerror}"
    try:
        return _native.uffdio_api(fd, 0)[0], ""
    except OSError as exc:
        return 0, f"UFFDIO_API refused: {exc.strerror}"
    finally:
        os.close(fd)


AVAILABLE, NO_UFFD = _kernel_features()
needs_uffd = pytest.mark.skipif(bool(NO_UFFD), reason=NO_UFFD or "n/a")
needs_async = pytest.mark.skipif(
    not AVAILABLE & UffdFeature.WP_ASYNC,
    reason=NO_UFFD or "UFFDIO_API offers no WP_ASYNC here (it came in Linux 6.7)")


def _has_scan() -> bool:
    try:
        with Pagemap() as pm:
            _native.pagemap_scan_once(pm.fileno(), 0, 0)
    except OSError:
        return False
    return True


HAS_SCAN = _has_scan()


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    if not AVAILABLE & UffdFeature.WP_ASYNC:
        pytest.skip(NO_UFFD or "no UFFD_FEATURE_WP_ASYNC here (Linux 6.7+)")
    with Userfaultfd() as u:
        yield u


def vm_flags(addr: int) -> list[str]:
    """The VmFlags mnemonics of the mapping holding ``addr`` (``uw``: registered for WP)."""
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                current = lo <= addr < hi
            elif current and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise LookupError(f"{addr:#x} is not mapped")


def wp_bits(m: Any) -> list[bool]:
    return decode_pagemap(read_pagemap("self", m.addr, m.addr + m.size)).uffd_wp.tolist()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def ctypes_munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length):
        raise OSError(ctypes.get_errno(), "munmap")


def dead_pid() -> int:
    """A pid that just exited and was reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# ---- features ------------------------------------------------------------------------------

@needs_async
def test_default_features_enable_wp_async_and_wp_unpopulated(uffd: Userfaultfd) -> None:
    assert uffd.features & UffdFeature.WP_ASYNC
    assert uffd.features & UffdFeature.WP_UNPOPULATED
    assert int(uffd.available) == AVAILABLE  # what UFFDIO_API answered to a direct call
    assert int(uffd.features) & ~int(uffd.available) == 0


@needs_uffd
def test_features_are_those_asked_for_not_all_the_kernel_offers() -> None:
    # UFFDIO_API answers with every feature it has but enables only the requested ones.
    with Userfaultfd(0) as u:
        assert int(u.features) == 0
        assert int(u.available) == AVAILABLE


@needs_async
def test_wp_async_implies_wp_unpopulated() -> None:
    with Userfaultfd(int(UffdFeature.WP_ASYNC)) as u:
        assert u.features == UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED


@needs_uffd
def test_a_feature_the_kernel_lacks_raises_unsupported_and_leaks_no_fd() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(Unsupported, match="UFFDIO_API refused") as exc:
        Userfaultfd(1 << 40)
    assert exc.value.errno == errno.EINVAL
    assert len(os.listdir("/proc/self/fd")) == before


@needs_async
def test_uffdio_api_is_allowed_once_per_fd(uffd: Userfaultfd) -> None:
    dup = os.dup(uffd.fileno())
    with pytest.raises(Unsupported, match="already done") as exc:
        Userfaultfd(fd=dup)  # a second handshake on the same file
    assert exc.value.errno == errno.EINVAL


# ---- lifecycle -----------------------------------------------------------------------------

@needs_async
def test_a_closed_userfaultfd_is_refused_with_value_error(mem: Callable[..., Any]) -> None:
    m = mem(4)
    u = Userfaultfd()
    u.close()
    assert u.closed
    for call in (lambda: u.register(m.addr, m.size), lambda: u.writeprotect(m.addr, m.size),
                 lambda: u.unregister(m.addr, m.size), u.fileno):
        with pytest.raises(ValueError, match="closed"):
            call()
    u.close()  # a second close is harmless
    assert "closed" in repr(u)


@needs_async
def test_context_manager_closes_and_the_kernel_forgets_the_registration(
        mem: Callable[..., Any]) -> None:
    m = mem(4)
    with Userfaultfd() as u:
        u.register(m.addr, m.size)
        assert "uw" in vm_flags(m.addr)
    assert u.closed
    assert "uw" not in vm_flags(m.addr)


@needs_async
def test_register_marks_the_vma_and_allows_writeprotect(uffd: Userfaultfd,
                                                       mem: Callable[..., Any]) -> None:
    m = mem(4)
    assert "uw" not in vm_flags(m.addr)
    ioctls = uffd.register(m.addr, m.size)
    assert ioctls & (1 << UffdIoctl.WRITEPROTECT)
    assert "uw" in vm_flags(m.addr)


@needs_async
def test_register_of_a_range_another_userfaultfd_holds_is_busy(uffd: Userfaultfd,
                                                               mem: Callable[..., Any]) -> None:
    m = mem(4)
    uffd.register(m.addr, m.size)
    with Userfaultfd() as other, pytest.raises(PagewatchError, match="already registered") as e:
        other.register(m.addr, m.size)
    assert e.value.errno == errno.EBUSY
    uffd.register(m.addr, m.size)  # the same uffd again is fine


@needs_async
def test_register_of_a_read_only_private_mapping_succeeds(uffd: Userfaultfd,
                                                         mem: Callable[..., Any]) -> None:
    # PROT_READ, but MAP_PRIVATE keeps VM_MAYWRITE (mprotect may add write later).
    m = mem(4, prot=mmap.PROT_READ)
    uffd.register(m.addr, m.size)
    assert "uw" in vm_flags(m.addr)


@needs_async
def test_register_of_a_mapping_that_can_never_be_written_is_invalid_range(
        uffd: Userfaultfd, tmp_path: os.PathLike[str]) -> None:
    # A shared mapping of a file opened read-only has no VM_MAYWRITE.
    path = os.path.join(tmp_path, "ro")
    with open(path, "wb") as f:
        f.write(b"x" * 4 * P)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 4 * P, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        with pytest.raises(InvalidRange, match="not writable") as exc:
            uffd.register(_native.buffer_info(m)[0], 4 * P)
        assert exc.value.errno == errno.EPERM
    finally:
        m.close()


@needs_async
@pytest.mark.parametrize("offset,length", [(1, 4 * P), (0, 4 * P - 1), (0, 0), (0, -P)])
def test_unaligned_or_empty_ranges_are_refused_before_the_kernel(
        uffd: Userfaultfd, mem: Callable[..., Any], offset: int, length: int) -> None:
    m = mem(4)
    for call in (uffd.register, uffd.writeprotect, uffd.unregister):
        with pytest.raises(InvalidRange) as exc:
            call(m.addr + offset, length)
        assert exc.value.errno is None


@needs_async
def test_register_of_an_unmapped_range_is_invalid_range(uffd: Userfaultfd,
                                                       mem: Callable[..., Any]) -> None:
    hole = mem(1)
    addr = hole.addr
    hole.close()  # now unmapped
    with pytest.raises(InvalidRange, match="nothing is mapped there") as exc:
        uffd.register(addr, P)
    assert exc.value.errno == errno.EINVAL


@needs_async
def test_register_across_a_hole_registers_the_mappings_around_it(
        uffd: Userfaultfd, mem: Callable[..., Any]) -> None:
    # The kernel does not refuse a range with a gap: it registers what is mapped.
    m = mem(4)
    ctypes_munmap(m.page(1), P)
    uffd.register(m.addr, m.size)
    assert "uw" in vm_flags(m.page(0)) and "uw" in vm_flags(m.page(2))


@needs_async
def test_writeprotect_of_an_unregistered_range_is_invalid_range(
        uffd: Userfaultfd, mem: Callable[..., Any]) -> None:
    m = mem(4)
    m.write(0)
    with pytest.raises(InvalidRange, match="not registered") as exc:
        uffd.writeprotect(m.addr, m.size)
    assert exc.value.errno == errno.ENOENT
    assert wp_bits(m)[0] is False


@needs_async
def test_writeprotect_and_unprotect_toggle_the_uffd_wp_bit(uffd: Userfaultfd,
                                                          mem: Callable[..., Any]) -> None:
    m = mem(4)
    m.write(0)
    m.write(1)
    uffd.register(m.addr, m.size)
    assert wp_bits(m) == [False, False, False, False]
    uffd.writeprotect(m.addr, m.size)
    assert wp_bits(m) == [True] * 4  # never-touched pages get a marker (WP_UNPOPULATED)
    uffd.writeprotect(m.page(1), P, protect=False)
    assert wp_bits(m)[:2] == [True, False]


@needs_async
def test_unregister_drops_the_registration_and_the_protection(uffd: Userfaultfd,
                                                             mem: Callable[..., Any]) -> None:
    m = mem(4)
    m.write(0)
    uffd.register(m.addr, m.size)
    uffd.writeprotect(m.addr, m.size)
    assert wp_bits(m)[0] is True
    uffd.unregister(m.addr, m.size)
    assert "uw" not in vm_flags(m.addr)
    assert wp_bits(m)[0] is False
    if HAS_SCAN:
        with pytest.raises(InvalidRange) as exc:
            pagemap_scan("self", m.addr, m.addr + m.size, category_mask=WRITTEN,
                         check_wpasync=True)
        assert exc.value.errno == errno.EPERM
    with pytest.raises(InvalidRange):
        uffd.writeprotect(m.addr, m.size)


@needs_async
def test_unregister_of_part_of_a_range_splits_the_vma(uffd: Userfaultfd,
                                                      mem: Callable[..., Any]) -> None:
    m = mem(4)
    uffd.register(m.addr, m.size)
    uffd.unregister(m.page(2), 2 * P)
    assert "uw" in vm_flags(m.page(1))
    assert "uw" not in vm_flags(m.page(2))


@needs_async
def test_register_accepts_an_explicit_wp_mode(uffd: Userfaultfd, mem: Callable[..., Any]) -> None:
    m = mem(2)
    uffd.register(m.addr, m.size, RegisterMode.WP)
    assert "uw" in vm_flags(m.addr) and "um" not in vm_flags(m.addr)


# ---- the classic pagemap read ----------------------------------------------------------------

def test_read_pagemap_gives_one_uint64_per_page_and_present_after_a_write(
        mem: Callable[..., Any]) -> None:
    m = mem(4)
    e = read_pagemap("self", m.addr, m.addr + m.size)
    assert e.dtype == np.uint64 and e.shape == (4,)
    assert not decode_pagemap(e).present.any()
    m.write(2)
    bits = decode_pagemap(read_pagemap("self", m.addr, m.addr + m.size))
    assert bits.present.tolist() == [False, False, True, False]
    assert bits.exclusive[2] and not bits.file[2] and not bits.swapped[2]
    if os.geteuid() == 0:  # PFNs are zeroed without CAP_SYS_ADMIN
        assert bits.pfn[2] > 0
    assert bits.pfn[0] == 0


def test_read_pagemap_rounds_end_up_to_a_page(mem: Callable[..., Any]) -> None:
    m = mem(4)
    assert read_pagemap("self", m.addr, m.addr + P + 1).shape == (2,)


def test_read_pagemap_refuses_an_unaligned_start(mem: Callable[..., Any]) -> None:
    m = mem(4)
    with pytest.raises(InvalidRange, match="aligned"):
        read_pagemap("self", m.addr + 8, m.addr + m.size)


@needs_async
def test_uffd_wp_bit_is_set_by_protect_and_cleared_by_a_write(uffd: Userfaultfd,
                                                             mem: Callable[..., Any]) -> None:
    m = mem(4)
    m.write(0)
    uffd.register(m.addr, m.size)
    uffd.writeprotect(m.addr, m.size)
    assert wp_bits(m) == [True] * 4
    m.write(0)
    m.write(3)  # a never-touched page: its marker goes too
    assert wp_bits(m) == [False, True, True, False]


def test_file_bit_is_set_for_file_pages_and_cleared_by_a_private_copy(
        tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "f")
    with open(path, "wb") as f:
        f.write(b"y" * 4 * P)
    with open(path, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 4 * P, flags=mmap.MAP_SHARED)
        private = mmap.mmap(f.fileno(), 4 * P, flags=mmap.MAP_PRIVATE)
    try:
        for m in (shared, private):
            _ = m[0]
            _ = m[P]
        private[P] = 1  # copy-on-write: now an anonymous page
        addr_s, addr_p = _native.buffer_info(shared)[0], _native.buffer_info(private)[0]
        s = decode_pagemap(read_pagemap("self", addr_s, addr_s + 2 * P))
        p = decode_pagemap(read_pagemap("self", addr_p, addr_p + 2 * P))
        assert s.file.tolist() == [True, True] and s.present.all()
        assert p.file.tolist() == [True, False] and p.present.all()
    finally:
        shared.close()
        private.close()


def test_shared_anonymous_pages_carry_the_file_bit(mem: Callable[..., Any]) -> None:
    # pagemap.rst: bit 61 is "page is file-page or shared-anon"
    m = mem(2, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    m.write(0)
    assert decode_pagemap(read_pagemap("self", m.addr, m.addr + P)).file.tolist() == [True]


def test_decode_pagemap_splits_every_field() -> None:
    entries = np.array([
        PM_PRESENT | PM_UFFD_WP | PM_MMAP_EXCLUSIVE | 0x1234,
        PM_SWAP | PM_SOFT_DIRTY | 0x55,  # swapped: low bits are type/offset, not a pfn
        PM_PRESENT | PM_FILE,
        0,
    ], dtype=np.uint64)
    d = decode_pagemap(entries)
    assert d.present.tolist() == [True, False, True, False]
    assert d.swapped.tolist() == [False, True, False, False]
    assert d.soft_dirty.tolist() == [False, True, False, False]
    assert d.exclusive.tolist() == [True, False, False, False]
    assert d.uffd_wp.tolist() == [True, False, False, False]
    assert d.file.tolist() == [False, False, True, False]
    assert d.guard.tolist() == [False] * 4
    assert d.pfn.tolist() == [0x1234, 0, 0, 0]


# ---- dead and gone processes ------------------------------------------------------------------

def test_pagemap_of_a_dead_pid_raises_target_gone() -> None:
    pid = dead_pid()
    with pytest.raises(TargetGone, match=str(pid)):
        Pagemap(pid)
    with pytest.raises(TargetGone):
        read_pagemap(pid, 0, P)


def test_pagemap_of_a_zombie_raises_target_gone() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    try:
        for _ in range(500):  # until it is a zombie
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        # 6.18 refuses the open; older kernels open it and read nothing.
        try:
            with Pagemap(pid) as pm:
                assert pm.exited()
        except TargetGone:
            pass
        with pytest.raises(TargetGone, match="exited|does not exist"):
            read_pagemap(pid, 0, P)
    finally:
        os.waitpid(pid, 0)


def test_clear_refs_on_a_dead_pid_raises_target_gone() -> None:
    pid = dead_pid()
    with pytest.raises(TargetGone, match="clear_refs"):
        clear_refs(pid, 4)


def test_clear_refs_refuses_an_unknown_value_with_the_errno() -> None:
    with pytest.raises(PagewatchError, match="refused 99") as exc:
        clear_refs("self", 99)
    assert exc.value.errno == errno.EINVAL
    clear_refs("self", 1)  # clear the referenced bits: harmless, and accepted


def test_pagemap_of_another_live_process_reads_its_memory() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        with Pagemap(pid) as pm:
            assert pm.fileno() >= 0 and pm.pid == pid
        with open(f"/proc/{pid}/maps") as f:
            stack = [line for line in f if "[stack]" in line][0]
        lo, hi = (int(x, 16) for x in stack.split()[0].split("-"))
        assert decode_pagemap(read_pagemap(pid, lo, hi)).present.any()
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def test_a_closed_pagemap_is_refused() -> None:
    pm = Pagemap()
    pm.close()
    assert pm.closed
    with pytest.raises(ValueError, match="closed"):
        pm.fileno()
    pm.close()


@pytest.mark.skipif(not HAS_SCAN, reason="no PAGEMAP_SCAN here (Linux 6.7+)")
def test_scan_through_a_pagemap_whose_process_exited_raises_target_gone() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    with Pagemap(pid) as pm:
        with open(f"/proc/{pid}/maps") as f:
            stack = [line for line in f if "[stack]" in line][0]
        lo, hi = (int(x, 16) for x in stack.split()[0].split("-"))
        assert len(pagemap_scan(pm, lo, hi, category_mask=8, return_mask=8)) > 0
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
        # 6.18 answers ESRCH; older kernels an empty scan, which pagewatch must not pass on.
        assert pm.exited()
        with pytest.raises(TargetGone, match="exited") as exc:
            pagemap_scan(pm, lo, hi, return_mask=8)
        assert exc.value.errno == errno.ESRCH
        with pytest.raises(TargetGone, match="exited|does not exist"):
            read_pagemap(pid, lo, hi)
