/*
 * bench.c: the C reference floor of `pagewatch bench`.
 *
 * Every figure here is timed inside C with CLOCK_MONOTONIC, with the GIL released, so it
 * measures the kernel mechanism and nothing of Python:
 *
 *   write_pages       one byte per page, in a given order (the writer of every measure)
 *   scan_floor        PAGEMAP_SCAN into a preallocated vector large enough for any answer
 *                     (one ioctl, or more if the kernel stops early): the minimal collect,
 *                     none of the library's code in it
 *   restore_floor     the minimal restore of a Snapshot: one PAGEMAP_SCAN of the written pages
 *                     (as scan_floor) and a memcpy of each run from the baseline; with
 *                     `rearm`, a second PAGEMAP_SCAN that write-protects them again
 *   raw_uffd_async    userfaultfd + WP_ASYNC from open to close, each step timed
 *   raw_uffd_sync     uffd-wp with a handler thread that un-protects each faulting page
 *   raw_mprotect      PROT_READ + a SIGSEGV handler that un-protects each faulting page
 *   raw_soft_dirty    clear_refs + pagemap bit 55
 *   bench_mmap/bench_munmap  anonymous mappings at chosen (aligned or fixed) addresses
 *
 * A page order is either every `step`-th page of [addr, addr + npages pages) or `order`,
 * an int64 buffer of page indices below npages.  The range must be mapped: it is checked
 * with msync(MS_ASYNC) first, so a bad address raises instead of crashing.
 */
#include "pw.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static size_t page_size(void)
{
    static size_t ps;
    if (!ps)
        ps = (size_t)sysconf(_SC_PAGESIZE);
    return ps;
}

/* ---- page orders -------------------------------------------------------------------- */

struct pattern {
    uintptr_t base;
    uint64_t npages;     /* pages in the range */
    uint64_t step;       /* without idx: every step-th page */
    const int64_t *idx;  /* with idx: these pages, in this order */
    uint64_t n;          /* writes */
    Py_buffer view;
    int has_view;
};

static void pattern_release(struct pattern *p)
{
    if (p->has_view)
        PyBuffer_Release(&p->view);
    p->has_view = 0;
}

static int is_int64_format(const char *f)
{
    if (!f)
        return 0;
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    return (f[0] == 'q' || f[0] == 'l') && f[1] == '\0';
}

/* Fill `p` from (addr, npages, step, order); 0 on success, -1 with an exception set. */
static int pattern_init(struct pattern *p, unsigned long long addr, unsigned long long npages,
                        unsigned long long step, PyObject *order)
{
    memset(p, 0, sizeof(*p));
    size_t ps = page_size();
    if (npages == 0 || addr % ps) {
        PyErr_Format(PyExc_ValueError, "need a page-aligned address and npages > 0, not "
                     "addr=%#llx npages=%llu", addr, npages);
        return -1;
    }
    if (npages > (~0ULL - addr) / ps) {
        PyErr_SetString(PyExc_ValueError, "the range wraps around the address space");
        return -1;
    }
    p->base = (uintptr_t)addr;
    p->npages = npages;
    p->step = step ? step : 1;
    p->n = (npages + p->step - 1) / p->step;
    if (order && order != Py_None) {
        if (PyObject_GetBuffer(order, &p->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            return -1;
        p->has_view = 1;
        if (p->view.itemsize != 8 || !is_int64_format(p->view.format)) {
            PyErr_SetString(PyExc_TypeError, "order must be a contiguous int64 array");
            pattern_release(p);
            return -1;
        }
        p->idx = (const int64_t *)p->view.buf;
        p->n = (uint64_t)(p->view.len / 8);
        for (uint64_t i = 0; i < p->n; i++)
            if (p->idx[i] < 0 || (uint64_t)p->idx[i] >= npages) {
                PyErr_Format(PyExc_ValueError, "order[%llu] = %lld is not a page of the "
                             "%llu-page range", (unsigned long long)i, (long long)p->idx[i],
                             npages);
                pattern_release(p);
                return -1;
            }
    }
    /* msync(MS_ASYNC) only walks the VMAs and fails with ENOMEM on a hole. */
    if (msync((void *)p->base, npages * ps, MS_ASYNC) < 0) {
        int err = errno;
        pattern_release(p);
        pw_raise_errno(err, err == ENOMEM ? "the range is not (wholly) mapped" : "msync(2)");
        return -1;
    }
    return 0;
}

static void pattern_write(const struct pattern *p, unsigned char value)
{
    volatile unsigned char *base = (volatile unsigned char *)p->base;
    size_t ps = page_size();
    if (p->idx) {
        for (uint64_t i = 0; i < p->n; i++)
            base[(size_t)p->idx[i] * ps] = value;
    } else {
        for (uint64_t pg = 0; pg < p->npages; pg += p->step)
            base[pg * ps] = value;
    }
}

static char *pattern_kwlist[] = {"addr", "npages", "step", "order", NULL};

#define PARSE_PATTERN(name, p)                                                               \
    unsigned long long addr_, npages_, step_ = 1;                                            \
    PyObject *order_ = Py_None;                                                              \
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|KO:" name, pattern_kwlist, &addr_,        \
                                     &npages_, &step_, &order_))                             \
        return NULL;                                                                         \
    if (pattern_init(&(p), addr_, npages_, step_, order_) < 0)                               \
        return NULL;

/* write_pages(addr, npages, step=1, order=None, value=1) -> ns */
static PyObject *py_write_pages(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"addr", "npages", "step", "order", "value", NULL};
    unsigned long long addr, npages, step = 1;
    PyObject *order = Py_None;
    int value = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|KOi:write_pages", kwlist, &addr, &npages,
                                     &step, &order, &value))
        return NULL;
    struct pattern p;
    if (pattern_init(&p, addr, npages, step, order) < 0)
        return NULL;
    uint64_t t0, t1;
    Py_BEGIN_ALLOW_THREADS
    t0 = now_ns();
    pattern_write(&p, (unsigned char)value);
    t1 = now_ns();
    Py_END_ALLOW_THREADS
    pattern_release(&p);
    return PyLong_FromUnsignedLongLong(t1 - t0);
}

/* ---- PAGEMAP_SCAN ---------------------------------------------------------------------- */

struct scan_result {
    uint64_t ns, pages, regions, cpu_ns;
};

/* CPU time of the calling thread: what a call cost it, whatever else the machine runs. */
static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The floor of a collect, independent of the library's code: PAGEMAP_SCAN into an output
 * vector already large enough for any answer (a range of n pages holds at most n/2 + 1
 * runs), allocated before the clock starts and kept between calls (the calling thread's).
 * One ioctl walks the whole range when the vector cannot fill, but Linux (6.18 at least)
 * may answer with a walk_end behind the end after an internal restart: then it is called
 * again from walk_end, as the kernel's documentation asks, and runs it reports twice (a
 * plain get) are counted once.  A call without progress (a partial hugetlb page) is an
 * error here.  Pages are counted with a shift. */
static __thread struct pw_page_region *floor_vec;
static __thread size_t floor_cap;

static int scan_until_end(int fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t mask,
                          struct scan_result *res)
{
    const unsigned shift = (unsigned)__builtin_ctzll(page_size());
    size_t need = (size_t)((end - start) >> shift) / 2 + 2;
    if (need > floor_cap) {
        free(floor_vec);
        floor_cap = 0;
        floor_vec = malloc(need * sizeof(*floor_vec));
        if (!floor_vec)
            return ENOMEM;
        memset(floor_vec, 0, need * sizeof(*floor_vec)); /* fault the vector in, untimed */
        floor_cap = need;
    }
    struct pw_pm_scan_arg arg = {
        .size = sizeof(arg), .flags = flags, .end = end, .category_mask = mask,
        .return_mask = mask,
    };
    uint64_t c0 = thread_cpu_ns(), t0 = now_ns();
    uint64_t pages = 0, cursor = start, held = start;
    size_t n = 0;
    int err = 0;
    while (cursor < end) {
        arg.start = cursor;
        arg.vec = (uint64_t)(uintptr_t)(floor_vec + n);
        arg.vec_len = floor_cap - n;
        int ret = ioctl(fd, PW_PAGEMAP_SCAN, &arg);
        if (ret < 0) {
            err = errno;
            break;
        }
        for (int i = 0; i < ret; i++) {
            uint64_t s = floor_vec[n + i].start, e = floor_vec[n + i].end;
            if (e > held) {
                pages += (e - (s > held ? s : held)) >> shift;
                held = e;
            }
        }
        n += (size_t)ret;
        if (arg.walk_end <= cursor) {
            err = EAGAIN; /* no progress: a partial hugetlb page */
            break;
        }
        cursor = arg.walk_end;
    }
    res->ns = now_ns() - t0;
    res->cpu_ns = thread_cpu_ns() - c0;
    res->pages = pages;
    res->regions = n;
    return err;
}

/* scan_floor(fd, start, end, flags=WP_MATCHING, mask=PAGE_IS_WRITTEN)
 * -> (ns, pages, regions, cpu_ns): wall-clock and thread CPU time of the minimal call */
static PyObject *py_scan_floor(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "start", "end", "flags", "mask", NULL};
    int fd;
    unsigned long long start, end, flags = PW_PM_SCAN_WP_MATCHING, mask = 1ULL << 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|KK:scan_floor", kwlist, &fd, &start, &end,
                                     &flags, &mask))
        return NULL;
    if (end < start) {
        PyErr_SetString(PyExc_ValueError, "end below start");
        return NULL;
    }
    struct scan_result res = {0};
    int err;
    /* The GIL stays held: the timing is inside, and nothing else should run meanwhile. */
    err = scan_until_end(fd, start, end, flags, mask, &res);
    if (err)
        return pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)");
    return Py_BuildValue("(KKKK)", (unsigned long long)res.ns, (unsigned long long)res.pages,
                         (unsigned long long)res.regions, (unsigned long long)res.cpu_ns);
}

/* restore_floor(fd, start, end, dst, src, rearm=False, flags=CHECK_WPASYNC,
 *               mask=PAGE_IS_WRITTEN) -> (ns, pages, regions, cpu_ns): the least a restore
 * can do, all in C: one PAGEMAP_SCAN (looped to walk_end, into a preallocated vector) for the
 * written pages of [start, end), then for each region memcpy(dst + off, src + off) with off
 * its offset from start.  With `rearm`, then a PAGEMAP_SCAN with WP_MATCHING over the range,
 * which protects them again (what makes the next restore see only the next writes). */
static PyObject *py_restore_floor(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "start", "end", "dst", "src", "rearm", "flags", "mask", NULL};
    int fd, rearm = 0;
    unsigned long long start, end, dst, src, flags = PW_PM_SCAN_CHECK_WPASYNC, mask = 1ULL << 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKKKK|pKK:restore_floor", kwlist, &fd, &start,
                                     &end, &dst, &src, &rearm, &flags, &mask))
        return NULL;
    if (end < start) {
        PyErr_SetString(PyExc_ValueError, "end below start");
        return NULL;
    }
    struct scan_result res = {0}, again = {0};
    uint64_t c0 = thread_cpu_ns(), t0 = now_ns();
    int err = scan_until_end(fd, start, end, flags, mask, &res);
    for (size_t i = 0; !err && i < res.regions; i++) {
        uint64_t off = floor_vec[i].start - start;
        memcpy((void *)(uintptr_t)(dst + off), (const void *)(uintptr_t)(src + off),
               floor_vec[i].end - floor_vec[i].start);
    }
    if (!err && rearm)
        err = scan_until_end(fd, start, end, flags | PW_PM_SCAN_WP_MATCHING, mask, &again);
    uint64_t ns = now_ns() - t0, cpu = thread_cpu_ns() - c0;
    if (err)
        return pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)");
    return Py_BuildValue("(KKKK)", (unsigned long long)ns, (unsigned long long)res.pages,
                         (unsigned long long)res.regions, (unsigned long long)cpu);
}

/* scan_ranges_floor(fd, ranges, flags=WP_MATCHING, mask=PAGE_IS_WRITTEN) with ranges an
 * int64 (k, 2) array -> (ns, pages, regions, cpu_ns): the minimal C loop of one
 * PAGEMAP_SCAN (looped to walk_end) per range, the floor a collect of many mappings is
 * measured against. */
static PyObject *py_scan_ranges_floor(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "ranges", "flags", "mask", NULL};
    int fd;
    Py_buffer view;
    unsigned long long flags = PW_PM_SCAN_WP_MATCHING, mask = 1ULL << 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iy*|KK:scan_ranges_floor", kwlist, &fd, &view,
                                     &flags, &mask))
        return NULL;
    if (view.len % 16) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "ranges must be int64 (start, end) pairs");
        return NULL;
    }
    size_t k = (size_t)view.len / 16;
    const int64_t *r = view.buf;
    struct scan_result total = {0};
    int err = 0;
    /* Size the vector for the largest range first (untimed), as scan_floor does. */
    uint64_t biggest = 0;
    for (size_t i = 0; i < k; i++)
        if ((uint64_t)(r[2 * i + 1] - r[2 * i]) > biggest)
            biggest = (uint64_t)(r[2 * i + 1] - r[2 * i]);
    const unsigned shift = (unsigned)__builtin_ctzll(page_size());
    size_t need = (size_t)(biggest >> shift) / 2 + 2;
    if (need > floor_cap) {
        free(floor_vec);
        floor_cap = 0;
        floor_vec = malloc(need * sizeof(*floor_vec));
        if (!floor_vec)
            err = ENOMEM;
        else {
            memset(floor_vec, 0, need * sizeof(*floor_vec));
            floor_cap = need;
        }
    }
    uint64_t c0 = thread_cpu_ns(), t0 = now_ns();
    for (size_t i = 0; i < k && !err; i++) {
        struct scan_result res = {0};
        err = scan_until_end(fd, (uint64_t)r[2 * i], (uint64_t)r[2 * i + 1], flags, mask, &res);
        total.pages += res.pages;
        total.regions += res.regions;
    }
    total.ns = now_ns() - t0;
    total.cpu_ns = thread_cpu_ns() - c0;
    PyBuffer_Release(&view);
    if (err)
        return pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)");
    return Py_BuildValue("(KKKK)", (unsigned long long)total.ns, (unsigned long long)total.pages,
                         (unsigned long long)total.regions, (unsigned long long)total.cpu_ns);
}

/* ---- userfaultfd ----------------------------------------------------------------------- */

static int open_uffd(int nonblock)
{
    int base = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
    int fd = (int)syscall(__NR_userfaultfd, base | 1 /* UFFD_USER_MODE_ONLY */);
    if (fd < 0 && (errno == EPERM || errno == EINVAL))
        fd = (int)syscall(__NR_userfaultfd, base);
    if (fd < 0 && errno == EPERM) {
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev >= 0) {
            fd = ioctl(dev, PW_USERFAULTFD_IOC_NEW, base);
            int e = errno;
            close(dev);
            errno = e;
        }
    }
    return fd;
}

static int uffd_wp(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct pw_uffdio_writeprotect wp = {.range = {start, len}, .mode = mode};
    return ioctl(fd, PW_UFFDIO_WRITEPROTECT, &wp);
}

/* Open, handshake and register [start, start+len) for WP.  Fills the times of each step;
 * returns the fd, or -1 with *what naming the failing step and errno set. */
static int uffd_setup(uint64_t features, uint64_t start, uint64_t len, int nonblock,
                      uint64_t *open_ns, uint64_t *register_ns, const char **what)
{
    uint64_t t0 = now_ns();
    int fd = open_uffd(nonblock);
    if (fd < 0) {
        *what = "userfaultfd(2)";
        return -1;
    }
    struct pw_uffdio_api api = {.api = PW_UFFD_API, .features = features};
    int r = ioctl(fd, PW_UFFDIO_API, &api);
    if (r < 0 || (api.features & features) != features) {
        int e = r < 0 ? errno : EOPNOTSUPP;
        close(fd);
        errno = e;
        *what = "ioctl(UFFDIO_API)";
        return -1;
    }
    uint64_t t1 = now_ns();
    struct pw_uffdio_register reg = {.range = {start, len}, .mode = PW_UFFDIO_REGISTER_MODE_WP};
    if (ioctl(fd, PW_UFFDIO_REGISTER, &reg) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        *what = "ioctl(UFFDIO_REGISTER)";
        return -1;
    }
    *open_ns = t1 - t0;
    *register_ns = now_ns() - t1;
    return fd;
}

static int open_pagemap(void)
{
    return open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
}

/*
 * raw_uffd_async(addr, npages, step=1, order=None) -> dict
 * The whole async write-protect sequence on a range nobody else tracks.
 *   open_ns     userfaultfd + UFFDIO_API(WP_ASYNC | WP_UNPOPULATED)
 *   register_ns UFFDIO_REGISTER(MODE_WP)
 *   protect_ns  UFFDIO_WRITEPROTECT(MODE_WP) of the range (a reset, done by the kernel)
 *   write_ns    the page order written once: each write a WP fault resolved in the kernel
 *   collect_ns  PAGEMAP_SCAN get-and-reset loop (WRITTEN, WP_MATCHING) after the writes
 *   collect_clean_ns  the same loop again, nothing written since
 *   close_ns    UFFDIO_UNREGISTER + close
 *   writes, pages (pages the collect reported), regions
 */
static PyObject *py_raw_uffd_async(PyObject *self, PyObject *args, PyObject *kw)
{
    struct pattern p;
    PARSE_PATTERN("raw_uffd_async", p);
    uint64_t len = p.npages * page_size();
    uint64_t open_ns = 0, register_ns = 0, protect_ns = 0, write_ns = 0, close_ns = 0;
    struct scan_result got = {0}, clean = {0};
    const char *what = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    int pm = open_pagemap();
    if (pm < 0) {
        err = errno;
        what = "open(/proc/self/pagemap)";
    } else {
        int fd = uffd_setup(PW_UFFD_FEATURE_WP_ASYNC | PW_UFFD_FEATURE_WP_UNPOPULATED, p.base,
                            len, 1, &open_ns, &register_ns, &what);
        if (fd < 0) {
            err = errno;
        } else {
            uint64_t t0 = now_ns();
            if (uffd_wp(fd, p.base, len, PW_UFFDIO_WRITEPROTECT_MODE_WP) < 0) {
                err = errno;
                what = "ioctl(UFFDIO_WRITEPROTECT)";
            }
            uint64_t t1 = now_ns();
            protect_ns = t1 - t0;
            if (!err) {
                pattern_write(&p, 1);
                write_ns = now_ns() - t1;
                what = "ioctl(PAGEMAP_SCAN)";
                err = scan_until_end(pm, p.base, p.base + len, PW_PM_SCAN_WP_MATCHING,
                                     1ULL << 1, &got);
                if (!err)
                    err = scan_until_end(pm, p.base, p.base + len, PW_PM_SCAN_WP_MATCHING,
                                         1ULL << 1, &clean);
            }
            uint64_t t2 = now_ns();
            struct pw_uffdio_range range = {p.base, len};
            ioctl(fd, PW_UFFDIO_UNREGISTER, &range);
            close(fd);
            close_ns = now_ns() - t2;
        }
        close(pm);
    }
    Py_END_ALLOW_THREADS
    uint64_t writes = p.n;
    pattern_release(&p);
    if (err)
        return pw_raise_errno(err, what);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsK}", "open_ns", (unsigned long long)open_ns, "register_ns",
        (unsigned long long)register_ns, "protect_ns", (unsigned long long)protect_ns,
        "write_ns", (unsigned long long)write_ns, "collect_ns", (unsigned long long)got.ns,
        "collect_clean_ns", (unsigned long long)clean.ns, "close_ns",
        (unsigned long long)close_ns, "writes", (unsigned long long)writes, "pages",
        (unsigned long long)got.pages, "regions", (unsigned long long)got.regions);
}

/* ---- uffd-wp, synchronous: a handler thread ------------------------------------------ */

struct sync_ctx {
    int uffd, stop;
    uintptr_t lo;
    size_t ps, len;
    unsigned char *seen;
    uint64_t faults;
    int err;
};

static void *sync_handler(void *arg)
{
    struct sync_ctx *c = arg;
    struct pollfd fds[2] = {{.fd = c->uffd, .events = POLLIN}, {.fd = c->stop, .events = POLLIN}};
    struct pw_uffd_msg msgs[64];
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            c->err = errno;
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        ssize_t got = read(c->uffd, msgs, sizeof(msgs));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            c->err = errno;
            return NULL;
        }
        for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
            if (msgs[i].event != PW_UFFD_EVENT_PAGEFAULT)
                continue;
            uintptr_t page = (uintptr_t)msgs[i].arg.pagefault.address & ~(uintptr_t)(c->ps - 1);
            /* Un-protecting wakes the faulting thread. */
            if (uffd_wp(c->uffd, page, c->ps, 0) < 0) {
                if (!c->err)
                    c->err = errno;
                /* Never leave the writer asleep: open the whole range. */
                uffd_wp(c->uffd, c->lo, c->len, 0);
            }
            c->seen[(page - c->lo) / c->ps] = 1;
            c->faults++;
        }
    }
}

/*
 * raw_uffd_sync(addr, npages, step=1, order=None) -> dict
 * uffd-wp in sync mode: each first write sleeps until a handler thread (this file's, in C)
 * reads the fault message and un-protects the page; both run on the caller's CPU.  The
 * range must be populated (no WP_UNPOPULATED in sync mode).  Keys: open_ns, register_ns, protect_ns, write_ns,
 * close_ns, writes, faults, pages (distinct pages seen).
 */
static PyObject *py_raw_uffd_sync(PyObject *self, PyObject *args, PyObject *kw)
{
    struct pattern p;
    PARSE_PATTERN("raw_uffd_sync", p);
    size_t ps = page_size();
    uint64_t len = p.npages * ps;
    uint64_t open_ns = 0, register_ns = 0, protect_ns = 0, write_ns = 0, close_ns = 0, pages = 0;
    const char *what = NULL;
    int err = 0;
    struct sync_ctx c = {.lo = p.base, .ps = ps, .len = len};
    int stop[2] = {-1, -1};
    Py_BEGIN_ALLOW_THREADS
    c.seen = calloc(p.npages, 1);
    if (!c.seen || pipe2(stop, O_CLOEXEC) < 0) {
        err = c.seen ? errno : ENOMEM;
        what = "pipe2(2)";
    } else {
        c.stop = stop[0];
        c.uffd = uffd_setup(0, p.base, len, 1, &open_ns, &register_ns, &what);
        if (c.uffd < 0) {
            err = errno;
        } else {
            pthread_t th;
            /* Writer and handler share one CPU for the run, where the scheduler settles a
             * long-lived handler thread (wake-affine): a fresh thread started on the other
             * CPU makes every fault a cross-CPU wake-up instead, 5-15 times dearer in a VM
             * and as noisy as the machine is busy. */
            cpu_set_t was, one;
            int pinned = sched_getaffinity(0, sizeof(was), &was) == 0;
            if (pinned) {
                CPU_ZERO(&one);
                CPU_SET(sched_getcpu(), &one);
                pinned = sched_setaffinity(0, sizeof(one), &one) == 0;
            }
            uint64_t t0 = now_ns();
            if (uffd_wp(c.uffd, p.base, len, PW_UFFDIO_WRITEPROTECT_MODE_WP) < 0) {
                err = errno;
                what = "ioctl(UFFDIO_WRITEPROTECT)";
            } else {
                protect_ns = now_ns() - t0;
                if ((err = pthread_create(&th, NULL, sync_handler, &c)) != 0) {
                    what = "pthread_create(3)";
                } else {
                    uint64_t t1 = now_ns();
                    pattern_write(&p, 1);
                    write_ns = now_ns() - t1;
                    ssize_t w = write(stop[1], "x", 1);
                    (void)w;
                    pthread_join(th, NULL);
                    if (c.err) {
                        err = c.err;
                        what = "the uffd handler thread";
                    }
                }
            }
            if (pinned)
                sched_setaffinity(0, sizeof(was), &was);
            uint64_t t2 = now_ns();
            struct pw_uffdio_range range = {p.base, len};
            ioctl(c.uffd, PW_UFFDIO_UNREGISTER, &range);
            close(c.uffd);
            close_ns = now_ns() - t2;
        }
        for (uint64_t i = 0; i < p.npages; i++)
            pages += c.seen[i];
    }
    if (stop[0] >= 0) {
        close(stop[0]);
        close(stop[1]);
    }
    free(c.seen);
    Py_END_ALLOW_THREADS
    uint64_t writes = p.n;
    pattern_release(&p);
    if (err)
        return pw_raise_errno(err, what);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsK}", "open_ns", (unsigned long long)open_ns, "register_ns",
        (unsigned long long)register_ns, "protect_ns", (unsigned long long)protect_ns,
        "write_ns", (unsigned long long)write_ns, "close_ns", (unsigned long long)close_ns,
        "writes", (unsigned long long)writes, "faults", (unsigned long long)c.faults, "pages",
        (unsigned long long)pages);
}

/* ---- mprotect + SIGSEGV ---------------------------------------------------------------- */

static struct {
    volatile uintptr_t lo, hi;
    size_t ps;
    unsigned char *seen;
    volatile uint64_t faults;
    volatile int err;
    volatile int active;
    struct sigaction old;
} g_mp;

static void mp_handler(int sig, siginfo_t *si, void *ctx)
{
    uintptr_t a = (uintptr_t)si->si_addr;
    if (g_mp.active && a >= g_mp.lo && a < g_mp.hi) {
        int saved = errno;
        uintptr_t page = a & ~(uintptr_t)(g_mp.ps - 1);
        if (mprotect((void *)page, g_mp.ps, PROT_READ | PROT_WRITE) < 0) {
            /* Out of VMAs (vm.max_map_count): open the whole range, which merges it back
             * into one VMA, and report the error after the loop. */
            g_mp.err = errno;
            if (mprotect((void *)g_mp.lo, g_mp.hi - g_mp.lo, PROT_READ | PROT_WRITE) < 0)
                g_mp.active = 0; /* cannot fix the fault: let the old handler have it */
        }
        g_mp.seen[(page - g_mp.lo) / g_mp.ps] = 1;
        g_mp.faults++;
        errno = saved;
        return;
    }
    /* Not ours: chain to the handler we replaced. */
    if (g_mp.old.sa_flags & SA_SIGINFO) {
        g_mp.old.sa_sigaction(sig, si, ctx);
    } else if (g_mp.old.sa_handler == SIG_DFL || g_mp.old.sa_handler == SIG_IGN) {
        sigaction(SIGSEGV, &g_mp.old, NULL); /* the fault repeats with the default action */
    } else {
        g_mp.old.sa_handler(sig);
    }
}

/*
 * raw_mprotect(addr, npages, step=1, order=None) -> dict
 * mprotect(PROT_READ) of the range, then the page order written once under a SIGSEGV
 * handler (this file's) that records the page and makes it writable again.  The range
 * must be an anonymous private read-write mapping.  Keys: protect_ns, write_ns,
 * unprotect_ns, writes, faults, pages.  Only one call may be active at a time.
 */
static PyObject *py_raw_mprotect(PyObject *self, PyObject *args, PyObject *kw)
{
    if (g_mp.active) {
        PyErr_SetString(PyExc_RuntimeError, "raw_mprotect is already running");
        return NULL;
    }
    struct pattern p;
    PARSE_PATTERN("raw_mprotect", p);
    size_t ps = page_size();
    uint64_t len = p.npages * ps;
    unsigned char *seen = calloc(p.npages, 1);
    if (!seen) {
        pattern_release(&p);
        return PyErr_NoMemory();
    }
    uint64_t protect_ns = 0, write_ns = 0, unprotect_ns = 0, pages = 0, faults;
    const char *what = NULL;
    int err = 0;
    g_mp.lo = p.base;
    g_mp.hi = p.base + len;
    g_mp.ps = ps;
    g_mp.seen = seen;
    g_mp.faults = 0;
    g_mp.err = 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = mp_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_mp.old) < 0) {
        free(seen);
        pattern_release(&p);
        return pw_raise_errno(errno, "sigaction(SIGSEGV)");
    }
    g_mp.active = 1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = now_ns();
    if (mprotect((void *)p.base, len, PROT_READ) < 0) {
        err = errno;
        what = "mprotect(PROT_READ)";
    } else {
        uint64_t t1 = now_ns();
        protect_ns = t1 - t0;
        pattern_write(&p, 1);
        uint64_t t2 = now_ns();
        write_ns = t2 - t1;
        if (mprotect((void *)p.base, len, PROT_READ | PROT_WRITE) < 0 && !err) {
            err = errno;
            what = "mprotect(PROT_READ|PROT_WRITE)";
        }
        unprotect_ns = now_ns() - t2;
    }
    Py_END_ALLOW_THREADS
    g_mp.active = 0;
    sigaction(SIGSEGV, &g_mp.old, NULL);
    faults = g_mp.faults;
    if (!err && g_mp.err) {
        err = g_mp.err;
        what = "mprotect(2) in the SIGSEGV handler (vm.max_map_count reached?)";
    }
    for (uint64_t i = 0; i < p.npages; i++)
        pages += seen[i];
    free(seen);
    uint64_t writes = p.n;
    pattern_release(&p);
    if (err)
        return pw_raise_errno(err, what);
    return Py_BuildValue("{sKsKsKsKsKsK}", "protect_ns", (unsigned long long)protect_ns,
                         "write_ns", (unsigned long long)write_ns, "unprotect_ns",
                         (unsigned long long)unprotect_ns, "writes", (unsigned long long)writes,
                         "faults", (unsigned long long)faults, "pages",
                         (unsigned long long)pages);
}

/* ---- soft-dirty -------------------------------------------------------------------------- */

/*
 * raw_soft_dirty(addr, npages, step=1, order=None) -> dict
 * clear_refs "4" (process-wide: never while a soft-dirty tracker is live), the page order
 * written once, then pagemap read for the range and bit 55 counted.  Keys: clear_ns,
 * write_ns, collect_ns, writes, pages (pages with bit 55 set).
 */
static PyObject *py_raw_soft_dirty(PyObject *self, PyObject *args, PyObject *kw)
{
    struct pattern p;
    PARSE_PATTERN("raw_soft_dirty", p);
    size_t ps = page_size();
    uint64_t clear_ns = 0, write_ns = 0, collect_ns = 0, pages = 0;
    const char *what = NULL;
    int err = 0;
    uint64_t *entries = malloc(p.npages * 8);
    if (!entries) {
        pattern_release(&p);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    int cr = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    int pm = open_pagemap();
    if (cr < 0 || pm < 0) {
        err = errno;
        what = cr < 0 ? "open(/proc/self/clear_refs)" : "open(/proc/self/pagemap)";
    } else {
        uint64_t t0 = now_ns();
        if (write(cr, "4", 1) != 1) {
            err = errno;
            what = "write(/proc/self/clear_refs)";
        } else {
            uint64_t t1 = now_ns();
            clear_ns = t1 - t0;
            pattern_write(&p, 1);
            uint64_t t2 = now_ns();
            write_ns = t2 - t1;
            size_t want = p.npages * 8, done = 0;
            off_t off = (off_t)(p.base / ps * 8);
            while (done < want) {
                ssize_t r = pread(pm, (char *)entries + done, want - done, off + (off_t)done);
                if (r <= 0) {
                    err = r < 0 ? errno : EIO;
                    what = "pread(/proc/self/pagemap)";
                    break;
                }
                done += (size_t)r;
            }
            for (uint64_t i = 0; !err && i < p.npages; i++)
                pages += (entries[i] >> 55) & 1;
            collect_ns = now_ns() - t2;
        }
    }
    if (cr >= 0)
        close(cr);
    if (pm >= 0)
        close(pm);
    Py_END_ALLOW_THREADS
    free(entries);
    uint64_t writes = p.n;
    pattern_release(&p);
    if (err)
        return pw_raise_errno(err, what);
    return Py_BuildValue("{sKsKsKsKsK}", "clear_ns", (unsigned long long)clear_ns, "write_ns",
                         (unsigned long long)write_ns, "collect_ns",
                         (unsigned long long)collect_ns, "writes", (unsigned long long)writes,
                         "pages", (unsigned long long)pages);
}

/* ---- mappings ------------------------------------------------------------------------------ */

/*
 * bench_mmap(length, align=0, addr=0, replace=False) -> address
 * An anonymous private read-write mapping of `length` bytes: at `addr` exactly when given
 * (MAP_FIXED_NOREPLACE: fails rather than replace a mapping; with `replace`, MAP_FIXED:
 * replaces what is there, for a range the caller reserved), else anywhere, aligned to
 * `align` bytes (a power of two, e.g. 2 MiB for huge pages) when given.
 */
static PyObject *py_bench_mmap(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"length", "align", "addr", "replace", NULL};
    unsigned long long length, align = 0, addr = 0;
    int replace = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|KKp:bench_mmap", kwlist, &length, &align,
                                     &addr, &replace))
        return NULL;
    if (length == 0 || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "need length > 0 and align a power of two");
        return NULL;
    }
    int prot = PROT_READ | PROT_WRITE, flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    void *m;
    if (addr) {
        m = mmap((void *)(uintptr_t)addr, length, prot,
                 flags | (replace ? MAP_FIXED : MAP_FIXED_NOREPLACE), -1, 0);
        if (m != MAP_FAILED && (uintptr_t)m != addr) { /* kernels before 4.17: a hint */
            munmap(m, length);
            errno = EEXIST;
            m = MAP_FAILED;
        }
        if (m == MAP_FAILED)
            return pw_raise_errno(errno, "mmap(2) at a fixed address");
        return PyLong_FromUnsignedLongLong((uintptr_t)m);
    }
    if (align <= page_size()) {
        m = mmap(NULL, length, prot, flags, -1, 0);
        if (m == MAP_FAILED)
            return pw_raise_errno(errno, "mmap(2)");
        return PyLong_FromUnsignedLongLong((uintptr_t)m);
    }
    /* Over-allocate, then trim to the aligned part. */
    m = mmap(NULL, length + align, prot, flags, -1, 0);
    if (m == MAP_FAILED)
        return pw_raise_errno(errno, "mmap(2)");
    uintptr_t start = ((uintptr_t)m + align - 1) & ~(uintptr_t)(align - 1);
    if (start > (uintptr_t)m)
        munmap(m, start - (uintptr_t)m);
    uintptr_t tail = (uintptr_t)m + length + align;
    if (tail > start + length)
        munmap((void *)(start + length), tail - (start + length));
    return PyLong_FromUnsignedLongLong(start);
}

static PyObject *py_bench_munmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, length;
    if (!PyArg_ParseTuple(args, "KK:bench_munmap", &addr, &length))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = munmap((void *)(uintptr_t)addr, length);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return pw_raise_errno(errno, "munmap(2)");
    Py_RETURN_NONE;
}

PyMethodDef pw_bench_methods[] = {
    {"write_pages", (PyCFunction)(void (*)(void))py_write_pages, METH_VARARGS | METH_KEYWORDS,
     "write_pages(addr, npages, step=1, order=None, value=1) -> ns: one byte per page."},
    {"scan_ranges_floor", (PyCFunction)(void (*)(void))py_scan_ranges_floor,
     METH_VARARGS | METH_KEYWORDS,
     "scan_ranges_floor(fd, ranges, flags=1, mask=2) -> (ns, pages, regions, cpu_ns)."},
    {"restore_floor", (PyCFunction)(void (*)(void))py_restore_floor,
     METH_VARARGS | METH_KEYWORDS,
     "restore_floor(fd, start, end, dst, src, rearm=False, flags=CHECK_WPASYNC, mask=WRITTEN)\n"
     "-> (ns, pages, regions, cpu_ns): one PAGEMAP_SCAN + memcpy of the written runs."},
    {"scan_floor", (PyCFunction)(void (*)(void))py_scan_floor, METH_VARARGS | METH_KEYWORDS,
     "scan_floor(fd, start, end, flags=WP_MATCHING, mask=WRITTEN) -> "
     "(ns, pages, regions, cpu_ns): the minimal PAGEMAP_SCAN call, timed in C."},
    {"raw_uffd_async", (PyCFunction)(void (*)(void))py_raw_uffd_async,
     METH_VARARGS | METH_KEYWORDS,
     "raw_uffd_async(addr, npages, step=1, order=None) -> dict of ns per step."},
    {"raw_uffd_sync", (PyCFunction)(void (*)(void))py_raw_uffd_sync,
     METH_VARARGS | METH_KEYWORDS,
     "raw_uffd_sync(addr, npages, step=1, order=None) -> dict of ns per step."},
    {"raw_mprotect", (PyCFunction)(void (*)(void))py_raw_mprotect, METH_VARARGS | METH_KEYWORDS,
     "raw_mprotect(addr, npages, step=1, order=None) -> dict of ns per step."},
    {"raw_soft_dirty", (PyCFunction)(void (*)(void))py_raw_soft_dirty,
     METH_VARARGS | METH_KEYWORDS,
     "raw_soft_dirty(addr, npages, step=1, order=None) -> dict of ns per step."},
    {"bench_mmap", (PyCFunction)(void (*)(void))py_bench_mmap, METH_VARARGS | METH_KEYWORDS,
     "bench_mmap(length, align=0, addr=0, replace=False) -> address of an anonymous mapping."},
    {"bench_munmap", py_bench_munmap, METH_VARARGS, "bench_munmap(addr, length)."},
    {NULL, NULL, 0, NULL},
};
