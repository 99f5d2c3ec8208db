/* Shared by the shim's C test programs: checks that print one line each and stop the program
 * at the first failure, and the few steps every VMM takes (open, VM, MTE, memslots, tags).
 *
 * The programs are written against the arm64 uapi headers (-I/usr/aarch64-linux-gnu/include)
 * exactly as a VMM would be, and know nothing of kvmtag: run under the shim they talk to
 * kvmtagd, and must get what an arm64 MTE host would give them. */
#ifndef KVMTAG_TEST_CHECK_H
#define KVMTAG_TEST_CHECK_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/kvm.h>

#define PAGE 4096                /* the default kvmtagd's page size (checked by vmm_basic) */
#define TPP (PAGE / 16)          /* tags per page, one per byte in the ioctl's format */
#define GPA 0x10000000ull        /* guest physical address of slot 0 */

/* SENTINEL: buffers the kernel (here the shim, with process_vm_writev on its own pid) writes
 * are filled with 0xee first. Besides catching a short write, this keeps valgrind quiet:
 * memcheck does not model process_vm_writev into the calling process itself, just as it does
 * not know that KVM_ARM_MTE_COPY_TAGS writes the buffer its struct points to on a real host. */

/* A check: "ok   what" on success, "FAIL what (...)" and exit(1) on failure. */
#define CHECK(cond, ...)                                                            \
    do {                                                                            \
        int errno_ = errno;                                                         \
        if (cond) {                                                                 \
            printf("ok   ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf("\n");                                                           \
        } else {                                                                    \
            printf("FAIL ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf("  [%s:%d; errno %d %s]\n", __FILE__, __LINE__, errno_,          \
                   strerror(errno_));                                               \
            fflush(stdout);                                                         \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

/* expr must give `expected`. */
#define CHECK_EQ(expr, expected, ...)                                               \
    do {                                                                            \
        long long got_ = (long long)(expr), want_ = (long long)(expected);          \
        int errno_ = errno;                                                         \
        if (got_ == want_) {                                                        \
            printf("ok   ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf(" = %lld\n", got_);                                              \
        } else {                                                                    \
            printf("FAIL ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf(": got %lld, expected %lld  [%s:%d; errno %d %s]\n", got_, want_, \
                   __FILE__, __LINE__, errno_, strerror(errno_));                   \
            fflush(stdout);                                                         \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

/* expr must fail with -1 and errno err. */
#define CHECK_ERRNO(expr, err, ...)                                                 \
    do {                                                                            \
        errno = 0;                                                                  \
        long long got_ = (long long)(expr);                                         \
        int errno_ = errno;                                                         \
        if (got_ == -1 && errno_ == (err)) {                                        \
            printf("ok   ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf(" -> %s\n", #err);                                               \
        } else {                                                                    \
            printf("FAIL ");                                                        \
            printf(__VA_ARGS__);                                                    \
            printf(": got %lld errno %d (%s), expected -1 %s  [%s:%d]\n", got_,     \
                   errno_, strerror(errno_), #err, __FILE__, __LINE__);             \
            fflush(stdout);                                                         \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

static inline void test_start(const char *name)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("# %s (pid %d)\n", name, (int)getpid());
}

static inline int is_socket(int fd)
{
    struct stat st;
    return !fstat(fd, &st) && S_ISSOCK(st.st_mode);
}

/* Open fds of this process (the listing's own excluded). */
static inline int count_fds(void)
{
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *entry;
    int n = 0;
    if (!dir)
        return -1;
    while ((entry = readdir(dir)))
        n += entry->d_name[0] != '.';
    closedir(dir);
    return n - 1;
}

static inline int cloexec_of(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    return flags < 0 ? -1 : !!(flags & FD_CLOEXEC);
}

/* --- what a VMM does -------------------------------------------------------------------------- */

static inline int open_kvm(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    CHECK(kvm >= 0, "open(\"/dev/kvm\") = %d", kvm);
    return kvm;
}

static inline int create_vm(int kvm)
{
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(vm >= 0, "KVM_CREATE_VM = %d", vm);
    return vm;
}

static inline int enable_mte(int vm)
{
    struct kvm_enable_cap cap = { .cap = KVM_CAP_ARM_MTE };
    return ioctl(vm, KVM_ENABLE_CAP, &cap);
}

static inline int mte_vm(int kvm)
{
    int vm = create_vm(kvm);
    CHECK_EQ(enable_mte(vm), 0, "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)");
    return vm;
}

/* Guest RAM: a memfd of `size` bytes mapped shared (its fd stays open, as a VMM keeps it). */
static inline void *memfd_ram(size_t size, int *fd_out)
{
    int fd = memfd_create("guest-ram", MFD_CLOEXEC);
    void *ram;
    CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0, "memfd of %zu bytes", size);
    ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(ram != MAP_FAILED, "mmap of the memfd");
    if (fd_out)
        *fd_out = fd;
    return ram;
}

static inline void *anon(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "anonymous mapping of %zu bytes", size);
    return p;
}

static inline int set_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                             const void *uaddr)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)uaddr,
    };
    return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r);
}

static inline int copy_tags(int vm, uint64_t gpa, uint64_t length, void *buf, uint64_t flags)
{
    struct kvm_arm_copy_mte_tags c = {
        .guest_ipa = gpa, .length = length, .addr = buf, .flags = flags,
    };
    return ioctl(vm, KVM_ARM_MTE_COPY_TAGS, &c);
}

/* n tags (0..15, one per byte), reproducible from seed. */
static inline void fill_tags(uint8_t *tags, size_t n, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 12345;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345;
        tags[i] = (uint8_t)((x >> 16) & 15);
    }
}

#endif
