"""``pagewatch probe`` and ``pagewatch backends``: what this machine offers."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import BackendInfo
    from ..kernel.probe import Capabilities, Capability


def probe() -> Capabilities:
    """:func:`pagewatch.kernel.probe.probe`, imported when a command runs (not for --help)."""
    from ..kernel.probe import probe

    return probe()


def backends() -> list[BackendInfo]:
    """:func:`pagewatch.backends.base.backends`, imported when a command runs."""
    from ..backends.base import backends

    return backends()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "probe", help="test every kernel feature pagewatch can use, and say which work",
        description="Try every feature pagewatch can use (never judged by the kernel version "
        "alone), say why each 'no', what tracking other processes needs here, and end with "
        "a verdict.  Exit status 1 when no backend works.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_probe)
    b = sub.add_parser("backends", help="list the tracking backends and which work here")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=run_backends)


def _mark(c: Capability) -> str:
    return "yes" if c.available else "no "


def _status() -> dict[str, str]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def other_processes() -> dict[str, Capability]:
    """What tracking another process needs, each with whether this process has it and why:
    ``ptrace`` (permission: Yama scope, CAP_SYS_PTRACE), ``pidfd_getfd`` (taking the
    target's userfaultfd), ``seccomp`` (whether this process itself runs under a filter)."""
    import os

    from .. import _native
    from ..kernel.probe import Capability

    status = _status()
    cap = bool(int(status.get("CapEff", "0"), 16) >> 19 & 1)
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope: int | None = int(f.read())
    except (OSError, ValueError):
        scope = None
    who = "with CAP_SYS_PTRACE" if cap else f"as uid {os.getuid()} without CAP_SYS_PTRACE"
    if scope is None:
        ptrace = Capability(True, f"no Yama: any process of the same user may be traced ({who})")
    elif scope == 3:
        ptrace = Capability(False, "Yama ptrace_scope=3: no process may be traced by anyone "
                            "until reboot")
    elif cap:
        ptrace = Capability(True, f"Yama ptrace_scope={scope}, and this process has "
                            "CAP_SYS_PTRACE: any process may be traced")
    elif scope == 0:
        ptrace = Capability(True, f"Yama ptrace_scope=0: processes of uid {os.getuid()} may "
                            "be traced (others need root or CAP_SYS_PTRACE)")
    elif scope == 1:
        ptrace = Capability(False, "Yama ptrace_scope=1: only descendants (pagewatch run, "
                            "record -- CMD) may be traced without CAP_SYS_PTRACE; for --pid: "
                            "sudo, or sysctl kernel.yama.ptrace_scope=0")
    else:
        ptrace = Capability(False, f"Yama ptrace_scope={scope}: only with CAP_SYS_PTRACE "
                            "(run as root)")
    try:
        pidfd = os.pidfd_open(os.getpid())
        try:
            os.close(_native.pidfd_getfd(pidfd, 0, 0))
            getfd = Capability(True, "pidfd_getfd(2) took a descriptor (Linux 5.6+)")
        finally:
            os.close(pidfd)
    except OSError as exc:
        import errno

        why = ("this kernel has no pidfd_getfd(2) (Linux 5.6+)" if exc.errno == errno.ENOSYS
               else f"pidfd_getfd(2) failed: {exc.strerror}")
        getfd = Capability(False, why + ": uffd-async cannot take a target's userfaultfd "
                           "(soft-dirty needs none)")
    mode = status.get("Seccomp", "?")
    if mode == "0":
        seccomp = Capability(True, "this process runs under no seccomp filter")
    elif mode == "?":
        seccomp = Capability(True, "unknown (no Seccomp line in /proc/self/status)")
    else:
        filters = status.get("Seccomp_filters", "?")
        seccomp = Capability(mode != "1", f"this process runs under seccomp mode {mode} "
                             f"({filters} filter(s), as in a container): the answers above "
                             "were found under it; a filter refusing ptrace(2), "
                             "pidfd_getfd(2) or userfaultfd(2) shows there")
    return {"ptrace": ptrace, "pidfd_getfd": getfd, "seccomp": seccomp}


def verdict(infos: list[Any], remote: dict[str, Capability]) -> tuple[bool, str]:
    """One line, as ``criu check`` ends: what pagewatch can do here; False: nothing."""
    works = [b for b in infos if b.available]
    if not works:
        return False, ("pagewatch cannot track memory here: " +
                       "; ".join(f"{b.name}: {b.reason}" for b in infos))
    best = works[0]
    by_name = {b.name: b for b in infos}
    here = (f"this process with {best.name}" if best.name == infos[0].name else
            f"this process only with {best.name} ({infos[0].name}: {infos[0].reason})")
    blockers = [f"{k}: {c.reason}" for k, c in remote.items() if not c.available]
    remote_backends = [n for n in ("uffd-async", "soft-dirty")
                       if n in by_name and by_name[n].available
                       and (n != "uffd-async" or remote["pidfd_getfd"].available)]
    if not remote_backends:
        others = "not other processes (neither uffd-async nor soft-dirty works here)"
    elif blockers:
        others = f"other processes only where allowed ({'; '.join(blockers)})"
    else:
        others = f"others with {remote_backends[0]}"
    return True, f"pagewatch can track {here}, and {others}"


def run_probe(args: argparse.Namespace) -> int:
    caps = probe()
    infos = backends()
    remote = other_processes()
    ok, line = verdict(infos, remote)
    if args.json:
        d = caps.as_dict()
        d["backends"] = {b.name: {"available": b.available, "reason": b.reason}
                         for b in infos}
        d["other_processes"] = {k: c.as_dict() for k, c in remote.items()}
        d["verdict"] = {"available": ok, "reason": line}
        print(json.dumps(d, indent=2))
        return 0 if ok else 1
    lines = [
        f"kernel       {caps.kernel} ({caps.arch}), page size {caps.page_size}",
        f"userfaultfd  {_mark(caps.userfaultfd)}  {caps.userfaultfd.reason}",
    ]
    for name in ("WP_ASYNC", "WP_UNPOPULATED", "WP_HUGETLBFS_SHMEM", "PAGEFAULT_FLAG_WP"):
        c = caps.uffd_features[name]
        lines.append(f"  {name:<19} {_mark(c)}  {c.reason}")
    lines.append(f"PAGEMAP_SCAN {_mark(caps.pagemap_scan)}  {caps.pagemap_scan.reason}")
    for name, c in caps.pagemap_scan_categories.items():
        lines.append(f"  PAGE_IS_{name:<11} {_mark(c)}  {c.reason}")
    lines.append(f"async WP     {_mark(caps.uffd_wp_async)}  {caps.uffd_wp_async.reason}")
    lines.append(f"soft-dirty   {_mark(caps.soft_dirty)}  {caps.soft_dirty.reason}")
    lines.append(f"THP          {caps.thp}; hugetlb pages reserved: {caps.hugetlb_pages}")
    lines.append("backends (best first):")
    for b in infos:
        lines.append(f"  {b.name:<11} {'yes' if b.available else 'no '}  {b.reason}")
    lines.append("other processes:")
    for name, c in remote.items():
        lines.append(f"  {name:<11} {_mark(c)}  {c.reason}")
    lines.append(line)
    print("\n".join(lines))
    return 0 if ok else 1


def run_backends(args: argparse.Namespace) -> int:
    infos = backends()
    if args.json:
        print(json.dumps([{"name": b.name, "available": b.available, "reason": b.reason,
                           "summary": b.summary} for b in infos], indent=2))
        return 0
    for b in infos:
        print(f"{b.name:<11} {'yes' if b.available else 'no '}  {b.summary}\n"
              f"{'':<16}{b.reason}")
    return 0
