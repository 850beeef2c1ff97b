/* ptrace.h: what the files of the other-process machinery share -- inject.c (ptrace
 * primitives and the injection), helper.c (the helper process), tracer.c (`pagewatch run`'s
 * tracer), freeze.c (every thread stopped).  Internal to src/native/. */
#ifndef PW_PTRACE_H
#define PW_PTRACE_H

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

static inline double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

PyObject *pw_no_inject(void);  /* NotImplementedError off x86-64 */

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

static inline int fail(struct session *s, int err, const char *what)
{
    if (!s->err) {
        s->err = err;
        s->what = what;
    }
    return -1;
}

#define MAX_TRIES 4

struct uffd_job {
    struct session s;
    int pidfd;
    int nflags;
    long flags[MAX_TRIES];
    long results[MAX_TRIES]; /* -errno or the remote fd */
    int local_fd, getfd_errno, close_errno;
};

struct syscall_job {
    struct session s;
    long nr, args[6], ret;
    int done;
};

struct tracer;  /* tracer.c */

/* inject.c */
void pw_detach(struct session *s);
extern int pw_fault_at;
extern int pw_fault_calls;
extern int pw_fault_pg;
void pw_fault_point(void);
extern int pw_fault_sig;
extern pid_t pw_fault_victim;
unsigned long long pw_find_gadget(pid_t pid);
int pw_prepare(struct session *s);
long pw_pt(int req, pid_t tid, void *addr, void *data);
int pw_restore(struct session *s);
int pw_resume_until(struct session *s, int req, int want_event);
void pw_take_uffd(struct uffd_job *j);
int pw_seccomp_filtered(pid_t pid);
int pw_parse_flags(PyObject *flags, long *out, int *n_out);

/* helper.c */
#define HELPER_SOCK 3 /* the helper's end of the socket */
#define HELPER_KEEP 4 /* one more descriptor it keeps (pidfd, release pipe) */
void pw_prefault(void *job, size_t size);  /* touch its pages before a stop */
int pw_in_helper(void *(*fn)(void *), void *job, size_t size, int *fdp, int *pidfdp,
                     int *calls);
void pw_reap(pid_t pid);
ssize_t pw_recv_with_fd(int sock, void *buf, size_t len, int *fd);
int pw_send_with_fd(int sock, const void *buf, size_t len, int fd);
PyObject *pw_session_error(struct session *s);
pid_t pw_spawn_helper(int keep, int *sock);
PyObject *pw_timing(struct session *s);

/* tracer.c */
void pw_tracer_freeze(struct tracer *tr, int on);
struct tracer *pw_tracer_holding(pid_t tid);
int pw_tracer_stopped(struct tracer *tr);

#endif /* PW_CAN_INJECT */
#endif /* PW_PTRACE_H */
