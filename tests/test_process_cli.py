"""``pagewatch run``, ``record``, ``top`` and ``plot``."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagewatch import cli, process
from pagewatch.cli import process as pcli
from pagewatch.kernel.constants import PAGE_SIZE, PM_UFFD_WP
from pagewatch.kernel.pagemap import read_pagemap
from pagewatch.kernel.probe import probe_wp_async
from tests.targets.common import PATTERN_STEPS, Paced, build, paced_pattern, pattern_target

wp_ok, wp_why = probe_wp_async()
PAGEWATCH = [sys.executable, "-m", "pagewatch.cli"]
_TRACKING = [
    pytest.mark.backend("uffd-async"),
    pytest.mark.skipif(not wp_ok, reason=f"uffd-async unavailable: {wp_why}"),
    pytest.mark.skipif(os.uname().machine != "x86_64",
                       reason="syscall injection is implemented for x86-64 only"),
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run and record write a recording in the current folder by default: not the source's."""
    monkeypatch.chdir(tmp_path)


def needs_tracking(fn: Any) -> Any:
    """The marks of a test that tracks another process."""
    for mark in _TRACKING:
        fn = mark(fn)
    return fn


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def pages_in(objs: list[dict[str, Any]], lo: int, hi: int) -> set[int]:
    """Absolute page numbers in [lo, hi) reported by the interval lines."""
    out: set[int] = set()
    for o in objs:
        if o["type"] != "interval":
            continue
        for m in o["mappings"]:
            base = m["start"] // PAGE_SIZE
            for first, n in m["runs"]:
                out.update(p for p in range(base + first, base + first + n)
                           if lo // PAGE_SIZE <= p < hi // PAGE_SIZE)
    return out


# os._exit: the buffer is still mapped at the exit stop (sys.exit would free it first, and
# writes to memory unmapped before a collect cannot be reported: it no longer exists).
WRITER = """
import ctypes, os
b = bytearray({n} * 4096)
addr = ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b))
for i in range(0, len(b), 4096):
    b[i] = 1
print(addr, len(b), flush=True)
os._exit({code})
"""


# ---- run ----------------------------------------------------------------------------------

@needs_tracking
@pytest.mark.parametrize("how", ["direct", "through sh -c exec"])
def test_run_reports_every_page_the_command_wrote_and_keeps_its_exit_code(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], how: str) -> None:
    out = tmp_path / "run.jsonl"
    code = WRITER.format(n=3000, code=3)
    cmd = [sys.executable, "-c", code]
    if how != "direct":
        cmd = ["sh", "-c", 'exec "$0" -c "$1"', sys.executable, code]
    rc = cli.main(["run", "--interval", "0.05", "-o", str(out), "--", *cmd])
    captured = capfd.readouterr()
    assert rc == 3
    addr, size = (int(x) for x in captured.out.split())
    objs = lines(out)
    assert objs[0]["type"] == "attach" and objs[-1] == {**objs[-1], "type": "exit", "code": 3}
    assert ("exec" in [o["type"] for o in objs]) == (how != "direct")
    want = set(range(-(-addr // PAGE_SIZE), (addr + size) // PAGE_SIZE))
    assert want <= pages_in(objs, addr, addr + size)  # every page it wrote, to the last one
    assert "exited with code 3" in captured.err and "write working set:" in captured.err


def test_run_of_a_missing_command_fails_like_a_shell(capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--", "no-such-command-pagewatch"]) == 127
    assert "no-such-command-pagewatch: No such file or directory" in capfd.readouterr().err


def test_run_without_a_command_shows_an_example(capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run"]) == 2
    assert "pagewatch run -- python3" in capfd.readouterr().err


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


# Short sleeps, not one long one: Python runs a handler between two bytecodes, so a signal
# that lands after its last check and before a sleep's system call waits for the sleep's end
# (one 60 s sleep: 1 run in 6 in the 6.12 guest, with or without pagewatch).
SIGNALLED = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(5))
print("ready", flush=True)
for _ in range(1200):
    time.sleep(0.05)
"""


@needs_tracking
@pytest.mark.parametrize("sig,rc", [(signal.SIGUSR1, 5), (signal.SIGINT, 130)])
def test_run_passes_signals_to_the_command_and_reports_its_end(sig: int, rc: int) -> None:
    p = subprocess.Popen([*PAGEWATCH, "run", "--", sys.executable, "-c", SIGNALLED],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # Ctrl-C: the whole foreground group, pagewatch included
        else:
            os.kill(children(p.pid)[0], sig)
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == rc, err
    assert ("killed by signal 2" if sig == signal.SIGINT else "exited with code 5") in err


SANDBOXED = """
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
insns = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(1, ctypes.addressof(insns))
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0
os.execvp("sh", ["sh", "-c", "echo in-sandbox; exit 4"])
"""


@needs_tracking
def test_run_never_injects_into_a_program_under_a_seccomp_filter(
        capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "run.jsonl"
    assert cli.main(["run", "-o", str(out_file), "--", sys.executable, "-c", SANDBOXED]) == 4
    out, err = capfd.readouterr()
    assert out == "in-sandbox\n"
    if process.soft_dirty_available()[0]:  # needs no injection: run falls back to it
        attach = [o for o in lines(out_file) if o["type"] == "attach"]
        assert attach[-1]["backend"] == "soft-dirty" and "cannot track" not in err
    else:
        assert "cannot track sh" in err and "seccomp filter" in err


def expected_pattern_output(rounds: int) -> str:
    return subprocess.run([str(build("pattern")), "run", str(rounds)], capture_output=True,
                          text=True, check=True).stdout


def wait_for_line(path: Path, kind: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(f'"type":"{kind}"' in x for x in path.read_text().split("\n")):
            return
        time.sleep(0.01)
    raise TimeoutError(f"no {kind} line in {path}")


@needs_tracking
@pytest.mark.parametrize("command", ["run", "record"])
def test_sigkill_of_pagewatch_leaves_the_target_running_to_the_right_output(
        tmp_path: Path, command: str) -> None:
    # The target's rounds come in parts, each started by a byte on its stdin (run: through
    # pagewatch, whose stdin it inherits): it is tracked and in the middle of its work when
    # pagewatch dies, however slow the machine (it used to be a race with the clock, lost
    # at load 20 in the 6.12 guest).
    rounds = 1500
    expected = expected_pattern_output(rounds)
    out = tmp_path / "out.jsonl"
    if command == "run":
        target = Paced([*PAGEWATCH, "run", "--interval", "0.02", "-o", str(out), "--",
                        str(build("pattern")), "run", str(rounds), str(PATTERN_STEPS)],
                       stdout=subprocess.PIPE)
        pw = target.proc
    else:
        target = paced_pattern(rounds, stdout=subprocess.PIPE)
        pw = subprocess.Popen([*PAGEWATCH, "record", str(target.proc.pid), "--interval",
                               "0.02", "-o", str(out)])
    try:
        wait_for_line(out, "interval")
        target.step()  # its first part runs tracked; the kill comes during or after it
        child = children(pw.pid)[0] if command == "run" else target.proc.pid
        pw.kill()
        pw.wait()
        target.finish()  # the rest, with pagewatch gone
        assert target.proc.stdout is not None  # run: the child keeps pagewatch's stdout
        got = target.proc.stdout.read().decode()
        if command == "record":
            target.proc.wait(300)
        deadline = time.monotonic() + 300
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pw.kill()
        pw.wait()
        target.proc.kill()
        target.proc.wait()
    assert got == expected


# ---- record -------------------------------------------------------------------------------

@needs_tracking
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_record_ends_on_ctrl_c_or_kill_with_a_last_collect_and_detaches_cleanly(
        tmp_path: Path, sig: int) -> None:
    build("pattern")
    t = pattern_target()
    out = tmp_path / "rec.jsonl"
    try:
        addr, npages = (int(x) for x in t.cmd("addr").split())
        # No interval ends before the signal: only the last collect it makes can report.
        rec = subprocess.Popen([*PAGEWATCH, "record", str(t.pid), "--interval", "600",
                                "-o", str(out)], stderr=subprocess.PIPE, text=True)
        wait_for_line(out, "attach")
        for page in (3, 4, 5, 40):
            t.cmd(f"w {page} 1")
        rec.send_signal(sig)
        _, err = rec.communicate(timeout=300)
        assert rec.returncode == 0, err
        objs = lines(out)
        assert objs[0]["type"] == "attach" and objs[0]["pid"] == t.pid
        assert all(o["type"] == "interval" for o in objs[1:])
        got = pages_in(objs, addr, addr + npages * PAGE_SIZE)
        assert got == {addr // PAGE_SIZE + p for p in (3, 4, 5, 40)}
        runs = [r for o in objs[1:] for m in o["mappings"] for r in m["runs"]
                if m["start"] <= addr < m["end"]]
        first = (addr - next(m["start"] for o in objs[1:] for m in o["mappings"]
                             if m["start"] <= addr < m["end"])) // PAGE_SIZE
        assert [first + 3, 3] in runs and [first + 40, 1] in runs
        assert "recorded pid" in err
        # Detached and unprotected: the target goes on, no uffd-wp bit left.
        bits = read_pagemap(t.pid, addr, addr + npages * PAGE_SIZE)
        assert not (bits & PM_UFFD_WP != 0).any()
        assert t.cmd("w 1 1") == "ok"
    finally:
        t.close()


@needs_tracking
def test_record_stopped_by_ctrl_c_during_the_attach_still_ends_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build("pattern")
    t = pattern_target()
    out = tmp_path / "rec.jsonl"
    real = pcli.Session._attach

    def attach_then_ctrl_c(self: pcli.Session, after_exec: bool = False) -> Any:
        p = real(self, after_exec)
        os.kill(os.getpid(), signal.SIGINT)  # before the session could install anything
        return p

    monkeypatch.setattr(pcli.Session, "_attach", attach_then_ctrl_c)
    try:
        t.cmd("addr")
        assert cli.main(["record", str(t.pid), "--interval", "600", "-o", str(out)]) == 0
        assert [o["type"] for o in lines(out)] == ["attach", "interval"]
        assert t.cmd("w 1 1") == "ok"
    finally:
        t.close()


@needs_tracking
def test_record_with_a_count_stops_by_itself_and_follows_an_exec(tmp_path: Path) -> None:
    build("pattern")
    t = pattern_target()
    out = tmp_path / "rec.jsonl"
    try:
        t.cmd("addr")
        t.send("exec")  # becomes cat(1), waiting on its stdin until the test ends
        assert cli.main(["record", str(t.pid), "--interval", "0.1", "--count", "4",
                         "-o", str(out)]) == 0
        objs = lines(out)
        kinds = [o["type"] for o in objs]
        assert kinds.count("interval") == 4
        if "exec" in kinds:  # attached before the exec: attached again after it
            assert kinds[kinds.index("exec") + 1] == "attach"
    finally:
        t.close()


@needs_tracking
def test_record_with_a_duration_stops_by_itself_with_a_last_collect(tmp_path: Path) -> None:
    t = pattern_target()
    out = tmp_path / "rec.jsonl"
    try:
        t.cmd("addr")
        assert cli.main(["record", str(t.pid), "--interval", "5", "--duration", "0.2",
                         "-o", str(out)]) == 0
        # Ended by the duration, before the first interval: the last collect is written.
        assert [o["type"] for o in lines(out)] == ["attach", "interval"]
        assert t.cmd("w 1 1") == "ok"
    finally:
        t.close()


def test_record_of_a_dead_pid_is_a_clear_error(capfd: pytest.CaptureFixture[str]) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert cli.main(["record", str(p.pid), "--duration", "0.1"]) == 1
    assert "does not exist" in capfd.readouterr().err


# ---- top ----------------------------------------------------------------------------------

BUSY = """
import ctypes, time
b = bytearray(2000 * 4096)
print(ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)), flush=True)
end = time.monotonic() + 30
while time.monotonic() < end:
    for i in range(0, len(b), 4096):
        b[i] = (b[i] + 1) % 256
    time.sleep(0.01)
"""


@needs_tracking
def test_top_shows_written_pages_per_second_per_mapping(
        capsys: pytest.CaptureFixture[str]) -> None:
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        addr = int(p.stdout.readline())
        assert cli.main(["top", str(p.pid), "--interval", "0.2", "--count", "2",
                         "--rows", "5"]) == 0
    finally:
        p.kill()
        p.wait()
    out = capsys.readouterr().out
    assert f"pid {p.pid}:" in out and "MiB/s written" in out
    row = next(x for x in out.splitlines() if f"{addr & ~0xFFF:#x}"[:10] in x or
               "anonymous" in x)
    rate = float(row.split()[0])  # not a terminal: plain rows
    assert rate > 0


# ---- plot ---------------------------------------------------------------------------------

def synthetic(path: Path) -> None:
    base = 0x10000000
    objs = [{"type": "attach", "pid": 1},
            {"type": "interval", "t": 1.0, "dt": 1.0, "pid": 1, "pages": 2,
             "mappings": [{"start": base, "end": base + 4 * PAGE_SIZE, "path": "a",
                           "perms": "rw-p", "pages": 2, "runs": [[0, 2]]}]},
            {"type": "interval", "t": 2.0, "dt": 1.0, "pid": 1, "pages": 3,
             "mappings": [{"start": base + 64 * PAGE_SIZE, "end": base + 66 * PAGE_SIZE,
                           "path": "b", "perms": "rw-p", "pages": 2, "runs": [[0, 2]]},
                          {"start": base, "end": base + 4 * PAGE_SIZE, "path": "a",
                           "perms": "rw-p", "pages": 1, "runs": [[3, 1]]}]}]
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")


def test_heatmap_puts_written_pages_at_their_addresses_with_gaps_removed(
        tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    synthetic(f)
    grid, labels, total = pcli.heatmap(pcli._load(str(f)), rows=100)
    assert total == 6  # 4 pages of a, 2 of b: the gap between them is not drawn
    assert grid.shape == (6, 2)
    np.testing.assert_array_equal(grid[:, 0], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(grid[:, 1], [0, 0, 0, 1, 1, 1])
    assert [name for _, name in labels] == ["a", "b"]


@pytest.mark.kernel_independent
def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    f = tmp_path / "s.jsonl"
    synthetic(f)
    png = tmp_path / "heat.png"
    assert cli.main(["plot", str(f), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.jsonl"
    synthetic(f)
    real = builtins.__import__

    def no_mpl(name: str, *a: Any, **kw: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert cli.main(["plot", str(f), "-o", str(tmp_path / "x.png")]) == 1
    assert "pip install 'pagewatch[plot]'" in capfd.readouterr().err


@pytest.mark.kernel_independent
def test_plot_of_a_file_without_intervals_is_a_clear_error(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text('{"type": "attach"}\n')
    assert cli.main(["plot", str(f), "-o", str(tmp_path / "x.png")]) == 1
    assert "no interval lines" in capfd.readouterr().err


@pytest.mark.kernel_independent
def test_plot_of_a_line_missing_a_field_names_the_line_and_the_field(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    f = tmp_path / "bad.jsonl"
    f.write_text('{"type": "attach"}\n{"type": "interval", "mappings": [{"start": 0}]}\n')
    assert cli.main(["plot", str(f), "-o", str(tmp_path / "x.png")]) == 1
    err = capfd.readouterr().err
    assert f"{f}:2: an interval line without pages, end, path, runs" in err


def test_plot_of_a_missing_file_names_it_without_a_traceback(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["plot", str(missing), "-o", str(tmp_path / "x.png")]) == 1
    assert capfd.readouterr().err == f"pagewatch: {missing}: No such file or directory\n"


def test_plot_into_a_missing_folder_fails_before_reading(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    f = tmp_path / "s.jsonl"
    synthetic(f)
    assert cli.main(["plot", str(f), "-o", str(tmp_path / "no" / "x.png")]) == 1
    assert f"folder {tmp_path / 'no'} does not exist" in capfd.readouterr().err


# ---- arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, complaint", [
    (["record", "-5"], "argument PID: -5 is not above zero"),
    (["record", "0"], "argument PID: 0 is not above zero"),
    (["top", "x"], "argument PID: 'x' is not a whole number"),
    (["record", "1", "--interval", "0"], "--interval: 0 is not a number of seconds above"),
    (["record", "1", "--interval", "nan"], "--interval: nan is not a number of seconds"),
    (["record", "1", "--duration", "-1"], "--duration: -1 is not a number of seconds"),
    (["top", "1", "--rows", "0"], "--rows: 0 is not above zero"),
    (["run", "--top", "-1", "--", "true"], "--top: -1 is not above zero"),
])
def test_a_bad_number_is_refused_before_anything_runs(
        argv: list[str], complaint: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert complaint in capfd.readouterr().err


@needs_tracking
def test_record_into_a_closed_pipe_ends_quietly_like_cat() -> None:
    build("pattern")
    t = pattern_target()
    try:
        t.cmd("addr")
        rec = subprocess.Popen([*PAGEWATCH, "record", str(t.pid), "--interval", "0.05",
                                "-o", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rec.stdout is not None and rec.stderr is not None
        assert '"type":"attach"' in rec.stdout.readline()
        rec.stdout.close()  # `pagewatch record PID | head -1`: the reader is gone
        err = rec.stderr.read()
        assert rec.wait(timeout=300) == 141, err
        assert "Traceback" not in err
        assert t.cmd("w 1 1") == "ok"  # detached, the target goes on
    finally:
        t.close()


def test_a_stop_asked_just_before_a_long_wait_ends_it_within_a_slice() -> None:
    # The handler ran after the loop's last look at `stopping` and before select(2): the
    # wait must still end (it sat out a 600 s interval once, in the 6.12 guest).
    from pagewatch.remote.tree import StopRequest

    stop = StopRequest()
    r, w = os.pipe()
    try:
        stop(signal.SIGINT, None)  # not waiting yet: no _Wake, only `stopping`
        stop.stopping = False      # as if the loop had looked just before
        t0 = time.monotonic()
        timer = threading.Timer(0.05, lambda: setattr(stop, "stopping", True))
        timer.start()              # the flag set while select blocks, with no signal to wake it
        assert stop.select([r], 600) is None
        assert time.monotonic() - t0 < 5 * StopRequest.SLICE + 1
        assert stop.select([r], 0.01) is None  # asked already: no wait at all
        os.write(w, b"x")
        stop.stopping = False
        assert stop.select([r], 600) == [r]
        assert not stop.waiting
    finally:
        os.close(r)
        os.close(w)
