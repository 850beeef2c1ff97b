"""Typed bindings to the kernel interfaces: no policy, only the kernel's own semantics."""

from .constants import (
    PAGE_SIZE,
    PageCategory,
    RegisterMode,
    ScanFlag,
    UffdFeature,
    UffdIoctl,
    WriteProtectMode,
)
from .maps import Mapping, find_mapping, maps
from .pagemap import (
    Pagemap,
    PagemapBits,
    clear_refs,
    decode_pagemap,
    pagemap_scan,
    pagemap_scan_once,
    read_pagemap,
)
from .probe import Capabilities, Capability, probe
from .uffd import Userfaultfd, open_userfaultfd

__all__ = [
    "PAGE_SIZE", "PageCategory", "RegisterMode", "ScanFlag", "UffdFeature", "UffdIoctl",
    "WriteProtectMode", "Mapping", "find_mapping", "maps", "Pagemap", "PagemapBits",
    "clear_refs", "decode_pagemap", "pagemap_scan", "pagemap_scan_once", "read_pagemap",
    "Capabilities", "Capability", "probe", "Userfaultfd", "open_userfaultfd",
]
