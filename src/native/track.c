/*
 * track.c: the mechanisms of the fallback backends.  No policy: numbers in, numbers out,
 * errno on failure.
 *
 *   mp_*   mprotect: PROT_READ pages and a SIGSEGV handler that records a write in every
 *          watch containing the page, then makes the page writable again.
 *   us_*   uffd-sync: one userfaultfd and one C handler thread per process; the thread
 *          records the page and un-protects it (which wakes the writer).
 *   pin/unpin  keep a range writable (and reported) around I/O done by the kernel.
 *   cmp_*  compare: page-by-page compare of live memory against a private snapshot.
 *   sd_*   soft-dirty: stop every other thread, read pagemap bit 55, clear_refs, resume.
 *
 * mprotect and uffd-sync share one model.  A *watch* is a range with one byte per page
 * (1 = written since the last reset).  A page is write-protected whenever some watch holds
 * it clean; a write fault sets the byte in EVERY watch containing the page, then removes
 * the protection, so overlapping watches never disturb each other.  A collect, for each run
 * of written pages, clears the bytes FIRST and re-protects SECOND, under the same lock as
 * the fault path: a fault's un-protect can never land after a collect's re-protect of a
 * page whose byte that collect has cleared (which would lose every later write to it).
 *
 * Rules kept on the fault and stop paths: no malloc and no Python while a lock is held
 * (a thread blocked on a fault may hold malloc's lock); watch memory comes from mmap, so it
 * never shares a page with a tracked heap object.
 */
#include "pw.h"
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pagewatch_ARRAY_API
#include <numpy/arrayobject.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static uintptr_t PG;           /* page size */

static void page_size_init(void)
{
    if (!PG)
        PG = (uintptr_t)sysconf(_SC_PAGESIZE);
}

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static int pread_all(int fd, char *buf, size_t len, off_t off);

/* ---- watches ------------------------------------------------------------------------ */

struct watch {
    struct watch *next;
    long id;
    uintptr_t start, end;       /* page-aligned */
    size_t npages;
    size_t map_len;             /* bytes of the mmap holding this struct and its bytes */
    int prot_extra;             /* mprotect: PROT_EXEC kept on the pages */
    uint8_t bits[] __attribute__((aligned(8)));
};

static struct watch *watch_new(uintptr_t start, size_t npages)
{
    size_t len = (sizeof(struct watch) + npages + PG - 1) & ~(PG - 1);
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    struct watch *w = m;                /* zero-filled: every page starts clean */
    w->start = start;
    w->end = start + npages * PG;
    w->npages = npages;
    w->map_len = len;
    return w;
}

static inline uint8_t bit_get(struct watch *w, size_t i)
{
    return __atomic_load_n(&w->bits[i], __ATOMIC_RELAXED);
}

static inline void bit_set(struct watch *w, size_t i, uint8_t v)
{
    __atomic_store_n(&w->bits[i], v, __ATOMIC_RELAXED);
}

/* First written page at or after i (n if none), read without the lock. */
static size_t next_set(struct watch *w, size_t i, size_t n)
{
    while (i < n && (i & 7))
        if (bit_get(w, i++))
            return i - 1;
    while (i + 8 <= n && !__atomic_load_n((uint64_t *)&w->bits[i], __ATOMIC_RELAXED))
        i += 8;
    while (i < n && !bit_get(w, i))
        i++;
    return i;
}

/* Pinned ranges: kept writable and reported at every collect while pinned. */
#define MAX_PINS 64
struct pin { uintptr_t start, end; };

/* One engine per mechanism: its watches, its lock and how it (un)protects a range. */
struct engine {
    struct watch *head;
    long next_id;
    struct pin pins[MAX_PINS];
    int npins;
    void (*lock)(void);
    void (*unlock)(void);
    /* (un)protect [a, b): 0 or an errno */
    int (*protect)(uintptr_t a, uintptr_t b, int wp, int prot_extra);
    unsigned long long faults;
};

/* Set the byte of every page of [a, b) in every watch that contains it. */
static int mark_range(struct engine *e, uintptr_t a, uintptr_t b)
{
    int hit = 0;
    for (struct watch *w = e->head; w; w = w->next) {
        uintptr_t lo = a > w->start ? a : w->start, hi = b < w->end ? b : w->end;
        for (uintptr_t p = lo; p < hi; p += PG) {
            bit_set(w, (p - w->start) / PG, 1);
            hit = 1;
        }
    }
    return hit;
}

static struct watch *find_watch(struct engine *e, long id)
{
    for (struct watch *w = e->head; w; w = w->next)
        if (w->id == id)
            return w;
    return NULL;
}

static int is_pinned(struct engine *e, uintptr_t page)
{
    for (int i = 0; i < e->npins; i++)
        if (page >= e->pins[i].start && page < e->pins[i].end)
            return 1;
    return 0;
}

/* Whether some watch (other than `skip`) holds `page` clean: then it must stay protected. */
static int held_clean(struct engine *e, uintptr_t page, struct watch *skip)
{
    for (struct watch *w = e->head; w; w = w->next)
        if (w != skip && page >= w->start && page < w->end && !bit_get(w, (page - w->start) / PG))
            return 1;
    return 0;
}

/* Growable list of [first, end) page runs, merged when touching.  Never under a lock. */
struct runs { int64_t *v; size_t n, cap; };

static int runs_push(struct runs *r, int64_t a, int64_t b)
{
    if (r->n && r->v[2 * r->n - 1] == a) {
        r->v[2 * r->n - 1] = b;
        return 0;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 64;
        int64_t *v = realloc(r->v, cap * 2 * sizeof(int64_t));
        if (!v)
            return -1;
        r->v = v;
        r->cap = cap;
    }
    r->v[2 * r->n] = a;
    r->v[2 * r->n + 1] = b;
    r->n++;
    return 0;
}

static PyObject *runs_array(struct runs *r)
{
    npy_intp dims[2] = {(npy_intp)r->n, 2};
    PyObject *a = PyArray_SimpleNew(2, dims, NPY_INT64);
    if (a && r->n)
        memcpy(PyArray_DATA((PyArrayObject *)a), r->v, r->n * 2 * sizeof(int64_t));
    free(r->v);
    r->v = NULL;
    return a;
}

/*
 * The written pages of w in address order (at most max_pages; < 0: all), as runs.  With
 * reset, each run is cleared then re-protected under the engine lock, one run at a time so
 * writers wait at most one syscall.  A run that cannot be re-protected keeps its bytes set
 * (reported again next time) and its errno is returned in *err.  Pinned pages are reported
 * and left as they are.  Called with the GIL released; collects of one watch are serialised
 * by the caller.
 */
static int collect_watch(struct engine *e, struct watch *w, int reset, long long max_pages,
                         struct runs *out, int *err)
{
    size_t n = w->npages, p = 0;
    unsigned long long left = max_pages < 0 ? ULLONG_MAX : (unsigned long long)max_pages;
    while (left) {
        p = next_set(w, p, n);
        if (p >= n)
            break;
        size_t q = p;
        if (!reset) {
            while (q < n && q - p < left && bit_get(w, q))
                q++;
        } else {
            e->lock();
            int pinned = e->npins && is_pinned(e, w->start + p * PG);
            while (q < n && q - p < left && bit_get(w, q) &&
                   (!e->npins || is_pinned(e, w->start + q * PG) == pinned))
                q++;
            if (!pinned) {
                for (size_t i = p; i < q; i++)
                    bit_set(w, i, 0);
                int r = e->protect(w->start + p * PG, w->start + q * PG, 1, w->prot_extra);
                if (r) {
                    for (size_t i = p; i < q; i++)
                        bit_set(w, i, 1);
                    *err = r;
                }
            }
            e->unlock();
        }
        if (runs_push(out, (int64_t)p, (int64_t)q) < 0)
            return -1;
        left -= q - p;
        p = q;
    }
    return 0;
}

/*
 * Remove w from e and un-protect its pages that no remaining watch holds clean.  A range
 * that fails (unmapped meanwhile) is retried page by page, so the mapped rest is restored.
 */
static void unwatch(struct engine *e, struct watch *w)
{
    e->lock();
    for (struct watch **pp = &e->head; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    uintptr_t a = w->start;
    while (a < w->end) {
        while (a < w->end && held_clean(e, a, NULL))
            a += PG;
        uintptr_t b = a;
        while (b < w->end && !held_clean(e, b, NULL))
            b += PG;
        if (a < b && e->protect(a, b, 0, w->prot_extra))
            for (uintptr_t p = a; p < b; p += PG)
                e->protect(p, p + PG, 0, w->prot_extra);
        a = b;
    }
    e->unlock();
    munmap(w, w->map_len);
}

/* Insert a watch for [start, start + npages pages) and protect it, except pinned pages,
 * which are marked written instead. */
static struct watch *add_watch(struct engine *e, uintptr_t start, size_t npages, int extra,
                               int *err)
{
    struct watch *w = watch_new(start, npages);
    if (!w) {
        *err = errno;
        return NULL;
    }
    w->prot_extra = extra;
    e->lock();
    w->id = ++e->next_id;
    w->next = e->head;
    e->head = w;
    uintptr_t a = w->start;
    *err = 0;
    while (a < w->end && !*err) {
        uintptr_t b = a;
        if (e->npins && is_pinned(e, a)) {
            while (b < w->end && is_pinned(e, b))
                bit_set(w, (b - w->start) / PG, 1), b += PG;
        } else {
            while (b < w->end && !(e->npins && is_pinned(e, b)))
                b += PG;
            *err = e->protect(a, b, 1, extra);
        }
        a = b;
    }
    e->unlock();
    if (*err) {
        unwatch(e, w);
        return NULL;
    }
    return w;
}

/* Mark [a, b) written in every watch, un-protect the part inside watches, and pin it. */
static int pin_range(struct engine *e, uintptr_t a, uintptr_t b)
{
    int err = 0;
    e->lock();
    if (e->npins == MAX_PINS) {
        e->unlock();
        return EBUSY;
    }
    e->pins[e->npins].start = a;
    e->pins[e->npins].end = b;
    e->npins++;
    mark_range(e, a, b);
    for (struct watch *w = e->head; w; w = w->next) {
        uintptr_t lo = a > w->start ? a : w->start, hi = b < w->end ? b : w->end;
        if (lo < hi) {
            int r = e->protect(lo, hi, 0, w->prot_extra);
            if (r)
                err = r;
        }
    }
    e->unlock();
    return err;
}

static int unpin_range(struct engine *e, uintptr_t a, uintptr_t b)
{
    int found = 0;
    e->lock();
    for (int i = 0; i < e->npins; i++)
        if (e->pins[i].start == a && e->pins[i].end == b) {
            e->pins[i] = e->pins[--e->npins];
            found = 1;
            break;
        }
    e->unlock();
    return found;
}

/* ---- mprotect: SIGSEGV handler ------------------------------------------------------ */

static int mp_lock_word;

/* A spinlock, because the fault path is a signal handler: async-signal-safe, no futex
 * ownership.  The holder never faults on tracked memory, so a handler waits at most one
 * mprotect(2). */
static void mp_lock(void)
{
    while (__atomic_exchange_n(&mp_lock_word, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&mp_lock_word, __ATOMIC_RELAXED))
            sched_yield();
}

static void mp_unlock(void) { __atomic_store_n(&mp_lock_word, 0, __ATOMIC_RELEASE); }

static int mp_protect(uintptr_t a, uintptr_t b, int wp, int extra)
{
    int prot = (wp ? PROT_READ : PROT_READ | PROT_WRITE) | extra;
    return mprotect((void *)a, b - a, prot) ? errno : 0;
}

static struct engine mp = {.lock = mp_lock, .unlock = mp_unlock, .protect = mp_protect};
static struct sigaction mp_old;         /* the handler we chain to */
static int mp_atfork_done;

static void mp_handler(int sig, siginfo_t *si, void *uctx);

/* Per thread: inside the handler we chain to.  A chained handler that re-raises SIGSEGV
 * and re-installs us (faulthandler does both) must reach the default action, not itself.
 * initial-exec: no allocation on first use, which a signal handler cannot afford. */
static __thread int mp_chaining __attribute__((tls_model("initial-exec")));

static void mp_chain(int sig, siginfo_t *si, void *uctx)
{
    struct sigaction old = mp_old;
    if (!mp_chaining) {
        int called = 0;
        mp_chaining = 1;
        if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction && old.sa_sigaction != mp_handler) {
            old.sa_sigaction(sig, si, uctx);
            called = 1;
        } else if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler != SIG_DFL &&
                   old.sa_handler != SIG_IGN) {
            old.sa_handler(sig);
            called = 1;
        }
        mp_chaining = 0;
        if (called) {
            /* A handler that put us back in its place (faulthandler restores the handler
             * it replaced, then re-raises) left the chain: what follows it is the default
             * action, or the re-raised signal would come back to it forever. */
            struct sigaction cur;
            if (sigaction(SIGSEGV, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
                cur.sa_sigaction == mp_handler) {
                memset(&mp_old, 0, sizeof mp_old);
                mp_old.sa_handler = SIG_DFL;
            }
            return;
        }
    }
    /* Default action: restore it and return; the faulting instruction faults again and the
     * kernel kills the process with SIGSEGV as if we had never been there. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGSEGV, &dfl, NULL);
}

static int fault_is_write(void *uctx)
{
#if defined(__x86_64__)
    /* Page-fault error code, bit 1: the access was a write. */
    return (((ucontext_t *)uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
    (void)uctx;
    return 1;   /* PROT_READ pages only fault on writes */
#endif
}

static void mp_handler(int sig, siginfo_t *si, void *uctx)
{
    int saved = errno;
    if (si->si_code == SEGV_ACCERR && fault_is_write(uctx)) {
        uintptr_t page = (uintptr_t)si->si_addr & ~(PG - 1);
        int handled = 0;
        mp_lock();
        struct watch *w0 = NULL;
        for (struct watch *w = mp.head; w; w = w->next)
            if (page >= w->start && page < w->end) {
                bit_set(w, (page - w->start) / PG, 1);
                w0 = w;
            }
        if (w0) {
            mp.faults++;
            if (mprotect((void *)page, PG, PROT_READ | PROT_WRITE | w0->prot_extra) == 0) {
                handled = 1;
            } else {
                /* Most likely vm.max_map_count: every isolated writable page is a VMA.
                 * Un-protect whole watches instead (fewer VMAs), reporting all their pages. */
                handled = 1;
                for (struct watch *w = mp.head; w; w = w->next)
                    if (page >= w->start && page < w->end) {
                        mark_range(&mp, w->start, w->end);
                        if (mprotect((void *)w->start, w->end - w->start,
                                     PROT_READ | PROT_WRITE | w->prot_extra))
                            handled = 0;
                    }
                if (!handled) {
                    static const char msg[] = "pagewatch: mprotect backend cannot make a "
                        "written page writable again (vm.max_map_count?)\n";
                    ssize_t ignored = write(2, msg, sizeof msg - 1);
                    (void)ignored;
                }
            }
        }
        mp_unlock();
        if (handled) {
            errno = saved;
            return;
        }
    }
    errno = saved;
    mp_chain(sig, si, uctx);
}

static void mp_fork_prepare(void) { mp_lock(); }
static void mp_fork_after(void) { mp_unlock(); }

/* Install the handler (again, if something replaced it since).  Called with mp locked. */
static int mp_install(void)
{
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur))
        return errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == mp_handler)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = mp_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    mp_old = cur;
    if (sigaction(SIGSEGV, &sa, NULL))
        return errno;
    return 0;
}

static PyObject *py_mp_watch(PyObject *self, PyObject *args)
{
    unsigned long long start, npages;
    int extra = 0, err = 0;
    if (!PyArg_ParseTuple(args, "KK|i:mp_watch", &start, &npages, &extra))
        return NULL;
    page_size_init();
    if (start % PG || !npages)
        return pw_raise_errno(EINVAL, "mp_watch: unaligned or empty range");
    if (!mp_atfork_done) {
        /* (outside the lock: it may malloc) */
        err = pthread_atfork(mp_fork_prepare, mp_fork_after, mp_fork_after);
        if (err)
            return pw_raise_errno(err, "pthread_atfork");
        mp_atfork_done = 1;
    }
    mp_lock();
    err = mp_install();
    mp_unlock();
    if (err)
        return pw_raise_errno(err, "sigaction(SIGSEGV)");
    struct watch *w;
    Py_BEGIN_ALLOW_THREADS
    w = add_watch(&mp, (uintptr_t)start, (size_t)npages, extra, &err);
    Py_END_ALLOW_THREADS
    if (!w)
        return pw_raise_errno(err, "mprotect(2)");
    return PyLong_FromLong(w->id);
}

/* Look a watch up; the caller serialises use of one id against its unwatch. */
static struct watch *lookup(struct engine *e, long id)
{
    e->lock();
    struct watch *w = find_watch(e, id);
    e->unlock();
    if (!w)
        PyErr_Format(PyExc_ValueError, "no watch %ld (closed?)", id);
    return w;
}

static PyObject *do_collect(struct engine *e, PyObject *args, const char *fmt)
{
    long id;
    int reset;
    long long max_pages = -1;
    if (!PyArg_ParseTuple(args, fmt, &id, &reset, &max_pages))
        return NULL;
    struct watch *w = lookup(e, id);
    if (!w)
        return NULL;
    struct runs out = {0};
    int err = 0, r;
    Py_BEGIN_ALLOW_THREADS
    r = collect_watch(e, w, reset, max_pages, &out, &err);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        free(out.v);
        return PyErr_NoMemory();
    }
    PyObject *a = runs_array(&out);
    if (!a)
        return NULL;
    return Py_BuildValue("(Ni)", a, err);
}

static PyObject *py_mp_collect(PyObject *self, PyObject *args)
{
    /* Something (faulthandler.enable(), signal.signal) may have replaced the handler since:
     * take the faults back, chaining to it for the others. */
    mp_lock();
    int err = mp_install();
    mp_unlock();
    if (err)
        return pw_raise_errno(err, "sigaction(SIGSEGV)");
    return do_collect(&mp, args, "lp|L:mp_collect");
}

/* mp_reinstall(): if any watch exists and something replaced the handler, install it again
 * (chaining to the newcomer).  Called right after Python code installs a SIGSEGV handler. */
static PyObject *py_mp_reinstall(PyObject *self, PyObject *noargs)
{
    int err = 0;
    mp_lock();
    if (mp.head)
        err = mp_install();
    mp_unlock();
    if (err)
        return pw_raise_errno(err, "sigaction(SIGSEGV)");
    Py_RETURN_NONE;
}

/* mp_mark(start, length): the pages of [start, start + length) lost their protection
 * behind our back (the program's own mprotect): mark them written in every watch, so the
 * next collect reports them and protects them again. */
static PyObject *py_mp_mark(PyObject *self, PyObject *args)
{
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "KK:mp_mark", &start, &len))
        return NULL;
    page_size_init();
    uintptr_t a = (uintptr_t)start & ~(PG - 1), b = ((uintptr_t)(start + len) + PG - 1) & ~(PG - 1);
    mp_lock();
    mark_range(&mp, a, b);
    mp_unlock();
    Py_RETURN_NONE;
}

static PyObject *py_mp_unwatch(PyObject *self, PyObject *args)
{
    long id;
    if (!PyArg_ParseTuple(args, "l:mp_unwatch", &id))
        return NULL;
    struct watch *w = lookup(&mp, id);
    if (!w)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    unwatch(&mp, w);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_mp_info(PyObject *self, PyObject *noargs)
{
    int n = 0, installed;
    struct sigaction cur;
    mp_lock();
    for (struct watch *w = mp.head; w; w = w->next)
        n++;
    unsigned long long faults = mp.faults;
    int npins = mp.npins;
    mp_unlock();
    installed = sigaction(SIGSEGV, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
                cur.sa_sigaction == mp_handler;
    return Py_BuildValue("{s:i,s:K,s:i,s:O}", "watches", n, "faults", faults, "pins", npins,
                         "installed", installed ? Py_True : Py_False);
}

/* ---- uffd-sync: the handler thread ---------------------------------------------------- */

static pthread_mutex_t us_mu = PTHREAD_MUTEX_INITIALIZER;
static void us_lock(void) { pthread_mutex_lock(&us_mu); }
static void us_unlock(void) { pthread_mutex_unlock(&us_mu); }

static int us_fd = -1, us_evfd = -1;
static int us_running;
static pthread_t us_thread;
static pid_t us_tid;
static int us_atfork_done;

static int wp_ioctl(uintptr_t a, uintptr_t b, int wp)
{
    struct pw_uffdio_writeprotect arg = {
        .range = {a, b - a}, .mode = wp ? PW_UFFDIO_WRITEPROTECT_MODE_WP : 0};
    for (int tries = 0; tries < 100; tries++) {
        if (ioctl(us_fd, PW_UFFDIO_WRITEPROTECT, &arg) == 0)
            return 0;
        if (errno != EAGAIN && errno != EINTR)
            return errno;
    }
    return EAGAIN;
}

/* Linux < 6.5 (6.1 among them) refuses a range that crosses VMAs with ENOENT: halve it.
 * Pieces that still fail (unmapped) give the errno, the rest is done. */
static int us_protect(uintptr_t a, uintptr_t b, int wp, int extra)
{
    (void)extra;
    int r = wp_ioctl(a, b, wp);
    if (r != ENOENT || b - a <= PG)
        return r;
    uintptr_t mid = a + ((b - a) / PG / 2) * PG;
    int r1 = us_protect(a, mid, wp, 0), r2 = us_protect(mid, b, wp, 0);
    return r1 ? r1 : r2;
}

static struct engine us = {.lock = us_lock, .unlock = us_unlock, .protect = us_protect};

static void *us_main(void *arg)
{
    (void)arg;
    /* (created with every signal blocked: nothing stops or interrupts it) */
    __atomic_store_n(&us_tid, my_tid(), __ATOMIC_RELEASE);
    struct pollfd pf[2] = {{.fd = us_fd, .events = POLLIN}, {.fd = us_evfd, .events = POLLIN}};
    struct pw_uffd_msg msgs[64];
    for (;;) {
        if (poll(pf, 2, -1) < 0)
            continue;               /* EINTR cannot happen (all blocked); retry anyway */
        if (pf[1].revents)
            break;
        ssize_t n = read(us_fd, msgs, sizeof msgs);
        if (n <= 0)
            continue;               /* EAGAIN: another reader or a spurious wake-up */
        us_lock();
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != PW_UFFD_EVENT_PAGEFAULT)
                continue;
            uintptr_t page = (uintptr_t)msgs[i].arg.pagefault.address & ~(PG - 1);
            mark_range(&us, page, page + PG);
            us.faults++;
            /* Always un-protect, even outside every watch (a range being unregistered):
             * a fault left unanswered would hang its thread. */
            wp_ioctl(page, page + PG, 0);
        }
        us_unlock();
    }
    return NULL;
}

static void us_fork_prepare(void) { us_lock(); }
static void us_fork_parent(void) { us_unlock(); }

static void us_fork_child(void)
{
    /* No handler thread here, and the inherited uffd acts on the parent's memory: forget
     * both (Python closes its copy of the uffd); the child's watches are abandoned. */
    if (us_evfd >= 0)
        close(us_evfd);
    us_fd = us_evfd = -1;
    us_running = 0;
    us_tid = 0;
    us.head = NULL;
    us.npins = 0;
    us_unlock();
}

static PyObject *py_us_start(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i:us_start", &fd))
        return NULL;
    page_size_init();
    if (us_running)
        return pw_raise_errno(EBUSY, "us_start: the handler thread is already running");
    if (!us_atfork_done) {
        int r = pthread_atfork(us_fork_prepare, us_fork_parent, us_fork_child);
        if (r)
            return pw_raise_errno(r, "pthread_atfork");
        us_atfork_done = 1;
    }
    int ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ev < 0)
        return pw_raise_errno(errno, "eventfd(2)");
    us_fd = fd;
    us_evfd = ev;
    us_tid = 0;
    /* Born with every signal blocked (no window for a stop-the-world signal to reach it),
     * and known by tid before anyone can stop the world. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int r = pthread_create(&us_thread, NULL, us_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r) {
        close(ev);
        us_fd = us_evfd = -1;
        return pw_raise_errno(r, "pthread_create");
    }
    Py_BEGIN_ALLOW_THREADS
    while (!__atomic_load_n(&us_tid, __ATOMIC_ACQUIRE))
        sched_yield();
    Py_END_ALLOW_THREADS
    us_running = 1;
    Py_RETURN_NONE;
}

/* Stop the thread.  The uffd stays open: its owner (Python) closes it. */
static PyObject *py_us_stop(PyObject *self, PyObject *noargs)
{
    if (!us_running)
        Py_RETURN_NONE;
    uint64_t one = 1;
    ssize_t w = write(us_evfd, &one, sizeof one);
    (void)w;
    Py_BEGIN_ALLOW_THREADS
    pthread_join(us_thread, NULL);
    Py_END_ALLOW_THREADS
    close(us_evfd);
    us_fd = us_evfd = -1;
    us_running = 0;
    us_tid = 0;
    Py_RETURN_NONE;
}

static PyObject *py_us_watch(PyObject *self, PyObject *args)
{
    unsigned long long start, npages;
    int populate = 0, err = 0;
    if (!PyArg_ParseTuple(args, "KK|p:us_watch", &start, &npages, &populate))
        return NULL;
    page_size_init();
    if (!us_running)
        return pw_raise_errno(ENOTCONN, "us_watch: the handler thread is not running");
    if (start % PG || !npages)
        return pw_raise_errno(EINVAL, "us_watch: unaligned or empty range");
    struct watch *w;
    Py_BEGIN_ALLOW_THREADS
    if (populate) {
        /* Without WP_UNPOPULATED, protecting a never-touched page does nothing: map the
         * (zero) pages first so every page has a PTE to carry the protection. */
        if (madvise((void *)(uintptr_t)start, npages * PG, MADV_POPULATE_READ)) {
            for (unsigned long long i = 0; i < npages; i++)
                (void)*(volatile char *)(uintptr_t)(start + i * PG);
        }
    }
    w = add_watch(&us, (uintptr_t)start, (size_t)npages, 0, &err);
    Py_END_ALLOW_THREADS
    if (!w)
        return pw_raise_errno(err, "ioctl(UFFDIO_WRITEPROTECT)");
    return PyLong_FromLong(w->id);
}

static PyObject *py_us_collect(PyObject *self, PyObject *args)
{
    return do_collect(&us, args, "lp|L:us_collect");
}

/*
 * us_verify(id, pagemap_fd, populate) -> (pages marked, errno).
 * A page this watch holds clean must carry the uffd-wp bit (pagemap bit 57).  One that
 * does not lost it behind our back: MADV_DONTNEED zaps anonymous pages with their bit, and
 * a later write maps a writable page no fault reports.  Such pages are marked written in
 * every watch and protected again (mapped first, without WP_UNPOPULATED).  ENOENT: they
 * are not registered with our userfaultfd any more (other memory is mapped there).
 */
#define PM_UFFD_WP (1ULL << 57)
static PyObject *py_us_verify(PyObject *self, PyObject *args)
{
    long id;
    int fd, populate = 0, err = 0;
    unsigned long long marked = 0;
    if (!PyArg_ParseTuple(args, "li|p:us_verify", &id, &fd, &populate))
        return NULL;
    struct watch *w = lookup(&us, id);
    if (!w)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    uint64_t pm[512];
    us_lock();
    for (size_t i = 0; i < w->npages && !err; i += 512) {
        size_t k = w->npages - i < 512 ? w->npages - i : 512;
        err = pread_all(fd, (char *)pm, k * 8, (off_t)((w->start / PG + i) * 8));
        for (size_t j = 0; j < k && !err;) {
            uintptr_t page = w->start + (i + j) * PG;
            if (bit_get(w, i + j) || (pm[j] & PM_UFFD_WP) || (us.npins && is_pinned(&us, page))) {
                j++;
                continue;
            }
            size_t j2 = j;
            while (j2 < k && !bit_get(w, i + j2) && !(pm[j2] & PM_UFFD_WP) &&
                   !(us.npins && is_pinned(&us, w->start + (i + j2) * PG)))
                j2++;
            uintptr_t a = page, b = w->start + (i + j2) * PG;
            if (populate)
                (void)madvise((void *)a, b - a, MADV_POPULATE_READ);
            mark_range(&us, a, b);
            marked += j2 - j;
            err = us_protect(a, b, 1, 0);
            j = j2;
        }
    }
    us_unlock();
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(Ki)", marked, err);
}

static PyObject *py_us_unwatch(PyObject *self, PyObject *args)
{
    long id;
    if (!PyArg_ParseTuple(args, "l:us_unwatch", &id))
        return NULL;
    struct watch *w = lookup(&us, id);
    if (!w)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    unwatch(&us, w);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_us_info(PyObject *self, PyObject *noargs)
{
    int n = 0;
    us_lock();
    for (struct watch *w = us.head; w; w = w->next)
        n++;
    unsigned long long faults = us.faults;
    int npins = us.npins;
    us_unlock();
    return Py_BuildValue("{s:i,s:K,s:i,s:O,s:i,s:i}", "watches", n, "faults", faults, "pins",
                         npins, "running", us_running ? Py_True : Py_False, "tid",
                         (int)__atomic_load_n(&us_tid, __ATOMIC_ACQUIRE), "fd", us_fd);
}

/* ---- pins (both engines) ---------------------------------------------------------------- */

static PyObject *py_pin(PyObject *self, PyObject *args)
{
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "KK:pin", &start, &len))
        return NULL;
    page_size_init();
    uintptr_t a = (uintptr_t)start & ~(PG - 1), b = ((uintptr_t)(start + len) + PG - 1) & ~(PG - 1);
    if (b <= a)
        return pw_raise_errno(EINVAL, "pin: empty range");
    int r1, r2 = 0;
    Py_BEGIN_ALLOW_THREADS
    r1 = pin_range(&mp, a, b);
    r2 = pin_range(&us, a, b);
    Py_END_ALLOW_THREADS
    if (r1 == EBUSY || r2 == EBUSY) {
        unpin_range(&mp, a, b);
        unpin_range(&us, a, b);
        return pw_raise_errno(EBUSY, "pin: too many ranges kept writable at once");
    }
    return Py_BuildValue("(ii)", r1, r2);
}

static PyObject *py_unpin(PyObject *self, PyObject *args)
{
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "KK:unpin", &start, &len))
        return NULL;
    page_size_init();
    uintptr_t a = (uintptr_t)start & ~(PG - 1), b = ((uintptr_t)(start + len) + PG - 1) & ~(PG - 1);
    int found = unpin_range(&mp, a, b);
    found |= unpin_range(&us, a, b);
    return PyBool_FromLong(found);
}

/* ---- compare ------------------------------------------------------------------------------ */

/* Copy [src, src+len) of this process into dst.  process_vm_readv turns an unmapped source
 * into an error instead of a crash; where it is refused (seccomp), memcpy (the caller has
 * checked the range is mapped). */
static int cmp_use_memcpy;

static int read_self(void *dst, uintptr_t src, size_t len)
{
    if (!cmp_use_memcpy) {
        struct iovec l = {dst, len}, r = {(void *)src, len};
        ssize_t n = process_vm_readv(getpid(), &l, 1, &r, 1, 0);
        if (n == (ssize_t)len)
            return 0;
        if (n >= 0)
            return EFAULT;
        if (errno != ENOSYS && errno != EPERM)
            return errno;
        cmp_use_memcpy = 1;
    }
    memcpy(dst, (const void *)src, len);
    return 0;
}

#define CMP_CHUNK 16    /* pages read per syscall: 64 KiB, stays in L2 */

static int get_buffer(PyObject *obj, Py_buffer *view, size_t need)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if ((size_t)view->len < need) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "the snapshot holds %zd bytes, %zu needed", view->len,
                     need);
        return -1;
    }
    return 0;
}

/* cmp_snapshot(addr, snapshot): copy the live pages into the snapshot -> errno (0: done). */
static PyObject *py_cmp_snapshot(PyObject *self, PyObject *args)
{
    unsigned long long addr, npages;
    PyObject *snap;
    if (!PyArg_ParseTuple(args, "KKO:cmp_snapshot", &addr, &npages, &snap))
        return NULL;
    page_size_init();
    Py_buffer v;
    if (get_buffer(snap, &v, npages * PG) < 0)
        return NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned long long i = 0; i < npages && !err; i += CMP_CHUNK) {
        unsigned long long k = npages - i < CMP_CHUNK ? npages - i : CMP_CHUNK;
        err = read_self((char *)v.buf + i * PG, addr + i * PG, k * PG);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyLong_FromLong(err);
}

/*
 * cmp_collect(addr, npages, snapshot, reset, max_pages) -> (runs, errno).
 * Each page is copied once into a temporary, the copy compared with the snapshot and, if
 * it differs, the copy (never a second read of the live page) becomes the snapshot: every
 * write after the copy differs from the snapshot and shows up next time.
 */
static PyObject *py_cmp_collect(PyObject *self, PyObject *args)
{
    unsigned long long addr, npages;
    PyObject *snap;
    int reset;
    long long max_pages = -1;
    if (!PyArg_ParseTuple(args, "KKOp|L:cmp_collect", &addr, &npages, &snap, &reset,
                          &max_pages))
        return NULL;
    page_size_init();
    Py_buffer v;
    if (get_buffer(snap, &v, npages * PG) < 0)
        return NULL;
    char *tmp = malloc(CMP_CHUNK * PG);
    if (!tmp) {
        PyBuffer_Release(&v);
        return PyErr_NoMemory();
    }
    struct runs out = {0};
    int err = 0, oom = 0;
    unsigned long long left = max_pages < 0 ? ULLONG_MAX : (unsigned long long)max_pages;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned long long i = 0; i < npages && left && !err && !oom; i += CMP_CHUNK) {
        unsigned long long k = npages - i < CMP_CHUNK ? npages - i : CMP_CHUNK;
        err = read_self(tmp, addr + i * PG, k * PG);
        for (unsigned long long j = 0; j < k && left && !err; j++) {
            char *s = (char *)v.buf + (i + j) * PG, *t = tmp + j * PG;
            if (memcmp(s, t, PG)) {
                if (reset)
                    memcpy(s, t, PG);
                if (runs_push(&out, (int64_t)(i + j), (int64_t)(i + j + 1)) < 0)
                    oom = 1;
                left--;
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(tmp);
    PyBuffer_Release(&v);
    if (oom) {
        free(out.v);
        return PyErr_NoMemory();
    }
    PyObject *a = runs_array(&out);
    if (!a)
        return NULL;
    return Py_BuildValue("(Ni)", a, err);
}

/* ---- soft-dirty: stop the world ------------------------------------------------------------ */

/*
 * The kernel has no atomic get-and-clear of soft-dirty bits: a write between reading bit 55
 * and writing clear_refs would be lost.  So, like Boehm GC, every other thread of the
 * process is sent a real-time signal whose handler says "parked" and waits on a futex;
 * once all are parked (a thread in a system call is interrupted or finishes it first), the
 * bits are read and cleared, then the threads are released.
 *
 * An acknowledgement is (release generation << 32 | tid), so a late signal from an earlier
 * stop can never be counted for this one.
 */
#define SD_ACKS 8192
#define SD_MAXT 4096
static int sd_sig;
static int sd_gen;                  /* futex word: bumped at each release */
static int sd_parking;
static unsigned long long sd_seq;
static uint64_t sd_acks[SD_ACKS];
static pthread_mutex_t sd_mu = PTHREAD_MUTEX_INITIALIZER;
static pid_t sd_tids[SD_MAXT];

static void sd_handler(int sig, siginfo_t *si, void *uctx)
{
    int saved = errno;
    int g = __atomic_load_n(&sd_gen, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sd_parking, __ATOMIC_SEQ_CST)) {
        unsigned long long i = __atomic_fetch_add(&sd_seq, 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&sd_acks[i % SD_ACKS], ((uint64_t)(uint32_t)g << 32) | (uint32_t)my_tid(),
                         __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&sd_gen, __ATOMIC_SEQ_CST) == g)
            syscall(SYS_futex, &sd_gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);
    }
    errno = saved;
}

static int sd_install(void)
{
    if (sd_sig)
        return 0;
    for (int s = SIGRTMIN + 4; s < SIGRTMAX; s++) {
        struct sigaction cur;
        if (sigaction(s, NULL, &cur))
            continue;
        if (cur.sa_flags & SA_SIGINFO || cur.sa_handler != SIG_DFL)
            continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = sd_handler;
        sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(s, &sa, NULL) == 0) {
            sd_sig = s;
            return 0;
        }
    }
    return EAGAIN;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* List this process's threads (no malloc: others may be parked holding its lock). */
static int list_tids(pid_t *out, int cap, int *n)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    char buf[4096];
    *n = 0;
    for (;;) {
        long r = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (r < 0) {
            int e = errno;
            close(fd);
            return e;
        }
        if (r == 0)
            break;
        for (long off = 0; off < r;) {
            unsigned short reclen = *(unsigned short *)(buf + off + 16);
            const char *name = buf + off + 19;
            if (name[0] >= '0' && name[0] <= '9') {
                if (*n == cap) {
                    close(fd);
                    return E2BIG;
                }
                out[(*n)++] = (pid_t)atoi(name);
            }
            off += reclen;
        }
    }
    close(fd);
    return 0;
}

/* Whether a thread that has not answered is gone (1), blocks our signal (2), or neither. */
static int sd_check_thread(pid_t tid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    const char *st = strstr(buf, "\nState:\t");
    if (st && (st[8] == 'Z' || st[8] == 'X'))
        return 1;
    const char *blk = strstr(buf, "\nSigBlk:\t");
    if (blk) {
        unsigned long long mask = strtoull(blk + 9, NULL, 16);
        if (mask & (1ULL << (sd_sig - 1)))
            return 2;
    }
    return 0;
}

struct sd_result { int err; pid_t culprit; int stopped; };

static void sd_release(void)
{
    __atomic_store_n(&sd_parking, 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&sd_gen, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &sd_gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static char sd_done[SD_MAXT];
#define SD_BLOCK_GRACE 3.0          /* s a signalled thread may keep our signal blocked */      /* per signalled thread: answered or gone */

/* Stop every thread but this one and `exclude`; returns with them parked, or an error with
 * all released.  Called with sd_mu held and the GIL released. */
static struct sd_result sd_stop(pid_t exclude)
{
    struct sd_result res = {0, 0, 0};
    pid_t self = my_tid(), pid = getpid();
    static pid_t listed[SD_MAXT];
    int nsig = 0, nlisted;
    unsigned long long s0 = __atomic_load_n(&sd_seq, __ATOMIC_SEQ_CST);
    uint32_t g = (uint32_t)__atomic_load_n(&sd_gen, __ATOMIC_SEQ_CST);
    __atomic_store_n(&sd_parking, 1, __ATOMIC_SEQ_CST);
    /* Signal every thread listed, wait for them, list again: a thread created before its
     * creator parked shows up in the next listing.  Done when a listing brings no one new. */
    for (;;) {
        res.err = list_tids(listed, SD_MAXT, &nlisted);
        if (res.err)
            goto fail;
        int fresh = 0;
        for (int i = 0; i < nlisted; i++) {
            pid_t t = listed[i];
            if (t == self || t == exclude || t == __atomic_load_n(&us_tid, __ATOMIC_ACQUIRE))
                continue;   /* the uffd-sync thread blocks every signal, writes no page of
                             * the program, and must run to resolve kernel-mode faults */
            int known = 0;
            for (int j = 0; j < nsig && !known; j++)
                known = sd_tids[j] == t;
            if (known)
                continue;
            if (nsig == SD_MAXT) {
                res.err = E2BIG;
                goto fail;
            }
            if (syscall(SYS_tgkill, pid, t, sd_sig)) {
                if (errno == ESRCH)
                    continue;       /* exited meanwhile */
                res.err = errno;
                res.culprit = t;
                goto fail;
            }
            sd_done[nsig] = 0;
            sd_tids[nsig++] = t;
            fresh = 1;
        }
        if (!fresh)
            break;
        /* Wait for every signalled thread: answered, gone, or refusing (an error).  A thread
         * that starts or exits blocks every signal for a moment (glibc); under emulation and
         * load that moment can last long: only a block that lasts SD_BLOCK_GRACE refuses. */
        static double blocked_since[SD_MAXT];
        for (int j = 0; j < nsig; j++)
            blocked_since[j] = 0;
        double start = now_s(), checked = start;
        for (;;) {
            int waiting = 0;
            unsigned long long end = __atomic_load_n(&sd_seq, __ATOMIC_SEQ_CST);
            if (end - s0 > SD_ACKS) {
                res.err = EOVERFLOW;
                goto fail;
            }
            for (int j = 0; j < nsig; j++) {
                if (sd_done[j])
                    continue;
                uint64_t want = ((uint64_t)g << 32) | (uint32_t)sd_tids[j];
                for (unsigned long long k = s0; k < end && !sd_done[j]; k++)
                    sd_done[j] = __atomic_load_n(&sd_acks[k % SD_ACKS], __ATOMIC_SEQ_CST) == want;
                waiting += !sd_done[j];
            }
            if (!waiting)
                break;
            double t = now_s();
            if (t - checked > 0.2) {
                checked = t;
                for (int j = 0; j < nsig; j++) {
                    if (sd_done[j])
                        continue;
                    int why = sd_check_thread(sd_tids[j]);
                    if (why == 1) {
                        sd_done[j] = 1;
                    } else if (why != 2) {
                        blocked_since[j] = 0;
                    } else if (blocked_since[j] == 0) {
                        blocked_since[j] = t;
                    } else if (t - blocked_since[j] >= SD_BLOCK_GRACE) {
                        res.err = EDEADLK;
                        res.culprit = sd_tids[j];
                        goto fail;
                    }
                }
            }
            if (t - start > 10.0) {
                res.err = ETIMEDOUT;
                for (int j = 0; j < nsig; j++)
                    if (!sd_done[j])
                        res.culprit = sd_tids[j];
                goto fail;
            }
            sched_yield();
        }
    }
    res.stopped = nsig;
    return res;
fail:
    sd_release();
    return res;
}

static int pread_all(int fd, char *buf, size_t len, off_t off)
{
    while (len) {
        ssize_t n = pread(fd, buf, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        buf += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/*
 * sd_read(pagemap_fd, clear_refs_fd, starts, counts, out, exclude_tid=0)
 *   -> (errno, culprit_tid, threads_stopped)
 * Reads the pagemap entries of the ranges (start address, page count; uint64 arrays) into
 * out (uint64, one per page, ranges concatenated).  With clear_refs_fd >= 0, the world is
 * stopped around the read and a "4" to clear_refs; on any error nothing is cleared.
 */
static PyObject *py_sd_read(PyObject *self, PyObject *args)
{
    int pm_fd, cr_fd, exclude = 0;
    PyObject *starts_o, *counts_o, *out_o;
    if (!PyArg_ParseTuple(args, "iiOOO|i:sd_read", &pm_fd, &cr_fd, &starts_o, &counts_o,
                          &out_o, &exclude))
        return NULL;
    page_size_init();
    PyArrayObject *starts = (PyArrayObject *)PyArray_FROMANY(starts_o, NPY_UINT64, 1, 1,
                                                             NPY_ARRAY_CARRAY_RO);
    PyArrayObject *counts = (PyArrayObject *)PyArray_FROMANY(counts_o, NPY_UINT64, 1, 1,
                                                             NPY_ARRAY_CARRAY_RO);
    PyObject *ret = NULL;
    Py_buffer v = {0};
    if (!starts || !counts)
        goto out;
    npy_intp k = PyArray_SIZE(starts);
    if (PyArray_SIZE(counts) != k) {
        PyErr_SetString(PyExc_ValueError, "starts and counts differ in length");
        goto out;
    }
    const uint64_t *st = PyArray_DATA(starts), *ct = PyArray_DATA(counts);
    size_t total = 0;
    for (npy_intp i = 0; i < k; i++)
        total += ct[i];
    if (get_buffer(out_o, &v, total * 8) < 0) {
        v.obj = NULL;
        goto out;
    }
    struct sd_result res = {0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    int stop = cr_fd >= 0;
    if (stop) {
        pthread_mutex_lock(&sd_mu);
        res.err = sd_install();
        if (!res.err)
            res = sd_stop((pid_t)exclude);
    }
    if (!res.err) {
        char *o = v.buf;
        for (npy_intp i = 0; i < k && !res.err; i++) {
            res.err = pread_all(pm_fd, o, ct[i] * 8, (off_t)(st[i] / PG * 8));
            o += ct[i] * 8;
        }
        if (stop && !res.err && write(cr_fd, "4", 1) != 1)
            res.err = errno ? errno : EIO;
        if (stop)
            sd_release();
    }
    if (stop)
        pthread_mutex_unlock(&sd_mu);
    Py_END_ALLOW_THREADS
    ret = Py_BuildValue("(iii)", res.err, (int)res.culprit, res.stopped);
out:
    if (v.obj)
        PyBuffer_Release(&v);
    Py_XDECREF(starts);
    Py_XDECREF(counts);
    return ret;
}

/*
 * sd_selftest(addr, length, usec, exclude_tid=0) -> (errno, culprit, stopped, changed):
 * stop the world, copy [addr, addr+length), wait usec, compare, release.  changed = 1 if
 * some thread wrote the range while the world was stopped (the stop did not hold).
 */
static PyObject *py_sd_selftest(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int usec, exclude = 0, changed = 0;
    if (!PyArg_ParseTuple(args, "KKi|i:sd_selftest", &addr, &len, &usec, &exclude))
        return NULL;
    char *copy = malloc(len ? len : 1);
    if (!copy)
        return PyErr_NoMemory();
    struct sd_result res = {0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&sd_mu);
    res.err = sd_install();
    if (!res.err)
        res = sd_stop((pid_t)exclude);
    if (!res.err) {
        memcpy(copy, (void *)(uintptr_t)addr, len);
        struct timespec ts = {usec / 1000000, (usec % 1000000) * 1000L};
        nanosleep(&ts, NULL);
        changed = memcmp(copy, (void *)(uintptr_t)addr, len) != 0;
        sd_release();
    }
    pthread_mutex_unlock(&sd_mu);
    Py_END_ALLOW_THREADS
    free(copy);
    return Py_BuildValue("(iiii)", res.err, (int)res.culprit, res.stopped, changed);
}

static PyObject *py_sd_signal(PyObject *self, PyObject *noargs)
{
    int err;
    pthread_mutex_lock(&sd_mu);
    err = sd_install();
    pthread_mutex_unlock(&sd_mu);
    if (err)
        return pw_raise_errno(err, "sd_signal: no free real-time signal");
    return PyLong_FromLong(sd_sig);
}

PyMethodDef pw_track_methods[] = {
    {"mp_watch", py_mp_watch, METH_VARARGS,
     "mp_watch(start, npages, prot_extra=0) -> id: protect the pages, track writes."},
    {"mp_collect", py_mp_collect, METH_VARARGS,
     "mp_collect(id, reset, max_pages=-1) -> (runs int64 (n,2), errno)."},
    {"mp_unwatch", py_mp_unwatch, METH_VARARGS, "mp_unwatch(id): stop, un-protect."},
    {"mp_reinstall", py_mp_reinstall, METH_NOARGS,
     "mp_reinstall(): put the SIGSEGV handler back on top (while watches exist)."},
    {"mp_mark", py_mp_mark, METH_VARARGS,
     "mp_mark(start, length): mark the pages written in every watch (protection lost)."},
    {"us_verify", py_us_verify, METH_VARARGS,
     "us_verify(id, pagemap_fd, populate=False) -> (marked, errno): re-protect pages that "
     "lost their uffd-wp bit, marked written."},
    {"mp_info", py_mp_info, METH_NOARGS, "mp_info() -> dict of counters."},
    {"us_start", py_us_start, METH_VARARGS, "us_start(uffd): start the handler thread."},
    {"us_stop", py_us_stop, METH_NOARGS, "us_stop(): stop the handler thread."},
    {"us_watch", py_us_watch, METH_VARARGS,
     "us_watch(start, npages, populate=False) -> id: write-protect a registered range."},
    {"us_collect", py_us_collect, METH_VARARGS,
     "us_collect(id, reset, max_pages=-1) -> (runs int64 (n,2), errno)."},
    {"us_unwatch", py_us_unwatch, METH_VARARGS, "us_unwatch(id): stop, un-protect."},
    {"us_info", py_us_info, METH_NOARGS, "us_info() -> dict of counters."},
    {"pin", py_pin, METH_VARARGS,
     "pin(start, length) -> (mprotect errno, uffd-sync errno): keep writable, report."},
    {"unpin", py_unpin, METH_VARARGS, "unpin(start, length) -> bool: end a pin."},
    {"cmp_snapshot", py_cmp_snapshot, METH_VARARGS,
     "cmp_snapshot(addr, npages, snapshot) -> errno: copy live pages into the snapshot."},
    {"cmp_collect", py_cmp_collect, METH_VARARGS,
     "cmp_collect(addr, npages, snapshot, reset, max_pages=-1) -> (runs, errno)."},
    {"sd_read", py_sd_read, METH_VARARGS,
     "sd_read(pagemap_fd, clear_refs_fd, starts, counts, out, exclude_tid=0) -> "
     "(errno, culprit, stopped)."},
    {"sd_signal", py_sd_signal, METH_NOARGS, "sd_signal() -> the stop-the-world signal."},
    {"sd_selftest", py_sd_selftest, METH_VARARGS,
     "sd_selftest(addr, length, usec, exclude_tid=0) -> (errno, culprit, stopped, changed)."},
    {NULL, NULL, 0, NULL},
};
