"""pagewatch.writewatch: GetWriteWatch / ResetWriteWatch as Microsoft documents them."""

from __future__ import annotations

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import writewatch as ww
from pagewatch.kernel.constants import PAGE_SIZE


@pytest.fixture
def mem() -> ww.WatchedMemory:
    m = ww.alloc(64 * PAGE_SIZE)
    yield m
    ww.free(m)


def test_granularity_is_the_page_size_and_addresses_ascend(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    for p in (40, 3, 17):
        a[p * PAGE_SIZE + 5] = 1
    addrs, gran = ww.get_write_watch(mem.address, mem.size)
    assert gran == PAGE_SIZE
    assert addrs.dtype == np.uint64
    assert addrs.tolist() == [mem.address + p * PAGE_SIZE for p in (3, 17, 40)]


def test_without_reset_pages_stay_reported(mem: ww.WatchedMemory) -> None:
    mem.array()[0] = 1
    first, _ = ww.get_write_watch(mem.address, mem.size)
    again, _ = ww.get_write_watch(mem.address, mem.size)
    assert first.tolist() == again.tolist() == [mem.address]


def test_flag_reset_returns_then_forgets(mem: ww.WatchedMemory) -> None:
    mem.array()[PAGE_SIZE] = 1
    got, _ = ww.get_write_watch(mem.address, mem.size, reset=True)
    assert got.tolist() == [mem.address + PAGE_SIZE]
    assert ww.get_write_watch(mem.address, mem.size)[0].tolist() == []


def test_max_count_returns_the_first_and_resets_only_those(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    for p in (1, 2, 3, 9):
        a[p * PAGE_SIZE] = 1
    got, _ = ww.get_write_watch(mem.address, mem.size, reset=True, max_count=2)
    assert got.tolist() == [mem.address + PAGE_SIZE, mem.address + 2 * PAGE_SIZE]
    rest, _ = ww.get_write_watch(mem.address, mem.size, reset=True)
    assert rest.tolist() == [mem.address + 3 * PAGE_SIZE, mem.address + 9 * PAGE_SIZE]


def test_a_sub_range_reset_keeps_the_rest_of_the_allocation(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    a[2 * PAGE_SIZE] = 1
    a[50 * PAGE_SIZE] = 1
    ww.reset_write_watch(mem.address, 10 * PAGE_SIZE)
    assert ww.get_write_watch(mem.address, mem.size)[0].tolist() == [
        mem.address + 50 * PAGE_SIZE]
    sub, _ = ww.get_write_watch(mem.address + 40 * PAGE_SIZE, 20 * PAGE_SIZE, reset=True)
    assert sub.tolist() == [mem.address + 50 * PAGE_SIZE]


def test_memory_not_allocated_for_write_watching_is_an_error(mem: ww.WatchedMemory) -> None:
    other = np.zeros(PAGE_SIZE * 4, np.uint8)
    with pytest.raises(pw.InvalidRange, match="not allocated for write watching"):
        ww.get_write_watch(other.ctypes.data, other.nbytes)
    with pytest.raises(pw.InvalidRange, match="runs past the end"):
        ww.get_write_watch(mem.address, mem.size + PAGE_SIZE)
    with pytest.raises(pw.InvalidRange):
        ww.reset_write_watch(mem.address, 0)
    with pytest.raises(ValueError):
        ww.get_write_watch(mem.address, mem.size, max_count=-1)


def test_freed_memory_is_no_longer_watched() -> None:
    m = ww.alloc(PAGE_SIZE)
    base = m.address
    ww.free(m)
    with pytest.raises(pw.InvalidRange):
        ww.get_write_watch(base, PAGE_SIZE)


# ---- every case of Microsoft's documentation and Wine's conformance tests ---------------------

@pytest.mark.parametrize("count", [0, -1])
def test_a_count_below_one_is_an_invalid_parameter(mem: ww.WatchedMemory, count: int) -> None:
    """GetWriteWatch with *lpdwCount == 0 fails with ERROR_INVALID_PARAMETER on Windows; it
    returned an empty list here."""
    mem.array()[0] = 1
    with pytest.raises(ValueError, match="max_count must be >= 1"):
        ww.get_write_watch(mem.address, mem.size, reset=True, max_count=count)
    assert ww.get_write_watch(mem.address, mem.size)[0].tolist() == [mem.address]


def test_a_count_may_be_any_integer_type(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    a[0] = a[PAGE_SIZE] = 1
    assert ww.get_write_watch(mem.address, mem.size, max_count=np.int64(1))[0].tolist() == [
        mem.address]
    with pytest.raises(TypeError):
        ww.get_write_watch(mem.address, mem.size, max_count=1.0)  # type: ignore[arg-type]


def test_invalid_ranges_are_invalid_parameters(mem: ww.WatchedMemory) -> None:
    for base, size in ((mem.address, 0), (mem.address, 2 * mem.size),
                       (mem.address + mem.size - PAGE_SIZE, PAGE_SIZE + 1), (0, mem.size)):
        with pytest.raises(pw.InvalidRange):
            ww.get_write_watch(base, size)
    for base, size in ((mem.address, 0), (0, mem.size)):
        with pytest.raises(pw.InvalidRange):
            ww.reset_write_watch(base, size)


def test_a_write_across_a_page_boundary_reports_both_pages(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    a[2 * PAGE_SIZE - 2:2 * PAGE_SIZE + 2] = 0xEF
    got, _ = ww.get_write_watch(mem.address, mem.size)
    assert got.tolist() == [mem.address + PAGE_SIZE, mem.address + 2 * PAGE_SIZE]


def test_a_query_of_a_sub_range_sees_only_its_pages(mem: ww.WatchedMemory) -> None:
    a = mem.array()
    a[2 * PAGE_SIZE + 3] = a[4 * PAGE_SIZE + 8] = 0x11
    got, _ = ww.get_write_watch(mem.address + 3 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert got.tolist() == [mem.address + 4 * PAGE_SIZE]
    ww.reset_write_watch(mem.address, 3 * PAGE_SIZE)
    assert ww.get_write_watch(mem.address, mem.size)[0].tolist() == [
        mem.address + 4 * PAGE_SIZE]


@pytest.mark.parametrize("backend", ["uffd-async", "uffd-sync", "compare"])
def test_changing_protection_does_not_change_the_watches(backend: str) -> None:
    """Windows: VirtualProtect to read-only and back leaves the watch state as it was."""
    from pagewatch import _native
    from pagewatch.backends.base import backend_class

    ok, why = backend_class(backend).available()
    if not ok:
        pytest.skip(f"{backend} unavailable here: {why}")
    mem = ww.alloc(16 * PAGE_SIZE, backend=backend)
    try:
        a = mem.array()
        a[2 * PAGE_SIZE] = a[4 * PAGE_SIZE] = 1
        _native.mprotect(mem.address, 3 * PAGE_SIZE, 1)  # PROT_READ
        _native.mprotect(mem.address, 3 * PAGE_SIZE, 3)  # PROT_READ | PROT_WRITE
        del a
        got, _ = ww.get_write_watch(mem.address, mem.size)
        assert got.tolist() == [mem.address + 2 * PAGE_SIZE, mem.address + 4 * PAGE_SIZE]
    finally:
        ww.free(mem)


def test_a_fresh_allocation_has_nothing_written_and_size_zero_is_refused() -> None:
    with pytest.raises(pw.InvalidRange):
        ww.alloc(0)
    m = ww.alloc(3 * PAGE_SIZE + 1)  # rounded up to pages
    try:
        assert m.size == 4 * PAGE_SIZE
        assert ww.get_write_watch(m.address, m.size)[0].tolist() == []
        m.array()[3 * PAGE_SIZE] = 1
        assert ww.get_write_watch(m.address, m.size)[0].tolist() == [m.address + 3 * PAGE_SIZE]
    finally:
        ww.free(m)
    with pytest.raises(pw.InvalidRange):
        ww.reset_write_watch(m.address, PAGE_SIZE)
