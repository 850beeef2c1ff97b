"""``pagewatch.kernel.maps``: /proc/PID/maps parsed into dataclasses."""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pagewatch import _native
from pagewatch.errors import TargetGone
from pagewatch.kernel import Mapping, find_mapping, maps

P = mmap.PAGESIZE


@pytest.fixture
def file_map(tmp_path: os.PathLike[str]) -> Iterator[Callable[..., tuple[mmap.mmap, str]]]:
    """Map a fresh file of 4 pages; gives (map, path)."""
    made: list[mmap.mmap] = []

    def make(name: str = "data", flags: int = mmap.MAP_SHARED,
             prot: int = mmap.PROT_READ | mmap.PROT_WRITE, offset: int = 0,
             ) -> tuple[mmap.mmap, str]:
        path = os.path.join(tmp_path, name)
        with open(path, "wb") as f:
            f.write(b"m" * 4 * P)
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 2 * P, flags=flags, prot=prot, offset=offset)
        made.append(m)
        return m, os.path.realpath(path)

    yield make
    for m in made:
        m.close()


def addr_of(m: mmap.mmap) -> int:
    return _native.buffer_info(m)[0]


def test_a_file_mapping_appears_with_its_bounds_perms_offset_inode_and_path(
        file_map: Callable[..., tuple[mmap.mmap, str]]) -> None:
    m, path = file_map(offset=P)
    addr = addr_of(m)
    found = find_mapping(addr)
    st = os.stat(path)
    assert found is not None
    # The device is the one the page cache belongs to: under overlayfs (the kernel matrix's
    # VMs) not the one stat() reports, so only its form is checked.
    assert re.fullmatch(r"[0-9a-f]{2,}:[0-9a-f]{2,}", found.dev)
    assert found == Mapping(start=addr, end=addr + 2 * P, perms="rw-s", offset=P,
                            dev=found.dev, inode=st.st_ino, path=path)
    assert found.size == 2 * P
    assert (found.readable, found.writable, found.executable) == (True, True, False)
    assert found.shared and not found.private


def test_a_private_read_only_file_mapping_shows_r_p(
        file_map: Callable[..., tuple[mmap.mmap, str]]) -> None:
    m, path = file_map(flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    found = find_mapping(addr_of(m))
    assert found is not None and found.perms == "r--p" and found.path == path
    assert found.private and not found.writable


def test_a_path_with_spaces_is_kept_whole(file_map: Callable[..., tuple[mmap.mmap, str]]) -> None:
    m, path = file_map(name="a  file with   spaces ")
    found = find_mapping(addr_of(m))
    assert found is not None and found.path == path


def test_a_deleted_file_is_marked_deleted(file_map: Callable[..., tuple[mmap.mmap, str]]) -> None:
    m, path = file_map(name="gone")
    os.unlink(path)
    found = find_mapping(addr_of(m))
    assert found is not None and found.path == path + " (deleted)"


def test_an_anonymous_mapping_appears_with_its_perms_and_no_path(
        mem: Callable[..., Any]) -> None:
    m = mem(3, prot=mmap.PROT_READ)
    found = find_mapping(m.addr)
    assert found is not None
    # It may have merged with a neighbour of the same kind: it covers ours, at least.
    assert found.start <= m.addr and found.end >= m.addr + m.size
    assert (found.perms, found.path, found.inode, found.dev) == ("r--p", "", 0, "00:00")


def test_a_shared_anonymous_mapping_is_shared(mem: Callable[..., Any]) -> None:
    m = mem(2, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    found = find_mapping(m.addr)
    assert found is not None and found.perms == "rw-s" and found.shared
    assert found.path.startswith("/dev/zero") or found.path.startswith("/SYSV")


def test_maps_agrees_with_the_raw_file_line_by_line() -> None:
    got = maps()
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    # The list may differ by a mapping made in between (Python allocates); compare the
    # mappings both saw.
    raw = {int(line.split("-", 1)[0], 16): line for line in lines}
    common = [m for m in got if m.start in raw]
    assert len(common) >= len(got) - 2 and len(common) >= 5
    for m in common:
        fields = raw[m.start].split(maxsplit=5)
        assert fields[0] == f"{m.start:x}-{m.end:x}" or fields[0] == f"{m.start:08x}-{m.end:08x}"
        assert (fields[1], int(fields[2], 16), fields[3], int(fields[4])) == (
            m.perms, m.offset, m.dev, m.inode)
        assert (fields[5] if len(fields) > 5 else "") == m.path


def test_maps_are_in_address_order_and_do_not_overlap() -> None:
    got = maps()
    assert all(a.end <= b.start for a, b in zip(got, got[1:], strict=False))
    assert all(m.start < m.end for m in got)
    assert any(m.path == "[stack]" for m in got)


def test_find_mapping_of_an_unmapped_address_is_none(mem: Callable[..., Any]) -> None:
    m = mem(1)
    addr = m.addr
    m.close()
    assert find_mapping(addr) is None


def test_maps_of_another_process() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        theirs = maps(pid)
        assert any(m.path == "[stack]" for m in theirs)
        ours = {(m.start, m.path) for m in maps()}
        # A forked child maps what its parent had at fork: its executable among them.
        exe = os.path.realpath(f"/proc/{pid}/exe")
        assert any(m.path == exe for m in theirs) and any(p == exe for _, p in ours)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def test_maps_of_a_dead_pid_raises_target_gone() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(TargetGone, match=f"{pid}"):
        maps(pid)
    with pytest.raises(TargetGone):
        find_mapping(0x1000, pid)


def test_parse_maps_parses_only_the_lines_it_has_not_seen() -> None:
    from pagewatch.kernel.maps import parse_maps

    text = (b"00400000-00401000 r-xp 00000000 fe:00 12 /bin/x\n"
            b"00600000-00602000 rw-p 00000000 00:00 0 \n")
    first, cache = parse_maps(text)
    assert [(m.start, m.end, m.perms, m.path) for m in first] == [
        (0x400000, 0x401000, "r-xp", "/bin/x"), (0x600000, 0x602000, "rw-p", "")]
    grown = text.replace(b"00602000", b"00603000")
    again, _ = parse_maps(grown, cache)
    assert again[0] is first[0]  # the unchanged line: the same object, not parsed again
    assert again[1] is not first[1] and again[1].end == 0x603000
