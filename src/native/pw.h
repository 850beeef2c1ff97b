/*
 * pagewatch native layer: shared declarations.
 *
 * Each .c file in this folder exports one PyMethodDef table; module.c joins them into the
 * module pagewatch._native.  No policy lives here: functions return numbers and raise
 * OSError with errno.  The kernel's structs and constants are defined here because the
 * system headers of many distributions (Debian 12's among them) predate Linux 6.7.
 */
#ifndef PAGEWATCH_PW_H
#define PAGEWATCH_PW_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* ---- include/uapi/linux/fs.h: PAGEMAP_SCAN (Linux 6.7) ---------------------------- */
struct pw_page_region {
    uint64_t start, end, categories;
};

struct pw_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define PW_PAGEMAP_SCAN _IOWR('f', 16, struct pw_pm_scan_arg)
#define PW_PM_SCAN_WP_MATCHING (1ULL << 0)
#define PW_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

/* ---- include/uapi/linux/userfaultfd.h --------------------------------------------- */
struct pw_uffdio_api { uint64_t api, features, ioctls; };
struct pw_uffdio_range { uint64_t start, len; };
struct pw_uffdio_register { struct pw_uffdio_range range; uint64_t mode, ioctls; };
struct pw_uffdio_writeprotect { struct pw_uffdio_range range; uint64_t mode; };

#define PW_UFFD_API 0xAAULL
#define PW_UFFDIO 0xAA
#define PW_USERFAULTFD_IOC_NEW _IO(PW_UFFDIO, 0x00)
#define PW_UFFDIO_REGISTER _IOWR(PW_UFFDIO, 0x00, struct pw_uffdio_register)
#define PW_UFFDIO_UNREGISTER _IOR(PW_UFFDIO, 0x01, struct pw_uffdio_range)
#define PW_UFFDIO_WAKE _IOR(PW_UFFDIO, 0x02, struct pw_uffdio_range)
#define PW_UFFDIO_WRITEPROTECT _IOWR(PW_UFFDIO, 0x06, struct pw_uffdio_writeprotect)
#define PW_UFFDIO_API _IOWR(PW_UFFDIO, 0x3F, struct pw_uffdio_api)
#define PW_UFFDIO_REGISTER_MODE_WP (1ULL << 1)
#define PW_UFFDIO_WRITEPROTECT_MODE_WP (1ULL << 0)
#define PW_UFFD_FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#define PW_UFFD_FEATURE_THREAD_ID (1ULL << 8)
#define PW_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define PW_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define PW_UFFD_FEATURE_WP_ASYNC (1ULL << 15)

/* struct uffd_msg (32 bytes): only the pagefault member is used. */
#define PW_UFFD_EVENT_PAGEFAULT 0x12
#define PW_UFFD_PAGEFAULT_FLAG_WRITE (1ULL << 0)
#define PW_UFFD_PAGEFAULT_FLAG_WP (1ULL << 1)
struct pw_uffd_msg {
    uint8_t event, reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags, address; uint32_t ptid; } pagefault;
        struct { uint64_t reserved1, reserved2, reserved3; } reserved;
    } arg;
} __attribute__((packed));

#ifndef __NR_userfaultfd
#  if defined(__x86_64__)
#    define __NR_userfaultfd 323
#  else
#    define __NR_userfaultfd 282
#  endif
#endif
#ifndef __NR_pidfd_getfd
#  define __NR_pidfd_getfd 438
#endif
#ifndef __NR_pidfd_open
#  define __NR_pidfd_open 434
#endif

/* ---- helpers shared between files -------------------------------------------------- */

/* A result of core.c's PAGEMAP_SCAN loop. */
struct pw_scan {
    struct pw_page_region *buf;
    size_t n;
    int owned;
    int counted; /* pages is the count of buf's pages (else not counted yet) */
    uint64_t walk_end, pages;
};
/* log2 of the page size, as a shift (read once). */
static inline unsigned pw_page_shift(void)
{
    static unsigned shift;
    if (!shift)
        shift = (unsigned)__builtin_ctzll((unsigned long long)sysconf(_SC_PAGESIZE));
    return shift;
}
/* Raise OSError(errno) with a message naming the call; returns NULL for `return`. */
PyObject *pw_raise_errno(int err, const char *what);

/* Method tables, one per file. */
extern PyMethodDef pw_core_methods[];     /* core.c: uffd + PAGEMAP_SCAN + pidfd */
extern PyMethodDef pw_track_methods[];    /* track.c: SIGSEGV handler, uffd-sync thread, compare */
extern PyMethodDef pw_inject_methods[];   /* inject.c: ptrace syscall injection */
extern PyMethodDef pw_tracer_methods[];   /* tracer.c: pagewatch run's tracer */
extern PyMethodDef pw_freeze_methods[];   /* freeze.c: every thread of a process stopped */
extern PyMethodDef pw_bench_methods[];    /* bench.c: writers and the C reference floor */
extern PyMethodDef pw_copy_methods[];     /* copy.c: Snapshot's page-run copy and madvise loops */
extern PyMethodDef pw_aio_methods[];      /* aio.c: a checkpoint's direct writes, fallocate */

#endif
