"""The one lifecycle of pagewatch's closeable objects (``_lifecycle.Closeable``): ``with``
gives the object and closes it, ``close()`` twice is harmless, and an object dropped
unclosed is closed by garbage collection (its descriptors and lock released)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pagewatch as pw
from pagewatch.kernel.pagemap import Pagemap
from pagewatch.kernel.probe import probe_wp_async
from pagewatch.kernel.uffd import Userfaultfd
from tests.conftest import aligned_array


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _userfaultfd(tmp: Path) -> Any:
    try:
        return Userfaultfd()
    except pw.PagewatchError as exc:
        pytest.skip(f"no userfaultfd with WP_ASYNC here: {exc}")


def _pagemap(tmp: Path) -> Any:
    return Pagemap()


def _snapshot(tmp: Path) -> Any:
    return pw.Snapshot(aligned_array(4), backend="compare")


def _checkpoint(tmp: Path) -> Any:
    return pw.Checkpoint(tmp / "c.pwck", aligned_array(4), backend="compare")


MAKERS: dict[str, Callable[[Path], Any]] = {
    "Userfaultfd": _userfaultfd, "Pagemap": _pagemap, "Snapshot": _snapshot,
    "Checkpoint": _checkpoint}


@pytest.mark.kernel_independent
@pytest.mark.parametrize("name", list(MAKERS))
def test_with_closes_close_twice_is_harmless_and_a_dropped_one_is_closed(
        name: str, tmp_path: Path) -> None:
    make = MAKERS[name]
    before = open_fds()
    obj = make(tmp_path)
    with obj as got:
        assert got is obj and not obj.closed
    assert obj.closed
    obj.close()
    assert obj.closed
    del obj, got
    gc.collect()
    assert open_fds() <= before
    obj = make(tmp_path)  # never closed: the finaliser does it
    assert open_fds() - before or name == "Snapshot"  # it holds a descriptor (or memory)
    del obj
    gc.collect()
    assert open_fds() <= before
    if name == "Checkpoint":  # its lock was released: another writer may open it
        pw.Checkpoint(tmp_path / "c.pwck", aligned_array(4), backend="compare").close()


@pytest.mark.kernel_independent
@pytest.mark.skipif(not probe_wp_async()[0] or os.uname().machine != "x86_64",
                    reason="tracking another process needs uffd-async on x86-64 here")
def test_a_dropped_process_tracker_is_closed_and_leaves_no_descriptor() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
    try:
        before = open_fds()
        with pw.ProcessTracker(p.pid) as t:
            assert not t.closed
        assert t.closed and open_fds() <= before
        t = pw.ProcessTracker(p.pid)
        assert open_fds() - before
        del t
        gc.collect()
        assert open_fds() <= before
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=300)

