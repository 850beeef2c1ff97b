/*
 * inject.c: run a system call inside another process with ptrace, and leave it exactly as
 * it was.  Used to create a userfaultfd that belongs to the target's memory (a userfaultfd
 * acts on the mm of the process that created it) and take it with pidfd_getfd(2).
 *
 * How (x86-64), all in a short-lived helper process (see "the helper process" below: the
 * death of the monitor must never release the target with modified registers or mask):
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
 *      when we attached.  There the saved registers and mask are put back and we pw_detach.  The
 *      kernel then does what it would have done without us: a syscall interrupted by our
 *      first PTRACE_INTERRUPT (orig_rax >= 0, rax = -ERESTARTSYS, -ERESTARTNOHAND,
 *      -ERESTARTNOINTR or -ERESTART_RESTARTBLOCK) is restarted (restart_syscall(2) for the
 *      last), and signals that arrived meanwhile are delivered.
 *
 * If the thread never stops (uninterruptible sleep) the helper gives up at the deadline and
 * exits; the kernel detaches a tracer's tracees when the tracer thread exits.  (When the helper
 * may not trace the target, Yama ptrace_scope=1 and the target a descendant of the monitor, the
 * same session runs in a thread of the monitor.)
 *
 * arm64 (designed, untested here): the same sequence with PTRACE_GETREGSET/SETREGSET
 * NT_PRSTATUS (x0..x30, sp, pc, pstate); the syscall number goes in x8, arguments in x0..x5,
 * the gadget is `svc #0` (d4 00 00 01, present in the arm64 [vdso] fallbacks); the restart
 * state lives in regs->syscallno, read and written with the NT_ARM_SYSTEM_CALL regset: set it
 * to -1 while injecting and pw_restore it (and orig_x0 is restored by restoring x0 from the
 * saved set at the final PTRACE_EVENT_STOP, where the kernel re-derives the restart).
 */

#include "ptrace.h"

#if PW_CAN_INJECT

/* Test fault points (set only in a helper process, from PAGEWATCH_TEST_FAULT="N[:SIG[:pg]]"):
 * before its N-th ptrace call the helper sends SIG (default SIGKILL) to the monitor that
 * started it (or to the monitor's process group) and waits until the monitor is gone, so a
 * test can kill the monitor deterministically at every ptrace call of an attach or a run. */
int pw_fault_sig;
int pw_fault_pg;
int pw_fault_calls;
int pw_fault_at;
pid_t pw_fault_victim;

void pw_fault_point(void)
{
    pw_fault_calls++;
    if (!pw_fault_at || pw_fault_calls != pw_fault_at)
        return;
    int pidfd = (int)syscall(__NR_pidfd_open, pw_fault_victim, 0);
    if (pw_fault_pg) {
        pid_t pg = getpgid(pw_fault_victim);
        if (pg > 0)
            kill(-pg, pw_fault_sig);
    } else {
        kill(pw_fault_victim, pw_fault_sig);
    }
    if (pidfd >= 0) { /* readable when the monitor has exited */
        struct pollfd p = {pidfd, POLLIN, 0};
        while (poll(&p, 1, 30000) < 0 && errno == EINTR)
            ;
        close(pidfd);
    }
}

long pw_pt(int req, pid_t tid, void *addr, void *data)
{
    pw_fault_point();
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
            s->exit_status = st;
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
int pw_resume_until(struct session *s, int req, int want_event)
{
    int sig = 0, first = 1;
    for (;;) {
        /* Any ptrace trap (a signal-delivery-stop, an exec or exit event) clears a pending
         * PTRACE_INTERRUPT: the stop we wait for would never come.  Ask for it again each time
         * we go on past another stop (asking twice makes one stop). */
        if (want_event && !first)
            pw_pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL);
        /* req < 0: the target is running already (just wait), then resume with CONT. */
        if (!(first && req < 0) &&
            pw_pt(req < 0 ? PW_PTRACE_CONT : req, s->tid, NULL, (void *)(long)sig) < 0)
            return fail(s, errno, "resuming the target");
        first = 0;
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

/* Save the registers and mask of the stopped thread and block every signal. */
/* Calls that return -EINTR, not a restart code, when a stop with no handler interrupts
 * them (signal(7)), here without a timeout: restarting them is what the program would have
 * seen without our interrupt.  (With a timeout they keep -EINTR: a restart would wait the
 * whole timeout again.)  x86-64 numbers; arguments are still in their registers at the
 * stop. */
static int restart_without_timeout(const struct user_regs_struct *r)
{
    switch ((long)r->orig_rax) {
    case 232: /* epoll_wait(epfd, events, maxevents, int timeout) */
    case 281: /* epoll_pwait(..., int timeout, sigmask, size) */
        return (int)r->r10 < 0;
    case 441: /* epoll_pwait2(..., const struct timespec *timeout, ...) */
    case 220: /* semtimedop(semid, sops, nsops, timeout) */
        return r->r10 == 0;
    case 128: /* rt_sigtimedwait(set, info, timeout, size): sigwaitinfo */
        return r->rdx == 0;
    case 65: /* semop */
        return 1;
    }
    return 0;
}

int pw_prepare(struct session *s)
{
    if (pw_pt(PW_PTRACE_GETREGS, s->tid, NULL, &s->saved) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    /* Restored at the final stop in get_signal(), -ERESTARTNOHAND (-514) makes the kernel
     * restart the call when no handler runs, and a handler still sees EINTR. */
    if ((long)s->saved.rax == -EINTR && restart_without_timeout(&s->saved))
        s->saved.rax = (unsigned long)-514;
    if (s->saved.cs != 0x33)
        return fail(s, ENOEXEC, "the target thread runs 32-bit code");
    if (pw_pt(PW_PTRACE_GETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0)
        return fail(s, errno, "PTRACE_GETSIGMASK");
    uint64_t all = ~0ULL;
    if (pw_pt(PW_PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &all) < 0)
        return fail(s, errno, "PTRACE_SETSIGMASK");
    s->prepared = 1;
    return 0;
}

/* A `syscall` instruction in the process: its [vdso], else any executable mapping. */
unsigned long long pw_find_gadget(pid_t pid)
{
    char path[64], line[512];
    unsigned long long found = 0;
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
    int mem = open(path, O_RDONLY | O_CLOEXEC);
    for (int pass = 0; pass < 2 && !found && mem >= 0; pass++) {
        rewind(f);
        while (!found && fgets(line, sizeof line, f)) {
            unsigned long long lo, hi;
            char perms[8];
            if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) != 3)
                continue;
            int vdso = strstr(line, "[vdso]") != NULL;
            if (pass == 0 ? !vdso : (perms[0] != 'r' || perms[2] != 'x' || vdso ||
                                     strstr(line, "[vsyscall]") || strstr(line, "[uprobes]")))
                continue;
            size_t len = hi - lo > (16u << 20) ? (16u << 20) : (size_t)(hi - lo);
            unsigned char *buf = malloc(len);
            if (!buf)
                break;
            ssize_t n = pread(mem, buf, len, (off_t)lo);
            for (ssize_t i = 0; n > 1 && i < n - 1; i++)
                if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
                    found = lo + (unsigned long long)i;
                    break;
                }
            free(buf);
        }
    }
    if (mem >= 0)
        close(mem);
    fclose(f);
    return found;
}

#define PW_PTRACE_PEEKTEXT 1

/* Whether s->gadget holds a syscall instruction (0f 05), read with the thread stopped.  The
 * caller found it before the stop: a target that was inside execve then had other memory. */
static int gadget_ok(struct session *s)
{
    if (!s->gadget)
        return 0;
    errno = 0;
    long word = pw_pt(PW_PTRACE_PEEKTEXT, s->tid, (void *)(uintptr_t)s->gadget, NULL);
    return errno == 0 && (word & 0xffff) == 0x050f;
}

static int attach(struct session *s)
{
    if (pw_pt(PW_PTRACE_SEIZE, s->tid, NULL, (void *)(long)PW_PTRACE_O_TRACESYSGOOD) < 0)
        return fail(s, errno, "PTRACE_SEIZE");
    s->seized = 1;
    s->t_interrupt = now_ns();
    if (pw_pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) < 0)
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
        /* A signal the target was about to take: let it have it.  That stop consumed our
         * interrupt (any trap does): ask again. */
        int sig = event == 0 ? WSTOPSIG(st) : 0;
        if (pw_pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) < 0 ||
            pw_pt(PW_PTRACE_CONT, s->tid, NULL, (void *)(long)sig) < 0)
            return fail(s, errno, "PTRACE_CONT");
    }
    s->t_stopped = now_ns();
    if (pw_prepare(s) < 0)
        return -1;
    /* Never run code at an address that is not a syscall instruction now: look again. */
    if (!gadget_ok(s) && !(s->gadget = pw_find_gadget(s->tid)))
        return fail(s, ENOENT, "finding a syscall instruction in the target's memory");
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
    if (pw_pt(PW_PTRACE_SETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_SETREGS");
    if (pw_resume_until(s, PW_PTRACE_SYSCALL, 0) < 0) /* entry */
        return -1;
    if (pw_pt(PW_PTRACE_GETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    if ((long)r.orig_rax != nr)
        return fail(s, EFAULT, "the syscall stop is not the injected call");
    if (pw_resume_until(s, PW_PTRACE_SYSCALL, 0) < 0) /* exit */
        return -1;
    if (pw_pt(PW_PTRACE_GETREGS, s->tid, NULL, &r) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    *ret = (long)r.rax;
    return 0;
}

/* Stop again in get_signal() and put the saved registers and mask back; the thread stays
 * in that ptrace-stop.  Returns -1 if the target died. */
int pw_restore(struct session *s)
{
    if (!s->prepared)
        return 0;
    s->prepared = 0;
    int ok = pw_pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) == 0 &&
             pw_resume_until(s, PW_PTRACE_CONT, 1) >= 0;
    if (!ok && !s->seized)
        return -1; /* it died */
    if (pw_pt(PW_PTRACE_SETREGS, s->tid, NULL, &s->saved) < 0)
        fail(s, errno, "PTRACE_SETREGS (pw_restore)");
    if (pw_pt(PW_PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0)
        fail(s, errno, "PTRACE_SETSIGMASK (pw_restore)");
    return 0;
}

/* Put everything back and pw_detach. */
void pw_detach(struct session *s)
{
    if (!s->seized)
        return;
    if (pw_restore(s) < 0)
        return;
    pw_pt(PW_PTRACE_DETACH, s->tid, NULL, NULL);
    s->seized = 0;
    s->t_detached = now_ns();
}

/* ---- jobs, each run on its own thread -------------------------------------------------- */


/* The injected part: userfaultfd() with each flag set in turn, pidfd_getfd, close(). */
void pw_take_uffd(struct uffd_job *j)
{
    struct session *s = &j->s;
    j->local_fd = -1;
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

static void *uffd_worker(void *arg)
{
    struct uffd_job *j = arg;
    j->local_fd = -1;
    if (attach(&j->s) == 0)
        pw_take_uffd(j);
    pw_detach(&j->s);
    return NULL;
}


static void *syscall_worker(void *arg)
{
    struct syscall_job *j = arg;
    if (attach(&j->s) == 0 && remote_syscall(&j->s, j->nr, j->args, &j->ret) == 0)
        j->done = 1;
    pw_detach(&j->s);
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


#endif /* PW_CAN_INJECT */

PyObject *pw_no_inject(void)
{
    PyErr_SetString(PyExc_NotImplementedError,
                    "syscall injection is implemented for x86-64 only (arm64: designed, see "
                    "src/native/inject.c)");
    return NULL;
}

#if PW_CAN_INJECT
/* Whether the child runs under a seccomp filter ("Seccomp: 2"): its filter could kill it
 * for the injected call, so it is not injected into. */
int pw_seccomp_filtered(pid_t pid)
{
    char path[64], line[256];
    int filtered = 0;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "Seccomp:", 8)) {
            filtered = atoi(line + 8) == 2;
            break;
        }
    fclose(f);
    return filtered;
}

/* The userfaultfd(2) flag sets to try, in order (Python's choice: remote/attach.py). */
int pw_parse_flags(PyObject *flags, long *out, int *n_out)
{
    PyObject *seq = PySequence_Fast(flags, "flags must be a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_TRIES) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "give 1 to %d flag sets", MAX_TRIES);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return -1;
    *n_out = (int)n;
    return 0;
}
#endif

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
    if (pw_parse_flags(flags, j.flags, &j.nflags) < 0)
        return NULL;
    for (int i = 0; i < j.nflags; i++)
        j.results[i] = -ENOEXEC; /* not tried */
    j.local_fd = -1;
    struct uffd_job j0 = j;
    int calls = 0, helper = 1;
    int herr = pw_in_helper(uffd_worker, &j, sizeof j, &j.local_fd, &j.pidfd, &calls);
    if (!herr && j.s.err == EPERM && j.s.what && !strcmp(j.s.what, "PTRACE_SEIZE")) {
        /* Only the monitor may trace it (Yama ptrace_scope=1: the target is its descendant
         * and not the helper's): inject from here, with the hazard the helper avoids. */
        j = j0;
        helper = 0;
        if (run_worker(uffd_worker, &j))
            return NULL;
    } else if (herr) {
        return pw_raise_errno(herr, "the injection helper process");
    }
    if (j.s.err && j.local_fd < 0)
        return pw_session_error(&j.s);
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
    PyObject *info = pw_timing(&j.s);
    if (!info) {
        Py_DECREF(tries);
        return NULL;
    }
    PyObject *extra = Py_BuildValue("{s:i,s:i,s:i,s:s,s:i,s:i}", "getfd_errno", j.getfd_errno,
                                    "close_errno", j.close_errno, "detach_errno", j.s.err,
                                    "detach_what", j.s.what ? j.s.what : "", "helper", helper,
                                    "ptrace_calls", calls);
    if (extra) {
        PyDict_Update(info, extra);
        Py_DECREF(extra);
    }
    return Py_BuildValue("(iNN)", j.local_fd, tries, info);
#else
    return pw_no_inject();
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
    struct syscall_job j0 = j;
    int calls = 0;
    int herr = pw_in_helper(syscall_worker, &j, sizeof j, NULL, NULL, &calls);
    if (!herr && j.s.err == EPERM && j.s.what && !strcmp(j.s.what, "PTRACE_SEIZE")) {
        j = j0; /* see py_inject_userfaultfd */
        if (run_worker(syscall_worker, &j))
            return NULL;
    } else if (herr) {
        return pw_raise_errno(herr, "the injection helper process");
    }
    if (!j.done || j.s.err)
        return pw_session_error(&j.s);
    return Py_BuildValue("(lN)", j.ret, pw_timing(&j.s));
#else
    return pw_no_inject();
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
    return pw_no_inject();
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
    return pw_no_inject();
#endif
}


/* PR_SET_PTRACER, called by a `pagewatch run` child before its exec: under Yama
 * ptrace_scope=1 the tracer helper, a descendant of the monitor and not of the child, may
 * then seize it.  An error (no Yama: EINVAL) is ignored. */
static PyObject *py_allow_ptracer(PyObject *self, PyObject *args)
{
    int pid;
    if (!PyArg_ParseTuple(args, "i:allow_ptracer", &pid))
        return NULL;
    prctl(PR_SET_PTRACER, (unsigned long)pid, 0, 0, 0);
    Py_RETURN_NONE;
}


/* The two checks the tracer makes by itself at an exec stop, for Python's attach too: one
 * definition of each. */
static PyObject *py_find_gadget(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid;
    if (!PyArg_ParseTuple(args, "i:find_gadget", &pid))
        return NULL;
    unsigned long long at;
    Py_BEGIN_ALLOW_THREADS
    at = pw_find_gadget(pid);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(at);
#else
    return pw_no_inject();
#endif
}

static PyObject *py_seccomp_filtered(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid;
    if (!PyArg_ParseTuple(args, "i:seccomp_filtered", &pid))
        return NULL;
    return PyBool_FromLong(pw_seccomp_filtered(pid));
#else
    return pw_no_inject();
#endif
}

PyMethodDef pw_inject_methods[] = {
    {"inject_userfaultfd", py_inject_userfaultfd, METH_VARARGS,
     "inject_userfaultfd(tid, pidfd, gadget, flags_seq, timeout_ms) -> (fd, tries, info)\n"
     "Create a userfaultfd inside thread `tid` (trying each flag set in turn), take it with "
     "pidfd_getfd, close the target's copy and pw_restore the target.  `tries` lists "
     "(flags, result) with result = remote fd or -errno; fd is -1 when none worked."},
    {"inject_syscall", py_inject_syscall, METH_VARARGS,
     "inject_syscall(tid, gadget, nr, (a0..a5), timeout_ms) -> (ret, info)\n"
     "Run one system call inside thread `tid` and pw_restore it; ret is the raw return value."},
    {"ptrace_traceme", py_ptrace_traceme, METH_NOARGS, "PTRACE_TRACEME (call in a child)."},
    {"ptrace_detach", py_ptrace_detach, METH_VARARGS,
     "ptrace_detach(pid, sig=0): PTRACE_DETACH, delivering `sig`."},
    {"allow_ptracer", py_allow_ptracer, METH_VARARGS,
     "allow_ptracer(pid): PR_SET_PTRACER (Yama): let `pid` and its descendants trace us."},
    {"find_gadget", py_find_gadget, METH_VARARGS,
     "find_gadget(pid) -> address of a syscall instruction (0f 05) in the [vdso], else in any\n"
     "other executable mapping of `pid`, read from /proc/PID/mem; 0 if none (or unreadable)."},
    {"seccomp_filtered", py_seccomp_filtered, METH_VARARGS,
     "seccomp_filtered(pid) -> whether `pid` runs under a seccomp filter (Seccomp: 2): it is\n"
     "never injected into, as its filter could kill it for the injected call."},
    {NULL, NULL, 0, NULL},
};
