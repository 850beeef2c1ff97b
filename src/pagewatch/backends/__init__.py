"""One module per way of tracking writes, all behind :class:`base.Backend`."""

from .._region import Region
from .base import BACKENDS, Backend, BackendInfo, backend_class, backends, choose

__all__ = ["BACKENDS", "Backend", "BackendInfo", "Region", "backend_class", "backends", "choose"]
