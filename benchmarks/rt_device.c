/* rt_device: the round-trip ceiling's device side (see benchmarks/rt_plugin.py).
 *
 * The smallest out-of-process "device" a Python plugin can talk to: no virtio, no qemu.
 * Shared memory holds NSLOTS request slots and NSLOTS data buffers; the plugin fills a slot,
 * writes the kick eventfd; this process (one thread, an epoll loop like qemu-storage-daemon's
 * main loop) serves every submitted slot with pread/pwrite on the image and writes the slot's
 * own call eventfd.  One cross-process round trip per request, two sleeps, two wake-ups.
 *
 *   rt_device SHM_FD IMAGE_FD KICK_FD CALL_FD0 ... CALL_FD{NSLOTS-1}   (fds inherited)
 *
 * Exits when the kick eventfd reports an error/hang-up or the parent dies (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#define NSLOTS 64
#define BUF_SIZE (1 << 20)

/* One slot: written by the plugin (op, offset, length, state=SUBMITTED), then by us. */
struct slot {
    volatile uint32_t state;     /* 0 free, 1 submitted, 2 done */
    uint32_t op;                 /* 0 read, 1 write, 2 flush */
    uint64_t offset;
    uint32_t length;
    int32_t result;              /* 0 or -errno */
};

#define SLOTS_BYTES 4096
#define SHM_SIZE (SLOTS_BYTES + (size_t)NSLOTS * BUF_SIZE)

int main(int argc, char **argv)
{
    if (argc != 4 + NSLOTS) {
        fprintf(stderr, "usage: rt_device SHM_FD IMAGE_FD KICK_FD CALL_FD x %d\n", NSLOTS);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    int shm_fd = atoi(argv[1]), img_fd = atoi(argv[2]), kick_fd = atoi(argv[3]);
    int call_fd[NSLOTS];
    for (int i = 0; i < NSLOTS; i++)
        call_fd[i] = atoi(argv[4 + i]);
    char *shm = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    if (shm == MAP_FAILED) {
        perror("rt_device: mmap");
        return 1;
    }
    struct slot *slots = (struct slot *)shm;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = kick_fd };
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, kick_fd, &ev) < 0) {
        perror("rt_device: epoll");
        return 1;
    }
    const uint64_t one = 1;
    for (;;) {
        struct epoll_event got;
        int n = epoll_wait(ep, &got, 1, -1);
        if (n < 0)
            continue;
        if (got.events & (EPOLLERR | EPOLLHUP))
            return 0;
        uint64_t count;
        if (read(kick_fd, &count, sizeof count) != sizeof count)
            continue;
        /* Serve everything submitted, again until a pass finds nothing new. */
        int served;
        do {
            served = 0;
            for (int i = 0; i < NSLOTS; i++) {
                struct slot *s = &slots[i];
                if (s->state != 1)
                    continue;
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                char *buf = shm + SLOTS_BYTES + (size_t)i * BUF_SIZE;
                ssize_t r = 0;
                uint32_t len = s->length > BUF_SIZE ? BUF_SIZE : s->length;
                if (s->op == 0)
                    r = pread(img_fd, buf, len, (off_t)s->offset);
                else if (s->op == 1)
                    r = pwrite(img_fd, buf, len, (off_t)s->offset);
                else
                    r = fdatasync(img_fd);
                s->result = r < 0 ? -1 : 0;
                __atomic_thread_fence(__ATOMIC_RELEASE);
                s->state = 2;
                if (write(call_fd[i], &one, sizeof one) != sizeof one)
                    return 0;
                served++;
            }
        } while (served);
    }
}
