"""pytest plugin: one JSON record per test (outcome, skip reason, backend) for the kernel matrix.

Use: ``python -m pytest -p tests.vm.report --pagewatch-report=PATH``.  The backend of a test is
its ``@pytest.mark.backend(NAME)`` marker (also set through ``pytest.param(marks=...)``), else a
parameter whose value or id is a backend name, else ``None``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.vm import BACKENDS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pagewatch-report", metavar="PATH", default=None,
                     help="write one JSON record per test to PATH (tests/vm kernel matrix)")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--pagewatch-report")
    if path:
        config.pluginmanager.register(Recorder(Path(path)), "pagewatch-report-recorder")


def backend_of_item(item: pytest.Item) -> str | None:
    """The backend a test exercises: marker first, then a parameter equal to a backend name."""
    marker = item.get_closest_marker("backend")
    if marker is not None and marker.args:
        return str(marker.args[0])
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for value in callspec.params.values():
        if isinstance(value, str) and value in BACKENDS:
            return value
    ident = str(callspec.id)
    for name in sorted(BACKENDS, key=len, reverse=True):
        if (ident == name or ident.startswith(name + "-") or ident.endswith("-" + name)
                or f"-{name}-" in ident):
            return name
    return None


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr or "")
    for prefix in ("Skipped: ", "Skipped:"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        text = f"xfail: {wasxfail}" if wasxfail else "xfail"
    return text.strip()


def _failure_text(report: pytest.TestReport | pytest.CollectReport) -> str:
    text = str(report.longreprtext or "")
    if len(text) <= 3000:
        return text
    # A long report keeps the failure's own words (the E lines) and its end.
    errs = [ln for ln in text.splitlines() if ln.startswith("E ")][:20]
    return "\n".join(errs) + "\n...\n" + text[-2000:]


class Recorder:
    """Merges the setup/call/teardown reports of each test into one record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.backend_of: dict[str, str | None] = {}
        self.records: dict[str, dict[str, Any]] = {}

    def _record(self, nodeid: str) -> dict[str, Any]:
        rec = self.records.get(nodeid)
        if rec is None:
            rec = {"nodeid": nodeid, "outcome": "pending", "reason": "", "message": "",
                   "backend": self.backend_of.get(nodeid), "seconds": 0.0}
            self.records[nodeid] = rec
        return rec

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.backend_of[item.nodeid] = backend_of_item(item)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            rec = self._record(report.nodeid or "<collection>")
            rec.update(outcome="error", phase="collect", message=_failure_text(report))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = self._record(report.nodeid)
        rec["seconds"] = round(rec["seconds"] + float(report.duration), 4)
        start, stop = getattr(report, "start", None), getattr(report, "stop", None)
        if start is not None and "start" not in rec:
            rec["start"] = round(float(start) - self.started, 3)
        if stop is not None:
            rec["stop"] = round(float(stop) - self.started, 3)
        if report.when == "setup":
            if report.skipped:
                rec.update(outcome="skipped", reason=_reason(report))
            elif report.failed:
                rec.update(outcome="error", phase="setup", message=_failure_text(report))
        elif report.when == "call":
            if report.skipped:  # pytest.skip() in the test, or an xfail that failed
                rec.update(outcome="skipped", reason=_reason(report))
            elif report.failed:
                rec.update(outcome="failed", phase="call", message=_failure_text(report))
            else:
                rec.update(outcome="passed")
        elif report.when == "teardown" and report.failed and rec["outcome"] != "failed":
            rec.update(outcome="error", phase="teardown", message=_failure_text(report))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        for rec in self.records.values():
            if rec["outcome"] == "pending":  # setup passed but nothing else arrived
                rec.update(outcome="error", message="no call report (interrupted?)")
        data = {
            "exitstatus": int(exitstatus),
            "seconds": round(time.time() - self.started, 3),
            "kernel": os.uname().release,
            "tests": list(self.records.values()),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)
