"""The crash test's saver: a fork server whose children save a checkpoint in a loop until
they are SIGKILLed.  A child fsyncs (``durable``) only when asked: a SIGKILL leaves the
page cache as it was, so what is tested (a rename commits a complete file) is the same
either way, and the fsyncs made most of the test's time on a busy disk.

The state of generation ``g`` is a pure function of ``g`` (:func:`model`), so the test can
compare any generation it finds on disk.  A child continues from the newest generation on
disk: it loads it, applies the next step, saves, and so on; every few saves it compacts
(with pruning), so kills land in saves, bases, compactions and prunes.

Protocol on stdin/stdout (one line each, written with one ``write(2)``)::

    test -> server: "fork [durable]" server -> test: "child PID"
    child -> test:  "saved PID G"    after save() of generation G returned
    test -> server: "reap PID"       server -> test: "reaped PID STATUS"
"""

from __future__ import annotations

import os
import sys

import numpy as np

PAGE = 4096


def initial() -> dict[str, np.ndarray]:
    return {"a": np.zeros(8 * PAGE + 100, np.uint8),
            "b": np.zeros(300, np.float64),
            "c": np.zeros((20, 50), np.int32, order="F")}


def step(g: int, state: dict[str, np.ndarray]) -> None:
    """Make generation ``g``'s state from generation ``g - 1``'s, in place where it can."""
    rng = np.random.default_rng(1000 + g)
    a = state["a"]
    for p in rng.choice(a.size // PAGE + 1, size=int(rng.integers(0, 4)), replace=False):
        a[p * PAGE:(p + 1) * PAGE] = rng.integers(0, 256, min(PAGE, a.size - p * PAGE),
                                                  dtype=np.uint8)
    state["b"][rng.integers(0, 300, 5)] = rng.random(5) + g
    if g % 10 == 0:  # resized: a new array with the old one's first rows
        old = state["c"]
        rows = 20 + (g // 10) % 7
        new = np.zeros((rows, 50), np.int32, order="F")
        k = min(rows, old.shape[0])
        new[:k] = old[:k]
        state["c"] = new
    state["c"][int(rng.integers(0, state["c"].shape[0]))] = g
    if g % 6 == 3:
        state["d"] = np.full(int(rng.integers(1, 3000)), g, np.int16)  # added (or replaced)
    elif g % 6 == 5:
        state.pop("d", None)  # removed


class Model:
    """Every generation's state, computed once each."""

    def __init__(self) -> None:
        self._states: list[dict[str, np.ndarray]] = [initial()]

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        while len(self._states) <= g:
            s = {k: v.copy(order="K") for k, v in self._states[-1].items()}
            step(len(self._states), s)
            self._states.append(s)
        return self._states[g]


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _saver(path: str, durable: bool) -> None:
    import pagewatch as pw

    store = pw.checkpoint.LocalStore(path, durable=durable)
    have = store.generations() if os.path.isdir(path) else []
    if have:
        g = have[-1]
        state = pw.checkpoint.load(path, g)
    else:
        g = -1
        state = initial()
    with pw.Checkpoint(store, state, max_chain=3, checksum="crc32") as ck:
        while True:
            if g >= 0:
                step(g + 1, state)
            info = ck.save()
            g = info.number
            _say(f"saved {os.getpid()} {g}")
            if g % 7 == 6:
                ck.compact(prune=True)


def main() -> None:
    path = sys.argv[1]
    _say("ready")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    _saver(path, durable=rest == ["durable"])
                finally:
                    os._exit(1)
            _say(f"child {pid}")
        elif cmd == "reap":
            _, status = os.waitpid(int(rest[0]), 0)
            _say(f"reaped {rest[0]} {status}")


if __name__ == "__main__":
    main()
