"""KVM_CHECK_EXTENSION: what the emulated arm64 host reports, on the system fd and on VM fds."""

from __future__ import annotations

import os

from kvmtag import uapi
from kvmtag.profiles import HostConfig


def check_extension(config: HostConfig, cap: int) -> int:
    """The value arm64 KVM returns for `cap`; 0 for anything it does not know.

    The system fd and VM fds answer alike for every capability kvmtag reports (the arm64 code
    only differs for the IPA size of a particular VM, which kvmtag does not change per VM).
    """
    if cap == uapi.KVM_CAP_NR_VCPUS:  # the one answer that asks the system: only when asked
        return min(config.max_vcpus, _online_cpus())
    values = {
        uapi.KVM_CAP_USER_MEMORY: 1,
        uapi.KVM_CAP_MAX_VCPUS: config.max_vcpus,
        uapi.KVM_CAP_MAX_VCPU_ID: config.max_vcpus,
        uapi.KVM_CAP_NR_MEMSLOTS: config.user_mem_slots,
        uapi.KVM_CAP_ONE_REG: 1,
        uapi.KVM_CAP_READONLY_MEM: 1,
        uapi.KVM_CAP_CHECK_EXTENSION_VM: 1,
        uapi.KVM_CAP_IMMEDIATE_EXIT: 1,
        uapi.KVM_CAP_ARM_VM_IPA_SIZE: config.ipa_limit,
        uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: uapi.KVM_DIRTY_LOG_MANUAL_CAPS,
        uapi.KVM_CAP_ARM_MTE: 1,  # kvmtag emulates a host whose CPUs have MTE
        uapi.KVMTAG_CAP_TAG_LOG: 1,  # kvmtag's own extension (kvmtag.taglog)
    }
    return values.get(cap, 0)


def _online_cpus() -> int:
    return os.cpu_count() or 1
