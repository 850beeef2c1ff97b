"""ProcessTracker: pages written and then made read-only (mprotect PROT_READ or PROT_NONE)
before the next collect are reported, as the dynamic loader's RELRO and W^X JITs do it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.process import ProcessDirty, ProcessTracker
from tests.targets.common import Target, build, process_backends

UFFD, SOFT_DIRTY = process_backends()
pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]

PROT_NONE, PROT_READ, PROT_RX = 0, 1, 5


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target([str(build("wro"))])
    yield t
    t.close()


def pages_at(d: ProcessDirty, addr: int, npages: int) -> set[int]:
    """Reported pages among the ``npages`` at ``addr``, as indices from ``addr``."""
    end = addr + npages * PAGE_SIZE
    return {(a - addr) // PAGE_SIZE for a in d.addresses().tolist() if addr <= a < end}


@pytest.mark.parametrize("backend", [UFFD, SOFT_DIRTY])
@pytest.mark.parametrize("prot", [PROT_READ, PROT_NONE, PROT_RX])
def test_pages_written_then_made_read_only_before_the_collect_are_reported(
        target: Target, backend: str, prot: int) -> None:
    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        assert pages_at(p.collect(), buf, 8) == set()
        assert target.cmd(f"wprot {prot}") == "ok"
        assert pages_at(p.collect(), buf, 8) == set(range(8))
        assert pages_at(p.collect(), buf, 8) == set()
        # Made writable again, written, protected again (a W^X JIT): still tracked.
        assert target.cmd(f"flip 5 {prot}") == "ok"
        assert pages_at(p.collect(), buf, 8) == {5}


@pytest.mark.parametrize("backend", [UFFD])
@pytest.mark.parametrize("kind", ["anon", "file"])
@pytest.mark.parametrize("prot", [PROT_READ, PROT_NONE, PROT_RX])
def test_memory_mapped_written_and_made_read_only_between_two_collects_is_reported(
        target: Target, backend: str, kind: str, prot: int) -> None:
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        addr = int(target.cmd(f"{kind} 4 {prot}"))
        d = p.collect()
        assert pages_at(d, addr, 4) == set(range(4))
        assert any(m.start <= addr < m.end for m in d.new)
        assert pages_at(p.collect(), addr, 4) == set()


@pytest.mark.parametrize("backend", [UFFD])
def test_read_only_memory_written_before_the_attach_is_tracked_and_not_reported(
        target: Target, backend: str) -> None:
    """A RELRO region relocated before the attach: tracked (a later flip is seen), not
    reported as written since the attach."""
    addr = int(target.cmd(f"file 4 {PROT_READ}"))
    buf = int(target.cmd("buf"))
    assert target.cmd(f"wprot {PROT_READ}") == "ok"
    with ProcessTracker(target.pid, backend=backend) as p:
        d = p.collect()
        assert pages_at(d, addr, 4) == set() and pages_at(d, buf, 8) == set()
        assert target.cmd(f"flip 2 {PROT_READ}") == "ok"
        assert pages_at(p.collect(), buf, 8) == {2}


@pytest.mark.parametrize("backend", [UFFD])
def test_memory_replaced_at_the_same_address_between_two_collects_is_reported_whole(
        target: Target, backend: str) -> None:
    """The maps read the same before and after (munmap + mmap MAP_FIXED): the new memory is
    told by its missing registration, reported whole (the old content is gone) and tracked."""
    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        p.collect()  # the same layout twice: its scan plan is reused
        assert target.cmd("remap 3") == "ok"
        d = p.collect()
        assert pages_at(d, buf, 8) == set(range(8))
        assert any(m.start <= buf < m.end for m in d.new)
        assert pages_at(p.collect(), buf, 8) == set()
        assert target.cmd(f"flip 6 {PROT_READ | 2}") == "ok"
        assert pages_at(p.collect(), buf, 8) == {6}
