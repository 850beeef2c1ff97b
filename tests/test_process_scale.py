"""ProcessTracker's cost grows linearly with the number of mappings of the target.

Measured without a clock: the number of Python lines pagewatch executes (a deterministic
count, from ``sys.settrace``) to attach to and collect a target with N mappings, for two
values of N.  Quadratic work (an O(n) step per mapping, as the interval set's ``add`` was)
shows as a ratio near the square of the ratio of N.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from pagewatch.kernel.probe import probe_wp_async
from pagewatch.process import ProcessTracker
from tests.targets.common import Target, build

wp_ok, wp_why = probe_wp_async()
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                       reason="syscall injection is implemented for x86-64 only"),
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}"),
]

PACKAGE = os.path.dirname(sys.modules["pagewatch"].__file__ or "")


class LineCounter:
    """Counts the lines executed in pagewatch's own modules while active."""

    def __init__(self) -> None:
        self.lines = 0

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(PACKAGE):
            return self._local
        return None

    def __enter__(self) -> LineCounter:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


@contextlib.contextmanager
def many_maps(n: int) -> Iterator[Target]:
    t = Target([str(build("manymaps")), str(n)])
    t.read()  # the mappings are made
    try:
        yield t
    finally:
        t.close()


def lines_to_attach_and_collect(n: int) -> tuple[int, int, int]:
    """Lines run to attach, and to collect twice (all written, then nothing), and the
    number of mappings tracked."""
    with many_maps(n) as t:
        with LineCounter() as attach:
            p = ProcessTracker(t.pid)
        with p:
            assert t.cmd("w 1") == "ok"
            with LineCounter() as collect:
                d = p.collect()
                p.collect()
            assert d.count >= n
            return attach.lines, collect.lines, len(d)


def test_attach_and_collect_run_a_number_of_lines_linear_in_the_mappings() -> None:
    a1, c1, m1 = lines_to_attach_and_collect(250)
    a4, c4, m4 = lines_to_attach_and_collect(1000)
    assert m4 > 3.5 * m1
    # Linear: 4x the mappings cost at most ~4x the lines (a fixed part makes it less).
    # Quadratic work gives ~16x.
    assert a4 <= 4.6 * a1, f"attach: {a1} lines for {m1} mappings, {a4} for {m4}"
    assert c4 <= 4.6 * c1, f"collect: {c1} lines for {m1} mappings, {c4} for {m4}"
