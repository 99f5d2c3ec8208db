/* Calls on fds that are not kvmtag's, N rounds of them, printing nothing: under the shim they
 * must behave as without it, and allocate nothing (tests/test_preload.py counts the heap
 * allocations valgrind sees for two values of N: they must be equal).
 *
 * usage: passthrough N */
#include "check.h"

#include <termios.h>

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    struct termios term;
    char buf[64];

    for (int i = 0; i < rounds; i++) {
        int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
        int d, e, m, g;
        void *p;

        if (fd < 0 || ioctl(fd, TCGETS, &term) != -1 || errno != ENOTTY)
            return 1;
        d = dup(fd);
        if (d < 0 || dup2(fd, d) != d || dup3(fd, d, O_CLOEXEC) != d)
            return 2;
        e = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (e < 0 || fcntl(e, F_GETFD) != FD_CLOEXEC || close(e) || close(d))
            return 3;
        m = memfd_create("passthrough", MFD_CLOEXEC);
        if (m < 0 || ftruncate(m, 4096))
            return 4;
        p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
        if (p == MAP_FAILED || munmap(p, 4096) || close(m))
            return 5;
        g = openat(AT_FDCWD, "/proc/self/stat", O_RDONLY | O_CLOEXEC);
        if (g < 0 || read(g, buf, sizeof buf) <= 0 || close(g))
            return 6;
        if (close(fd) || close(fd) != -1 || errno != EBADF)
            return 7;
    }
    return 0;
}
