/* Booting and running the guest as a VMM does (README.md, "The running guest"): guest RAM in a
 * shared memfd, the guest's descriptor written at its start, two vCPUs initialised with the
 * preferred target and pointed at the image with KVM_SET_ONE_REG, each run on its own thread
 * through its mmap'ed kvm_run area. Then what a VMM must handle: KVM_RUN before VCPU_INIT,
 * immediate_exit, a guest that crashes because its tags were overwritten, and a heap in private
 * anonymous memory kvmtagd cannot reach. */
#include "check.h"

#include <pthread.h>
#include <stddef.h>

#define RAM_GPA 0x40000000ull           /* guest RAM (slot 0), where QEMU's virt machine has it */
#define RAM_SIZE (16ull << 20)
#define HEAP_GPA (RAM_GPA + (1ull << 20)) /* the heap: 1 MiB into RAM, after the descriptor */
#define HEAP_PAGES 64
#define HEAP_SIZE (HEAP_PAGES * PAGE)
#define HEAP2_GPA 0x48000000ull         /* the second guest's heap: slot 1, private anonymous */
#define NVCPUS 2
#define RUNS 20                         /* KVM_RUN calls per vCPU thread */

#define GUEST_ENTRY 0x40080000ull       /* pc at boot */
#define HEARTBEAT_GPA 0x09000000ull     /* the MMIO heartbeat after each slice */

#define CORE_REG(name) \
    (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(name))
#define REG_X(n) CORE_REG(regs.regs[n])
#define REG_PC CORE_REG(regs.pc)

/* kvmtag.guest.GuestDescriptor: struct.Struct("<8sQQIIQIIII"), at x0. */
struct guest_descriptor {
    char magic[8];                      /* "KVMTAGG1" */
    uint64_t heap_gpa;
    uint64_t heap_size;
    uint32_t obj_size;
    uint32_t nvcpus;
    uint64_t seed;
    uint32_t steps_per_run;
    uint32_t store_rate;
    uint32_t scan_interval;
    uint32_t pad;
};
_Static_assert(sizeof(struct guest_descriptor) == 56, "the descriptor is 56 bytes");

static void write_descriptor(void *at, uint64_t heap_gpa, uint32_t nvcpus)
{
    struct guest_descriptor d = {
        .heap_gpa = heap_gpa, .heap_size = HEAP_SIZE, .obj_size = 64, .nvcpus = nvcpus,
        .seed = 7, .steps_per_run = 500, .store_rate = 0, .scan_interval = 2000,
    };
    memcpy(d.magic, "KVMTAGG1", 8);
    memcpy(at, &d, sizeof d);
}

static int get_reg(int vcpu, uint64_t id, uint64_t *value)
{
    struct kvm_one_reg reg = { .id = id, .addr = (uint64_t)(uintptr_t)value };
    return ioctl(vcpu, KVM_GET_ONE_REG, &reg);
}

static int set_reg(int vcpu, uint64_t id, uint64_t value)
{
    struct kvm_one_reg reg = { .id = id, .addr = (uint64_t)(uintptr_t)&value };
    return ioctl(vcpu, KVM_SET_ONE_REG, &reg);
}

static uint64_t reg_of(int vcpu, uint64_t id, const char *name)
{
    uint64_t value = 0;
    int r = get_reg(vcpu, id, &value);
    CHECK(r == 0, "KVM_GET_ONE_REG(%s): %#llx", name, (unsigned long long)value);
    return value;
}

/* A vCPU as the VMM holds it: created, initialised with the preferred target, its kvm_run
 * mapped, pointed at the guest image with x0 = descriptor, x1 = index. */
static int boot_vcpu(int vm, int index, const struct kvm_vcpu_init *init, long run_size,
                     struct kvm_run **run_out)
{
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, index);
    struct kvm_run *run;

    CHECK(vcpu >= 0, "KVM_CREATE_VCPU(%d) = %d", index, vcpu);
    CHECK_EQ(ioctl(vcpu, KVM_ARM_VCPU_INIT, init), 0, "  KVM_ARM_VCPU_INIT");
    CHECK_EQ(set_reg(vcpu, REG_X(0), RAM_GPA), 0, "  KVM_SET_ONE_REG(x0 = %#llx, the descriptor)", RAM_GPA);
    CHECK_EQ(set_reg(vcpu, REG_X(1), (uint64_t)index), 0, "  KVM_SET_ONE_REG(x1 = %d)", index);
    CHECK_EQ(set_reg(vcpu, REG_PC, GUEST_ENTRY), 0, "  KVM_SET_ONE_REG(pc = %#llx)", GUEST_ENTRY);
    CHECK(reg_of(vcpu, REG_X(0), "x0") == RAM_GPA && reg_of(vcpu, REG_X(1), "x1") == (uint64_t)index
              && reg_of(vcpu, REG_PC, "pc") == GUEST_ENTRY,
          "  x0, x1 and pc read back as set");
    run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    CHECK(run != MAP_FAILED, "  mmap of its kvm_run (%ld bytes)", run_size);
    *run_out = run;
    return vcpu;
}

/* --- the vCPU threads ------------------------------------------------------------------------- */

struct vcpu_thread {
    int index, fd;
    struct kvm_run *run;
    int runs;                /* KVM_RUN calls that gave a heartbeat */
    uint64_t steps;          /* their steps, summed */
    char failure[200];       /* the first exit that was not a heartbeat */
};

static void *vcpu_loop(void *arg)
{
    struct vcpu_thread *t = arg;
    for (int i = 0; i < RUNS; i++) {
        struct kvm_run *run = t->run;
        uint64_t steps;
        if (ioctl(t->fd, KVM_RUN, 0) != 0) {
            snprintf(t->failure, sizeof t->failure, "KVM_RUN %d failed: %s", i, strerror(errno));
            break;
        }
        if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.phys_addr != HEARTBEAT_GPA
            || !run->mmio.is_write || run->mmio.len != 8) {
            snprintf(t->failure, sizeof t->failure,
                     "KVM_RUN %d: exit %u, mmio at %#llx, is_write %u, len %u", i,
                     run->exit_reason, (unsigned long long)run->mmio.phys_addr,
                     run->mmio.is_write, run->mmio.len);
            break;
        }
        memcpy(&steps, run->mmio.data, 8);
        if (steps == 0) {
            snprintf(t->failure, sizeof t->failure, "KVM_RUN %d: a heartbeat of 0 steps", i);
            break;
        }
        t->steps += steps;
        t->runs++;
    }
    return NULL;
}

static void run_on_threads(struct vcpu_thread *threads, int n)
{
    pthread_t ids[NVCPUS];
    for (int i = 0; i < n; i++)
        CHECK_EQ(pthread_create(&ids[i], NULL, vcpu_loop, &threads[i]), 0, "start the thread of vCPU %d", i);
    for (int i = 0; i < n; i++)
        CHECK_EQ(pthread_join(ids[i], NULL), 0, "join the thread of vCPU %d", i);
    for (int i = 0; i < n; i++) {
        struct vcpu_thread *t = &threads[i];
        CHECK(t->runs == RUNS, "vCPU %d: %d KVM_RUNs, each a heartbeat (KVM_EXIT_MMIO write of 8 bytes at %#llx)%s%s",
              i, RUNS, HEARTBEAT_GPA, t->failure[0] ? ": " : "", t->failure);
        printf("     vCPU %d ran %llu guest steps\n", i, (unsigned long long)t->steps);
    }
}

/* --- what a VMM must handle -------------------------------------------------------------------- */

static void not_initialised(int vm, long run_size)
{
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, NVCPUS);
    struct kvm_run *run;

    CHECK(vcpu >= 0, "KVM_CREATE_VCPU(%d), never initialised", NVCPUS);
    run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    CHECK(run != MAP_FAILED, "  mmap of its kvm_run");
    CHECK_ERRNO(ioctl(vcpu, KVM_RUN, 0), ENOEXEC, "  KVM_RUN before KVM_ARM_VCPU_INIT");
    CHECK_ERRNO(set_reg(vcpu, REG_PC, GUEST_ENTRY), ENOEXEC, "  KVM_SET_ONE_REG before KVM_ARM_VCPU_INIT");
    CHECK_EQ(munmap(run, (size_t)run_size), 0, "  munmap");
    CHECK_EQ(close(vcpu), 0, "  close it");
}

static void immediate_exit(int vcpu, struct kvm_run *run)
{
    uint64_t before = reg_of(vcpu, REG_X(3), "x3");
    run->immediate_exit = 1;
    CHECK_ERRNO(ioctl(vcpu, KVM_RUN, 0), EINTR, "KVM_RUN with immediate_exit = 1");
    CHECK_EQ(reg_of(vcpu, REG_X(3), "x3") - before, 0, "  no guest step ran (x3 unchanged)");
    run->immediate_exit = 0;
    CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_MMIO
              && run->mmio.phys_addr == HEARTBEAT_GPA,
          "immediate_exit = 0 again: KVM_RUN runs a slice (a heartbeat)");
}

/* Every granule of the heap tagged 0xF: free objects must carry tag 0 and allocated ones their
 * generation's tag, so the guest's next tag-checked loads fault. */
static void crash(int vcpu, int index, struct kvm_run *run)
{
    uint64_t first;
    int tries = 0;

    do { /* a slice may pick only objects whose tag happens to be 0xf: allow a few */
        CHECK_EQ(ioctl(vcpu, KVM_RUN, 0), 0, "vCPU %d: KVM_RUN on the corrupted heap", index);
    } while (run->exit_reason == KVM_EXIT_MMIO && run->mmio.phys_addr == HEARTBEAT_GPA && ++tries < 10);
    CHECK_EQ(run->exit_reason, KVM_EXIT_SYSTEM_EVENT, "  exit reason KVM_EXIT_SYSTEM_EVENT");
    CHECK_EQ(run->system_event.type, KVM_SYSTEM_EVENT_CRASH, "  type KVM_SYSTEM_EVENT_CRASH");
    CHECK(run->system_event.ndata >= 1, "  ndata %u", run->system_event.ndata);
    first = run->system_event.data[0];
    CHECK(first >= HEAP_GPA && first < HEAP_GPA + HEAP_SIZE, "  data[0] = %#llx, inside the heap",
          (unsigned long long)first);
    CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_SYSTEM_EVENT
              && run->system_event.type == KVM_SYSTEM_EVENT_CRASH && run->system_event.data[0] == first,
          "  KVM_RUN again: the guest stays crashed, at the same address");
}

/* A second guest whose heap is private anonymous memory (slot 1): kvmtagd keeps its tags but
 * cannot reach its data, and the guest's first access to it is KVM_EXIT_INTERNAL_ERROR. */
static void tags_only_guest(int kvm, long run_size, const struct kvm_vcpu_init *init)
{
    int vm = mte_vm(kvm), ram_fd, vcpu;
    uint8_t *ram = memfd_ram(16 * PAGE, &ram_fd), *heap = anon(HEAP_SIZE), *tags = anon(TPP);
    struct kvm_run *run;

    CHECK_EQ(set_region(vm, 0, 0, RAM_GPA, 16 * PAGE, ram), 0, "second guest: slot 0, 16 pages of memfd");
    CHECK_EQ(set_region(vm, 1, 0, HEAP2_GPA, HEAP_SIZE, heap), 0, "  slot 1: its heap, private anonymous memory");
    write_descriptor(ram, HEAP2_GPA, 1);
    vcpu = boot_vcpu(vm, 0, init, run_size, &run);
    CHECK_EQ(ioctl(vcpu, KVM_RUN, 0), 0, "  KVM_RUN");
    CHECK_EQ(run->exit_reason, KVM_EXIT_INTERNAL_ERROR, "  exit reason KVM_EXIT_INTERNAL_ERROR");
    CHECK_EQ(run->internal.suberror, KVM_INTERNAL_ERROR_EMULATION, "  suberror KVM_INTERNAL_ERROR_EMULATION");
    CHECK(run->internal.ndata >= 1 && run->internal.data[0] >= HEAP2_GPA
              && run->internal.data[0] < HEAP2_GPA + HEAP_SIZE,
          "  data[0] = %#llx, inside the anonymous heap", (unsigned long long)run->internal.data[0]);
    fill_tags(tags, TPP, 5);
    CHECK_EQ(copy_tags(vm, HEAP2_GPA, PAGE, tags, KVM_ARM_TAGS_TO_GUEST), PAGE, "  its tags can still be copied (TO_GUEST)");
    CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_INTERNAL_ERROR,
          "  KVM_RUN again: KVM_EXIT_INTERNAL_ERROR again");
    CHECK_EQ(munmap(run, (size_t)run_size), 0, "  munmap kvm_run");
    CHECK_EQ(close(vcpu), 0, "  close the vCPU");
    CHECK_EQ(close(vm), 0, "  close the VM");
    munmap(tags, TPP);
    munmap(heap, HEAP_SIZE);
    munmap(ram, 16 * PAGE);
    close(ram_fd);
}

int main(void)
{
    int kvm, vm, ram_fd, vcpus[NVCPUS];
    long run_size;
    uint8_t *ram, *tags;
    struct kvm_run *runs[NVCPUS];
    struct kvm_vcpu_init init;
    struct vcpu_thread threads[NVCPUS];

    test_start("vmm_run: booting and running the guest");
    int fds_before = count_fds();
    kvm = open_kvm();
    vm = mte_vm(kvm);
    run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK(run_size >= (long)sizeof(struct kvm_run), "KVM_GET_VCPU_MMAP_SIZE = %ld", run_size);
    ram = memfd_ram(RAM_SIZE, &ram_fd);
    CHECK_EQ(set_region(vm, 0, 0, RAM_GPA, RAM_SIZE, ram), 0, "slot 0: 16 MiB of memfd at %#llx", RAM_GPA);
    write_descriptor(ram, HEAP_GPA, NVCPUS);
    printf("     the descriptor at %#llx: heap at %#llx, %d pages, 64-byte objects, %d vCPUs\n",
           RAM_GPA, HEAP_GPA, HEAP_PAGES, NVCPUS);

    memset(&init, 0xee, sizeof init); /* SENTINEL (check.h) */
    CHECK_EQ(ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init), 0, "KVM_ARM_PREFERRED_TARGET");
    CHECK_EQ(init.target, KVM_ARM_TARGET_GENERIC_V8, "  target");
    for (int i = 0; i < NVCPUS; i++)
        vcpus[i] = boot_vcpu(vm, i, &init, run_size, &runs[i]);

    memset(threads, 0, sizeof threads);
    for (int i = 0; i < NVCPUS; i++)
        threads[i] = (struct vcpu_thread){ .index = i, .fd = vcpus[i], .run = runs[i] };
    run_on_threads(threads, NVCPUS);
    for (int i = 0; i < NVCPUS; i++) {
        uint64_t x3 = reg_of(vcpus[i], REG_X(3), "x3");
        CHECK(x3 > 0 && x3 == threads[i].steps, "vCPU %d: x3 = %llu, the steps its heartbeats reported",
              i, (unsigned long long)x3);
    }
    not_initialised(vm, run_size);
    immediate_exit(vcpus[0], runs[0]);

    tags = anon(HEAP_PAGES * TPP);
    memset(tags, 0xf, HEAP_PAGES * TPP);
    CHECK_EQ(copy_tags(vm, HEAP_GPA, HEAP_SIZE, tags, KVM_ARM_TAGS_TO_GUEST), HEAP_SIZE,
             "COPY_TAGS TO_GUEST: every granule of the heap tagged 0xf");
    for (int i = 0; i < NVCPUS; i++)
        crash(vcpus[i], i, runs[i]);
    munmap(tags, HEAP_PAGES * TPP);

    tags_only_guest(kvm, run_size, &init);

    for (int i = 0; i < NVCPUS; i++) {
        CHECK_EQ(munmap(runs[i], (size_t)run_size), 0, "munmap vCPU %d's kvm_run", i);
        CHECK_EQ(close(vcpus[i]), 0, "close vCPU %d", i);
    }
    CHECK_EQ(close(vm), 0, "close the VM");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    munmap(ram, RAM_SIZE);
    close(ram_fd);
    CHECK_EQ(count_fds(), fds_before, "open fds after closing everything: none left behind by the shim");
    printf("PASS vmm_run\n");
    return 0;
}
