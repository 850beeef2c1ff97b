"""``pagewatch probe``'s verdict, its checks for tracking other processes, and its exit status
(issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from pagewatch import cli
from pagewatch.backends.base import BackendInfo
from pagewatch.cli import probe as pcli
from pagewatch.kernel.probe import Capability

OK = {"ptrace": Capability(True, "allowed"), "pidfd_getfd": Capability(True, "ok"),
      "seccomp": Capability(True, "none")}


def infos(*available: str) -> list[BackendInfo]:
    names = ["uffd-async", "soft-dirty", "uffd-sync", "mprotect", "compare"]
    return [BackendInfo(n, n in available, "works" if n in available else f"{n} is missing",
                        i, "") for i, n in enumerate(names)]


@pytest.mark.kernel_independent
@pytest.mark.parametrize("available, remote, ok, text", [
    (("uffd-async", "mprotect"), OK, True,
     "pagewatch can track this process with uffd-async, and others with uffd-async"),
    (("mprotect", "compare"), OK, True,
     "pagewatch can track this process only with mprotect (uffd-async: uffd-async is "
     "missing), and not other processes"),
    (("uffd-async",), {**OK, "ptrace": Capability(False, "Yama ptrace_scope=2")}, True,
     "and other processes only where allowed (ptrace: Yama ptrace_scope=2)"),
    ((), OK, False, "pagewatch cannot track memory here: uffd-async: uffd-async is missing"),
])
def test_the_verdict_says_what_pagewatch_can_do_here(
        available: tuple[str, ...], remote: dict[str, Capability], ok: bool, text: str) -> None:
    got_ok, line = pcli.verdict(infos(*available), remote)
    assert got_ok == ok and text in line


@pytest.mark.kernel_independent
def test_probe_exits_1_when_no_backend_works(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(pcli, "backends", lambda: infos())
    assert cli.main(["probe"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("pagewatch cannot track")
    monkeypatch.setattr(pcli, "backends", lambda: infos("compare"))
    assert cli.main(["probe"]) == 0


def test_probe_ends_with_the_verdict_and_lists_what_other_processes_need() -> None:
    r = subprocess.run([sys.executable, "-m", "pagewatch.cli", "probe"], capture_output=True,
                       text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("pagewatch can") or lines[-1].startswith("pagewatch cannot")
    assert r.returncode == (0 if lines[-1].startswith("pagewatch can ") else 1)
    for name in ("ptrace", "pidfd_getfd", "seccomp"):
        assert any(x.strip().startswith(name) for x in lines), name
    j = subprocess.run([sys.executable, "-m", "pagewatch.cli", "probe", "--json"],
                       capture_output=True, text=True, timeout=300)
    d: dict[str, Any] = json.loads(j.stdout)
    assert d["verdict"]["reason"] == lines[-1]
    assert set(d["other_processes"]) == {"ptrace", "pidfd_getfd", "seccomp"}


def test_userfaultfd_says_one_thing_about_kernel_writes() -> None:
    from pagewatch.kernel.probe import probe

    caps = probe()
    if not caps.userfaultfd.available:
        pytest.skip(f"no userfaultfd here: {caps.userfaultfd.reason}")
    reason = caps.userfaultfd.reason
    assert ("kernel-mode faults allowed too" in reason) != ("user-mode faults only" in reason)
    sync = next(b for b in pcli.backends() if b.name == "uffd-sync")
    if sync.available:  # the backend's own word agrees with the probe's
        assert ("kernel writes handled" in sync.reason) == ("kernel-mode faults allowed"
                                                            in reason)
