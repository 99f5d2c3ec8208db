"""Drive the kernel model in process, as a VMM would drive /dev/kvm: create an MTE VM, add a
memslot over a memfd, copy tags in and out, and meet the kernel's errnos.

Run: .venv/bin/python clients/model_example.py
"""

from __future__ import annotations

import errno
import os

from kvmtag import Host, SimulatedFile, SimulatedProcess, uapi

PAGE = 4096
vmm = SimulatedProcess()  # the VMM's address space, as the model sees it
kvm = Host().open()  # open("/dev/kvm")

vm = kvm.ioctl(vmm, uapi.KVM_CREATE_VM, 0)
cap = uapi.LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))
assert vm.ioctl(vmm, uapi.KVM_ENABLE_CAP, vmm.alloc(cap)) == 0

# 1 MiB of guest RAM at IPA 0x8000_0000, backed by a shared memfd mapping.
ram = vmm.mmap(256 * PAGE, file=SimulatedFile(256 * PAGE), shared=True)
region = uapi.LAYOUT["kvm_userspace_memory_region"].pack(0, 0, 0x8000_0000, 256 * PAGE, ram)
assert vm.ioctl(vmm, uapi.KVM_SET_USER_MEMORY_REGION, vmm.alloc(region)) == 0


def copy_tags(ipa: int, length: int, buf: int, flags: int) -> int:
    args = uapi.LAYOUT["kvm_arm_copy_mte_tags"].pack(ipa, length, buf, flags, 0, 0)
    return vm.ioctl(vmm, uapi.KVM_ARM_MTE_COPY_TAGS, vmm.alloc(args))


# Tags are one per byte in the ioctl format: PAGE_SIZE/16 of them per page.
tags = bytes(i % 16 for i in range(4 * PAGE // 16))
print("TO_GUEST  ->", copy_tags(0x8000_0000, 4 * PAGE, vmm.alloc(tags), 0))
out = vmm.alloc(len(tags))
print("FROM_GUEST ->", copy_tags(0x8000_0000, 4 * PAGE, out, uapi.KVM_ARM_TAGS_FROM_GUEST))
assert vmm.read(out, len(tags)) == tags

# Past the end of the slot the kernel stops: the result is the bytes covered before the hole.
print("across the slot's end ->", copy_tags(0x8000_0000 + 254 * PAGE, 4 * PAGE, out, 1))
# A misaligned length is refused before anything is copied; results are negative errnos.
result = copy_tags(0x8000_0000, 100, out, 1)
print("misaligned ->", result, errno.errorcode[-result], os.strerror(-result))
