"""``python -m tests.vm [--kernel 6.1 ...] [-- PYTEST ARGS]``: the kernel matrix.

Environment (each overrides the default; command-line options override the environment):

- ``PAGEWATCH_VM_KERNELS=6.1,6.12``  kernels to boot (labels, or paths of a vmlinuz)
- ``PAGEWATCH_VM_HOST=0``            leave out the host column
- ``PAGEWATCH_VM_KVM=auto|0|1``      hardware acceleration (auto: try once, remember)
- ``PAGEWATCH_VM_MEMORY=2G``, ``PAGEWATCH_VM_CPUS=<host CPUs>``, ``PAGEWATCH_VM_TIMEOUT=3600``
  (seconds per VM)
- ``PAGEWATCH_VM_JOBS=2``            VMs booted at once (after the host's run)
- ``PAGEWATCH_VM_CACHE=DIR``         tools, kernels and per-run logs (``~/.cache/pagewatch-vm``)
- ``PAGEWATCH_VM_VERBOSE=1``         show the kernel's console (boot problems)
- ``PAGEWATCH_VM_HOST_REPORT=PATH``  host column from an earlier run with the report plugin
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.vm import BACKENDS, matrix
from tests.vm.kernels import Kernel, PrivateApt, get_kernel
from tests.vm.tools import (
    HarnessError,
    ensure_apt_packages,
    ensure_shim,
    ensure_virtme_ng,
    log,
    qemu_version,
)

REPO = Path(__file__).resolve().parents[2]
PRINT_LOCK = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("PAGEWATCH_VM_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pagewatch-vm"


def stream(cmd: list[str], label: str, logfile: Path, timeout: float,
           env: dict[str, str], cwd: Path) -> tuple[int | None, float, bool]:
    """Run cmd in its own process group, echo its output prefixed with the label, and log it.

    Returns (exit code, seconds, timed out).  On timeout the whole group is ended.
    """
    t0 = time.monotonic()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True,
                                errors="replace", start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lf.write(line)
                with PRINT_LOCK:
                    sys.stdout.write(f"[{label}] {line}")
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        reader.join(timeout=10)
    return rc, time.monotonic() - t0, timed_out


def mpl_config(cache: Path) -> Path:
    """A writable MPLCONFIGDIR shared by host and guests (in the guests' read/write directory).

    In a guest $HOME is read-only, so matplotlib would rebuild its font cache in a temporary
    directory at every start: minutes under TCG.  The host builds it once, the guests reuse it.
    """
    return cache / "runs" / "mplconfig"


def warm_matplotlib(cache: Path) -> None:
    env = dict(os.environ, MPLCONFIGDIR=str(mpl_config(cache)))
    mpl_config(cache).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def guest_env(label: str, cache: Path) -> dict[str, str]:
    """What the test run sees: PAGEWATCH_* (not _VM_*), PYTEST_ADDOPTS and CI are passed on."""
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           "PAGEWATCH_KERNEL_MATRIX": label, "MPLCONFIGDIR": str(mpl_config(cache))}
    for k, v in os.environ.items():
        if ((k.startswith("PAGEWATCH_") and not k.startswith("PAGEWATCH_VM_"))
                or k in ("PYTEST_ADDOPTS", "CI")):
            env.setdefault(k, v)
    return env


class Options(argparse.Namespace):
    kernels: list[str]
    host: bool
    kvm: str
    memory: str
    cpus: int
    timeout: float
    jobs: int
    refresh: bool
    verbose: bool
    json_out: Path
    host_report: Path | None
    pytest_args: list[str]


def vng_cmd(bindir: Path, k: Kernel, opts: Options, use_kvm: bool, out: Path, script: str,
            cpus: int) -> list[str]:
    cmd = [str(bindir / "vng"), "--run", str(k.vmlinuz), "--memory", opts.memory,
           "--cpus", str(cpus), "--user", "root", "--overlay-rwdir", str(REPO),
           "--rwdir", str(out.parent), "--cwd", str(REPO)]
    if not use_kvm:
        cmd.append("--disable-kvm")
    if opts.verbose:
        cmd.append("--verbose")
    return [*cmd, "--exec", script]


def tool_env(bindir: Path) -> dict[str, str]:
    path = os.pathsep.join([str(ensure_shim(bindir)), str(bindir), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path)


def cpu_has_virtualization(text: str | None = None) -> bool:
    """Whether /proc/cpuinfo (or ``text``) names hardware virtualization (vmx, svm)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"vmx", "svm"})
    return False


def choose_accel(opts: Options, cache: Path, bindir: Path, k: Kernel) -> tuple[bool, str]:
    if opts.kvm in ("0", "off", "no"):
        return False, "TCG (PAGEWATCH_VM_KVM=0)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "TCG (no usable /dev/kvm)"
    if opts.kvm in ("1", "on", "yes"):
        return True, "KVM (PAGEWATCH_VM_KVM=1)"
    if not cpu_has_virtualization():
        # Some hosts (PVM) expose /dev/kvm without vmx/svm: qemu then aborts or hangs at boot,
        # which the trial below only learns after its 90 s time-out.
        return False, "TCG (/dev/kvm is there but the CPU flags have neither vmx nor svm)"
    memo = cache / "kvm-check.json"
    key = f"{os.uname().release} | {qemu_version()} | {k.release}"
    try:
        known: dict[str, Any] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        log(f"checking once whether KVM can boot {k.release} here (result kept in {memo})")
        out = cache / "runs" / "kvm-check"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [str(bindir / "vng"), "--run", str(k.vmlinuz), "--memory", "512M", "--user",
               "root", "--exec", "echo pagewatch-kvm-ok"]
        rc, secs, timed_out = stream(cmd, "kvm-check", out / "log", 90, tool_env(bindir),
                                     REPO)
        text = (out / "log").read_text(errors="replace")
        ok = rc == 0 and "pagewatch-kvm-ok" in text
        tail = " / ".join(text.strip().splitlines()[-2:])[-300:]
        known[key] = {"ok": ok, "detail": f"rc={rc} in {secs:.1f} s"
                      + (" (timed out)" if timed_out else "") + (f": {tail}" if tail else "")}
        memo.write_text(json.dumps(known, indent=1))
    res = known[key]
    if res["ok"]:
        return True, "KVM"
    return False, f"TCG (KVM cannot boot these kernels here: {res['detail']})"


def run_host(opts: Options, cache: Path) -> dict[str, Any]:
    out = cache / "runs" / "host"
    cmd = [sys.executable, "-m", "tests.vm.guest", "--label", "host", "--out", str(out)]
    if opts.host_report is not None:
        cmd += ["--report-from", str(opts.host_report)]
        log(f"host: the suite's results from {opts.host_report}, probe and self-check here")
    else:
        log("host: running the suite on this machine's kernel")
    cmd += ["--", *opts.pytest_args]
    env = dict(os.environ, **guest_env("host", cache))
    rc, secs, timed_out = stream(cmd, "host", out.parent / "host.log", opts.timeout, env, REPO)
    col = collect(out, "host", rc, secs, timed_out, out.parent / "host.log")
    col.update(kind="host", release=os.uname().release)
    return col


def run_vm(opts: Options, cache: Path, bindir: Path, k: Kernel, use_kvm: bool,
           cpus: int) -> dict[str, Any]:
    out = cache / "runs" / k.label
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("guest.json", "tests.json"):
        (out / stale).unlink(missing_ok=True)
    env = guest_env(k.label, cache)
    script = ("read -r up _ < /proc/uptime; export "
              + " ".join(f"{n}={shlex.quote(v)}" for n, v in env.items())
              + f"; cd {shlex.quote(str(REPO))} && exec "
              + shlex.join([sys.executable, "-m", "tests.vm.guest", "--label", k.label,
                            "--out", str(out), "--vm"])
              + ' --booted "$up" -- ' + shlex.join(opts.pytest_args))
    cmd = vng_cmd(bindir, k, opts, use_kvm, out, script, cpus)
    log(f"{k.label}: booting {k.release} ({'KVM' if use_kvm else 'TCG'}, {cpus} CPUs, "
        f"{opts.memory})")
    logfile = cache / "runs" / f"{k.label}.log"
    rc, secs, timed_out = stream(cmd, k.label, logfile, opts.timeout, tool_env(bindir), REPO)
    col = collect(out, k.label, rc, secs, timed_out, logfile)
    col.update(kind="vm", expected_release=k.release, package=k.package, version=k.version)
    return col


def collect(out: Path, label: str, rc: int | None, secs: float, timed_out: bool,
            logfile: Path) -> dict[str, Any]:
    col: dict[str, Any] = {"label": label, "wall_seconds": round(secs, 1), "exit": rc,
                           "log": str(logfile), "tests": None}
    try:
        guest = json.loads((out / "guest.json").read_text())
    except (OSError, ValueError) as exc:
        why = f"timed out after {secs:.0f} s" if timed_out else f"exit {rc}"
        col["error"] = (f"the run left no results ({why}; {type(exc).__name__}); see "
                        f"{logfile}, and PAGEWATCH_VM_VERBOSE=1 for the kernel's console")
        return col
    col.update(release=guest["uname"], boot_seconds=guest.get("booted"),
               guest_start_seconds=guest.get("uptime_at_start"),
               soft_dirty=guest.get("soft_dirty"), hugetlb=guest.get("hugetlb"),
               probe=guest.get("probe"), pytest_rc=guest["pytest"]["rc"],
               pytest_seconds=guest["pytest"]["seconds"])
    try:
        report = json.loads((out / "tests.json").read_text())
        col["tests"] = report["tests"]
    except (OSError, ValueError, KeyError) as exc:
        col["error"] = f"pytest left no report ({type(exc).__name__}: {exc}); see {logfile}"
        return col
    col["counts"] = matrix.count(col["tests"])
    col["skip_reasons"] = matrix.skip_reasons(col["tests"])
    return col


def parse(argv: list[str]) -> Options:
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", "-k", action="append", dest="kernels", default=None,
                    help="kernel label (6.1, 6.12) or vmlinuz path; repeat or comma-separate")
    ap.add_argument("--no-host", dest="host", action="store_false",
                    default=env("PAGEWATCH_VM_HOST", "1") not in ("0", "no", "off"))
    ap.add_argument("--kvm", default=env("PAGEWATCH_VM_KVM", "auto"))
    ap.add_argument("--memory", default=env("PAGEWATCH_VM_MEMORY", "2G"))
    ap.add_argument("--cpus", type=int, default=int(env("PAGEWATCH_VM_CPUS", "0")))
    ap.add_argument("--timeout", type=float, default=float(env("PAGEWATCH_VM_TIMEOUT", "3600")))
    ap.add_argument("--jobs", "-j", type=int, default=int(env("PAGEWATCH_VM_JOBS", "2")),
                    help="VMs at once (default 2: most of a TCG guest's time is one busy vCPU)")
    ap.add_argument("--refresh", action="store_true", help="fetch the kernels again")
    ap.add_argument("--verbose", "-v", action="store_true",
                    default=env("PAGEWATCH_VM_VERBOSE", "0") not in ("0", ""))
    ap.add_argument("--host-report", type=Path,
                    default=Path(env("PAGEWATCH_VM_HOST_REPORT", "")) if
                    env("PAGEWATCH_VM_HOST_REPORT") else None,
                    help="host column from this earlier `pytest -p tests.vm.report "
                         "--pagewatch-report=PATH` run instead of running the suite again")
    ap.add_argument("--json", dest="json_out", type=Path,
                    default=REPO / ".cache" / "kernel-matrix.json")
    opts = ap.parse_args(argv, namespace=Options())
    raw = opts.kernels or [env("PAGEWATCH_VM_KERNELS", "6.1,6.12")]
    opts.kernels = [k.strip() for item in raw for k in item.split(",") if k.strip()]
    opts.pytest_args = pytest_args
    if opts.host_report is not None:
        if not opts.host_report.is_file():
            ap.error(f"--host-report {opts.host_report}: no such file")
        opts.host_report = opts.host_report.resolve()
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    cache = cache_dir()
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    kernels: list[Kernel] = []
    accel = "none"
    use_kvm = False
    bindir = Path()
    try:
        if opts.kernels:
            t0 = time.monotonic()
            ensure_apt_packages()
            bindir = ensure_virtme_ng(cache)
            timings["tools"] = time.monotonic() - t0
            t0 = time.monotonic()
            apt = PrivateApt(cache / "apt")
            kernels = [get_kernel(cache, label, apt, opts.refresh) for label in opts.kernels]
            timings["kernels"] = time.monotonic() - t0
            t0 = time.monotonic()
            use_kvm, accel = choose_accel(opts, cache, bindir, kernels[0])
            timings["accel-check"] = time.monotonic() - t0
            log(f"tools {timings['tools']:.1f} s, kernels {timings['kernels']:.1f} s "
                f"({', '.join(f'{k.label}={k.release}' for k in kernels)}); "
                f"accelerator: {accel}")
    except (HarnessError, subprocess.CalledProcessError, OSError) as exc:
        print(f"pagewatch-vm: setup failed: {exc}", file=sys.stderr)
        return 2

    warm_matplotlib(cache)
    columns: list[dict[str, Any]] = []
    if opts.host:
        columns.append(run_host(opts, cache))
    jobs = max(1, min(opts.jobs, len(kernels) or 1))
    cpus = opts.cpus or os.cpu_count() or 1  # SMP guests even side by side: races need it
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        columns += list(pool.map(lambda k: run_vm(opts, cache, bindir, k, use_kvm, cpus),
                                 kernels))

    problems = matrix.guard(columns)
    print()
    short = "KVM" if use_kvm else "TCG" if kernels else "host only"
    print(matrix.render(columns, short, problems))
    if kernels:
        print(f"accelerator: {accel}")
    total = time.monotonic() - t_start
    tot = matrix.totals(columns)
    result = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "accel": short,
              "accel_reason": accel,
              "seconds": round(total, 1), "setup_seconds": {k: round(v, 1)
                                                            for k, v in timings.items()},
              "backends": list(BACKENDS), "totals": tot, "guard_ok": not problems,
              "problems": problems, "kernels": columns}
    opts.json_out.parent.mkdir(parents=True, exist_ok=True)
    opts.json_out.write_text(json.dumps(result, indent=1))
    print(f"\npagewatch-vm: {len(columns)} kernels in {total:.0f} s; matrix written to "
          f"{opts.json_out}")
    print(f"kernel-matrix: {tot['passed']} passed, {tot['failed'] + tot['error']} failed, "
          f"{tot['skipped']} skipped")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
