"""pagewatch: which pages of memory were written since a point in time.

>>> import numpy as np, pagewatch as pw
>>> a = np.zeros(1 << 20, np.uint8)
>>> with pw.Tracker(a) as t:
...     a[5000] = 1
...     d = t.collect()
>>> (d.offsets() - t.offset).tolist()  # doctest: +SKIP
[4096]

The names below are imported when first used (PEP 562): ``import pagewatch`` itself loads
neither numpy nor the C extension, so ``pagewatch --help`` starts at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import InvalidRange, PagewatchError, PermissionDenied, TargetGone, Unsupported

if TYPE_CHECKING:
    __version__: str
    from ._region import Region
    from .backends import list_backends
    from .checkpoint import Checkpoint
    from .dirty import DirtyPages
    from .kernel.probe import Capabilities, Capability, probe
    from .process import ProcessDirty, ProcessTracker, SkippedMapping, TargetExec
    from .snapshot import Snapshot, snapshot_array
    from .tracker import Tracker, track


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pagewatch")
    except metadata.PackageNotFoundError:  # run from a source tree never installed
        return "0+unknown"


#: public name -> the module that defines it
_LAZY = {
    "Region": "._region", "list_backends": ".backends", "DirtyPages": ".dirty",
    "Capabilities": ".kernel.probe", "Capability": ".kernel.probe", "probe": ".kernel.probe",
    "ProcessDirty": ".process", "ProcessTracker": ".process", "SkippedMapping": ".process",
    "TargetExec": ".process", "Snapshot": ".snapshot", "snapshot_array": ".snapshot",
    "Tracker": ".tracker", "track": ".tracker", "Checkpoint": ".checkpoint",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the package metadata only when asked
        globals()[name] = _version()
        return globals()[name]
    if name == "backends":  # the subpackage (calling it is the deprecated list_backends())
        return importlib.import_module(".backends", __name__)
    where = _LAZY.get(name)
    if where is None:
        # A subpackage or module (pw.checkpoint.load, pw.process...): eager imports made them
        # attributes of the package before; they still are, once asked for.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'pagewatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"backends", "__version__"})


__all__ = [
    "Tracker", "track", "Snapshot", "snapshot_array", "Checkpoint", "ProcessTracker", "ProcessDirty",
    "TargetExec", "SkippedMapping", "Region", "DirtyPages", "list_backends", "probe",
    "Capabilities", "Capability", "PagewatchError", "Unsupported", "PermissionDenied",
    "InvalidRange", "TargetGone", "__version__",
]
