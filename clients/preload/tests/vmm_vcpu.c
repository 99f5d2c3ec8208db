/* vCPU fds: KVM_CREATE_VCPU, and mmap of the vCPU fd (KVM_GET_VCPU_MMAP_SIZE bytes) maps its
 * kvm_run area, the shared memory object kvmtagd sent with it. Running the guest comes later. */
#include "check.h"

int main(void)
{
    int kvm, vm, vcpu, vcpu1, d;
    long size;
    struct kvm_run *run, *again, *priv;
    void *p;

    test_start("vmm_vcpu: vCPU fds and their kvm_run mapping");
    int fds_before = count_fds();
    kvm = open_kvm();
    vm = mte_vm(kvm);
    size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK_EQ(size, 2 * PAGE, "KVM_GET_VCPU_MMAP_SIZE");
    CHECK_ERRNO(ioctl(vm, KVM_CREATE_VCPU, -1), EINVAL, "KVM_CREATE_VCPU with id -1");
    CHECK_ERRNO(ioctl(vm, KVM_CREATE_VCPU, 100000), EINVAL, "KVM_CREATE_VCPU beyond the id limit");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(vcpu >= 0 && is_socket(vcpu), "KVM_CREATE_VCPU(0) = %d, a socket", vcpu);
    CHECK_EQ(cloexec_of(vcpu), 1, "  close-on-exec, as KVM's");
    CHECK_ERRNO(ioctl(vm, KVM_CREATE_VCPU, 0), EEXIST, "KVM_CREATE_VCPU(0) again");
    vcpu1 = ioctl(vm, KVM_CREATE_VCPU, 1);
    CHECK(vcpu1 >= 0, "KVM_CREATE_VCPU(1) = %d", vcpu1);
    CHECK_ERRNO(enable_mte(vm), EINVAL, "ENABLE_CAP(KVM_CAP_ARM_MTE) once vCPUs exist");
    CHECK_ERRNO(ioctl(vcpu, _IO(KVMIO, 0xfd), 0), EINVAL, "an unknown ioctl on the vCPU fd");

    run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    CHECK(run != MAP_FAILED, "mmap of the vCPU fd (%ld bytes)", size);
    CHECK(run->exit_reason == 0 && run->immediate_exit == 0, "  a fresh kvm_run: zeroed");
    run->immediate_exit = 1;
    ((volatile uint8_t *)run)[size - 1] = 0x5a; /* the whole area is there */
    d = dup(vcpu);
    again = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    CHECK(again != MAP_FAILED, "mmap of a dup of the vCPU fd");
    CHECK(again->immediate_exit == 1 && ((uint8_t *)again)[size - 1] == 0x5a,
          "  maps the same kvm_run object (a write through one mapping shows in the other)");
    priv = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE, vcpu, 0);
    CHECK(priv != MAP_FAILED && priv->immediate_exit == 1, "a MAP_PRIVATE mapping sees it too");
    p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, vcpu1, 0);
    CHECK(p != MAP_FAILED && ((struct kvm_run *)p)->immediate_exit == 0, "vCPU 1 has its own kvm_run");
    CHECK_EQ(munmap(p, (size_t)size), 0, "munmap");
    p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, PAGE, 0);
    CHECK(p == MAP_FAILED && errno == EBADF, "mmap of a number that is no fd: EBADF");
    p = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, kvm, 0);
    CHECK(p == MAP_FAILED && errno == ENODEV, "mmap of the system fd: ENODEV");
    p = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, vm, 0);
    CHECK(p == MAP_FAILED && errno == ENODEV, "mmap of the VM fd: ENODEV");
    p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "anonymous mmap is untouched");
    munmap(p, PAGE);

    CHECK_EQ(close(d), 0, "close the vCPU fd's dup");
    CHECK_EQ(close(vcpu), 0, "close the vCPU fd");
    CHECK(run->immediate_exit == 1 && again->immediate_exit == 1, "the mappings outlive the fd");
    CHECK_EQ(munmap(run, (size_t)size), 0, "munmap kvm_run");
    CHECK_EQ(munmap(again, (size_t)size), 0, "munmap its second mapping");
    CHECK_EQ(munmap(priv, (size_t)size), 0, "munmap the private mapping");
    CHECK_EQ(close(vcpu1), 0, "close vCPU 1");
    CHECK_EQ(close(vm), 0, "close the VM");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    CHECK_EQ(count_fds(), fds_before, "open fds after closing everything: none left behind by the shim");
    printf("PASS vmm_vcpu\n");
    return 0;
}
