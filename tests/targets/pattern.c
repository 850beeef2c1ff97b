/*
 * A target process for the ProcessTracker tests.
 *
 *   pattern cmd            read commands on stdin, answer one line each (see below)
 *   pattern run ROUNDS [STEPS]
 *                          write a known pattern for ROUNDS rounds (two threads, kernel
 *                          writes, mmap/munmap churn, 1 ms sleeps), then print a checksum
 *                          that depends only on ROUNDS.  With STEPS, the rounds come in STEPS
 *                          parts, each started by one byte read from stdin (EOF: no more
 *                          waiting), so a test paces the work by events, not by the clock
 *
 * Commands: addr | w PAGE VALUE | same PAGE | kread PAGE | thread PAGE VALUE |
 * fork PAGE VALUE | mmap NPAGES | rw REGION PAGE VALUE | munmap | mprotect PAGE N | sleep MS |
 * spin N | mask | block SIG | exec | exit CODE.  The buffer has NPAGES pages; byte 100 of a page is the one written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NPAGES 256
#define PG 4096
#define AT(p) (buf + (size_t)(p) * PG + 100)

static volatile uint8_t *buf;
static uint8_t *regions[64];
static size_t region_pages[64];
static int nregions;

struct twrite { int page, value; };

static void *thread_write(void *arg)
{
    struct twrite *t = arg;
    *AT(t->page) = (uint8_t)t->value;
    return NULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Write through a pipe into the page: the kernel does the write (copy_to_user). */
static void kernel_write(int page, uint8_t value)
{
    int fds[2];
    uint8_t data[64];
    memset(data, value, sizeof data);
    if (pipe(fds) || write(fds[1], data, sizeof data) != sizeof data ||
        read(fds[0], (void *)(buf + (size_t)page * PG + 200), sizeof data) != sizeof data) {
        perror("kernel_write");
        exit(3);
    }
    close(fds[0]);
    close(fds[1]);
}

static void *mmap_pages(size_t n)
{
    void *p = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(3);
    }
    return p;
}

/* A register-heavy computation: a wrong register after an injection changes the result. */
static uint64_t spin(uint64_t n)
{
    uint64_t a = 1, b = 2, c = 3, d = 4, e = 5, f = 6, g = 7, h = 8;
    for (uint64_t i = 0; i < n; i++) {
        a += b ^ i; b += c * 3; c ^= d + i; d += e >> 1; e ^= f * 5;
        f += g ^ a; g += h + c; h ^= a + b;
    }
    return a ^ b ^ c ^ d ^ e ^ f ^ g ^ h;
}

struct runner { int rounds, id; };

static void *run_thread(void *arg)
{
    struct runner *r = arg;
    for (int round = 0; round < r->rounds; round++)
        for (int i = r->id; i < NPAGES; i += 8)
            if ((i * 7 + round) % 5 == 0)
                *AT(i) = (uint8_t)(round * 31 + i);
    return NULL;
}

static int run(int rounds, int steps)
{
    pthread_t th;
    struct runner other = {rounds, 1};
    pthread_create(&th, NULL, run_thread, &other);
    uint64_t churn = 0;
    int paced = steps > 0;
    for (int round = 0; round < rounds; round++) {
        if (paced && round % ((rounds + steps - 1) / steps) == 0) {
            char go;
            ssize_t n;
            do
                n = read(0, &go, 1);
            while (n < 0 && errno == EINTR);
            paced = n == 1; /* EOF or an error: run the rest at once */
        }
        for (int i = 0; i < NPAGES; i++) {
            if (i % 8 == 1)
                continue; /* the other thread's pages */
            if ((i * 3 + round) % 4 == 0)
                *AT(i) = (uint8_t)(round * 17 + i);
            else if ((i + round) % 9 == 0)
                *AT(i) = *AT(i); /* rewritten with the same content */
        }
        kernel_write((round * 13) % NPAGES, (uint8_t)round);
        if (round % 10 == 0) { /* mmap/munmap churn */
            uint8_t *p = mmap_pages(16);
            for (int k = 0; k < 16; k += 3)
                p[k * PG] = (uint8_t)(round + k);
            for (int k = 0; k < 16; k++)
                churn += p[k * PG];
            munmap(p, 16 * PG);
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    pthread_join(th, NULL);
    uint64_t sum = churn;
    for (size_t i = 0; i < (size_t)NPAGES * PG; i++)
        sum = sum * 1099511628211ULL + buf[i];
    printf("sum=%016llx\n", (unsigned long long)sum);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    buf = mmap_pages(NPAGES);
    if (argc > 2 && !strcmp(argv[1], "run"))
        return run(atoi(argv[2]), argc > 3 ? atoi(argv[3]) : 0);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32];
        long a = 0, b = 0;
        if (sscanf(line, "%31s %ld %ld", cmd, &a, &b) < 1)
            continue;
        if (!strcmp(cmd, "addr")) {
            printf("%llu %d\n", (unsigned long long)(uintptr_t)buf, NPAGES);
        } else if (!strcmp(cmd, "w")) {
            *AT(a) = (uint8_t)b;
            printf("ok\n");
        } else if (!strcmp(cmd, "same")) {
            *AT(a) = *AT(a);
            printf("ok\n");
        } else if (!strcmp(cmd, "kread")) {
            kernel_write((int)a, 0x5a);
            printf("ok\n");
        } else if (!strcmp(cmd, "thread")) {
            pthread_t th;
            struct twrite t = {(int)a, (int)b};
            pthread_create(&th, NULL, thread_write, &t);
            pthread_join(th, NULL);
            printf("ok\n");
        } else if (!strcmp(cmd, "fork")) {
            pid_t pid = fork();
            if (pid == 0) {
                *AT(a) = (uint8_t)b;
                _exit(*AT(a) == (uint8_t)b ? 0 : 1);
            }
            int st;
            waitpid(pid, &st, 0);
            printf("ok %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        } else if (!strcmp(cmd, "mmap")) {
            uint8_t *p = mmap_pages((size_t)a);
            for (long k = 0; k < a; k += 2)
                p[k * PG + 100] = 1;
            regions[nregions] = p;
            region_pages[nregions++] = (size_t)a;
            printf("%llu\n", (unsigned long long)(uintptr_t)p);
        } else if (!strcmp(cmd, "rw")) {
            long v = 0;
            sscanf(line, "%*s %ld %ld %ld", &a, &b, &v);
            regions[a][b * PG + 100] = (uint8_t)v;
            printf("ok\n");
        } else if (!strcmp(cmd, "exec")) {
            execlp("cat", "cat", (char *)NULL); /* waits on stdin: ends when the test does */
            printf("exec failed\n");
        } else if (!strcmp(cmd, "munmap")) {
            nregions--;
            munmap(regions[nregions], region_pages[nregions] * PG);
            printf("ok\n");
        } else if (!strcmp(cmd, "mprotect")) {
            int r = mprotect((void *)(buf + (size_t)a * PG), (size_t)b * PG, PROT_READ);
            printf("ok %d\n", r);
        } else if (!strcmp(cmd, "sleep")) {
            struct timespec ts = {a / 1000, (a % 1000) * 1000000L};
            double t0 = now();
            int r = nanosleep(&ts, NULL);
            printf("slept %d %d %.6f\n", r, r ? errno : 0, now() - t0);
        } else if (!strcmp(cmd, "spin")) {
            printf("%llu\n", (unsigned long long)spin((uint64_t)a));
        } else if (!strcmp(cmd, "mask")) {
            sigset_t s;
            sigprocmask(SIG_BLOCK, NULL, &s);
            unsigned long long bits = 0;
            for (int sig = 1; sig < 64; sig++)
                if (sigismember(&s, sig))
                    bits |= 1ULL << (sig - 1);
            printf("%llx\n", bits);
        } else if (!strcmp(cmd, "block")) {
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, (int)a);
            sigprocmask(SIG_BLOCK, &s, NULL);
            printf("ok\n");
        } else if (!strcmp(cmd, "exit")) {
            return (int)a;
        } else {
            printf("? %s\n", cmd);
        }
    }
    return 0;
}
