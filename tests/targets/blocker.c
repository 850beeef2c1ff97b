/*
 * A target that blocks in one system call and says how it returned, for the tests of what
 * an attach's interrupt does to a blocked call.
 *
 *   blocker CALL    print "ready", block in CALL, print "ret R ERRNO" when it returns, exit
 *                   when stdin closes
 *
 * CALL: epoll_wait, epoll_pwait, epoll_pwait2 (no timeout: they return when stdin is
 * readable), epoll_wait_timeout (60 s), sigtimedwait (SIGUSR1, 60 s), semop (a semaphore at
 * 0, never raised: returns on SIGUSR1 only), sigwaitinfo (SIGUSR1).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void on_usr1(int sig) { (void)sig; }

int main(int argc, char **argv)
{
    const char *call = argc > 1 ? argv[1] : "epoll_wait";
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, out;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    long r;
    if (!strncmp(call, "sig", 3))
        sigprocmask(SIG_BLOCK, &usr1, NULL);
    else
        signal(SIGUSR1, on_usr1);
    int sem = semget(IPC_PRIVATE, 1, 0600);
    printf("ready\n");
    if (!strcmp(call, "epoll_wait")) {
        r = epoll_wait(ep, &out, 1, -1);
    } else if (!strcmp(call, "epoll_pwait")) {
        r = epoll_pwait(ep, &out, 1, -1, NULL);
    } else if (!strcmp(call, "epoll_pwait2")) {
        r = syscall(SYS_epoll_pwait2, ep, &out, 1, NULL, NULL, 8);
    } else if (!strcmp(call, "epoll_wait_timeout")) {
        r = epoll_wait(ep, &out, 1, 60000);
    } else if (!strcmp(call, "sigtimedwait")) {
        struct timespec ts = {60, 0};
        r = sigtimedwait(&usr1, NULL, &ts);
    } else if (!strcmp(call, "sigwaitinfo")) {
        r = sigwaitinfo(&usr1, NULL);
    } else if (!strcmp(call, "semop")) {
        struct sembuf op = {0, -1, 0};
        r = semop(sem, &op, 1);
    } else {
        printf("? %s\n", call);
        return 2;
    }
    int e = r < 0 ? errno : 0;
    semctl(sem, 0, IPC_RMID);
    printf("ret %ld %d\n", r, e);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) /* stay until stdin closes */
        ;
    return 0;
}
