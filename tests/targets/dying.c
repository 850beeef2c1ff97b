/* dying: a target whose exit tears down much memory while a monitor may be collecting.
 *
 * Maps PAGES (argv[1]) private anonymous pages and writes every one, prints "ready PID",
 * then waits for a line on stdin; after it, writes its first page once and exits 0.  Its
 * exit unmaps every page: a collect that overlaps that teardown must not report the pages
 * as written (only the first one was written since the line). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long pages = argc > 1 ? atol(argv[1]) : 16384;
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *buf = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return 1;
    /* Base pages: a write into a transparent huge page is reported as the whole huge page. */
    madvise(buf, pages * page, MADV_NOHUGEPAGE);
    for (long i = 0; i < pages; i++)
        buf[i * page] = 1;
    printf("ready %d %p\n", (int)getpid(), (void *)buf);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 2;
    buf[0] = 2;
    return 0;
}
