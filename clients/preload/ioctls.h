/* The explicit table of the ioctls the shim knows: kvmtag/uapi.py's IOCTLS, one line each
 * (tests/test_preload.py checks the two tables agree).
 *
 * How an ioctl uses its argument comes from here, never from the number's direction and size
 * bits: KVM_ARM_MTE_COPY_TAGS is encoded _IOR, yet the kernel only reads its struct. */
#ifndef KVMTAG_IOCTLS_H
#define KVMTAG_IOCTLS_H

#include <stddef.h>
#include <stdint.h>

enum kt_arg {
    KT_ARG_NONE,      /* must be 0 */
    KT_ARG_INT,       /* an integer value */
    KT_ARG_IN,        /* pointer to a struct the kernel reads */
    KT_ARG_OUT,       /* pointer to a struct the kernel writes */
    KT_ARG_INOUT,     /* pointer to a struct the kernel reads and writes back */
};

struct kt_ioctl {
    uint32_t number;
    enum kt_arg arg;
    uint32_t size;    /* the struct's size (its fixed part) for pointer arguments */
    int creates;      /* 1: the reply carries a new fd (CREATE_VM, CREATE_VCPU) */
    const char *name;
};

static const struct kt_ioctl kt_ioctls[] = {
    /* system (/dev/kvm) */
    { 0xAE00, KT_ARG_NONE, 0, 0, "KVM_GET_API_VERSION" },
    { 0xAE01, KT_ARG_INT, 0, 1, "KVM_CREATE_VM" },
    { 0xAE03, KT_ARG_INT, 0, 0, "KVM_CHECK_EXTENSION" }, /* also on a VM fd */
    { 0xAE04, KT_ARG_NONE, 0, 0, "KVM_GET_VCPU_MMAP_SIZE" },
    /* VM */
    { 0xAE41, KT_ARG_INT, 0, 1, "KVM_CREATE_VCPU" },
    { 0x4010AE42, KT_ARG_IN, 16, 0, "KVM_GET_DIRTY_LOG" },          /* kvm_dirty_log */
    { 0x4020AE46, KT_ARG_IN, 32, 0, "KVM_SET_USER_MEMORY_REGION" }, /* kvm_userspace_memory_region */
    { 0x4068AEA3, KT_ARG_IN, 104, 0, "KVM_ENABLE_CAP" },            /* kvm_enable_cap */
    { 0x8020AEAF, KT_ARG_OUT, 32, 0, "KVM_ARM_PREFERRED_TARGET" },  /* kvm_vcpu_init */
    { 0x8030AEB4, KT_ARG_IN, 48, 0, "KVM_ARM_MTE_COPY_TAGS" },      /* kvm_arm_copy_mte_tags: _IOR! */
    { 0xC018AEC0, KT_ARG_IN, 24, 0, "KVM_CLEAR_DIRTY_LOG" },        /* kvm_clear_dirty_log */
    /* vCPU */
    { 0xAE80, KT_ARG_NONE, 0, 0, "KVM_RUN" },
    { 0x4010AEAB, KT_ARG_IN, 16, 0, "KVM_GET_ONE_REG" },            /* kvm_one_reg */
    { 0x4010AEAC, KT_ARG_IN, 16, 0, "KVM_SET_ONE_REG" },            /* kvm_one_reg */
    { 0x4020AEAE, KT_ARG_IN, 32, 0, "KVM_ARM_VCPU_INIT" },          /* kvm_vcpu_init */
    { 0xC008AEB0, KT_ARG_INOUT, 8, 0, "KVM_GET_REG_LIST" },         /* kvm_reg_list + n ids */
    /* kvmtag's extensions (numbers that cannot collide with KVM's) */
    { 0x40286B01, KT_ARG_IN, 40, 0, "KVMTAG_GET_TAG_LOG" },         /* kvmtag_tag_log */
};

#define KT_NIOCTLS (sizeof kt_ioctls / sizeof kt_ioctls[0])

static inline const struct kt_ioctl *kt_ioctl_spec(uint32_t number)
{
    for (size_t i = 0; i < KT_NIOCTLS; i++) {
        if (kt_ioctls[i].number == number)
            return &kt_ioctls[i];
    }
    return NULL;
}

#endif
