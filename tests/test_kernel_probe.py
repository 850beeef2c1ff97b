"""``pagewatch.probe()``: every answer is checked against an independent attempt of our own,
so these tests hold on any kernel (here 6.18 without soft-dirty; Debian 6.1 and 6.12 in the
kernel matrix), never against hard-coded answers."""

from __future__ import annotations

import errno
import json
import mmap
import os
import platform
from collections.abc import Iterator

import pytest

from pagewatch import _native
from pagewatch.kernel import (
    Capabilities,
    Capability,
    PageCategory,
    Pagemap,
    UffdFeature,
    Userfaultfd,
    pagemap_scan,
    probe,
)
from pagewatch.kernel.probe import probe_wp_async

P = mmap.PAGESIZE
UFFD_USER_MODE_ONLY = 1


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    return probe()


def _capabilities(c: Capabilities) -> Iterator[tuple[str, Capability]]:
    for name in ("userfaultfd", "uffd_wp_async", "pagemap_scan", "soft_dirty"):
        yield name, getattr(c, name)
    for group in ("uffd_features", "pagemap_scan_categories"):
        for key, cap in getattr(c, group).items():
            yield f"{group}.{key}", cap


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ---- independent checks ---------------------------------------------------------------------

def _direct_userfaultfd() -> int | None:
    """An fd by any of the three ways, or None."""
    for fn, flags in ((_native.userfaultfd, os.O_CLOEXEC | UFFD_USER_MODE_ONLY),
                      (_native.userfaultfd, os.O_CLOEXEC),
                      (_native.userfaultfd_dev, os.O_CLOEXEC)):
        try:
            return fn(flags)
        except OSError:
            continue
    return None


def _direct_uffd_features() -> int:
    fd = _direct_userfaultfd()
    if fd is None:
        return 0
    try:
        return _native.uffdio_api(fd, 0)[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def _direct_scan(mask: int = 0) -> int:
    """errno of a zero-length PAGEMAP_SCAN with ``mask`` (0: accepted)."""
    with Pagemap() as pm:
        try:
            _native.pagemap_scan_once(pm.fileno(), 0, 0, 0, mask, 0, 0, mask)
        except OSError as exc:
            return exc.errno or -1
    return 0


def _direct_soft_dirty_configured() -> bool:
    """CONFIG_MEM_SOFT_DIRTY gives every new VMA VM_SOFTDIRTY: VmFlags 'sd' in smaps."""
    m = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = _native.buffer_info(m)[0]
        current = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    current = lo <= addr < hi
                elif current and line.startswith("VmFlags:"):
                    return "sd" in line.split()[1:]
    finally:
        m.close()
    raise AssertionError("our mapping is missing from smaps")


def _direct_tracking_cycle() -> bool:
    """Register, protect, write one page and see exactly it reported."""
    try:
        u = Userfaultfd(int(UffdFeature.WP_ASYNC))
    except OSError:
        return False
    m = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = _native.buffer_info(m)[0]
        u.register(addr, 4 * P)
        u.writeprotect(addr, 4 * P)
        m[2 * P] = 1
        got = pagemap_scan("self", addr, addr + 4 * P, category_mask=2, check_wpasync=True)
        return got[:, :2].tolist() == [[addr + 2 * P, addr + 3 * P]]
    except OSError:
        return False
    finally:
        u.close()
        m.close()


# ---- the answers ------------------------------------------------------------------------------

def test_probe_names_the_kernel_arch_and_page_size(caps: Capabilities) -> None:
    assert caps.kernel == os.uname().release == platform.release()
    assert caps.arch == os.uname().machine
    assert caps.page_size == os.sysconf("SC_PAGE_SIZE")


def test_every_capability_is_a_bool_with_a_reason(caps: Capabilities) -> None:
    for name, cap in _capabilities(caps):
        assert isinstance(cap.available, bool), name
        assert isinstance(cap.reason, str) and cap.reason.strip(), name
        assert bool(cap) is cap.available


def test_probe_userfaultfd_agrees_with_a_direct_attempt(caps: Capabilities) -> None:
    fd = _direct_userfaultfd()
    if fd is not None:
        os.close(fd)
    assert caps.userfaultfd.available == (fd is not None)
    assert bool(caps.userfaultfd_how) == caps.userfaultfd.available


def test_probe_uffd_features_agree_with_uffdio_api(caps: Capabilities) -> None:
    offered = _direct_uffd_features()
    assert set(caps.uffd_features) == {str(f.name) for f in UffdFeature}
    for f in UffdFeature:
        cap = caps.uffd_features[str(f.name)]
        assert cap.available == bool(offered & f), f.name
        if not cap.available:
            assert "Linux" in cap.reason or "userfaultfd" in cap.reason


def test_probe_pagemap_scan_agrees_with_a_direct_ioctl(caps: Capabilities) -> None:
    e = _direct_scan()
    assert caps.pagemap_scan.available == (e == 0)
    if e == errno.ENOTTY:
        assert "6.7" in caps.pagemap_scan.reason


def test_probe_scan_categories_agree_with_direct_ioctls(caps: Capabilities) -> None:
    assert set(caps.pagemap_scan_categories) == {str(c.name) for c in PageCategory}
    scan = _direct_scan() == 0
    for c in PageCategory:
        e = _direct_scan(int(c)) if scan else errno.ENOTTY
        assert e in (0, errno.EINVAL, errno.ENOTTY)
        assert caps.pagemap_scan_categories[str(c.name)].available == (e == 0), c.name
    if scan:  # every kernel with the ioctl knows the 6.7 categories
        assert all(caps.pagemap_scan_categories[str(c.name)].available
                   for c in PageCategory if c < PageCategory.SOFT_DIRTY)


def test_probe_async_write_protect_agrees_with_a_real_tracking_cycle(caps: Capabilities) -> None:
    works = _direct_tracking_cycle()
    assert caps.uffd_wp_async.available == works
    available, reason = probe_wp_async()  # the cached answer the backends use
    assert available == caps.uffd_wp_async.available and reason
    if caps.uffd_wp_async.available:
        assert caps.userfaultfd and caps.pagemap_scan
        assert caps.uffd_features["WP_ASYNC"] and caps.uffd_features["WP_UNPOPULATED"]


def test_probe_soft_dirty_agrees_with_the_vmas_soft_dirty_flag(caps: Capabilities) -> None:
    configured = _direct_soft_dirty_configured()
    assert caps.soft_dirty.available == configured
    if not configured:
        assert "CONFIG_MEM_SOFT_DIRTY" in caps.soft_dirty.reason


def test_probe_thp_mode_and_hugetlb_pages_match_sysfs(caps: Capabilities) -> None:
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp is None:
        assert caps.thp == "unavailable"
    else:
        assert f"[{caps.thp}]" in thp
    assert caps.hugetlb_pages == int(_read("/proc/sys/vm/nr_hugepages") or 0)
    unpriv = _read("/proc/sys/vm/unprivileged_userfaultfd")
    assert caps.unprivileged_userfaultfd == (None if unpriv is None else int(unpriv))


def test_as_dict_is_plain_json_with_each_capability_as_available_and_reason(
        caps: Capabilities) -> None:
    d = json.loads(json.dumps(caps.as_dict()))
    for key in ("kernel", "arch", "page_size", "userfaultfd", "uffd_features", "pagemap_scan",
                "pagemap_scan_categories", "soft_dirty"):
        assert key in d
    for key in ("userfaultfd", "pagemap_scan", "soft_dirty", "uffd_wp_async"):
        assert set(d[key]) == {"available", "reason"}
        assert d[key]["available"] == getattr(caps, key).available
    for group in ("uffd_features", "pagemap_scan_categories"):
        for name, cap in d[group].items():
            assert set(cap) == {"available", "reason"}
            assert cap["available"] == getattr(caps, group)[name].available


def test_probe_leaves_no_file_descriptor_or_mapping_behind() -> None:
    probe()  # warm caches and imports
    fds = sorted(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        before = len(f.readlines())
    probe()
    assert sorted(os.listdir("/proc/self/fd")) == fds
    with open("/proc/self/maps") as f:
        assert len(f.readlines()) <= before + 1  # an allocator arena may grow by one
