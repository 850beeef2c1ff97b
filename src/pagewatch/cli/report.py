"""``pagewatch report FILE.jsonl``: what a recording says, in text or JSON (top mappings,
the write rate over time, the write working set), as memray's ``stats``/``summary`` do."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    r = sub.add_parser(
        "report", help="summary of a recording: top mappings, rate over time, working set",
        description="Summarise a recording written by pagewatch run or record: the mappings "
        "written most, the write rate of each interval and the write working set (distinct "
        "pages written over the whole recording).",
        epilog="example: pagewatch report pagewatch-python3.1234.jsonl --json")
    r.add_argument("file", metavar="FILE.jsonl",
                   help="a recording written by pagewatch run or record")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--top", type=_positive, default=10, metavar="N",
                   help="mappings listed (default 10)")
    r.set_defaults(func=cmd_report)


def _positive(text: str) -> int:
    from . import positive_int

    return positive_int(text)


def summarise(lines: list[dict[str, Any]], head: dict[str, Any], top: int) -> dict[str, Any]:
    """The report of the interval lines of one recording (``head``: its first attach line)."""
    import numpy as np

    from ..kernel.constants import PAGE_SIZE

    mappings: dict[Any, dict[str, Any]] = {}
    every: list[np.ndarray] = []
    rate = []
    for obj in lines:
        dt = obj.get("dt") or 0.0
        rate.append({"t": obj.get("t"), "dt": dt, "pages": obj["pages"],
                     "mib_per_s": round(obj["pages"] * PAGE_SIZE / (1 << 20) / dt, 3)
                     if dt else None})
        for m in obj["mappings"]:
            r = np.asarray(m["runs"], np.int64).reshape(-1, 2)
            first = m["start"] // PAGE_SIZE + r[:, 0]
            count = r[:, 1]
            within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            pages = np.repeat(first, count) + within
            every.append(pages)
            key = (m["path"], m["start"]) if m["path"] not in ("[heap]", "[stack]") \
                else (m["path"], 0)
            entry = mappings.setdefault(key, {"path": m["path"], "start": m["start"],
                                              "end": m["end"], "perms": m.get("perms", ""),
                                              "pages": 0, "parts": []})
            entry["pages"] += int(count.sum())
            entry["parts"].append(pages)
    distinct = len(np.unique(np.concatenate(every))) if every else 0
    rows = []
    for e in mappings.values():
        d = len(np.unique(np.concatenate(e.pop("parts"))))
        rows.append({**e, "distinct": d, "mib": round(d * PAGE_SIZE / (1 << 20), 3)})
    rows.sort(key=lambda r: (-r["pages"], r["start"]))
    total = sum(o["pages"] for o in lines)
    span = sum(o.get("dt") or 0.0 for o in lines)
    return {"pid": head.get("pid", lines[0].get("pid")), "command": head.get("command"),
            "backend": head.get("backend"), "intervals": len(lines),
            "seconds": round(span, 6), "page_writes": total,
            "write_working_set": {"pages": distinct,
                                  "mib": round(distinct * PAGE_SIZE / (1 << 20), 3)},
            "mappings_written": len(rows), "top_mappings": rows[:top], "rate": rate}


def render(rep: dict[str, Any], path: str) -> str:
    from .process import short_name

    who = " ".join(rep["command"]) if rep["command"] else f"pid {rep['pid']}"
    ws = rep["write_working_set"]
    out = [f"{path}: {who} (pid {rep['pid']}), {rep['intervals']} intervals over "
           f"{rep['seconds']:.2f} s, tracked with {rep['backend'] or '?'}",
           f"write working set: {ws['pages']} distinct pages ({ws['mib']:.1f} MiB) in "
           f"{rep['mappings_written']} mappings; {rep['page_writes']} page writes",
           "", f"top mappings:{'pages':>12} {'distinct':>9} {'MiB':>8}  mapping"]
    for m in rep["top_mappings"]:
        out.append(f"{'':<13}{m['pages']:>12} {m['distinct']:>9} {m['mib']:>8.1f}  "
                   f"{short_name(m['path'])} {m['start']:#x}-{m['end']:#x} {m['perms']}")
    out += ["", f"rate over time:{'t (s)':>10} {'pages':>9} {'MiB/s':>9}"]
    peak = max((r["pages"] for r in rep["rate"]), default=0) or 1
    for r in rep["rate"]:
        bar = "#" * round(30 * r["pages"] / peak)
        mib = f"{r['mib_per_s']:>9.2f}" if r["mib_per_s"] is not None else f"{'-':>9}"
        t = f"{r['t']:>10.2f}" if r["t"] is not None else f"{'-':>10}"
        out.append(f"{'':<15}{t} {r['pages']:>9} {mib}  {bar}")
    return "\n".join(out)


def processes(objs: list[dict[str, Any]], main: int | None) -> list[dict[str, Any]]:
    """Per process of a followed recording (``run --follow-forks``), in the order they
    appeared: pid, ppid, command, page writes, write working set, exit code, and why it was
    not tracked (or whose memory it shared)."""
    import numpy as np

    from ..kernel.constants import PAGE_SIZE

    procs: dict[int, dict[str, Any]] = {}
    sets: dict[int, list[np.ndarray]] = {}

    def entry(pid: int) -> dict[str, Any]:
        if pid not in procs:
            procs[pid] = {"pid": pid, "ppid": None, "command": None, "page_writes": 0,
                          "write_working_set": {"pages": 0, "mib": 0.0}, "exit_code": None,
                          "untracked": None, "shares_memory_of": None}
            sets[pid] = []
        return procs[pid]

    for o in objs:
        kind, pid = o.get("type", "interval"), o.get("pid", main)
        if pid is None:
            continue
        e = entry(pid)
        if kind in ("attach", "fork", "untracked") and o.get("command"):
            e["command"] = o["command"]
        if o.get("ppid") is not None:
            e["ppid"] = o["ppid"]
        if kind == "fork" and o.get("shares_memory_of") is not None:
            e["shares_memory_of"] = o["shares_memory_of"]
        elif kind == "untracked":
            e["untracked"] = o.get("reason") or "not tracked"
        elif kind == "attach":
            e["untracked"] = None
        elif kind == "exit":
            e["exit_code"] = o.get("code")
        elif kind == "interval" and "mappings" in o:
            e["page_writes"] += o.get("pages", 0)
            for m in o["mappings"]:
                r = np.asarray(m["runs"], np.int64).reshape(-1, 2)
                first, count = m["start"] // PAGE_SIZE + r[:, 0], r[:, 1]
                within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count,
                                                                 count)
                sets[pid].append(np.repeat(first, count) + within)
    for pid, e in procs.items():
        n = len(np.unique(np.concatenate(sets[pid]))) if sets[pid] else 0
        e["write_working_set"] = {"pages": n, "mib": round(n * PAGE_SIZE / (1 << 20), 3)}
    return list(procs.values())


def render_processes(procs: list[dict[str, Any]]) -> list[str]:
    out = ["", f"{'processes: ' + str(len(procs)):<13}{'page writes':>14} {'distinct':>9} {'MiB':>8}  "
           f"{'pid':<8} {'exit':<5} command"]
    for p in procs:
        cmd = " ".join(p["command"]) if p["command"] else "?"
        cmd = cmd if len(cmd) <= 60 else cmd[:57] + "..."
        code = "-" if p["exit_code"] is None else str(p["exit_code"])
        ws = p["write_working_set"]
        out.append(f"{'':<13}{p['page_writes']:>14} {ws['pages']:>9} {ws['mib']:>8.1f}  "
                   f"{p['pid']:<8} {code:<5} {cmd}")
    for p in procs:
        if p["untracked"]:
            out.append(f"not tracked: pid {p['pid']}: {p['untracked']}")
        elif p["shares_memory_of"] is not None and p["page_writes"] == 0:
            out.append(f"pid {p['pid']} shared the memory of pid {p['shares_memory_of']} "
                       "(vfork): its writes are counted there")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from .process import _load, _objects, main_pid

    objs = _objects(args.file)
    main = main_pid(objs)
    followed = any(o.get("type") == "fork" for o in objs) or len(
        {o.get("pid") for o in objs if o.get("type", "interval") == "interval"}) > 1
    procs = processes(objs, main) if followed else None
    # The command's own process, as a recording of one process reads.
    lines = _load(args.file, main if followed else None, objs)
    head = next((o for o in objs if o.get("type") == "attach"), {})
    rep = summarise(lines, head, args.top)
    if procs is not None:
        rep["processes"] = procs
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        text = render(rep, args.file)
        if procs is not None:
            text += "\n" + "\n".join(render_processes(procs))
        print(text)
    sys.stdout.flush()
    return 0
