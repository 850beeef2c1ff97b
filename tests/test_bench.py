"""``pagewatch bench``: the harness computes and reports correctly (on tiny regions).

Nothing here is timed: the tests pin what the figures are made of (the pages the C
writers touch, the counts the floor and the measures report, medians and ratios from
injected samples, the keys of the JSON), not how fast this machine is.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native, bench
from pagewatch.bench import measures, report
from pagewatch.bench.measures import Mapping, Pattern, RawAsync, make_pattern, stat
from pagewatch.cli import main
from pagewatch.kernel.constants import PAGE_SIZE

_caps = pw.probe()
ASYNC = _caps.uffd_wp_async.available
needs_async = [
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not ASYNC, reason=f"no async uffd-wp: {_caps.uffd_wp_async.reason}"),
]


# ---- statistics and ratios from injected samples ------------------------------------------

def test_stat_is_the_median_min_and_max_of_its_samples() -> None:
    s = stat([5, 1, 4, 2, 3], "ns/page")
    assert (s["median"], s["min"], s["max"], s["n"]) == (3, 1, 5, 5)
    assert s["samples"] == [5, 1, 4, 2, 3]
    assert s["unit"] == "ns/page"
    assert stat([1, 2, 3, 10], "ms")["median"] == 2.5  # even count: the middle two


def test_stat_of_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        stat([], "ms")


def _fake_result() -> dict[str, Any]:
    """A result with known medians: plain 10, kernel fault 500, uffd-async 600, mprotect
    3000 ns/page (mprotect on a smaller region, with its own floor)."""
    def per(v: float) -> dict[str, Any]:
        return {p: stat([v * 0.9, v, v * 1.5], "ns/page") for p in measures.PATTERNS}

    G, M = measures.GiB, 64 * measures.MiB
    return {
        "mode": "quick", "config": {"write_bytes": G, "reset_sizes": [G],
                                    "fractions": [0.0, 1.0]},
        "machine": {"cpu": "test cpu", "cpus": 2, "kernel": "6.18"},
        "floor": {"write": {
            str(G): {"plain": per(10), "uffd-async": {"write": per(500)}},
            str(M): {"plain": per(20), "uffd-async": {"write": per(400)},
                     "mprotect": {"write": per(2000)}}}},
        "backends": {
            "uffd-async": {"available": True, "write": {"bytes": G, "patterns": per(600)}},
            "mprotect": {"available": True, "write": {"bytes": M, "patterns": per(3000)}},
            "compare": {"available": False, "reason": "not built here"},
        },
        "alternatives": {}, "notes": ["a note"], "errors": {},
    }


def test_ratios_use_the_floor_of_the_same_region_size() -> None:
    r = bench.derive(_fake_result())
    ua, mp = r["uffd-async"]["sequential"], r["mprotect"]["random"]
    assert ua["x_plain"] == pytest.approx(60)
    assert ua["x_kernel_fault"] == pytest.approx(1.2)
    assert ua["x_uffd_async"] == pytest.approx(1)
    assert mp["x_plain"] == pytest.approx(150)  # against the 64 MiB plain write
    assert mp["x_kernel_fault"] == pytest.approx(7.5)  # against the 64 MiB kernel fault
    assert mp["x_uffd_async"] == pytest.approx(5)
    assert "compare" not in r


def test_report_prints_medians_ranges_ratios_and_what_was_not_measured() -> None:
    res = _fake_result()
    res["ratios"] = bench.derive(res)
    text = report.render_text(res)
    assert "600 [540-900]" in text  # median [min-max] of the uffd-async backend
    assert "5.00 / 5.00 / 5.00" in text  # mprotect as a multiple of uffd-async
    assert "not measured: compare: not built here" in text
    assert "note: a note" in text
    md = report.render_markdown(res)
    assert "| pagewatch uffd-async | 1 GiB | 600 [540-900] |" in md


def test_figures_format_to_three_significant_digits() -> None:
    assert [report.fmt(x) for x in (0, 0.001234, 1.234, 12.34, 1234.5, None)] == [
        "0", "0.00123", "1.23", "12.3", "1234", "-"]
    assert report.figure({"error": "boom"}) == "error"


# ---- the C writers and the floor --------------------------------------------------------------

def test_write_pages_touches_exactly_the_pages_of_the_pattern() -> None:
    rng = np.random.default_rng(3)
    with Mapping(64 * PAGE_SIZE) as m:
        a = m.array().reshape(-1, PAGE_SIZE)
        for name in ("strided", "random-subset", "edges"):
            p = make_pattern(name, m.npages, rng)
            a[:] = 0
            ns = m.write(p, value=7)
            assert ns >= 0
            assert np.array_equal(np.flatnonzero(a[:, 0]), p.pages())
            assert not a[:, 1:].any()  # one byte per page, at its start
        del a


def test_write_pages_refuses_bad_ranges_instead_of_crashing() -> None:
    with Mapping(4 * PAGE_SIZE) as m:
        with pytest.raises(ValueError, match="not a page of"):
            _native.write_pages(m.addr, 4, 1, np.array([4], np.int64))
        with pytest.raises(TypeError, match="int64"):
            _native.write_pages(m.addr, 4, 1, np.array([1], np.int32))
        with pytest.raises(ValueError, match="page-aligned"):
            _native.write_pages(m.addr + 1, 4)
        addr = m.addr
    with pytest.raises(OSError, match="not .*mapped"):
        _native.write_pages(addr, 4)


@pytest.mark.parametrize("mech", ["uffd-async", "mprotect", "uffd-sync"])
def test_raw_floor_sees_every_written_page_once(mech: str) -> None:
    if mech == "uffd-async" and not ASYNC:
        pytest.skip(f"no async uffd-wp: {_caps.uffd_wp_async.reason}")
    if mech == "uffd-sync" and not _caps.uffd_features["PAGEFAULT_FLAG_WP"].available:
        pytest.skip("no uffd write-protect in this kernel")
    fn = {"uffd-async": _native.raw_uffd_async, "mprotect": _native.raw_mprotect,
          "uffd-sync": _native.raw_uffd_sync}[mech]
    with Mapping(64 * PAGE_SIZE) as m:
        strided = fn(m.addr, m.npages, 16)
        assert (strided["writes"], strided["pages"]) == (4, 4)
        order = np.array([5, 9, 5, 63], np.int64)  # a repeat faults once
        again = fn(m.addr, m.npages, 1, order)
        assert (again["writes"], again["pages"]) == (4, 3)
        if mech != "uffd-async":
            assert again["faults"] == 3
        m.write(Pattern("sequential", m.npages), value=1)  # still writable afterwards


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not ASYNC, reason="no async uffd-wp")
def test_raw_scan_floor_gets_then_resets_the_written_pages() -> None:
    with Mapping(256 * PAGE_SIZE) as m, RawAsync(m) as raw:
        m.write(make_pattern("strided", m.npages, np.random.default_rng(0)))
        assert raw.scan(reset=False)[1] == 16
        assert raw.scan(reset=True)[1] == 16
        assert raw.scan(reset=True)[1] == 0


# ---- measures through the Tracker ----------------------------------------------------------------

@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not ASYNC, reason="no async uffd-wp")
def test_precision_of_known_patterns_is_exact_for_uffd_async() -> None:
    got = measures.backend_precision("uffd-async", 64, np.random.default_rng(1), "never")
    want = {"sequential": 64, "strided": 4, "random": 4, "edges": 2, "none": 0}
    for case, n in want.items():
        assert got[case] == {"written": n, "reported": n, "false_positives": 0,
                             "false_negatives": 0}, case
    assert got["neighbour-mapped"]["reported"] == 0


def test_precision_counts_false_positives_and_negatives() -> None:
    c = measures._compare(np.array([1, 2, 3, 3]), np.array([2, 3, 4, 5]))
    assert c == {"written": 3, "reported": 4, "false_positives": 2, "false_negatives": 1}


@pytest.mark.parametrize("key", list(measures.ALTERNATIVES))
def test_alternatives_find_exactly_the_written_pages(key: str) -> None:
    fr = (0.0, 0.1, 1.0)
    got = measures.alternative_collect(key, 64 * PAGE_SIZE, fr, 2, np.random.default_rng(2))
    for f, k in zip(fr, (0, 6, 64), strict=True):
        entry = got["fractions"][measures.fraction_key(f)]
        assert entry["pages"] == k
        assert entry["reported"] == [[k, k], [k, k]]  # without reset, then with it


@pytest.fixture(scope="module")
def smoke() -> dict[str, Any]:
    return bench.run(bench.Config.smoke())


@pytest.mark.backend("uffd-async")
def test_result_holds_every_figure_for_each_available_backend(smoke: dict[str, Any]) -> None:
    assert smoke["probe"] == pw.probe().as_dict()
    assert {"kernel", "cpu", "cpus", "memory_bytes"} <= set(smoke["machine"])
    assert not smoke["errors"], smoke["errors"]
    measured = [n for n, e in smoke["backends"].items() if e["available"]]
    assert measured == [b.name for b in pw.list_backends() if b.available]
    for name in measured:
        e = smoke["backends"][name]
        assert set(e["write"]["patterns"]) == set(measures.PATTERNS)
        for p, s in e["write"]["patterns"].items():
            assert s["min"] <= s["median"] <= s["max"], (name, p)
            written = e["write"]["checks"][p]["written"]
            assert all(r >= written for r in e["write"]["checks"][p]["reported"]), (name, p)
        assert set(e["reset"]["sizes"]) == {str(s) for s in e["sizes"]["reset"]}
        for f, c in e["collect"]["fractions"].items():
            assert {"reset", "noreset"} <= set(c), (name, f)
            assert all(min(pair) >= c["pages"] for pair in c["reported"]), (name, f)
        for case in measures.PRECISION_CASES:
            assert e["precision"][case]["false_negatives"] == 0, (name, case)
        assert e["precision"]["neighbour-mapped"]["written"] == 0, name
    if ASYNC:
        ua = smoke["backends"]["uffd-async"]
        for f, c in ua["collect"]["fractions"].items():
            assert all(pair == [c["pages"]] * 2 for pair in c["reported"]), f  # exact
        o = smoke["python_overhead"]
        assert o["ratio"] == pytest.approx(o["tracker_collect"]["median"] / o["raw_c"]["median"])
        assert o["ratio_cpu"] == pytest.approx(
            o["tracker_collect_cpu"]["median"] / o["raw_c_cpu"]["median"])
        vc = o["vs_call"]  # the same C call clocked around it from Python: never less
        assert vc["raw_c_call"]["median"] >= o["raw_c"]["median"]
        assert vc["ratio"] == pytest.approx(
            o["tracker_collect"]["median"] / vc["raw_c_call"]["median"])
        assert "floor call timed from Python" in bench.report.render_text(smoke)
        assert set(o["small"]) == {label for label, _, _ in measures.SMALL_CASES}
        for case in o["small"].values():
            assert case["ratio"] == pytest.approx(
                case["tracker_collect"]["median"] / case["raw_c"]["median"])
        ov = smoke["overlap"]
        assert ov["ratio"] == pytest.approx(
            ov["overlapping_collect"]["median"] / ov["lone_collect"]["median"])
        st = smoke["setup"]
        assert st["tracker_per_16GiB"]["median"] == pytest.approx(
            st["tracker"]["median"] * 16 * measures.GiB / st["bytes"])
        text = bench.report.render_text(smoke)
        assert "Overlapping trackers" in text and "Tracker setup" in text
        assert set(smoke["floor"]["collect"]["fractions"]) == {
            measures.fraction_key(f) for f in measures.FRACTIONS}
    floor = smoke["floor"]["write"][str(smoke["config"]["write_bytes"])]
    assert set(floor["plain"]) == set(measures.PATTERNS)
    assert set(smoke["ratios"]) == set(measured)
    json.dumps(smoke, allow_nan=False)  # JSON as it is


@pytest.mark.backend("uffd-async")
def test_cli_json_has_patterns_reset_collect_precision_and_floor(tmp_path: Any,
                                                                 capsys: Any) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--backends", "uffd-async", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["backends"]) == {"uffd-async"}
    floor = d["floor"]["write"][str(d["config"]["write_bytes"])]
    assert set(floor["plain"]) == {"sequential", "strided", "random"}
    if ASYNC:
        assert set(floor["uffd-async"]["write"]) == {"sequential", "strided", "random"}
        e = d["backends"]["uffd-async"]
        assert set(e["write"]["patterns"]) == {"sequential", "strided", "random"}
        assert e["reset"]["sizes"] and e["collect"]["fractions"]
        assert {"written", "reported", "false_positives", "false_negatives"} <= set(
            e["precision"]["strided"])
    text = capsys.readouterr().out
    assert "Tracked first write" in text and "Precision" in text


def test_cli_rejects_an_unknown_backend(capsys: Any) -> None:
    assert main(["bench", "--smoke", "--backends", "nope"]) == 2
    assert "unknown backend nope" in capsys.readouterr().err


@pytest.mark.kernel_independent  # the render; the bench it draws is tested on every kernel
@pytest.mark.backend("uffd-async")
def test_cli_plot_writes_a_png(tmp_path: Any) -> None:
    # One render only: under the matrix's emulated CPU each costs half a minute.
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    out2 = tmp_path / "cli.png"
    assert main(["bench", "--smoke", "--backends", "uffd-async", "--plot", str(out2)]) == 0
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.backend("uffd-async")
@pytest.mark.skipif(not ASYNC, reason="no async uffd-wp")
def test_collect_without_reset_reports_each_page_once_past_the_kernels_run_buffer() -> None:
    # Found by the bench: with more written runs than the kernel's 512-run bounce buffer,
    # PAGEMAP_SCAN can return a stale walk_end and the next call repeats runs; the loop
    # must not report them twice (len() counted 16896 of 16384 pages in 1 GiB).  3000 runs:
    # the loop's 5th call (room for 2048) gets the last 952 in two internal walks.
    with Mapping(3000 * 16 * PAGE_SIZE) as m, pw.Tracker(m.region) as t:
        m.write(Pattern("strided", m.npages, 16))
        d = t.collect(reset=False)
        assert len(d) == 3000
        assert np.array_equal(d.pages(), np.arange(0, m.npages, 16))
        assert len(t.collect(reset=True)) == 3000
        assert len(t.collect(reset=False)) == 0


def test_quick_keeps_slow_backends_small_and_says_so() -> None:
    q = bench.Config.quick()
    assert q.write_bytes == measures.GiB and q.collect_bytes == measures.GiB
    assert q.reset_sizes[0] == 64 * measures.MiB and q.reset_sizes[-1] == measures.GiB
    assert bench.Config.full().reset_sizes[-1] == 4 * measures.GiB
    assert q.size_for("uffd-sync", q.write_bytes) < q.size_for("mprotect", q.write_bytes) \
        < q.size_for("uffd-async", q.write_bytes)
    assert q.reset_sizes_for("uffd-sync") == (q.caps["uffd-sync"],)
    assert q.reset_sizes_for("mprotect") == (64 * measures.MiB,)
    cfg = bench.Config.smoke(caps={"mprotect": 256 * 1024}, backends=("mprotect",))
    result: dict[str, Any] = {"probe": pw.probe().as_dict(), "floor": {}, "backends": {},
                              "alternatives": {}, "notes": [], "errors": {}}
    labels = [label for label, _ in bench.plan(cfg, result)]
    assert "floor: writes on 256 KiB (plain, uffd-async, mprotect)" in labels or not ASYNC
    if result["backends"]["mprotect"]["available"]:
        assert "mprotect: write" in labels
        assert any(n.startswith("mprotect is measured on 256 KiB regions, not 1 MiB")
                   for n in result["notes"])
    with pytest.raises(ValueError, match="unknown backend"):
        bench.plan(bench.Config.smoke(backends=("nope",)), result)


def test_cli_refuses_an_output_it_cannot_write_before_measuring(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    def never(*a: Any, **kw: Any) -> None:
        raise AssertionError("the benchmark ran before the output path was checked")

    monkeypatch.setattr(bench, "run", never)
    missing = tmp_path / "no" / "out.json"
    assert main(["bench", "--smoke", "--json", str(missing)]) == 1
    assert f"cannot write {missing}: folder {tmp_path / 'no'} does not exist" \
        in capfd.readouterr().err
