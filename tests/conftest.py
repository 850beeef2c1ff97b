"""Shared fixtures: anonymous mappings with known addresses, and backend parametrisation."""

from __future__ import annotations

import mmap
import os
import signal
from collections.abc import Iterator

import pytest

from pagewatch import _native
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
