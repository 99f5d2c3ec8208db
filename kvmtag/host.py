"""The emulated host and its /dev/kvm (virt/kvm/kvm_main.c kvm_dev_ioctl, arm64 VM creation).

`Host` is what one kvmtagd serves: a configuration (page size, kernel profile, limits) and the
tag store shared by every VM, as physical memory is. `Host.open()` is open("/dev/kvm").
"""

from __future__ import annotations

import errno
from collections.abc import Hashable

from kvmtag import uapi
from kvmtag.capabilities import check_extension
from kvmtag.profiles import HostConfig
from kvmtag.tagstore import TagStore
from kvmtag.usermem import UserMemory
from kvmtag.vm import Vm

KVM_PHYS_SHIFT = 40  # the IPA size of a VM created with type 0
ARM64_MIN_PARANGE_BITS = 32


class Host:
    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config or HostConfig()
        self.tags = TagStore(self.config.page_size)

    def open(self) -> KvmFile:
        return KvmFile(self)

    def release_process(self, process: Hashable) -> None:
        """A client process is gone: forget the memory (and tags) only it registered."""
        self.tags.release_process(process)


class KvmFile:
    """An open /dev/kvm."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def ioctl(self, mm: UserMemory, request: int, arg: int = 0) -> int | Vm:
        """An ioctl on the system fd: the kernel's result, a negative errno, or a new Vm."""
        config = self.host.config
        if request == uapi.KVM_GET_API_VERSION:
            return -errno.EINVAL if arg else uapi.KVM_API_VERSION
        if request == uapi.KVM_CREATE_VM:
            return self.create_vm(mm, arg)
        if request == uapi.KVM_CHECK_EXTENSION:
            return check_extension(config, arg)
        if request == uapi.KVM_GET_VCPU_MMAP_SIZE:
            return -errno.EINVAL if arg else config.vcpu_mmap_size
        return -errno.EINVAL  # kvm_arch_dev_ioctl on arm64

    def create_vm(self, mm: UserMemory, vm_type: int) -> int | Vm:
        """KVM_CREATE_VM: type bits 7:0 are the IPA size (0 = 40 bits); nothing else is known."""
        config = self.host.config
        if vm_type & ~uapi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
            return -errno.EINVAL
        ipa_bits = vm_type & uapi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK
        if ipa_bits:
            if ipa_bits > config.ipa_limit or ipa_bits < ARM64_MIN_PARANGE_BITS:
                return -errno.EINVAL
        else:
            ipa_bits = KVM_PHYS_SHIFT
            if ipa_bits > config.ipa_limit:
                return -errno.EINVAL
        return Vm(config, self.host.tags, mm.process, ipa_bits)
