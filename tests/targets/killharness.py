"""Kill the monitor of a target, again and again, and check that the target never notices.

Run as ``python -m tests.targets.killharness KIND MODE COUNT`` (tests/test_process_kill.py
does); prints one JSON object: ``kills`` (signals delivered to a monitor), ``harmed`` (one line
per harmed target, the test wants none), ``not_started``, ``calls`` (ptrace calls walked).

KIND is what monitors the target (the ``steady`` program of tests/targets/steady.c):
``tracker`` (a forked process creating a ``ProcessTracker``), ``record`` (``pagewatch
record PID``), ``run`` (``pagewatch run -- steady``).  MODE:

``walk`` (``group-walk``: SIGKILL to the monitor's process group)
    deterministic: the monitor is killed (SIGKILL) right before the N-th ptrace call of the
    process doing the attach (the helper: ``PAGEWATCH_TEST_FAULT=N``), for N = 1, 2, ...
    until a monitor gets through; COUNT repeats the walk.
``strace``
    the same walk with strace fault injection (``strace -f -e
    inject=ptrace:signal=SIGKILL:when=N``), for attaches whose ptrace calls the monitor makes
    itself (the soft-dirty freeze).
``random``
    COUNT monitors killed at random instants of their start and attach, by SIGKILL, SIGTERM,
    SIGINT (to the monitor) and SIGKILL to the monitor's process group, in turn.

This process is a child subreaper: a helper the dead monitor leaves behind, and the target of
``run``, become its children, so it waits for the helpers to finish and reads the target's exit
status itself.  A target counts as harmed unless, once no helper is left: it runs, untraced,
its SigBlk is what it set, it holds no userfaultfd (nor pidfd), and at the end it prints "ok"
and exits with status 3.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pagewatch  # noqa: F401  (imported once: a forked tracker monitor starts at once)
from tests.targets.common import build

#: the target blocks SIGUSR2 (12) and SIGWINCH (28)
SIGBLK = (1 << (signal.SIGUSR2 - 1)) | (1 << (signal.SIGWINCH - 1))
BOUND = 120.0  # s: generous bound for anything to happen (TCG guests are slow)
PAGEWATCH = str(Path(sys.executable).with_name("pagewatch"))


def _children() -> set[int]:
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
        except OSError:
            pass
    return out


def _children_of(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
    except OSError:
        pass
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _reap(pid: int) -> int | None:
    """Wait for child ``pid`` (bounded); its wait status, or None if it is not ours."""
    end = time.monotonic() + BOUND
    while True:
        try:
            got, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got:
            return st
        if time.monotonic() > end:
            raise RuntimeError(f"process {pid} ({_comm(pid)}) did not end in {BOUND:g} s")
        time.sleep(0.002)


def _settle(targets: set[int]) -> None:
    """Wait until every child but the targets (helpers left by a dead monitor, a `run`
    child that never executed) has ended; a child that became ``steady`` is a target."""
    end = time.monotonic() + BOUND
    while True:
        others = {p for p in _children() - targets}
        pending = False
        for p in others:
            if _comm(p) == "steady":
                continue
            try:
                got, _ = os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                continue
            pending = pending or not got
        if not pending:
            return
        if time.monotonic() > end:
            raise RuntimeError(f"helpers still running after {BOUND:g} s: " + "; ".join(
                f"{p} {_comm(p)} {_status(p).get('State')} traced by "
                f"{_status(p).get('TracerPid')}" for p in _children()))
        time.sleep(0.002)


def _readline(fd: int) -> str:
    """One line from a pipe, read byte by byte (bounded); '' at EOF."""
    out = b""
    end = time.monotonic() + BOUND
    while not out.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            raise RuntimeError(f"no line from the target in {BOUND:g} s (got {out!r})")
        b = os.read(fd, 1)
        if not b:
            break
        out += b
    return out.decode().strip()


class Target:
    """One steady target: its pid, its output pipe and input pipe."""

    def __init__(self, pid: int, out_fd: int, in_fd: int) -> None:
        self.pid, self.out_fd, self.in_fd = pid, out_fd, in_fd

    def check_running(self) -> str | None:
        """Why the (still running) target is harmed, or None."""
        st = _status(self.pid)
        if not st:
            return "gone"
        if st.get("State", "")[:1] in "tTZX":
            return f"state {st.get('State')}"
        if st.get("TracerPid") != "0":
            return f"still traced by {st.get('TracerPid')}"
        if int(st.get("SigBlk", "0"), 16) != SIGBLK:
            return f"SigBlk {st.get('SigBlk')} (want {SIGBLK:016x})"
        try:
            fds = os.listdir(f"/proc/{self.pid}/fd")
            links = [os.readlink(f"/proc/{self.pid}/fd/{fd}") for fd in fds]
        except OSError as exc:
            return f"fds unreadable: {exc}"
        ours = [x for x in links if "userfaultfd" in x or "pidfd" in x]
        if ours:
            return f"holds {ours}"
        return None

    def finish(self, status: int | None) -> str | None:
        """Ask it to end; why it is harmed (its output and status), or None.  ``status``:
        its wait status if someone else reaped it already."""
        try:
            os.write(self.in_fd, b"exit\n")
        except BrokenPipeError:
            pass
        line = _readline(self.out_fd)
        if status is None:
            status = _reap(self.pid)
        code = None if status is None else os.waitstatus_to_exitcode(status)
        if not line.startswith("ok") or code not in (3, None):
            return f"output {line!r}, exit code {code}"
        return None

    def close(self) -> None:
        for fd in (self.out_fd, self.in_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _spawn_target(steady: str) -> Target:
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.closerange(3, 1024)
            os.execv(steady, [steady])
        finally:
            os._exit(127)
    os.close(out_w)
    os.close(in_r)
    t = Target(pid, out_r, in_w)
    line = _readline(out_r)
    if not line.startswith("ready"):
        raise RuntimeError(f"target did not start: {line!r}")
    return t


# ---- the monitors ------------------------------------------------------------------------

def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PAGEWATCH_TEST_FAULT", None)
    if fault:
        env["PAGEWATCH_TEST_FAULT"] = fault
    return env


def _tracker_monitor(pid: int, fault: str | None, own_pg: bool) -> tuple[int, int]:
    """Fork a process that attaches a ProcessTracker to ``pid``, writes its attach info as a
    JSON line to the returned pipe, and exits 0."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if own_pg:
                os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ.pop("PAGEWATCH_TEST_FAULT", None)
            if fault:
                os.environ["PAGEWATCH_TEST_FAULT"] = fault
            import pagewatch
            t = pagewatch.ProcessTracker(pid)
            info = {k: v for k, v in t.attach_info.items() if isinstance(v, (int, float))}
            os.write(w, (json.dumps(info) + "\n").encode())
            t.close()
        finally:
            os._exit(0)
    os.close(w)
    if own_pg:
        try:
            os.setpgid(child, child)
        except OSError:
            pass
    return child, r


def _cli(argv: list[str], fault: str | None, own_pg: bool, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=_env(fault), start_new_session=own_pg,
                            stderr=subprocess.DEVNULL, **kw)


class Harness:
    def __init__(self, kind: str, backend: str) -> None:
        self.kind, self.backend = kind, backend
        self.steady = str(build("steady"))
        self.kills = 0
        self.harmed: list[str] = []
        self.not_started = 0
        self.survived = 0
        self.stop_ms: list[float] = []
        self._tracers: list[subprocess.Popen[bytes]] = []
        self.t_ready = 0.0  # run: seconds from the fork of its child to the child's first line

    # One trial: start, maybe kill (fault: PAGEWATCH_TEST_FAULT or a strace argv prefix; sig:
    # a signal sent after `delay` s), check.  Returns True if the monitor got through unkilled.
    def trial(self, *, fault: str | None = None, strace_n: int = 0, sig: int = 0,
              delay: float = 0.0, own_pg: bool = False, label: str = "") -> bool:
        if self.kind == "run":
            return self._trial_run(fault, strace_n, sig, delay, label)
        target = _spawn_target(self.steady)
        try:
            return self._trial_attach(target, fault, strace_n, sig, delay, own_pg, label)
        finally:
            target.close()
            if _status(target.pid):
                os.kill(target.pid, signal.SIGKILL)
                _reap(target.pid)

    def _under_strace(self, argv: list[str], n: int) -> subprocess.Popen[bytes]:
        """Start the monitor (``argv``: a pagewatch command line, or one that makes a
        ProcessTracker of the pid it ends with) and let it wait once its
        imports are done; attach strace (its fault injection: SIGKILL at the monitor's n-th
        ptrace call) and let it go.  strace follows only what comes next, not the thousands
        of system calls of an interpreter's start (minutes under emulation; and
        --seccomp-bpf, which would spare them, breaks strace 6.1's when=N count)."""
        strace = shutil.which("strace")
        assert strace, "strace is needed (apt-get install strace)"
        if argv[0] == PAGEWATCH:  # the CLI: its arguments after the wait
            code = ("import sys\nfrom pagewatch.cli import main\nprint('go?', flush=True)\n"
                    "sys.stdin.readline()\nsys.exit(main(sys.argv[1:]))")
            args = argv[1:]
        else:  # a ProcessTracker of the pid that ends argv
            code = ("import sys, pagewatch\nprint('go?', flush=True)\nsys.stdin.readline()\n"
                    f"pagewatch.ProcessTracker(int(sys.argv[1]), backend={self.backend!r})"
                    ".close()")
            args = [argv[-1]]
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=_env(None))
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline() != b"go?\n":
            raise RuntimeError("the monitor did not start")
        tracer = subprocess.Popen([strace, "-f", "-qq", "-o", os.devnull, "-p", str(proc.pid),
                                   "-e", "trace=ptrace", "-e",
                                   f"inject=ptrace:signal=SIGKILL:when={n}"],
                                  stderr=subprocess.DEVNULL)
        self._tracers.append(tracer)
        end = time.monotonic() + BOUND
        while _status(proc.pid).get("TracerPid", "0") == "0":
            if time.monotonic() > end or tracer.poll() is not None:
                raise RuntimeError("strace did not attach")
            time.sleep(0.002)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        return proc

    def _harm(self, label: str, why: str | None) -> None:
        if why:
            self.harmed.append(f"{self.kind} {label}: {why}")

    def _trial_attach(self, target: Target, fault: str | None, strace_n: int, sig: int,
                      delay: float, own_pg: bool, label: str) -> bool:
        info_fd = -1
        if self.kind == "tracker" and not strace_n:
            mon, info_fd = _tracker_monitor(target.pid, fault, own_pg)
            proc = None
        else:
            if self.kind == "tracker":
                argv = [sys.executable, "-c", "import sys, pagewatch; pagewatch.ProcessTracker("
                        f"int(sys.argv[1]), backend={self.backend!r}).close()", str(target.pid)]
            else:
                argv = [PAGEWATCH, "record", str(target.pid), "--interval", "60",
                        "--duration", "0.05", "-o", os.devnull, "--backend", self.backend]
            proc = (self._under_strace(argv, strace_n) if strace_n else
                    _cli(argv, fault, own_pg))
            mon = proc.pid
        if sig:
            time.sleep(delay)
            try:
                if own_pg:
                    os.killpg(mon, sig)
                else:
                    os.kill(mon, sig)
                self.kills += 1
            except ProcessLookupError:
                pass
        st = _reap(mon) if proc is None else proc.wait(BOUND)
        for tracer in self._tracers:  # strace ends with its tracee
            tracer.wait(BOUND)
        self._tracers.clear()
        code = os.waitstatus_to_exitcode(st) if proc is None and st is not None else st
        if info_fd >= 0:
            with os.fdopen(info_fd) as f:
                line = f.read().strip()
            if line and not sig:
                self.stop_ms.append(json.loads(line).get("stop_ms", 0.0))
        # A SIGINT before the monitor set its handlers ends its interpreter with a
        # KeyboardInterrupt: status 1.
        if code not in (0, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130, 143) and \
                not (sig == signal.SIGINT and code == 1):
            raise RuntimeError(f"the monitor failed (exit code {code}) at {label}")
        if (fault or strace_n) and code == -signal.SIGKILL:
            self.kills += 1
        _settle({target.pid})
        self._harm(label, target.check_running())
        self._harm(label, target.finish(None))
        return code == 0

    def _trial_run(self, fault: str | None, strace_n: int, sig: int, delay: float,
                   label: str) -> bool:
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        argv = [PAGEWATCH, "run", "--interval", "60", "-o", os.devnull, "--backend",
                self.backend, "--", self.steady]
        proc = _cli(argv, fault, False, stdin=in_r, stdout=out_w)
        os.close(out_w)
        os.close(in_r)
        target = None
        try:
            # The interpreter's start-up takes 0.3-1 s (more under load): count from the
            # fork of the child, which the attach at its exec follows closely.
            end = time.monotonic() + BOUND
            while not _children_of(proc.pid) and proc.poll() is None:
                if time.monotonic() > end:
                    raise RuntimeError("pagewatch run started no child")
                time.sleep(0.001)
            t_fork = time.monotonic()
            if sig:
                time.sleep(delay)
                try:
                    os.kill(proc.pid, sig)
                    self.kills += 1
                except ProcessLookupError:
                    pass
            line = _readline(out_r)
            if not sig and not fault and not strace_n:
                self.t_ready = time.monotonic() - t_fork
            if not line.startswith("ready"):  # the monitor died before the exec
                proc.wait(BOUND)
                _settle(set())
                self.not_started += 1
                self.kills += bool(fault or strace_n)
                return False
            target = Target(int(line.split()[1]), out_r, in_w)
            if sig and sig != signal.SIGINT:  # run ignores SIGINT, as time(1) does
                proc.wait(BOUND)
            if proc.poll() is not None:
                # Killed before the release, or by `sig`: the target runs on alone.
                self.kills += bool(fault or strace_n)
                _settle({target.pid})
                self._harm(label, target.check_running())
                self._harm(label, target.finish(None))
                return False
            # Alive: a fault, if any, fires at the exit stop, after this line.
            os.write(in_w, b"exit\n")
            line = _readline(out_r)
            code = proc.wait(BOUND)
            if code == 3:
                if not line.startswith("ok"):
                    self._harm(label, f"output {line!r}")
                return True
            self.kills += bool(fault or strace_n)
            _settle({target.pid})
            status = _reap(target.pid)
            tcode = None if status is None else os.waitstatus_to_exitcode(status)
            if not line.startswith("ok") or tcode not in (3, None):
                self._harm(label, f"output {line!r}, exit code {tcode} (monitor {code})")
            return False
        finally:
            for fd in (out_r, in_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if target is not None and _status(target.pid):
                os.kill(target.pid, signal.SIGKILL)
                _reap(target.pid)

    # ---- modes ----

    def walk(self, repeats: int, use_strace: bool, group: bool = False, stride: int = 1) -> int:
        """Kill at every ptrace call of one attach, N = 1.. until a monitor gets through;
        returns the number of ptrace calls walked.  ``group``: SIGKILL to the monitor's
        process group (the monitor in a group of its own).  ``stride``: every stride-th call
        only (1, 1 + stride, ...), for slow machines."""
        calls = 0
        for _ in range(repeats):
            n = 1
            while True:
                done = (self.trial(strace_n=n, label=f"strace N={n}") if use_strace else
                        self.trial(fault=f"{n}:{int(signal.SIGKILL)}:pg", own_pg=True,
                                   label=f"N={n} to group") if group else
                        self.trial(fault=str(n), label=f"N={n}"))
                if done:
                    break
                n += stride
                if n > 500:
                    raise RuntimeError("the walk does not end")
            # The last call: the first surviving N follows it (stride 1) or lies up to
            # stride - 1 past it.
            calls = n - 1 if stride == 1 else n - stride
        return calls

    def random(self, count: int, seed: int) -> None:
        rng = random.Random(seed)
        # How long a monitor takes, start to end, when left alone: kills land in [0, that].
        t0 = time.monotonic()
        self.trial(label="calibration")
        span = time.monotonic() - t0
        kinds: list[tuple[int, bool]] = [(signal.SIGKILL, False), (signal.SIGTERM, False),
                                         (signal.SIGINT, False)]
        if self.kind != "run":  # run's child shares the monitor's group: a group kill is its
            kinds.append((signal.SIGKILL, True))  # user's kill of it, not ours to survive
        for i in range(count):
            sig, pg = kinds[i % len(kinds)]
            # run: from the fork of its child (the exec and the attach follow) to a bit past
            # the target's first line in the calibration.
            delay = rng.uniform(0, 1.5 * self.t_ready) if self.kind == "run" else \
                rng.uniform(0, span)
            self.trial(sig=sig, delay=delay, own_pg=pg,
                       label=f"random #{i} {signal.Signals(sig).name}{' to group' if pg else ''}"
                       f" after {delay * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["tracker", "record", "run"])
    ap.add_argument("mode", choices=["walk", "group-walk", "strace", "random"])
    ap.add_argument("count", type=int)
    ap.add_argument("--backend", default="uffd-async")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stride", type=int, default=1)
    a = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "PR_SET_CHILD_SUBREAPER")
    h = Harness(a.kind, a.backend)
    calls = 0
    if a.mode == "random":
        h.random(a.count, a.seed)
    else:
        calls = h.walk(a.count, a.mode == "strace", a.mode == "group-walk", a.stride)
    print(json.dumps({"kind": a.kind, "mode": a.mode, "backend": a.backend, "kills": h.kills,
                      "harmed": h.harmed, "not_started": h.not_started, "calls": calls,
                      "stop_ms": h.stop_ms}))


if __name__ == "__main__":
    main()
