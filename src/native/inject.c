/*
 * inject.c: run a system call inside another process with ptrace, and leave it exactly as
 * it was.  Used to create a userfaultfd that belongs to the target's memory (a userfaultfd
 * acts on the mm of the process that created it) and take it with pidfd_getfd(2).
 *
 * How (x86-64), all in one short-lived thread so that the tracer is a thread that exits:
 *   1. PTRACE_SEIZE (no PTRACE_O_EXITKILL: if we die, the target lives on) + PTRACE_INTERRUPT;
 *      wait (polling, with a deadline) for the PTRACE_EVENT_STOP.  Signal-delivery-stops that
 *      come first are passed through with their signal.
 *   2. Save the registers and the signal mask; block every signal (PTRACE_SETSIGMASK) so no
 *      handler can run on the modified registers.  SIGTRAP is never forced on the target: the
 *      syscall runs between PTRACE_SYSCALL stops, not under single-step or int3.
 *   3. For each syscall: rip = an existing `syscall` instruction (0f 05) found by the caller,
 *      usually in the [vdso]: nothing in the target's memory is written, so its other threads,
 *      which keep running, never see a modified instruction.  rax = nr, rdi..r9 = arguments,
 *      orig_rax = -1 (so no syscall-restart logic applies to the modified registers).
 *      PTRACE_SYSCALL to the entry stop, PTRACE_SYSCALL to the exit stop, read rax.
 *   4. PTRACE_INTERRUPT + PTRACE_CONT: the target stops again in get_signal(), where it was
 *      when we attached.  There the saved registers and mask are put back and we detach.  The
 *      kernel then does what it would have done without us: a syscall interrupted by our
 *      first PTRACE_INTERRUPT (orig_rax >= 0, rax = -ERESTARTSYS, -ERESTARTNOHAND,
 *      -ERESTARTNOINTR or -ERESTART_RESTARTBLOCK) is restarted (restart_syscall(2) for the
 *      last), and signals that arrived meanwhile are delivered.
 *
 * If the thread never stops (uninterruptible sleep) the worker gives up at the deadline and
 * exits; the kernel detaches a tracer's tracees when the tracer thread exits.
 *
 * arm64 (designed, untested here): the same sequence with PTRACE_GETREGSET/SETREGSET
 * NT_PRSTATUS (x0..x30, sp, pc, pstate); the syscall number goes in x8, arguments in x0..x5,
 * the gadget is `svc #0` (d4 00 00 01, present in the arm64 [vdso] fallbacks); the restart
 * state lives in regs->syscallno, read and written with the NT_ARM_SYSTEM_CALL regset: set it
 * to -1 while injecting and restore it (and orig_x0 is restored by restoring x0 from the
 * saved set at the final PTRACE_EVENT_STOP, where the kernel re-derives the restart).
 */
#include "pw.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <sys/ptrace.h>
#include <sys/user.h>
#define PW_CAN_INJECT 1
#else
#define PW_CAN_INJECT 0
#endif

/* The kernel's values; glibc declares some only as enum members. */
#define PW_PTRACE_TRACEME 0
#define PW_PTRACE_CONT 7
#define PW_PTRACE_GETREGS 12
#define PW_PTRACE_SETREGS 13
#define PW_PTRACE_DETACH 17
#define PW_PTRACE_SYSCALL 24
#define PW_PTRACE_SEIZE 0x4206
#define PW_PTRACE_INTERRUPT 0x4207
#define PW_PTRACE_GETSIGMASK 0x420a
#define PW_PTRACE_SETSIGMASK 0x420b
#define PW_PTRACE_O_TRACESYSGOOD 1
#define PW_PTRACE_EVENT_STOP 128

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

#if PW_CAN_INJECT

/* One attach-inject-detach session, run by one worker thread. */
struct session {
    pid_t tid;
    unsigned long long gadget;
    int timeout_ms;
    struct user_regs_struct saved;
    uint64_t saved_mask;
    int seized, prepared;
    int err;              /* first errno */
    const char *what;     /* the step that failed */
    int first_stop_sig;   /* WSTOPSIG of the stop we attached at (SIGTRAP: interrupt) */
    double t_interrupt, t_stopped, t_detached;
};

static int fail(struct session *s, int err, const char *what)
{
    if (!s->err) {
        s->err = err;
        s->what = what;
    }
    return -1;
}

static long pt(int req, pid_t tid, void *addr, void *data)
{
    return ptrace((enum __ptrace_request)req, tid, addr, data);
}

/* Wait for the next ptrace stop of s->tid; returns the status, or -1.  With a deadline the
 * wait polls, so that the worker can give up (and exit, which detaches). */
static int wait_stop(struct session *s, double deadline_ns)
{
    int st;
    long delay = 2000; /* ns, grows to 1 ms */
    for (;;) {
        pid_t r = waitpid(s->tid, &st, __WALL | (deadline_ns > 0 ? WNOHANG : 0));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return fail(s, errno, "waitpid");
        }
        if (r == 0) {
            if (now_ns() > deadline_ns)
                return fail(s, ETIMEDOUT, "waiting for the target thread to stop");
            struct timespec ts = {0, delay};
            nanosleep(&ts, NULL);
            if (delay < 1000000)
                delay *= 2;
            continue;
        }
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            s->seized = 0;
            return fail(s, ESRCH, "the target exited");
        }
        if (WIFSTOPPED(st))
            return st;
    }
}

/* Resume with `req` and wait for the next stop that is ours: a PTRACE_EVENT_STOP when
 * `want_event`, else a syscall stop (SIGTRAP | 0x80).  Signal-delivery-stops (only SIGSTOP
 * can get through the blocked mask, or a fault) are delivered so that a group-stop takes
 * place; group-stops are resumed through. */
static int resume_until(struct session *s, int req, int want_event)
{
    int sig = 0;
    for (;;) {
        if (pt(req, s->tid, NULL, (void *)(long)sig) < 0)
            return fail(s, errno, "resuming the target");
        sig = 0;
        int st = wait_stop(s, 0);
        if (st < 0)
            return -1;
        int event = (unsigned)st >> 16, ssig = WSTOPSIG(st);
        if (event == PW_PTRACE_EVENT_STOP) {
            if (want_event)
                return st;
            continue; /* a group-stop while we run a syscall: go on */
        }
        if (event == 0 && ssig == (SIGTRAP | 0x80)) {
            if (!want_event)
                return st;
            continue;
        }
        if (event == 0) {
            if (ssig == SIGSEGV || ssig == SIGBUS || ssig == SIGILL || ssig == SIGTRAP) {
                if (!want_event)
                    return fail(s, EFAULT, "running the syscall instruction (bad gadget?)");
                continue; /* suppress: it was caused by us */
            }
            sig = ssig; /* SIGSTOP: let it take effect */
        }
    }
}

static int attach(struct session *s)
{
    if (pt(PW_PTRACE_SEIZE, s->tid, NULL, (void *)(long)PW_PTRACE_O_TRACESYSGOOD) < 0)
        return fail(s, errno, "PTRACE_SEIZE");
    s->seized = 1;
    s->t_interrupt = now_ns();
    if (pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) < 0)
        return fail(s, errno, "PTRACE_INTERRUPT");
    double deadline = s->t_interrupt + (double)s->timeout_ms * 1e6;
    for (;;) {
        int st = wait_stop(s, deadline);
        if (st < 0)
            return -1;
        int event = (unsigned)st >> 16;
        if (event == PW_PTRACE_EVENT_STOP) {
            s->first_stop_sig = WSTOPSIG(st);
            break;
        }
        /* A signal the target was about to take: let it have it; our interrupt is pending. */
        int sig = event == 0 ? WSTOPSIG(st) : 0;
        if (pt(PW_PTRACE_CONT, s->tid, NULL, (void *)(long)sig) < 0)
            return fail(s, errno, "PTRACE_CONT");
    }
    s->t_stopped = now_ns();
    if (pt(PW_PTRACE_GETREGS, s->tid, NULL, &s->saved) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    if (s->saved.cs != 0x33)
        return fail(s, ENOEXEC, "the target thread runs 32-bit code");
    if (pt(PW_PTRACE_GETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0)
        return fail(s, errno, "PTRACE_GETSIGMASK");
    uint64_t all = ~0ULL;
    if (pt(PW_PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &all) < 0)
        return fail(s, errno, "PTRACE_SETSIGMASK");
    s->prepared = 1;
    return 0;
}

/* Run one syscall in the stopped target; its result (or -errno) goes to *ret. */
static int remote_syscall(struct session *s, long nr, const long *args, long *ret)
{
    struct user_regs_struct r = s->saved;
    r.rip = s->gadget;
    r.rax = (unsigned long)nr;
    r.orig_rax = (unsigned long)-1;
    r.rdi = (unsigned long)args[0];
    r.rsi = (unsigned long)args[1];
    r.rdx = (unsigned long)args[2];
    r.r10 = (unsigned long)args[3];
    r.r8 = (unsigned long)args[4];
    r.r9 = (unsigned long)args[5];
    if (pt(PW_PTRACE_SETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_SETREGS");
    if (resume_until(s, PW_PTRACE_SYSCALL, 0) < 0) /* entry */
        return -1;
    if (pt(PW_PTRACE_GETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    if ((long)r.orig_rax != nr)
        return fail(s, EFAULT, "the syscall stop is not the injected call");
    if (resume_until(s, PW_PTRACE_SYSCALL, 0) < 0) /* exit */
        return -1;
    if (pt(PW_PTRACE_GETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    *ret = (long)r.rax;
    return 0;
}

/* Stop again in get_signal(), put everything back, detach. */
static void detach(struct session *s)
{
    if (!s->seized)
        return;
    if (s->prepared) {
        int ok = pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) == 0 &&
                 resume_until(s, PW_PTRACE_CONT, 1) >= 0;
        if (!ok && !s->seized)
            return; /* it died */
        if (pt(PW_PTRACE_SETREGS, s->tid, NULL, &s->saved) < 0)
            fail(s, errno, "PTRACE_SETREGS (restore)");
        if (pt(PW_PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0)
            fail(s, errno, "PTRACE_SETSIGMASK (restore)");
    }
    pt(PW_PTRACE_DETACH, s->tid, NULL, NULL);
    s->seized = 0;
    s->t_detached = now_ns();
}

/* ---- jobs, each run on its own thread -------------------------------------------------- */

#define MAX_TRIES 4

struct uffd_job {
    struct session s;
    int pidfd;
    int nflags;
    long flags[MAX_TRIES];
    long results[MAX_TRIES]; /* -errno or the remote fd */
    int local_fd, getfd_errno, close_errno;
};

static void *uffd_worker(void *arg)
{
    struct uffd_job *j = arg;
    struct session *s = &j->s;
    j->local_fd = -1;
    if (attach(s) == 0) {
        for (int i = 0; i < j->nflags; i++) {
            long a[6] = {j->flags[i], 0, 0, 0, 0, 0}, ret = 0;
            if (remote_syscall(s, __NR_userfaultfd, a, &ret) < 0)
                break;
            j->results[i] = ret;
            if (ret >= 0) {
                long fd = syscall(__NR_pidfd_getfd, j->pidfd, (int)ret, 0);
                if (fd < 0)
                    j->getfd_errno = errno;
                else
                    j->local_fd = (int)fd;
                long c[6] = {ret, 0, 0, 0, 0, 0}, cret = 0;
                if (remote_syscall(s, __NR_close, c, &cret) == 0 && cret < 0)
                    j->close_errno = (int)-cret;
                break;
            }
        }
    }
    detach(s);
    return NULL;
}

struct syscall_job {
    struct session s;
    long nr, args[6], ret;
    int done;
};

static void *syscall_worker(void *arg)
{
    struct syscall_job *j = arg;
    if (attach(&j->s) == 0 && remote_syscall(&j->s, j->nr, j->args, &j->ret) == 0)
        j->done = 1;
    detach(&j->s);
    return NULL;
}

static int run_worker(void *(*fn)(void *), void *job)
{
    pthread_t th;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_create(&th, NULL, fn, job);
    if (rc == 0)
        pthread_join(th, NULL);
    Py_END_ALLOW_THREADS
    if (rc)
        pw_raise_errno(rc, "pthread_create");
    return rc;
}

static PyObject *timing(struct session *s)
{
    double stop = s->t_stopped > 0 && s->t_detached > 0 ? s->t_detached - s->t_stopped : -1;
    double wait = s->t_stopped > 0 ? s->t_stopped - s->t_interrupt : -1;
    return Py_BuildValue("{s:d,s:d,s:i}", "stop_ns", stop, "wait_ns", wait, "stop_sig",
                         s->first_stop_sig);
}

static PyObject *session_error(struct session *s)
{
    PyObject *args = Py_BuildValue("(iss)", s->err, strerror(s->err), s->what);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}
#endif /* PW_CAN_INJECT */

static PyObject *no_inject(void)
{
    PyErr_SetString(PyExc_NotImplementedError,
                    "syscall injection is implemented for x86-64 only (arm64: designed, see "
                    "src/native/inject.c)");
    return NULL;
}

static PyObject *py_inject_userfaultfd(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int tid, pidfd, timeout_ms;
    unsigned long long gadget;
    PyObject *flags;
    if (!PyArg_ParseTuple(args, "iiKOi:inject_userfaultfd", &tid, &pidfd, &gadget, &flags,
                          &timeout_ms))
        return NULL;
    struct uffd_job j;
    memset(&j, 0, sizeof j);
    j.s.tid = tid;
    j.s.gadget = gadget;
    j.s.timeout_ms = timeout_ms;
    j.pidfd = pidfd;
    PyObject *seq = PySequence_Fast(flags, "flags must be a sequence of ints");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_TRIES) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "give 1 to %d flag sets", MAX_TRIES);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        j.flags[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        j.results[i] = -ENOEXEC; /* not tried */
    }
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    j.nflags = (int)n;
    if (run_worker(uffd_worker, &j))
        return NULL;
    if (j.s.err && j.local_fd < 0)
        return session_error(&j.s);
    PyObject *tries = PyList_New(0);
    if (!tries)
        return NULL;
    for (int i = 0; i < j.nflags && j.results[i] != -ENOEXEC; i++) {
        PyObject *t = Py_BuildValue("(ll)", j.flags[i], j.results[i]);
        if (!t || PyList_Append(tries, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(tries);
            return NULL;
        }
        Py_DECREF(t);
    }
    PyObject *info = timing(&j.s);
    if (!info) {
        Py_DECREF(tries);
        return NULL;
    }
    PyObject *extra = Py_BuildValue("{s:i,s:i,s:i,s:s}", "getfd_errno", j.getfd_errno,
                                    "close_errno", j.close_errno, "detach_errno", j.s.err,
                                    "detach_what", j.s.what ? j.s.what : "");
    if (extra) {
        PyDict_Update(info, extra);
        Py_DECREF(extra);
    }
    return Py_BuildValue("(iNN)", j.local_fd, tries, info);
#else
    return no_inject();
#endif
}

static PyObject *py_inject_syscall(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int tid, timeout_ms;
    unsigned long long gadget;
    long nr;
    long a[6] = {0};
    if (!PyArg_ParseTuple(args, "iKl(llllll)i:inject_syscall", &tid, &gadget, &nr, &a[0],
                          &a[1], &a[2], &a[3], &a[4], &a[5], &timeout_ms))
        return NULL;
    struct syscall_job j;
    memset(&j, 0, sizeof j);
    j.s.tid = tid;
    j.s.gadget = gadget;
    j.s.timeout_ms = timeout_ms;
    j.nr = nr;
    memcpy(j.args, a, sizeof a);
    if (run_worker(syscall_worker, &j))
        return NULL;
    if (!j.done || j.s.err)
        return session_error(&j.s);
    return Py_BuildValue("(lN)", j.ret, timing(&j.s));
#else
    return no_inject();
#endif
}

/* ---- thin wrappers for starting a program stopped right after exec --------------------- */

static PyObject *py_ptrace_traceme(PyObject *self, PyObject *noargs)
{
#if PW_CAN_INJECT
    if (ptrace((enum __ptrace_request)PW_PTRACE_TRACEME, 0, NULL, NULL) < 0)
        return pw_raise_errno(errno, "PTRACE_TRACEME");
    Py_RETURN_NONE;
#else
    return no_inject();
#endif
}

static PyObject *py_ptrace_detach(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid, sig = 0;
    if (!PyArg_ParseTuple(args, "i|i:ptrace_detach", &pid, &sig))
        return NULL;
    if (ptrace((enum __ptrace_request)PW_PTRACE_DETACH, pid, NULL, (void *)(long)sig) < 0)
        return pw_raise_errno(errno, "PTRACE_DETACH");
    Py_RETURN_NONE;
#else
    return no_inject();
#endif
}

PyMethodDef pw_inject_methods[] = {
    {"inject_userfaultfd", py_inject_userfaultfd, METH_VARARGS,
     "inject_userfaultfd(tid, pidfd, gadget, flags_seq, timeout_ms) -> (fd, tries, info)\n"
     "Create a userfaultfd inside thread `tid` (trying each flag set in turn), take it with "
     "pidfd_getfd, close the target's copy and restore the target.  `tries` lists "
     "(flags, result) with result = remote fd or -errno; fd is -1 when none worked."},
    {"inject_syscall", py_inject_syscall, METH_VARARGS,
     "inject_syscall(tid, gadget, nr, (a0..a5), timeout_ms) -> (ret, info)\n"
     "Run one system call inside thread `tid` and restore it; ret is the raw return value."},
    {"ptrace_traceme", py_ptrace_traceme, METH_NOARGS, "PTRACE_TRACEME (call in a child)."},
    {"ptrace_detach", py_ptrace_detach, METH_VARARGS,
     "ptrace_detach(pid, sig=0): PTRACE_DETACH, delivering `sig`."},
    {NULL, NULL, 0, NULL},
};
