"""``pagewatch bench --snapshot``: the Snapshot section (src/pagewatch/bench/snapshot.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

#: array size and repeats per mode
SIZES = {"smoke": (4 << 20, 1), "quick": (256 << 20, 3), "full": (1 << 30, 5)}


def run_snapshot_bench(args: argparse.Namespace, backends: Sequence[str] | None) -> int:
    from ..bench import snapshot

    if args.plot:
        print("pagewatch bench: --plot does not draw the --snapshot section", file=sys.stderr)
        return 2
    nbytes, reps = SIZES[args.mode or "quick"]

    def say(i: int, n: int, label: str) -> None:
        print(f"[{i}/{n}] {label}", file=sys.stderr)

    result = snapshot.run(nbytes, backends=backends, reps=reps, progress=say)
    print(snapshot.render_text(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0
