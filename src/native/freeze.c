/* freeze.c: every thread of a process stopped for an instant (soft-dirty resets). */

#include "ptrace.h"

#if PW_CAN_INJECT

/* ---- freeze: every thread of a process stopped for an instant ---------------------------
 *
 * The soft-dirty reset is two steps (read pagemap bit 55, then write 4 to clear_refs): a write
 * between them would be lost.  freeze() stops every thread of the target, from a worker thread
 * that becomes their tracer: PTRACE_SEIZE + PTRACE_INTERRUPT each thread of /proc/PID/task,
 * wait until each reports its PTRACE_EVENT_STOP, then list the threads again, until a listing
 * finds no new one while all known ones are stopped (a stopped thread cannot create another,
 * and a thread is in the list before clone() returns).  The caller then reads and clears;
 * thaw() detaches every thread: from the interrupt stop the kernel restarts a syscall that
 * the interrupt cut short, and a thread that was in a group-stop (SIGSTOP) goes back to it.
 * Not SIGSTOP: the target's parent (a shell) would see a job-control stop, and a target
 * stopped by its user must stay stopped.
 *
 * A thread stopped in PTRACE_EVENT_STOP sits in get_signal() on its way back to user mode:
 * no system call of its own is in progress, so nothing the kernel does on its behalf can
 * write its memory until the thaw.  Threads that are not stopped:
 *   - exited or zombie threads (nothing to stop);
 *   - io_uring workers (PF_IO_WORKER; ptrace refuses them with EPERM): counted in
 *     "unfrozen", the caller says what that means;
 *   - the thread-group leader of a `pagewatch run` child, which our own tracer thread holds
 *     seized: that thread stops it for us (freeze_req) and keeps it stopped until the thaw.
 * Any other thread that cannot be seized (traced by a debugger) fails the freeze with EPERM
 * and the thread id; one that does not stop before the deadline (uninterruptible sleep, a
 * vfork parent) fails it with ETIMEDOUT.  A failed freeze detaches what it seized.
 * If pagewatch dies during a freeze, its worker thread dies with it and the kernel detaches
 * the threads, which go on as they were: a freeze changes no register and no mask, and a
 * signal held in a signal-delivery-stop is delivered by that pw_detach (the kernel keeps its
 * number as the stop's exit code).  So the freeze needs no helper.
 */
#define PW_PF_IO_WORKER 0x10
#define PW_PF_EXITING 0x4
enum { FT_WAIT, FT_STOPPED, FT_GONE, FT_TRACER, FT_UNFROZEN };
enum { FZ_FREEZING, FZ_FROZEN, FZ_FAILED, FZ_DONE };

struct frz_thread {
    pid_t tid;
    int state;
    struct tracer *tr; /* FT_TRACER: the tracer thread that stops it for us */
};

#define MAX_FREEZERS 32
struct freezer {
    int used;
    pid_t pid;
    int timeout_ms;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int phase, thaw;
    int err;
    pid_t err_tid;
    const char *what;
    struct frz_thread *t;
    int n, cap;
    int rounds, unfrozen, group_stopped, signals;
    double t0, t_frozen, t_thaw, t_done;
};
static struct freezer freezers[MAX_FREEZERS];
static pthread_mutex_t freezers_mu = PTHREAD_MUTEX_INITIALIZER;

static int frz_fail(struct freezer *f, int err, const char *what, pid_t tid)
{
    if (!f->err) {
        f->err = err;
        f->what = what;
        f->err_tid = tid;
    }
    return -1;
}

/* State letter and task flags of a thread, from /proc/PID/task/TID/stat ('X' if gone). */
static char task_state(pid_t pid, pid_t tid, unsigned long *flags)
{
    char path[64], buf[1024];
    *flags = 0;
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", (int)pid, (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 'X';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 'X';
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return 'X';
    char state = 'X';
    /* after ")": state ppid pgrp session tty_nr tpgid flags */
    if (sscanf(p + 1, " %c %*d %*d %*d %*d %*d %lu", &state, flags) < 1)
        return 'X';
    return state;
}

static int frz_index(struct freezer *f, pid_t tid)
{
    for (int i = 0; i < f->n; i++)
        if (f->t[i].tid == tid)
            return i;
    return -1;
}


/* Seize and interrupt thread i (or find why not). */
static int frz_seize(struct freezer *f, int i)
{
    struct frz_thread *th = &f->t[i];
    if (pw_pt(PW_PTRACE_SEIZE, th->tid, NULL, NULL) == 0) {
        th->state = FT_WAIT;
        pw_pt(PW_PTRACE_INTERRUPT, th->tid, NULL, NULL); /* if it died, the wait tells */
        return 0;
    }
    int e = errno;
    unsigned long flags;
    char st = task_state(f->pid, th->tid, &flags);
    if (e == ESRCH || st == 'Z' || st == 'X') {
        th->state = FT_GONE;
        return 0;
    }
    if (e == EPERM && (flags & PW_PF_IO_WORKER)) {
        th->state = FT_UNFROZEN;
        f->unfrozen++;
        return 0;
    }
    if (e == EPERM && (th->tr = pw_tracer_holding(th->tid)) != NULL) {
        th->state = FT_TRACER;
        pw_tracer_freeze(th->tr, 1);
        return 0;
    }
    /* The kernel refuses to seize a thread that is exiting (PF_EXITING), and our own run
     * tracer may have reaped it since the look above: both are gone, not a refusal. */
    st = task_state(f->pid, th->tid, &flags);
    if (e == EPERM && (st == 'Z' || st == 'X' || (flags & PW_PF_EXITING))) {
        th->state = FT_GONE;
        return 0;
    }
    return frz_fail(f, e, "PTRACE_SEIZE", th->tid);
}

/* List the threads; seize the ones not seen yet.  Returns how many were new, or -1. */
static int frz_list(struct freezer *f)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)f->pid);
    DIR *d = opendir(path);
    if (!d)
        return frz_fail(f, errno == ENOENT ? ESRCH : errno, "listing /proc/PID/task", 0);
    int added = 0, rc = 0;
    struct dirent *de;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        pid_t tid = (pid_t)atoi(de->d_name);
        int i = frz_index(f, tid);
        if (i >= 0) {
            unsigned long flags;
            char st;
            /* Listed again after it was found gone: a new thread that reuses the id. */
            if (f->t[i].state != FT_GONE || (st = task_state(f->pid, tid, &flags)) == 'Z' ||
                st == 'X')
                continue;
        } else {
            if (f->n == f->cap) {
                int cap = f->cap ? f->cap * 2 : 64;
                struct frz_thread *t = realloc(f->t, (size_t)cap * sizeof *t);
                if (!t) {
                    rc = frz_fail(f, ENOMEM, "listing the threads", 0);
                    break;
                }
                f->t = t;
                f->cap = cap;
            }
            i = f->n++;
            f->t[i].tid = tid;
            f->t[i].tr = NULL;
        }
        f->t[i].state = FT_WAIT;
        added++;
        rc = frz_seize(f, i);
    }
    closedir(d);
    if (rc == 0 && f->n == 0)
        return frz_fail(f, ESRCH, "listing /proc/PID/task", 0);
    return rc < 0 ? -1 : added;
}


/* Wait until every thread is stopped (or gone), by the deadline. */
static int frz_wait(struct freezer *f, double deadline)
{
    long delay = 2000; /* ns, grows to 1 ms */
    for (;;) {
        int waiting = 0, idle = 1;
        pid_t late = 0;
        for (int i = 0; i < f->n; i++) {
            struct frz_thread *th = &f->t[i];
            if (th->state == FT_TRACER && pw_tracer_stopped(th->tr) == 0) {
                waiting++;
                late = th->tid;
            } else if (th->state == FT_WAIT) {
                waiting++;
                late = th->tid;
            }
        }
        if (!waiting)
            return 0;
        int st;
        /* __WNOTHREAD: only this thread's tracees, never the children of the process. */
        pid_t r = waitpid(-1, &st, __WALL | __WNOTHREAD | WNOHANG);
        if (r > 0) {
            idle = 0;
            int i = frz_index(f, r);
            if (i < 0)
                continue;
            struct frz_thread *th = &f->t[i];
            if (WIFEXITED(st) || WIFSIGNALED(st)) {
                th->state = FT_GONE;
            } else if (WIFSTOPPED(st) && (unsigned)st >> 16 == 0) {
                /* A signal-delivery-stop: deliver the signal (a handler frame is written
                 * now, before the freeze completes).  That stop consumed our interrupt (any
                 * trap does): ask again. */
                f->signals++;
                pw_pt(PW_PTRACE_INTERRUPT, th->tid, NULL, NULL);
                if (pw_pt(PW_PTRACE_CONT, th->tid, NULL, (void *)(long)WSTOPSIG(st)) < 0 &&
                    errno == ESRCH)
                    th->state = FT_GONE;
            } else if (WIFSTOPPED(st)) {
                if (th->state == FT_WAIT && WSTOPSIG(st) != SIGTRAP)
                    f->group_stopped++;
                th->state = FT_STOPPED; /* PTRACE_EVENT_STOP: interrupt or group-stop */
            }
        } else if (r < 0 && errno == EINTR) {
            idle = 0;
        } else if (r < 0 && errno == ECHILD) {
            for (int i = 0; i < f->n; i++) /* no tracee left: they exited */
                if (f->t[i].state == FT_WAIT)
                    f->t[i].state = FT_GONE;
            idle = 0;
        } else if (r < 0) {
            return frz_fail(f, errno, "waitpid", 0);
        }
        if (!idle)
            continue;
        /* Nothing yet.  A zombie thread-group leader never reports: look at the states. */
        for (int i = 0; i < f->n; i++) {
            struct frz_thread *th = &f->t[i];
            unsigned long flags;
            if (th->state == FT_TRACER && pw_tracer_stopped(th->tr) < 0)
                th->state = FT_GONE;
            if (th->state == FT_WAIT && delay >= 64000) {
                char s = task_state(f->pid, th->tid, &flags);
                if (s == 'Z' || s == 'X')
                    th->state = FT_GONE;
            }
        }
        if (now_ns() > deadline)
            return frz_fail(f, ETIMEDOUT, "waiting for a thread to stop", late);
        struct timespec ts = {0, delay};
        nanosleep(&ts, NULL);
        if (delay < 1000000)
            delay *= 2;
    }
}

/* After a failure: threads seized but not yet stopped are let go at their stop (up to
 * 100 ms; a signal they were about to take is delivered by the pw_detach).  The ones that do
 * not stop by then are detached by the kernel when this thread exits, without stopping. */
static void frz_release_waiting(struct freezer *f)
{
    double deadline = now_ns() + 100e6;
    for (;;) {
        int waiting = 0;
        for (int i = 0; i < f->n; i++)
            waiting += f->t[i].state == FT_WAIT;
        if (!waiting || now_ns() > deadline)
            return;
        int st;
        pid_t r = waitpid(-1, &st, __WALL | __WNOTHREAD | WNOHANG);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return;
        if (r == 0) {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
            continue;
        }
        int i = frz_index(f, r);
        if (i < 0 || f->t[i].state != FT_WAIT)
            continue;
        if (WIFSTOPPED(st)) {
            int sig = (unsigned)st >> 16 == 0 ? WSTOPSIG(st) : 0;
            pw_pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)sig);
        }
        f->t[i].state = FT_GONE; /* let go (or exited) */
    }
}

static void *freeze_worker(void *arg)
{
    struct freezer *f = arg;
    f->t0 = now_ns();
    double deadline = f->t0 + (double)f->timeout_ms * 1e6;
    int ok = 0;
    for (f->rounds = 1; f->rounds < 10000; f->rounds++) {
        int added = frz_list(f);
        if (added < 0)
            break;
        if (added == 0) {
            ok = 1;
            break;
        }
        if (frz_wait(f, deadline) < 0)
            break;
        if (now_ns() > deadline) {
            frz_fail(f, ETIMEDOUT, "listing threads (they kept appearing)", 0);
            break;
        }
    }
    if (!ok)
        frz_fail(f, EAGAIN, "listing threads (they kept appearing)", 0);
    pthread_mutex_lock(&f->mu);
    f->t_frozen = now_ns();
    f->phase = ok ? FZ_FROZEN : FZ_FAILED;
    pthread_cond_broadcast(&f->cv);
    while (ok && !f->thaw)
        pthread_cond_wait(&f->cv, &f->mu);
    pthread_mutex_unlock(&f->mu);
    f->t_thaw = now_ns();
    if (!ok)
        frz_release_waiting(f);
    for (int i = 0; i < f->n; i++) {
        struct frz_thread *th = &f->t[i];
        if (th->state == FT_STOPPED)
            pw_pt(PW_PTRACE_DETACH, th->tid, NULL, NULL);
        else if (th->state == FT_TRACER)
            pw_tracer_freeze(th->tr, 0);
    }
    f->t_done = now_ns();
    pthread_mutex_lock(&f->mu);
    f->phase = FZ_DONE;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

static struct freezer *freezer_of(int h)
{
    if (h >= 0 && h < MAX_FREEZERS && freezers[h].used)
        return &freezers[h];
    PyErr_SetString(PyExc_ValueError, "no such freeze (thawed already?)");
    return NULL;
}

static void freezer_free(struct freezer *f)
{
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
    free(f->t);
    f->t = NULL;
    pthread_mutex_lock(&freezers_mu);
    f->used = 0;
    pthread_mutex_unlock(&freezers_mu);
}

#endif /* PW_CAN_INJECT */

static PyObject *py_freeze(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid, timeout_ms;
    if (!PyArg_ParseTuple(args, "ii:freeze", &pid, &timeout_ms))
        return NULL;
    if (pid <= 0 || pid == getpid()) {
        PyErr_SetString(PyExc_ValueError, "freeze: give another process's pid");
        return NULL;
    }
    pthread_mutex_lock(&freezers_mu);
    int h = -1;
    for (int i = 0; i < MAX_FREEZERS; i++)
        if (!freezers[i].used) {
            h = i;
            break;
        }
    if (h < 0) {
        pthread_mutex_unlock(&freezers_mu);
        return pw_raise_errno(EMFILE, "freeze: too many freezes at once");
    }
    struct freezer *f = &freezers[h];
    memset(f, 0, sizeof *f);
    f->used = 1;
    pthread_mutex_unlock(&freezers_mu);
    f->pid = pid;
    f->timeout_ms = timeout_ms;
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_create(&f->th, NULL, freeze_worker, f);
    if (rc == 0) {
        pthread_mutex_lock(&f->mu);
        while (f->phase == FZ_FREEZING)
            pthread_cond_wait(&f->cv, &f->mu);
        pthread_mutex_unlock(&f->mu);
        if (f->phase != FZ_FROZEN)
            pthread_join(f->th, NULL);
    }
    Py_END_ALLOW_THREADS
    if (rc) {
        freezer_free(f);
        return pw_raise_errno(rc, "pthread_create");
    }
    if (f->phase != FZ_FROZEN) {
        /* OSError(errno, strerror, step, None, thread id) */
        PyObject *a = Py_BuildValue("(issOi)", f->err, strerror(f->err),
                                    f->what ? f->what : "freeze", Py_None, (int)f->err_tid);
        freezer_free(f);
        if (a) {
            PyErr_SetObject(PyExc_OSError, a);
            Py_DECREF(a);
        }
        return NULL;
    }
    return PyLong_FromLong(h);
#else
    return pw_no_inject();
#endif
}

static PyObject *py_thaw(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int h;
    if (!PyArg_ParseTuple(args, "i:thaw", &h))
        return NULL;
    struct freezer *f = freezer_of(h);
    if (!f)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&f->mu);
    f->thaw = 1;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->th, NULL);
    Py_END_ALLOW_THREADS
    int stopped = 0, by_tracer = 0, gone = 0;
    for (int i = 0; i < f->n; i++) {
        stopped += f->t[i].state == FT_STOPPED;
        by_tracer += f->t[i].state == FT_TRACER;
        gone += f->t[i].state == FT_GONE;
    }
    PyObject *info = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:d,s:d}", "threads", stopped + by_tracer,
        "by_tracer", by_tracer, "gone", gone, "unfrozen", f->unfrozen, "rounds", f->rounds,
        "group_stopped", f->group_stopped, "signals", f->signals,
        "wait_ns", f->t_frozen - f->t0, "held_ns", f->t_thaw - f->t_frozen,
        "stop_ns", f->t_done - f->t0);
    freezer_free(f);
    return info;
#else
    return pw_no_inject();
#endif
}

PyMethodDef pw_freeze_methods[] = {
    {"freeze", py_freeze, METH_VARARGS,
     "freeze(pid, timeout_ms) -> handle\n"
     "Stop every thread of process `pid` (PTRACE_SEIZE + PTRACE_INTERRUPT from a worker "
     "thread, listing /proc/PID/task until no new thread appears) and return while they are "
     "stopped; thaw(handle) lets them go.  OSError(errno, strerror, step, None, tid) when a "
     "thread cannot be seized (EPERM), does not stop in time (ETIMEDOUT), or the process is "
     "gone (ESRCH); what was seized is detached then."},
    {"thaw", py_thaw, METH_VARARGS,
     "thaw(handle) -> info\n"
     "Detach every thread stopped by freeze(); info: threads (stopped), by_tracer (held by "
     "a `pagewatch run` tracer thread), gone, unfrozen (io_uring workers, which ptrace "
     "refuses), rounds (listings), group_stopped, signals (delivered while stopping), "
     "wait_ns (until all stopped), held_ns (all stopped until the thaw), stop_ns (first "
     "interrupt to last pw_detach)."},
    {NULL, NULL, 0, NULL},
};
