/*
 * A process tree with known writes, for `pagewatch run --follow-forks`.
 *
 *   forker tree N   the parent maps NPAGES pages and leaves them untouched, then starts:
 *                     - N children by fork(2): child i writes the pages p with p % (i + 2) == 0
 *                       of the inherited mapping (a copy on write each) and exits 0;
 *                     - one by vfork(2) + execve(2) of `forker write 3` (its own memory);
 *                     - one by fork(2) that puts itself under a seccomp filter (allow all)
 *                       and forks a grandchild, which writes the pages p % 5 == 0 and exits;
 *                   waits for them all, writes the pages p % 7 == 3 itself and exits 5.
 *   forker write K  maps NPAGES pages, writes the pages p % K == 1 and exits 0.
 *   forker kids N R every process (the parent and N forked children) does R rounds of work
 *                   (a page write, a sum, a 0.2 ms sleep), then checks itself: the sum is
 *                   right, no signal is blocked, it holds no userfaultfd or pidfd; it prints
 *                   "ok PID" or "harmed PID: why".  The parent then waits for the children
 *                   and prints "done K" (K: the children that exited 0) and exits 3.  For the
 *                   kill tests: a tree that must run on unharmed when its monitor dies.
 *
 * Every process prints "ROLE PID ADDR" (one write(2), before it writes its pages): ROLE is
 * parent, child0..childN-1, exec, sandboxed or grandchild; ADDR the mapping it writes.
 */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NPAGES 64
#define PG 4096

static void say(const char *role, void *addr)
{
    char line[128];
    int n = snprintf(line, sizeof line, "%s %d %lu\n", role, (int)getpid(),
                     (unsigned long)(uintptr_t)addr);
    if (write(1, line, (size_t)n) != n)
        _exit(90);
}

static void write_pages(volatile uint8_t *buf, int mod, int rem)
{
    for (int p = 0; p < NPAGES; p++)
        if (p % mod == rem)
            buf[(size_t)p * PG + 100] = (uint8_t)(p + 1);
}

static uint8_t *map_pages(void)
{
    void *m = mmap(NULL, (size_t)NPAGES * PG, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        _exit(91);
    return m;
}

static void allow_all_filter(void)
{
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, allow};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        _exit(92);
}

/* R rounds of work, then the checks; prints one line. */
static void work_and_check(int rounds)
{
    volatile uint8_t *buf = map_pages();
    uint64_t sum = 0, want = 0;
    for (int r = 0; r < rounds; r++) {
        buf[(size_t)(r % NPAGES) * PG] = (uint8_t)r;
        sum += buf[(size_t)(r % NPAGES) * PG] + (uint64_t)r;
        want += (uint8_t)r + (uint64_t)r;
        struct timespec ts = {0, 200000};
        while (nanosleep(&ts, &ts) < 0)
            ;
    }
    char why[600] = "";
    if (sum != want)
        snprintf(why, sizeof why, "sum %llu, not %llu", (unsigned long long)sum,
                 (unsigned long long)want);
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    for (int sig = 1; sig < 65 && !why[0]; sig++)
        if (sigismember(&cur, sig) == 1)
            snprintf(why, sizeof why, "signal %d is blocked", sig);
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d && !why[0] && (e = readdir(d)) != NULL) {
        char path[300], target[256];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0)
            continue;
        target[n] = 0;
        if (strstr(target, "userfaultfd") || strstr(target, "pidfd"))
            snprintf(why, sizeof why, "it holds fd %s: %s", e->d_name, target);
    }
    if (d)
        closedir(d);
    char line[700];
    int n = why[0] ? snprintf(line, sizeof line, "harmed %d: %s\n", (int)getpid(), why)
                   : snprintf(line, sizeof line, "ok %d\n", (int)getpid());
    if (write(1, line, (size_t)n) != n)
        _exit(90);
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "kids")) {
        int n = atoi(argv[2]), rounds = atoi(argv[3]), good = 0, st;
        for (int i = 0; i < n; i++)
            if (fork() == 0) {
                work_and_check(rounds);
                _exit(0);
            }
        work_and_check(rounds);
        while (wait(&st) > 0)
            good += WIFEXITED(st) && WEXITSTATUS(st) == 0;
        printf("done %d\n", good);
        return 3;
    }
    if (argc == 3 && !strcmp(argv[1], "write")) {
        uint8_t *buf = map_pages();
        say("exec", buf);
        write_pages(buf, atoi(argv[2]), 1);
        return 0;
    }
    if (argc != 3 || strcmp(argv[1], "tree"))
        return 2;
    int n = atoi(argv[2]);
    uint8_t *buf = map_pages();
    say("parent", buf);
    for (int i = 0; i < n; i++) {
        pid_t c = fork();
        if (c < 0)
            return 93;
        if (c == 0) {
            char role[16];
            snprintf(role, sizeof role, "child%d", i);
            say(role, buf);
            write_pages(buf, i + 2, 0);
            _exit(0);
        }
    }
    char *args[] = {argv[0], "write", "3", NULL};
    pid_t v = vfork();
    if (v == 0) {
        execv("/proc/self/exe", args);
        _exit(94);
    }
    pid_t s = fork();
    if (s == 0) {
        say("sandboxed", buf);
        allow_all_filter();
        pid_t g = fork();
        if (g == 0) {
            say("grandchild", buf);
            write_pages(buf, 5, 0);
            _exit(0);
        }
        int st;
        waitpid(g, &st, 0);
        _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 95);
    }
    int st, bad = 0;
    while (wait(&st) > 0)
        bad |= !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    write_pages(buf, 7, 3);
    return bad ? 96 : 5;
}
