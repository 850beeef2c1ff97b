"""The Icechunk checkpoint part of ``pagewatch bench``: incremental saves to a local S3 server.

moto's S3 server runs in a process of its own on 127.0.0.1 (``pip install 'moto[server]'``,
in the ``test`` extra); one array (256 MiB in ``full`` mode, 64 MiB in ``quick``, 8 MiB in
``smoke``) is saved to it:

* ``save_random`` / ``save_runs``: :meth:`pagewatch.Checkpoint.save` after 1 % of the pages
  were written, chosen at random (``random``) or as runs of 16 contiguous pages at random
  places, not aligned to chunks (``runs``);
* ``full``: writing the whole array to the same store (a first save: every chunk), each
  interleaved with the incremental saves;
* ``sent_per_page``: the bytes a save adds to the bucket (chunks, manifest, snapshot,
  transaction log: every object it created) per byte of pages written.

``python -m pagewatch.bench.checkpoint_icechunk --chunks`` measures the chunk-size table
(amplification against requests, at several chunk sizes) the default chunk size comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from .measures import MiB, stat

__all__ = ["measure", "chunk_table", "table_rows", "SIZES", "available"]

SIZES = {"smoke": 8 * MiB, "quick": 64 * MiB, "full": 256 * MiB}
REPS = {"smoke": 2, "quick": 3, "full": 3}
RUN_PAGES = 16
BUCKET = "pagewatch-bench"
KEYS = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}


def available() -> str | None:
    """``None`` when the bench can run, else why not."""
    if sys.version_info < (3, 11):
        return "icechunk needs Python >= 3.11"
    for mod, extra in (("icechunk", "icechunk"), ("zarr", "icechunk"), ("moto", "test"),
                       ("boto3", "test")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install 'pagewatch[{extra}]')"
    return None


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, in its own process; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT"),
                                       timeout=10).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def _bucket_bytes(client: Any, prefix: str) -> tuple[int, int]:
    """``(objects, bytes)`` under ``prefix``."""
    n = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                 Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            n += 1
            size += o["Size"]
    return n, size


def _array(nbytes: int) -> np.ndarray:
    m = mmap.mmap(-1, nbytes)
    a = np.frombuffer(m, np.uint8)
    a.view(np.uint64)[:] = np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return a


def _pages(rng: np.random.Generator, npages: int, k: int, pattern: str) -> np.ndarray:
    if pattern == "random":
        return rng.choice(npages, k, replace=False)
    runs = max(1, k // RUN_PAGES)
    # anywhere, not aligned to a chunk: each slot of RUN_PAGES * 2 pages holds one run
    slots = rng.choice(npages // (2 * RUN_PAGES), runs, replace=False) * 2 * RUN_PAGES
    starts = slots + rng.integers(0, RUN_PAGES, runs)
    return (starts[:, None] + np.arange(RUN_PAGES)).ravel()


def _session(endpoint: str, nbytes: int, chunk_bytes: int, reps: int, fraction: float,
             seed: int, full_reps: int) -> dict[str, Any]:
    import boto3

    from .. import checkpoint as ckpt

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEYS["access_key_id"],
                          aws_secret_access_key=KEYS["secret_access_key"],
                          region_name=KEYS["region"])
    opts = {"endpoint_url": endpoint, **KEYS}
    ps = mmap.PAGESIZE
    npages = nbytes // ps
    k = max(1, int(npages * fraction))
    rng = np.random.default_rng(seed)
    a = _array(nbytes)
    out: dict[str, Any] = {"full": [], "full_sent": [], "full_requests": 0}
    prefix = uuid.uuid4().hex[:10]
    with ckpt.Checkpoint(f"s3://{BUCKET}/{prefix}", a, store="icechunk", storage_options=opts,
                         chunk_bytes=chunk_bytes) as ck:
        ck.save()
        out["full_requests"] = -(-nbytes // chunk_bytes)
        for pattern in ("random", "runs"):
            times, sent, payload, chunks = [], [], [], []
            for i in range(reps):
                pages = _pages(rng, npages, k, pattern)
                a[pages * ps + rng.integers(0, ps, len(pages))] += np.uint8(1)
                before = _bucket_bytes(client, prefix)
                t = time.perf_counter()
                g = ck.save()
                times.append(time.perf_counter() - t)
                after = _bucket_bytes(client, prefix)
                sent.append((after[1] - before[1]) / (len(pages) * ps))
                payload.append(g.nbytes / (len(pages) * ps))
                chunks.append(-(-g.nbytes // chunk_bytes))  # chunks are padded to full size
                if len(out["full"]) < full_reps and (pattern == "random" or i % 2):
                    # the whole array to the same store, interleaved: a first save
                    p2 = uuid.uuid4().hex[:10]
                    with ckpt.Checkpoint(f"s3://{BUCKET}/{p2}", a, store="icechunk",
                                         storage_options=opts, chunk_bytes=chunk_bytes) as fk:
                        t = time.perf_counter()
                        fk.save()
                        out["full"].append(time.perf_counter() - t)
                    out["full_sent"].append(_bucket_bytes(client, p2)[1])
            out[pattern] = {"save": times, "sent_per_page": sent, "payload_per_page": payload,
                            "requests": chunks, "pages": len(pages)}
    return out


def measure(mode: str = "quick", fraction: float = 0.01, seed: int = 1,
            chunk_bytes: int | None = None, nbytes: int | None = None) -> dict[str, Any]:
    """Save figures for one array of ``SIZES[mode]`` (or ``nbytes``) bytes on a local S3
    server."""
    why = available()
    if why:
        return {"unavailable": why}
    from ..checkpoint._icechunk import DEFAULT_CHUNK_BYTES

    cb = chunk_bytes or DEFAULT_CHUNK_BYTES
    nbytes = nbytes or SIZES[mode]
    with s3_server() as endpoint:
        r = _session(endpoint, nbytes, cb, REPS[mode], fraction, seed,
                     full_reps=2 if mode != "smoke" else 1)
    full_m = statistics.median(r["full"])
    res: dict[str, Any] = {"bytes": nbytes, "fraction": fraction, "chunk_bytes": cb,
                           "full": stat(r["full"], "s"),
                           "full_requests": r["full_requests"],
                           "full_sent_per_byte": statistics.median(r["full_sent"]) / nbytes}
    for pattern in ("random", "runs"):
        p = r[pattern]
        res[pattern] = {"save": stat(p["save"], "s"), "pages": p["pages"],
                        "sent_per_page": stat(p["sent_per_page"], "x"),
                        "payload_per_page": stat(p["payload_per_page"], "x"),
                        "requests": stat(p["requests"], "chunks"),
                        "speedup": full_m / statistics.median(p["save"]),
                        "speedup_best": min(r["full"]) / min(p["save"])}
    return res


def chunk_table(nbytes: int = 32 * MiB, sizes: tuple[int, ...] = (4096, 8192, 16384, 65536,
                                                                  262144, 1 << 20),
                fraction: float = 0.01, reps: int = 3) -> list[dict[str, Any]]:
    """For each chunk size: bytes sent and requests of a 1 % save (random pages, runs), and
    the requests and time of a full write."""
    rows = []
    with s3_server() as endpoint:
        for cb in sizes:
            r = _session(endpoint, nbytes, cb, reps, fraction, seed=7, full_reps=1)
            rows.append({"chunk_bytes": cb, "full": r["full"][0],
                         "full_requests": r["full_requests"],
                         **{f"{p}_{k}": statistics.median(r[p][k])
                            for p in ("random", "runs")
                            for k in ("save", "sent_per_page", "requests")}})
    return rows


def table_rows(r: dict[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """``(title, columns, rows, caption)`` of the report's Icechunk checkpoint table."""
    from .report import figure, fmt

    size = f"{r['bytes'] // MiB} MiB"
    rows = []
    for pattern, what in (("random", "random pages"),
                          ("runs", f"runs of {RUN_PAGES} pages")):
        p = r[pattern]
        rows.append([f"save, {r['fraction'] * 100:g} % written ({p['pages']} pages, {what})",
                     figure(p["save"]), f"full write {figure(r['full'])}",
                     f"{fmt(p['speedup'])}x faster, best runs {fmt(p['speedup_best'])}x "
                     "(target >= 20x)"])
        rows.append([f"  bytes sent per byte of pages written ({what})",
                     figure(p["sent_per_page"]), "", f"{fmt(p['requests']['median'])} chunk "
                     "PUTs"])
    caption = (f"{size} array, {r['chunk_bytes'] // 1024} KiB chunks, moto's S3 server on "
               f"127.0.0.1; a full write is {r['full_requests']} chunk PUTs "
               f"({fmt(r['full_sent_per_byte'])} bytes sent per byte)")
    return (f"checkpoint to Icechunk on a local S3 server: {size}, seconds",
            ["", "pagewatch", "full write", "ratio"], rows, caption)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(SIZES), default="full")
    p.add_argument("--mib", type=int, default=None,
                   help="the array's size in MiB instead of the mode's (1024: the 1 GiB figure)")
    p.add_argument("--chunks", action="store_true",
                   help="the chunk-size table instead (32 MiB, 4 KiB to 1 MiB chunks)")
    args = p.parse_args(argv)
    why = available()
    if why:
        print(f"not measured: {why}")
        return 1
    if args.chunks:
        print("chunk  | full write: PUTs, s | 1 % random: sent/page, PUTs, s | "
              f"1 % runs of {RUN_PAGES}: sent/page, PUTs, s")
        for c in chunk_table():
            print(f"{c['chunk_bytes'] // 1024:>4} KiB | {c['full_requests']:>6} "
                  f"{c['full']:6.2f} | {c['random_sent_per_page']:6.2f}x "
                  f"{c['random_requests']:5.0f} {c['random_save']:6.3f} | "
                  f"{c['runs_sent_per_page']:6.2f}x {c['runs_requests']:5.0f} "
                  f"{c['runs_save']:6.3f}", flush=True)
        return 0
    title, cols, rows, caption = table_rows(
        measure(args.mode, nbytes=args.mib * MiB if args.mib else None))
    print(title)
    for row in [cols, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, (52, 24, 26, 40), strict=True)))
    print(caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

