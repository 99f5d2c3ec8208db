/* Several threads doing ioctls on one VM fd and its dups: every call gets its own answer
 * (one request in flight per open file, so one user of its shared window at a time: each
 * thread's tags are 8 KiB, more than kvmtagd sends through the socket), while other threads
 * open, use and close fds (and VMs, each mapping and unmapping a window). */
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>

#define THREADS 6
#define ROUNDS 150
#define PAGES_EACH 32           /* 8 KiB of tags per copy */

static int vm_fds[2];
static int kvm;
static atomic_int failures;
static atomic_int calls;

static void fail(const char *what, int thread, int round)
{
    printf("FAIL thread %d round %d: %s (errno %d %s)\n", thread, round, what, errno,
           strerror(errno));
    atomic_fetch_add(&failures, 1);
}

static void *tagger(void *arg)
{
    int t = (int)(intptr_t)arg;
    int vm = vm_fds[t % 2]; /* half the threads on the VM fd, half on its dup */
    uint64_t gpa = GPA + (uint64_t)t * PAGES_EACH * PAGE;
    uint8_t in[PAGES_EACH * TPP], out[PAGES_EACH * TPP];

    memset(out, 0xee, sizeof out); /* see SENTINEL in check.h */
    for (int r = 0; r < ROUNDS; r++) {
        fill_tags(in, sizeof in, (unsigned)(t * 1000 + r));
        if (copy_tags(vm, gpa, PAGES_EACH * PAGE, in, KVM_ARM_TAGS_TO_GUEST) != PAGES_EACH * PAGE)
            fail("TO_GUEST", t, r);
        if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1)
            fail("CHECK_EXTENSION", t, r);
        if (copy_tags(vm, gpa, PAGES_EACH * PAGE, out, KVM_ARM_TAGS_FROM_GUEST) != PAGES_EACH * PAGE)
            fail("FROM_GUEST", t, r);
        if (memcmp(in, out, sizeof in))
            fail("FROM_GUEST read another thread's tags", t, r);
        if (ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0) != 2 * PAGE)
            fail("GET_VCPU_MMAP_SIZE on the shared system fd", t, r);
        errno = 0;
        if (copy_tags(vm, 0x40000000, PAGE, out, KVM_ARM_TAGS_FROM_GUEST) != -1 || errno != EFAULT)
            fail("an errno from another thread's call", t, r);
        atomic_fetch_add(&calls, 6);
    }
    return NULL;
}

/* Opens, uses and closes its own fds while the others work: the state table churns. */
static void *churner(void *arg)
{
    int t = (int)(intptr_t)arg;
    for (int r = 0; r < ROUNDS / 3; r++) {
        int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        int vm = fd >= 0 ? ioctl(fd, KVM_CREATE_VM, 0) : -1;
        int d = vm >= 0 ? dup(vm) : -1;
        if (fd < 0 || vm < 0 || d < 0)
            fail("open/CREATE_VM/dup", t, r);
        if (ioctl(d, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1)
            fail("CHECK_EXTENSION on a fresh VM's dup", t, r);
        if (close(vm) || close(fd) || ioctl(d, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1 || close(d))
            fail("the VM lives while its dup is open", t, r);
        atomic_fetch_add(&calls, 4);
    }
    return NULL;
}

int main(void)
{
    pthread_t threads[THREADS + 2];
    uint8_t *ram;

    test_start("vmm_threads: threads on one fd and its dups");
    kvm = open_kvm();
    vm_fds[0] = mte_vm(kvm);
    vm_fds[1] = dup(vm_fds[0]);
    CHECK(vm_fds[1] >= 0, "dup of the VM fd");
    ram = memfd_ram(THREADS * PAGES_EACH * PAGE, NULL);
    CHECK_EQ(set_region(vm_fds[0], 0, 0, GPA, THREADS * PAGES_EACH * PAGE, ram), 0, "slot 0");
    for (int t = 0; t < THREADS; t++)
        CHECK(pthread_create(&threads[t], NULL, tagger, (void *)(intptr_t)t) == 0, "start tagger thread %d", t);
    for (int t = THREADS; t < THREADS + 2; t++)
        CHECK(pthread_create(&threads[t], NULL, churner, (void *)(intptr_t)t) == 0, "start churner thread %d", t);
    for (int t = 0; t < THREADS + 2; t++)
        pthread_join(threads[t], NULL);
    CHECK_EQ(atomic_load(&failures), 0, "failed calls over %d ioctls from %d threads", atomic_load(&calls), THREADS + 2);
    for (int t = 0; t < THREADS; t++) {
        uint8_t in[PAGES_EACH * TPP], out[PAGES_EACH * TPP];
        memset(out, 0xee, sizeof out); /* see SENTINEL in check.h */
        fill_tags(in, sizeof in, (unsigned)(t * 1000 + ROUNDS - 1));
        CHECK_EQ(copy_tags(vm_fds[0], GPA + (uint64_t)t * PAGES_EACH * PAGE, PAGES_EACH * PAGE, out,
                           KVM_ARM_TAGS_FROM_GUEST), PAGES_EACH * PAGE, "FROM_GUEST of thread %d's pages", t);
        CHECK(!memcmp(in, out, sizeof in), "  they hold its last tags");
    }
    CHECK_EQ(close(vm_fds[1]), 0, "close the dup");
    CHECK_EQ(close(vm_fds[0]), 0, "close the VM fd");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    printf("PASS vmm_threads\n");
    return 0;
}
