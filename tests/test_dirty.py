"""DirtyPages, the one result type: constructors, views and set operations.

Randomised cases use numpy's generator with fixed seeds, checked against plain Python sets.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagewatch import DirtyPages

pytestmark = pytest.mark.kernel_independent  # numpy only: nothing here touches the kernel

PS = 4096
BASE = 0x7F0000000000


def dp(runs: list[tuple[int, int]], npages: int = 100) -> DirtyPages:
    return DirtyPages(np.array(runs, dtype=np.int64).reshape(-1, 2), BASE, npages, PS)


def as_set(d: DirtyPages) -> set[int]:
    return {int(p) for p in d.pages()}


def random_pages(rng: np.random.Generator, npages: int) -> np.ndarray:
    density = rng.choice([0.01, 0.2, 0.5, 0.9, 1.0])
    return np.flatnonzero(rng.random(npages) < density)


# ---- construction and normalisation -----------------------------------------------------

def test_runs_are_sorted_and_touching_or_overlapping_runs_merge() -> None:
    d = dp([(10, 12), (0, 3), (3, 5), (11, 15), (20, 21), (40, 40)])
    assert d.runs.tolist() == [[0, 5], [10, 15], [20, 21]]
    assert len(d) == 5 + 5 + 1


def test_a_run_contained_in_another_disappears() -> None:
    assert dp([(0, 50), (10, 20), (49, 50)]).runs.tolist() == [[0, 50]]


def test_runs_outside_the_region_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        dp([(95, 101)])
    with pytest.raises(ValueError, match="outside"):
        dp([(-1, 2)])


def test_runs_are_read_only() -> None:
    d = dp([(1, 2)])
    with pytest.raises(ValueError):
        d.runs[0, 0] = 5


def test_empty_has_no_pages_and_is_false() -> None:
    d = DirtyPages.empty(BASE, 100, PS)
    assert len(d) == 0 and d.nbytes == 0 and not d
    assert d.pages().tolist() == [] and d.pages().dtype == np.int64
    assert d.offsets().tolist() == [] and d.addresses().tolist() == []
    assert not d.bitmap().any() and d.bitmap().shape == (100,)
    assert list(d) == [] and 0 not in d
    assert d == dp([]) and bool(dp([(0, 1)]))


# ---- from_regions -------------------------------------------------------------------------

def test_from_regions_turns_addresses_into_page_runs() -> None:
    regions = np.array([[BASE + 2 * PS, BASE + 5 * PS, 2], [BASE + 9 * PS, BASE + 10 * PS, 2]],
                       dtype=np.uint64)
    d = DirtyPages.from_regions(regions, BASE, 100, PS)
    assert d.runs.tolist() == [[2, 5], [9, 10]]


def test_from_regions_clips_to_the_region() -> None:
    regions = np.array([
        [BASE - 10 * PS, BASE + 2 * PS, 2],    # starts before: clipped at 0
        [BASE + 98 * PS, BASE + 200 * PS, 2],  # ends after: clipped at npages
        [BASE - 20 * PS, BASE - 10 * PS, 2],   # wholly before: dropped
        [BASE + 300 * PS, BASE + 301 * PS, 2],  # wholly after: dropped
        [BASE - PS, BASE, 2],                  # ends where the region starts: dropped
    ], dtype=np.uint64)
    d = DirtyPages.from_regions(regions, BASE, 100, PS)
    assert d.runs.tolist() == [[0, 2], [98, 100]]


def test_from_regions_covers_partial_pages_outward() -> None:
    regions = np.array([[BASE + PS + 100, BASE + 3 * PS + 1, 0]], dtype=np.uint64)
    assert DirtyPages.from_regions(regions, BASE, 100, PS).runs.tolist() == [[1, 4]]


def test_from_regions_of_nothing_is_empty() -> None:
    d = DirtyPages.from_regions(np.empty((0, 3), np.uint64), BASE, 100, PS)
    assert d == DirtyPages.empty(BASE, 100, PS)


def test_from_regions_merges_regions_the_kernel_split_by_category() -> None:
    # PAGEMAP_SCAN splits a run where the categories change; pages are pages.
    regions = np.array([[BASE, BASE + 2 * PS, 0xA], [BASE + 2 * PS, BASE + 4 * PS, 0x2]],
                       dtype=np.uint64)
    assert DirtyPages.from_regions(regions, BASE, 100, PS).runs.tolist() == [[0, 4]]


# ---- round trips, randomised ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_from_pages_from_bitmap_and_views_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    npages = int(rng.integers(1, 3000))
    pages = random_pages(rng, npages)
    shuffled = rng.permutation(np.concatenate([pages, pages[: len(pages) // 3]]))  # repeats
    d = DirtyPages.from_pages(shuffled, BASE, npages, PS)
    bitmap = np.zeros(npages, bool)
    bitmap[pages] = True

    assert d.pages().tolist() == pages.tolist()
    assert len(d) == len(pages) and d.nbytes == len(pages) * PS
    assert np.array_equal(d.bitmap(), bitmap)
    assert d == DirtyPages.from_bitmap(bitmap, BASE, PS)
    assert d == DirtyPages(d.runs, BASE, npages, PS)
    assert d.offsets().tolist() == (pages * PS).tolist()
    assert d.addresses().dtype == np.uint64
    assert d.addresses().tolist() == (BASE + pages * PS).tolist()
    # Runs are maximal: sorted, disjoint, never touching.
    r = d.runs
    assert (r[:, 1] > r[:, 0]).all() and (r[1:, 0] > r[:-1, 1]).all()
    # Iteration: (offset, length) byte runs covering exactly the written pages.
    covered = {off // PS + i for off, length in d for i in range(length // PS)}
    assert covered == set(pages.tolist())
    assert all(off % PS == 0 and length % PS == 0 and length > 0 for off, length in d)


@pytest.mark.parametrize("seed", range(20))
def test_or_is_the_union_and_eq_compares_pages(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    npages = int(rng.integers(1, 2000))
    a, b = random_pages(rng, npages), random_pages(rng, npages)
    da = DirtyPages.from_pages(a, BASE, npages, PS)
    db = DirtyPages.from_pages(b, BASE, npages, PS)
    union = da | db
    assert as_set(union) == set(a.tolist()) | set(b.tolist())
    assert union == (db | da)
    assert (da | da) == da
    assert (da | DirtyPages.empty(BASE, npages, PS)) == da
    assert (da == db) == (set(a.tolist()) == set(b.tolist()))


@pytest.mark.parametrize("seed", range(10))
def test_in_tells_whether_a_byte_offset_lies_in_a_written_page(seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    npages = int(rng.integers(1, 500))
    pages = set(random_pages(rng, npages).tolist())
    d = DirtyPages.from_pages(np.array(sorted(pages), np.int64), BASE, npages, PS)
    for off in rng.integers(-PS, (npages + 1) * PS, 300).tolist():
        assert (off in d) == (off >= 0 and off // PS in pages), off
    for p in pages:  # first and last byte of each written page
        assert p * PS in d and p * PS + PS - 1 in d
        assert np.int64(p * PS) in d


def test_in_refuses_what_is_not_an_offset() -> None:
    d = dp([(0, 100)])
    assert "0" not in d and 1.0 not in d and None not in d


def test_from_bitmap_accepts_any_truthy_dtype_and_strided_views() -> None:
    raw = np.array([0, 3, 3, 0, 0, 1, 0, 255], np.uint8)
    assert DirtyPages.from_bitmap(raw, BASE, PS).runs.tolist() == [[1, 3], [5, 6], [7, 8]]
    strided = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)[::2]  # 1, 1, 0, 1
    d = DirtyPages.from_bitmap(strided, BASE, PS)
    assert d.runs.tolist() == [[0, 2], [3, 4]] and d.npages == 4


def test_from_bitmap_of_an_empty_or_all_clear_bitmap_is_empty() -> None:
    assert len(DirtyPages.from_bitmap(np.zeros(0, bool), BASE, PS)) == 0
    assert len(DirtyPages.from_bitmap(np.zeros(10, bool), BASE, PS)) == 0
    assert DirtyPages.from_bitmap(np.ones(10, bool), BASE, PS).runs.tolist() == [[0, 10]]


def test_from_pages_refuses_pages_outside_the_region() -> None:
    with pytest.raises(ValueError):
        DirtyPages.from_pages(np.array([5, 100]), BASE, 100, PS)
    with pytest.raises(ValueError):
        DirtyPages.from_pages(np.array([-1]), BASE, 100, PS)


# ---- combining ----------------------------------------------------------------------------

@pytest.mark.parametrize("other", [
    DirtyPages.empty(BASE + PS, 100, PS),
    DirtyPages.empty(BASE, 101, PS),
    DirtyPages.empty(BASE, 100, 2 * PS),
], ids=["base", "npages", "page_size"])
def test_pages_of_different_regions_do_not_combine_or_compare_equal(other: DirtyPages) -> None:
    d = DirtyPages.empty(BASE, 100, PS)
    with pytest.raises(ValueError, match="different regions"):
        _ = d | other
    assert d != other


def test_eq_with_another_type_is_not_implemented() -> None:
    d = dp([(1, 2)])
    assert d != [(1, 2)] and d != "x"
    with pytest.raises(TypeError):
        hash(d)


def test_offsets_and_addresses_follow_the_page_size() -> None:
    d = DirtyPages(np.array([[1, 3]]), BASE, 10, page_size=2 * PS)
    assert d.offsets().tolist() == [2 * PS, 4 * PS]
    assert d.addresses().tolist() == [BASE + 2 * PS, BASE + 4 * PS]
    assert list(d) == [(2 * PS, 4 * PS)] and d.nbytes == 4 * PS


def test_repr_says_how_many_pages_and_runs() -> None:
    r = repr(dp([(0, 3), (5, 6)]))
    assert "4 of 100 pages" in r and "2 runs" in r
