"""``/proc/PID/maps`` as dataclasses."""

from __future__ import annotations

import dataclasses

from ._errors import proc_open_error

__all__ = ["MapsEntry", "Mapping", "maps", "parse_maps", "find_mapping"]


@dataclasses.dataclass(frozen=True)
class MapsEntry:
    """One line of ``/proc/PID/maps`` (also importable as ``Mapping``, its older name, which
    collections.abc and the benchmark also use for other things)."""

    start: int
    end: int
    perms: str  #: e.g. "rw-p"
    offset: int
    dev: str
    inode: int
    path: str  #: file path, "[heap]", "[stack]", ... or "" for anonymous memory

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"


#: the older name of :class:`MapsEntry`
Mapping = MapsEntry


def _parse(line: str) -> Mapping:
    parts = line.split(maxsplit=5)
    lo, hi = parts[0].split("-")
    return Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3],
                   int(parts[4]), parts[5].rstrip("\n") if len(parts) > 5 else "")


def parse_maps(text: bytes, previous: dict[bytes, Mapping] | None = None
               ) -> tuple[list[Mapping], dict[bytes, Mapping]]:
    """The mappings of a ``/proc/PID/maps`` text, and a cache of them by line.

    Give the cache of the previous call as ``previous``: a line seen then is not parsed
    again (the same :class:`Mapping` object is returned for it), so reading the maps of a
    process with tens of thousands of mappings again costs a dictionary look-up per line.
    """
    before = previous or {}
    parsed: dict[bytes, Mapping] = {}
    out = []
    for line in text.splitlines():
        m = before.get(line)
        if m is None:
            if not line.strip():
                continue
            m = _parse(line.decode(errors="replace"))
        parsed[line] = m
        out.append(m)
    return out, parsed


def maps(pid: int | str = "self") -> list[Mapping]:
    """Every mapping of the process, in address order."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return parse_maps(f.read())[0]
    except OSError as exc:
        raise proc_open_error(exc, pid, "maps") from exc


def find_mapping(address: int, pid: int | str = "self") -> Mapping | None:
    """The mapping that holds ``address``, or None."""
    for m in maps(pid):
        if m.start <= address < m.end:
            return m
    return None
