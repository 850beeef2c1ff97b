"""The Python API's conventions (issue 14): errors as psutil's, one meaning per name, what a
user receives is exported, py.typed, messages built from type names."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest

import pagewatch as pw
from pagewatch import errors


@pytest.mark.kernel_independent
@pytest.mark.parametrize("exc", [
    pw.PagewatchError("x", 5),
    pw.PagewatchError("no errno"),
    pw.Unsupported("uffd-async", "too old", "use soft-dirty", 38),
    pw.PermissionDenied("ptrace refused", 1, pid=42),
    pw.InvalidRange("empty"),
    pw.TargetGone("process 42 has exited", 3, pid=42),
    pw.TargetExec("process 42 executed a new program", pid=42),
])
def test_every_error_survives_pickling_with_its_message_errno_and_pid(
        exc: pw.PagewatchError) -> None:
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc) and again.errno == exc.errno
    assert getattr(again, "pid", None) == getattr(exc, "pid", None)
    if isinstance(exc, pw.Unsupported):
        assert (again.feature, again.reason, again.hint) == (exc.feature, exc.reason, exc.hint)


@pytest.mark.kernel_independent
def test_errors_show_as_pagewatch_names_and_print_what_they_were_given() -> None:
    for cls in (pw.PagewatchError, pw.Unsupported, pw.PermissionDenied, pw.InvalidRange,
                pw.TargetGone, pw.TargetExec):
        assert cls.__module__ == "pagewatch" and getattr(pw, cls.__name__) is cls
    e = pw.PagewatchError("x", 5)
    assert str(e) == "x [errno 5: EIO]" and e.errno == 5 and e.message == "x"
    assert repr(e) == "pagewatch.PagewatchError('x', errno=5)"
    assert repr(pw.TargetGone("gone", pid=7)) == "pagewatch.TargetGone('gone', pid=7)"
    assert isinstance(pw.TargetGone("gone"), OSError) and pw.TargetGone("gone").pid is None


@pytest.mark.kernel_independent
def test_what_users_receive_is_exported_and_typed() -> None:
    from pagewatch.process import SkippedMapping, TargetExec

    assert pw.SkippedMapping is SkippedMapping and pw.TargetExec is TargetExec
    assert set(pw.__all__) <= set(dir(pw))
    for name in pw.__all__:
        assert getattr(pw, name) is not None
    assert (Path(pw.__file__).parent / "py.typed").exists()
    assert errors.__all__  # the module of the errors is still importable by its name


@pytest.mark.kernel_independent
def test_pagewatch_backends_is_the_subpackage_and_list_backends_the_function() -> None:
    import pagewatch.backends as b

    assert isinstance(b.BACKENDS, dict) and "uffd-async" in b.BACKENDS
    names = [x.name for x in pw.list_backends()]
    assert sorted(names) == sorted(b.BACKENDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [x.name for x in pw.backends()] == names  # the old call still works
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


@pytest.mark.kernel_independent
@pytest.mark.parametrize("target, text", [
    (b"abc", "this bytes object is read-only"),
    (bytearray(), "this bytearray object is empty"),
    (5, "cannot track an int object"),
])
def test_messages_built_from_a_type_name_read_as_english(target: object, text: str) -> None:
    with pytest.raises((TypeError, pw.InvalidRange)) as exc:
        pw.Tracker(target)  # type: ignore[arg-type]
    assert text in str(exc.value)


def test_an_error_about_a_process_carries_its_pid() -> None:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(pw.TargetGone) as exc:
        pw.ProcessTracker(p.pid)
    assert exc.value.pid == p.pid
    assert pickle.loads(pickle.dumps(exc.value)).pid == p.pid


@pytest.mark.kernel_independent
def test_len_counts_what_the_documentation_says_and_process_dirty_pages_warns() -> None:
    import numpy as np

    from pagewatch.kernel.constants import PAGE_SIZE
    from pagewatch.kernel.maps import MapsEntry

    # DirtyPages: len() is the pages written (count, the length of pages() and the bitmap's
    # sum); iterating gives the byte runs, len(d.runs) of them (README, class docstring).
    d = pw.DirtyPages(np.array([[2, 5], [9, 10]], np.int64), 0, 16)
    assert len(d) == d.count == len(d.pages()) == int(d.bitmap().sum()) == 4
    assert list(d) == [(2 * PAGE_SIZE, 3 * PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE)]
    assert len(d.runs) == 2
    # ProcessDirty: len() is the mappings, as iterating it gives; the number of pages is
    # count, and pages (a number here, an array in DirtyPages.pages()) is deprecated.
    m = MapsEntry(0x10000, 0x20000, "rw-p", 0, "00:00", 0, "")
    p = pw.ProcessDirty(1, {m: pw.DirtyPages(np.array([[0, 3]], np.int64), m.start, 16)},
                        time=0.0, elapsed=1.0)
    assert len(p) == len(list(p)) == 1 and p.count == 3
    with pytest.warns(DeprecationWarning, match="ProcessDirty.count"):
        assert p.pages == 3


@pytest.mark.kernel_independent
def test_count_is_the_number_of_written_pages_everywhere() -> None:
    import numpy as np

    from pagewatch.kernel.maps import Mapping, MapsEntry
    from pagewatch.process import BACKENDS, PROCESS_BACKENDS

    d = pw.DirtyPages(np.array([[2, 5], [9, 10]], np.int64), 0, 16)
    assert d.count == len(d) == 4 and d.pages().tolist() == [2, 3, 4, 9]
    m = MapsEntry(0x10000, 0x20000, "rw-p", 0, "00:00", 0, "")
    p = pw.ProcessDirty(1, {m: pw.DirtyPages(np.array([[0, 3]], np.int64), m.start, 16)},
                        time=0.0, elapsed=1.0)
    assert len(p) == 1 and p.count == 3  # one mapping, three pages written
    assert Mapping is MapsEntry and BACKENDS is PROCESS_BACKENDS
    assert isinstance(PROCESS_BACKENDS, tuple)
