"""Checkpoints: round trips against a model of full copies, crash safety under SIGKILL,
damage named, chains bounded, restore rewriting only what differs."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import pagewatch as pw
from pagewatch.checkpoint import CheckpointDamaged, CheckpointError, LocalStore
from pagewatch.checkpoint import _format as fmt
from pagewatch.kernel.constants import PAGE_SIZE

from .targets import checkpoint_saver

IN_MATRIX = bool(os.environ.get("PAGEWATCH_KERNEL_MATRIX"))
ROOT = Path(__file__).resolve().parent.parent


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact: dtype, shape, memory order and every byte."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.flags.f_contiguous == b.flags.f_contiguous
            and a.flags.c_contiguous == b.flags.c_contiguous
            and fmt.flat_bytes(a).tobytes() == fmt.flat_bytes(b).tobytes())


def same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)


def aligned(shape: int | tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A zeroed array alone on its pages (an anonymous mapping): a count of pages written is
    then exact; a heap array shares its first and last pages with other objects."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    m = mmap.mmap(-1, max(n, 1))
    return np.frombuffer(m, dt, count=n // dt.itemsize).reshape(shape)


def copy_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy(order="K") for k, v in state.items()}


# ---- round trip ------------------------------------------------------------------------

_ARRAY_KINDS = [
    lambda n: np.zeros(n, np.uint8),
    lambda n: np.zeros(max(1, n // 8), np.float64),
    lambda n: np.zeros((3, max(1, n // 12)), np.int32, order="F"),
    lambda n: np.zeros(max(1, n // 6), [("x", "<i2"), ("y", "<f4")]),
]


@settings(max_examples=6 if IN_MATRIX else 30, deadline=None, database=None)
@seed(20261202)
@given(st.data())
def test_every_generation_of_random_writes_and_saves_loads_bit_exact(data: Any) -> None:
    compression = data.draw(st.sampled_from(["none", "zstd"]), label="compression")
    checksum = data.draw(st.sampled_from(["crc32", "xxh3_64"]), label="checksum")
    max_chain = data.draw(st.integers(0, 4), label="max_chain")
    ratio = data.draw(st.sampled_from([0.0, 0.25, 10.0]), label="ratio")
    sizes = st.integers(1, 6 * PAGE_SIZE + 77)
    state: dict[str, np.ndarray] = {}
    for i in range(data.draw(st.integers(1, 3), label="arrays")):
        state[f"a{i}"] = data.draw(st.sampled_from(_ARRAY_KINDS))(data.draw(sizes))
    model: list[dict[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ck")
        with pw.Checkpoint(path, state, compression=compression, checksum=checksum,
                           max_chain=max_chain, max_chain_ratio=ratio) as ck:
            for _ in range(data.draw(st.integers(1, 8), label="saves")):
                for _ in range(data.draw(st.integers(0, 4), label="ops")):
                    op = data.draw(st.sampled_from(["write"] * 6 + ["add", "resize", "drop"]))
                    name = data.draw(st.sampled_from(sorted(state)))
                    if op == "write":
                        flat = fmt.flat_bytes(state[name])
                        s = data.draw(st.integers(0, flat.size - 1))
                        e = data.draw(st.integers(s + 1, min(flat.size, s + 3 * PAGE_SIZE)))
                        flat[s:e] = np.frombuffer(data.draw(st.binary(min_size=e - s,
                                                                      max_size=e - s)), np.uint8)
                    elif op == "add":
                        new = data.draw(st.sampled_from(_ARRAY_KINDS))(data.draw(sizes))
                        fmt.flat_bytes(new)[:] = data.draw(st.integers(0, 255))
                        state[f"n{len(model)}{name}"] = new
                    elif op == "resize":
                        old = state[name]
                        new = np.resize(old, (old.size + data.draw(st.integers(-old.size + 1, 999)),))
                        state[name] = new
                    elif len(state) > 1:
                        del state[name]
                g = ck.save()
                assert g.number == len(model)
                model.append(copy_state(state))
            for n, want in enumerate(model):
                assert same_state(pw.checkpoint.load(path, n), want), f"generation {n}"
            assert pw.checkpoint.verify(path) == []


def test_a_lone_array_round_trips_under_arr_0(tmp_path: Path) -> None:
    a = aligned(10000, np.float32)
    a[:] = np.arange(10000)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        ck.save()
        a[5000] = -1
        g = ck.save()
    assert g.pages == 1
    got = pw.checkpoint.load(tmp_path / "ck")
    assert list(got) == ["arr_0"] and same(got["arr_0"], a)


def test_a_save_writes_only_the_pages_written_since_the_previous_one(tmp_path: Path) -> None:
    a = aligned(256 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a, checksum="crc32") as ck:
        full = ck.save()
        pages = [3, 70, 71, 200]
        for p in pages:
            a[p * PAGE_SIZE + 9] = p
        g = ck.save()
        assert g.pages == len(pages)
        # the pages, then runs, index and trailer padded to the next 4 KiB (the file's end)
        assert g.nbytes == len(pages) * PAGE_SIZE + 4096
        assert full.nbytes >= a.nbytes and full.nbytes % 4096 == 0
        idx = fmt.read_index(LocalStore(tmp_path / "ck").open(1), 1)
        assert [e["kind"] for e in idx["arrays"]] == ["delta"]
        assert idx["parent"] == 0


def test_an_array_added_or_resized_between_saves_gets_a_full_entry(tmp_path: Path) -> None:
    state = {"x": np.zeros(5000, np.int64), "y": np.ones(10, np.int8)}
    with pw.Checkpoint(tmp_path / "ck", state) as ck:
        ck.save()
        state["x"] = np.resize(state["x"], 7000)
        state["z"] = np.full(3, 7, np.int16)
        state["y"][2] = 5
        ck.save()
    store = LocalStore(tmp_path / "ck")
    with store.open(1) as r:
        kinds = {e["name"]: e["kind"] for e in fmt.read_index(r, 1)["arrays"]}
    assert kinds == {"x": "full", "y": "delta", "z": "full"}
    assert same_state(pw.checkpoint.load(tmp_path / "ck"), state)


def test_a_save_that_fails_midway_leaves_nothing_and_the_next_save_is_a_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = aligned(64 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        ck.save()
        a[PAGE_SIZE * 5] = 1

        def boom(*args: Any, **kw: Any) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(fmt, "write_generation", boom)
            with pytest.raises(OSError):
                ck.save()
        assert [g.number for g in ck.generations()] == [0]
        assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]
        g = ck.save()  # the failed save's reset must not lose page 5: a base holds it
        assert g.number == 1 and g.pages == 64
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


@pytest.mark.kernel_independent
def test_a_commit_failing_after_its_rename_does_not_block_the_next_saves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The folder's fsync fails (EIO) after the rename: the generation's name exists, the
    # save raised; the next save must take the next number, not collide with that name.
    from pagewatch.checkpoint import _store

    a = aligned(8 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        ck.save()
        a[PAGE_SIZE] = 1

        def eio(path: str) -> None:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as m:
            m.setattr(_store, "_fsync_dir", eio)
            with pytest.raises(OSError, match="Input/output"):
                ck.save()
        a[2 * PAGE_SIZE] = 2
        assert ck.save().number == 2
        a[3 * PAGE_SIZE] = 3
        assert ck.save().number == 3
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


@pytest.mark.kernel_independent
def test_a_delta_is_scattered_to_its_runs_and_runs_that_do_not_fit_are_refused() -> None:
    # The native loop that applies a delta's bytes (one memcpy per run, no Python per run).
    from pagewatch import _native

    dest = np.zeros(100, np.uint8)
    src = np.arange(1, 11, dtype=np.uint8)
    runs = np.array([[2, 5], [10, 12], [95, 100]], np.int64)
    assert _native.scatter_runs(dest.ctypes.data, src, runs, dest.size) == 10
    want = np.zeros(100, np.uint8)
    want[2:5], want[10:12], want[95:100] = src[:3], src[3:5], src[5:]
    assert np.array_equal(dest, want)
    for bad in ([[10, 12], [2, 5], [95, 100]],   # out of order
                [[2, 5], [10, 12], [96, 101]]):  # past the end
        with pytest.raises(ValueError, match="runs"):
            _native.scatter_runs(dest.ctypes.data, src, np.array(bad, np.int64), dest.size)
    with pytest.raises(ValueError, match="exactly"):
        _native.scatter_runs(dest.ctypes.data, src[:9], runs, dest.size)
    assert np.array_equal(dest, want)  # nothing written by a refused call


@pytest.mark.kernel_independent
def test_a_save_syncs_its_file_before_naming_it_and_the_folder_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a power cut needs (the SIGKILL test cannot show it): the data is on disk before
    # the name points at it, the name before save() returns.  The calls, in order.
    from pagewatch.checkpoint import _store

    calls: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a: str, b: str) -> None:
        calls.append(("rename", os.fspath(b)))
        real_rename(a, b)

    monkeypatch.setattr(_store.os, "fsync", fsync)
    monkeypatch.setattr(_store.os, "rename", rename)
    a = aligned(8 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        for i in range(2):
            a[i * PAGE_SIZE] = 1
            calls.clear()
            n = ck.save().number
            final = str(tmp_path / "ck" / f"{n:08d}.pwg")
            assert calls == [("fsync", final + ".tmp"), ("rename", final),
                             ("fsync", str(tmp_path / "ck"))]


# ---- direct I/O ------------------------------------------------------------------------

def _save_series(path: Path, store_kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                 compression: str = "none") -> tuple[list[bytes], list[dict[str, np.ndarray]]]:
    """Six saves of one seeded series of writes (one delta larger than the two direct-I/O
    blocks, an array starting and ending inside a page, a Fortran one): every generation's
    file bytes and the state it was saved from."""
    import types

    from pagewatch import checkpoint as ck_module

    monkeypatch.setattr(ck_module, "_time", types.SimpleNamespace(time=lambda: 1.0))
    rng = np.random.default_rng(7)
    big = aligned(3 * (1 << 20) + 5 * PAGE_SIZE)
    big[:] = rng.integers(0, 256, big.size, dtype=np.uint8)  # a dropped byte must show
    # Mid-page starts and ends, the same in every run (a heap array's would not be)
    odd = aligned(12 * PAGE_SIZE)[1000:1000 + 40000].view(np.float64)
    f = np.ndarray((3, 7000), np.int32, aligned(22 * PAGE_SIZE), offset=24, order="F")
    state = {"big": big, "odd": odd, "f": f}
    models = []
    store = LocalStore(path, **store_kw)
    with pw.Checkpoint(store, state, compression=compression, max_chain=10,
                       max_chain_ratio=10.0) as ck:
        for g in range(6):
            if g:
                npages = big.size // PAGE_SIZE
                k = npages * 4 // 5 if g == 2 else int(rng.integers(1, 40))
                for p in rng.choice(npages, k, replace=False):
                    big[p * PAGE_SIZE + int(rng.integers(0, PAGE_SIZE))] ^= 0xA5
                state["odd"][rng.integers(0, 5000, 3)] += 1.5
                state["f"][:, int(rng.integers(0, 7000))] = g
            assert ck.save().number == g
            models.append(copy_state(state))
    files = [Path(store.file(g)).read_bytes() for g in range(6)]
    return files, models


def _direct_series_is(plain: list[bytes], path: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> None:
    """The series saved with direct I/O asked for: the same files as ``plain``, loading
    bit-exact."""
    files, models = _save_series(path, {"direct": True}, monkeypatch)
    assert files == plain
    assert same_state(pw.checkpoint.load(path), models[-1])


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class _FakeAio:
    """An AIO context whose writes happen only when reaped, newest first (or when it is
    closed: io_destroy waits for them): a block refilled (or a file closed) before its
    write completed would show in the file's bytes.  ``result(count, n, direct)`` may say
    what the count-th write (``n`` bytes, submitted with O_DIRECT or not) does instead:
    ``-errno`` (it writes nothing), or a byte count (it writes that many: a short write)."""

    def __init__(self, result: Any = None) -> None:
        self.queue: list[tuple[int, np.ndarray, int, int, int, bool]] = []
        self.submitted = 0
        self.closed = 0
        self.result = result

    def open(self) -> bool:
        return True

    def submit(self, fd: int, block: np.ndarray, offset: int, tag: int) -> None:
        self.submitted += 1
        self.queue.append((self.submitted, block, fd, offset, tag, _is_direct(fd)))

    def _complete(self) -> tuple[int, int]:
        count, block, fd, offset, tag, direct = self.queue.pop()
        res = block.size if self.result is None else self.result(count, block.size, direct)
        if res > 0:
            os.pwrite(fd, block[:res].data, offset)
        return tag, res

    def reap(self, wait: int, interruptible: bool = True) -> list[tuple[int, int]]:
        if wait and not self.queue:
            raise AssertionError("io_getevents would wait for ever: nothing is in flight")
        out = []
        while self.queue and len(out) < max(wait, 1):
            out.append(self._complete())
        return out

    def close(self) -> None:
        self.closed += 1
        while self.queue:
            self._complete()


def _no_aio(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AIO here (a kernel without CONFIG_AIO): the saver writes in line."""
    import errno

    from pagewatch import _native

    def refuse(nr: int) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(_native, "aio_setup", refuse)


def _with_aio(monkeypatch: pytest.MonkeyPatch, fake: _FakeAio) -> None:
    from pagewatch.checkpoint import _store

    monkeypatch.setattr(_store, "_Aio", lambda: fake)


@pytest.mark.kernel_independent
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_direct_io_writes_the_same_files_as_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    # Deltas (by default) or every generation go out through the store's blocks by AIO, or
    # in line without it: the bytes must be those the plain writes put in the file, block
    # edges and all (a lost, doubled, reordered or early-refilled block would differ).
    from pagewatch.checkpoint import _store

    plain, models = _save_series(tmp_path / "plain", {"direct": False}, monkeypatch,
                                 compression)
    fakes = {"late": _FakeAio(), "short": _FakeAio(lambda count, n, direct: n // 2 or n)}
    for how in ["aio", "aio-all", "late", "short", "in line"]:
        with monkeypatch.context() as m:
            if how in fakes:
                _with_aio(m, fakes[how])
                m.setattr(_store, "DEPTH", 2)  # blocks reused within a save: after reaping
            if how == "in line":
                _no_aio(m)
            files, _ = _save_series(tmp_path / how, {} if how == "aio" else {"direct": True},
                                    monkeypatch, compression)
        assert [len(f) for f in files] == [len(f) for f in plain]
        assert files == plain
        for g, want in enumerate(models):
            assert same_state(pw.checkpoint.load(tmp_path / how, g), want)
    assert all(f.submitted > 6 and not f.queue for f in fakes.values())
    if compression == "none":  # the big delta went through several blocks
        assert len(plain[2]) > 2 * (1 << 20)


@pytest.mark.kernel_independent
@pytest.mark.parametrize("where", ["open", "submit", "completion", "in line"])
def test_a_file_system_refusing_direct_io_gets_the_same_bytes_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import errno
    import fcntl

    from pagewatch.checkpoint import _store

    plain, _ = _save_series(tmp_path / "plain", {"direct": False}, monkeypatch)
    refused = []

    def is_direct(fd: int) -> bool:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    real_open, real_pwrite = os.open, os.pwrite

    def fake_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if where == "open" and flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    def fake_pwrite(fd: int, data: Any, offset: int) -> int:
        if where == "in line" and is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def at_completion(count: int, n: int, direct: bool) -> int:
        if direct:  # each write made with O_DIRECT, in flight beside the first refused
            refused.append(count)
            return -errno.EINVAL
        return n

    fake = _FakeAio(at_completion if where == "completion" else None)
    real_submit = fake.submit

    def refusing_submit(fd: int, block: np.ndarray, offset: int, tag: int) -> None:
        if where == "submit" and is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_submit(fd, block, offset, tag)

    fake.submit = refusing_submit  # type: ignore[method-assign]
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    if where == "in line":
        _no_aio(monkeypatch)
    else:
        _with_aio(monkeypatch, fake)
    _direct_series_is(plain, tmp_path / "d", monkeypatch)
    assert refused  # the refusal happened and was met
    if where == "completion":  # several writes in flight, each refused
        assert len(refused) > 1
    assert _store._Aio is not None


@pytest.mark.kernel_independent
def test_without_aio_the_saver_writes_its_blocks_in_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, _ = _save_series(tmp_path / "plain", {"direct": False}, monkeypatch)
    _no_aio(monkeypatch)
    real_pwrite = os.pwrite
    direct = []

    def counting(fd: int, data: Any, offset: int) -> int:
        import fcntl

        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    _direct_series_is(plain, tmp_path / "d", monkeypatch)
    assert direct and all(direct)


@pytest.mark.kernel_independent
@pytest.mark.timeout(120)
def test_a_load_where_no_thread_can_start_reads_ahead_nothing_and_hashes_in_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At interpreter exit (Python 3.12+) or at a thread limit no thread starts: a load
    # neither asks for its deltas ahead nor hashes on a thread, and does not fail
    plain, models = _save_series(tmp_path / "plain", {"direct": False}, monkeypatch)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    monkeypatch.setattr(fmt._Behind, "MIN", 1 << 20)  # entries from 1 MiB on: the big one
    for g, want in enumerate(models):
        assert same_state(pw.checkpoint.load(tmp_path / "plain", g), want)
    _direct_series_is(plain, tmp_path / "d", monkeypatch)  # and saves need no thread


@pytest.mark.kernel_independent
@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["before a submit", "after a submit", "in a wait",
                                  "after a reap"])
def test_an_interrupt_with_writes_in_flight_fails_the_save_once_they_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    # Ctrl-C while the kernel still reads the blocks, at any point of the bookkeeping (a
    # signal's handler runs as soon as a call returns): the failed save returns only after
    # those writes completed (the next save refills the blocks), leaves nothing, and the
    # next saves neither hang nor mistake an old completion for theirs.
    from pagewatch.checkpoint import _store

    fake = _FakeAio()
    real_submit, real_reap = fake.submit, fake.reap
    armed = False

    def submit(fd: int, block: np.ndarray, offset: int, tag: int) -> None:
        if armed and when == "before a submit" and fake.submitted == 3:
            raise KeyboardInterrupt
        real_submit(fd, block, offset, tag)
        if armed and when == "after a submit" and fake.submitted == 3:
            raise KeyboardInterrupt

    def reap(wait: int, interruptible: bool = True) -> list[tuple[int, int]]:
        if armed and when == "in a wait" and interruptible and len(fake.queue) >= 2:
            raise KeyboardInterrupt  # a signal in io_getevents, the handler raising
        got = real_reap(wait, interruptible)
        if armed and when == "after a reap" and fake.submitted >= 3:
            raise KeyboardInterrupt  # the completions taken, not yet booked
        return got

    fake.submit, fake.reap = submit, reap  # type: ignore[method-assign]
    _with_aio(monkeypatch, fake)
    monkeypatch.setattr(_store, "DEPTH", 2)  # so the save waits for a block to be free
    a = aligned(1024 * PAGE_SIZE)
    with pw.Checkpoint(LocalStore(tmp_path / "ck", direct=True), a) as ck:
        ck.save()
        assert not fake.queue
        a[::PAGE_SIZE] = 1  # every page: a delta of five blocks
        fake.submitted = 0
        armed = True
        with pytest.raises(KeyboardInterrupt):
            ck.save()
        armed = False
        assert not fake.queue  # every write in flight ended before the save returned
        assert fake.submitted >= 2 and fake.closed == 1
        assert [g.number for g in ck.generations()] == [0]
        assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]
        a[3 * PAGE_SIZE] = 2
        assert ck.save().pages == 1024  # a base, then deltas again
        a[4 * PAGE_SIZE] = 3
        a[900 * PAGE_SIZE:] = 4
        assert ck.save().pages == 125
        assert pw.checkpoint.verify(tmp_path / "ck") == []
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


@pytest.mark.kernel_independent
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_room_allocated_ahead_and_not_filled_is_cut_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    # fallocate failing part way (ENOSPC) keeps what it allocated and the file's size with
    # it; a zstd delta fills less than its pages' size: no file may end in unused room
    import errno

    from pagewatch import _native

    def partial(fd: int, mode: int, offset: int, length: int) -> None:
        os.ftruncate(fd, offset + length + 5 * PAGE_SIZE)  # more than the save will fill
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_native, "fallocate", partial)
    a = aligned(300 * PAGE_SIZE)
    a[:] = 7  # compresses well
    with pw.Checkpoint(LocalStore(tmp_path / "ck", direct=True), a,
                       compression=compression) as ck:
        for g in range(3):
            a[g * 100 * PAGE_SIZE:(g * 100 + 50) * PAGE_SIZE] = g
            info = ck.save()
            assert os.path.getsize(tmp_path / "ck" / f"{g:08d}.pwg") == info.nbytes
    assert pw.checkpoint.verify(tmp_path / "ck") == []
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


@pytest.mark.kernel_independent
def test_a_forked_child_saving_does_not_write_into_the_parents_blocks(tmp_path: Path) -> None:
    # The blocks are private, and the child's writes go through an AIO context of its own
    # (the parent's cannot be used from the child's memory)
    from pagewatch.checkpoint import _store

    store = LocalStore(tmp_path / "ck", direct=True)
    a = aligned(8 * PAGE_SIZE)
    with pw.Checkpoint(store, a) as ck:
        ck.save()
        block = store._block(0)
        before = block[:64].tobytes()
        out = str(tmp_path / "child")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                block[:PAGE_SIZE] = ord("A")  # what the child's own save would put there
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
                if store._aio.open():
                    store._aio.submit(fd, block[:PAGE_SIZE], 0, 5)
                    code = 0 if store._aio.reap(1) == [(5, PAGE_SIZE)] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert Path(out).read_bytes() == b"A" * PAGE_SIZE
        assert block[:64].tobytes() == before
        a[0] = 1
        assert ck.save().pages == 1  # the parent's context still works
    assert isinstance(store._aio, _store._Aio)


@pytest.mark.kernel_independent
def test_a_second_writer_on_the_same_store_object_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ck")
    a, b = aligned(4 * PAGE_SIZE), aligned(4 * PAGE_SIZE)
    with pw.Checkpoint(store, a) as ck:
        ck.save()
        with pytest.raises(CheckpointError, match="in use"):
            pw.Checkpoint(store, b)
        with pytest.raises(CheckpointError, match="in use"):
            pw.checkpoint.compact(store)
        a[0] = 1
        assert ck.save().number == 1  # still the writer, its lock still held
    with pw.Checkpoint(store, a) as ck:  # released by close()
        assert ck.save().number == 2


@pytest.mark.kernel_independent
@pytest.mark.parametrize("aio", [True, False])
def test_a_write_failing_fails_the_save_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aio: bool) -> None:
    import errno

    a = aligned(1024 * PAGE_SIZE)
    calls = []
    real_pwrite = os.pwrite

    def failing(count: int, n: int, direct: bool) -> int:
        calls.append(count)
        return -errno.ENOSPC if count == 2 else n  # the second block: the first is on disk

    def failing_pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    fake = _FakeAio()
    if aio:
        _with_aio(monkeypatch, fake)
    else:
        _no_aio(monkeypatch)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        ck.save()
        a[::PAGE_SIZE] = 1  # every page: a delta of five blocks
        fake.submitted = 0
        with monkeypatch.context() as m:
            if aio:
                fake.result = failing
            else:
                m.setattr(os, "pwrite", failing_pwrite)
            with pytest.raises(OSError, match="No space"):
                ck.save()
        fake.result = None
        assert 2 in calls if aio else len(calls) == 2
        assert not fake.queue
        assert [g.number for g in ck.generations()] == [0]
        assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]
        a[5] = 2
        g = ck.save()  # a base: the failed save's reset lost nothing
        assert g.number == 1 and g.pages == 1024
        a[7 * PAGE_SIZE] = 3
        assert ck.save().pages == 1  # and the next delta is written
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


# ---- bounded chains ----------------------------------------------------------------------

class CountingStore(LocalStore):
    """A local store that counts the bytes read through it."""

    read = 0

    def open(self, generation: int) -> Any:
        r = super().open(generation)
        store = self
        inner = r.pread_into

        def pread_into(offset: int, buf: memoryview) -> None:
            store.read += len(buf.cast("B"))
            inner(offset, buf)

        r.pread_into = pread_into  # type: ignore[method-assign]
        return r


@pytest.mark.kernel_independent
def test_a_load_asks_for_its_chains_deltas_ahead_and_a_failing_ask_changes_nothing(
        tmp_path: Path) -> None:
    class Asking(LocalStore):
        asked: list[int] = []
        fail = False

        def prefetch(self, generation: int) -> None:
            self.asked.append(generation)
            if self.fail:
                raise OSError(5, "Input/output error")
            super().prefetch(generation)

    a = aligned(16 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a, max_chain=2) as ck:
        for g in range(5):  # 0 base, 1-2 deltas, 3 base, 4 delta
            a[g * PAGE_SIZE] = g + 1
            ck.save()
    store = Asking(tmp_path / "ck")
    assert same(pw.checkpoint.load(store, 2)["arr_0"][:3 * PAGE_SIZE],
                a[:3 * PAGE_SIZE])
    assert store.asked == [1, 2]  # the deltas, not the base they build on
    store.asked.clear()
    store.fail = True
    assert same(pw.checkpoint.load(store)["arr_0"], a)
    assert store.asked == [4]


@pytest.mark.parametrize("max_chain, ratio", [(3, 10.0), (100, 0.05)])
def test_loading_the_newest_generation_reads_at_most_a_bounded_chain(
        tmp_path: Path, max_chain: int, ratio: float) -> None:
    a = aligned(100 * PAGE_SIZE)
    rng = np.random.default_rng(7)
    kinds = []
    with pw.Checkpoint(tmp_path / "ck", a, max_chain=max_chain, max_chain_ratio=ratio) as ck:
        for _ in range(12):
            for p in rng.choice(100, 2, replace=False):
                a[p * PAGE_SIZE] += 1
            n = ck.save().number
            with LocalStore(tmp_path / "ck").open(n) as r:
                kinds.append(fmt.read_index(r, n)["parent"] is None)
            counting = CountingStore(tmp_path / "ck")
            assert same(pw.checkpoint.load(counting)["arr_0"], a)
            last_delta = 2 * 2 * PAGE_SIZE + 64 * 1024
            assert counting.read <= a.nbytes * (1 + min(ratio, 1.0)) + last_delta + 64 * 1024
    if max_chain == 3:  # a base, three deltas, a base...
        assert kinds == [True, False, False, False] * 3
    else:  # 5 % of 100 pages: the third delta passes it, the next save is a base
        assert kinds[:5] == [True, False, False, False, True]


def test_compact_folds_a_chain_into_a_base_and_prunes_older_generations(tmp_path: Path) -> None:
    a = aligned(30 * PAGE_SIZE)
    with pw.Checkpoint(tmp_path / "ck", a) as ck:
        for i in range(4):
            a[i * PAGE_SIZE] = i + 1
            ck.save()
        with pytest.raises(CheckpointError, match="in use"):
            pw.checkpoint.compact(tmp_path / "ck")
    want = pw.checkpoint.load(tmp_path / "ck", 2)
    g = pw.checkpoint.compact(tmp_path / "ck", 2, prune=False)
    assert g.number == 2 and g.pages == 30
    assert same_state(pw.checkpoint.load(tmp_path / "ck", 2), want)
    assert same(pw.checkpoint.load(tmp_path / "ck", 3)["arr_0"], a)  # builds on 2: still fine
    pw.checkpoint.compact(tmp_path / "ck")
    assert [g.number for g in pw.checkpoint.generations(tmp_path / "ck")] == [3]
    assert same(pw.checkpoint.load(tmp_path / "ck")["arr_0"], a)


# ---- restore -----------------------------------------------------------------------------

def test_restore_rewrites_only_the_pages_that_differ_and_the_next_save_holds_them(
        tmp_path: Path) -> None:
    state = {"g": aligned(50 * PAGE_SIZE), "h": np.arange(3000, dtype=np.int64)}
    with pw.Checkpoint(tmp_path / "ck", state) as ck:
        ck.save()
        want = copy_state(state)
        state["g"][[5, 6 * PAGE_SIZE, 40 * PAGE_SIZE + 1]] = 9
        ck.save()
        with pw.Tracker(state["g"]) as t:
            rewritten = ck.restore(0)
            d = t.collect()
        assert same_state(state, want)
        base_off = t.offset
        # Pages of memory rewritten are exactly those holding the three changed bytes.
        assert sorted(d.pages().tolist()) == sorted({(o + base_off) // PAGE_SIZE for o in
                                                     (5, 6 * PAGE_SIZE, 40 * PAGE_SIZE + 1)})
        assert rewritten == 3
        assert ck.restore(0) == 0
        g = ck.save()
        assert g.pages >= 3
    assert same_state(pw.checkpoint.load(tmp_path / "ck"), want)


def test_restore_into_a_resized_array_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    state = {"a": np.zeros(100, np.int32), "b": np.ones(100, np.int8)}
    with pw.Checkpoint(tmp_path / "ck", state) as ck:
        ck.save()
        state["b"][:] = 3
        state["a"] = np.zeros(200, np.int32)
        with pytest.raises(CheckpointError, match="'a'"):
            ck.restore(0)
        assert (state["b"] == 3).all()


# ---- damage ------------------------------------------------------------------------------

def _parts_of(path: Path, n: int) -> list[tuple[int, int, str, str | None]]:
    """``(start, end, part, array)`` for every byte range of generation ``n``'s file."""
    with LocalStore(path).open(n) as r:
        idx = fmt.read_index(r, n)
        size = r.size()
    out = [(0, fmt.PREAMBLE.size, "preamble", None)]
    for e in idx["arrays"]:
        if e["runs"]:
            out.append((e["runs"]["offset"], e["runs"]["offset"] + e["runs"]["length"],
                        "runs", e["name"]))
        out.append((e["data"]["offset"], e["data"]["offset"] + e["data"]["length"], "data",
                    e["name"]))
    at = size - fmt.TRAILER.size
    out.append((out[-1][1], at, "index", None))
    out.append((at, size, "trailer", None))
    assert all(a[1] == b[0] for a, b in zip(out, out[1:], strict=False)), "the parts cover"
    return out


def _small_chain(path: Path, compression: str, checksum: str) -> dict[int, dict[str, Any]]:
    state = {"u": np.arange(3 * PAGE_SIZE // 4, dtype=np.int32),
             "v": np.linspace(0, 1, 700)}
    model = {}
    with pw.Checkpoint(path, state, compression=compression, checksum=checksum) as ck:
        ck.save()
        model[0] = copy_state(state)
        state["u"][[1, 2 * PAGE_SIZE // 4 + 5]] = -1
        state["v"][600] = 2
        ck.save()
        model[1] = copy_state(state)
    return model


def _count_checksum_threads(monkeypatch: pytest.MonkeyPatch,
                            min_bytes: int | None = None) -> list[object]:
    """Make every checksum thread a load starts append itself to the list returned (and,
    with ``min_bytes``, start one for entries of that size and more)."""
    made: list[object] = []

    class Counted(fmt._Behind):
        MIN = fmt._Behind.MIN if min_bytes is None else min_bytes

        def __init__(self, h: Any) -> None:
            made.append(self)
            super().__init__(h)

    monkeypatch.setattr(fmt, "_Behind", Counted)
    return made


@pytest.mark.kernel_independent
@pytest.mark.parametrize("compression, checksum, behind", [
    ("none", "crc32", False), ("zstd", "xxh3_64", False),
    ("none", "xxh3_64", True)])  # every uncompressed entry hashed on the checksum thread
def test_a_byte_flipped_in_any_part_is_named_by_load_and_verify(
        tmp_path: Path, compression: str, checksum: str, behind: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_checksum_threads(monkeypatch, min_bytes=0) if behind else []
    path = tmp_path / "ck"
    model = _small_chain(path, compression, checksum)
    for n in (0, 1):
        file = LocalStore(path).file(n)
        good = Path(file).read_bytes()
        parts = _parts_of(path, n)
        for start, end, part, array in parts:
            # Every byte of the small parts; ~40 of the bigger ones, both ends included.
            step = 1 if end - start <= 64 else (end - start) // 40
            for pos in sorted({*range(start, end, step), end - 1}):
                bad = bytearray(good)
                bad[pos] ^= 0x5A
                Path(file).write_bytes(bad)
                expect = {part} if part != "trailer" else {"trailer", "index"}
                for g in (n, 1):  # the damaged generation, and generation 1 building on 0
                    with pytest.raises(CheckpointDamaged) as err:
                        pw.checkpoint.load(path, g)
                    assert err.value.generation == n and err.value.part in expect, (pos, part)
                    if part in ("runs", "data"):
                        assert err.value.array == array and repr(array) in str(err.value)
                problems = pw.checkpoint.verify(path)
                assert problems and problems[0].generation == n and problems[0].part in expect
                if n == 0:
                    assert [p.generation for p in problems] == [0, 1]
                    assert problems[1].part == "chain"
        Path(file).write_bytes(good)
    for n, want in model.items():
        assert same_state(pw.checkpoint.load(path, n), want)
    assert bool(made) == behind
    assert not [t for t in threading.enumerate() if t.name == "pagewatch-checksum"]


@pytest.mark.kernel_independent
def test_a_large_state_loads_bit_exact_with_its_checksums_computed_beside_the_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 32 << 20
    made = _count_checksum_threads(monkeypatch, min_bytes=n // 2)
    rng = np.random.default_rng(5)
    state = {"big": aligned(n), "small": aligned(PAGE_SIZE)}
    state["big"][:] = rng.integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "ck"
    with pw.Checkpoint(path, state, checksum="xxh3_64", compression="none") as ck:
        ck.save()
        want0 = copy_state(state)
        state["big"][: n * 3 // 4] ^= 1  # a delta above the threshold
        state["small"][7] = 9
        ck.save()
    assert same_state(pw.checkpoint.load(path, 0), want0)
    assert same_state(pw.checkpoint.load(path, 1), state)
    assert len(made) == 3  # the base and the delta of "big" in the loads, never "small"
    with LocalStore(path).open(1) as r:
        e = next(e for e in fmt.read_index(r, 1)["arrays"] if e["name"] == "big")
    file = LocalStore(path).file(1)
    with open(file, "r+b") as f:  # the last byte of its data: the thread's last chunk
        f.seek(e["data"]["offset"] + e["data"]["length"] - 1)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CheckpointDamaged) as err:
        pw.checkpoint.load(path, 1)
    assert (err.value.generation, err.value.array, err.value.part) == (1, "big", "data")


@pytest.mark.kernel_independent
def test_a_file_cut_short_or_a_missing_base_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _small_chain(path, "none", "crc32")
    f1 = LocalStore(path).file(1)
    good = Path(f1).read_bytes()
    for cut in (0, 10, len(good) // 2, len(good) - 1):
        Path(f1).write_bytes(good[:cut])
        with pytest.raises(CheckpointDamaged, match="generation 1"):
            pw.checkpoint.load(path)
    Path(f1).write_bytes(good)
    os.unlink(LocalStore(path).file(0))
    with pytest.raises(CheckpointDamaged, match="generation 1, chain: builds on generation 0"):
        pw.checkpoint.load(path, 1)
    assert [(p.generation, p.part) for p in pw.checkpoint.verify(path)] == [(1, "chain")]
    with pytest.raises(CheckpointError, match="no generation 0"):
        pw.checkpoint.load(path, 0)


def test_missing_optional_packages_are_named(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _small_chain(tmp_path / "ck", "zstd", "xxh3_64")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "xxhash", None)
    with pytest.raises(CheckpointError, match=r"pagewatch\[zstd\]"):
        pw.Checkpoint(tmp_path / "other", np.zeros(10), compression="zstd", checksum="crc32")
    with pytest.raises(CheckpointError, match=r"pagewatch\[xxh3\]"):
        pw.checkpoint.load(tmp_path / "ck")
    assert fmt.default_checksum() == "crc32"


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    with pw.Checkpoint(tmp_path / "ck", np.zeros(10)), \
            pytest.raises(CheckpointError, match="in use by another writer"):
        pw.Checkpoint(tmp_path / "ck", np.zeros(10))


# ---- crash safety -------------------------------------------------------------------------

def crash_kills() -> int:
    """SIGKILLs of the crash test: 200 (the host runs it alone: a file format's crash safety
    is the same on every kernel); env PAGEWATCH_CHECKPOINT_KILLS sets it (a long run by hand)."""
    return int(os.environ.get("PAGEWATCH_CHECKPOINT_KILLS", 30 if IN_MATRIX else 200))


@pytest.mark.kernel_independent
# ~30-60 s on an idle host; a loaded 2-core box (load average 20) made it 216 s.
@pytest.mark.timeout(1200)
def test_a_saver_killed_at_random_instants_never_leaves_wrong_data(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    server = subprocess.Popen([sys.executable, "-m", "tests.targets.checkpoint_saver", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              bufsize=1, cwd=ROOT)
    assert server.stdin is not None and server.stdout is not None
    model = checkpoint_saver.Model()
    rng = random.Random(12)
    stats = {"kills": 0, "loads": 0, "saves": 0}
    newest_reported = -1
    try:
        assert server.stdout.readline().strip() == "ready"
        for _ in range(crash_kills()):
            # Every fourth saver fsyncs as a Checkpoint does by default; the others skip it
            # (LocalStore durable=False): the same commits, without the wait for the disk.
            server.stdin.write("fork durable\n" if stats["kills"] % 4 == 0 else "fork\n")
            line = server.stdout.readline().split()
            assert line[0] == "child", line
            pid = int(line[1])
            # Kill during start-up sometimes; else after 1-2 saves plus a random instant.
            saves = 0 if rng.random() < 0.2 else rng.randint(1, 2)
            while saves:
                line = server.stdout.readline().split()
                assert line[:2] == ["saved", str(pid)], line
                newest_reported = max(newest_reported, int(line[2]))
                stats["saves"] += 1
                saves -= 1
            if rng.random() < 0.9:
                os.sched_yield()
                for _ in range(rng.randint(0, 20000)):
                    pass  # a random instant into the next save, without waiting on a clock
            os.kill(pid, signal.SIGKILL)
            stats["kills"] += 1
            server.stdin.write(f"reap {pid}\n")
            while True:  # saved lines the child wrote before it died, then the reap
                line = server.stdout.readline().split()
                if line[0] == "reaped":
                    assert os.WIFSIGNALED(int(line[2])), line
                    break
                assert line[:2] == ["saved", str(pid)], line
                newest_reported = max(newest_reported, int(line[2]))
            have = LocalStore(path).generations() if os.path.isdir(path) else []
            if newest_reported >= 0:
                # A save that returned is durable: its generation (or a newer one) is there.
                assert have and have[-1] >= newest_reported
            for g in have:
                got = pw.checkpoint.load(path, g)  # any error here is a failure: no damage
                assert same_state(got, model(g)), f"generation {g} differs from the model"
                stats["loads"] += 1
    finally:
        server.kill()
        server.wait()
    print(f"checkpoint crash test: {stats}")
    assert stats["kills"] == crash_kills()
    assert pw.checkpoint.verify(path) == []


# ---- the command line ---------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagewatch.cli", "checkpoint", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.kernel_independent
def test_cli_lists_verifies_compacts_and_restores_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    model = _small_chain(path, "none", "crc32")
    ls = run_cli("ls", str(path))
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert "base" in lines[1] and "delta" in lines[2] and lines[-1].startswith("2 generations")
    ok = run_cli("verify", str(path))
    assert ok.returncode == 0 and "every checksum good" in ok.stdout
    out = tmp_path / "g0.npz"
    r = run_cli("restore", str(path), "-g", "0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert same_state({k: z[k] for k in z.files}, model[0])
    assert run_cli("restore", str(path), "-o", str(out)).returncode == 1  # exists, no -f
    r = run_cli("restore", str(path), "-o", str(tmp_path / "npys"))
    assert r.returncode == 0, r.stderr
    assert same(np.load(tmp_path / "npys" / "v.npy"), model[1]["v"])
    c = run_cli("compact", str(path))
    assert c.returncode == 0 and "generation 1 is a base now" in c.stdout, c.stderr
    assert [g.number for g in pw.checkpoint.generations(path)] == [1]
    assert same_state(pw.checkpoint.load(path), model[1])


@pytest.mark.kernel_independent
def test_cli_verify_names_the_damage_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _small_chain(path, "none", "crc32")
    start, end, part, array = next(p for p in _parts_of(path, 0) if p[2] == "data")
    f = Path(LocalStore(path).file(0))
    bad = bytearray(f.read_bytes())
    bad[start + 3] ^= 1
    f.write_bytes(bad)
    v = run_cli("verify", str(path))
    assert v.returncode == 1
    assert f"generation 0, array {array!r}, data: checksum mismatch" in v.stdout
    assert "generation 1, array" in v.stdout and "builds on damaged generation 0" in v.stdout
    assert "2 of 2 generations cannot be loaded" in v.stdout
    r = run_cli("restore", str(path), "-o", str(tmp_path / "x.npz"))
    assert r.returncode == 1 and "checkpoint damaged: generation 0" in r.stderr
    assert run_cli("ls", str(tmp_path / "nothing")).returncode == 1


def test_bench_section_measures_saves_and_loads_and_counts_the_bytes_written() -> None:
    from pagewatch import bench
    from pagewatch.bench import checkpoint as ckbench

    r = ckbench.measure("smoke")
    # Figures of time are the machine's; what must hold is what was written and read.
    assert r["pages_per_save"] == ckbench.SIZES["smoke"] // PAGE_SIZE // 100
    assert 1.0 <= r["bytes_per_page"]["max"] <= 1.1
    assert r["save"]["n"] == ckbench.CHAIN - 1 and r["load"]["n"] == ckbench.REPS["smoke"]
    text = bench.report.render_text({"checkpoint": r, "backends": {}, "floor": {},
                                     "alternatives": {}})
    assert "checkpoint: 8 MiB" in text and "np.save" in text and "x np.load" in text
