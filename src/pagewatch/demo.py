"""A small program that writes its memory in phases, for ``make demo`` and the README.

``python -m pagewatch.demo`` allocates a 32 MiB buffer (every page written once: CPython
zero-fills it), then rewrites a hot 4 MiB of it a few times, then walks the whole buffer
writing one byte in every 16th page, then rests.  Tracked with ``pagewatch run``, each phase
shows as its own rate and its own place on the address axis of ``pagewatch plot``.  It needs
nothing but the standard library, so it starts fast.
"""

from __future__ import annotations

import argparse
import time

PAGE = 4096
MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagewatch.demo",
                                     description="write memory in phases, for pagewatch run")
    parser.add_argument("--size", type=int, default=32, metavar="MiB",
                        help="size of the buffer in MiB (default 32)")
    parser.add_argument("--pause", type=float, default=0.6, metavar="S",
                        help="seconds between two phases (default 0.6)")
    args = parser.parse_args(argv)
    size = args.size * MiB

    def phase(text: str) -> None:
        print(f"demo: {text}", flush=True)

    phase(f"phase 1: allocate {args.size} MiB ({size // PAGE} pages written once)")
    buf = bytearray(size)
    time.sleep(args.pause)
    hot = min(size, 4 * MiB)
    phase(f"phase 2: rewrite the first {hot // MiB} MiB three times ({hot // PAGE} pages each)")
    for round_ in range(3):
        for i in range(0, hot, PAGE):
            buf[i] = round_ + 1
        time.sleep(args.pause / 3)
    phase(f"phase 3: one byte in every 16th page of the buffer ({size // PAGE // 16} pages)")
    for i in range(0, size, 16 * PAGE):
        buf[i] = 7
    time.sleep(args.pause)
    phase("phase 4: rest (nothing written), then exit")
    time.sleep(args.pause)
    return 0 if buf[0] == 7 else 1  # keeps buf alive to the end


if __name__ == "__main__":
    raise SystemExit(main())
