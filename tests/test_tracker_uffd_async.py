"""uffd-async Tracker: the behaviours the default backend pins."""

from __future__ import annotations

import numpy as np
import pytest

import pagewatch as pw
from pagewatch.kernel.constants import PAGE_SIZE

ok, why = pw.backends()[0].available, pw.backends()[0].reason
pytestmark = [
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not ok, reason=f"uffd-async unavailable: {why}"),
]


def test_auto_picks_uffd_async_for_a_large_array() -> None:
    a = np.zeros(1 << 28, np.uint8)
    with pw.Tracker(a) as t:
        assert t.backend == "uffd-async"
        assert "best available" in t.backend_reason


def test_fresh_tracker_reports_nothing_then_exactly_the_pages_written() -> None:
    a = np.zeros(64 * PAGE_SIZE, np.uint8)
    with pw.Tracker(a, backend="uffd-async") as t:
        assert len(t.collect()) == 0
        for off in (0, 5 * PAGE_SIZE + 7, 63 * PAGE_SIZE):
            a[off] = 1
        want = {(off + t.offset) // PAGE_SIZE for off in (0, 5 * PAGE_SIZE + 7,
                                                          63 * PAGE_SIZE)}
        assert {int(p) for p in t.collect().pages()} == want
        assert len(t.collect(reset=False)) == 0
        a[PAGE_SIZE * 10] = 2
        d = t.collect()
        assert list(d.pages()) == [(PAGE_SIZE * 10 + t.offset) // PAGE_SIZE]
