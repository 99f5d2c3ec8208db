"""A vCPU and its ioctls (arch/arm64/kvm/arm.c kvm_arch_vcpu_ioctl, guest.c).

The vCPU runs kvmtag's emulated guest (kvmtag.guest) in slices: KVM_RUN returns after a bounded
amount of guest work with a heartbeat MMIO exit, on a guest crash (KVM_EXIT_SYSTEM_EVENT,
KVM_SYSTEM_EVENT_CRASH, the faulting address in data[0]), when the guest touches tags-only RAM
(KVM_EXIT_INTERNAL_ERROR), or when interrupted. Its kvm_run area is a memfd the VMM maps; the
model reads and writes it with pread/pwrite, so a VMM that truncates it cannot crash kvmtagd.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING

from kvmtag import uapi
from kvmtag.guest import HEARTBEAT_GPA, Crash, TaggedHeap
from kvmtag.guestmem import FaultExit, GuestMemory, MmioExit, TagsOnlyExit
from kvmtag.usermem import UserMemory

if TYPE_CHECKING:
    from kvmtag.vm import Vm

log = logging.getLogger("kvmtag.vcpu")

KNOWN_FEATURES = (1 << 8) - 1  # POWER_OFF .. HAS_EL2 (bits 0-7) in features[0]
PSTATE_RESET = 0x3C5  # EL1h with D, A, I, F masked, as KVM resets a vCPU
IMMEDIATE_EXIT_PERIOD = 0.0005  # seconds between looks at kvm_run's immediate_exit in KVM_RUN
_ID_BY_REG = {v: k for k, v in uapi.CORE_REGS.items()}
_U64 = struct.Struct("<Q")
_MMIO = uapi.LAYOUT["kvm_run_mmio"]
_EVENT = uapi.LAYOUT["kvm_run_system_event"]


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.initialized = False
        self.regs: dict[str, int] = dict.fromkeys(uapi.CORE_REGS, 0)
        self.mutex = threading.Lock()  # vcpu->mutex: one ioctl at a time
        size = max(vm.config.vcpu_mmap_size, uapi.KVM_RUN_SIZE)
        self.run_fd = os.memfd_create(f"kvm_run-{vcpu_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.run_fd, size)
        weakref.finalize(self, os.close, self.run_fd)
        self.guest = TaggedHeap(self.regs, GuestMemory(vm))
        self.stores = 0  # guest stores so far (for figures and tests)

    def ioctl(self, mm: UserMemory, request: int, arg: int = 0) -> int:
        if mm.process != self.vm.process:
            return -errno.EIO
        if request >> 8 & 0xFF != uapi.KVMIO:
            return -errno.EINVAL
        with self.mutex:
            if request == uapi.KVM_RUN:
                return -errno.EINVAL if arg else self.run()
            if request == uapi.KVM_ARM_VCPU_INIT:
                fields = _read(mm, arg, "kvm_vcpu_init")
                return -errno.EFAULT if fields is None else self.init(fields[0], fields[1:])
            if request in (uapi.KVM_GET_ONE_REG, uapi.KVM_SET_ONE_REG, uapi.KVM_GET_REG_LIST):
                if not self.initialized:
                    return -errno.ENOEXEC
                if request == uapi.KVM_GET_REG_LIST:
                    return self._get_reg_list(mm, arg)
                return self._one_reg(mm, arg, request == uapi.KVM_SET_ONE_REG)
        return -errno.EINVAL

    # --- KVM_ARM_VCPU_INIT -------------------------------------------------------------------

    def init(self, target: int, features: tuple[int, ...]) -> int:
        if target != uapi.KVM_ARM_TARGET_GENERIC_V8:
            return -errno.EINVAL
        if features[0] & ~KNOWN_FEATURES or any(features[1:]):
            return -errno.EINVAL
        if features[0] & 1 << uapi.KVM_ARM_VCPU_EL1_32BIT and self.vm.mte_enabled:
            return -errno.EINVAL  # MTE is incompatible with AArch32
        self.regs.update(dict.fromkeys(uapi.CORE_REGS, 0), pstate=PSTATE_RESET)
        self.initialized = True
        return 0

    # --- registers -----------------------------------------------------------------------------

    def _one_reg(self, mm: UserMemory, arg: int, write: bool) -> int:
        fields = _read(mm, arg, "kvm_one_reg")
        if fields is None:
            return -errno.EFAULT
        reg_id, addr = fields
        name = _ID_BY_REG.get(reg_id)
        if name is None:
            return -errno.ENOENT
        if write:
            data = mm.copy_from_user(addr, 8)
            if len(data) != 8:
                return -errno.EFAULT
            self.regs[name] = _U64.unpack(data)[0]
            return 0
        return 0 if mm.copy_to_user(addr, _U64.pack(self.regs[name])) == 8 else -errno.EFAULT

    def _get_reg_list(self, mm: UserMemory, arg: int) -> int:
        fields = _read(mm, arg, "kvm_reg_list")
        if fields is None:
            return -errno.EFAULT
        ids = list(uapi.CORE_REGS.values())
        if mm.copy_to_user(arg, _U64.pack(len(ids))) != 8:
            return -errno.EFAULT
        if fields[0] < len(ids):
            return -errno.E2BIG
        data = struct.pack(f"<{len(ids)}Q", *ids)
        return 0 if mm.copy_to_user(arg + 8, data) == len(data) else -errno.EFAULT

    # --- KVM_RUN -------------------------------------------------------------------------------

    def run(self) -> int:
        if not self.initialized:
            return -errno.ENOEXEC
        if self._immediate_exit():
            return -errno.EINTR  # exit_reason is left as it was
        interrupted = False
        next_look = time.monotonic() + IMMEDIATE_EXIT_PERIOD

        def should_stop() -> bool:
            # immediate_exit is a byte the VMM writes in shared memory; looking costs a system
            # call, so look about once a period, however fast or slow the guest steps.
            nonlocal interrupted, next_look
            now = time.monotonic()
            if now >= next_look:
                next_look = now + IMMEDIATE_EXIT_PERIOD
                if self._immediate_exit():
                    interrupted = True  # the VMM's signal handler asked us out
            return interrupted

        try:
            done = self.guest.run(should_stop)
        except Crash as crash:
            log.info("vCPU %d: %s", self.id, crash)
            self._exit_event(uapi.KVM_EXIT_SYSTEM_EVENT, uapi.KVM_SYSTEM_EVENT_CRASH, [crash.gpa])
            return 0
        except TagsOnlyExit as e:
            log.warning("vCPU %d: %s: KVM_EXIT_INTERNAL_ERROR", self.id, e)
            self._exit_event(uapi.KVM_EXIT_INTERNAL_ERROR, uapi.KVM_INTERNAL_ERROR_EMULATION,
                             [e.gpa])  # fmt: skip
            return 0
        except MmioExit as e:
            self._exit_mmio(e.gpa, e.data, e.is_write)
            return 0
        except FaultExit as e:
            log.warning("vCPU %d: %s: KVM_RUN fails with EFAULT", self.id, e)
            return -errno.EFAULT
        self.stores += done.stores
        if interrupted:
            self._set_exit_reason(uapi.KVM_EXIT_INTR)
            return -errno.EINTR
        self._exit_mmio(HEARTBEAT_GPA, _U64.pack(done.steps), True)
        return 0

    def _immediate_exit(self) -> bool:
        return os.pread(self.run_fd, 1, 1) not in (b"\0", b"")

    def _set_exit_reason(self, reason: int) -> None:
        os.pwrite(self.run_fd, struct.pack("<I", reason), 8)

    def _exit_mmio(self, gpa: int, data: bytes, is_write: bool) -> None:
        payload = _MMIO.pack(gpa, data.ljust(8, b"\0")[:8], max(len(data), 1), int(is_write))
        os.pwrite(self.run_fd, payload, uapi.KVM_RUN_EXIT_OFFSET)
        self._set_exit_reason(uapi.KVM_EXIT_MMIO)

    def _exit_event(self, reason: int, kind: int, data: list[int]) -> None:
        values = (data + [0] * 16)[:16]
        os.pwrite(self.run_fd, _EVENT.pack(kind, len(data), *values), uapi.KVM_RUN_EXIT_OFFSET)
        self._set_exit_reason(reason)


def _read(mm: UserMemory, addr: int, name: str) -> tuple[int, ...] | None:
    layout = uapi.LAYOUT[name]
    data = mm.copy_from_user(addr, layout.size)
    if len(data) != layout.size:
        return None
    return layout.unpack(data)
