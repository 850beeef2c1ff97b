"""Icechunk checkpoints against a real S3 protocol (moto's server on 127.0.0.1): round trips
against a model, plain Zarr reading them, two writers, a saver SIGKILLed mid-save, the
server going away mid-save, damage named by verify, the CLI.

Nothing here differs between kernels (the trackers under a checkpoint are tested in
test_checkpoint.py and the tracker tests): every test is ``kernel_independent``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import pagewatch as pw
from pagewatch.checkpoint import (
    CheckpointConflict,
    CheckpointDamaged,
    CheckpointError,
    IcechunkStore,
)
from pagewatch.checkpoint import _format as fmt
from pagewatch.checkpoint._icechunk import ChunkGrid
from pagewatch.kernel.constants import PAGE_SIZE

if sys.version_info < (3, 11):  # icechunk and zarr 3 need Python >= 3.11
    pytest.skip("icechunk needs Python >= 3.11", allow_module_level=True)

import icechunk  # noqa: E402 - after the version check
import zarr  # noqa: E402

pytestmark = pytest.mark.kernel_independent
ROOT = Path(__file__).resolve().parent.parent
BUCKET = "pagewatch-tests"
KEYS = {"access_key_id": "test", "secret_access_key": "test", "region": "us-east-1"}
#: a bound on waiting for events (the server to start, a process to stop); never a pace
PATIENCE = 120.0


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact: dtype, shape, memory order and every byte."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.flags.f_contiguous == b.flags.f_contiguous
            and a.flags.c_contiguous == b.flags.c_contiguous
            and fmt.flat_bytes(a).tobytes() == fmt.flat_bytes(b).tobytes())


def same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)


def copy_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy(order="K") for k, v in state.items()}


def _state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_for(what: str, cond: Any) -> None:
    """Wait for ``cond()`` (an event), failing after a generous bound."""
    end = time.monotonic() + PATIENCE
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"waited {PATIENCE:.0f} s for {what}")
        time.sleep(0.01)


class S3Server:
    """``python -m tests.s3_server`` in a process of its own, with a bucket."""

    def __init__(self, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], PATIENCE)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listening on" not in line:
            self.stop()
            raise AssertionError(f"the S3 server did not start: {line!r}, see {log}")
        self.endpoint = line.split()[-1]
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{BUCKET}",
                                                      method="PUT"), timeout=PATIENCE).read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def options(self, **more: Any) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, **KEYS, **more}

    def url(self) -> str:
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def pause_at_put(self, after: int, match: str) -> None:
        """Make the server stop itself at the ``after``-th PUT whose path has ``match``."""
        q = urllib.parse.urlencode({"after": after, "match": match})
        urllib.request.urlopen(urllib.request.Request(
            f"{self.endpoint}/__pagewatch__/pause?{q}", method="POST"), timeout=PATIENCE).read()

    def stopped(self) -> bool:
        return _state_of(self.pid) == "T"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A server of the test's own: it will be stopped or killed."""
    server = S3Server(tmp_path / "server.log")
    yield server
    server.stop()


# ---- round trips --------------------------------------------------------------------------

_ARRAY_KINDS = [
    lambda n: np.zeros(n, np.uint8),
    lambda n: np.zeros(max(1, n // 8), np.float64),
    lambda n: np.zeros((3, max(1, n // 12)), np.int32, order="F"),
    lambda n: np.zeros((max(1, n // 40), 5), ">f8"),
    lambda n: np.zeros(max(1, n // 6), [("x", "<i2"), ("y", "<f4")]),
]


@settings(max_examples=8, deadline=None, database=None)
@seed(20261202)
@given(st.data())
def test_every_generation_of_random_writes_and_saves_loads_bit_exact_from_s3(
        s3: S3Server, data: Any) -> None:
    chunk_bytes = data.draw(st.sampled_from([700, PAGE_SIZE, 3 * PAGE_SIZE + 5, 16384]),
                            label="chunk_bytes")
    sizes = st.integers(1, 6 * PAGE_SIZE + 77)
    state: dict[str, np.ndarray] = {}
    for i in range(data.draw(st.integers(1, 3), label="arrays")):
        state[f"a{i}"] = data.draw(st.sampled_from(_ARRAY_KINDS))(data.draw(sizes))
    model: list[dict[str, np.ndarray]] = []
    url, opts = s3.url(), s3.options()
    with pw.Checkpoint(url, state, store="icechunk", storage_options=opts,
                       chunk_bytes=chunk_bytes) as ck:
        for _ in range(data.draw(st.integers(1, 6), label="saves")):
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
                    state[name] = np.resize(old, (old.size + data.draw(
                        st.integers(-old.size + 1, 999)),))
                elif len(state) > 1:
                    del state[name]
            g = ck.save()
            assert g.number == len(model)
            model.append(copy_state(state))
    assert [g.number for g in pw.checkpoint.generations(url, storage_options=opts)] == \
        list(range(len(model)))
    for n, want in enumerate(model):
        assert same_state(pw.checkpoint.load(url, n, storage_options=opts), want), \
            f"generation {n}"
    assert pw.checkpoint.verify(url, storage_options=opts) == []


def _plain_zarr(url: str, opts: dict[str, Any], snapshot: str | None = None
                ) -> dict[str, np.ndarray]:
    """Read a checkpoint with icechunk and zarr only."""
    bucket, prefix = url[len("s3://"):].split("/", 1)
    storage = icechunk.s3_storage(bucket=bucket, prefix=prefix, allow_http=True,
                                  force_path_style=True, **opts)
    repo = icechunk.Repository.open(storage)
    session = (repo.readonly_session(snapshot_id=snapshot) if snapshot
               else repo.readonly_session("main"))
    group = zarr.open_group(session.store, mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def test_the_arrays_are_plain_zarr_with_their_dtype_and_shape(s3: S3Server) -> None:
    state = {"grid": np.arange(300 * 700, dtype=np.float64).reshape(300, 700),
             "fortran": np.asfortranarray(np.arange(5 * 7 * 9, dtype=np.int32).reshape(5, 7, 9)),
             "big": np.arange(50, dtype=">f4"),
             "records": np.zeros(40, [("x", "<i2"), ("y", "<f8")]),
             "scalar": np.array(2.5)}
    url = s3.url()
    with pw.Checkpoint(url, state, store="icechunk", storage_options=s3.options(),
                       chunk_bytes=8192) as ck:
        ck.save()
        state["grid"][123, 456] = -1.0
        state["fortran"][4, 6, 8] = 77
        state["records"]["y"][3] = 9.5
        ck.save()
    plain = _plain_zarr(url, s3.options(endpoint_url=s3.endpoint))
    assert sorted(plain) == sorted(state)
    for name, want in state.items():
        got = plain[name]
        assert got.shape == want.shape and got.dtype.newbyteorder("=") == \
            want.dtype.newbyteorder("="), name
        assert np.array_equal(got, want), name
    # Each generation is an Icechunk commit a plain reader can check out.
    first = pw.checkpoint.describe(url, storage_options=s3.options())
    snap0 = next(r for r in first if isinstance(r, dict))["snapshot"]
    assert _plain_zarr(url, s3.options(endpoint_url=s3.endpoint), snap0)["grid"][123, 456] \
        == 123 * 700 + 456


def test_a_save_writes_only_the_chunks_holding_written_pages(s3: S3Server,
                                                             tmp_path: Path) -> None:
    import mmap

    m = mmap.mmap(-1, 64 * PAGE_SIZE)
    a = np.frombuffer(m, np.uint8)  # alone on its pages: the pages written are exact
    chunk = 4 * PAGE_SIZE
    url = s3.url()
    with pw.Checkpoint(url, a, store="icechunk", storage_options=s3.options(),
                       chunk_bytes=chunk) as ck:
        g0 = ck.save()
        assert g0.nbytes == a.nbytes and g0.pages == 64
        a[5 * PAGE_SIZE + 7] = 1      # chunk 1
        a[40 * PAGE_SIZE:43 * PAGE_SIZE] = 2   # chunk 10
        a[47 * PAGE_SIZE:49 * PAGE_SIZE] = 3   # chunks 11 and 12
        g1 = ck.save()
        assert g1.pages == 6 and g1.nbytes == 4 * chunk
        g2 = ck.save()  # nothing written
        assert g2.pages == 0 and g2.nbytes == 0
    rec = [r for r in pw.checkpoint.describe(url, storage_options=s3.options())
           if isinstance(r, dict)]
    assert rec[1]["arrays"][0]["chunks"] == [[1, 2], [10, 13]]
    assert same(pw.checkpoint.load(url, storage_options=s3.options())["arr_0"], a)


def test_the_chunk_grid_cuts_memory_order_into_contiguous_ranges() -> None:
    for shape, itemsize, fortran, target in [((300, 700), 8, False, 8192),
                                             ((5, 7, 9), 4, True, 100), ((10,), 1, False, 3),
                                             ((4, 1000), 8, False, 100), ((), 8, False, 16)]:
        g = ChunkGrid.of(shape, itemsize, fortran, target)
        lo, hi = g.span(np.arange(g.count))
        nbytes = int(np.prod(shape)) * itemsize
        assert lo[0] == 0 and hi[-1] == nbytes and (lo[1:] == hi[:-1]).all(), shape
        assert (hi - lo).max() <= max(target, itemsize) or g.chunk_bytes <= max(target,
                                                                                 itemsize)
        assert (g.of_bytes(lo) == np.arange(g.count)).all()
        assert (g.of_bytes(hi - 1) == np.arange(g.count)).all()


# ---- two writers --------------------------------------------------------------------------

def test_a_writer_whose_branch_moved_gets_a_conflict_and_nothing_is_lost(s3: S3Server) -> None:
    url, opts = s3.url(), s3.options()
    mine = {"v": np.zeros(5000)}
    theirs = {"v": np.full(5000, 7.0)}
    a = pw.Checkpoint(url, mine, store="icechunk", storage_options=opts)
    a.save()                                             # generation 0: mine
    with pw.Checkpoint(url, theirs, store="icechunk", storage_options=opts) as b:
        assert b.save().number == 1                      # generation 1: theirs
    mine["v"][10] = 1.0
    with pytest.raises(CheckpointConflict, match=r"another writer committed generation 1 "
                                                 r"to branch 'main'.*nothing was written"):
        a.save()
    with pytest.raises(CheckpointConflict):              # and again: this object is done
        a.save()
    a.close()
    assert [g.number for g in pw.checkpoint.generations(url, storage_options=opts)] == [0, 1]
    assert pw.checkpoint.load(url, 0, storage_options=opts)["v"].sum() == 0
    assert same_state(pw.checkpoint.load(url, 1, storage_options=opts), theirs)
    with pw.Checkpoint(url, mine, store="icechunk", storage_options=opts) as again:
        assert again.save().number == 2                  # a base: everything of mine
    assert same_state(pw.checkpoint.load(url, storage_options=opts), mine)


def test_two_writers_committing_at_once_the_loser_gets_icechunks_conflict(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url, opts = s3.url(), s3.options()
    mine = {"v": np.zeros(5000)}
    theirs = {"v": np.full(5000, 3.0)}
    a = pw.Checkpoint(url, mine, store="icechunk", storage_options=opts)
    a.save()
    b = pw.Checkpoint(url, theirs, store="icechunk", storage_options=opts)
    begin = IcechunkStore.begin

    def begin_then_the_other_commits(self: IcechunkStore, *args: Any) -> Any:
        txn = begin(self, *args)         # a's session is open on generation 0 ...
        monkeypatch.undo()
        b.save()                          # ... when b commits generation 1
        return txn

    monkeypatch.setattr(IcechunkStore, "begin", begin_then_the_other_commits)
    mine["v"][:100] = 5.0
    with pytest.raises(CheckpointConflict, match=r"while generation 1 was being saved "
                                                 r"\(Icechunk: .*\).*not committed"):
        a.save()
    assert [g.number for g in b.generations()] == [0, 1]
    assert same_state(pw.checkpoint.load(url, 1, storage_options=opts), theirs)
    assert pw.checkpoint.load(url, 0, storage_options=opts)["v"].sum() == 0
    b.close()
    a.close()
    assert pw.checkpoint.verify(url, storage_options=opts) == []


# ---- failures mid-save --------------------------------------------------------------------

SAVER = r"""
import sys, numpy as np, pagewatch as pw
url, endpoint = sys.argv[1], sys.argv[2]
opts = dict(endpoint_url=endpoint, access_key_id="test", secret_access_key="test",
            region="us-east-1")
rng = np.random.default_rng(5)
state = {"a": np.zeros(1 << 18, np.uint8), "b": np.zeros(3000)}
ck = pw.Checkpoint(url, state, store="icechunk", storage_options=opts, chunk_bytes=4096)
for g in range(3):
    state["a"][rng.integers(0, state["a"].size, 20)] = g + 1
    state["b"][g] = g
    ck.save()
    print("saved", g, flush=True)
    if g == 1:
        sys.stdin.readline()  # the test arms the server, then lets the save go
"""


def model_of_saver(g: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    state = {"a": np.zeros(1 << 18, np.uint8), "b": np.zeros(3000)}
    for k in range(g + 1):
        state["a"][rng.integers(0, state["a"].size, 20)] = k + 1
        state["b"][k] = k
    return state


def test_a_saver_killed_mid_save_leaves_the_previous_commit_loadable(own_s3: S3Server) -> None:
    url = own_s3.url()
    prefix = url.split("/", 3)[3]
    child = subprocess.Popen([sys.executable, "-c", SAVER, url, own_s3.endpoint], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        for g in range(2):
            assert child.stdout.readline().split() == ["saved", str(g)]
        own_s3.pause_at_put(3, f"/{prefix}/chunks/")   # stop at the 3rd chunk of the save
        child.stdin.write("go\n")
        child.stdin.flush()
        wait_for("the server to stop in the middle of the save", own_s3.stopped)
        child.kill()                                    # SIGKILL, 2 chunks stored, no commit
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.kill(own_s3.pid, signal.SIGCONT)
    opts = own_s3.options()
    assert [g.number for g in pw.checkpoint.generations(url, storage_options=opts)] == [0, 1]
    for g in range(2):
        assert same_state(pw.checkpoint.load(url, g, storage_options=opts), model_of_saver(g))
    assert pw.checkpoint.verify(url, storage_options=opts) == []
    state = model_of_saver(2)
    with pw.Checkpoint(url, state, store="icechunk", storage_options=opts) as ck:
        assert ck.save().number == 2                    # the next writer continues
    assert same_state(pw.checkpoint.load(url, storage_options=opts), state)


def test_the_server_going_away_mid_save_is_a_clear_error_and_the_repository_intact(
        own_s3: S3Server) -> None:
    url = own_s3.url()
    prefix = url.split("/", 3)[3]
    opts = own_s3.options(max_tries=1)
    store = IcechunkStore(url, storage_options=opts, chunk_bytes=4096)
    state = {"a": np.zeros(1 << 17, np.uint8)}
    model = []
    with pw.Checkpoint(store, state) as ck:
        for g in range(2):
            state["a"][g * 50_000:g * 50_000 + 9000] = g + 1
            ck.save()
            model.append(copy_state(state))
        state["a"][:] = 9
        own_s3.pause_at_put(5, f"/{prefix}/chunks/")
        # The failure is the server's silence: a request unanswered for 2 s fails the save
        # (set now, so that the saves before it cannot be failed by a slow machine).
        store.save_timeout = 2
        with pytest.raises(CheckpointError, match=rf"{url}: saving generation 2 failed, "
                                                  r"nothing of it is committed: writing a "
                                                  r"chunk had no answer within 2 s"):
            ck.save()
        assert own_s3.stopped()
        os.kill(own_s3.pid, signal.SIGCONT)             # the server is back, as it was
        store.save_timeout = 60
        assert [g.number for g in ck.generations()] == [0, 1]
        for g in range(2):
            assert same_state(ck.load(g), model[g])
        assert ck.save().number == 2                    # a base: the trackers were reset
        model.append(copy_state(state))
    assert same_state(pw.checkpoint.load(url, storage_options=opts), model[2])
    assert pw.checkpoint.verify(url, storage_options=opts) == []
    own_s3.proc.kill()                                  # gone for good (and its memory)
    own_s3.proc.wait()
    gone = IcechunkStore(url, storage_options=opts)
    gone.save_timeout = 2  # Icechunk retries a refused connection for a minute otherwise
    with pytest.raises(CheckpointError, match=rf"{url}: looking for the repository "
                                              r"(failed: .+|had no answer within 2 s)"), \
            pw.Checkpoint(gone, state) as ck:
        ck.save()


# ---- damage, the local folder, options ----------------------------------------------------

def test_verify_names_a_missing_or_altered_chunk_and_the_generations_that_need_it(
        tmp_path: Path) -> None:
    path = tmp_path / "ck.icechunk"
    v = np.zeros(8 * PAGE_SIZE, np.uint8)
    chunks = path / "chunks"
    with pw.Checkpoint(path, {"v": v}, store="icechunk", chunk_bytes=PAGE_SIZE) as ck:
        ck.save()
        before = set(os.listdir(chunks))
        v[3 * PAGE_SIZE:5 * PAGE_SIZE] = 1
        ck.save()
        new = sorted(set(os.listdir(chunks)) - before)
        v[7 * PAGE_SIZE] = 2
        ck.save()
    assert len(new) >= 2
    assert pw.checkpoint.verify(path) == []
    assert [g.number for g in pw.checkpoint.generations(path)] == [0, 1, 2]  # auto: Icechunk
    f = chunks / new[0]
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0xFF
    f.write_bytes(raw)
    problems = pw.checkpoint.verify(path)
    assert [(p.generation, p.array, p.part) for p in problems] == [(1, "v", "data"),
                                                                    (2, "v", "chain")]
    assert "checksum mismatch" in problems[0].reason
    (chunks / new[1]).unlink()
    problems = pw.checkpoint.verify(path)
    assert (problems[0].generation, problems[0].part) == (1, "data")
    with pytest.raises(CheckpointDamaged, match=r"generation 1, array 'v', data: a chunk "
                                                r"is missing"):
        pw.checkpoint.load(path, 1)


def test_compact_refuses_an_icechunk_checkpoint_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "ck.icechunk"
    with pw.Checkpoint(path, np.zeros(10), store="icechunk") as ck:
        ck.save()
        with pytest.raises(CheckpointError, match="no chains to compact.*expire_snapshots"):
            ck.compact()
    with pytest.raises(CheckpointError, match="no chains to compact"):
        pw.checkpoint.compact(path)


def test_a_missing_icechunk_names_the_extra_to_install(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "icechunk", None)
    with pytest.raises(CheckpointError, match=r"pip install 'pagewatch\[icechunk\]'"):
        pw.Checkpoint(tmp_path / "x", np.zeros(10), store="icechunk")
    with pytest.raises(CheckpointError, match=r"pagewatch\[icechunk\]"):
        pw.checkpoint.load("s3://bucket/x")


def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown storage option"):
        pw.Checkpoint("s3://b/x", np.zeros(3), store="icechunk", storage_options={"nope": 1})
    with pytest.raises(ValueError, match="options of store='icechunk'"):
        pw.Checkpoint(tmp_path / "x", np.zeros(3), chunk_bytes=4096)
    with pytest.raises(CheckpointError, match="compression must be 'none'"):
        pw.Checkpoint(tmp_path / "y", np.zeros(3), store="icechunk", compression="zstd")
    with pytest.raises(CheckpointError, match="cannot name a Zarr array"), \
            pw.Checkpoint(tmp_path / "z", {"a/b": np.zeros(3)}, store="icechunk") as ck:
        ck.save()


# ---- the CLI ------------------------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagewatch.cli", "checkpoint", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE,
                          env={**os.environ, **(env or {})})


@pytest.mark.kernel_independent
def test_the_command_ends_without_finalizing_the_interpreter_once_icechunk_ran(
        tmp_path: Path) -> None:
    # Icechunk's runtime threads may touch Python objects while the interpreter finalizes:
    # 'checkpoint verify' on S3 once printed its result and then died of SIGABRT (rc -6,
    # beside a CPU hog).  The command ends with os._exit once icechunk was loaded: an atexit
    # callback, which runs only in a finalizing interpreter, must not run; the output must
    # be whole and the status the command's.
    where = tmp_path / "ck"
    with pw.Checkpoint(str(where), {"v": np.arange(100.0)}, store="icechunk") as ck:
        ck.save()
    wrapper = ("import atexit, sys\n"
               "atexit.register(lambda: print('finalized', flush=True))\n"
               "from pagewatch.cli import main\n"
               "sys.exit(main())\n")
    r = subprocess.run([sys.executable, "-c", wrapper, "checkpoint", "verify", str(where)],
                       capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE)
    assert r.returncode == 0, r.stderr
    assert "every checksum good" in r.stdout and "finalized" not in r.stdout
    # Without icechunk the interpreter finalizes as usual.
    plain = subprocess.run([sys.executable, "-c", wrapper, "--version"], capture_output=True,
                           text=True, cwd=ROOT, timeout=PATIENCE)
    assert plain.returncode == 0 and "finalized" in plain.stdout


def test_cli_lists_verifies_and_restores_an_s3_checkpoint(s3: S3Server, tmp_path: Path) -> None:
    url, opts = s3.url(), s3.options()
    state = {"v": np.arange(3000.0), "w": np.zeros((30, 40), np.int16)}
    with pw.Checkpoint(url, state, store="icechunk", storage_options=opts) as ck:
        ck.save()
        state["v"][7] = -1
        ck.save()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1"}
    where = [url, "--endpoint-url", s3.endpoint]
    ls = run_cli("ls", *where, env=env)
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert "base" in lines[1] and "delta" in lines[2] and lines[-1].startswith("2 generations")
    ok = run_cli("verify", *where, env=env)
    assert ok.returncode == 0 and "2 generations, every checksum good" in ok.stdout, ok.stderr
    out = tmp_path / "g1.npz"
    r = run_cli("restore", *where, "-g", "1", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert same_state({k: z[k] for k in z.files}, state)
    c = run_cli("compact", *where, env=env)
    assert c.returncode == 1 and "no chains to compact" in c.stderr
    gone = run_cli("ls", f"s3://{BUCKET}/nothing-here", "--endpoint-url", s3.endpoint, env=env)
    assert gone.returncode == 1 and "no checkpoint at" in gone.stderr



def test_bench_section_compares_a_1_percent_save_with_a_full_write() -> None:
    from pagewatch import bench
    from pagewatch.bench import checkpoint_icechunk as icebench

    r = icebench.measure("smoke", nbytes=1 << 20)   # 256 pages: 2 random, 1 run of 16
    # Times are the machine's; what must hold is what was sent, in how many requests.
    assert r["chunk_bytes"] == 8192 and r["full_requests"] == 128
    assert r["random"]["pages"] == 2 and r["random"]["requests"]["max"] <= 2
    assert r["runs"]["pages"] == 16 and 8 <= r["runs"]["requests"]["max"] <= 9
    assert r["runs"]["payload_per_page"]["max"] <= 1.125  # 16 pages in 8 or 9 chunks of 2
    assert r["runs"]["sent_per_page"]["min"] >= 1.0
    assert r["full_sent_per_byte"] >= 1.0
    text = bench.report.render_text({"checkpoint_icechunk": r, "backends": {}, "floor": {},
                                     "alternatives": {}})
    assert "checkpoint to Icechunk on a local S3 server: 1 MiB" in text
    assert "full write" in text and "chunk PUTs" in text


def test_bench_command_takes_the_array_size_in_mib(capsys: pytest.CaptureFixture[str]) -> None:
    from pagewatch.bench import checkpoint_icechunk as icebench

    assert icebench.main(["--mode", "smoke", "--mib", "1"]) == 0
    assert "checkpoint to Icechunk on a local S3 server: 1 MiB" in capsys.readouterr().out
