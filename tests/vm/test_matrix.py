"""The kernel matrix's own pieces: the report plugin and the guard (no VM needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.vm import BACKENDS, matrix
from tests.vm.__main__ import cpu_has_virtualization

REPO = Path(__file__).resolve().parents[2]

SAMPLE = '''
import pytest

@pytest.mark.backend("soft-dirty")
def test_marked():
    pass

@pytest.mark.parametrize("backend", ["uffd-async", "uffd-sync"])
@pytest.mark.parametrize("size", ["small"])
def test_param(backend, size):
    if backend == "uffd-sync":
        pytest.skip("uffd-sync unavailable here: reason given")

@pytest.mark.parametrize("how", [pytest.param("x", id="mprotect-big"), "compare"])
def test_by_id(how):
    assert how != "compare"

@pytest.fixture
def broken():
    raise RuntimeError("setup breaks")

def test_setup_error(broken):
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
'''


def run_sample(tmp_path: Path) -> dict[str, dict[str, Any]]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.vm.report",
                    f"--pagewatch-report={out}", "-p", "no:cacheprovider",
                    "-W", "ignore::pytest.PytestUnknownMarkWarning",
                    str(tmp_path / "test_sample.py")], cwd=REPO, capture_output=True, check=False)
    data = json.loads(out.read_text())
    assert data["exitstatus"] == 1
    return {t["nodeid"].split("::")[1]: t for t in data["tests"]}


@pytest.mark.kernel_independent
def test_the_report_records_outcome_reason_and_backend(tmp_path: Path) -> None:
    t = run_sample(tmp_path)
    assert (t["test_marked"]["outcome"], t["test_marked"]["backend"]) == ("passed", "soft-dirty")
    assert t["test_param[small-uffd-async]"]["backend"] == "uffd-async"
    skipped = t["test_param[small-uffd-sync]"]
    assert (skipped["outcome"], skipped["backend"]) == ("skipped", "uffd-sync")
    assert skipped["reason"] == "uffd-sync unavailable here: reason given"
    assert t["test_by_id[mprotect-big]"]["backend"] == "mprotect"
    assert (t["test_by_id[compare]"]["outcome"], t["test_by_id[compare]"]["backend"]) == (
        "failed", "compare")
    assert t["test_setup_error"]["outcome"] == "error"
    assert "setup breaks" in t["test_setup_error"]["message"]
    assert t["test_setup_error"]["backend"] is None
    assert (t["test_xfail"]["outcome"], t["test_xfail"]["reason"]) == ("skipped", "xfail: known")


def column(label: str, tests: list[dict[str, Any]], rc: int = 0) -> dict[str, Any]:
    return {"label": label, "release": label, "pytest_rc": rc, "tests": tests,
            "counts": matrix.count(tests), "skip_reasons": matrix.skip_reasons(tests)}


def every_backend_passes(extra: str = "") -> list[dict[str, Any]]:
    return [{"nodeid": f"t::b[{b}]{extra}", "outcome": "passed", "backend": b}
            for b in BACKENDS]


@pytest.mark.kernel_independent
def test_the_guard_passes_a_clean_matrix() -> None:
    cols = [column("host", every_backend_passes()), column("6.12", every_backend_passes())]
    assert matrix.guard(cols) == []


@pytest.mark.kernel_independent
def test_the_guard_names_the_assertion_of_a_long_diff_not_its_closing_bracket() -> None:
    message = ("    def test_x():\n>       assert a == b, 'child0'\n"
               "E   AssertionError: child0\n"
               "E   assert {0, 2, 4} == {0, 2, 4, 6}\n"
               "E     Extra items in the right set:\nE     6\nE     Full diff:\n"
               "E       {\nE         0,\nE       }\n")
    line = matrix.failure_line(message)
    assert line.startswith("AssertionError: child0 | assert {0, 2, 4} == {0, 2, 4, 6}")
    assert "Extra items in the right set: | 6" in line


@pytest.mark.kernel_independent
def test_the_guard_names_a_failure_a_test_skipped_everywhere_and_a_backend_never_run() -> None:
    host = every_backend_passes()
    host[1] = {**host[1], "outcome": "skipped", "reason": "no soft-dirty"}
    host.append({"nodeid": "t::feature", "outcome": "skipped", "reason": "needs X",
                 "backend": None})
    other = [{**t, "outcome": "skipped", "reason": "no soft-dirty"}
             if t["backend"] == "soft-dirty" else t for t in every_backend_passes()]
    other.append({"nodeid": "t::feature", "outcome": "skipped", "reason": "needs X too",
                  "backend": None})
    other.append({"nodeid": "t::broken", "outcome": "failed", "backend": "compare",
                  "message": "E   AssertionError: boom"})
    problems = matrix.guard([column("host", host), column("6.1", other, rc=1)])
    text = "\n".join(problems)
    assert "[6.1] FAILED t::broken: AssertionError: boom" in text
    assert "skipped on every kernel (1 tests): t::feature" in text
    assert "host: needs X; 6.1: needs X too" in text
    assert "backend soft-dirty: no test passed on any kernel" in text
    assert "skipped on every kernel (1 tests): t::b[soft-dirty]" in text


@pytest.mark.kernel_independent
def test_the_guard_wants_what_a_debian_kernel_has_exercised_there() -> None:
    on_61 = [{**t, "outcome": "skipped", "reason": "not built"}
             if t["backend"] == "uffd-sync" else t for t in every_backend_passes()]
    problems = matrix.guard([column("6.1", on_61), column("6.12", every_backend_passes())])
    assert problems == ["[6.1] backend uffd-sync: no test passed on this kernel, which has it "
                        "(not built)"]


@pytest.mark.kernel_independent
def test_the_guard_fails_a_kernel_without_results_or_with_an_abnormal_pytest_exit() -> None:
    ok = column("host", every_backend_passes())
    broken = {"label": "6.12", "error": "the run left no results (exit 255)", "tests": None}
    assert matrix.guard([ok, broken]) == ["[6.12] no results: the run left no results (exit 255)"]
    assert matrix.guard([column("host", every_backend_passes(), rc=2)]) == [
        "[host] pytest exited 2 (interrupted)"]


@pytest.mark.kernel_independent
def test_kvm_is_tried_only_when_the_cpu_flags_name_vmx_or_svm() -> None:
    # This workplace's /dev/kvm (PVM) has neither: the harness then picks TCG at once instead
    # of a 90 s boot trial on every fresh machine.
    flags = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep {} lm constant_tsc\n"
    assert not cpu_has_virtualization("processor\t: 0\n" + flags.format("pge"))
    assert cpu_has_virtualization("processor\t: 0\n" + flags.format("vmx"))
    assert cpu_has_virtualization(flags.format("svm"))
    assert not cpu_has_virtualization("")


def collected(label: str, *args: str) -> set[str]:
    env = {**os.environ, "PAGEWATCH_KERNEL_MATRIX": label}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.splitlines() if "::" in line}


@pytest.mark.kernel_independent
def test_a_one_guest_stress_test_runs_in_its_guest_and_on_the_host_only() -> None:
    kill = ("tests/test_process_kill.py::test_the_monitor_killed_at_each_ptrace_call_of_an_"
            "attach_leaves_the_target_unharmed[tracker-soft-dirty]")
    race = "tests/test_snapshot.py::test_a_write_racing_restore_is_undone_or_reported"
    files = ["tests/test_process_kill.py", "tests/test_snapshot.py"]
    host, old, new = (collected(label, *files) for label in ("host", "6.1", "6.12"))
    assert kill in host and kill in old and kill not in new
    # backends=...: only the named backends' runs are limited to the guest
    for backend in ("mprotect", "compare"):
        node = f"{race}[{backend}-anonymous]"
        assert node in host and node in old and node not in new
    assert f"{race}[uffd-sync-anonymous]" in old and f"{race}[uffd-sync-anonymous]" in new
    # kernel_independent: the host only
    walk = "tests/test_process_kill.py::test_the_fault_walk_covers_every_ptrace_call_strace_sees"
    assert walk in host and walk not in old and walk not in new
