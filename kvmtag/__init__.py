"""kvmtag: arm64 KVM's memory-tagging (MTE) interface, served by a user-space daemon.

The kernel model (`kvmtag.host`, `kvmtag.vm`) is pure and synchronous: it can be driven in
process by tests and fuzzers, and is what the daemon serves.
"""

from kvmtag.host import Host, KvmFile
from kvmtag.profiles import PROFILES, HostConfig, KernelProfile
from kvmtag.simulated import SimulatedFile, SimulatedProcess
from kvmtag.usermem import UserMemory, Vma, VmaKind
from kvmtag.vcpu import Vcpu
from kvmtag.vm import Vm

__all__ = [
    "PROFILES",
    "Host",
    "HostConfig",
    "KernelProfile",
    "KvmFile",
    "SimulatedFile",
    "SimulatedProcess",
    "UserMemory",
    "Vcpu",
    "Vm",
    "Vma",
    "VmaKind",
]
