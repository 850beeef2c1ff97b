"""ProcessTracker: pages written and then made read-only (mprotect PROT_READ or PROT_NONE)
before the next collect are reported, as the dynamic loader's RELRO and W^X JITs do it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

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


@pytest.mark.parametrize("backend", [UFFD])
def test_a_write_before_part_of_the_memory_is_replaced_during_the_collect_is_reported(
        target: Target, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target replaces the end of a mapping after the collect read the maps and before
    it scans (the scan stops at the new memory with EPERM, having reset the pages before
    it): the page written before is reported by this collect or the next, never lost.
    The race is made certain by handing the collect the maps it read before."""
    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        stale = p._maps_now()
        p.collect()  # the same layout twice: its scan plan is reused
        assert target.cmd("part 1 5") == "ok"
        with monkeypatch.context() as m:
            m.setattr(p, "_maps_now", lambda: stale)
            first = pages_at(p.collect(), buf, 8)
        second = pages_at(p.collect(), buf, 8)
        assert 1 in first | second
        assert {5, 6, 7} <= first | second  # the new memory: reported whole
        assert target.cmd(f"flip 2 {PROT_READ | 2}") == "ok"  # and the rest still tracked
        assert pages_at(p.collect(), buf, 8) == {2}


@pytest.mark.parametrize("backend", [UFFD])
def test_a_mapping_rescanned_after_a_refusal_keeps_what_its_failed_scan_reset(
        target: Target, backend: str) -> None:
    """The per-mapping scan (a mapping new to the plan, or one the batched scan was refused
    on) meets memory replaced since the maps were read: what it walked and reset before the
    refusal is reported, not dropped with the error."""
    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        _, everything = p._maps_now()
        m = next(x for x in everything if x.start <= buf < x.end)
        assert target.cmd("part 1 5") == "ok"
        runs, _ = p._collect_uffd(m, True, register=True)
        got = {(a - buf) // PAGE_SIZE for s, e in runs.tolist()
               for a in range(s, e, PAGE_SIZE) if buf <= a < buf + 8 * PAGE_SIZE}
        assert {1, 5, 6, 7} <= got


@pytest.mark.parametrize("backend", [UFFD])
def test_a_write_before_a_refused_scan_is_reported_when_the_new_memory_is_gone_again(
        target: Target, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched scan is refused by memory mapped over the mapping's end after the maps
    were read, and that memory is unmapped again before the mapping is rescanned (the
    rescan then meets no refusal): the page written before is still reported."""
    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        stale = p._maps_now()
        p.collect()
        assert target.cmd("part 1 5") == "ok"
        real = p._collect_uffd
        rescanned = []

        def gone_first(m: Any, *args: Any, **kw: Any) -> Any:
            rescanned.append(m.start <= buf < m.end)
            assert target.cmd("unmap 5") == "ok"
            return real(m, *args, **kw)

        with monkeypatch.context() as mp:
            mp.setattr(p, "_maps_now", lambda: stale)
            mp.setattr(p, "_collect_uffd", gone_first)
            first = pages_at(p.collect(), buf, 8)
        assert rescanned == [True]  # only the refused mapping, after the batched scan
        assert 1 in first | pages_at(p.collect(), buf, 8)


@pytest.mark.parametrize("backend", [UFFD])
@pytest.mark.parametrize("error", [-1, 12])  # no progress, ENOMEM
def test_writes_a_failed_collect_had_reset_are_reported_by_the_next(
        target: Target, backend: str, monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    """The batched scan resets every range, then one range's scan failed (not a refusal):
    the collect raises, and what it had reset (in the other ranges too) is reported by the
    next collect, not lost with the error."""
    from pagewatch import _native
    from pagewatch.errors import PagewatchError

    buf = int(target.cmd("buf"))
    real = _native.pagemap_scan_ranges

    def one_fails(fd: int, ranges: Any, flags: int, *args: Any) -> Any:
        rows, owner, errs = real(fd, ranges, flags, *args)
        if flags & 1:  # a resetting scan: another range than the buffer's failed
            errs = errs.copy()
            errs[next(i for i, (a, b) in enumerate(ranges.tolist()) if not a <= buf < b)] = error
        return rows, owner, errs

    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        p.collect()
        assert target.cmd(f"flip 2 {PROT_READ | 2}") == "ok"
        with monkeypatch.context() as m:
            m.setattr(_native, "pagemap_scan_ranges", one_fails)
            with pytest.raises((PagewatchError, OSError)):
                p.collect()
        assert pages_at(p.collect(), buf, 8) == {2}
        assert pages_at(p.collect(), buf, 8) == set()


@pytest.mark.parametrize("backend", [UFFD])
def test_writes_a_failed_per_mapping_scan_had_reset_are_reported_by_the_next_collect(
        target: Target, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the per-mapping scan: it reset the mapping's pages, then failed."""
    from pagewatch.errors import PagewatchError

    buf = int(target.cmd("buf"))
    with ProcessTracker(target.pid, backend=backend) as p:
        p.collect()
        _, everything = p._maps_now()
        m = next(x for x in everything if x.start <= buf < x.end)
        assert target.cmd(f"flip 2 {PROT_READ | 2}") == "ok"
        real = p._scan

        def reset_then_fail(start: int, end: int, **kw: Any) -> Any:
            rows = real(start, end, **kw)
            if kw.get("wp_matching"):
                raise PagewatchError("failed after its reset")
            return rows

        with monkeypatch.context() as mp:
            mp.setattr(p, "_scan", reset_then_fail)
            with pytest.raises(PagewatchError):
                p._collect_uffd(m, True, register=True)
        assert 2 in pages_at(p.collect(), buf, 8)
