"""What ``/proc`` says of a process, read as text: no numpy, no C extension (the CLI's
``--help`` and :mod:`.tree` load it)."""

from __future__ import annotations

__all__ = ["_read_text", "_status", "_thread_state"]


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _status(pid: int | str) -> dict[str, str]:
    text = _read_text(f"/proc/{pid}/status") or ""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _thread_state(pid: int, tid: int) -> str:
    text = _read_text(f"/proc/{pid}/task/{tid}/stat")
    if not text:
        return "X"
    return text.rpartition(")")[2].split()[0]
