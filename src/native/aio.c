/*
 * aio.c: Linux native AIO (io_setup / io_submit / io_getevents) for a checkpoint's direct
 * writes (src/pagewatch/checkpoint/_store.py), and fallocate.
 *
 *   aio_setup     a context for up to nr writes in flight
 *   aio_pwrite    submit one write of a memory block at a file offset, tagged
 *   aio_reap      wait for at least min_nr completions: [(tag, result), ...]
 *   aio_destroy   drop a context (the kernel first waits for its writes in flight)
 *   fallocate     fallocate(2), with no emulation (glibc's posix_fallocate writes zeros)
 *
 * Why AIO: io_submit queues a direct write and returns, so the disk has many writes at once
 * (a preallocated file: ext4 takes its lock shared for those) while this thread fills the
 * next block; a thread calling pwrite keeps one in flight and needs the GIL between them.
 * No policy here: which blocks, when to wait and what an error means are _store.py's.
 */
#include "pw.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>

static PyObject *py_aio_setup(PyObject *self, PyObject *args)
{
    unsigned nr;
    if (!PyArg_ParseTuple(args, "I:aio_setup", &nr))
        return NULL;
    aio_context_t ctx = 0;
    if (syscall(__NR_io_setup, nr, &ctx) < 0)
        return pw_raise_errno(errno, "io_setup");
    return PyLong_FromUnsignedLongLong((unsigned long long)ctx);
}

static PyObject *py_aio_pwrite(PyObject *self, PyObject *args)
{
    unsigned long long ctx, tag;
    long long offset;
    int fd;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "Kiy*LK:aio_pwrite", &ctx, &fd, &buf, &offset, &tag))
        return NULL;
    /* The kernel copies the iocb at submission; the buffer must stay until completion
     * (the caller's block, kept busy until reaped). */
    struct iocb cb;
    memset(&cb, 0, sizeof(cb));
    cb.aio_data = tag;
    cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    cb.aio_fildes = (uint32_t)fd;
    cb.aio_buf = (uint64_t)(uintptr_t)buf.buf;
    cb.aio_nbytes = (uint64_t)buf.len;
    cb.aio_offset = offset;
    struct iocb *list[1] = {&cb};
    long r;
    Py_BEGIN_ALLOW_THREADS
    do
        r = syscall(__NR_io_submit, (aio_context_t)ctx, 1L, list);
    while (r < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    int err = errno;
    PyBuffer_Release(&buf);
    if (r < 0)
        return pw_raise_errno(err, "io_submit");
    if (r != 1)
        return pw_raise_errno(EAGAIN, "io_submit");
    Py_RETURN_NONE;
}

/* Interrupted by a signal: with `interruptible`, Python's handlers run (an exception stops
 * the wait: the writes stay in flight, the caller reaps them later); else it waits on. */
static PyObject *py_aio_reap(PyObject *self, PyObject *args)
{
    unsigned long long ctx;
    long min_nr, max_nr;
    int interruptible = 1;
    if (!PyArg_ParseTuple(args, "Kll|p:aio_reap", &ctx, &min_nr, &max_nr, &interruptible))
        return NULL;
    if (max_nr < 1 || max_nr > 1024 || min_nr < 0 || min_nr > max_nr) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= min_nr <= max_nr <= 1024, max_nr >= 1");
        return NULL;
    }
    struct io_event ev[1024];
    long got = 0;
    while (got < min_nr || (got == 0 && min_nr == 0)) {
        long r;
        Py_BEGIN_ALLOW_THREADS
        r = syscall(__NR_io_getevents, (aio_context_t)ctx, min_nr - got > 0 ? min_nr - got : 0,
                    max_nr - got, ev + got, NULL);
        Py_END_ALLOW_THREADS
        if (r < 0) {
            int err = errno;
            if (err != EINTR)
                return pw_raise_errno(err, "io_getevents");
            if (interruptible && got == 0 && PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        got += r;
        if (min_nr == 0)
            break;
    }
    PyObject *out = PyList_New(got);
    if (!out)
        return NULL;
    for (long i = 0; i < got; i++) {
        PyObject *t = Py_BuildValue("(KL)", (unsigned long long)ev[i].data, (long long)ev[i].res);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *py_aio_destroy(PyObject *self, PyObject *args)
{
    unsigned long long ctx;
    if (!PyArg_ParseTuple(args, "K:aio_destroy", &ctx))
        return NULL;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(__NR_io_destroy, (aio_context_t)ctx);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return pw_raise_errno(errno, "io_destroy");
    Py_RETURN_NONE;
}

static PyObject *py_fallocate(PyObject *self, PyObject *args)
{
    int fd, mode;
    long long offset, len;
    if (!PyArg_ParseTuple(args, "iiLL:fallocate", &fd, &mode, &offset, &len))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    do
        r = fallocate(fd, mode, (off_t)offset, (off_t)len);
    while (r < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return pw_raise_errno(errno, "fallocate");
    Py_RETURN_NONE;
}

PyMethodDef pw_aio_methods[] = {
    {"aio_setup", py_aio_setup, METH_VARARGS,
     "aio_setup(nr) -> context: io_setup for up to nr operations in flight."},
    {"aio_pwrite", py_aio_pwrite, METH_VARARGS,
     "aio_pwrite(ctx, fd, buffer, offset, tag): io_submit one write of buffer at offset;\n"
     "buffer must stay unchanged until its completion is reaped."},
    {"aio_reap", py_aio_reap, METH_VARARGS,
     "aio_reap(ctx, min_nr, max_nr, interruptible=True) -> [(tag, result), ...]: at least\n"
     "min_nr completions (result: bytes written or -errno)."},
    {"aio_destroy", py_aio_destroy, METH_VARARGS,
     "aio_destroy(ctx): io_destroy (waits for the operations in flight)."},
    {"fallocate", py_fallocate, METH_VARARGS,
     "fallocate(fd, mode, offset, len): fallocate(2), no emulation."},
    {NULL, NULL, 0, NULL},
};
