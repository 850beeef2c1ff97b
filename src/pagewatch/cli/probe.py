"""``pagewatch probe`` and ``pagewatch backends``: what this machine offers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..backends.base import backends
from ..kernel.probe import Capability, probe


def register(sub: Any) -> None:
    p = sub.add_parser("probe", help="test every kernel feature pagewatch can use")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_probe)
    b = sub.add_parser("backends", help="list the tracking backends and which work here")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=run_backends)


def _mark(c: Capability) -> str:
    return "yes" if c.available else "no "


def run_probe(args: argparse.Namespace) -> int:
    caps = probe()
    infos = backends()
    if args.json:
        d = caps.as_dict()
        d["backends"] = {b.name: {"available": b.available, "reason": b.reason}
                         for b in infos}
        print(json.dumps(d, indent=2))
        return 0
    lines = [
        f"kernel       {caps.kernel} ({caps.arch}), page size {caps.page_size}",
        f"userfaultfd  {_mark(caps.userfaultfd)}  {caps.userfaultfd.reason}",
    ]
    for name in ("WP_ASYNC", "WP_UNPOPULATED", "WP_HUGETLBFS_SHMEM", "PAGEFAULT_FLAG_WP"):
        c = caps.uffd_features[name]
        lines.append(f"  {name:<19} {_mark(c)}  {c.reason}")
    lines.append(f"PAGEMAP_SCAN {_mark(caps.pagemap_scan)}  {caps.pagemap_scan.reason}")
    for name, c in caps.pagemap_scan_categories.items():
        lines.append(f"  PAGE_IS_{name:<11} {_mark(c)}  {c.reason}")
    lines.append(f"async WP     {_mark(caps.uffd_wp_async)}  {caps.uffd_wp_async.reason}")
    lines.append(f"soft-dirty   {_mark(caps.soft_dirty)}  {caps.soft_dirty.reason}")
    lines.append(f"THP          {caps.thp}; hugetlb pages reserved: {caps.hugetlb_pages}")
    lines.append("backends (best first):")
    for b in infos:
        lines.append(f"  {b.name:<11} {'yes' if b.available else 'no '}  {b.reason}")
    print("\n".join(lines))
    return 0


def run_backends(args: argparse.Namespace) -> int:
    infos = backends()
    if args.json:
        print(json.dumps([{"name": b.name, "available": b.available, "reason": b.reason,
                           "summary": b.summary} for b in infos], indent=2))
        return 0
    for b in infos:
        print(f"{b.name:<11} {'yes' if b.available else 'no '}  {b.summary}\n"
              f"{'':<16}{b.reason}")
    return 0
