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
 *      when we attached.  There the saved registers and mask are put back and we detach.  The
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
 * to -1 while injecting and restore it (and orig_x0 is restored by restoring x0 from the
 * saved set at the final PTRACE_EVENT_STOP, where the kernel re-derives the restart).
 */
#include "pw.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
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
    int exit_status;      /* wait status, when the target ended under us */
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

/* Test fault points (set only in a helper process, from PAGEWATCH_TEST_FAULT="N[:SIG[:pg]]"):
 * before its N-th ptrace call the helper sends SIG (default SIGKILL) to the monitor that
 * started it (or to the monitor's process group) and waits until the monitor is gone, so a
 * test can kill the monitor deterministically at every ptrace call of an attach or a run. */
static int fault_at, fault_sig, fault_pg, fault_calls;
static pid_t fault_victim;

static void fault_point(void)
{
    fault_calls++;
    if (!fault_at || fault_calls != fault_at)
        return;
    int pidfd = (int)syscall(__NR_pidfd_open, fault_victim, 0);
    if (fault_pg) {
        pid_t pg = getpgid(fault_victim);
        if (pg > 0)
            kill(-pg, fault_sig);
    } else {
        kill(fault_victim, fault_sig);
    }
    if (pidfd >= 0) { /* readable when the monitor has exited */
        struct pollfd p = {pidfd, POLLIN, 0};
        while (poll(&p, 1, 30000) < 0 && errno == EINTR)
            ;
        close(pidfd);
    }
}

static long pt(int req, pid_t tid, void *addr, void *data)
{
    fault_point();
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
static int resume_until(struct session *s, int req, int want_event)
{
    int sig = 0, first = 1;
    for (;;) {
        /* Any ptrace trap (a signal-delivery-stop, an exec or exit event) clears a pending
         * PTRACE_INTERRUPT: the stop we wait for would never come.  Ask for it again each time
         * we go on past another stop (asking twice makes one stop). */
        if (want_event && !first)
            pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL);
        /* req < 0: the target is running already (just wait), then resume with CONT. */
        if (!(first && req < 0) &&
            pt(req < 0 ? PW_PTRACE_CONT : req, s->tid, NULL, (void *)(long)sig) < 0)
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

static int prepare(struct session *s)
{
    if (pt(PW_PTRACE_GETREGS, s->tid, NULL, &s->saved) < 0)
        return fail(s, errno, "PTRACE_GETREGS");
    /* Restored at the final stop in get_signal(), -ERESTARTNOHAND (-514) makes the kernel
     * restart the call when no handler runs, and a handler still sees EINTR. */
    if ((long)s->saved.rax == -EINTR && restart_without_timeout(&s->saved))
        s->saved.rax = (unsigned long)-514;
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

/* A `syscall` instruction in the process: its [vdso], else any executable mapping. */
static unsigned long long find_gadget(pid_t pid)
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
                                     strstr(line, "[vsyscall]")))
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
    long word = pt(PW_PTRACE_PEEKTEXT, s->tid, (void *)(uintptr_t)s->gadget, NULL);
    return errno == 0 && (word & 0xffff) == 0x050f;
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
        /* A signal the target was about to take: let it have it.  That stop consumed our
         * interrupt (any trap does): ask again. */
        int sig = event == 0 ? WSTOPSIG(st) : 0;
        if (pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) < 0 ||
            pt(PW_PTRACE_CONT, s->tid, NULL, (void *)(long)sig) < 0)
            return fail(s, errno, "PTRACE_CONT");
    }
    s->t_stopped = now_ns();
    if (prepare(s) < 0)
        return -1;
    /* Never run code at an address that is not a syscall instruction now: look again. */
    if (!gadget_ok(s) && !(s->gadget = find_gadget(s->tid)))
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

/* Stop again in get_signal() and put the saved registers and mask back; the thread stays
 * in that ptrace-stop.  Returns -1 if the target died. */
static int restore(struct session *s)
{
    if (!s->prepared)
        return 0;
    s->prepared = 0;
    int ok = pt(PW_PTRACE_INTERRUPT, s->tid, NULL, NULL) == 0 &&
             resume_until(s, PW_PTRACE_CONT, 1) >= 0;
    if (!ok && !s->seized)
        return -1; /* it died */
    if (pt(PW_PTRACE_SETREGS, s->tid, NULL, &s->saved) < 0)
        fail(s, errno, "PTRACE_SETREGS (restore)");
    if (pt(PW_PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0)
        fail(s, errno, "PTRACE_SETSIGMASK (restore)");
    return 0;
}

/* Put everything back and detach. */
static void detach(struct session *s)
{
    if (!s->seized)
        return;
    if (restore(s) < 0)
        return;
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

/* The injected part: userfaultfd() with each flag set in turn, pidfd_getfd, close(). */
static void take_uffd(struct uffd_job *j)
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
        take_uffd(j);
    detach(&j->s);
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

/* ---- the helper process ------------------------------------------------------------------
 *
 * The kernel detaches a tracer's tracees when the tracer thread dies, and a tracee stopped with
 * modified registers or signal mask resumes with them: the monitor's death in the middle of an
 * injection would run the injected call and then garbage (SIGSEGV), or leave every signal of
 * the target blocked.  So every ptrace session that changes the target runs in a helper
 * process that the death of the monitor (the process the user started) cannot take down:
 * forked from it, in a process group of its own (a signal to the monitor's process group, or a
 * terminal's Ctrl-C, Ctrl-\ or Ctrl-Z, never reaches it), ignoring SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE and the job-control
 * signals, without PR_SET_PDEATHSIG, with no descriptor of the monitor but the ones it needs.
 * It always completes the restore and the detach, then hands its result back over a unix
 * socket (the userfaultfd with SCM_RIGHTS); a result the dead monitor never receives is closed
 * with the helper.  Only a SIGKILL of the helper itself, by its pid, can still release the
 * target in the middle of an injection.
 */
static const int helper_ignored[] = {SIGINT,  SIGTERM, SIGHUP,  SIGQUIT, SIGPIPE,
                                     SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
                                     SIGALRM, SIGVTALRM, SIGPROF, SIGXFSZ};

#define HELPER_SOCK 3 /* the helper's end of the socket */
#define HELPER_KEEP 4 /* one more descriptor it keeps (pidfd, release pipe) */

/* In the forked helper: its own process group, signals, descriptors. */
static void helper_setup(int sock, int keep, pid_t monitor)
{
    /* A process group of its own, not a session: a new session is a new scheduler autogroup,
     * which delayed the helper (the target's wait to stop went from 0.016 to 0.076 ms at the
     * median, 3.7 ms at the 95th percentile, on a loaded host). */
    setpgid(0, 0);
    prctl(PR_SET_NAME, (unsigned long)"pagewatch-help", 0, 0, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    for (size_t i = 0; i < sizeof helper_ignored / sizeof helper_ignored[0]; i++)
        sigaction(helper_ignored[i], &sa, NULL);
    sa.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int s2 = fcntl(sock, F_DUPFD, 5), k2 = keep >= 0 ? fcntl(keep, F_DUPFD, 5) : -1;
    if (s2 < 0 || (keep >= 0 && k2 < 0))
        _exit(1);
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3 && null >= 0; fd++)
        dup2(null, fd);
    dup2(s2, HELPER_SOCK);
    if (k2 >= 0)
        dup2(k2, HELPER_KEEP);
    if (syscall(__NR_close_range, k2 >= 0 ? 5 : 4, ~0U, 0) < 0)
        for (int fd = k2 >= 0 ? 5 : 4; fd < 65536; fd++)
            close(fd);
    const char *f = getenv("PAGEWATCH_TEST_FAULT");
    fault_calls = 0;
    fault_at = 0;
    if (f && *f) {
        char *end;
        fault_at = (int)strtol(f, &end, 10);
        fault_sig = *end == ':' ? (int)strtol(end + 1, &end, 10) : SIGKILL;
        fault_pg = *end == ':' && !strcmp(end + 1, "pg");
        fault_victim = monitor;
    }
}

/* Fork the helper; in the monitor returns its pid (and *sock), in the helper 0, < 0 on error
 * (errno).  `keep` is a descriptor the helper keeps, as HELPER_KEEP. */
static pid_t spawn_helper(int keep, int *sock)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -1;
    pid_t monitor = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        errno = e;
        return -1;
    }
    if (pid == 0) {
        helper_setup(sv[1], keep, monitor);
        return 0;
    }
    close(sv[1]);
    *sock = sv[0];
    return pid;
}

/* Send `len` bytes and, if fd >= 0, the descriptor.  Returns 0, or -1 (the peer is gone). */
static int send_with_fd(int sock, const void *buf, size_t len, int fd)
{
    struct iovec iov = {(void *)buf, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&u, 0, sizeof u);
        m.msg_control = u.buf;
        m.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n;
    do
        n = sendmsg(sock, &m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)len ? 0 : -1;
}

/* Receive one message of at most `len` bytes (blocking); *fd gets a passed descriptor or -1.
 * Returns its size, 0 at EOF (the helper is gone), -1 on error. */
static ssize_t recv_with_fd(int sock, void *buf, size_t len, int *fd)
{
    struct iovec iov = {buf, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof u.buf;
    ssize_t n;
    do
        n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    *fd = -1;
    if (n > 0)
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(fd, CMSG_DATA(c), sizeof(int));
    return n;
}

/* A forked helper shares the monitor's pages copy-on-write: its first write to each page it
 * uses faults.  Take those faults before the target stops, not while it is stopped: the stack
 * (64 KiB, far more than a session uses) and the job. */
static void __attribute__((noinline)) prefault(void *job, size_t size)
{
    volatile char pad[64 * 1024];
    for (size_t i = 0; i < sizeof pad; i += 1024)
        pad[i] = 0;
    volatile char *p = job;
    for (size_t i = 0; i < size; i += 1024)
        p[i] = p[i];
    if (size)
        p[size - 1] = p[size - 1];
}

static void reap(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, __WALL) < 0 && errno == EINTR)
        ;
}

/* Run `fn(job)` in a helper process; the job struct comes back with the helper's result and
 * *fdp (a field of the job) becomes the descriptor the helper passed, or -1.  *pidfdp (a
 * field of the job, or NULL) is kept for the helper.  Returns 0, or an errno when the helper
 * could not be started or died without answering (the job is then untouched). */
static int in_helper(void *(*fn)(void *), void *job, size_t size, int *fdp, int *pidfdp,
                     int *calls)
{
    int sock = -1, err = 0;
    pid_t h;
    char *buf = malloc(size + sizeof(int));
    if (!buf)
        return ENOMEM;
    Py_BEGIN_ALLOW_THREADS
    h = spawn_helper(pidfdp ? *pidfdp : -1, &sock);
    if (h == 0) {
        if (pidfdp)
            *pidfdp = HELPER_KEEP;
        prefault(job, size);
        prefault(buf, size + sizeof(int));
        fn(job);
        fault_point(); /* a fault after the last ptrace call: the monitor dies before the reply */
        int ptrace_calls = fault_calls - 1;
        memcpy(buf, job, size);
        memcpy(buf + size, &ptrace_calls, sizeof(int));
        send_with_fd(HELPER_SOCK, buf, size + sizeof(int), fdp && *fdp >= 0 ? *fdp : -1);
        _exit(0);
    }
    if (h < 0) {
        err = errno;
    } else {
        int fd = -1;
        ssize_t n = recv_with_fd(sock, buf, size + sizeof(int), &fd);
        if (n == (ssize_t)(size + sizeof(int))) {
            memcpy(job, buf, size);
            memcpy(calls, buf + size, sizeof(int));
            if (fdp)
                *fdp = fd;
            else if (fd >= 0)
                close(fd);
        } else {
            err = n < 0 ? errno : EPIPE;
            if (fd >= 0)
                close(fd);
        }
        close(sock);
        reap(h);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    return err;
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
/* ---- the tracer of `pagewatch run` ----------------------------------------------------
 *
 * `pagewatch run` starts its command as a child and keeps it seized for the whole run, with
 * PTRACE_O_TRACEEXEC and PTRACE_O_TRACEEXIT, from a dedicated thread that never runs Python:
 *   - at each exec stop it injects userfaultfd() (from an interrupt stop taken right after
 *     the exec, before the new program's first instruction) and holds the child until Python
 *     has registered its mappings (tracer_release);
 *   - at the exit stop (before the kernel tears the memory down) it holds the child until
 *     Python has made its last collect;
 *   - every signal-delivery-stop is resumed at once with its signal, group-stops are listened
 *     to (PTRACE_LISTEN), so the child behaves as untraced.
 * All of it runs in a helper process (see struct tracer): if pagewatch dies, the helper
 * finishes what it does (an injection), lets a held child go, detaches it and exits, and the
 * child runs on.  Waiting polls (at most 1 ms between polls) so that a stop can detach at any
 * time.
 */
#define PW_PTRACE_GETEVENTMSG 0x4201
#define PW_PTRACE_LISTEN 0x4208
#define PW_PTRACE_O_TRACEEXEC 0x10
#define PW_PTRACE_O_TRACEEXIT 0x40
#define PW_PTRACE_EVENT_EXEC 4
#define PW_PTRACE_EVENT_EXIT 6
#define PW_PTRACE_O_TRACEFORK 0x2
#define PW_PTRACE_O_TRACEVFORK 0x4
#define PW_PTRACE_O_TRACECLONE 0x8
#define PW_PTRACE_EVENT_FORK 1
#define PW_PTRACE_EVENT_VFORK 2
#define PW_PTRACE_EVENT_CLONE 3
enum { EV_ATTACHED = 1, EV_EXEC = 2, EV_EXIT = 3, EV_GONE = 4, EV_ERROR = 5, EV_FORK = 6,
       EV_END = 7 };

/* One event or command on the helper's socket; `pid` is the process it is about (the
 * child of `pagewatch run`, or with follow one of its descendants). */
struct pw_event {
    int32_t kind, a;
    int64_t b;
    double c;
    int32_t pid, pad;
};

/* A thread the follow tracer holds seized: its process (tgid) and whether it leads it. */
struct tracee {
    pid_t tid, tgid;
    int fresh; /* announced by its parent's fork event, its first stop not seen yet */
    int vfork; /* announced by a vfork event */
};

#define MAX_TRACERS 16
/* One `pagewatch run` tracer.  The tracing itself runs in a helper process (see "the helper
 * process" above: the monitor's death, even by SIGKILL, must not release the child in the
 * middle of an injection); this struct exists on both sides of its socket:
 *   - in the helper, tracer_main() drives the child and reads the monitor's commands
 *     (release, freeze on/off, stop); EOF on the socket (the monitor died) is a stop: the
 *     helper lets a held child go, detaches it and exits;
 *   - in the monitor, a proxy thread forwards the helper's events to the event pipe (with the
 *     userfaultfd of an exec passed over the socket) and notes its freeze acknowledgements. */
struct tracer {
    int used, done, follow;
    pid_t pid, helper;
    int pidfd, release_fd, ev_r, ev_w, sock;
    pthread_t proxy;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int released, stop, orphan, gone_posted;
    /* A freeze (see below) of the child's process: freeze_req is set while the freezer wants
     * the child stopped (generation freeze_gen); the helper acknowledges a generation (ack_gen)
     * once the child sits in a ptrace-stop it keeps until the thaw: frozen (a stop taken for
     * the freeze) or held (at an exec or exit stop). */
    int freeze_req, freeze_gen, ack_gen, frozen, held, interrupted;
    /* follow (helper side): every thread seized, and the pid the events are about */
    struct tracee *tracees;
    int ntracees, cap, end_posted;
    pid_t cur;
};
static struct tracer tracers[MAX_TRACERS];
static pthread_mutex_t tracers_mu = PTHREAD_MUTEX_INITIALIZER;

/* Messages on the socket: events (EV_*) and acknowledgements from the helper, commands from
 * the monitor. */
enum { M_ACK = 10, C_RELEASE = 20, C_FREEZE = 21, C_STOP = 22 };

/* ---- helper side (single-threaded) ---- */

static void helper_send(struct tracer *t, int kind, int a, long long b, double c, int fd)
{
    struct pw_event e = {kind, a, b, c, t->cur ? t->cur : t->pid, 0};
    if (t->orphan || send_with_fd(t->sock, &e, sizeof e, fd) < 0) {
        t->orphan = 1; /* the monitor is gone: let the child go */
        t->stop = 1;
    }
}

static void post(struct tracer *t, int kind, int a, long long b, double c)
{
    int fd = (kind == EV_EXEC || kind == EV_FORK) && a >= 0 ? a : -1;
    helper_send(t, kind, a, b, c, fd);
    if (fd >= 0)
        close(fd); /* the monitor has its copy (or is gone) */
}

static void ack(struct tracer *t)
{
    helper_send(t, M_ACK, t->freeze_gen, 0, 0, -1);
}

/* Read the monitor's commands: wait up to timeout_ms (-1: until one comes) for the first. */
static void cmd_pump(struct tracer *t, int timeout_ms)
{
    for (;;) {
        struct pollfd p = {t->sock, POLLIN, 0};
        int r = t->orphan ? 1 : poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || t->orphan)
            return;
        struct pw_event e;
        ssize_t n = recv(t->sock, &e, sizeof e, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) { /* EOF: the monitor died (or closed): stop, the child goes on */
            t->orphan = 1;
            t->stop = 1;
            t->freeze_req = 0;
            return;
        }
        if (e.kind == C_RELEASE) {
            t->released = 1;
        } else if (e.kind == C_STOP) {
            t->stop = 1;
        } else if (e.kind == C_FREEZE) {
            t->freeze_req = e.a;
            t->freeze_gen = (int)e.b;
            if (e.a && (t->held || t->frozen))
                ack(t); /* stopped already, and kept so until the thaw */
        }
        timeout_ms = 0; /* then drain what else is there */
    }
}

/* Wait until the monitor lets the held child go (or asks to stop, or died); returns t->stop. */
static int hold(struct tracer *t)
{
    t->held = 1;
    if (t->freeze_req)
        ack(t);
    /* Never let it go while a freeze counts on it being stopped. */
    while (t->freeze_req || (!t->released && !t->stop))
        cmd_pump(t, -1);
    t->held = 0;
    t->released = 0;
    return t->stop;
}

static int stop_wanted(struct tracer *t)
{
    cmd_pump(t, 0);
    return t->stop;
}

static int freeze_wanted(struct tracer *t)
{
    cmd_pump(t, 0);
    return t->freeze_req;
}

/* The child is in a ptrace-stop and a freeze wants it stopped: stay until the thaw. */
static void frozen_hold(struct tracer *t)
{
    t->frozen = 1;
    t->interrupted = 0;
    ack(t);
    while (t->freeze_req)
        cmd_pump(t, -1);
    t->frozen = 0;
}

/* Whether the child runs under a seccomp filter ("Seccomp: 2"): its filter could kill it
 * for the injected call, so it is not injected into. */
static int seccomp_filtered(pid_t pid)
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

/* At an exec stop (`step`: step to an interrupt stop before the first instruction first) or
 * at a new child's first stop (already such a stop): inject, restore, report `kind` about
 * `tid` (a = the userfaultfd or -errno, b = `b`, or the flags for an exec), and return 0; -1
 * if the child died (its status then in *status).  The caller holds it. */
static int inject_at(struct tracer *t, pid_t tid, int pidfd, int step, int kind, long long b,
                     int *status)
{
    struct uffd_job j;
    memset(&j, 0, sizeof j);
    j.s.tid = tid;
    j.s.seized = 1;
    j.pidfd = pidfd;
    j.local_fd = -1;
    j.nflags = 2;
    j.flags[0] = O_CLOEXEC | O_NONBLOCK | 1; /* UFFD_USER_MODE_ONLY */
    j.flags[1] = O_CLOEXEC | O_NONBLOCK;
    j.results[0] = j.results[1] = -ENOEXEC;
    double t0 = now_ns();
    int err = 0;
    if (step && (pt(PW_PTRACE_INTERRUPT, tid, NULL, NULL) < 0 ||
                        resume_until(&j.s, PW_PTRACE_CONT, 1) < 0)) {
        err = j.s.err ? j.s.err : errno;
    } else {
        j.s.gadget = seccomp_filtered(tid) ? 0 : find_gadget(tid);
        if (!j.s.gadget)
            err = seccomp_filtered(tid) ? ECANCELED : ENOENT;
        else if (prepare(&j.s) == 0)
            take_uffd(&j);
        if (restore(&j.s) < 0 || !j.s.seized) {
            *status = j.s.exit_status;
            if (j.local_fd >= 0)
                close(j.local_fd);
            return -1;
        }
        if (j.local_fd < 0 && !err)
            err = j.getfd_errno ? j.getfd_errno : j.s.err ? j.s.err : 0;
    }
    if (!j.s.seized) {
        *status = j.s.exit_status;
        return -1;
    }
    long flags = 0;
    for (int i = 0; i < j.nflags; i++)
        if (j.results[i] >= 0 && j.results[i] != -ENOEXEC)
            flags = j.flags[i];
    if (j.local_fd < 0 && !err)
        err = (int)-(j.results[1] != -ENOEXEC ? j.results[1] : j.results[0]);
    t->cur = tid;
    post(t, kind, j.local_fd >= 0 ? j.local_fd : -err, kind == EV_EXEC ? flags : b,
         now_ns() - t0);
    t->cur = 0;
    return 0;
}

static int on_exec(struct tracer *t, int *status)
{
    return inject_at(t, t->pid, t->pidfd, 1, EV_EXEC, 0, status);
}

static void *tracer_main(void *arg)
{
    struct tracer *t = arg;
    long opts = PW_PTRACE_O_TRACESYSGOOD | PW_PTRACE_O_TRACEEXEC | PW_PTRACE_O_TRACEEXIT;
    if (pt(PW_PTRACE_SEIZE, t->pid, NULL, (void *)opts) < 0) {
        post(t, EV_ERROR, errno, 0, 0);
        close(t->release_fd);
        t->done = 1;
        return NULL;
    }
    post(t, EV_ATTACHED, 0, 0, 0);
    char go = 1;
    if (t->release_fd >= 0) {
        if (write(t->release_fd, &go, 1) < 0) { /* the child is gone: the wait tells */
        }
        close(t->release_fd);
    }
    fault_point(); /* a test's kill here: the helper lets go of a child still before its exec */
    long delay = 20000;
    int status = 0;
    for (;;) {
        int st;
        pid_t r = waitpid(t->pid, &st, __WALL | WNOHANG);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            post(t, EV_GONE, -1, errno, 0);
            break;
        }
        if (r == 0) {
            if (stop_wanted(t)) {
                /* Detach: interrupt it and let it go at the first stop it reports, ours or any
                 * trap that came first (an exec, a signal: delivered by the detach). */
                int gone = -2;
                if (pt(PW_PTRACE_INTERRUPT, t->pid, NULL, NULL) == 0)
                    for (;;) {
                        int st2;
                        pid_t r2 = waitpid(t->pid, &st2, __WALL);
                        if (r2 < 0 && errno == EINTR)
                            continue;
                        if (r2 < 0)
                            break;
                        if (WIFEXITED(st2) || WIFSIGNALED(st2)) {
                            gone = st2;
                            break;
                        }
                        int ev2 = (unsigned)st2 >> 16, sig2 = WSTOPSIG(st2);
                        int deliver = ev2 == 0 && sig2 != (SIGTRAP | 0x80) ? sig2 : 0;
                        pt(PW_PTRACE_DETACH, t->pid, NULL, (void *)(long)deliver);
                        break;
                    }
                post(t, EV_GONE, gone, 0, 0);
                break;
            }
            if (!t->interrupted && freeze_wanted(t)) {
                /* A freeze: stop the child; the stop is held below when it comes. */
                if (pt(PW_PTRACE_INTERRUPT, t->pid, NULL, NULL) == 0)
                    t->interrupted = 1;
                delay = 2000;
            }
            struct timespec ts = {0, delay};
            nanosleep(&ts, NULL);
            if (delay < 1000000)
                delay *= 2;
            continue;
        }
        delay = 20000;
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            post(t, EV_GONE, st, 0, 0);
            break;
        }
        int event = (unsigned)st >> 16, sig = WSTOPSIG(st), cont_sig = 0;
        t->interrupted = 0; /* a later freeze interrupts again (an extra stop is harmless) */
        if (event != 0 && freeze_wanted(t))
            frozen_hold(t); /* any ptrace-stop but a signal-delivery-stop: it is stopped */
        if (event == PW_PTRACE_EVENT_EXEC) {
            if (on_exec(t, &status) < 0) {
                post(t, EV_GONE, status, 0, 0);
                break;
            }
            hold(t);
        } else if (event == PW_PTRACE_EVENT_EXIT) {
            unsigned long msg = 0;
            pt(PW_PTRACE_GETEVENTMSG, t->pid, NULL, &msg);
            post(t, EV_EXIT, (int)msg, 0, 0);
            hold(t);
        } else if (event == PW_PTRACE_EVENT_STOP) {
            if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU) {
                pt(PW_PTRACE_LISTEN, t->pid, NULL, NULL); /* stay stopped, as untraced */
                continue;
            }
        } else if (event == 0 && sig != (SIGTRAP | 0x80)) {
            cont_sig = sig; /* a signal for the child: deliver it at once */
        }
        pt(PW_PTRACE_CONT, t->pid, NULL, (void *)(long)cont_sig);
    }
    t->done = 1;
    return NULL;
}

/* ---- follow: the whole process tree ----------------------------------------------------
 *
 * With `follow`, the tracer seizes the child with PTRACE_O_TRACEFORK, _VFORK and _CLONE too:
 * the kernel seizes every thread and process it creates, and each new one starts in a
 * ptrace-stop before its first instruction.  Every thread is kept seized (a fork or exec in any
 * thread is seen), one waitpid(-1) loop drives them all:
 *   - a new thread (Tgid != its tid) goes on at once;
 *   - a new process that shares its parent's memory (vfork, CLONE_VM: kcmp says so) is
 *     reported (EV_FORK, a = -EEXIST) and held: its writes are its parent's until it executes;
 *   - any other new process gets a userfaultfd injected at that first stop, is reported
 *     (EV_FORK, a = the userfaultfd or -errno, b = its parent) and held until the monitor has
 *     registered its mappings (tracer_release);
 *   - an exec in any process: as for the child (EV_EXEC, held); the exit of a thread-group
 *     leader: EV_EXIT, held for the last collect; a process gone: EV_GONE (a = wait status);
 *     when no thread is left: EV_END.
 * A stop (or the monitor's death) detaches every thread, each at the first stop it reports,
 * and every process created meanwhile as well.  The policy (what to track, how to report) is
 * the monitor's; this loop only says what the kernel said. */
#define PW_KCMP_VM 1

static struct tracee *tracee_find(struct tracer *t, pid_t tid)
{
    for (int i = 0; i < t->ntracees; i++)
        if (t->tracees[i].tid == tid)
            return &t->tracees[i];
    return NULL;
}

static struct tracee *tracee_add(struct tracer *t, pid_t tid, pid_t tgid)
{
    struct tracee *tr = tracee_find(t, tid);
    if (tr) {
        tr->tgid = tgid;
        tr->fresh = 0;
        return tr;
    }
    if (t->ntracees == t->cap) {
        int cap = t->cap ? t->cap * 2 : 64;
        struct tracee *n = realloc(t->tracees, (size_t)cap * sizeof *n);
        if (!n)
            return NULL;
        t->tracees = n;
        t->cap = cap;
    }
    tr = &t->tracees[t->ntracees++];
    tr->tid = tid;
    tr->tgid = tgid;
    tr->fresh = 0;
    tr->vfork = 0;
    return tr;
}

/* A child announced by its parent's fork event: seized by the kernel, its first stop to come. */
static void fresh(struct tracer *t, pid_t tid, int vfork)
{
    struct tracee *tr = tracee_add(t, tid, tid);
    if (tr) {
        tr->fresh = 1;
        tr->vfork = vfork;
    }
}

static void tracee_remove(struct tracer *t, pid_t tid)
{
    struct tracee *tr = tracee_find(t, tid);
    if (tr)
        *tr = t->tracees[--t->ntracees];
}

/* A numeric field of /proc/TID/status ("Tgid", "PPid"), or -1. */
static long status_field(pid_t tid, const char *name)
{
    char path[64], line[256];
    long v = -1;
    size_t n = strlen(name);
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, name, n) && line[n] == ':') {
            v = atol(line + n + 1);
            break;
        }
    fclose(f);
    return v;
}

static void follow_post(struct tracer *t, pid_t pid, int kind, int a, long long b, double c)
{
    t->cur = pid;
    post(t, kind, a, b, c);
    t->cur = 0;
}

/* A thread or process seen for the first time, in its first stop.  Returns 0 (it is held or
 * went on), -1 if it died meanwhile (then *status). */
static int follow_new(struct tracer *t, pid_t tid, int *status)
{
    long tgid = status_field(tid, "Tgid");
    if (tgid > 0 && tgid != tid) { /* a thread */
        tracee_add(t, tid, (pid_t)tgid);
        pt(PW_PTRACE_CONT, tid, NULL, NULL);
        return 0;
    }
    struct tracee *tr = tracee_find(t, tid);
    int vfork = tr && tr->fresh && tr->vfork;
    tracee_add(t, tid, tid);
    long ppid = status_field(tid, "PPid");
    /* kcmp(2) says whether it shares its parent's memory (vfork, CLONE_VM); a kernel
     * without it (CONFIG_KCMP off): a vfork event said so, when it came first. */
    long same = ppid > 0 ? syscall(__NR_kcmp, tid, (pid_t)ppid, PW_KCMP_VM, 0, 0) : 1;
    if (same == 0 || (same < 0 && vfork)) {
        follow_post(t, tid, EV_FORK, -EEXIST, ppid, 0);
    } else {
        int pidfd = (int)syscall(__NR_pidfd_open, tid, 0);
        int r = inject_at(t, tid, pidfd, 0, EV_FORK, ppid, status);
        if (pidfd >= 0)
            close(pidfd);
        if (r < 0)
            return -1;
    }
    t->cur = tid;
    hold(t);
    t->cur = 0;
    pt(PW_PTRACE_CONT, tid, NULL, NULL);
    return 0;
}

/* Let every thread go: each at the first stop it reports (delivering the signal it stopped
 * with), and each process it created before that stop as well. */
static void follow_detach_all(struct tracer *t)
{
    for (int i = 0; i < t->ntracees; i++)
        pt(PW_PTRACE_INTERRUPT, t->tracees[i].tid, NULL, NULL);
    while (t->ntracees > 0) {
        int st;
        pid_t r = waitpid(-1, &st, __WALL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
        struct tracee *tr = tracee_find(t, r);
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            if (tr && tr->tgid == r)
                follow_post(t, r, EV_GONE, st, 0, 0);
            tracee_remove(t, r);
            continue;
        }
        int ev = (unsigned)st >> 16, sig = WSTOPSIG(st);
        if (ev == PW_PTRACE_EVENT_FORK || ev == PW_PTRACE_EVENT_VFORK ||
            ev == PW_PTRACE_EVENT_CLONE) {
            unsigned long child = 0;
            if (pt(PW_PTRACE_GETEVENTMSG, r, NULL, &child) == 0 && child &&
                !tracee_find(t, (pid_t)child))
                fresh(t, (pid_t)child, 0); /* its first stop comes */
        }
        int deliver = ev == 0 && sig != (SIGTRAP | 0x80) ? sig : 0;
        pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)deliver);
        if (tr && tr->tgid == r)
            follow_post(t, r, EV_GONE, -2, 0, 0);
        tracee_remove(t, r);
    }
}

static void follow_main(struct tracer *t)
{
    long opts = PW_PTRACE_O_TRACESYSGOOD | PW_PTRACE_O_TRACEEXEC | PW_PTRACE_O_TRACEEXIT |
                PW_PTRACE_O_TRACEFORK | PW_PTRACE_O_TRACEVFORK | PW_PTRACE_O_TRACECLONE;
    if (pt(PW_PTRACE_SEIZE, t->pid, NULL, (void *)opts) < 0) {
        post(t, EV_ERROR, errno, 0, 0);
        close(t->release_fd);
        return;
    }
    tracee_add(t, t->pid, t->pid);
    post(t, EV_ATTACHED, 0, 0, 0);
    char go = 1;
    if (t->release_fd >= 0) {
        if (write(t->release_fd, &go, 1) < 0) { /* the child is gone: the wait tells */
        }
        close(t->release_fd);
    }
    fault_point(); /* a test's kill here: the helper lets go of a child still before its exec */
    long delay = 20000;
    while (t->ntracees > 0) {
        int st, status = 0;
        pid_t r = waitpid(-1, &st, __WALL | WNOHANG);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break; /* ECHILD: none left */
        if (r == 0) {
            if (stop_wanted(t)) {
                follow_detach_all(t);
                break;
            }
            struct timespec ts = {0, delay};
            nanosleep(&ts, NULL);
            if (delay < 1000000)
                delay *= 2;
            continue;
        }
        delay = 20000;
        struct tracee *tr = tracee_find(t, r);
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            if (tr && tr->tgid == r)
                follow_post(t, r, EV_GONE, st, 0, 0);
            tracee_remove(t, r);
            continue;
        }
        if (!tr || tr->fresh) { /* a new thread or process in its first stop */
            if (follow_new(t, r, &status) < 0) {
                follow_post(t, r, EV_GONE, status, 0, 0);
                tracee_remove(t, r);
            }
            continue;
        }
        int event = (unsigned)st >> 16, sig = WSTOPSIG(st), cont_sig = 0;
        if (event == PW_PTRACE_EVENT_FORK || event == PW_PTRACE_EVENT_VFORK ||
            event == PW_PTRACE_EVENT_CLONE) {
            unsigned long child = 0; /* known from now on: a stop detaches it too */
            if (pt(PW_PTRACE_GETEVENTMSG, r, NULL, &child) == 0 && child &&
                !tracee_find(t, (pid_t)child))
                fresh(t, (pid_t)child, event == PW_PTRACE_EVENT_VFORK);
        } else if (event == PW_PTRACE_EVENT_EXEC) {
            /* A thread other than the leader that executes takes the leader's pid: its old
             * tid is gone without a word (ptrace(2), "execve(2) under ptrace"). */
            unsigned long former = 0;
            pt(PW_PTRACE_GETEVENTMSG, r, NULL, &former);
            if ((pid_t)former != r)
                tracee_remove(t, (pid_t)former);
            tr = tracee_add(t, r, r);
            int pidfd = (int)syscall(__NR_pidfd_open, r, 0);
            int rc = inject_at(t, r, pidfd, 1, EV_EXEC, 0, &status);
            if (pidfd >= 0)
                close(pidfd);
            if (rc < 0) {
                follow_post(t, r, EV_GONE, status, 0, 0);
                tracee_remove(t, r);
                continue;
            }
            t->cur = r;
            hold(t);
            t->cur = 0;
        } else if (event == PW_PTRACE_EVENT_EXIT) {
            if (tr->tgid == r) { /* the leader: the memory is still there, for a last collect */
                unsigned long msg = 0;
                pt(PW_PTRACE_GETEVENTMSG, r, NULL, &msg);
                follow_post(t, r, EV_EXIT, (int)msg, 0, 0);
                t->cur = r;
                hold(t);
                t->cur = 0;
            }
        } else if (event == PW_PTRACE_EVENT_STOP) {
            if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU) {
                pt(PW_PTRACE_LISTEN, r, NULL, NULL); /* stay stopped, as untraced */
                continue;
            }
        } else if (event == 0 && sig != (SIGTRAP | 0x80)) {
            cont_sig = sig; /* a signal for it: deliver it at once */
        }
        if (t->stop) { /* asked while it was held: it is stopped, let it go now */
            pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)cont_sig);
            if (tr && tr->tgid == r)
                follow_post(t, r, EV_GONE, -2, 0, 0);
            tracee_remove(t, r);
            follow_detach_all(t);
            break;
        }
        pt(PW_PTRACE_CONT, r, NULL, (void *)(long)cont_sig);
    }
    if (t->stop && t->ntracees > 0)
        follow_detach_all(t);
    follow_post(t, t->pid, EV_END, 0, 0, 0);
    t->end_posted = 1;
}

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
 * signal held in a signal-delivery-stop is delivered by that detach (the kernel keeps its
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

/* Our own `pagewatch run` tracer thread holding `tid` seized, if any. */
static struct tracer *tracer_holding(pid_t tid)
{
    struct tracer *found = NULL;
    pthread_mutex_lock(&tracers_mu);
    for (int i = 0; i < MAX_TRACERS; i++)
        if (tracers[i].used && tracers[i].pid == tid && !__atomic_load_n(&tracers[i].done,
                                                                           __ATOMIC_ACQUIRE))
            found = &tracers[i];
    pthread_mutex_unlock(&tracers_mu);
    return found;
}

/* Ask the tracer's helper to stop the child for a freeze (on) or let it go (off). */
static void tracer_freeze(struct tracer *tr, int on)
{
    pthread_mutex_lock(&tr->mu);
    tr->freeze_req = on;
    if (on)
        tr->freeze_gen++;
    struct pw_event e = {C_FREEZE, on, tr->freeze_gen, 0, 0, 0};
    send_with_fd(tr->sock, &e, sizeof e, -1); /* if the helper is gone, `done` tells */
    pthread_mutex_unlock(&tr->mu);
}

/* Seize and interrupt thread i (or find why not). */
static int frz_seize(struct freezer *f, int i)
{
    struct frz_thread *th = &f->t[i];
    if (pt(PW_PTRACE_SEIZE, th->tid, NULL, NULL) == 0) {
        th->state = FT_WAIT;
        pt(PW_PTRACE_INTERRUPT, th->tid, NULL, NULL); /* if it died, the wait tells */
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
    if (e == EPERM && (th->tr = tracer_holding(th->tid)) != NULL) {
        th->state = FT_TRACER;
        tracer_freeze(th->tr, 1);
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

/* Whether the tracer thread holding thread i has it stopped (1), lost it (-1), or not yet. */
static int tracer_stopped(struct frz_thread *th)
{
    struct tracer *tr = th->tr;
    pthread_mutex_lock(&tr->mu);
    int ok = tr->freeze_req && tr->ack_gen == tr->freeze_gen;
    pthread_mutex_unlock(&tr->mu);
    if (ok)
        return 1;
    return __atomic_load_n(&tr->done, __ATOMIC_ACQUIRE) ? -1 : 0;
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
            if (th->state == FT_TRACER && tracer_stopped(th) == 0) {
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
                pt(PW_PTRACE_INTERRUPT, th->tid, NULL, NULL);
                if (pt(PW_PTRACE_CONT, th->tid, NULL, (void *)(long)WSTOPSIG(st)) < 0 &&
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
            if (th->state == FT_TRACER && tracer_stopped(th) < 0)
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
 * 100 ms; a signal they were about to take is delivered by the detach).  The ones that do
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
            pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)sig);
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
            pt(PW_PTRACE_DETACH, th->tid, NULL, NULL);
        else if (th->state == FT_TRACER)
            tracer_freeze(th->tr, 0);
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

static __attribute__((unused)) PyObject *no_inject(void)
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
    j.local_fd = -1;
    struct uffd_job j0 = j;
    int calls = 0, helper = 1;
    int herr = in_helper(uffd_worker, &j, sizeof j, &j.local_fd, &j.pidfd, &calls);
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
    struct syscall_job j0 = j;
    int calls = 0;
    int herr = in_helper(syscall_worker, &j, sizeof j, NULL, NULL, &calls);
    if (!herr && j.s.err == EPERM && j.s.what && !strcmp(j.s.what, "PTRACE_SEIZE")) {
        j = j0; /* see py_inject_userfaultfd */
        if (run_worker(syscall_worker, &j))
            return NULL;
    } else if (herr) {
        return pw_raise_errno(herr, "the injection helper process");
    }
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

static struct tracer *tracer_of(int h)
{
#if PW_CAN_INJECT
    if (h >= 0 && h < MAX_TRACERS && tracers[h].used)
        return &tracers[h];
#endif
    PyErr_SetString(PyExc_ValueError, "no such tracer (stopped already?)");
    return NULL;
}

#if PW_CAN_INJECT
/* The monitor's side of a tracer: forward the helper's events, note its acknowledgements. */
static void *tracer_proxy(void *arg)
{
    struct tracer *t = arg;
    for (;;) {
        struct pw_event e;
        int fd = -1;
        ssize_t n = recv_with_fd(t->sock, &e, sizeof e, &fd);
        if (n != (ssize_t)sizeof e) {
            if (fd >= 0)
                close(fd);
            /* A helper that exits with commands of ours unread resets the socket: the error
             * comes first, what it sent before is still queued. */
            if (n > 0 || (n < 0 && errno == ECONNRESET))
                continue;
            break; /* EOF: the helper exited */
        }
        if (e.kind == M_ACK) {
            pthread_mutex_lock(&t->mu);
            t->ack_gen = e.a;
            pthread_mutex_unlock(&t->mu);
            continue;
        }
        if ((e.kind == EV_EXEC || e.kind == EV_FORK) && e.a >= 0)
            e.a = fd >= 0 ? fd : -EPROTO;
        else if (fd >= 0)
            close(fd);
        if (e.kind == EV_GONE && e.pid == t->pid)
            t->gone_posted = 1;
        if (e.kind == EV_END)
            t->end_posted = 1;
        ssize_t w;
        do
            w = write(t->ev_w, &e, sizeof e);
        while (w < 0 && errno == EINTR);
    }
    if (!t->gone_posted) {
        /* The helper died without a word (killed): the kernel detached the child. */
        struct pw_event e = {EV_GONE, -2, 0, 0, t->pid, 0};
        ssize_t w;
        do
            w = write(t->ev_w, &e, sizeof e);
        while (w < 0 && errno == EINTR);
    }
    if (t->follow && !t->end_posted) { /* the same: every thread of the tree was detached */
        struct pw_event e = {EV_END, 0, 0, 0, t->pid, 0};
        ssize_t w;
        do
            w = write(t->ev_w, &e, sizeof e);
        while (w < 0 && errno == EINTR);
    }
    __atomic_store_n(&t->done, 1, __ATOMIC_RELEASE);
    return NULL;
}
#endif

static PyObject *py_tracer_start(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid, release_fd, pidfd, follow = 0;
    if (!PyArg_ParseTuple(args, "iii|p:tracer_start", &pid, &release_fd, &pidfd, &follow))
        return NULL;
    pthread_mutex_lock(&tracers_mu);
    int h = -1;
    for (int i = 0; i < MAX_TRACERS; i++)
        if (!tracers[i].used) {
            h = i;
            break;
        }
    if (h < 0) {
        pthread_mutex_unlock(&tracers_mu);
        return pw_raise_errno(EMFILE, "tracer_start: too many tracers");
    }
    struct tracer *t = &tracers[h];
    memset(t, 0, sizeof *t);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) {
        pthread_mutex_unlock(&tracers_mu);
        return pw_raise_errno(errno, "pipe2");
    }
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    t->pid = pid;
    t->follow = follow;
    t->ev_r = fds[0];
    t->ev_w = fds[1];
    int sock = -1;
    pid_t helper = spawn_helper(release_fd, &sock);
    if (helper == 0) { /* the helper: trace the child until it ends, the stop or our death */
        t->sock = HELPER_SOCK;
        t->release_fd = release_fd >= 0 ? HELPER_KEEP : -1;
        t->pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
        prefault(t, sizeof *t);
        if (follow)
            follow_main(t);
        else
            tracer_main(t);
        _exit(0);
    }
    int err = helper < 0 ? errno : 0;
    if (release_fd >= 0)
        close(release_fd); /* the helper has it */
    if (!err) {
        t->helper = helper;
        t->sock = sock;
        t->used = 1;
        pthread_mutex_init(&t->mu, NULL);
        pthread_cond_init(&t->cv, NULL);
        err = pthread_create(&t->proxy, NULL, tracer_proxy, t);
        if (err) { /* the helper goes on alone: stopping it detaches the child */
            struct pw_event e = {C_STOP, 0, 0, 0, 0, 0};
            send_with_fd(sock, &e, sizeof e, -1);
            close(sock);
            reap(helper);
            t->used = 0;
        }
    }
    if (err) {
        close(fds[0]);
        close(fds[1]);
        pthread_mutex_unlock(&tracers_mu);
        return pw_raise_errno(err, helper < 0 ? "fork (tracer helper)" : "pthread_create");
    }
    pthread_mutex_unlock(&tracers_mu);
    (void)pidfd; /* the helper opens its own */
    return Py_BuildValue("(ii)", h, t->ev_r);
#else
    return no_inject();
#endif
}

static PyObject *py_tracer_event(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int h;
    if (!PyArg_ParseTuple(args, "i:tracer_event", &h))
        return NULL;
    struct tracer *t = tracer_of(h);
    if (!t)
        return NULL;
    struct pw_event e;
    ssize_t n = read(t->ev_r, &e, sizeof e);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        Py_RETURN_NONE;
    if (n < 0)
        return pw_raise_errno(errno, "read(tracer events)");
    if (n != (ssize_t)sizeof e)
        Py_RETURN_NONE;
    return Py_BuildValue("(iiLdi)", e.kind, e.a, (long long)e.b, e.c, e.pid);
#else
    return no_inject();
#endif
}

static PyObject *py_tracer_release(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int h;
    if (!PyArg_ParseTuple(args, "i:tracer_release", &h))
        return NULL;
    struct tracer *t = tracer_of(h);
    if (!t)
        return NULL;
    struct pw_event e = {C_RELEASE, 0, 0, 0, 0, 0};
    send_with_fd(t->sock, &e, sizeof e, -1); /* a helper that is gone has let it go */
    Py_RETURN_NONE;
#else
    return no_inject();
#endif
}

static PyObject *py_tracer_stop(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int h;
    if (!PyArg_ParseTuple(args, "i:tracer_stop", &h))
        return NULL;
    struct tracer *t = tracer_of(h);
    if (!t)
        return NULL;
    struct pw_event e = {C_STOP, 0, 0, 0, 0, 0};
    send_with_fd(t->sock, &e, sizeof e, -1);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(t->proxy, NULL);
    reap(t->helper);
    Py_END_ALLOW_THREADS
    close(t->sock);
    /* The end the helper saw, if Python has not read it. */
    struct pw_event ev;
    int gone = 0, status = 0;
    while (read(t->ev_r, &ev, sizeof ev) == (ssize_t)sizeof ev)
        if (ev.kind == EV_GONE && ev.pid == t->pid) {
            gone = 1;
            status = ev.a;
        }
    close(t->ev_r);
    close(t->ev_w);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_lock(&tracers_mu);
    t->used = 0;
    pthread_mutex_unlock(&tracers_mu);
    if (gone)
        return PyLong_FromLong(status);
    Py_RETURN_NONE;
#else
    return no_inject();
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
    return no_inject();
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
    {"tracer_start", py_tracer_start, METH_VARARGS,
     "tracer_start(pid, release_fd, pidfd, follow=False) -> (handle, event_fd)\n"
     "Seize child `pid` (exec and exit events) from a helper process, then write a byte to "
     "release_fd and close it.  Events (kind, a, b, c, pid) are read with tracer_event: "
     "1 attached, 2 exec (a = taken userfaultfd or -errno, b = flags, c = ns; held), "
     "3 exit (a = status; held), 4 gone (a = wait status), 5 error (a = errno); with follow "
     "(every thread and process it creates, seized from its first instruction): "
     "6 fork (a = taken userfaultfd, -errno, or -EEXIST: shares its parent's memory; "
     "b = parent pid; held), 7 end (no thread left)."},
    {"allow_ptracer", py_allow_ptracer, METH_VARARGS,
     "allow_ptracer(pid): PR_SET_PTRACER (Yama): let `pid` and its descendants trace us."},
    {"tracer_event", py_tracer_event, METH_VARARGS,
     "tracer_event(handle) -> (kind, a, b, c, pid) or None when none is waiting."},
    {"tracer_release", py_tracer_release, METH_VARARGS,
     "tracer_release(handle): let the child held at an exec or exit stop go on."},
    {"tracer_stop", py_tracer_stop, METH_VARARGS,
     "tracer_stop(handle): detach (if still attached) and end the tracer thread; returns the\n"
     "wait status of an end (EV_GONE) the thread saw that was not read, else None."},
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
     "interrupt to last detach)."},
    {NULL, NULL, 0, NULL},
};
