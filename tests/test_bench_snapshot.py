"""The ``snapshot`` section of ``pagewatch bench`` (tiny sizes: the harness, not the machine)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pagewatch.backends.base import choose
from pagewatch.bench import snapshot as bench_snapshot
from pagewatch.cli import main
from pagewatch.kernel.constants import PAGE_SIZE


def test_patterns_write_the_fraction_asked_in_random_pages_or_contiguous_runs() -> None:
    rng = np.random.default_rng(1)
    npages = 4096
    rand = bench_snapshot._pages("random", 0.01, npages, rng)
    runs = bench_snapshot._pages("runs", 0.1, npages, rng)
    assert len(rand) == 41 and len(np.unique(rand)) == 41
    assert len(runs) == 410
    assert len(bench_snapshot._runs(runs)) <= 2
    assert len(bench_snapshot._pages("runs", 1.0, npages, rng)) == npages


def test_cli_snapshot_section_measures_every_method_beside_copyto_floor_and_fork(
        tmp_path: Any, capsys: Any) -> None:
    out = tmp_path / "snap.json"
    best = choose("auto")[0].name
    assert main(["bench", "--snapshot", "--smoke", "--backends", best, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "copyto" in text and "floor" in text and f"dontneed[{best}]" in text
    data = json.loads(out.read_text())
    assert list(data["backends"].values()) == [[best]]
    row = next(iter(data["sizes"].values()))["random/0.01"]
    assert row["pages"] == max(1, round(0.01 * (4 << 20) // PAGE_SIZE))
    for what in ("copyto", "floor", f"copy[{best}]", f"dontneed[{best}]"):
        assert row[what]["restore"]["median"] > 0
    assert row["fork"]["cycle"]["median"] > 0
    ratio = data["ratios"][f"{4 << 20}/random/0.01/copy[{best}]"]
    assert ratio["restore_vs_floor"] > 0 and ratio["copyto_vs_restore"] > 0
