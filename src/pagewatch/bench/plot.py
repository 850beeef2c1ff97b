"""``pagewatch bench --plot``: one panel per measure (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from typing import Any

from .measures import PATTERNS, fraction_key, size_key
from .report import _RAW_LABELS

__all__ = ["plot"]


def _m(s: Any) -> float | None:
    return float(s["median"]) if isinstance(s, dict) and "median" in s else None


def _err(s: Any) -> tuple[float, float]:
    m = _m(s)
    if m is None:
        return 0.0, 0.0
    return m - float(s["min"]), float(s["max"]) - m


def plot(result: dict[str, Any], path: str) -> None:
    """Draw the result to ``path`` (PNG): tracked write, reset, collect, precision,
    Python overhead.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'pagewatch[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'pagewatch[plot]'") from exc

    fig, axes = plt.subplots(3, 2, figsize=(15, 14))
    fig.suptitle(f"pagewatch bench ({result.get('mode')}): "
                 f"{result.get('machine', {}).get('cpu', '')}, "
                 f"Linux {result.get('machine', {}).get('kernel', '')}")
    _write_panel(axes[0][0], result)
    _reset_panel(axes[0][1], result)
    _collect_panel(axes[1][0], result, "reset")
    _collect_panel(axes[1][1], result, "noreset")
    _precision_panel(axes[2][0], result)
    _overhead_panel(axes[2][1], result)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_panel(ax: Any, result: dict[str, Any]) -> None:
    series: list[tuple[str, dict[str, Any]]] = []
    main = result.get("config", {}).get("write_bytes")
    for size, fl in result.get("floor", {}).get("write", {}).items():
        if not isinstance(fl, dict) or "error" in fl:
            continue
        if int(size) == main and "plain" in fl:
            series.append(("plain write", fl["plain"]))
        for mech, label in _RAW_LABELS.items():
            if mech in fl and (mech != "uffd-async" or int(size) == main):
                series.append((label, fl[mech].get("write", {})))
    for name, e in result.get("backends", {}).items():
        w = e.get("write") if isinstance(e, dict) else None
        if isinstance(w, dict) and "patterns" in w:
            series.append((f"pagewatch {name}", w["patterns"]))
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series):
        xs = [j + i * width for j in range(len(PATTERNS))]
        ys = [_m(vals.get(p)) or 0.0 for p in PATTERNS]
        errs = list(zip(*[_err(vals.get(p)) for p in PATTERNS], strict=True))
        ax.bar(xs, ys, width, yerr=errs, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PATTERNS))], PATTERNS)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 300)  # room for the legend above the bars
    ax.set_ylabel("ns per page (log)")
    ax.set_title("1. tracked first write (bars: median, lines: min-max)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")


def _reset_panel(ax: Any, result: dict[str, Any]) -> None:
    series: list[tuple[str, dict[str, Any]]] = []
    fr = result.get("floor", {}).get("reset")
    if isinstance(fr, dict) and "sizes" in fr:
        series.append(("kernel PAGEMAP_SCAN (C)", fr["sizes"]))
    for name, e in result.get("backends", {}).items():
        r = e.get("reset") if isinstance(e, dict) else None
        if isinstance(r, dict) and "sizes" in r:
            series.append((f"pagewatch {name}", r["sizes"]))
    for label, per in series:
        xs = sorted(int(s) for s in per if isinstance(per[s], dict) and "written" in per[s])
        ys = [_m(per[size_key(s)]["written"]) for s in xs]
        ax.plot([x / 2**20 for x in xs], ys, marker="o", label=label)
    for key, a in result.get("alternatives", {}).items():
        if isinstance(a, dict) and "reset" in a:
            ax.plot([a["bytes"] / 2**20], [_m(a["reset"])], marker="s", linestyle="",
                    label=a.get("name", key))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("region, MiB")
    ax.set_ylabel("ms per GiB (log)")
    ax.set_title("2. reset, every page written")
    ax.legend(fontsize=7)


def _collect_panel(ax: Any, result: dict[str, Any], mode: str) -> None:
    fractions = result.get("config", {}).get("fractions", [])
    series: list[tuple[str, Any]] = [("kernel PAGEMAP_SCAN (C)",
                                      result.get("floor", {}).get("collect"))]
    for name, e in result.get("backends", {}).items():
        if isinstance(e, dict):
            series.append((f"pagewatch {name}", e.get("collect")))
    for key, a in result.get("alternatives", {}).items():
        series.append((a.get("name", key) if isinstance(a, dict) else key, a))
    xs = list(range(len(fractions)))
    for label, c in series:
        if not isinstance(c, dict) or "fractions" not in c:
            continue
        ys = [_m(c["fractions"].get(fraction_key(f), {}).get(mode)) for f in fractions]
        ax.plot(xs, ys, marker="o", label=f"{label} ({c['bytes'] >> 20} MiB)")
    ax.set_xticks(xs, [f"{f * 100:g}%" for f in fractions])
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the region written")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"3. collect, {'get and reset' if mode == 'reset' else 'get only'}")
    ax.legend(fontsize=7)


def _precision_panel(ax: Any, result: dict[str, Any]) -> None:
    names: list[str] = []
    cases: list[str] = []
    cells: dict[tuple[str, str], Any] = {}
    for name, e in result.get("backends", {}).items():
        p = e.get("precision") if isinstance(e, dict) else None
        if not isinstance(p, dict) or "error" in p:
            continue
        names.append(name)
        for case, c in p.items():
            if isinstance(c, dict) and "written" in c:
                cases += [case] if case not in cases else []
                cells[name, case] = c
    ax.set_title("4. precision: reported / written (+false pos. -false neg.)")
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center")
        return
    wrong = [[(cells[n, c]["false_positives"] + cells[n, c]["false_negatives"])
              if (n, c) in cells else 0 for c in cases] for n in names]
    from matplotlib.colors import ListedColormap

    ax.imshow([[1.0 if w else 0.0 for w in row] for row in wrong],
              cmap=ListedColormap(["#d9f0d3", "#f4a6a6"]), vmin=0, vmax=1, aspect="auto")
    for i, n in enumerate(names):
        for j, c in enumerate(cases):
            x = cells.get((n, c))
            if x is None:
                continue
            text = f"{x['reported']}/{x['written']}"
            if x["false_positives"] or x["false_negatives"]:
                text += f"\n+{x['false_positives']} -{x['false_negatives']}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names)


def _overhead_panel(ax: Any, result: dict[str, Any]) -> None:
    o = result.get("python_overhead")
    ax.set_title("5. Python overhead: Tracker.collect() vs the minimal C collect")
    if not isinstance(o, dict) or "ratio" not in o:
        ax.text(0.5, 0.5, "not measured", ha="center")
        return
    vals = [o["raw_c"], o["tracker_collect"]]
    ax.bar(["one PAGEMAP_SCAN ioctl (C)", "Tracker.collect()"], [_m(v) for v in vals],
           yerr=list(zip(*[_err(v) for v in vals], strict=True)))
    ax.set_ylabel("ms (bars: median, lines: min-max)")
    ax.set_ylim(0, 2 * max(_m(v) or 0 for v in vals))
    cpu = f", CPU time {o['ratio_cpu']:.2f}" if "ratio_cpu" in o else ""
    ax.text(0.5, 0.92, f"ratio {o['ratio']:.2f}{cpu} (target <= {o.get('target', 1.1)}), "
            f"{o['pages']} pages in {o['bytes'] >> 20} MiB", transform=ax.transAxes,
            ha="center")
