/*
 * copy.c: the page-run loops of Snapshot (src/pagewatch/snapshot.py), GIL released.
 *
 *   copy_runs     copy the bytes of given page runs from one block to another, clipped to
 *                 [lo, hi): a target that shares its first and last pages with other data
 *                 never has those neighbours overwritten
 *   madvise_runs  madvise the page runs (restore by MADV_DONTNEED): process_madvise() on
 *                 this process, 1024 runs per call (Linux 6.13+ accepts every advice for
 *                 itself, and 6.16+ flushes the TLB once per call, not once per run); one
 *                 madvise() per run where the kernel refuses it
 *   differing_pages  the pages of given runs whose bytes differ between two blocks
 *   scatter_runs  copy packed bytes into given byte runs of a block (a checkpoint delta
 *                 applied to the array it builds on)
 *
 * Runs are an int64 (n, 2) array of [first, end) page indices relative to both blocks'
 * page 0 (the layout of DirtyPages.runs).  No policy here: the caller checked the ranges.
 */
#include "pw.h"
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pagewatch_ARRAY_API
#include <numpy/arrayobject.h>

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#ifndef __NR_process_madvise
#  define __NR_process_madvise 440
#endif
/* include/uapi/linux/pidfd.h (6.15): the calling thread, no descriptor to open or to leak
 * into a fork child (whose copy would name the parent). */
#define PW_PIDFD_SELF (-10000)
#define PW_IOV_BATCH 1024 /* UIO_MAXIOV */

/* process_madvise(PIDFD_SELF) refused here once (EBADF/EINVAL/ENOSYS/EPERM: a kernel
 * before 6.15 has no PIDFD_SELF, one before 6.13 refuses MADV_DONTNEED): never again. */
static int no_process_madvise;

/* The runs argument as a C-contiguous int64 (n, 2) array (a new reference), or NULL. */
static PyArrayObject *as_runs(PyObject *obj)
{
    PyArrayObject *runs = (PyArrayObject *)PyArray_FROMANY(
        obj, NPY_INT64, 1, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!runs)
        return NULL;
    if (PyArray_SIZE(runs) % 2 || (PyArray_NDIM(runs) == 2 && PyArray_DIM(runs, 1) != 2)) {
        PyErr_SetString(PyExc_ValueError, "runs must be an int64 (n, 2) array");
        Py_DECREF(runs);
        return NULL;
    }
    const int64_t *r = (const int64_t *)PyArray_DATA(runs);
    for (npy_intp i = 0; i < PyArray_SIZE(runs); i += 2)
        if (r[i] < 0 || r[i + 1] < r[i]) {
            PyErr_SetString(PyExc_ValueError, "runs must be [first, end) with 0 <= first <= end");
            Py_DECREF(runs);
            return NULL;
        }
    return runs;
}

static PyObject *py_copy_runs(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dst", "src", "runs", "lo", "hi", "page_size", NULL};
    unsigned long long dst, src, lo, hi, ps = 4096;
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKOKK|K:copy_runs", kwlist, &dst, &src, &obj,
                                     &lo, &hi, &ps))
        return NULL;
    if (ps == 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be > 0");
        return NULL;
    }
    PyArrayObject *runs = as_runs(obj);
    if (!runs)
        return NULL;
    const int64_t *r = (const int64_t *)PyArray_DATA(runs);
    npy_intp n = PyArray_SIZE(runs) / 2;
    unsigned long long copied = 0;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n; i++) {
        unsigned long long a = (unsigned long long)r[2 * i] * ps;
        unsigned long long b = (unsigned long long)r[2 * i + 1] * ps;
        if (a < lo)
            a = lo;
        if (b > hi)
            b = hi;
        if (a >= b)
            continue;
        memcpy((void *)(uintptr_t)(dst + a), (const void *)(uintptr_t)(src + a), b - a);
        copied += b - a;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(runs);
    return PyLong_FromUnsignedLongLong(copied);
}

static PyObject *py_madvise_runs(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "runs", "advice", "page_size", NULL};
    unsigned long long base, ps = 4096;
    int advice;
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KOi|K:madvise_runs", kwlist, &base, &obj,
                                     &advice, &ps))
        return NULL;
    PyArrayObject *runs = as_runs(obj);
    if (!runs)
        return NULL;
    const int64_t *r = (const int64_t *)PyArray_DATA(runs);
    npy_intp n = PyArray_SIZE(runs) / 2;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    struct iovec iov[PW_IOV_BATCH];
    npy_intp done = 0; /* runs advised by process_madvise */
    while (!no_process_madvise && done < n) {
        int k = 0;
        npy_intp i = done;
        size_t want = 0;
        for (; i < n && k < PW_IOV_BATCH; i++) {
            if (r[2 * i + 1] == r[2 * i])
                continue;
            iov[k].iov_base = (void *)(uintptr_t)(base + (unsigned long long)r[2 * i] * ps);
            iov[k].iov_len = (size_t)(r[2 * i + 1] - r[2 * i]) * ps;
            want += iov[k].iov_len;
            k++;
        }
        long got = k ? syscall(__NR_process_madvise, PW_PIDFD_SELF, iov, (size_t)k, advice, 0U)
                     : 0;
        if (got < 0 || (size_t)got != want) {
            /* Refused (or stopped part-way): the runs from `done` on go one by one below;
             * advising a run twice is harmless for the advice used here. */
            int e = got < 0 ? errno : 0;
            if (e == EBADF || e == EINVAL || e == ENOSYS || e == EPERM)
                no_process_madvise = 1;
            break;
        }
        done = i;
    }
    for (npy_intp i = done; i < n && !err; i++) {
        if (r[2 * i + 1] == r[2 * i])
            continue;
        if (madvise((void *)(uintptr_t)(base + (unsigned long long)r[2 * i] * ps),
                    (size_t)(r[2 * i + 1] - r[2 * i]) * ps, advice) < 0)
            err = errno;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(runs);
    if (err)
        return pw_raise_errno(err, "madvise");
    Py_RETURN_NONE;
}

static PyObject *py_differing_pages(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"a", "b", "runs", "lo", "hi", "page_size", NULL};
    unsigned long long a, b, lo, hi, ps = 4096;
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKOKK|K:differing_pages", kwlist, &a, &b, &obj,
                                     &lo, &hi, &ps))
        return NULL;
    if (ps == 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be > 0");
        return NULL;
    }
    PyArrayObject *runs = as_runs(obj);
    if (!runs)
        return NULL;
    const int64_t *r = (const int64_t *)PyArray_DATA(runs);
    npy_intp n = PyArray_SIZE(runs) / 2, total = 0;
    for (npy_intp i = 0; i < n; i++)
        total += (npy_intp)(r[2 * i + 1] - r[2 * i]);
    npy_intp dims[1] = {total};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!out) {
        Py_DECREF(runs);
        return NULL;
    }
    int64_t *o = (int64_t *)PyArray_DATA(out);
    npy_intp found = 0;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n; i++)
        for (int64_t p = r[2 * i]; p < r[2 * i + 1]; p++) {
            unsigned long long x = (unsigned long long)p * ps, y = x + ps;
            if (x < lo)
                x = lo;
            if (y > hi)
                y = hi;
            if (x < y && memcmp((const void *)(uintptr_t)(a + x),
                                (const void *)(uintptr_t)(b + x), y - x))
                o[found++] = p;
        }
    Py_END_ALLOW_THREADS
    Py_DECREF(runs);
    PyObject *res = PySequence_GetSlice((PyObject *)out, 0, found);
    Py_DECREF(out);
    return res;
}

/* scatter_runs(dst, src, runs, nbytes) -> bytes copied: runs are int64 (n, 2) [start, end)
 * byte offsets of dst, sorted, disjoint and below nbytes (checked); src holds their bytes one
 * run after the other. */
static PyObject *py_scatter_runs(PyObject *self, PyObject *args)
{
    unsigned long long dst, nbytes;
    Py_buffer src;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "Ky*OK:scatter_runs", &dst, &src, &obj, &nbytes))
        return NULL;
    PyArrayObject *runs = as_runs(obj);
    if (!runs) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const int64_t *r = (const int64_t *)PyArray_DATA(runs);
    npy_intp n = PyArray_SIZE(runs) / 2;
    unsigned long long need = 0, prev = 0;
    for (npy_intp i = 0; i < n; i++) {
        if ((unsigned long long)r[2 * i] < prev || (unsigned long long)r[2 * i + 1] > nbytes) {
            PyErr_SetString(PyExc_ValueError, "runs must be sorted, disjoint and inside dst");
            goto fail;
        }
        prev = (unsigned long long)r[2 * i + 1];
        need += (unsigned long long)(r[2 * i + 1] - r[2 * i]);
    }
    if (need != (unsigned long long)src.len) {
        PyErr_SetString(PyExc_ValueError, "src must hold exactly the bytes of the runs");
        goto fail;
    }
    const char *from = src.buf;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n; i++) {
        size_t len = (size_t)(r[2 * i + 1] - r[2 * i]);
        memcpy((void *)(uintptr_t)(dst + (unsigned long long)r[2 * i]), from, len);
        from += len;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(runs);
    PyBuffer_Release(&src);
    return PyLong_FromUnsignedLongLong(need);
fail:
    Py_DECREF(runs);
    PyBuffer_Release(&src);
    return NULL;
}

PyMethodDef pw_copy_methods[] = {
    {"copy_runs", (PyCFunction)(void (*)(void))py_copy_runs, METH_VARARGS | METH_KEYWORDS,
     "copy_runs(dst, src, runs, lo, hi, page_size=4096) -> bytes copied: for each run of\n"
     "pages, copy [max(first*page_size, lo), min(end*page_size, hi)) from src+off to dst+off."},
    {"madvise_runs", (PyCFunction)(void (*)(void))py_madvise_runs, METH_VARARGS | METH_KEYWORDS,
     "madvise_runs(base, runs, advice, page_size=4096): madvise each run of pages."},
    {"differing_pages", (PyCFunction)(void (*)(void))py_differing_pages,
     METH_VARARGS | METH_KEYWORDS,
     "differing_pages(a, b, runs, lo, hi, page_size=4096) -> int64 array of the pages of\n"
     "runs whose bytes in [lo, hi) differ between a+off and b+off."},
    {"scatter_runs", py_scatter_runs, METH_VARARGS,
     "scatter_runs(dst, src, runs, nbytes) -> bytes copied: the packed bytes of src into the\n"
     "byte runs [start, end) of dst (sorted, disjoint, below nbytes)."},
    {NULL, NULL, 0, NULL},
};
