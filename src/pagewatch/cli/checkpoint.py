"""``pagewatch checkpoint ls|verify|compact|restore PATH``: look after a checkpoint, on disk
or in an Icechunk repository (``s3://bucket/prefix`` or a folder)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

EPILOG = """\
examples:
  pagewatch checkpoint ls run.pwck                  every generation: base or delta, size, pages
  pagewatch checkpoint verify run.pwck              re-check every checksum (exit 1 if damaged)
  pagewatch checkpoint compact run.pwck             fold the newest chain into a base, drop older
  pagewatch checkpoint restore run.pwck -g 3 -o state.npz   generation 3 as .npz (or a folder of .npy)
  pagewatch checkpoint ls s3://bucket/run --endpoint-url http://127.0.0.1:9000
                                                    an Icechunk checkpoint (credentials: AWS_* env)

An Icechunk checkpoint (s3:// URL, or a folder holding an Icechunk repository) has no
chains: every generation is a whole snapshot, so 'compact' refuses and says what to use.
"""


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="a checkpoint folder or s3://bucket/prefix")
    p.add_argument("--store", choices=("auto", "local", "icechunk"), default="auto",
                   help="the checkpoint's kind (default: auto, Icechunk for s3:// URLs and "
                        "Icechunk folders)")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="an S3-compatible service (default: AWS, or $AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="the S3 region (default: $AWS_REGION)")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``store`` and ``storage_options`` for the checkpoint functions."""
    opts: dict[str, Any] = {}
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if args.path.startswith("s3://") or args.store == "icechunk":
        if endpoint:
            opts["endpoint_url"] = endpoint
        if region:
            opts["region"] = region
    elif args.endpoint_url or args.region:
        print("pagewatch checkpoint: --endpoint-url and --region are for s3:// URLs",
              file=sys.stderr)
        raise SystemExit(2)
    return {"store": args.store, "storage_options": opts or None}


def register(sub: Any) -> None:
    p = sub.add_parser("checkpoint", help="list, verify, compact or restore a checkpoint",
                       description="Look after a checkpoint written by pagewatch.Checkpoint.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", help="what to do")
    cmds.required = True
    ls = cmds.add_parser("ls", help="list the generations")
    _where(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per generation")
    ls.set_defaults(func=run_ls)
    v = cmds.add_parser("verify", help="re-check every checksum; exit 1 when damaged")
    _where(v)
    v.set_defaults(func=run_verify)
    c = cmds.add_parser("compact", help="rewrite a generation as a base (and drop older ones)")
    _where(c)
    c.add_argument("-g", "--generation", type=int, default=-1,
                   help="which generation (default: the newest; negative counts back)")
    c.add_argument("--keep-history", action="store_true",
                   help="keep the generations before it (default: remove them)")
    c.set_defaults(func=run_compact)
    r = cmds.add_parser("restore", help="write a generation's arrays to .npz or .npy files")
    _where(r)
    r.add_argument("-g", "--generation", type=int, default=-1,
                   help="which generation (default: the newest; negative counts back)")
    r.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.npz (one file) or a folder (one NAME.npy per array)")
    r.add_argument("-f", "--force", action="store_true", help="overwrite what is there")
    r.set_defaults(func=run_restore)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def run_ls(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointDamaged, describe

    rows = list(describe(args.path, **_options(args)))
    if args.json:
        for r in rows:
            if isinstance(r, CheckpointDamaged):
                print(json.dumps({"generation": r.generation, "damaged": str(r)}))
            else:
                print(json.dumps({k: r[k] for k in ("generation", "kind", "parent", "time",
                                                     "nbytes", "pages", "checksum",
                                                     "compression")}
                                 | {"arrays": [{k: e[k] for k in ("name", "descr", "shape",
                                                                   "kind", "pages")}
                                               for e in r["arrays"]]}))
        return 0
    print(f"{'gen':>6}  {'saved':<19}  {'kind':<5}  {'parent':>6}  {'size':>10}  {'pages':>9}"
          "  arrays")
    total = 0
    for r in rows:
        if isinstance(r, CheckpointDamaged):
            print(f"{r.generation:>6}  DAMAGED: {r}")
            continue
        total += r["nbytes"]
        names = ", ".join(f"{e['name']}{'' if e['kind'] == 'delta' else '*'}"
                          for e in r["arrays"])
        parent = "" if r["parent"] is None else str(r["parent"])
        print(f"{r['generation']:>6}  {_when(r['time'])}  {r['kind']:<5}  {parent:>6}  "
              f"{_size(r['nbytes']):>10}  {r['pages']:>9}  {names}")
    print(f"{len(rows)} generations, {_size(total)} on disk (* = a full entry of that array)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..checkpoint import _store_of, verify

    opts = _options(args)
    store = _store_of(args.path, opts["store"], opts["storage_options"])
    have = store.generations()
    problems = verify(store)
    for p in problems:
        print(p)
    bad = sorted({p.generation for p in problems})
    if bad:
        print(f"pagewatch checkpoint: {len(bad)} of {len(have)} generations cannot be loaded: "
              f"{', '.join(map(str, bad))}")
        return 1
    print(f"{len(have)} generations, every checksum good")
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from ..checkpoint import _local, _store_of, compact

    opts = _options(args)
    # An Icechunk checkpoint is refused here, with what to use instead.
    store = _local(_store_of(args.path, opts["store"], opts["storage_options"]), "compact")
    before = _disk(args.path)
    g = compact(store, args.generation, prune=not args.keep_history)
    print(f"generation {g.number} is a base now ({_size(g.nbytes)}, {g.pages} pages); "
          f"{_size(before)} -> {_size(_disk(args.path))} on disk")
    return 0


def _disk(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.name.endswith(".pwg"))


def run_restore(args: argparse.Namespace) -> int:
    import numpy as np

    from ..checkpoint import load
    from ..errors import PagewatchError
    from . import check_writable

    out = args.output
    if os.path.exists(out) and not args.force:
        print(f"pagewatch checkpoint: {out} exists (-f overwrites)")
        return 1
    if out.endswith(".npz"):
        check_writable(out)
        state = load(args.path, args.generation, **_options(args))
        np.savez(out, **state)  # type: ignore[arg-type]
        names = [f"{out}[{k}]" for k in state]
    else:
        state = load(args.path, args.generation, **_options(args))
        os.makedirs(out, exist_ok=True)
        names = []
        for name, a in state.items():
            if os.sep in name or name in (".", ".."):
                raise PagewatchError(f"array {name!r} cannot be a file name: restore to "
                                     "OUT.npz instead")
            file = os.path.join(out, f"{name}.npy")
            np.save(file, a)
            names.append(file)
    print(f"wrote {len(names)} arrays: {', '.join(names)}")
    return 0
