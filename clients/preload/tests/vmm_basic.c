/* What a VMM does with /dev/kvm on an arm64 MTE host, and the errnos it must see
 * (shared/KVM-SEMANTICS.md): the system fd, a VM with MTE, memslots of several kinds of memory,
 * tags written and read back, and each documented failure.
 *
 * usage: vmm_basic [DISK_DIR]   (a directory on a disk filesystem; default /var/tmp) */
#include "check.h"

#include <sys/vfs.h>

#include <sys/utsname.h>

#define KERNEL_ADDRESS 0xfffffffffffff000ull /* the top page: access_ok() refuses it */

/* The fortify entry points, called directly (a _FORTIFY_SOURCE build calls them for open
 * without a constant mode). */
extern int __open_2(const char *, int);
extern int __open64_2(const char *, int);
extern int __openat_2(int, const char *, int);
extern int __openat64_2(int, const char *, int);

static void system_fd(int kvm)
{
    CHECK(is_socket(kvm), "the /dev/kvm fd is kvmtagd's socket (the shim is in place)");
    CHECK_EQ(cloexec_of(kvm), 1, "O_CLOEXEC gives FD_CLOEXEC");
    CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "KVM_GET_API_VERSION");
    CHECK_ERRNO(ioctl(kvm, KVM_GET_API_VERSION, 1), EINVAL, "KVM_GET_API_VERSION with an argument");
    CHECK_EQ(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "CHECK_EXTENSION(KVM_CAP_ARM_MTE)");
    CHECK_EQ(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY), 1, "CHECK_EXTENSION(KVM_CAP_USER_MEMORY)");
    CHECK_EQ(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), 3,
             "CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)");
    CHECK_EQ(ioctl(kvm, KVM_CHECK_EXTENSION, 100000), 0, "CHECK_EXTENSION of an unknown capability");
    CHECK_EQ(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), 2 * PAGE, "KVM_GET_VCPU_MMAP_SIZE (2 pages of 4 KiB)");
    CHECK_ERRNO(ioctl(kvm, _IO(KVMIO, 0xff), 0), EINVAL, "an unknown ioctl on the system fd");
    CHECK_ERRNO(ioctl(kvm, KVM_ARM_MTE_COPY_TAGS, NULL), EINVAL, "a VM ioctl on the system fd");
    CHECK_ERRNO(ioctl(kvm, KVM_CREATE_VM, 0x100), EINVAL, "KVM_CREATE_VM with unknown type bits");
    CHECK_ERRNO(ioctl(kvm, KVM_CREATE_VM, 20), EINVAL, "KVM_CREATE_VM with a 20-bit IPA space");
    CHECK_ERRNO(ioctl(kvm, KVM_CREATE_VM, 52), EINVAL, "KVM_CREATE_VM beyond the host's IPA limit");
}

static void enable_cap(int vm)
{
    struct kvm_enable_cap cap = { .cap = KVM_CAP_ARM_MTE, .flags = 1 };
    CHECK(is_socket(vm), "the VM fd is a socket");
    CHECK_EQ(cloexec_of(vm), 1, "the VM fd is close-on-exec, as KVM's");
    CHECK_EQ(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "CHECK_EXTENSION on the VM fd");
    CHECK_ERRNO(ioctl(vm, KVM_ENABLE_CAP, &cap), EINVAL, "ENABLE_CAP(MTE) with flags 1");
    CHECK_ERRNO(ioctl(vm, KVM_ENABLE_CAP, NULL), EFAULT, "ENABLE_CAP with a NULL struct");
    CHECK_ERRNO(ioctl(vm, _IO(KVMIO, 0xfe), 0), EINVAL, "an unknown ioctl on the VM fd");
    CHECK_EQ(enable_mte(vm), 0, "ENABLE_CAP(KVM_CAP_ARM_MTE)");
    CHECK_EQ(enable_mte(vm), 0, "ENABLE_CAP(KVM_CAP_ARM_MTE) again, before any vCPU");
}

static void copy_struct_errors(int vm)
{
    uint8_t tags[4 * TPP];
    struct kvm_arm_copy_mte_tags c;
    const struct { uint64_t ipa, length, flags, reserved0, reserved1; int err; const char *what; } bad[] = {
        { GPA, 100, 0, 0, 0, EINVAL, "a length that is not a multiple of the page size" },
        { GPA + 16, PAGE, 0, 0, 0, EINVAL, "a guest_ipa that is not page aligned" },
        { GPA, PAGE, 0, 1, 0, EINVAL, "reserved[0] set" },
        { GPA, PAGE, 1, 0, 7, EINVAL, "reserved[1] set" },
        { GPA, PAGE, 2, 0, 0, EINVAL, "an unknown flag" },
        { GPA, 0x80000000ull, 1, 0, 0, EINVAL, "a length above INT_MAX" },
        { 0x40000000ull, PAGE, 1, 0, 0, EFAULT, "a guest range with no memslot (a hole)" },
        { 0x40000000ull, PAGE, 0, 0, 0, EFAULT, "TO_GUEST into a hole" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c = (struct kvm_arm_copy_mte_tags){
            .guest_ipa = bad[i].ipa, .length = bad[i].length, .addr = tags, .flags = bad[i].flags,
            .reserved = { bad[i].reserved0, bad[i].reserved1 },
        };
        errno = 0;
        int r = ioctl(vm, KVM_ARM_MTE_COPY_TAGS, &c);
        CHECK(r == -1 && errno == bad[i].err, "COPY_TAGS with %s -> %s", bad[i].what,
              strerror(bad[i].err));
    }
    CHECK_EQ(copy_tags(vm, GPA, 0, tags, KVM_ARM_TAGS_FROM_GUEST), 0, "COPY_TAGS of length 0");
}

static void bad_pointers(int vm)
{
    uint8_t *edge = anon(2 * PAGE); /* a readable page, then an inaccessible one */
    struct kvm_arm_copy_mte_tags good = { .guest_ipa = GPA, .length = PAGE, .flags = 1 };
    uint8_t *straddling = edge + PAGE - sizeof good + 8; /* its last 8 bytes fault */

    CHECK(mprotect(edge + PAGE, PAGE, PROT_NONE) == 0, "mprotect(PROT_NONE)");
    good.addr = edge;
    memcpy(straddling, &good, sizeof good - 8);
    CHECK_ERRNO(ioctl(vm, KVM_ARM_MTE_COPY_TAGS, NULL), EFAULT, "COPY_TAGS with a NULL struct pointer");
    CHECK_ERRNO(ioctl(vm, KVM_ARM_MTE_COPY_TAGS, edge + PAGE), EFAULT, "COPY_TAGS with the struct on a PROT_NONE page");
    CHECK_ERRNO(ioctl(vm, KVM_ARM_MTE_COPY_TAGS, straddling), EFAULT, "COPY_TAGS with a struct straddling into PROT_NONE");
    CHECK_ERRNO(ioctl(vm, KVM_ARM_MTE_COPY_TAGS, (void *)(uintptr_t)KERNEL_ADDRESS), EFAULT,
                "COPY_TAGS with the struct at a kernel address");
    CHECK_ERRNO(ioctl(vm, KVM_SET_USER_MEMORY_REGION, edge + PAGE), EFAULT, "SET_USER_MEMORY_REGION with a bad struct pointer");
    CHECK_ERRNO(copy_tags(vm, GPA, 4 * PAGE, NULL, KVM_ARM_TAGS_TO_GUEST), EFAULT, "TO_GUEST from a NULL tag buffer");
    CHECK_ERRNO(copy_tags(vm, GPA, 4 * PAGE, edge + PAGE, KVM_ARM_TAGS_FROM_GUEST), EFAULT,
                "FROM_GUEST into a PROT_NONE tag buffer");
    CHECK_ERRNO(copy_tags(vm, GPA, PAGE, (void *)(uintptr_t)KERNEL_ADDRESS, KVM_ARM_TAGS_FROM_GUEST), EFAULT,
                "FROM_GUEST into a kernel address");
    munmap(edge, 2 * PAGE);
}

static void tags_round_trip(int vm)
{
    uint8_t *in = anon(8 * TPP), *out = anon(8 * TPP), *edge, *start;

    fill_tags(in, 8 * TPP, 1);
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, in, KVM_ARM_TAGS_TO_GUEST), 8 * PAGE, "TO_GUEST of 8 pages");
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "FROM_GUEST of 8 pages");
    CHECK(!memcmp(in, out, 8 * TPP), "FROM_GUEST reads back the tags TO_GUEST wrote");
    memset(out, 0xee, 8 * TPP);
    CHECK_EQ(copy_tags(vm, GPA + 6 * PAGE, 4 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 2 * PAGE,
             "FROM_GUEST across the slot's end: the pages before the hole");
    CHECK(!memcmp(out, in + 6 * TPP, 2 * TPP), "  and they hold the slot's last two pages of tags");
    CHECK(out[2 * TPP] == 0xee, "  and nothing is written past them");

    /* The tag buffer faults after 2.5 pages: 2 pages are done, the third cleared (6.2+). */
    edge = anon(2 * PAGE);
    CHECK(mprotect(edge + PAGE, PAGE, PROT_NONE) == 0, "mprotect(PROT_NONE)");
    start = edge + PAGE - 5 * TPP / 2;
    fill_tags(start, 5 * TPP / 2, 2);
    CHECK_EQ(copy_tags(vm, GPA, 4 * PAGE, start, KVM_ARM_TAGS_TO_GUEST), 2 * PAGE,
             "TO_GUEST from a buffer that faults in its third page: partial");
    CHECK_EQ(copy_tags(vm, GPA, 4 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 4 * PAGE, "FROM_GUEST");
    CHECK(!memcmp(out, start, 2 * TPP), "  pages 0-1 took the new tags");
    uint8_t zero[TPP] = { 0 };
    CHECK(!memcmp(out + 2 * TPP, zero, TPP), "  page 2, where the buffer faulted, is cleared");
    CHECK(!memcmp(out + 3 * TPP, in + 3 * TPP, TPP), "  page 3 kept its tags");
    CHECK_EQ(copy_tags(vm, GPA + 4 * PAGE, 4 * PAGE, start, KVM_ARM_TAGS_FROM_GUEST), 2 * PAGE,
             "FROM_GUEST into a buffer that faults in its third page: partial");
    CHECK(!memcmp(start, in + 4 * TPP, 2 * TPP), "  and the two pages written are right");

    /* A read-only buffer is fine to read tags from, not to write them to. */
    CHECK(mprotect(in, 8 * TPP, PROT_READ) == 0, "mprotect(PROT_READ) of the tag buffer");
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, in, KVM_ARM_TAGS_TO_GUEST), 8 * PAGE, "TO_GUEST from a read-only buffer");
    CHECK_ERRNO(copy_tags(vm, GPA, 8 * PAGE, in, KVM_ARM_TAGS_FROM_GUEST), EFAULT, "FROM_GUEST into a read-only buffer");
    munmap(edge, 2 * PAGE);
    munmap(in, 8 * TPP);
    munmap(out, 8 * TPP);
}

static void memslots(int vm, uint8_t *ram, int ram_fd)
{
    uint8_t *in = anon(16 * TPP), *out = anon(16 * TPP);
    uint8_t *alias, *priv = anon(4 * PAGE);

    CHECK_ERRNO(set_region(vm, 1, 0, GPA + 1, PAGE, ram), EINVAL, "a memslot at an unaligned guest address");
    CHECK_ERRNO(set_region(vm, 1, 0, GPA + 4 * PAGE, 8 * PAGE, ram), EEXIST, "a memslot overlapping slot 0");
    CHECK_ERRNO(set_region(vm, 1, 4, GPA + 64 * PAGE, PAGE, ram), EINVAL, "a memslot with an unknown flag");
    CHECK_ERRNO(set_region(vm, 9, 0, GPA, 0, ram), EINVAL, "deleting a memslot that does not exist");
    /* Slot 1 right after slot 0: private anonymous memory, tags-only. */
    CHECK_EQ(set_region(vm, 1, 0, GPA + 8 * PAGE, 4 * PAGE, priv), 0, "slot 1: private anonymous memory after slot 0");
    fill_tags(in, 12 * TPP, 3);
    CHECK_EQ(copy_tags(vm, GPA, 12 * PAGE, in, KVM_ARM_TAGS_TO_GUEST), 12 * PAGE, "TO_GUEST across slots 0 and 1");
    CHECK_EQ(copy_tags(vm, GPA, 12 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 12 * PAGE, "FROM_GUEST across slots 0 and 1");
    CHECK(!memcmp(in, out, 12 * TPP), "  the same tags");
    /* The same memfd mapped again, as slot 2: tags belong to the memory. */
    alias = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    CHECK(alias != MAP_FAILED, "a second mapping of the guest memfd");
    CHECK_EQ(set_region(vm, 2, 0, 0x20000000, 8 * PAGE, alias), 0, "slot 2 over the second mapping");
    CHECK_EQ(copy_tags(vm, 0x20000000, 8 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "FROM_GUEST of slot 2");
    CHECK(!memcmp(in, out, 8 * TPP), "  slot 2 sees slot 0's tags: one memfd, one set of tags");
    CHECK_EQ(set_region(vm, 2, 0, 0x20000000, 0, alias), 0, "deleting slot 2");
    CHECK_EQ(set_region(vm, 2, 0, 0x20000000, 8 * PAGE, alias), 0, "slot 2 again");
    CHECK_EQ(copy_tags(vm, 0x20000000, 8 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "FROM_GUEST of slot 2");
    CHECK(!memcmp(in, out, 8 * TPP), "  the tags survived deleting and re-adding the slot");
    CHECK_EQ(set_region(vm, 2, 0, 0x20000000, 0, alias), 0, "deleting slot 2");
    munmap(alias, 8 * PAGE);
    munmap(in, 16 * TPP);
    munmap(out, 16 * TPP);
}

static void dirty_logging(int vm, uint8_t *ram)
{
    uint8_t *tags = anon(8 * TPP);
    uint64_t bitmap[1] = { ~0ull };
    struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = bitmap };
    struct kvm_dirty_log missing = { .slot = 5, .dirty_bitmap = bitmap };

    fill_tags(tags, 8 * TPP, 4);
    CHECK_ERRNO(ioctl(vm, KVM_GET_DIRTY_LOG, &log), ENOENT, "GET_DIRTY_LOG of a slot that does not log");
    CHECK_EQ(set_region(vm, 0, KVM_MEM_LOG_DIRTY_PAGES, GPA, 8 * PAGE, ram), 0, "dirty logging on for slot 0");
    CHECK_ERRNO(copy_tags(vm, GPA, 8 * PAGE, tags, KVM_ARM_TAGS_TO_GUEST), EBUSY, "TO_GUEST while dirty logging");
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, tags, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "FROM_GUEST while dirty logging");
    CHECK_EQ(ioctl(vm, KVM_GET_DIRTY_LOG, &log), 0, "GET_DIRTY_LOG of slot 0");
    CHECK(bitmap[0] == 0, "  tag copies mark nothing dirty (bitmap %#llx)", (unsigned long long)bitmap[0]);
    CHECK_ERRNO(ioctl(vm, KVM_GET_DIRTY_LOG, &missing), ENOENT, "GET_DIRTY_LOG of a missing slot");
    log.dirty_bitmap = (void *)(uintptr_t)KERNEL_ADDRESS;
    CHECK_ERRNO(ioctl(vm, KVM_GET_DIRTY_LOG, &log), EFAULT, "GET_DIRTY_LOG into a kernel address");
    CHECK_EQ(set_region(vm, 0, 0, GPA, 8 * PAGE, ram), 0, "dirty logging off");
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, tags, KVM_ARM_TAGS_TO_GUEST), 8 * PAGE, "TO_GUEST after logging stops");
    munmap(tags, 8 * TPP);
}

static int on_tmpfs(int fd)
{
    struct statfs sfs;
    return !fstatfs(fd, &sfs) && (sfs.f_type == 0x01021994 || sfs.f_type == 0x958458f6);
}

static void memory_kinds(int kvm, const char *disk_dir)
{
    static const struct { const char *name; int refused; } kinds[] = {
        { "memfd shared", 0 }, { "memfd private", 0 }, { "anonymous private", 0 },
        { "anonymous shared", 0 }, { "tmpfs file (/dev/shm) shared", 0 },
        { "disk file shared", 1 }, { "disk file private", 1 },
    };
    uint8_t *in = anon(4 * TPP), *out = anon(4 * TPP);

    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        int vm = mte_vm(kvm), fd = -1, flags = MAP_SHARED;
        void *ram;

        switch (i) {
        case 0: case 1:
            fd = memfd_create("guest", MFD_CLOEXEC);
            flags = i == 0 ? MAP_SHARED : MAP_PRIVATE;
            break;
        case 2: case 3:
            flags = (i == 2 ? MAP_PRIVATE : MAP_SHARED) | MAP_ANONYMOUS;
            break;
        case 4:
            fd = open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
            break;
        default:
            fd = open(disk_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
            flags = i == 5 ? MAP_SHARED : MAP_PRIVATE;
        }
        CHECK(!(flags & MAP_ANONYMOUS) ? fd >= 0 && ftruncate(fd, 4 * PAGE) == 0 : 1,
              "backing file for %s", kinds[i].name);
        if (kinds[i].refused && on_tmpfs(fd)) {
            printf("skip %s: %s is not on a disk filesystem here\n", kinds[i].name, disk_dir);
            close(fd);
            close(vm);
            continue;
        }
        ram = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, flags, fd, 0);
        CHECK(ram != MAP_FAILED, "mmap %s", kinds[i].name);
        if (kinds[i].refused) {
            CHECK_ERRNO(set_region(vm, 0, 0, GPA, 4 * PAGE, ram), EINVAL, "an MTE memslot of a %s", kinds[i].name);
        } else {
            CHECK_EQ(set_region(vm, 0, 0, GPA, 4 * PAGE, ram), 0, "an MTE memslot of %s", kinds[i].name);
            fill_tags(in, 4 * TPP, 10 + (unsigned)i);
            CHECK_EQ(copy_tags(vm, GPA, 4 * PAGE, in, KVM_ARM_TAGS_TO_GUEST), 4 * PAGE, "  TO_GUEST");
            CHECK_EQ(copy_tags(vm, GPA, 4 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 4 * PAGE, "  FROM_GUEST");
            CHECK(!memcmp(in, out, 4 * TPP), "  the same tags");
        }
        munmap(ram, 4 * PAGE);
        if (fd >= 0)
            close(fd);
        CHECK_EQ(close(vm), 0, "close the VM");
    }
    munmap(in, 4 * TPP);
    munmap(out, 4 * TPP);
}

/* One memslot over 40 memfds mapped back to back: more shared mappings than one VMAS_DATA frame
 * can carry descriptors for (32); the rest go without and are tags-only, which is all COPY_TAGS
 * needs. */
static void many_mappings(int kvm)
{
    enum { N = 40 };
    int vm = mte_vm(kvm), fds[N];
    uint8_t *area = mmap(NULL, N * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *in = anon(N * TPP), *out = anon(N * TPP);

    CHECK(area != MAP_FAILED, "reserve %d pages", N);
    for (int i = 0; i < N; i++) {
        fds[i] = memfd_create("piece", MFD_CLOEXEC);
        if (fds[i] < 0 || ftruncate(fds[i], PAGE)
            || mmap(area + i * PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fds[i], 0)
                   != area + i * PAGE)
            CHECK(0, "memfd %d mapped at page %d", i, i);
    }
    CHECK_EQ(set_region(vm, 0, 0, GPA, N * PAGE, area), 0, "a memslot over %d memfds mapped back to back", N);
    fill_tags(in, N * TPP, 40);
    CHECK_EQ(copy_tags(vm, GPA, N * PAGE, in, KVM_ARM_TAGS_TO_GUEST), N * PAGE, "  TO_GUEST over all of them");
    CHECK_EQ(copy_tags(vm, GPA, N * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), N * PAGE, "  FROM_GUEST");
    CHECK(!memcmp(in, out, N * TPP), "  the same tags");
    CHECK_EQ(close(vm), 0, "close the VM");
    for (int i = 0; i < N; i++)
        close(fds[i]);
    munmap(area, N * PAGE);
    munmap(in, N * TPP);
    munmap(out, N * TPP);
}

/* The shared windows mapped in this process (kvmtagd names their memfd "kvmtag-window"): how
 * many, and the address of one that is not `old` (the newest, if `old` was the only other). */
static int windows(uint8_t *old, uint8_t **other)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;

    if (other)
        *other = NULL;
    if (!maps)
        return -1;
    while (fgets(line, sizeof line, maps)) {
        unsigned long start;
        if (strstr(line, "/memfd:kvmtag-window") && sscanf(line, "%lx-", &start) == 1) {
            if (other && (uint8_t *)start != old)
                *other = (uint8_t *)start;
            n++;
        }
    }
    fclose(maps);
    return n;
}

/* Bulk COPY_TAGS goes through the VM connection's shared window (protocol 1.1): several MiB
 * of tags both ways, over several windows; the window holds the very bytes of a copy that fits
 * in one; a tag buffer that faults part-way gives the kernel's partial result. */
static void bulk_copies(int kvm)
{
    enum { MIB = 1 << 20 };
    const size_t guest = 160ul * MIB, ntags = guest / 16; /* 10 MiB of tags: 3 windows of 4 MiB */
    const size_t faults_at = 9 * MIB - 128;                 /* in tags, in the middle of a page */
    const size_t pages_done = faults_at / TPP;
    uint8_t *ram, *in = anon(ntags), *out = anon(ntags), *area, *start, *old, *window;
    uint8_t zero[TPP] = { 0 };
    int vm, dup_vm, ram_fd;

    CHECK_EQ(windows(NULL, &old), 1, "one shared window mapped: the first VM's (not the system fd's)");
    vm = mte_vm(kvm);
    CHECK_EQ(windows(old, &window), 2, "the new VM connection has mapped its own shared window");
    ram = memfd_ram(guest, &ram_fd);
    CHECK_EQ(set_region(vm, 0, 0, GPA, guest, ram), 0, "a memslot of %zu MiB", guest / MIB);
    fill_tags(in, ntags, 20);
    memset(out, 0xee, ntags); /* SENTINEL */
    CHECK_EQ(copy_tags(vm, GPA, guest, in, KVM_ARM_TAGS_TO_GUEST), (long long)guest,
             "TO_GUEST of %zu MiB of tags", ntags / MIB);
    CHECK_EQ(copy_tags(vm, GPA, guest, out, KVM_ARM_TAGS_FROM_GUEST), (long long)guest,
             "FROM_GUEST of %zu MiB of tags", ntags / MIB);
    CHECK(!memcmp(in, out, ntags), "  the same tags, across windows");

    /* One window's worth: the bytes went through the window, not the socket. */
    fill_tags(in, MIB, 21);
    CHECK_EQ(copy_tags(vm, GPA, 16ul * MIB, in, KVM_ARM_TAGS_TO_GUEST), 16l * MIB, "TO_GUEST of 1 MiB of tags");
    CHECK(!memcmp(window, in, MIB), "  the window holds the tags read from the buffer (READ_WINDOW)");
    CHECK_EQ(copy_tags(vm, GPA + 64ul * MIB, 16ul * MIB, out, KVM_ARM_TAGS_FROM_GUEST), 16l * MIB,
             "FROM_GUEST of 1 MiB of tags from further in");
    CHECK(!memcmp(window, out, MIB), "  the window holds the tags written to the buffer (WRITE_WINDOW)");
    fill_tags(in, MIB, 20); /* in[] is the guest's tags again */
    CHECK(!memcmp(out, in + 4 * MIB, MIB), "  and they are the guest's");

    /* A tag buffer that faults 9 MiB - 128 bytes in, mid-page, in the third window:
     * the pages before are done, the one it faulted in is cleared (TO_GUEST, 6.2+). */
    area = anon(ntags + 2 * PAGE);
    CHECK(mprotect(area + 9 * MIB, PAGE, PROT_NONE) == 0, "mprotect(PROT_NONE) 9 MiB into a tag buffer");
    start = area + 128;
    fill_tags(start, faults_at, 22);
    CHECK_EQ(copy_tags(vm, GPA, guest, start, KVM_ARM_TAGS_TO_GUEST), (long long)(pages_done * PAGE),
             "TO_GUEST from a buffer that faults %zu bytes in: partial", faults_at);
    memset(out, 0xee, ntags);
    CHECK_EQ(copy_tags(vm, GPA, guest, out, KVM_ARM_TAGS_FROM_GUEST), (long long)guest, "FROM_GUEST");
    CHECK(!memcmp(out, start, pages_done * TPP), "  the %zu pages before the fault took the new tags", pages_done);
    CHECK(!memcmp(out + pages_done * TPP, zero, TPP), "  the page it faulted in is cleared");
    CHECK(!memcmp(out + (pages_done + 1) * TPP, in + (pages_done + 1) * TPP, ntags - (pages_done + 1) * TPP),
          "  the pages after kept their tags");
    memset(start, 0xee, faults_at);
    CHECK_EQ(copy_tags(vm, GPA, guest, start, KVM_ARM_TAGS_FROM_GUEST), (long long)(pages_done * PAGE),
             "FROM_GUEST into a buffer that faults %zu bytes in: partial", faults_at);
    CHECK(!memcmp(start, out, pages_done * TPP), "  and the pages written are right");

    dup_vm = dup(vm);
    CHECK_EQ(close(vm), 0, "close the VM fd, a dup still open");
    CHECK_EQ(windows(NULL, NULL), 2, "  the window stays while the open file lives");
    CHECK_EQ(copy_tags(dup_vm, GPA, 16ul * MIB, out, KVM_ARM_TAGS_FROM_GUEST), 16l * MIB, "  COPY_TAGS on the dup");
    CHECK_EQ(close(dup_vm), 0, "close the dup");
    CHECK_EQ(windows(NULL, NULL), 1, "  the window is unmapped with the VM's open file");
    munmap(area, ntags + 2 * PAGE);
    munmap(ram, guest);
    close(ram_fd);
    munmap(in, ntags);
    munmap(out, ntags);
}

static void opens(void)
{
    char buf[16];
    int fd, dir, p[2];
    char cwd[PATH_MAX];

    fd = open("/dev/null", O_RDONLY);
    CHECK(fd >= 0 && !is_socket(fd), "open(\"/dev/null\") is the real /dev/null");
    CHECK_ERRNO(ioctl(fd, KVM_GET_API_VERSION, 0), ENOTTY, "a KVM ioctl on /dev/null goes to the kernel");
    close(fd);
    fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0 && read(fd, buf, 5) == 5 && !memcmp(buf, "Name:", 5), "a regular file opens and reads normally");
    close(fd);
    CHECK_ERRNO(open("/nonexistent/kvm", O_RDWR), ENOENT, "a missing path is still ENOENT");
    CHECK(pipe(p) == 0, "pipe");
    CHECK_ERRNO(ioctl(p[0], KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), ENOTTY, "a KVM ioctl on a pipe is the kernel's ENOTTY");
    close(p[0]);
    close(p[1]);
    FILE *f = fopen("/dev/null", "r");
    CHECK(f != NULL, "fopen(\"/dev/null\")");
    fclose(f);

    struct { const char *name; int fd; } entry[] = {
        { "open64", open64("/dev/kvm", O_RDWR) },
        { "openat(AT_FDCWD, \"/dev/kvm\")", openat(AT_FDCWD, "/dev/kvm", O_RDWR) },
        { "openat64(AT_FDCWD, \"/dev/kvm\")", openat64(AT_FDCWD, "/dev/kvm", O_RDWR) },
        { "__open_2", __open_2("/dev/kvm", O_RDWR) },
        { "__open64_2", __open64_2("/dev/kvm", O_RDWR) },
        { "__openat_2", __openat_2(AT_FDCWD, "/dev/kvm", O_RDWR) },
        { "__openat64_2", __openat64_2(AT_FDCWD, "/dev/kvm", O_RDWR) },
    };
    for (size_t i = 0; i < sizeof entry / sizeof entry[0]; i++) {
        CHECK(entry[i].fd >= 0 && is_socket(entry[i].fd), "%s opens kvmtagd", entry[i].name);
        CHECK_EQ(cloexec_of(entry[i].fd), 0, "  without O_CLOEXEC, no FD_CLOEXEC");
        CHECK_EQ(ioctl(entry[i].fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "  and serves KVM_CAP_ARM_MTE");
        close(entry[i].fd);
    }
    dir = open("/dev", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    fd = openat(dir, "kvm", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0 && is_socket(fd), "openat(dirfd of /dev, \"kvm\") opens kvmtagd");
    close(fd);
    fd = openat(dir, "null", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0 && !is_socket(fd), "openat(dirfd of /dev, \"null\") is the real /dev/null");
    close(fd);
    close(dir);
    CHECK(getcwd(cwd, sizeof cwd) && chdir("/dev") == 0, "chdir(\"/dev\")");
    fd = open("kvm", O_RDWR);
    CHECK(fd >= 0 && is_socket(fd), "open(\"kvm\") from /dev opens kvmtagd");
    close(fd);
    CHECK(chdir("/") == 0, "chdir(\"/\")");
    fd = openat(AT_FDCWD, "dev/kvm", O_RDWR);
    CHECK(fd >= 0 && is_socket(fd), "openat(AT_FDCWD, \"dev/kvm\") from / opens kvmtagd");
    close(fd);
    CHECK(chdir(cwd) == 0, "chdir back");
}

int main(int argc, char **argv)
{
    const char *disk_dir = argc > 1 ? argv[1] : "/var/tmp";
    int kvm, vm, ram_fd;
    uint8_t *ram;

    test_start("vmm_basic: a VMM's calls on an arm64 MTE host");
    int fds_before = count_fds();
    kvm = open_kvm();
    system_fd(kvm);
    vm = create_vm(kvm);
    enable_cap(vm);
    CHECK_ERRNO(copy_tags(vm, GPA, PAGE, anon(TPP), KVM_ARM_TAGS_FROM_GUEST), EFAULT, "COPY_TAGS before any memslot");
    ram = memfd_ram(8 * PAGE, &ram_fd);
    CHECK_EQ(set_region(vm, 0, 0, GPA, 8 * PAGE, ram), 0, "slot 0: 8 pages of a shared memfd");
    CHECK_EQ(set_region(vm, 0, 0, GPA, 8 * PAGE, ram), 0, "the same slot again (a no-op)");
    copy_struct_errors(vm);
    bad_pointers(vm);
    tags_round_trip(vm);
    memslots(vm, ram, ram_fd);
    dirty_logging(vm, ram);
    memory_kinds(kvm, disk_dir);
    many_mappings(kvm);
    bulk_copies(kvm);
    opens();
    CHECK_EQ(close(vm), 0, "close the VM fd");
    CHECK_ERRNO(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), EBADF, "ioctl on the closed VM fd");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    CHECK_ERRNO(close(kvm), EBADF, "close it again");
    CHECK_ERRNO(ioctl(kvm, KVM_GET_API_VERSION, 0), EBADF, "ioctl on the closed system fd");
    munmap(ram, 8 * PAGE);
    close(ram_fd);
    CHECK_EQ(count_fds(), fds_before, "open fds after closing everything: none left behind by the shim");
    printf("PASS vmm_basic\n");
    return 0;
}
