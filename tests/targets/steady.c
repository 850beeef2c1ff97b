/* steady: a target that must come through any death of its monitor unharmed.
 *
 * Blocks SIGUSR2 and SIGWINCH (a known, non-empty SigBlk), prints "ready PID", then loops:
 * writes every page of a buffer, adds to a checksum, sleeps 200 us in nanosleep (a syscall
 * for an attach to interrupt) and polls stdin.  On a line there it checks the buffer and the
 * checksum against a recomputation, prints "ok ROUNDS>0" (or "BAD ...") and exits 3.  A
 * resume with foreign registers or signal mask shows as a crash, a wrong checksum or a
 * changed SigBlk. */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 64

int main(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGWINCH);
    sigprocmask(SIG_BLOCK, &set, NULL);
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *buf = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return 1;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    unsigned long rounds = 0, sum = 0;
    for (;;) {
        for (int i = 0; i < PAGES; i++)
            buf[i * page] = (unsigned char)(rounds + i);
        sum += rounds * 2654435761u + (sum >> 7);
        rounds++;
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
        struct pollfd p = {0, POLLIN, 0};
        if (poll(&p, 1, 0) > 0)
            break;
    }
    unsigned long want = 0;
    for (unsigned long r = 0; r < rounds; r++)
        want += r * 2654435761u + (want >> 7);
    int bad = 0;
    for (int i = 0; i < PAGES; i++)
        bad += buf[i * page] != (unsigned char)(rounds - 1 + i);
    sigset_t now;
    sigprocmask(SIG_BLOCK, NULL, &now);
    int mask_ok = sigismember(&now, SIGUSR2) && sigismember(&now, SIGWINCH) &&
                  !sigismember(&now, SIGTERM);
    if (want == sum && !bad && mask_ok)
        printf("ok %d\n", rounds > 0);
    else
        printf("BAD sum %d pages %d mask %d\n", want == sum, bad, mask_ok);
    return 3;
}
