/* kvmtag's fds behave as KVM's: dup, dup2, dup3, fcntl(F_DUPFD, F_DUPFD_CLOEXEC) share the open
 * file, close-on-exec is per number, a VM lives while any fd refers to it, close releases the
 * number, and an fd number closed behind the shim's back and reused is the new file's. */
#include "check.h"

#include <sys/socket.h>


static void tag_vm(int vm, uint8_t *ram, unsigned seed, uint8_t *expect)
{
    CHECK_EQ(set_region(vm, 0, 0, GPA, 4 * PAGE, ram), 0, "slot 0");
    fill_tags(expect, 4 * TPP, seed);
    CHECK_EQ(copy_tags(vm, GPA, 4 * PAGE, expect, KVM_ARM_TAGS_TO_GUEST), 4 * PAGE, "TO_GUEST");
}

static int same_tags(int vm, const uint8_t *expect)
{
    uint8_t out[4 * TPP];
    memset(out, 0xee, sizeof out); /* see SENTINEL in check.h */
    return copy_tags(vm, GPA, 4 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST) == 4 * PAGE
        && !memcmp(out, expect, sizeof out);
}

int main(void)
{
    uint8_t tags[4 * TPP], other[4 * TPP];
    uint8_t *ram = memfd_ram(4 * PAGE, NULL);
    int kvm, vm, vm2, d, d2, d3, d4, d5, null_fd;

    test_start("vmm_fds: dup, dup2, dup3, fcntl, close, close-on-exec");
    kvm = open_kvm();
    vm = mte_vm(kvm);
    tag_vm(vm, ram, 1, tags);

    d = dup(vm);
    CHECK(d >= 0 && d != vm, "dup(vm) = %d", d);
    CHECK_EQ(cloexec_of(d), 0, "  dup's copy is not close-on-exec");
    CHECK(same_tags(d, tags), "  the dup reaches the same VM");
    d2 = fcntl(vm, F_DUPFD, 100);
    CHECK(d2 >= 100, "fcntl(vm, F_DUPFD, 100) = %d", d2);
    CHECK_EQ(cloexec_of(d2), 0, "  not close-on-exec");
    CHECK(same_tags(d2, tags), "  the same VM");
    d3 = fcntl(vm, F_DUPFD_CLOEXEC, 200);
    CHECK(d3 >= 200, "fcntl(vm, F_DUPFD_CLOEXEC, 200) = %d", d3);
    CHECK_EQ(cloexec_of(d3), 1, "  close-on-exec");
    CHECK(same_tags(d3, tags), "  the same VM");
    d4 = dup3(vm, 300, O_CLOEXEC);
    CHECK_EQ(d4, 300, "dup3(vm, 300, O_CLOEXEC)");
    CHECK_EQ(cloexec_of(d4), 1, "  close-on-exec");
    CHECK(same_tags(d4, tags), "  the same VM");
    d5 = dup2(kvm, 301);
    CHECK_EQ(d5, 301, "dup2(kvm, 301)");
    CHECK_EQ(ioctl(d5, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "  the system fd's dup serves KVM_GET_API_VERSION");
    CHECK_EQ(dup2(d5, d5), d5, "dup2(fd, fd) is fd");
    CHECK_EQ(ioctl(d5, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "  and it still works");
    CHECK_ERRNO(dup3(d5, d5, 0), EINVAL, "dup3(fd, fd) is EINVAL");
    CHECK_EQ(fcntl(vm, F_GETFL) & O_ACCMODE, O_RDWR, "F_GETFL says O_RDWR");
    CHECK_EQ(fcntl(d, F_SETFD, FD_CLOEXEC), 0, "F_SETFD(FD_CLOEXEC) on the dup");
    CHECK_EQ(cloexec_of(d), 1, "  the dup is close-on-exec now");
    CHECK_EQ(cloexec_of(vm), 1, "  and the VM fd still is (per number)");

    /* A VM lives while any fd refers to it. */
    CHECK_EQ(close(vm), 0, "close the original VM fd");
    CHECK_ERRNO(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), EBADF, "  the closed number is EBADF");
    CHECK(same_tags(d, tags), "  the VM lives on through its dup");
    CHECK_EQ(close(d), 0, "close the dup");
    CHECK_EQ(close(d2), 0, "close the F_DUPFD copy");
    CHECK_EQ(close(d3), 0, "close the F_DUPFD_CLOEXEC copy");
    CHECK(same_tags(d4, tags), "  the VM lives on through its last fd");

    /* dup2 onto an emulated fd replaces it; the VM it referred to lives through its other fds. */
    vm2 = mte_vm(kvm);
    tag_vm(vm2, ram, 2, other);
    CHECK(same_tags(d4, other), "a second VM over the same memfd sees its tags (tags belong to the memory)");
    tag_vm(d4, ram, 1, tags);
    d = dup(vm2);
    CHECK_EQ(dup2(d4, d), d, "dup2(first VM, a dup of the second VM)");
    CHECK(same_tags(d, tags), "  the number now reaches the first VM");
    CHECK_EQ(ioctl(vm2, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "  the second VM lives on through its own fd");
    null_fd = open("/dev/null", O_RDONLY);
    CHECK_EQ(dup2(null_fd, d), d, "dup2(/dev/null, that number)");
    CHECK_ERRNO(ioctl(d, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), ENOTTY, "  it is /dev/null now: the kernel's ENOTTY");
    CHECK_EQ(dup2(kvm, null_fd), null_fd, "dup2(the system fd, the /dev/null fd)");
    CHECK_EQ(ioctl(null_fd, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "  that number is a system fd now");
    CHECK_EQ(close(null_fd), 0, "close it");
    CHECK_EQ(close(d), 0, "close the /dev/null copy");

    /* An fd the shim never saw made: the VM fd sent to ourselves with SCM_RIGHTS. */
    {
        int sv[2], got = -1;
        char byte = 'x';
        union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } control;
        struct iovec iov = { &byte, 1 };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                              .msg_controllen = sizeof control.buf };
        struct cmsghdr *c;
        memset(&control, 0, sizeof control);
        c = CMSG_FIRSTHDR(&msg);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &vm2, sizeof(int));
        CHECK(sendmsg(sv[0], &msg, 0) == 1 && recvmsg(sv[1], &msg, MSG_CMSG_CLOEXEC) == 1,
              "the VM fd sent to ourselves with SCM_RIGHTS");
        memcpy(&got, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(int));
        CHECK(got >= 0 && got != vm2, "  received as fd %d", got);
        CHECK_EQ(ioctl(got, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "  it reaches the same VM (state per socket)");
        CHECK_EQ(close(got), 0, "  close it");
        CHECK_EQ(ioctl(vm2, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "  the VM lives on through its first fd");
        close(sv[0]);
        close(sv[1]);
    }

    /* An fd closed behind the shim's back (close_range is not interposed), its number reused.
     * (No raw syscall(): these programs see arm64's <asm/unistd.h>, not this host's.) */
    int raw = dup(vm2);
    CHECK(raw >= 0, "dup(vm2) = %d", raw);
    CHECK_EQ(close_range((unsigned)raw, (unsigned)raw, 0), 0, "close it with close_range (the shim does not see it)");
    int reused = open("/dev/null", O_RDONLY);
    CHECK_EQ(reused, raw, "the number is reused by open(\"/dev/null\")");
    CHECK_ERRNO(ioctl(reused, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), ENOTTY, "  and an ioctl on it goes to /dev/null");
    int again = dup(reused);
    CHECK_ERRNO(ioctl(again, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), ENOTTY, "  so does an ioctl on its dup");
    close(again);
    close(reused);
    CHECK_EQ(ioctl(vm2, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "the second VM is untouched");

    /* A program may make its fds non-blocking (KVM ignores O_NONBLOCK): calls still complete,
     * bulk ones included. */
    CHECK_EQ(fcntl(vm2, F_SETFL, O_NONBLOCK), 0, "F_SETFL(O_NONBLOCK) on the VM fd");
    CHECK_EQ(fcntl(vm2, F_GETFL) & O_NONBLOCK, O_NONBLOCK, "  F_GETFL shows it");
    {
        enum { BIG = 4096 }; /* 16 MiB of guest RAM: 1 MiB of tags, sent and received in pieces */
        uint8_t *big = memfd_ram((size_t)BIG * PAGE, NULL), *in = anon(BIG * TPP), *out = anon(BIG * TPP);
        CHECK_EQ(set_region(vm2, 1, 0, 0x40000000, (uint64_t)BIG * PAGE, big), 0, "  a 16 MiB memslot");
        fill_tags(in, BIG * TPP, 9);
        CHECK_EQ(copy_tags(vm2, 0x40000000, (uint64_t)BIG * PAGE, in, KVM_ARM_TAGS_TO_GUEST), BIG * PAGE,
                 "  TO_GUEST of 1 MiB of tags on the non-blocking fd");
        CHECK_EQ(copy_tags(vm2, 0x40000000, (uint64_t)BIG * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), BIG * PAGE,
                 "  FROM_GUEST");
        CHECK(!memcmp(in, out, BIG * TPP), "  the same tags");
        CHECK_EQ(set_region(vm2, 1, 0, 0x40000000, 0, big), 0, "  delete the slot");
        munmap(big, (size_t)BIG * PAGE);
        munmap(in, BIG * TPP);
        munmap(out, BIG * TPP);
    }
    CHECK_EQ(fcntl(vm2, F_SETFL, 0), 0, "back to blocking");

    /* Many opens and closes: numbers are reused like the kernel's. */
    int first = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    close(first);
    for (int i = 0; i < 200; i++) {
        int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (fd != first || ioctl(fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION || close(fd)) {
            CHECK(0, "open/close round %d: fd %d (expected %d)", i, fd, first);
        }
    }
    CHECK(1, "200 opens and closes of /dev/kvm, each getting the lowest free number (%d)", first);

    CHECK_EQ(close(vm2), 0, "close the second VM");
    CHECK_EQ(close(d4), 0, "close the first VM's last fd");
    CHECK_EQ(close(d5), 0, "close the system fd's dup");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    printf("PASS vmm_fds\n");
    return 0;
}
