"""One module per way of tracking writes, all behind :class:`base.Backend`.

``pagewatch.backends`` is this subpackage; the list of backends with whether each works
here is :func:`pagewatch.list_backends`.  Calling the subpackage, ``pagewatch.backends()``
(the old name of that function), still works and warns.
"""

import sys
import types
import warnings
from typing import Any

from .._region import Region
from .base import BACKENDS, Backend, BackendInfo, backend_class, choose
from .base import backends as list_backends

__all__ = ["BACKENDS", "Backend", "BackendInfo", "Region", "backend_class", "list_backends",
           "choose"]


class _CallableModule(types.ModuleType):
    def __call__(self) -> Any:
        warnings.warn("pagewatch.backends() is now pagewatch.list_backends() (the name "
                      "pagewatch.backends is the subpackage)", DeprecationWarning, stacklevel=2)
        return list_backends()


sys.modules[__name__].__class__ = _CallableModule
