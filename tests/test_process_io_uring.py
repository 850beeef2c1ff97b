"""ProcessTracker and io_uring: reads into the target's memory by the kernel's io_uring,
plain and into registered (fixed, pinned) buffers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.process import ProcessDirty, ProcessTracker
from tests.targets.common import Target, build, process_backends

BACKENDS = process_backends()
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]

NPAGES = 16


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[tuple[Target, int, int]]:
    data = tmp_path / "data"
    data.write_bytes(b"".join(bytes([i % 251 + 1]) * PAGE_SIZE for i in range(256)))
    t = Target([str(build("uring")), str(data)])
    try:
        first = t.read()
        if first.startswith("no io_uring"):
            errno_ = int(first.split()[-1])
            pytest.skip(f"io_uring unavailable here: {os.strerror(errno_)} (disabled by "
                        "kernel.io_uring_disabled, a seccomp/LSM policy, or no CONFIG_IO_URING)")
        a, b = (int(x) for x in first.split())
        yield t, a, b
    finally:
        t.close()


def pages_at(d: ProcessDirty, addr: int) -> int:
    end = addr + NPAGES * PAGE_SIZE
    return sum(1 for a in d.addresses().tolist() if addr <= a < end)


def content(t: Target, addr: int) -> bytes:
    with open(f"/proc/{t.pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(NPAGES * PAGE_SIZE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_io_uring_read_into_plain_memory_is_reported(
        ring: tuple[Target, int, int], backend: str) -> None:
    t, a, _ = ring
    with ProcessTracker(t.pid, backend=backend) as p:
        p.collect()
        assert pages_at(p.collect(), a) == 0
        assert t.cmd("read 16") == f"ok {NPAGES * PAGE_SIZE}"
        assert pages_at(p.collect(), a) == NPAGES


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_io_uring_fixed_buffer_is_reported_written_at_every_collect(
        ring: tuple[Target, int, int], backend: str) -> None:
    """The kernel writes a fixed buffer through its pin, with no fault: nothing tells
    whether it wrote, so its pages are reported at every collect (never a miss)."""
    t, _, b = ring
    with ProcessTracker(t.pid, backend=backend) as p:
        p.collect()
        before = content(t, b)
        assert t.cmd("fixed 32") == f"ok {NPAGES * PAGE_SIZE}"
        assert content(t, b) != before  # the read did land in the buffer
        assert pages_at(p.collect(), b) == NPAGES
        assert pages_at(p.collect(), b) == NPAGES  # written or not
