"""pagewatch._intervals: numpy run arithmetic, checked against Python sets (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagewatch import _intervals as iv

pytestmark = pytest.mark.kernel_independent

N = 80
_settings = settings(derandomize=True, max_examples=300, deadline=None)

page_sets = st.sets(st.integers(0, N - 1), max_size=N)
raw_runs = st.lists(st.tuples(st.integers(0, N), st.integers(0, N)), max_size=12)


def runs_of(s: set[int]) -> np.ndarray:
    return iv.from_pages(np.array(sorted(s), np.int64))


def set_of(runs: np.ndarray) -> set[int]:
    return {p for a, b in runs.tolist() for p in range(a, b)}


def assert_normalised(runs: np.ndarray) -> None:
    assert runs.dtype == np.int64 and runs.shape[1:] == (2,)
    assert (runs[:, 1] > runs[:, 0]).all()
    assert (runs[1:, 0] > runs[:-1, 1]).all()  # sorted, neither overlapping nor touching


@_settings
@given(raw_runs)
def test_normalise_is_the_union_of_any_runs(runs: list[tuple[int, int]]) -> None:
    got = iv.normalise(np.array(runs, np.int64).reshape(-1, 2))
    assert_normalised(got)
    assert set_of(got) == {p for a, b in runs for p in range(a, b)}


@_settings
@given(page_sets)
def test_runs_from_a_bitmap_and_from_pages_agree(pages: set[int]) -> None:
    bits = np.zeros(N, bool)
    bits[list(pages)] = True
    a, b = iv.from_bitmap(bits, offset=5), runs_of(pages)
    assert_normalised(a)
    assert_normalised(b)
    assert a.tolist() == (b + 5).tolist()


@_settings
@given(page_sets, page_sets)
def test_intersect_and_subtract_are_the_set_operations(a: set[int], b: set[int]) -> None:
    ra, rb = runs_of(a), runs_of(b)
    inter, diff = iv.intersect(ra, rb), iv.subtract(ra, rb)
    assert_normalised(inter)
    assert_normalised(diff)
    assert set_of(inter) == a & b
    assert set_of(diff) == a - b


@_settings
@given(page_sets, st.integers(0, N), st.integers(0, N))
def test_clip_and_complement_within_a_range(a: set[int], lo: int, hi: int) -> None:
    ra, window = runs_of(a), set(range(lo, hi))
    clipped, comp = iv.clip(ra, lo, hi), iv.complement(ra, lo, hi)
    assert_normalised(clipped)
    assert_normalised(comp)
    assert set_of(clipped) == a & window
    assert set_of(comp) == window - a


@_settings
@given(page_sets, st.integers(0, N + 2))
def test_take_first_keeps_the_lowest_n(a: set[int], n: int) -> None:
    got = iv.take_first(runs_of(a), n)
    assert_normalised(got)
    assert set_of(got) == set(sorted(a)[:n])
    assert iv.count(got) == min(n, len(a))
