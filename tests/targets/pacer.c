/* A target that writes a known number of pages per second, paced by its own clock.
 *
 *   pacer RATE PAGES [REPORT_MS]
 *
 * Maps PAGES pages (touched once before "ready"), then writes one 8-byte value never
 * written before into page (n % PAGES), n = 0, 1, 2, ..., so that by t seconds after the start
 * n = RATE * t pages were written (RATE 0: as fast as it can).  Every REPORT_MS (100) it
 * prints "n N T": pages written so far and CLOCK_MONOTONIC in nanoseconds, its own counters.
 * If it falls behind by half the buffer (starved of CPU), it starts pacing again from where
 * it is, rather than writing a burst that would write pages twice between two collects.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: pacer RATE PAGES [REPORT_MS]\n");
        return 2;
    }
    double rate = atof(argv[1]);
    uint64_t pages = strtoull(argv[2], NULL, 10);
    uint64_t report_ns = (argc > 3 ? strtoull(argv[3], NULL, 10) : 100) * 1000000ull;
    long psz = sysconf(_SC_PAGESIZE);
    char *buf = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (uint64_t i = 0; i < pages; i++)
        buf[i * psz] = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());

    uint64_t n = 0, base_n = 0, t0 = now_ns(), next_report = t0;
    struct timespec nap = {0, 1000000};
    for (;;) {
        uint64_t t = now_ns();
        uint64_t due = rate > 0 ? base_n + (uint64_t)((double)(t - t0) * rate / 1e9) : n + 256;
        if (due > n + pages / 2) { /* starved: pace again from here */
            base_n = n;
            t0 = t;
            due = n;
        }
        while (n < due) {
            *(volatile uint64_t *)(buf + (n % pages) * psz + 8) = n + 1;
            n++;
        }
        if (t >= next_report) {
            printf("n %llu %llu\n", (unsigned long long)n, (unsigned long long)now_ns());
            next_report = t + report_ns;
        }
        if (rate > 0)
            nanosleep(&nap, NULL);
    }
}
