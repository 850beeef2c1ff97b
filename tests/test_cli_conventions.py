"""The command line's conventions (issue 14): --version, --help, exit status and messages,
the target forms of record and top, default output names, report, top's display, start-up."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pagewatch
from pagewatch import cli
from pagewatch.cli import process as pcli
from tests.targets.common import build
from tests.test_process_cli import BUSY, needs_tracking, synthetic

PAGEWATCH = [sys.executable, "-m", "pagewatch.cli"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def pw(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PAGEWATCH, *argv], capture_output=True, text=True, timeout=120,
                          **kw)


# ---- --version, --help, start-up ------------------------------------------------------------

@pytest.mark.kernel_independent
def test_version_prints_the_version_of_the_installed_package() -> None:
    from importlib import metadata

    r = pw("--version")
    assert r.returncode == 0 and r.stdout == f"pagewatch {metadata.version('pagewatch')}\n"
    assert pagewatch.__version__ == metadata.version("pagewatch")


@pytest.mark.kernel_independent
@pytest.mark.parametrize("argv", [["--help"], ["--version"],
                                  ["report", "--help"]])
def test_help_and_version_import_neither_numpy_nor_the_c_extension(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pagewatch.cli", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pagewatch.cli" in imported
    assert not {"numpy", "pagewatch._native", "pagewatch.process"} & imported
    if "--version" not in argv:  # the metadata costs more than the rest: only when asked
        assert "importlib.metadata" not in imported


#: what start-up must not pay for before a command runs: numpy, the C extension, the tracker
#: and the kernel bindings (which load both), and every optional extra
HEAVY = ("numpy", "pagewatch._native", "pagewatch.process", "pagewatch.kernel",
         "matplotlib", "rich", "prometheus_client")


@pytest.mark.kernel_independent
@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [
    [command, "--help"] for commands in cli.COMMANDS.values() for command in commands],
    ids=" ".join)
def test_every_help_and_the_version_load_no_heavy_module(argv: list[str]) -> None:
    code = ("import contextlib, io, sys\n"
            "from pagewatch import cli\n"
            "out = io.StringIO()\n"
            "try:\n"
            "    with contextlib.redirect_stdout(out):\n"
            f"        cli.main({argv!r})\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "assert out.getvalue(), 'no help printed'\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
            f"or m in {HEAVY!r} or m.startswith({HEAVY!r})))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"{argv} imported {r.stdout.strip()}"


@pytest.mark.kernel_independent
def test_import_pagewatch_loads_names_when_first_used() -> None:
    code = ("import sys, pagewatch as pw; a = 'numpy' in sys.modules; t = pw.Tracker; "
            "print(a, 'numpy' in sys.modules, t.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["False", "True", "Tracker"], r.stderr


@pytest.mark.kernel_independent
def test_submodules_are_attributes_of_the_package_when_asked_for() -> None:
    code = ("import pagewatch as pw; print(pw.checkpoint.LocalStore.__name__, "
            "pw.process.ProcessTracker.__name__, hasattr(pw, 'no_such_name'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["LocalStore", "ProcessTracker", "False"], r.stderr


@pytest.mark.kernel_independent
def test_top_level_help_shows_the_workflow_with_examples_and_every_command() -> None:
    r = pw("--help")
    assert r.returncode == 0
    for text in ("pagewatch run -- python3", "pagewatch record --pid", "pagewatch report",
                 "pagewatch plot", "exit status", "--version"):
        assert text in r.stdout
    for command in cli.COMMANDS["process"]:
        assert f"    {command} " in r.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.kernel_independent
def test_every_positional_has_help_and_every_interval_states_its_own_default() -> None:
    commands = _subparsers(cli.build_parser())
    assert set(commands) >= {c for cs in cli.COMMANDS.values() for c in cs}
    defaults = {"run": "0.5", "record": "1", "top": "1", "exporter": "1"}
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings and action.dest != "help":
                assert action.help, f"{name}: positional {action.dest} has no help"
            if "--interval" in action.option_strings:
                assert f"(default {defaults[name]}" in (action.help or ""), name
                assert str(action.default).rstrip("0").rstrip(".") == defaults[name], name


# ---- exit status and messages ---------------------------------------------------------------

@pytest.mark.kernel_independent
@pytest.mark.parametrize("argv, text", [
    (["record"], "pagewatch: record: give the process: --pid PID"),
    (["top"], "pagewatch: top: give the process: --pid PID"),
    (["record", "--pid", "5", "--", "true"], "not both"),
    (["record", "--pid", "x"], "pagewatch: record: argument --pid: 'x' is not a whole number"),
    (["run"], "pagewatch: run: give the command to run"),
    (["nosuch"], "pagewatch: argument COMMAND: invalid choice: 'nosuch'"),
    (["probe", "--nosuch"], "pagewatch: probe: unrecognized arguments: --nosuch"),
    (["report", "a.jsonl", "b.jsonl"], "pagewatch: report: unrecognized arguments: b.jsonl"),
])
def test_usage_errors_exit_2_with_the_one_prefix(argv: list[str], text: str) -> None:
    r = pw(*argv)
    assert r.returncode == 2
    assert text in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kernel_independent
def test_runtime_failures_exit_1_with_the_one_prefix(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    for argv, text in ((["record", "--pid", str(dead.pid)], "does not exist"),
                       (["report", "missing.jsonl"], "missing.jsonl: No such file"),
                       (["plot", "missing.jsonl"], "missing.jsonl: No such file")):
        r = pw(*argv)
        assert r.returncode == 1, (argv, r.stderr)
        assert r.stderr.startswith("pagewatch: ") and text in r.stderr


# ---- record, top: --pid PID or -- CMD ------------------------------------------------------

@pytest.mark.kernel_independent
@needs_tracking
def test_run_writes_a_recording_named_after_the_command_and_says_what_to_run_next(
        tmp_path: Path) -> None:
    r = pw("run", "--", sys.executable, "-m", "pagewatch.demo", "--size", "4", "--pause",
           "0.01")
    assert r.returncode == 0, r.stderr
    [rec] = list(tmp_path.glob("pagewatch-demo.*.jsonl"))
    pid = int(rec.name.split(".")[1])
    objs = [json.loads(x) for x in rec.read_text().splitlines()]
    assert objs[0]["type"] == "attach" and objs[0]["pid"] == pid
    assert objs[-1]["type"] == "exit" and sum(o.get("pages", 0) for o in objs) >= 1024
    assert f"next: pagewatch report {rec.name}" in r.stderr
    assert "phase 4" in r.stdout


@pytest.mark.kernel_independent
@needs_tracking
def test_record_of_a_command_starts_it_tracked_and_keeps_its_exit_code(tmp_path: Path) -> None:
    r = pw("record", "--interval", "0.05", "--",
           sys.executable, "-c", "import os; b = bytearray(1 << 22); os._exit(3)")
    assert r.returncode == 3, r.stderr
    [rec] = list(tmp_path.glob("pagewatch-python*.jsonl"))
    objs = [json.loads(x) for x in rec.read_text().splitlines()]
    assert sum(o.get("pages", 0) for o in objs) >= 1024  # the 4 MiB, written after the attach


@pytest.mark.kernel_independent
@needs_tracking
@pytest.mark.parametrize("form", [["--pid"], []])
def test_record_takes_pid_as_an_option_or_positionally_into_a_default_file(
        tmp_path: Path, form: list[str]) -> None:
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        p.stdout.readline()
        r = pw("record", *form, str(p.pid), "--interval", "0.05", "--count", "2")
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 0, r.stderr
    rec = tmp_path / f"pagewatch-python{sys.version_info[0]}.{p.pid}.jsonl"
    if not rec.exists():  # comm is the executable's name: python3, python3.11, ...
        [rec] = list(tmp_path.glob(f"pagewatch-*.{p.pid}.jsonl"))
    kinds = [json.loads(x)["type"] for x in rec.read_text().splitlines()]
    assert kinds == ["attach", "interval", "interval"]
    assert f"recording pid {p.pid} to {rec.name}" in r.stderr


@pytest.mark.kernel_independent
def test_an_existing_output_is_not_overwritten_without_force(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    f = tmp_path / "s.jsonl"
    synthetic(f)
    assert cli.main(["plot", str(f)]) == 0  # the name derived from the recording's
    png = tmp_path / "s.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    png.write_bytes(b"mine")
    r = pw("plot", str(f))
    assert r.returncode == 1 and "s.png exists: give -f/--force" in r.stderr
    assert png.read_bytes() == b"mine"
    assert pw("plot", str(f), "--force").returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert pw("run", "-o", os.devnull, "--", "true").returncode == 0  # not a file: written to
    out = tmp_path / "taken.jsonl"
    out.write_text("keep")
    r = pw("run", "-o", str(out), "--", "true")
    assert r.returncode == 1 and "exists" in r.stderr and out.read_text() == "keep"


# ---- report -------------------------------------------------------------------------------

@pytest.mark.kernel_independent
def test_report_gives_top_mappings_rate_over_time_and_working_set(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    synthetic(f)
    r = pw("report", str(f), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["write_working_set"]["pages"] == 5  # a: pages 0, 1, 3; b: pages 0, 1
    assert rep["page_writes"] == 5 and rep["intervals"] == 2
    assert [(m["path"], m["pages"], m["distinct"]) for m in rep["top_mappings"]] == [
        ("a", 3, 3), ("b", 2, 2)]
    assert [(x["t"], x["pages"]) for x in rep["rate"]] == [(1.0, 2), (2.0, 3)]
    text = pw("report", str(f))
    assert text.returncode == 0
    assert "write working set: 5 distinct pages" in text.stdout
    assert "top mappings:" in text.stdout and "rate over time:" in text.stdout


# ---- top ----------------------------------------------------------------------------------

class _Pages:
    def __init__(self, n: int) -> None:
        self.n = n
        self.nbytes = n * 4096

    def __len__(self) -> int:
        return self.n


class _Dirty:
    """What _top_table reads of a ProcessDirty."""

    pid, elapsed, backend = 7, 1.0, "uffd-async"

    def __init__(self, rows: dict[Any, _Pages]) -> None:
        self.rows = rows
        self.count = sum(p.n for p in rows.values())
        self.nbytes = self.count * 4096

    def __len__(self) -> int:
        return len(self.rows)

    def written(self) -> dict[Any, _Pages]:
        return self.rows


Map = collections.namedtuple("Map", "start end perms path")


@pytest.mark.kernel_independent
def test_top_shows_bracketed_names_and_the_base_name_of_long_paths() -> None:
    from rich.console import Console

    long = "/very/long/folder/" * 8 + "libexample.so.1.2"
    d = _Dirty({Map(0x1000, 0x9000, "rw-p", "[heap]"): _Pages(5),
                Map(0x20000, 0x30000, "rw-p", "[anon:jit [x]]"): _Pages(3),
                Map(0x40000, 0x50000, "rw-p", long): _Pages(2)})
    console = Console(record=True, width=80)
    console.print(pcli._top_table([d], 10, collections.Counter(), "pages"))  # type: ignore[list-item]
    text = console.export_text()
    assert "[heap] 0x1000" in text and "[anon:jit [x]] 0x20000" in text
    assert "libexample.so.1.2 0x40000" in text
    plain = pcli._top_plain([d], 10, collections.Counter(), "address", 1.0)  # type: ignore[list-item]
    assert [x.split()[-2] for x in plain.splitlines()[2:]] == [
        "[heap]", "[x]]", "libexample.so.1.2"]


@pytest.mark.kernel_independent
@needs_tracking
def test_top_into_a_pipe_prints_rows_every_interval_and_ends_on_sigterm() -> None:
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    top = None
    try:
        assert p.stdout is not None
        p.stdout.readline()
        top = subprocess.Popen([*PAGEWATCH, "top", "--pid", str(p.pid), "--interval", "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert top.stdout is not None
        seen: list[str] = []
        while sum(x.startswith("t=") for x in seen) < 2:  # two intervals, while it runs
            ready, _, _ = select.select([top.stdout], [], [], 60)
            assert ready, f"no row within 60 s: {seen}"
            seen.append(top.stdout.readline())
        assert any("anonymous" in x for x in seen)
        top.send_signal(signal.SIGTERM)
        assert top.wait(timeout=300) == 0
        assert p.poll() is None  # left running
    finally:
        if top is not None:
            top.kill()
            top.wait()
        p.kill()
        p.wait()


#: one row of top's plain output: pages/s, MiB/s, total, size MiB, perms, mapping, start
TOP_ROW = re.compile(r"^\s*\d+\s+[\d.]+\s+(\d+)\s+[\d.]+\s+[rwxsp-]{4}\s+(.*) (0x[0-9a-f]+)$")


@pytest.mark.kernel_independent
@needs_tracking
def test_top_of_a_command_holds_it_until_tracked_so_its_first_writes_are_shown() -> None:
    # The pattern program writes its 256 buffer pages as the first thing it does after
    # exec (the commands wait in its stdin), sleeps, writes 128 of them again and exits 5.  A
    # command started untracked and attached afterwards (Popen, then attach) loses the first
    # writes; held, top sees them all, and the later ones in the intervals after.
    commands = ("".join(f"w {page} 7\n" for page in range(256)) + "sleep 500\n"
                + "".join(f"w {page} 8\n" for page in range(128)) + "exit 5\n")
    top = subprocess.run([*PAGEWATCH, "top", "--interval", "0.2", "--rows", "100", "--",
                          str(build("pattern")), "cmd"],
                         input=commands, capture_output=True, text=True, timeout=300)
    assert top.returncode == 5, top.stderr  # top -- CMD ends with the command's exit status
    totals: dict[tuple[str, str], int] = {}
    for line in top.stdout.splitlines():
        m = TOP_ROW.match(line)
        if m:
            key = (m[2], m[3])
            totals[key] = max(totals.get(key, 0), int(m[1]))
    assert sum(totals.values()) >= 256 + 128, top.stdout
    assert "Traceback" not in top.stderr


@pytest.mark.kernel_independent
@needs_tracking
def test_top_on_a_terminal_draws_the_table_and_quits_on_q() -> None:
    pytest.importorskip("rich")
    import pty

    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    master, slave = pty.openpty()
    top = None
    try:
        assert p.stdout is not None
        p.stdout.readline()
        top = subprocess.Popen([*PAGEWATCH, "top", "--pid", str(p.pid), "--interval", "0.1"],
                               stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        got = b""
        while b"MiB/s written" not in got or b"anonymous" not in got:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, got
            got += os.read(master, 65536)
        os.write(master, b"a")  # order by address, then quit
        os.write(master, b"q")
        assert top.wait(timeout=300) == 0
        assert p.poll() is None
    finally:
        if top is not None:
            top.kill()
            top.wait()
        os.close(master)
        p.kill()
        p.wait()



@pytest.mark.kernel_independent
def test_plot_panels_share_one_time_axis_of_the_same_width(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    import matplotlib.pyplot as plt

    f = tmp_path / "s.jsonl"
    synthetic(f)
    figs: list[Any] = []
    monkeypatch.setattr(plt, "close", figs.append)
    assert cli.main(["plot", str(f)]) == 0
    heat, rate = figs[0].axes[:2]
    figs[0].canvas.draw()
    a, b = heat.get_position(), rate.get_position()
    assert (round(a.x0, 3), round(a.x1, 3)) == (round(b.x0, 3), round(b.x1, 3))
    assert heat.get_xlim() == rate.get_xlim()
