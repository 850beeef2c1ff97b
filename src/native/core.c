/*
 * core.c: userfaultfd(2), the uffd ioctls, PAGEMAP_SCAN, pidfd_getfd, madvise/mprotect and
 * buffer addresses.  Blocking or page-table-walking calls run with the GIL released.
 */
#include "pw.h"
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pagewatch_ARRAY_API
#include <numpy/arrayobject.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int do_ioctl(int fd, unsigned long req, void *arg)
{
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = ioctl(fd, req, arg);
    Py_END_ALLOW_THREADS
    return r;
}

/* ---- userfaultfd ------------------------------------------------------------------ */

static PyObject *py_userfaultfd(PyObject *self, PyObject *args)
{
    int flags;
    if (!PyArg_ParseTuple(args, "i:userfaultfd", &flags))
        return NULL;
    long fd = syscall(__NR_userfaultfd, flags);
    if (fd < 0)
        return pw_raise_errno(errno, "userfaultfd(2)");
    return PyLong_FromLong(fd);
}

static PyObject *py_userfaultfd_dev(PyObject *self, PyObject *args)
{
    int flags;
    if (!PyArg_ParseTuple(args, "i:userfaultfd_dev", &flags))
        return NULL;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return pw_raise_errno(errno, "open(/dev/userfaultfd)");
    int fd = ioctl(dev, PW_USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    if (fd < 0)
        return pw_raise_errno(err, "ioctl(USERFAULTFD_IOC_NEW)");
    return PyLong_FromLong(fd);
}

static PyObject *py_uffdio_api(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long features;
    if (!PyArg_ParseTuple(args, "iK:uffdio_api", &fd, &features))
        return NULL;
    struct pw_uffdio_api api = {.api = PW_UFFD_API, .features = features};
    if (do_ioctl(fd, PW_UFFDIO_API, &api) < 0)
        return pw_raise_errno(errno, "ioctl(UFFDIO_API)");
    return Py_BuildValue("(KK)", (unsigned long long)api.features,
                         (unsigned long long)api.ioctls);
}

static PyObject *py_uffdio_register(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK:uffdio_register", &fd, &start, &len, &mode))
        return NULL;
    struct pw_uffdio_register reg = {.range = {start, len}, .mode = mode};
    if (do_ioctl(fd, PW_UFFDIO_REGISTER, &reg) < 0)
        return pw_raise_errno(errno, "ioctl(UFFDIO_REGISTER)");
    return PyLong_FromUnsignedLongLong(reg.ioctls);
}

static PyObject *py_uffdio_unregister(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKK:uffdio_unregister", &fd, &start, &len))
        return NULL;
    struct pw_uffdio_range range = {start, len};
    if (do_ioctl(fd, PW_UFFDIO_UNREGISTER, &range) < 0)
        return pw_raise_errno(errno, "ioctl(UFFDIO_UNREGISTER)");
    Py_RETURN_NONE;
}

static PyObject *py_uffdio_writeprotect(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK:uffdio_writeprotect", &fd, &start, &len, &mode))
        return NULL;
    struct pw_uffdio_writeprotect wp = {.range = {start, len}, .mode = mode};
    if (do_ioctl(fd, PW_UFFDIO_WRITEPROTECT, &wp) < 0)
        return pw_raise_errno(errno, "ioctl(UFFDIO_WRITEPROTECT)");
    Py_RETURN_NONE;
}

/* ---- PAGEMAP_SCAN ----------------------------------------------------------------- */

/*
 * One ioctl exactly, as the kernel sees it: for tests of the kernel's own behaviour and
 * for probing.  vec_addr == -1 means "use a buffer of vec_len regions that we allocate";
 * any other value is passed through as the vec pointer (0 for NULL, ~0 for the probe).
 * Returns (ret, walk_end, regions[:ret] as an (n, 3) uint64 array).
 */
static PyObject *py_pagemap_scan_once(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "start", "end", "flags", "category_mask",
                             "category_inverted", "category_anyof_mask", "return_mask",
                             "max_pages", "vec_len", "vec_addr", "size", NULL};
    int fd;
    unsigned long long start, end, flags = 0, cmask = 0, cinv = 0, cany = 0, rmask = 0,
                                    max_pages = 0, vec_len = 0, size = sizeof(struct pw_pm_scan_arg);
    long long vec_addr = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|KKKKKKKLK:pagemap_scan_once", kwlist, &fd,
                                     &start, &end, &flags, &cmask, &cinv, &cany, &rmask,
                                     &max_pages, &vec_len, &vec_addr, &size))
        return NULL;
    npy_intp dims[2] = {vec_addr == -1 ? (npy_intp)vec_len : 0, 3};
    PyArrayObject *out = (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_UINT64, 0);
    if (!out)
        return NULL;
    /* A larger struct than the kernel knows is rejected by it (size must be exact); pad
     * the buffer so a caller testing that cannot make us read past our own memory. */
    unsigned char storage[256] = {0};
    struct pw_pm_scan_arg *arg = (struct pw_pm_scan_arg *)storage;
    *arg = (struct pw_pm_scan_arg){
        .size = size, .flags = flags, .start = start, .end = end,
        .vec = vec_addr == -1 ? (uint64_t)(uintptr_t)PyArray_DATA(out) : (uint64_t)vec_addr,
        .vec_len = vec_len, .max_pages = max_pages, .category_inverted = cinv,
        .category_mask = cmask, .category_anyof_mask = cany, .return_mask = rmask,
    };
    int ret = do_ioctl(fd, PW_PAGEMAP_SCAN, arg);
    if (ret < 0) {
        Py_DECREF(out);
        return pw_raise_errno(errno, "ioctl(PAGEMAP_SCAN)");
    }
    PyObject *regions = PySequence_GetSlice((PyObject *)out, 0, vec_addr == -1 ? ret : 0);
    Py_DECREF(out);
    if (!regions)
        return NULL;
    return Py_BuildValue("(iKN)", ret, (unsigned long long)arg->walk_end, regions);
}

/*
 * The output vector of the tracking loop: each thread keeps one (freed when it exits), so a
 * collect allocates nothing but its result.  It is sized from the range (at most n/2 + 1
 * runs in n pages), up to SCRATCH_KEEP runs; a larger answer moves to a malloc'd vector
 * grown by doubling, freed after the call.
 */
#define SCRATCH_KEEP ((size_t)(4u << 20) / sizeof(struct pw_page_region))

struct scratch {
    struct pw_page_region *buf;
    size_t cap;
};

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ok;

static void scratch_free(void *p)
{
    struct scratch *s = p;
    free(s->buf);
    free(s);
}

static void scratch_init(void)
{
    scratch_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* This thread's scratch vector with room for `want` runs (want <= SCRATCH_KEEP), or NULL. */
static struct scratch *scratch_get(size_t want)
{
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_ok)
        return NULL;
    struct scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof(*s))))
            return NULL;
        if (pthread_setspecific(scratch_key, s)) {
            free(s);
            return NULL;
        }
    }
    if (s->cap < want) {
        size_t cap = s->cap * 2 > want ? s->cap * 2 : want;
        if (cap > SCRATCH_KEEP)
            cap = SCRATCH_KEEP;
        struct pw_page_region *nb = malloc(cap * sizeof(*nb));
        if (!nb)
            return NULL;
        free(s->buf);
        s->buf = nb;
        s->cap = cap;
    }
    return s;
}

/*
 * The PAGEMAP_SCAN loop, with no Python in it.  `tmpl` gives flags, masks and max_pages;
 * start, end, vec and vec_len are the loop's.  With want_output, out->buf holds out->n runs
 * in address order (out->owned: malloc'd here, the caller frees it; otherwise it is the
 * thread's scratch vector, valid until this thread's next call).  Stops at end, at
 * max_pages, or when the kernel makes no progress (out->walk_end < end then).  Returns 0 or
 * an errno.  Call without the GIL, or with it for a small range.
 */
static int scan_loop(int fd, uint64_t start, uint64_t end, const struct pw_pm_scan_arg *tmpl,
                     int want_output, struct pw_scan *out)
{
    /* Shifts, not divisions by a run-time page size (a 64-bit division per run cost ~14 %
     * of a get of 16k runs). */
    const unsigned shift = pw_page_shift();
    const uint64_t max_pages = tmpl->max_pages;
    size_t cap = 0, n = 0;
    int owned = 0;
    struct pw_page_region *buf = NULL;
    if (want_output) {
        uint64_t bound = ((end - start) >> shift) / 2 + 2;
        if (max_pages && max_pages + 2 < bound)
            bound = max_pages + 2;
        struct scratch *s = scratch_get(bound < SCRATCH_KEEP ? (size_t)bound : SCRATCH_KEEP);
        if (!s)
            return ENOMEM;
        buf = s->buf;
        cap = s->cap;
    }
    uint64_t found = 0, cursor = start;
    int err = 0;
    while (cursor < end) {
        if (max_pages && found >= max_pages)
            break;
        if (want_output && n == cap) {
            struct pw_page_region *nb;
            if (owned) {
                nb = realloc(buf, 2 * cap * sizeof(*buf));
            } else if ((nb = malloc(2 * cap * sizeof(*buf)))) {
                memcpy(nb, buf, n * sizeof(*buf));
                owned = 1;
            }
            if (!nb) {
                err = ENOMEM;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        struct pw_pm_scan_arg arg = *tmpl;
        arg.size = sizeof(arg);
        arg.start = cursor;
        arg.end = end;
        arg.walk_end = 0;
        arg.vec = want_output ? (uint64_t)(uintptr_t)(buf + n) : 0;
        arg.vec_len = want_output ? (uint64_t)(cap - n) : 0;
        arg.max_pages = max_pages ? max_pages - found : 0;
        int ret = ioctl(fd, PW_PAGEMAP_SCAN, &arg);
        if (ret < 0) {
            err = errno;
            break;
        }
        /* Linux (6.18 at least) can return a walk_end behind where the call stopped:
         * do_pagemap_scan() keeps the walk_end of an internal restart (its 512-run bounce
         * buffer filled) when its last internal walk completes, so the next call reports
         * runs again.  Drop what lies below the end of the runs held: the output stays in
         * address order without repeats (each dropped page is in it already). */
        int got = ret;
        if (n > 0 && ret > 0) {
            uint64_t held = buf[n - 1].end;
            int skip = 0;
            while (skip < ret && buf[n + skip].end <= held)
                skip++;
            if (skip < ret && buf[n + skip].start < held)
                buf[n + skip].start = held;
            if (skip) {
                memmove(buf + n, buf + n + skip, (ret - skip) * sizeof(*buf));
                ret -= skip;
            }
        }
        if (max_pages) /* else counted once at the end, in the copy-out */
            for (int i = 0; i < ret; i++)
                found += (buf[n + i].end - buf[n + i].start) >> shift;
        /* Merge the first new run into the last old one when the stop split a run. */
        if (ret > 0 && n > 0 && buf[n - 1].end == buf[n].start &&
            buf[n - 1].categories == buf[n].categories) {
            buf[n - 1].end = buf[n].end;
            memmove(buf + n, buf + n + 1, (ret - 1) * sizeof(*buf));
            ret -= 1;
        }
        n += ret;
        if (arg.walk_end <= cursor && got == 0)
            break; /* no progress: the kernel backed out (partial hugetlb page) */
        cursor = arg.walk_end;
    }
    out->buf = buf;
    out->n = n;
    out->owned = owned;
    out->walk_end = cursor > end ? end : cursor;
    out->pages = found;
    out->counted = max_pages != 0;
    return err;
}

/* Ranges up to this many bytes are scanned with the GIL held: releasing and taking it
 * back costs about as much as walking them. */
#define SCAN_KEEP_GIL ((uint64_t)2 << 20)

static int scan_maybe_nogil(int fd, uint64_t start, uint64_t end,
                            const struct pw_pm_scan_arg *tmpl, int want_output,
                            struct pw_scan *res)
{
    int err;
    if (end - start <= SCAN_KEEP_GIL)
        return scan_loop(fd, start, end, tmpl, want_output, res);
    Py_BEGIN_ALLOW_THREADS
    err = scan_loop(fd, start, end, tmpl, want_output, res);
    Py_END_ALLOW_THREADS
    return err;
}

/* int64 (n, 2) [first, end) page indices from `base`, categories dropped: the form
 * DirtyPages keeps, made while copying out. */
static PyObject *runs_from(struct pw_scan *res, uint64_t base)
{
    const unsigned shift = pw_page_shift();
    const uint64_t round = ((uint64_t)1 << shift) - 1;
    npy_intp dims[2] = {(npy_intp)res->n, 2};
    PyArrayObject *out = (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_INT64, 0);
    if (!out)
        return NULL;
    int64_t *o = PyArray_DATA(out);
    const struct pw_page_region *buf = res->buf;
    uint64_t pages = 0;
    for (size_t i = 0; i < res->n; i++) {
        int64_t a = (int64_t)((buf[i].start - base) >> shift);
        int64_t b = (int64_t)((buf[i].end - base + round) >> shift);
        o[2 * i] = a;
        o[2 * i + 1] = b;
        pages += (uint64_t)(b - a);
    }
    if (!res->counted) {
        res->pages = pages;
        res->counted = 1;
    }
    return (PyObject *)out;
}

/*
 * The tracking loop for Python.  Returns (regions as an (n, 3) uint64 array, walk_end,
 * pages found), or with pages_base >= 0 int64 (n, 2) page runs from that address.
 * Without output (want_output false) the kernel is passed vec = NULL, vec_len = 0.
 * `capacity` is accepted and ignored: the vector is sized from the range.
 */
static PyObject *py_pagemap_scan(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "start", "end", "flags", "category_mask",
                             "category_inverted", "category_anyof_mask", "return_mask",
                             "max_pages", "capacity", "want_output", "pages_base", NULL};
    int fd, want_output = 1;
    long long pages_base = -1;
    unsigned long long start, end, flags = 0, cmask = 0, cinv = 0, cany = 0, rmask = 0,
                                    max_pages = 0, capacity = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|KKKKKKKpL:pagemap_scan", kwlist, &fd,
                                     &start, &end, &flags, &cmask, &cinv, &cany, &rmask,
                                     &max_pages, &capacity, &want_output, &pages_base))
        return NULL;
    if (end < start)
        end = start;
    const struct pw_pm_scan_arg tmpl = {
        .flags = flags, .max_pages = max_pages, .category_inverted = cinv,
        .category_mask = cmask, .category_anyof_mask = cany, .return_mask = rmask,
    };
    struct pw_scan res = {0};
    int err = scan_maybe_nogil(fd, start, end, &tmpl, want_output, &res);
    PyObject *out = NULL;
    if (err) {
        pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)");
    } else if (pages_base >= 0) {
        out = runs_from(&res, (uint64_t)pages_base);
    } else {
        npy_intp dims[2] = {(npy_intp)res.n, 3};
        out = PyArray_EMPTY(2, dims, NPY_UINT64, 0);
        if (out && res.n)
            memcpy(PyArray_DATA((PyArrayObject *)out), res.buf, res.n * sizeof(*res.buf));
        if (!res.counted) {
            const unsigned shift = pw_page_shift();
            for (size_t i = 0; i < res.n; i++)
                res.pages += (res.buf[i].end - res.buf[i].start) >> shift;
        }
    }
    if (res.owned)
        free(res.buf);
    if (!out)
        return NULL;
    return Py_BuildValue("(NKK)", out, (unsigned long long)res.walk_end,
                         (unsigned long long)res.pages);
}

/*
 * scan_runs(fd, start, end, base, flags, mask, max_pages, check=0) -> (runs, walk_end, pages):
 * the tracker's collect in one call, positional arguments only (no keyword parsing on the
 * path every collect takes).  Pages matching `mask` (category_mask = return_mask) as int64
 * (n, 2) [first, end) page indices from `base`.  With `check`, msync(MS_ASYNC) first makes
 * sure all of [start, end) is still mapped (a scan skips holes silently): OSError(ENOMEM,
 * ..., "msync(2)") when not.  Raises OSError(errno).
 */
static PyObject *py_scan_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 && nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_runs(fd, start, end, base, flags, mask, max_pages, check=0)");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    unsigned long long v[6];
    for (int i = 0; i < 6; i++)
        v[i] = PyLong_AsUnsignedLongLong(args[i + 1]);
    int check = nargs == 8 ? PyObject_IsTrue(args[7]) : 0;
    if (PyErr_Occurred())
        return NULL;
    uint64_t start = v[0], end = v[1] < v[0] ? v[0] : v[1];
    const struct pw_pm_scan_arg tmpl = {
        .flags = v[3], .max_pages = v[5], .category_mask = v[4], .return_mask = v[4],
    };
    if (check && end > start && msync((void *)(uintptr_t)start, end - start, MS_ASYNC) < 0)
        return pw_raise_errno(errno, "msync(2)");
    struct pw_scan res = {0};
    int err = scan_maybe_nogil(fd, start, end, &tmpl, 1, &res);
    PyObject *out = err ? pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)") : runs_from(&res, v[2]);
    if (res.owned)
        free(res.buf);
    if (!out)
        return NULL;
    PyObject *t = PyTuple_New(3);
    if (!t) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, out);
    PyTuple_SET_ITEM(t, 1, PyLong_FromUnsignedLongLong(res.walk_end));
    PyTuple_SET_ITEM(t, 2, PyLong_FromUnsignedLongLong(res.pages));
    if (!PyTuple_GET_ITEM(t, 1) || !PyTuple_GET_ITEM(t, 2)) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/*
 * collect_runs(fd, start, end, flags, mask) -> int64 (n, 2) [first, end) page indices from
 * `start`: a tracker's whole collect in one call, the fixed cost a small region pays kept to
 * the two system calls.  msync(MS_ASYNC) first checks that all of [start, end) is still
 * mapped (a scan passes over holes without a word): OSError(ENOMEM, ..., "msync(2)") when
 * not.  Then the PAGEMAP_SCAN loop (category_mask = return_mask = mask), no max_pages: a
 * walk that stops short of `end` made no progress, raised as OSError(EAGAIN, ...,
 * "PAGEMAP_SCAN", None, walk_end): filename "PAGEMAP_SCAN", filename2 the walk_end.  Other failures: OSError(errno, ..., "ioctl(PAGEMAP_SCAN)").
 * No tuple, no page count: the array is the answer.
 */
static PyObject *py_collect_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "collect_runs(fd, start, end, flags, mask)");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    uint64_t start = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t end = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t flags = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t mask = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (end < start)
        end = start;
    if (end > start && msync((void *)(uintptr_t)start, end - start, MS_ASYNC) < 0)
        return pw_raise_errno(errno, "msync(2)");
    const struct pw_pm_scan_arg tmpl = {.flags = flags, .category_mask = mask,
                                        .return_mask = mask};
    struct pw_scan res = {0};
    int err = scan_maybe_nogil(fd, start, end, &tmpl, 1, &res);
    PyObject *out = NULL;
    if (err) {
        pw_raise_errno(err, "ioctl(PAGEMAP_SCAN)");
    } else if (res.walk_end < end) {
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "issOK", EAGAIN,
                                              "PAGEMAP_SCAN made no progress", "PAGEMAP_SCAN",
                                              Py_None, (unsigned long long)res.walk_end);
        if (exc) {
            PyErr_SetObject(PyExc_OSError, exc);
            Py_DECREF(exc);
        }
    } else {
        res.counted = 1; /* no page count wanted */
        out = runs_from(&res, start);
    }
    if (res.owned)
        free(res.buf);
    return out;
}

/*
 * The tracking loop over many ranges in one call: pagemap_scan_ranges(fd, ranges, flags,
 * category_mask, category_inverted, category_anyof_mask, return_mask) with ranges a
 * contiguous int64 (k, 2) array of [start, end).  Returns (regions (n, 3) uint64, owner
 * (n,) int64: the index of the range each region comes from, errors (k,) int32: 0, the
 * errno of the range's failed ioctl (the other ranges are still scanned), or -1 when the
 * kernel made no progress).  One Python call per collect instead of one per mapping.
 */
static PyObject *py_pagemap_scan_ranges(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *obj;
    unsigned long long flags = 0, cmask = 0, cinv = 0, cany = 0, rmask = 0;
    if (!PyArg_ParseTuple(args, "iO|KKKKK:pagemap_scan_ranges", &fd, &obj, &flags, &cmask,
                          &cinv, &cany, &rmask))
        return NULL;
    PyArrayObject *ranges = (PyArrayObject *)PyArray_FROMANY(
        obj, NPY_INT64, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!ranges)
        return NULL;
    if (PyArray_DIM(ranges, 1) != 2) {
        Py_DECREF(ranges);
        PyErr_SetString(PyExc_ValueError, "ranges must be an (k, 2) array");
        return NULL;
    }
    npy_intp k = PyArray_DIM(ranges, 0);
    const int64_t *r = PyArray_DATA(ranges);
    npy_intp edims[1] = {k};
    PyArrayObject *errs = (PyArrayObject *)PyArray_ZEROS(1, edims, NPY_INT32, 0);
    if (!errs) {
        Py_DECREF(ranges);
        return NULL;
    }
    int32_t *e = PyArray_DATA(errs);
    const struct pw_pm_scan_arg tmpl = {
        .flags = flags, .category_inverted = cinv, .category_mask = cmask,
        .category_anyof_mask = cany, .return_mask = rmask,
    };
    struct pw_page_region *all = NULL;
    int64_t *owner = NULL;
    size_t n = 0, cap = 0;
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < k && !oom; i++) {
        struct pw_scan res = {0};
        uint64_t start = (uint64_t)r[2 * i], end = (uint64_t)r[2 * i + 1];
        int err = scan_loop(fd, start, end, &tmpl, 1, &res);
        if (err)
            e[i] = err;
        else if (res.walk_end < end)
            e[i] = -1;
        if (!err && res.n) {
            if (n + res.n > cap) {
                size_t nc = cap ? cap : 256;
                while (nc < n + res.n)
                    nc *= 2;
                struct pw_page_region *na = realloc(all, nc * sizeof(*all));
                int64_t *no = na ? realloc(owner, nc * sizeof(*owner)) : NULL;
                if (na)
                    all = na;
                if (!na || !no) {
                    oom = 1;
                } else {
                    owner = no;
                    cap = nc;
                }
            }
            if (!oom) {
                memcpy(all + n, res.buf, res.n * sizeof(*all));
                for (size_t j = 0; j < res.n; j++)
                    owner[n + j] = (int64_t)i;
                n += res.n;
            }
        }
        if (res.owned)
            free(res.buf);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(ranges);
    if (oom) {
        free(all);
        free(owner);
        Py_DECREF(errs);
        return PyErr_NoMemory();
    }
    npy_intp dims[2] = {(npy_intp)n, 3}, odims[1] = {(npy_intp)n};
    PyArrayObject *out = (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_UINT64, 0);
    PyArrayObject *own = (PyArrayObject *)PyArray_EMPTY(1, odims, NPY_INT64, 0);
    if (out && own && n) {
        memcpy(PyArray_DATA(out), all, n * sizeof(*all));
        memcpy(PyArray_DATA(own), owner, n * sizeof(*owner));
    }
    free(all);
    free(owner);
    if (!out || !own) {
        Py_XDECREF(out);
        Py_XDECREF(own);
        Py_DECREF(errs);
        return NULL;
    }
    return Py_BuildValue("(NNN)", out, own, errs);
}

/* ---- pidfd, memory, buffers ------------------------------------------------------- */

static PyObject *py_pidfd_getfd(PyObject *self, PyObject *args)
{
    int pidfd, targetfd, flags = 0;
    if (!PyArg_ParseTuple(args, "ii|i:pidfd_getfd", &pidfd, &targetfd, &flags))
        return NULL;
    long fd = syscall(__NR_pidfd_getfd, pidfd, targetfd, flags);
    if (fd < 0)
        return pw_raise_errno(errno, "pidfd_getfd(2)");
    return PyLong_FromLong(fd);
}

static PyObject *py_madvise(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int advice;
    if (!PyArg_ParseTuple(args, "KKi:madvise", &addr, &len, &advice))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = madvise((void *)(uintptr_t)addr, len, advice);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return pw_raise_errno(errno, "madvise(2)");
    Py_RETURN_NONE;
}

static PyObject *py_mprotect(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int prot;
    if (!PyArg_ParseTuple(args, "KKi:mprotect", &addr, &len, &prot))
        return NULL;
    if (mprotect((void *)(uintptr_t)addr, len, prot) < 0)
        return pw_raise_errno(errno, "mprotect(2)");
    Py_RETURN_NONE;
}

static PyObject *py_msync(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int flags;
    if (!PyArg_ParseTuple(args, "KKi:msync", &addr, &len, &flags))
        return NULL;
    if (msync((void *)(uintptr_t)addr, len, flags) < 0)
        return pw_raise_errno(errno, "msync(2)");
    Py_RETURN_NONE;
}

/*
 * buffer_info(obj) -> (address, nbytes, readonly).  Raises BufferError for an object that
 * is not one C-contiguous block (the tracker needs one address range).
 */
static PyObject *py_buffer_info(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    int readonly = 0;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();
        if (PyObject_GetBuffer(obj, &view, PyBUF_ANY_CONTIGUOUS) < 0)
            return NULL;
        readonly = 1;
    }
    PyObject *res = Py_BuildValue("(KnO)", (unsigned long long)(uintptr_t)view.buf, view.len,
                                  readonly ? Py_True : Py_False);
    PyBuffer_Release(&view);
    return res;
}

/* Fill [addr, addr+len) with byte `value` at `stride` intervals, GIL released: a writer
 * that runs in C while Python threads call collect. */
static PyObject *py_poke(PyObject *self, PyObject *args)
{
    unsigned long long addr, len, stride, value;
    int width = 1;
    if (!PyArg_ParseTuple(args, "KKKK|i:poke", &addr, &len, &stride, &value, &width))
        return NULL;
    if (width != 1 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 1 or 8");
        return NULL;
    }
    if (width == 8 && (addr % 8 || stride % 8)) {
        PyErr_SetString(PyExc_ValueError, "8-byte writes need an address and stride aligned to 8");
        return NULL;
    }
    if (stride == 0)
        stride = (unsigned long long)width;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned long long off = 0; off + (unsigned long long)width <= len; off += stride) {
        if (width == 8)
            *(volatile uint64_t *)(uintptr_t)(addr + off) = value;
        else
            *(volatile unsigned char *)(uintptr_t)(addr + off) = (unsigned char)value;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef pw_core_methods[] = {
    {"userfaultfd", py_userfaultfd, METH_VARARGS, "userfaultfd(flags) -> fd, via the syscall."},
    {"userfaultfd_dev", py_userfaultfd_dev, METH_VARARGS,
     "userfaultfd_dev(flags) -> fd, via /dev/userfaultfd and USERFAULTFD_IOC_NEW."},
    {"uffdio_api", py_uffdio_api, METH_VARARGS, "uffdio_api(fd, features) -> (features, ioctls)."},
    {"uffdio_register", py_uffdio_register, METH_VARARGS,
     "uffdio_register(fd, start, len, mode) -> ioctls."},
    {"uffdio_unregister", py_uffdio_unregister, METH_VARARGS, "uffdio_unregister(fd, start, len)."},
    {"uffdio_writeprotect", py_uffdio_writeprotect, METH_VARARGS,
     "uffdio_writeprotect(fd, start, len, mode)."},
    {"pagemap_scan_once", (PyCFunction)(void (*)(void))py_pagemap_scan_once,
     METH_VARARGS | METH_KEYWORDS, "One PAGEMAP_SCAN ioctl -> (ret, walk_end, regions)."},
    {"pagemap_scan", (PyCFunction)(void (*)(void))py_pagemap_scan, METH_VARARGS | METH_KEYWORDS,
     "PAGEMAP_SCAN looped until done -> (regions, walk_end, pages)."},
    {"pagemap_scan_ranges", py_pagemap_scan_ranges, METH_VARARGS,
     "pagemap_scan_ranges(fd, ranges, flags, mask, inverted, anyof, return_mask)\n"
     "-> (regions, owner range index, errno per range): the loop over many ranges."},
    {"scan_runs", (PyCFunction)(void (*)(void))py_scan_runs, METH_FASTCALL,
     "scan_runs(fd, start, end, base, flags, mask, max_pages, check=0) -> (int64 (n, 2) "
     "page runs from base, walk_end, pages): the PAGEMAP_SCAN loop for a tracker's collect."},
    {"collect_runs", (PyCFunction)(void (*)(void))py_collect_runs, METH_FASTCALL,
     "collect_runs(fd, start, end, flags, mask) -> int64 (n, 2) page runs from start: a\n"
     "tracker's collect (mapped check + PAGEMAP_SCAN loop) in one call."},
    {"pidfd_getfd", py_pidfd_getfd, METH_VARARGS, "pidfd_getfd(pidfd, targetfd, flags=0) -> fd."},
    {"madvise", py_madvise, METH_VARARGS, "madvise(addr, len, advice)."},
    {"msync", py_msync, METH_VARARGS, "msync(addr, len, flags): ENOMEM if not all mapped."},
    {"mprotect", py_mprotect, METH_VARARGS, "mprotect(addr, len, prot)."},
    {"buffer_info", py_buffer_info, METH_O, "buffer_info(obj) -> (address, nbytes, readonly)."},
    {"poke", py_poke, METH_VARARGS,
     "poke(addr, len, stride, value, width=1): write a byte (width 8: an aligned uint64)\n"
     "every stride bytes of [addr, addr+len), GIL released."},
    {NULL, NULL, 0, NULL},
};
