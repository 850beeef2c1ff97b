"""What runs on each kernel of the matrix (inside the VM, or on the host for the host column).

``python -m tests.vm.guest --label 6.1 --out DIR [--vm] [-- PYTEST ARGS]`` checks the kernel
(``uname -r``, whether soft-dirty really works through ``/proc/self/pagemap``, whether hugetlb
pages can be reserved), runs ``pagewatch probe`` (text and ``--json``) and then pytest with the
:mod:`tests.vm.report` plugin.  Everything lands in ``DIR/guest.json`` and ``DIR/tests.json``;
the host judges it.  Exits 0 unless it could not write its results.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAGEMAP_SOFT_DIRTY_BIT = 55


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def soft_dirty_check() -> dict[str, Any]:
    """Clear soft-dirty bits, write a page, read bit 55 of its pagemap entry before and after."""
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, page)
    try:
        m[0] = 1
        cbuf = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(cbuf)
        del cbuf

        def bit() -> bool:
            with open("/proc/self/pagemap", "rb") as f:
                f.seek(addr // page * 8)
                entry = int.from_bytes(f.read(8), "little")
            return bool(entry >> PAGEMAP_SOFT_DIRTY_BIT & 1)

        before = bit()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            return {"works": False, "detail": f"writing 4 to /proc/self/clear_refs: {exc}"}
        after_clear = bit()
        m[0] = 2
        after_write = bit()
    finally:
        m.close()
    works = after_write and not after_clear
    detail = (f"bit 55: {int(before)} after first write, {int(after_clear)} after clear_refs=4, "
              f"{int(after_write)} after a second write")
    return {"works": works, "detail": detail}


def hugetlb_check() -> dict[str, Any]:
    """Reserve four more hugetlb pages, read back how many the kernel gave, restore."""
    path = Path("/proc/sys/vm/nr_hugepages")
    try:
        old = int(path.read_text())
        path.write_text(str(old + 4))
        got = int(path.read_text())
        path.write_text(str(old))
    except (OSError, ValueError) as exc:
        return {"works": False, "detail": f"{path}: {exc}"}
    return {"works": got >= old + 4, "detail": f"nr_hugepages {old} -> {got} -> {old}"}


def swap_on() -> dict[str, Any]:
    """Turn on 256 MiB of swap on zram, so tests can swap pages out (``MADV_PAGEOUT``); only
    in the throw-away VM."""
    if len(Path("/proc/swaps").read_text().splitlines()) > 1:
        return {"works": True, "detail": "swap was on already"}
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    try:
        for cmd in (["modprobe", "zram"], None, ["mkswap", "/dev/zram0"],
                    ["swapon", "/dev/zram0"]):
            if cmd is None:
                Path("/sys/block/zram0/disksize").write_text("256M")
                continue
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PATH": path})
    except subprocess.CalledProcessError as exc:
        return {"works": False, "detail": f"{' '.join(exc.cmd)}: {exc.stderr.strip()}"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"works": False, "detail": f"zram swap: {exc}"}
    return {"works": True, "detail": "256 MiB of swap on /dev/zram0"}


def _pagewatch_cmd() -> list[str]:
    script = Path(sys.executable).parent / "pagewatch"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pagewatch.cli"]


def run_probe() -> dict[str, Any]:
    """``pagewatch probe`` and ``pagewatch probe --json``; absence or failure is recorded."""
    result: dict[str, Any] = {"command": " ".join([*_pagewatch_cmd(), "probe"])}
    procs: dict[str, subprocess.Popen[str]] = {}
    for key, extra in (("text", []), ("json", ["--json"])):  # side by side: Python is slow here
        try:
            procs[key] = subprocess.Popen([*_pagewatch_cmd(), "probe", *extra], text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            result[key] = {"rc": None, "error": str(exc)}
    for key, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            result[key] = {"rc": None, "error": str(exc)}
            continue
        entry: dict[str, Any] = {"rc": proc.returncode, "stdout": stdout[-20000:],
                                 "stderr": stderr[-4000:]}
        if key == "json" and proc.returncode == 0:
            try:
                entry["data"] = json.loads(stdout)
            except ValueError as exc:
                entry["error"] = f"not JSON: {exc}"
        result[key] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vm.guest")
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--vm", action="store_true", help="running inside a throw-away VM")
    ap.add_argument("--booted", type=float, default=None,
                    help="/proc/uptime when the VM's shell started (boot time)")
    ap.add_argument("--report-from", type=Path, default=None,
                    help="take the tests from this earlier tests.vm.report JSON, run no pytest")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("guest.json", "tests.json"):
        (out / stale).unlink(missing_ok=True)

    info: dict[str, Any] = {
        "label": args.label,
        "uname": os.uname().release,
        "in_vm": args.vm,
        "booted": args.booted,
        "uptime_at_start": _uptime(),
        "python": sys.version.split()[0],
        "root_mount": next((ln for ln in Path("/proc/mounts").read_text().splitlines()
                            if ln.split()[1:2] == ["/"]), ""),
        "nproc": os.cpu_count(),
    }
    print(f"pagewatch-vm[{args.label}]: uname -r = {info['uname']}; shell up at "
          f"{info['booted']} s, Python at {info['uptime_at_start']} s", flush=True)
    info["soft_dirty"] = soft_dirty_check()
    info["hugetlb"] = hugetlb_check() if args.vm else {"works": None, "detail": "not tried on host"}
    info["swap"] = swap_on() if args.vm else {"works": None, "detail": "not turned on on host"}
    print(f"pagewatch-vm[{args.label}]: swap: {info['swap']['detail']}", flush=True)
    print(f"pagewatch-vm[{args.label}]: soft-dirty via /proc/self/pagemap: "
          f"{'works' if info['soft_dirty']['works'] else 'does not work'} "
          f"({info['soft_dirty']['detail']}); hugetlb: {info['hugetlb']['detail']}", flush=True)

    t0 = time.monotonic()
    info["probe"] = run_probe()
    info["probe_seconds"] = round(time.monotonic() - t0, 2)
    text = info["probe"].get("text", {})
    print(f"pagewatch-vm[{args.label}]: $ {info['probe']['command']}  (rc={text.get('rc')})",
          flush=True)
    print((text.get("stdout") or "") + (text.get("stderr") or text.get("error") or ""),
          flush=True)

    report = out / "tests.json"
    if args.report_from is not None:
        data = json.loads(args.report_from.read_text())
        report.write_text(json.dumps(data, indent=1))
        rc = int(data["exitstatus"])
        info["pytest"] = {"rc": rc, "seconds": data.get("seconds"),
                          "args": [f"(earlier run: {args.report_from})"]}
        print(f"pagewatch-vm[{args.label}]: tests taken from {args.report_from}: "
              f"{len(data['tests'])} tests, pytest exit {rc}", flush=True)
    else:
        # pytest-timeout guards against hangs: 300 s per test on the host, 1200 s here,
        # where emulation is 5-10x slower and a loaded 2-core host slows it 2-3x more (a
        # kill walk took 175 s at load 12, over 300 s at load 20)
        cmd = [sys.executable, "-m", "pytest", "-p", "tests.vm.report",
               f"--pagewatch-report={report}", "-p", "no:cacheprovider", "-q", "-rfE",
               "--timeout=1200", *pytest_args]
        print(f"pagewatch-vm[{args.label}]: $ {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        info["pytest"] = {"rc": rc, "seconds": round(time.monotonic() - t0, 2),
                          "args": cmd[1:]}
    info["uptime_at_end"] = _uptime()
    tmp = out / "guest.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out / "guest.json")
    print(f"pagewatch-vm[{args.label}]: pytest rc={rc} in {info['pytest']['seconds']} s",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
