/* When kvmtagd cannot be reached or breaks the protocol, the program sees errnos, never dies.
 *
 * usage: vmm_errors MODE
 *   unreachable ERRNO  open("/dev/kvm") fails with ERRNO (e.g. ENOENT: no socket;
 *                      ECONNREFUSED: a socket file nobody listens on)
 *   broken             kvmtagd (a fake one) answers the first ioctl with a malformed frame:
 *                      EIO, then EIO on that fd from then on; a new open works
 *   handshake          kvmtagd (a fake one) breaks the protocol in the first connection's
 *                      handshake (e.g. a bad shared window): open fails with EIO, leaving no
 *                      descriptor behind; a new open works
 *   gone               the daemon is stopped while the fd is open: EIO
 */
#include "check.h"

static int errno_named(const char *name)
{
    return !strcmp(name, "ENOENT") ? ENOENT : !strcmp(name, "ECONNREFUSED") ? ECONNREFUSED
         : !strcmp(name, "ENAMETOOLONG") ? ENAMETOOLONG : -1;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    int kvm;

    test_start("vmm_errors");
    if (!strcmp(mode, "unreachable") && argc > 2) {
        int err = errno_named(argv[2]);
        errno = 0;
        kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        CHECK(kvm == -1 && errno == err, "open(\"/dev/kvm\") with no kvmtagd -> %s (got %d, %s)", argv[2],
              kvm, strerror(errno));
        kvm = open("/dev/null", O_RDWR);
        CHECK(kvm >= 0, "other paths still open");
    } else if (!strcmp(mode, "broken")) {
        kvm = open_kvm();
        CHECK_ERRNO(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), EIO, "a malformed answer is EIO");
        CHECK_ERRNO(ioctl(kvm, KVM_GET_API_VERSION, 0), EIO, "and the fd answers EIO from then on");
        int d = dup(kvm);
        CHECK_ERRNO(ioctl(d, KVM_GET_API_VERSION, 0), EIO, "so does its dup (the same open file)");
        CHECK_EQ(close(d), 0, "close the dup");
        CHECK_EQ(close(kvm), 0, "close the broken fd");
        kvm = open_kvm();
        CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "a new open is a new connection that works");
        CHECK_EQ(close(kvm), 0, "close it");
    } else if (!strcmp(mode, "handshake")) {
        int before = count_fds();
        errno = 0;
        kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        CHECK(kvm == -1 && errno == EIO, "open(\"/dev/kvm\") with a broken handshake -> EIO (got %d, %s)",
              kvm, strerror(errno));
        CHECK_EQ(count_fds(), before, "no descriptor left behind (the socket's, the window's)");
        kvm = open_kvm();
        CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "a new open is a new connection that works");
        CHECK_EQ(close(kvm), 0, "close it");
        CHECK_EQ(count_fds(), before, "and nothing is left open after it");
    } else if (!strcmp(mode, "gone")) {
        char line[16];
        kvm = open_kvm();
        CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "the daemon answers");
        printf("READY\n");
        fflush(stdout);
        CHECK(fgets(line, sizeof line, stdin) != NULL, "told the daemon is gone");
        CHECK_ERRNO(ioctl(kvm, KVM_GET_API_VERSION, 0), EIO, "an ioctl after the daemon is gone");
        CHECK_ERRNO(ioctl(kvm, KVM_GET_API_VERSION, 0), EIO, "and again");
        CHECK_EQ(close(kvm), 0, "close it");
    } else {
        fprintf(stderr, "usage: vmm_errors unreachable ERRNO | broken | handshake | gone\n");
        return 2;
    }
    printf("PASS vmm_errors %s\n", mode);
    return 0;
}
