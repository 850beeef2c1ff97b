"""Shared fixtures: anonymous mappings with known addresses, and backend parametrisation."""

from __future__ import annotations

import mmap
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest

import pagewatch as pw
from pagewatch import _native
from pagewatch.backends.base import BACKENDS, backend_class
from pagewatch.cli import end_unfinalized
from pagewatch.kernel.constants import PAGE_SIZE

# Started as a shell's background job, this process ignores SIGINT and so would every
# pagewatch it starts: the tests of Ctrl-C would test nothing.  A handler (unlike SIG_IGN)
# is reset to the default by exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Mem:
    """An anonymous private mapping with its address."""

    def __init__(self, npages: int, flags: int = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                 prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> None:
        self.npages = npages
        self.size = npages * PAGE_SIZE
        self.map = mmap.mmap(-1, self.size, flags=flags, prot=prot)
        self.addr: int = _native.buffer_info(self.map)[0]

    def page(self, i: int) -> int:
        return self.addr + i * PAGE_SIZE

    def write(self, i: int, value: int = 1) -> None:
        self.map[i * PAGE_SIZE] = value

    def close(self) -> None:
        self.map.close()


@pytest.fixture
def mem() -> Iterator[type[Mem]]:
    made: list[Mem] = []

    def make(npages: int, **kw: int) -> Mem:
        m = Mem(npages, **kw)
        made.append(m)
        return m

    yield make  # type: ignore[misc]
    for m in made:
        try:
            m.close()
        except (BufferError, ValueError):
            pass


def backend_param(name: str) -> Any:
    """One in-process backend as a test parameter: marked with its name (the kernel matrix
    reads the mark) and skipped, with the reason, where it does not work here."""
    try:
        ok, why = backend_class(name).available()
    except ImportError as exc:
        ok, why = False, f"not built: {exc}"
    return pytest.param(name, id=name, marks=[
        pytest.mark.backend(name),
        pytest.mark.skipif(not ok, reason=f"{name} unavailable here: {why}")])


def backend_params(names: Iterable[str] = BACKENDS) -> list[Any]:
    """:func:`backend_param` of each of ``names`` (every registered backend by default)."""
    return [backend_param(name) for name in names]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    """Every in-process backend in turn (a module's own ``backend`` fixture or
    ``parametrize("backend", ...)`` takes precedence)."""
    return str(request.param)


@pytest.fixture
def track() -> Iterator[Callable[..., pw.Tracker]]:
    """``track(target, backend, **kw)``: a Tracker, closed at the end of the test."""
    made: list[pw.Tracker] = []

    def make(target: object, backend: str, **kw: str) -> pw.Tracker:
        t = pw.Tracker(target, backend=backend, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def aligned_array(npages: int) -> np.ndarray:
    """A zeroed uint8 numpy array on an anonymous private mapping of its own (page-aligned,
    never touched), so page i of a tracker is page i of the array."""
    return np.frombuffer(mmap.mmap(-1, npages * PAGE_SIZE,
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


def page_list(d: pw.DirtyPages) -> list[int]:
    """The written page indices of ``d`` as Python ints."""
    return [int(p) for p in d.pages()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # In a guest of the kernel matrix (tests/vm), a kernel-independent test would only repeat
    # the host's run 5-10x slower: the host's column already holds its result.
    label = os.environ.get("PAGEWATCH_KERNEL_MATRIX")
    if not label or label == "host":
        return
    keep = [i for i in items if i.get_closest_marker("kernel_independent") is None
            and _runs_in_guest(i, label)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _runs_in_guest(item: pytest.Item, label: str) -> bool:
    # A stress test (many kills, many processes) adds a kernel's coverage once: in the guest
    # its marker names (the oldest kernel with its backend); the host runs it in full.
    # With backends=..., only those backends' runs of a test parametrized by backend.
    mark = item.get_closest_marker("one_guest")
    if mark is None:
        return True
    only = mark.kwargs.get("backends")
    params = getattr(getattr(item, "callspec", None), "params", {})
    if only is not None and params.get("backend") not in only:
        return True
    return label in mark.args


# ---- the end of the run ----------------------------------------------------------------------
# Icechunk's runtime threads may touch Python objects while the interpreter finalizes, and one
# that does ends the process with SIGABRT (seen once in the CLI, after its output: see
# test_the_command_ends_without_finalizing_the_interpreter_once_icechunk_ran).  pytest would then
# exit -6 after a green run: once icechunk ran here, end with pytest's own status, unfinalized,
# after every other plugin has unconfigured (the report is written by then).
_exit_status: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "icechunk" not in sys.modules or not _exit_status or hasattr(config, "workerinput"):
        return
    end_unfinalized(_exit_status[-1])
