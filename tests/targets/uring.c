/*
 * A target that reads a file with io_uring (raw system calls: no liburing needed), for the
 * tests of what the kernel lets pagewatch see of it.
 *
 *   uring FILE     set up a ring and two 16-page buffers, register the second one as a fixed
 *                  buffer (IORING_REGISTER_BUFFERS: pinned), print "A B" (their addresses) or
 *                  "no io_uring ERRNO", then read commands on stdin, one line answered each:
 *     read N       IORING_OP_READ of 16 pages of FILE at page N into buffer A ("ok RES")
 *     fixed N      IORING_OP_READ_FIXED of 16 pages at page N into fixed buffer B ("ok RES")
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PG 4096
#define NPAGES 16

static int ring_fd;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;

static int setup(void)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    ring_fd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (ring_fd < 0)
        return -1;
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    uint8_t *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       ring_fd, IORING_OFF_SQ_RING);
    uint8_t *cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       ring_fd, IORING_OFF_CQ_RING);
    sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED)
        return -1;
    sq_tail = (unsigned *)(sq + p.sq_off.tail);
    sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    sq_array = (unsigned *)(sq + p.sq_off.array);
    cq_head = (unsigned *)(cq + p.cq_off.head);
    cq_tail = (unsigned *)(cq + p.cq_off.tail);
    cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

static int submit_and_wait(uint8_t op, int fd, void *buf, unsigned len, uint64_t off)
{
    unsigned tail = *sq_tail, i = tail & *sq_mask;
    struct io_uring_sqe *sqe = &sqes[i];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = op;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->off = off;
    sqe->buf_index = 0;
    sq_array[i] = i;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring_fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
        return -errno;
    unsigned head = *cq_head;
    while (head == __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE))
        ;
    int res = cqes[head & *cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(argc > 1 ? argv[1] : "/proc/self/exe", O_RDONLY);
    uint8_t *a = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    uint8_t *b = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    memset(a, 0, NPAGES * PG);
    memset(b, 0, NPAGES * PG);
    struct iovec iov = {b, NPAGES * PG};
    if (fd < 0 || setup() < 0 ||
        syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
        printf("no io_uring %d\n", errno);
        return 0;
    }
    printf("%llu %llu\n", (unsigned long long)(uintptr_t)a, (unsigned long long)(uintptr_t)b);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16];
        long n = 0;
        if (sscanf(line, "%15s %ld", cmd, &n) < 1)
            continue;
        if (!strcmp(cmd, "read"))
            printf("ok %d\n", submit_and_wait(IORING_OP_READ, fd, a, NPAGES * PG, n * PG));
        else if (!strcmp(cmd, "fixed"))
            printf("ok %d\n", submit_and_wait(IORING_OP_READ_FIXED, fd, b, NPAGES * PG, n * PG));
        else
            printf("? %s\n", cmd);
    }
    return 0;
}
