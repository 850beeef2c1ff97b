/*
 * A target whose memory is written and then made read-only, as the dynamic loader's RELRO
 * and W^X JITs do.  Reads commands on stdin and answers one line each:
 *
 *   buf                 address of its 8-page read-write buffer (mapped before any attach)
 *   wprot PROT          write every page of the buffer, then mprotect it to PROT
 *   flip PAGE PROT      mprotect the buffer read-write, write PAGE, mprotect it to PROT
 *   anon N PROT         mmap N anonymous pages read-write, write each, mprotect to PROT;
 *                       prints the address
 *   file N PROT         the same with a private mapping of a file (its pages are copied on
 *                       write, as RELRO's are); prints the address
 *   remap PAGE          replace the buffer by new memory at the same address (munmap +
 *                       mmap MAP_FIXED, the same line in the maps), write PAGE of it
 *   part PAGE FROM      write PAGE of the buffer, then replace its pages from FROM on by
 *                       new memory (mmap MAP_FIXED over them: the buffer's VMA split)
 *   unmap FROM          unmap the buffer's pages from FROM on
 *
 * PROT: 0 none, 1 read, 5 read + exec.  The byte written is 100 of each page.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096
#define NBUF 8

static uint8_t counter;

static void *map(long n, int fd)
{
    void *p = mmap(NULL, (size_t)n * PG, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0), fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(3);
    }
    return p;
}

static void fill(uint8_t *p, long n)
{
    counter++;
    for (long i = 0; i < n; i++)
        p[(size_t)i * PG + 100] = counter;
}

static void protect(void *p, long n, int prot)
{
    if (mprotect(p, (size_t)n * PG, prot)) {
        perror("mprotect");
        exit(3);
    }
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint8_t *buf = map(NBUF, -1);
    fill(buf, NBUF);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16];
        long a = 0, b = 0;
        if (sscanf(line, "%15s %ld %ld", cmd, &a, &b) < 1)
            continue;
        if (!strcmp(cmd, "buf")) {
            printf("%llu\n", (unsigned long long)(uintptr_t)buf);
        } else if (!strcmp(cmd, "wprot")) {
            fill(buf, NBUF);
            protect(buf, NBUF, (int)a);
            printf("ok\n");
        } else if (!strcmp(cmd, "flip")) {
            protect(buf, NBUF, PROT_READ | PROT_WRITE);
            buf[(size_t)a * PG + 100] = ++counter;
            protect(buf, NBUF, (int)b);
            printf("ok\n");
        } else if (!strcmp(cmd, "remap")) {
            if (munmap(buf, NBUF * PG) ||
                mmap(buf, NBUF * PG, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != buf) {
                perror("remap");
                exit(3);
            }
            buf[(size_t)a * PG + 100] = ++counter;
            printf("ok\n");
        } else if (!strcmp(cmd, "part")) {
            /* page a written, then pages [b, NBUF) replaced by new memory: the mapping's
             * start is still the memory that was tracked */
            buf[(size_t)a * PG + 100] = ++counter;
            if (mmap(buf + (size_t)b * PG, (size_t)(NBUF - b) * PG, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != buf + (size_t)b * PG) {
                perror("part");
                exit(3);
            }
            printf("ok\n");
        } else if (!strcmp(cmd, "unmap")) {
            if (munmap(buf + (size_t)a * PG, (size_t)(NBUF - a) * PG)) {
                perror("unmap");
                exit(3);
            }
            printf("ok\n");
        } else if (!strcmp(cmd, "anon") || !strcmp(cmd, "file")) {
            int fd = -1;
            if (cmd[0] == 'f') {
                char path[] = "/tmp/pagewatch-wro-XXXXXX";
                fd = mkstemp(path);
                if (fd < 0 || unlink(path) || ftruncate(fd, a * PG)) {
                    perror("file");
                    exit(3);
                }
                for (long i = 0; i < a; i++)
                    if (pwrite(fd, "x", 1, i * PG) != 1)
                        exit(3);
            }
            uint8_t *p = map(a, fd);
            if (fd >= 0)
                close(fd);
            fill(p, a);
            protect(p, a, (int)b);
            printf("%llu\n", (unsigned long long)(uintptr_t)p);
        } else {
            printf("? %s\n", cmd);
        }
    }
    return 0;
}
