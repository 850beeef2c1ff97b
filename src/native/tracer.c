/* tracer.c: the tracer of `pagewatch run` (remote/tree.py drives it), following the tree. */

#include "ptrace.h"

#if PW_CAN_INJECT

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
 * child runs on.  Waiting polls (at most 1 ms between polls) so that a stop can pw_detach at any
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
    /* the userfaultfd(2) flag sets each injection tries, in order (from Python) */
    int nflags;
    long flags[MAX_TRIES];
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
    if (t->orphan || pw_send_with_fd(t->sock, &e, sizeof e, fd) < 0) {
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

/* At an exec stop (`step`: step to an interrupt stop before the first instruction first) or
 * at a new child's first stop (already such a stop): inject, pw_restore, report `kind` about
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
    j.nflags = t->nflags;
    for (int i = 0; i < j.nflags; i++) {
        j.flags[i] = t->flags[i];
        j.results[i] = -ENOEXEC; /* not tried */
    }
    double t0 = now_ns();
    int err = 0;
    if (step && (pw_pt(PW_PTRACE_INTERRUPT, tid, NULL, NULL) < 0 ||
                        pw_resume_until(&j.s, PW_PTRACE_CONT, 1) < 0)) {
        err = j.s.err ? j.s.err : errno;
    } else {
        j.s.gadget = pw_seccomp_filtered(tid) ? 0 : pw_find_gadget(tid);
        if (!j.s.gadget)
            err = pw_seccomp_filtered(tid) ? ECANCELED : ENOENT;
        else if (pw_prepare(&j.s) == 0)
            pw_take_uffd(&j);
        if (pw_restore(&j.s) < 0 || !j.s.seized) {
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
    if (pw_pt(PW_PTRACE_SEIZE, t->pid, NULL, (void *)opts) < 0) {
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
    pw_fault_point(); /* a test's kill here: the helper lets go of a child still before its exec */
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
                 * trap that came first (an exec, a signal: delivered by the pw_detach). */
                int gone = -2;
                if (pw_pt(PW_PTRACE_INTERRUPT, t->pid, NULL, NULL) == 0)
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
                        pw_pt(PW_PTRACE_DETACH, t->pid, NULL, (void *)(long)deliver);
                        break;
                    }
                post(t, EV_GONE, gone, 0, 0);
                break;
            }
            if (!t->interrupted && freeze_wanted(t)) {
                /* A freeze: stop the child; the stop is held below when it comes. */
                if (pw_pt(PW_PTRACE_INTERRUPT, t->pid, NULL, NULL) == 0)
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
            pw_pt(PW_PTRACE_GETEVENTMSG, t->pid, NULL, &msg);
            post(t, EV_EXIT, (int)msg, 0, 0);
            hold(t);
        } else if (event == PW_PTRACE_EVENT_STOP) {
            if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU) {
                pw_pt(PW_PTRACE_LISTEN, t->pid, NULL, NULL); /* stay stopped, as untraced */
                continue;
            }
        } else if (event == 0 && sig != (SIGTRAP | 0x80)) {
            cont_sig = sig; /* a signal for the child: deliver it at once */
        }
        pw_pt(PW_PTRACE_CONT, t->pid, NULL, (void *)(long)cont_sig);
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
        pw_pt(PW_PTRACE_CONT, tid, NULL, NULL);
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
    pw_pt(PW_PTRACE_CONT, tid, NULL, NULL);
    return 0;
}

/* Let every thread go: each at the first stop it reports (delivering the signal it stopped
 * with), and each process it created before that stop as well. */
static void follow_detach_all(struct tracer *t)
{
    for (int i = 0; i < t->ntracees; i++)
        pw_pt(PW_PTRACE_INTERRUPT, t->tracees[i].tid, NULL, NULL);
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
            if (pw_pt(PW_PTRACE_GETEVENTMSG, r, NULL, &child) == 0 && child &&
                !tracee_find(t, (pid_t)child))
                fresh(t, (pid_t)child, 0); /* its first stop comes */
        }
        int deliver = ev == 0 && sig != (SIGTRAP | 0x80) ? sig : 0;
        pw_pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)deliver);
        if (tr && tr->tgid == r)
            follow_post(t, r, EV_GONE, -2, 0, 0);
        tracee_remove(t, r);
    }
}

static void follow_main(struct tracer *t)
{
    long opts = PW_PTRACE_O_TRACESYSGOOD | PW_PTRACE_O_TRACEEXEC | PW_PTRACE_O_TRACEEXIT |
                PW_PTRACE_O_TRACEFORK | PW_PTRACE_O_TRACEVFORK | PW_PTRACE_O_TRACECLONE;
    if (pw_pt(PW_PTRACE_SEIZE, t->pid, NULL, (void *)opts) < 0) {
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
    pw_fault_point(); /* a test's kill here: the helper lets go of a child still before its exec */
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
            if (pw_pt(PW_PTRACE_GETEVENTMSG, r, NULL, &child) == 0 && child &&
                !tracee_find(t, (pid_t)child))
                fresh(t, (pid_t)child, event == PW_PTRACE_EVENT_VFORK);
        } else if (event == PW_PTRACE_EVENT_EXEC) {
            /* A thread other than the leader that executes takes the leader's pid: its old
             * tid is gone without a word (ptrace(2), "execve(2) under ptrace"). */
            unsigned long former = 0;
            pw_pt(PW_PTRACE_GETEVENTMSG, r, NULL, &former);
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
                pw_pt(PW_PTRACE_GETEVENTMSG, r, NULL, &msg);
                follow_post(t, r, EV_EXIT, (int)msg, 0, 0);
                t->cur = r;
                hold(t);
                t->cur = 0;
            }
        } else if (event == PW_PTRACE_EVENT_STOP) {
            if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU) {
                pw_pt(PW_PTRACE_LISTEN, r, NULL, NULL); /* stay stopped, as untraced */
                continue;
            }
        } else if (event == 0 && sig != (SIGTRAP | 0x80)) {
            cont_sig = sig; /* a signal for it: deliver it at once */
        }
        if (t->stop) { /* asked while it was held: it is stopped, let it go now */
            pw_pt(PW_PTRACE_DETACH, r, NULL, (void *)(long)cont_sig);
            if (tr && tr->tgid == r)
                follow_post(t, r, EV_GONE, -2, 0, 0);
            tracee_remove(t, r);
            follow_detach_all(t);
            break;
        }
        pw_pt(PW_PTRACE_CONT, r, NULL, (void *)(long)cont_sig);
    }
    if (t->stop && t->ntracees > 0)
        follow_detach_all(t);
    follow_post(t, t->pid, EV_END, 0, 0, 0);
    t->end_posted = 1;
}


/* ---- what a freeze asks of the tracer holding one of the threads (freeze.c) ---- */

/* Our own `pagewatch run` tracer thread holding `tid` seized, if any. */
struct tracer *pw_tracer_holding(pid_t tid)
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
void pw_tracer_freeze(struct tracer *tr, int on)
{
    pthread_mutex_lock(&tr->mu);
    tr->freeze_req = on;
    if (on)
        tr->freeze_gen++;
    struct pw_event e = {C_FREEZE, on, tr->freeze_gen, 0, 0, 0};
    pw_send_with_fd(tr->sock, &e, sizeof e, -1); /* if the helper is gone, `done` tells */
    pthread_mutex_unlock(&tr->mu);
}

/* Whether the tracer thread holding a thread for a freeze has it stopped (1), lost it (-1), or not yet. */
int pw_tracer_stopped(struct tracer *tr)
{
    pthread_mutex_lock(&tr->mu);
    int ok = tr->freeze_req && tr->ack_gen == tr->freeze_gen;
    pthread_mutex_unlock(&tr->mu);
    if (ok)
        return 1;
    return __atomic_load_n(&tr->done, __ATOMIC_ACQUIRE) ? -1 : 0;
}


#endif /* PW_CAN_INJECT */

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
/* One event to the Python side's pipe, retried when a signal interrupts the write. */
static void post_event(struct tracer *t, const struct pw_event *e)
{
    ssize_t w;
    do
        w = write(t->ev_w, e, sizeof *e);
    while (w < 0 && errno == EINTR);
}

static void *tracer_proxy(void *arg)
{
    struct tracer *t = arg;
    for (;;) {
        struct pw_event e;
        int fd = -1;
        ssize_t n = pw_recv_with_fd(t->sock, &e, sizeof e, &fd);
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
        post_event(t, &e);
    }
    if (!t->gone_posted) {
        /* The helper died without a word (killed): the kernel detached the child. */
        struct pw_event e = {EV_GONE, -2, 0, 0, t->pid, 0};
        post_event(t, &e);
    }
    if (t->follow && !t->end_posted) { /* the same: every thread of the tree was detached */
        struct pw_event e = {EV_END, 0, 0, 0, t->pid, 0};
        post_event(t, &e);
    }
    __atomic_store_n(&t->done, 1, __ATOMIC_RELEASE);
    return NULL;
}
#endif

static PyObject *py_tracer_start(PyObject *self, PyObject *args)
{
#if PW_CAN_INJECT
    int pid, release_fd, pidfd, follow = 0;
    PyObject *flags;
    if (!PyArg_ParseTuple(args, "iiiO|p:tracer_start", &pid, &release_fd, &pidfd, &flags,
                          &follow))
        return NULL;
    int nflags;
    long flag_sets[MAX_TRIES];
    if (pw_parse_flags(flags, flag_sets, &nflags) < 0)
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
    t->nflags = nflags;
    memcpy(t->flags, flag_sets, sizeof flag_sets);
    t->ev_r = fds[0];
    t->ev_w = fds[1];
    int sock = -1;
    pid_t helper = pw_spawn_helper(release_fd, &sock);
    if (helper == 0) { /* the helper: trace the child until it ends, the stop or our death */
        t->sock = HELPER_SOCK;
        t->release_fd = release_fd >= 0 ? HELPER_KEEP : -1;
        t->pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
        pw_prefault(t, sizeof *t);
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
            pw_send_with_fd(sock, &e, sizeof e, -1);
            close(sock);
            pw_reap(helper);
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
    return pw_no_inject();
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
    return pw_no_inject();
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
    pw_send_with_fd(t->sock, &e, sizeof e, -1); /* a helper that is gone has let it go */
    Py_RETURN_NONE;
#else
    return pw_no_inject();
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
    pw_send_with_fd(t->sock, &e, sizeof e, -1);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(t->proxy, NULL);
    pw_reap(t->helper);
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
    return pw_no_inject();
#endif
}


PyMethodDef pw_tracer_methods[] = {
    {"tracer_start", py_tracer_start, METH_VARARGS,
     "tracer_start(pid, release_fd, pidfd, flags_seq, follow=False) -> (handle, event_fd)\n"
     "Seize child `pid` (exec and exit events) from a helper process, then write a byte to "
     "release_fd and close it.  Each injection tries the userfaultfd(2) flag sets of "
     "flags_seq in turn, as inject_userfaultfd.  Events (kind, a, b, c, pid) are read with tracer_event: "
     "1 attached, 2 exec (a = taken userfaultfd or -errno, b = flags, c = ns; held), "
     "3 exit (a = status; held), 4 gone (a = wait status), 5 error (a = errno); with follow "
     "(every thread and process it creates, seized from its first instruction): "
     "6 fork (a = taken userfaultfd, -errno, or -EEXIST: shares its parent's memory; "
     "b = parent pid; held), 7 end (no thread left)."},
    {"tracer_event", py_tracer_event, METH_VARARGS,
     "tracer_event(handle) -> (kind, a, b, c, pid) or None when none is waiting."},
    {"tracer_release", py_tracer_release, METH_VARARGS,
     "tracer_release(handle): let the child held at an exec or exit stop go on."},
    {"tracer_stop", py_tracer_stop, METH_VARARGS,
     "tracer_stop(handle): pw_detach (if still attached) and end the tracer thread; returns the\n"
     "wait status of an end (EV_GONE) the thread saw that was not read, else None."},
    {NULL, NULL, 0, NULL},
};
