"""A vCPU. Running it (KVM_RUN, registers, the kvm_run area) comes with the emulated guest;
today a vCPU exists, counts for KVM_CAP_ARM_MTE, and answers its fd's ioctls with EINVAL."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmtag.usermem import UserMemory

if TYPE_CHECKING:
    from kvmtag.vm import Vm


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id

    def ioctl(self, mm: UserMemory, request: int, arg: int = 0) -> int:
        if mm.process != self.vm.process:
            return -errno.EIO
        return -errno.EINVAL
