/* helper.c: the short-lived helper process that runs an injection or a `pagewatch run` tracer
 * (the monitor's death must never release a target with modified registers or mask). */

#include "ptrace.h"

#if PW_CAN_INJECT

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
 * It always completes the pw_restore and the pw_detach, then hands its result back over a unix
 * socket (the userfaultfd with SCM_RIGHTS); a result the dead monitor never receives is closed
 * with the helper.  Only a SIGKILL of the helper itself, by its pid, can still release the
 * target in the middle of an injection.
 */
static const int helper_ignored[] = {SIGINT,  SIGTERM, SIGHUP,  SIGQUIT, SIGPIPE,
                                     SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
                                     SIGALRM, SIGVTALRM, SIGPROF, SIGXFSZ};


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
    pw_fault_calls = 0;
    pw_fault_at = 0;
    if (f && *f) {
        char *end;
        pw_fault_at = (int)strtol(f, &end, 10);
        pw_fault_sig = *end == ':' ? (int)strtol(end + 1, &end, 10) : SIGKILL;
        pw_fault_pg = *end == ':' && !strcmp(end + 1, "pg");
        pw_fault_victim = monitor;
    }
}

/* Fork the helper; in the monitor returns its pid (and *sock), in the helper 0, < 0 on error
 * (errno).  `keep` is a descriptor the helper keeps, as HELPER_KEEP. */
pid_t pw_spawn_helper(int keep, int *sock)
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
int pw_send_with_fd(int sock, const void *buf, size_t len, int fd)
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
ssize_t pw_recv_with_fd(int sock, void *buf, size_t len, int *fd)
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
void __attribute__((noinline)) pw_prefault(void *job, size_t size)
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

void pw_reap(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, __WALL) < 0 && errno == EINTR)
        ;
}

/* Run `fn(job)` in a helper process; the job struct comes back with the helper's result and
 * *fdp (a field of the job) becomes the descriptor the helper passed, or -1.  *pidfdp (a
 * field of the job, or NULL) is kept for the helper.  Returns 0, or an errno when the helper
 * could not be started or died without answering (the job is then untouched). */
int pw_in_helper(void *(*fn)(void *), void *job, size_t size, int *fdp, int *pidfdp,
                     int *calls)
{
    int sock = -1, err = 0;
    pid_t h;
    char *buf = malloc(size + sizeof(int));
    if (!buf)
        return ENOMEM;
    Py_BEGIN_ALLOW_THREADS
    h = pw_spawn_helper(pidfdp ? *pidfdp : -1, &sock);
    if (h == 0) {
        if (pidfdp)
            *pidfdp = HELPER_KEEP;
        pw_prefault(job, size);
        pw_prefault(buf, size + sizeof(int));
        fn(job);
        pw_fault_point(); /* a fault after the last ptrace call: the monitor dies before the reply */
        int ptrace_calls = pw_fault_calls - 1;
        memcpy(buf, job, size);
        memcpy(buf + size, &ptrace_calls, sizeof(int));
        pw_send_with_fd(HELPER_SOCK, buf, size + sizeof(int), fdp && *fdp >= 0 ? *fdp : -1);
        _exit(0);
    }
    if (h < 0) {
        err = errno;
    } else {
        int fd = -1;
        ssize_t n = pw_recv_with_fd(sock, buf, size + sizeof(int), &fd);
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
        pw_reap(h);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    return err;
}

PyObject *pw_timing(struct session *s)
{
    double stop = s->t_stopped > 0 && s->t_detached > 0 ? s->t_detached - s->t_stopped : -1;
    double wait = s->t_stopped > 0 ? s->t_stopped - s->t_interrupt : -1;
    return Py_BuildValue("{s:d,s:d,s:i}", "stop_ns", stop, "wait_ns", wait, "stop_sig",
                         s->first_stop_sig);
}

PyObject *pw_session_error(struct session *s)
{
    PyObject *args = Py_BuildValue("(iss)", s->err, strerror(s->err), s->what);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

#endif /* PW_CAN_INJECT */
