"""Tables of a ``pagewatch bench`` result: as data (:func:`tables`), as plain text, or with
``rich`` (imported only when printing)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .measures import (
    FRACTIONS,
    PATTERNS,
    PRECISION_CASES,
    GiB,
    MiB,
    fraction_key,
    size_key,
)

__all__ = ["Table", "tables", "render_text", "render_markdown", "print_rich", "to_json", "fmt",
           "figure"]

#: what each raw mechanism of the floor is called in the tables
_RAW_LABELS = {
    "uffd-async": "kernel: uffd-async fault (C)",
    "mprotect": "raw C: mprotect + SIGSEGV",
    "uffd-sync": "raw C: uffd-wp + handler thread",
    "soft-dirty": "raw C: clear_refs + soft-dirty",
}


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


def fmt(x: float | None) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    digits = 2 - int(math.floor(math.log10(a)))
    return f"{x:.{min(digits, 6)}f}"


def figure(s: Any, spread: bool = True) -> str:
    """``median [min-max]`` of a stat, ``-`` when missing, ``error`` when it failed."""
    if not isinstance(s, dict):
        return "-"
    if "error" in s:
        return "error"
    if "median" not in s:
        return "-"
    if not spread:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def _size(nbytes: int | None) -> str:
    if not nbytes:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _m(s: Any) -> float | None:
    return float(s["median"]) if isinstance(s, dict) and "median" in s else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _triple(vals: list[float | None]) -> str:
    return " / ".join(fmt(v) for v in vals)


def _ok_backends(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, e) for n, e in result.get("backends", {}).items()
            if isinstance(e, dict) and e.get("available")]


def _write_table(result: dict[str, Any]) -> Table:
    floor = result.get("floor", {}).get("write", {})
    main = result.get("config", {}).get("write_bytes")
    rows: list[list[str]] = []
    ratios = result.get("ratios", {})

    def floor_at(nbytes: int) -> dict[str, Any]:
        f = floor.get(size_key(nbytes), {})
        return f if isinstance(f, dict) else {}

    def ratio_cells(vals: dict[str, Any], nbytes: int, ua: bool) -> list[str]:
        fl = floor_at(nbytes)
        plain = [_ratio(_m(vals.get(p)), _m(fl.get("plain", {}).get(p))) for p in PATTERNS]
        kern = [_ratio(_m(vals.get(p)), _m(fl.get("uffd-async", {}).get("write", {}).get(p)))
                for p in PATTERNS]
        return [_triple(plain), _triple(kern), ""]

    sizes = sorted((int(k) for k in floor), key=lambda s: (s != main, -s))
    for nbytes in sizes:
        fl = floor_at(nbytes)
        if "error" in fl:
            rows.append([f"floor on {_size(nbytes)}", _size(nbytes), "error", "", "", "", "", ""])
            continue
        if nbytes == main and "plain" in fl:
            rows.append(["plain write (no tracking)", _size(nbytes),
                         *[figure(fl["plain"].get(p)) for p in PATTERNS], "1", "", ""])
            fresh = result.get("floor", {}).get("fresh_touch", {})
            if isinstance(fresh, dict) and "sequential" in fresh:
                rows.append(["first touch (page allocation)", _size(fresh.get("bytes")),
                             figure(fresh["sequential"]), "", "", "", "", ""])
        for mech, label in _RAW_LABELS.items():
            if mech not in fl:
                continue
            if mech == "uffd-async" and nbytes != main:
                continue  # the reference at other sizes: used for ratios, not shown
            vals = fl[mech].get("write", {})
            rows.append([label, _size(nbytes), *[figure(vals.get(p)) for p in PATTERNS],
                         *ratio_cells(vals, nbytes, False)])
    for name, e in _ok_backends(result):
        w = e.get("write")
        if not isinstance(w, dict) or "patterns" not in w:
            rows.append([f"pagewatch {name}", "", "error" if isinstance(w, dict) else "-",
                         "", "", "", "", ""])
            continue
        r = ratios.get(name, {})
        rows.append([f"pagewatch {name}", _size(w["bytes"]),
                     *[figure(w["patterns"].get(p)) for p in PATTERNS],
                     _triple([r.get(p, {}).get("x_plain") for p in PATTERNS]),
                     _triple([r.get(p, {}).get("x_kernel_fault") for p in PATTERNS]),
                     _triple([r.get(p, {}).get("x_uffd_async") for p in PATTERNS])])
    return Table(
        "Tracked first write, ns per page: median [min-max]",
        ["", "region", *PATTERNS, "x plain write", "x kernel's fault", "x uffd-async"], rows,
        "ratios are sequential / strided / random, against a plain write and the kernel's "
        "own uffd-async fault on a region of the same size, and against pagewatch uffd-async")


def _reset_table(result: dict[str, Any]) -> Table:
    sizes: set[int] = set(result.get("config", {}).get("reset_sizes", []))
    rows: list[list[str]] = []
    fr = result.get("floor", {}).get("reset", {})
    series: list[tuple[str, dict[str, Any]]] = []
    if isinstance(fr, dict) and "sizes" in fr:
        series.append(("kernel: PAGEMAP_SCAN get+reset (C)", fr["sizes"]))
    for name, e in _ok_backends(result):
        r = e.get("reset")
        series.append((f"pagewatch {name}", r.get("sizes", {}) if isinstance(r, dict) else {}))
    for key, a in result.get("alternatives", {}).items():
        if isinstance(a, dict) and "reset" in a:
            series.append((a.get("name", key), {size_key(a["bytes"]): {"written": a["reset"]}}))
            sizes.add(int(a["bytes"]))
    for _, per in series:
        sizes.update(int(k) for k in per)
    cols = sorted(sizes)
    for label, per in series:
        rows.append([label, *[figure(per.get(size_key(s), {}).get("written")) for s in cols]])
    return Table("Reset, ms per GiB, every page written: median [min-max]",
                 ["", *[_size(s) for s in cols]], rows,
                 "'-': not measured at that size (slow backends use smaller regions)")


def _collect_table(result: dict[str, Any]) -> Table:
    fractions = result.get("config", {}).get("fractions", list(FRACTIONS))
    rows: list[list[str]] = []
    series: list[tuple[str, Any]] = []
    fc = result.get("floor", {}).get("collect")
    if fc is not None:
        series.append(("kernel: minimal PAGEMAP_SCAN call (C)", fc))
    for name, e in _ok_backends(result):
        series.append((f"pagewatch {name}", e.get("collect")))
    for key, a in result.get("alternatives", {}).items():
        series.append((a.get("name", key) if isinstance(a, dict) else key, a))
    for label, c in series:
        if not isinstance(c, dict) or "fractions" not in c:
            rows.append([label, "", "error" if isinstance(c, dict) else "-",
                         *[""] * len(fractions)])
            continue
        for mode, name in (("reset", "get+reset"), ("noreset", "get")):
            rows.append([label, _size(c["bytes"]), name,
                         *[figure(c["fractions"].get(fraction_key(f), {}).get(mode))
                           for f in fractions]])
    return Table("Collect, ms, by fraction of the region written: median [min-max]",
                 ["", "region", "", *[f"{f * 100:g}%" for f in fractions]], rows)


def _precision_cell(c: Any) -> str:
    if not isinstance(c, dict) or "written" not in c:
        return "error" if isinstance(c, dict) else "-"
    s = f"{c['reported']}/{c['written']}"
    if c["false_positives"] or c["false_negatives"]:
        s += f" (+{c['false_positives']} -{c['false_negatives']})"
    if "merged" in c:
        s += " merged" if c["merged"] else " unmerged"
    if "huge_pages_before" in c:
        s += (f" THP {c['huge_pages_before']}>{c.get('huge_pages_tracked', '?')}"
              f">{c['huge_pages_after']}")
    return s


def _precision_table(result: dict[str, Any]) -> Table:
    cases = list(PRECISION_CASES)
    for _, e in _ok_backends(result):
        p = e.get("precision")
        if isinstance(p, dict):
            cases += [k for k in p if k not in cases and k != "error"]
    rows = []
    for name, e in _ok_backends(result):
        p = e.get("precision")
        p = p if isinstance(p, dict) else {}
        rows.append([name, *[_precision_cell(p.get(c)) if "error" not in p else "error"
                             for c in cases]])
    return Table("Precision: pages reported / written (+false positives -false negatives)",
                 ["", *cases], rows,
                 "THP a>b>c: pages in huge pages before tracking > tracked > after the writes; "
                 "neighbour-mapped: "
                 "nothing written, a new mapping placed right after the tracked one")


def _verdict(ratio: float, target: float) -> str:
    return f"<= {target} ({'within target' if ratio <= target else 'ABOVE target'})"


def _versus_rows(label: str, o: dict[str, Any], mine: str, floor: str) -> list[list[str]]:
    rows = []
    target = o.get("target", 1.1)
    for clock, sfx in (("wall", ""), ("CPU", "_cpu")):
        if f"ratio{sfx}" not in o:
            continue
        rows.append([f"{label} ({clock})", figure(o[f"{mine}{sfx}"]), figure(o[f"{floor}{sfx}"]),
                     fmt(o[f"ratio{sfx}"]), figure(o[f"pair_ratio{sfx}"]),
                     _verdict(o[f"ratio{sfx}"], target)])
    return rows


def _overhead_table(result: dict[str, Any]) -> Table | None:
    o = result.get("python_overhead")
    if not isinstance(o, dict):
        return None
    if "error" in o:
        return Table("Python overhead", ["", ""], [["error", o["error"]]])
    rows = []
    cases = [(f"{o['pages']} pages in {_size(o['bytes'])}, ms", o, 1.0)]
    cases += [(f"{label}, us", case, 1e3) for label, case in (o.get("small") or {}).items()
              if isinstance(case, dict) and "ratio" in case]
    for label, case, scale in cases:
        for sub, floor, how in ((case, "raw_c", "timed inside C"),
                                (case.get("vs_call"), "raw_c_call", "call timed from Python")):
            if not isinstance(sub, dict) or "ratio" not in sub:
                continue
            keys = ("tracker_collect", floor, "tracker_collect_cpu", f"{floor}_cpu")
            scaled = {k: {**sub[k], **{f: sub[k][f] * scale for f in ("median", "min", "max")}}
                      for k in keys}
            rows += _versus_rows(f"{label}, floor {how}", {**sub, **scaled}, "tracker_collect",
                                 floor)
    return Table(
        "Python overhead: Tracker.collect() / the minimal C collect (one PAGEMAP_SCAN ioctl, "
        "vector preallocated), interleaved",
        ["", "Tracker.collect()", "minimal C", "ratio of medians", "ratio per pair", "target"],
        rows,
        "'timed inside C': the ioctl loop alone, clocked inside the C function (the floor the "
        "target is about); 'call timed from Python': the same C function clocked around its call "
        "from Python, as Tracker.collect() is.  CPU time leaves out the time other processes "
        "took the CPU: the steadier figure on a busy machine")


def _overlap_table(result: dict[str, Any]) -> Table | None:
    o = result.get("overlap")
    if not isinstance(o, dict):
        return None
    if "error" in o:
        return Table("Overlapping trackers", ["", ""], [["error", o["error"]]])
    rows = _versus_rows(f"{o['trackers']} trackers of {_size(o['bytes'])}, "
                        f"{o['pages']} pages written, ms", o, "overlapping_collect",
                        "lone_collect")
    return Table("Overlapping trackers: one collect among many / a lone tracker's, interleaved",
                 ["", "one of many", "lone tracker", "ratio of medians", "ratio per pair",
                  "target"], rows)


def _setup_table(result: dict[str, Any]) -> Table | None:
    o = result.get("setup")
    if not isinstance(o, dict):
        return None
    if "error" in o:
        return Table("Tracker setup", ["", ""], [["error", o["error"]]])
    return Table(
        f"Tracker setup + close of a fresh {_size(o['bytes'])} mapping, ms per 16 GiB",
        ["", "Tracker() + close()", "kernel: register + protect + unregister", "ratio"],
        [["uffd-async", figure(o["tracker_per_16GiB"]), figure(o["raw_c_per_16GiB"]),
          fmt(o["ratio"])]])


def tables(result: dict[str, Any]) -> list[Table]:
    """Every table of the report, as strings."""
    out = [_write_table(result), _reset_table(result), _collect_table(result),
           _precision_table(result)]
    for extra in (_overhead_table(result), _overlap_table(result), _setup_table(result)):
        if extra is not None:
            out.append(extra)
    ck = result.get("checkpoint")
    if isinstance(ck, dict) and "save" in ck:
        from .checkpoint import table_rows

        out.append(Table(*table_rows(ck)))
    ice = result.get("checkpoint_icechunk")
    if isinstance(ice, dict) and "random" in ice:
        from .checkpoint_icechunk import table_rows as icechunk_rows

        out.append(Table(*icechunk_rows(ice)))
    return out


def _load(v: Any) -> str:
    return f"{v[0]:.1f}" if isinstance(v, list) and v else "?"


def _footer(result: dict[str, Any]) -> list[str]:
    lines = []
    m = result.get("machine", {})
    lines.append(f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs ({m.get('virtualisation', '')}),"
                 f" Linux {m.get('kernel', '?')}, {result.get('mode')} mode, "
                 f"{result.get('duration_s', 0):.0f} s, load average "
                 f"{_load(m.get('load_average'))} before, {_load(m.get('load_average_after'))}"
                 " after")
    for name, e in result.get("backends", {}).items():
        if isinstance(e, dict) and not e.get("available"):
            lines.append(f"not measured: {name}: {e.get('reason', '')}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines += [f"error: {k}: {v}" for k, v in result.get("errors", {}).items()]
    return lines


def render_text(result: dict[str, Any]) -> str:
    """The report as plain text (no ``rich`` needed)."""
    out: list[str] = []
    for t in tables(result):
        widths = [max(len(str(x)) for x in col) for col in zip(t.columns, *t.rows, strict=True)]
        out.append(t.title)
        out.append("  ".join(c.ljust(w) for c, w in zip(t.columns, widths, strict=True)))
        for row in t.rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if t.caption:
            out.append(t.caption)
        out.append("")
    out += _footer(result)
    return "\n".join(out)


def render_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown tables (for a README)."""
    out: list[str] = []
    for t in tables(result):
        out.append(f"**{t.title}**")
        out.append("")
        out.append("| " + " | ".join(t.columns) + " |")
        out.append("|" + "|".join("---" for _ in t.columns) + "|")
        for row in t.rows:
            out.append("| " + " | ".join(row) + " |")
        if t.caption:
            out += ["", f"_{t.caption}_"]
        out.append("")
    out += [f"- {line}" for line in _footer(result)]
    return "\n".join(out)


def print_rich(result: dict[str, Any], console: Any = None) -> None:
    """Print the report with ``rich``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze to 80 columns
            console = Console(width=200)
    for t in tables(result):
        # Escaped: "[min-max]" would otherwise be read as rich markup and vanish.
        rt = RichTable(title=escape(t.title), caption=escape(t.caption) or None,
                       title_justify="left", caption_justify="left")
        for i, c in enumerate(t.columns):
            rt.add_column(escape(c), justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in t.rows:
            rt.add_row(*[escape(c) for c in row])
        console.print(rt)
    for line in _footer(result):
        console.print(escape(line), style="red" if line.startswith("error") else None,
                      highlight=False)


def to_json(result: dict[str, Any]) -> str:
    """The result as JSON text (every raw figure, the probe, the machine)."""
    return json.dumps(result, indent=1, allow_nan=False)
