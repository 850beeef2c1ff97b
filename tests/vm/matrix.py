"""Turn the per-kernel results into the matrix, print it, and apply the guard."""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from typing import Any

from tests.vm import BACKENDS

OUTCOMES = ("passed", "failed", "error", "skipped")
NO_BACKEND = "(none)"

#: Backends that Debian's kernels must exercise (at least one passed test), whatever the host.
#: 6.1 has soft-dirty and uffd-wp but neither WP_ASYNC nor PAGEMAP_SCAN (both came in 6.7).
EXPECTED_EXERCISED: dict[str, tuple[str, ...]] = {
    "6.1": ("soft-dirty", "uffd-sync", "mprotect", "compare"),
    "6.12": BACKENDS,
}


def count(tests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    for t in tests:
        out[t.get("backend") or NO_BACKEND][t["outcome"]] += 1
    return dict(out)


def skip_reasons(tests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for t in tests:
        if t["outcome"] == "skipped":
            out[t.get("backend") or NO_BACKEND][t.get("reason") or "(no reason given)"] += 1
    return {b: dict(c.most_common()) for b, c in out.items()}


def _short(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def failure_line(message: str, width: int = 400) -> str:
    """The failure's own words: its first ``E`` lines (the exception and the start of the
    diff), not the last one, which for a long set or list diff is a lone bracket."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    errs = [ln.removeprefix("E").strip() for ln in lines if ln.startswith("E ")]
    return _short(" | ".join(errs[:6]) if errs else lines[-1] if lines else "", width)


def guard(columns: list[dict[str, Any]]) -> list[str]:
    """Every reason the matrix must fail, in words that name the test, backend or kernel."""
    problems: list[str] = []
    ran = [c for c in columns if c.get("tests") is not None]
    for c in columns:
        label = c["label"]
        if c.get("error"):
            problems.append(f"[{label}] no results: {c['error']}")
            continue
        rc = c.get("pytest_rc")
        if rc not in (0, 1):
            what = {2: "interrupted", 3: "internal error", 4: "usage error",
                    5: "no tests collected"}.get(rc or -1, "unknown")
            problems.append(f"[{label}] pytest exited {rc} ({what})")
        bad = [t for t in c["tests"] if t["outcome"] in ("failed", "error")]
        for t in bad:
            problems.append(f"[{label}] {t['outcome'].upper()} {t['nodeid']}: "
                            f"{failure_line(t.get('message', ''))}")
        if rc == 1 and not bad:
            problems.append(f"[{label}] pytest exited 1 but recorded no failed test")
        expected = c.get("expected_release")
        if expected and c.get("release") != expected:
            problems.append(f"[{label}] booted {c.get('release')!r}, expected {expected!r}")
        for t in c["tests"]:
            b = t.get("backend")
            if b is not None and b not in BACKENDS:
                problems.append(f"[{label}] {t['nodeid']}: unknown backend {b!r} "
                                f"(known: {', '.join(BACKENDS)})")
    if not ran:
        return problems or ["no kernel produced results"]

    # A test that no kernel of the matrix runs: skipped wherever it was collected.
    outcomes: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for c in ran:
        for t in c["tests"]:
            outcomes[t["nodeid"]][c["label"]] = t
    everywhere = [(nodeid, per) for nodeid, per in outcomes.items()
                  if all(t["outcome"] == "skipped" for t in per.values())]
    if everywhere:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for nodeid, per in everywhere:
            why = "; ".join(f"{k}: {_short(t.get('reason', ''), 90)}" for k, t in per.items())
            by_reason[why].append(nodeid)
        for why, nodeids in by_reason.items():
            shown = ", ".join(nodeids[:6]) + (f" (+{len(nodeids) - 6} more)"
                                              if len(nodeids) > 6 else "")
            problems.append(f"skipped on every kernel ({len(nodeids)} tests): {shown} -- "
                            f"{why}")

    # A backend that passes nowhere; and the backends a Debian kernel must exercise.
    passed: Counter[str] = Counter()
    for c in ran:
        for b, n in c["counts"].items():
            passed[b] += n["passed"]
    for b in BACKENDS:
        if passed[b] == 0:
            cells = ", ".join(f"{c['label']}: {_cell(c['counts'].get(b))}" for c in ran)
            problems.append(f"backend {b}: no test passed on any kernel ({cells} "
                            "passed/failed/skipped)")
    for c in ran:
        for b in EXPECTED_EXERCISED.get(c["label"], ()):
            n = c["counts"].get(b)
            if passed[b] and not (n and n["passed"]):
                top = next(iter(c["skip_reasons"].get(b, {})), "no test of it ran")
                problems.append(f"[{c['label']}] backend {b}: no test passed on this kernel, "
                                f"which has it ({_short(top, 100)})")
    return problems


def _cell(n: dict[str, int] | None) -> str:
    if not n:
        return "-"
    return f"{n['passed']}/{n['failed'] + n['error']}/{n['skipped']}"


def render(columns: list[dict[str, Any]], accel: str, problems: list[str]) -> str:
    out: list[str] = []
    heads = [f"{c['label']} ({c.get('release') or '?'})" for c in columns]
    rows = [*BACKENDS]
    extra = sorted({b for c in columns for b in (c.get("counts") or {}) if b not in BACKENDS})
    rows += extra
    w0 = max(len(r) for r in rows) + 2
    widths = [max(len(h), 12) + 2 for h in heads]
    out.append(f"== kernel matrix ({accel}): passed/failed+errors/skipped per backend ==")
    out.append("backend".ljust(w0) + "".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    for r in rows:
        cells = [_cell((c.get("counts") or {}).get(r)) if not c.get("error") else "no results"
                 for c in columns]
        out.append(r.ljust(w0) + "".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)))

    out.append("")
    out.append("== skip reasons ==")
    for c in columns:
        for b, reasons in sorted((c.get("skip_reasons") or {}).items()):
            for reason, n in reasons.items():
                out.append(f"  {c['label']:<6} {b:<11} {n:>4} x {_short(reason, 110)}")

    fails = [(c["label"], t) for c in columns for t in c.get("tests") or []
             if t["outcome"] in ("failed", "error")]
    if fails:
        out.append("")
        out.append("== failures ==")
        for label, t in fails:
            out.append(f"  {label:<6} {t['outcome'].upper():<6} {t['nodeid']}")
            out.append(f"         {failure_line(t.get('message', ''))}")

    out.append("")
    out.append("== kernels ==")
    for c in columns:
        boot = c.get("boot_seconds")
        out.append(f"-- {c['label']}: {c.get('release') or '?'} {c.get('package', '')} "
                   f"{c.get('version', '')}".rstrip())
        start = c.get("guest_start_seconds")
        out.append(f"   wall {c.get('wall_seconds', 0):.1f} s"
                   + (f", booted to a shell in {boot:.1f} s" if boot is not None else "")
                   + (f", Python up at {start:.1f} s" if start is not None and boot else "")
                   + f", pytest {c.get('pytest_seconds') or 0:.1f} s, pytest rc "
                   f"{c.get('pytest_rc')}")
        if c.get("error"):
            out.append(f"   ERROR: {c['error']}")
            continue
        sd = c.get("soft_dirty") or {}
        hp = c.get("hugetlb") or {}
        out.append(f"   soft-dirty self-check: {'works' if sd.get('works') else 'does not work'}"
                   f" ({sd.get('detail', '?')})")
        out.append(f"   hugetlb reservation: {hp.get('detail', '?')}")
        probe = (c.get("probe") or {}).get("text") or {}
        cmd = (c.get("probe") or {}).get("command", "pagewatch probe")
        out.append(f"   $ {cmd}   (rc={probe.get('rc')})")
        text = (probe.get("stdout") or "") + (probe.get("stderr") or probe.get("error") or "")
        out.append(textwrap.indent(text.rstrip() or "(no output)", "   | "))

    out.append("")
    if problems:
        out.append(f"== GUARD FAILED: {len(problems)} problem(s) ==")
        out.extend(f"  * {p}" for p in problems)
    else:
        out.append("== guard: ok (no failure; every test and every backend exercised on some "
                   "kernel) ==")
    return "\n".join(out)


def totals(columns: list[dict[str, Any]]) -> dict[str, int]:
    t = dict.fromkeys(OUTCOMES, 0)
    for c in columns:
        for n in (c.get("counts") or {}).values():
            for k in OUTCOMES:
                t[k] += n[k]
    return t
