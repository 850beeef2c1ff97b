"""The kernel's constants, with the kernel's values (include/uapi/linux/fs.h, userfaultfd.h)."""

from __future__ import annotations

import enum
import mmap

PAGE_SIZE: int = mmap.PAGESIZE


class PageCategory(enum.IntFlag):
    """``PAGE_IS_*``: the categories PAGEMAP_SCAN matches and reports."""

    WPALLOWED = 1 << 0  #: the VMA is registered for async uffd-wp (6.7)
    WRITTEN = 1 << 1  #: the page carries no uffd-wp bit: written since it was protected (6.7)
    FILE = 1 << 2  #: file-backed page (6.7)
    PRESENT = 1 << 3  #: (6.7)
    SWAPPED = 1 << 4  #: (6.7)
    PFNZERO = 1 << 5  #: the zero page (6.7)
    HUGE = 1 << 6  #: PMD-mapped THP or hugetlb (6.7)
    SOFT_DIRTY = 1 << 7  #: soft-dirty bit or VM_SOFTDIRTY (6.8)
    GUARD = 1 << 8  #: MADV_GUARD_INSTALL guard page (6.16)


class ScanFlag(enum.IntFlag):
    """``PM_SCAN_*`` flags of PAGEMAP_SCAN."""

    WP_MATCHING = 1 << 0  #: write-protect the pages that matched (get-and-reset)
    CHECK_WPASYNC = 1 << 1  #: fail with EPERM on a VMA not registered for async uffd-wp


class UffdFeature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits of UFFDIO_API."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class WriteProtectMode(enum.IntFlag):
    """``UFFDIO_WRITEPROTECT_MODE_*``."""

    WP = 1 << 0
    DONTWAKE = 1 << 1


class UffdIoctl(enum.IntEnum):
    """``_UFFDIO_*`` bit numbers in the ``ioctls`` masks that UFFDIO_API/REGISTER return."""

    REGISTER = 0x00
    UNREGISTER = 0x01
    WAKE = 0x02
    COPY = 0x03
    ZEROPAGE = 0x04
    MOVE = 0x05
    WRITEPROTECT = 0x06
    CONTINUE = 0x07
    POISON = 0x08
    API = 0x3F


#: userfaultfd(2) flag: trap only user-mode faults (allowed without CAP_SYS_PTRACE).
UFFD_USER_MODE_ONLY = 1

#: The categories PAGEMAP_SCAN accepted in each version: 6.7, 6.8-6.15, 6.16+.
PAGEMAP_CATEGORIES_67 = 0x7F

# Classic /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# madvise(2) advice values used here.
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
