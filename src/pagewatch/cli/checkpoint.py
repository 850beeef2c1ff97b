"""``pagewatch checkpoint ls|verify|compact|restore PATH``: look after a checkpoint on disk."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

EPILOG = """\
examples:
  pagewatch checkpoint ls run.pwck                  every generation: base or delta, size, pages
  pagewatch checkpoint verify run.pwck              re-check every checksum (exit 1 if damaged)
  pagewatch checkpoint compact run.pwck             fold the newest chain into a base, drop older
  pagewatch checkpoint restore run.pwck -g 3 -o state.npz   generation 3 as .npz (or a folder of .npy)
"""


def register(sub: Any) -> None:
    p = sub.add_parser("checkpoint", help="list, verify, compact or restore a checkpoint",
                       description="Look after a checkpoint written by pagewatch.Checkpoint.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="action", metavar="ACTION", help="what to do")
    cmds.required = True
    ls = cmds.add_parser("ls", help="list the generations")
    ls.add_argument("path", metavar="PATH")
    ls.add_argument("--json", action="store_true", help="one JSON object per generation")
    ls.set_defaults(func=run_ls)
    v = cmds.add_parser("verify", help="re-check every checksum; exit 1 when damaged")
    v.add_argument("path", metavar="PATH")
    v.set_defaults(func=run_verify)
    c = cmds.add_parser("compact", help="rewrite a generation as a base (and drop older ones)")
    c.add_argument("path", metavar="PATH")
    c.add_argument("-g", "--generation", type=int, default=-1,
                   help="which generation (default: the newest; negative counts back)")
    c.add_argument("--keep-history", action="store_true",
                   help="keep the generations before it (default: remove them)")
    c.set_defaults(func=run_compact)
    r = cmds.add_parser("restore", help="write a generation's arrays to .npz or .npy files")
    r.add_argument("path", metavar="PATH")
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

    rows = list(describe(args.path))
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
    from ..checkpoint import LocalStore, verify

    have = LocalStore(args.path).generations()
    problems = verify(args.path)
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
    from ..checkpoint import compact

    before = _disk(args.path)
    g = compact(args.path, args.generation, prune=not args.keep_history)
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
        state = load(args.path, args.generation)
        np.savez(out, **state)  # type: ignore[arg-type]
        names = [f"{out}[{k}]" for k in state]
    else:
        state = load(args.path, args.generation)
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
