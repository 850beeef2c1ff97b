"""ProcessTracker: a collect that meets the target's exit reports only what was written.

A tracker with no exit stop (the exporter, ``record --pid``, a library user) may collect while
the target's memory is being torn down.  PAGEMAP_SCAN takes no hold on the memory (its ioctl
only locks the maps), so a scan can walk page tables that exit(2) is emptying, and its fast path
reports an emptied entry as written: on Linux 6.12 whole mappings came back written, handed on
as ``TargetGone.collected``.  These tests race many collects against exits and check every
page of the big buffer reported: only its first page was written after the tracker's reset.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pagewatch as pw
from pagewatch.kernel.constants import PAGE_SIZE
from pagewatch.process import ProcessDirty, ProcessTracker
from tests.targets.common import build, in_emulated_guest, process_backends

pytestmark = [pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                 reason="syscall injection is implemented for x86-64 only")]
BACKENDS = process_backends()
PAGES = 16384  # 64 MiB: its teardown is long enough for collects to overlap it


def _in_buffer(d: ProcessDirty, start: int) -> set[int]:
    a = d.addresses()
    a = a[(a >= start) & (a < start + PAGES * PAGE_SIZE)]
    return {int(x - start) // PAGE_SIZE for x in a.tolist()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_collects_racing_an_exit_report_only_the_pages_written(backend: str) -> None:
    exe = build("dying")
    tries = int(os.environ.get("PAGEWATCH_EXIT_TRIES", 30 if in_emulated_guest() else 40))
    gone_with_result = 0
    for _ in range(tries):
        proc = subprocess.Popen([str(exe), str(PAGES)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            start = int(proc.stdout.readline().split()[2], 16)
            with ProcessTracker(proc.pid, backend=backend) as t:
                t.collect()  # the buffer was written before: reset
                proc.stdin.write("go\n")
                proc.stdin.flush()
                seen: set[int] = set()
                try:
                    while True:
                        seen |= _in_buffer(t.collect(), start)
                except pw.TargetGone as exc:
                    if isinstance(exc.collected, ProcessDirty):
                        gone_with_result += 1
                        seen |= _in_buffer(exc.collected, start)
                assert seen <= {0}, (
                    f"{len(seen)} pages of the buffer reported written; only page 0 was")
        finally:
            proc.kill()
            proc.wait()
    print(f"{backend}: {tries} exits, {gone_with_result} with a last result")
