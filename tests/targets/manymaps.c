/*
 * A target with many mappings, for the cost-per-mapping tests and the mapping-count table.
 *
 *   manymaps N     map N separate one-page read-write anonymous mappings (holes between them
 *                  keep the kernel from merging them), print their first address and the
 *                  stride, then read commands on stdin and answer one line each:
 *                  w STEP   write one byte into every STEP-th mapping ("ok")
 *                  m        map one more page and write it (the layout changes; "ok")
 *                  exit     exit
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint8_t *base = mmap(NULL, (size_t)n * 2 * PG, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 3;
    }
    for (long i = 0; i < n; i++) {
        base[(size_t)i * 2 * PG] = 1;
        if (munmap(base + (size_t)(i * 2 + 1) * PG, PG)) {
            perror("munmap");
            return 3;
        }
    }
    printf("%llu %d\n", (unsigned long long)(uintptr_t)base, 2 * PG);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16];
        long a = 0;
        if (sscanf(line, "%15s %ld", cmd, &a) < 1)
            continue;
        if (!strcmp(cmd, "w")) {
            for (long i = 0; i < n; i += a > 0 ? a : 1)
                base[(size_t)i * 2 * PG + 8] += 1;
            printf("ok\n");
        } else if (!strcmp(cmd, "m")) {
            uint8_t *p = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                              -1, 0);
            if (p == MAP_FAILED) {
                perror("mmap");
                return 3;
            }
            p[0] = 1;
            printf("ok\n");
        } else if (!strcmp(cmd, "exit")) {
            return 0;
        } else {
            printf("? %s\n", cmd);
        }
    }
    return 0;
}
