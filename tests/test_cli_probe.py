"""``pagewatch probe [--json]``: one JSON object, the documented keys, the same answers as
``pagewatch.probe()``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from pagewatch.cli import main
from pagewatch.kernel import probe

REQUIRED = ("kernel", "arch", "page_size", "userfaultfd", "uffd_features", "pagemap_scan",
            "pagemap_scan_categories", "soft_dirty")


def _is_capability(v: Any) -> bool:
    return (isinstance(v, dict) and set(v) >= {"available", "reason"}
            and isinstance(v["available"], bool) and isinstance(v["reason"], str))


@pytest.fixture(scope="module")
def probe_json() -> dict[str, Any]:
    """The command run as a user runs it: a separate process."""
    out = subprocess.run([sys.executable, "-m", "pagewatch.cli", "probe", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert isinstance(doc, dict)
    return doc


def test_probe_json_prints_one_object_with_the_documented_keys(probe_json: dict[str, Any],
                                                               ) -> None:
    for key in REQUIRED:
        assert key in probe_json, key
    assert isinstance(probe_json["kernel"], str) and probe_json["kernel"]
    assert isinstance(probe_json["arch"], str) and probe_json["arch"]
    assert isinstance(probe_json["page_size"], int) and probe_json["page_size"] > 0


def test_probe_json_gives_each_capability_as_available_and_reason(probe_json: dict[str, Any],
                                                                  ) -> None:
    for key in ("userfaultfd", "pagemap_scan", "soft_dirty"):
        assert _is_capability(probe_json[key]), key
    for group in ("uffd_features", "pagemap_scan_categories"):
        assert probe_json[group], group
        for name, cap in probe_json[group].items():
            assert _is_capability(cap), f"{group}.{name}"
    assert "WP_ASYNC" in probe_json["uffd_features"]
    assert "WRITTEN" in probe_json["pagemap_scan_categories"]


def test_probe_json_agrees_with_the_probe_function(probe_json: dict[str, Any]) -> None:
    caps = json.loads(json.dumps(probe().as_dict()))
    for key in REQUIRED:
        assert caps[key] == probe_json[key], key


def test_probe_json_in_process_is_the_same_document(capsys: pytest.CaptureFixture[str],
                                                    probe_json: dict[str, Any]) -> None:
    assert main(["probe", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == set(probe_json)
    for key in REQUIRED:
        if _is_capability(doc[key]):
            assert doc[key]["available"] == probe_json[key]["available"], key


def test_probe_text_says_yes_or_no_with_a_reason_for_each_capability(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 0
    text = capsys.readouterr().out
    caps = probe()
    assert caps.kernel in text
    for label, cap in (("userfaultfd", caps.userfaultfd), ("PAGEMAP_SCAN", caps.pagemap_scan),
                       ("soft-dirty", caps.soft_dirty)):
        line = next(ln for ln in text.splitlines() if ln.startswith(label))
        assert ("yes" if cap.available else "no") in line.split()[1]
        assert cap.reason in line


def test_probe_rejects_an_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["probe", "--bogus"])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err
