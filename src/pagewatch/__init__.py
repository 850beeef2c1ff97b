"""pagewatch: which pages of memory were written since a point in time.

>>> import numpy as np, pagewatch as pw
>>> a = np.zeros(1 << 20, np.uint8)
>>> with pw.Tracker(a) as t:
...     a[5000] = 1
...     d = t.collect()
>>> (d.offsets() - t.offset).tolist()  # doctest: +SKIP
[4096]
"""

from ._region import Region
from .backends.base import backends
from .checkpoint import Checkpoint
from .dirty import DirtyPages
from .errors import InvalidRange, PagewatchError, PermissionDenied, TargetGone, Unsupported
from .kernel.probe import Capabilities, Capability, probe
from .process import ProcessDirty, ProcessTracker
from .snapshot import Snapshot, snapshot_array
from .tracker import Tracker, track

__version__ = "0.1.0"

__all__ = [
    "Tracker", "track", "Snapshot", "snapshot_array", "Checkpoint", "ProcessTracker", "ProcessDirty", "Region", "DirtyPages", "backends",
    "probe", "Capabilities", "Capability", "PagewatchError", "Unsupported", "PermissionDenied", "InvalidRange",
    "TargetGone", "__version__",
]
