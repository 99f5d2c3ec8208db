"""An object API over kvmtag.client, in the shape of rust-vmm's kvm-ioctls.

`Kvm` owns the /dev/kvm fd and creates `VmFd`s, which create `VcpuFd`s; one method per ioctl,
named after it, raising OSError with the kernel's errno. Buffers (tag buffers, dirty bitmaps)
may be passed as Python buffers: their address is taken for the struct, and a memoryview is
held for the duration of the call so the memory cannot move.

    with Kvm(socket="/run/kvmtag/kvm.sock") as kvm:
        vm = kvm.create_vm()
        vm.enable_cap(KVM_CAP_ARM_MTE)
        vm.set_user_memory_region(0, 0x8000_0000, len(ram), address_of(ram))
        vm.mte_copy_tags(0x8000_0000, 4096, tags, KVM_ARM_TAGS_TO_GUEST)
"""

from __future__ import annotations

import contextlib
import errno
import mmap as _mmap
import os
import struct
from dataclasses import dataclass
from types import TracebackType

from kvmtag import client, procmem, uapi
from kvmtag.procmem import ReadableBuffer

_L = uapi.LAYOUT


def address_of(buf: ReadableBuffer | int) -> int:
    """The address of a buffer's memory (or an address, unchanged)."""
    return buf if isinstance(buf, int) else procmem.buffer_address(buf).address


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            client.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Fd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _ioctl(self, request: int, arg: int | bytes | bytearray | memoryview = 0) -> int:
        return client.ioctl(self.fd, request, arg)


class Kvm(_Fd):
    """/dev/kvm, served by kvmtagd."""

    def __init__(self, fd: int | None = None, *, socket: str | os.PathLike[str] | None = None):
        super().__init__(client.open(socket=socket) if fd is None else fd)

    def __enter__(self) -> Kvm:
        return self

    @property
    def page_size(self) -> int:
        """The emulated host's page size (from the daemon's handshake)."""
        return client.info(self.fd).page_size

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return self._ioctl(uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm."""
        return self._ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE."""
        return self._ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """KVM_CREATE_VM; vm_type bits 7:0 are the IPA size (0: 40 bits)."""
        return VmFd(self._ioctl(uapi.KVM_CREATE_VM, vm_type))


class VmFd(_Fd):
    def __enter__(self) -> VmFd:
        return self

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (KVM_CAP_CHECK_EXTENSION_VM)."""
        return self._ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None:
        """KVM_ENABLE_CAP (KVM_CAP_ARM_MTE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        a = (*args, 0, 0, 0, 0)[:4]
        self._ioctl(uapi.KVM_ENABLE_CAP, _L["kvm_enable_cap"].pack(cap, flags, *a, bytes(64)))

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int,
        userspace_addr: int | ReadableBuffer, flags: int = 0,
    ) -> None:  # fmt: skip
        """KVM_SET_USER_MEMORY_REGION (KVM_CAP_USER_MEMORY). memory_size 0 deletes the slot."""
        region = _L["kvm_userspace_memory_region"].pack(
            slot, flags, guest_phys_addr, memory_size, address_of(userspace_addr)
        )
        self._ioctl(uapi.KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU."""
        return VcpuFd(self._ioctl(uapi.KVM_CREATE_VCPU, vcpu_id))

    def preferred_target(self) -> tuple[int, tuple[int, ...]]:
        """KVM_ARM_PREFERRED_TARGET: (target, features)."""
        buf = bytearray(_L["kvm_vcpu_init"].size)
        self._ioctl(uapi.KVM_ARM_PREFERRED_TARGET, buf)
        target, *features = _L["kvm_vcpu_init"].unpack(buf)
        return target, tuple(features)

    def get_tag_log(
        self, slot: int, first_page: int, num_pages: int, packed_per_page: int
    ) -> tuple[bytes, bytes]:
        """KVMTAG_GET_TAG_LOG (kvmtag's extension, KVMTAG_CAP_TAG_LOG): the saved packed tags
        of the range and its validity bitmap."""
        tags = bytearray(num_pages * packed_per_page)
        valid = bytearray(-(-num_pages // 64) * 8)
        with memoryview(tags), memoryview(valid):
            arg = _L["kvmtag_tag_log"].pack(
                slot, 0, first_page, num_pages, address_of(tags), address_of(valid)
            )
            self._ioctl(uapi.KVMTAG_GET_TAG_LOG, arg)
        return bytes(tags), bytes(valid)

    def mte_copy_tags(
        self, guest_ipa: int, length: int, tags: int | ReadableBuffer, flags: int
    ) -> int:
        """KVM_ARM_MTE_COPY_TAGS (KVM_CAP_ARM_MTE): guest bytes covered (partial on a fault).
        `tags` holds length/16 bytes, one tag per byte."""
        with _pinned(tags):
            addr = address_of(tags)
            args = _L["kvm_arm_copy_mte_tags"].pack(guest_ipa, length, addr, flags, 0, 0)
            return self._ioctl(uapi.KVM_ARM_MTE_COPY_TAGS, args)

    def get_dirty_log(self, slot: int, bitmap: int | ReadableBuffer) -> None:
        """KVM_GET_DIRTY_LOG into `bitmap` (ALIGN(npages, 64)/8 bytes)."""
        with _pinned(bitmap):
            arg = _L["kvm_dirty_log"].pack(slot, 0, address_of(bitmap))
            self._ioctl(uapi.KVM_GET_DIRTY_LOG, arg)

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: int | ReadableBuffer
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        with _pinned(bitmap):
            arg = _L["kvm_clear_dirty_log"].pack(slot, num_pages, first_page, address_of(bitmap))
            self._ioctl(uapi.KVM_CLEAR_DIRTY_LOG, arg)


class VcpuFd(_Fd):
    def __enter__(self) -> VcpuFd:
        return self

    def mmap_run(self, size: int) -> _mmap.mmap:
        """The kvm_run area (size = Kvm.get_vcpu_mmap_size())."""
        return client.mmap(self.fd, size)

    def init(self, target: int = uapi.KVM_ARM_TARGET_GENERIC_V8, features: int = 0) -> None:
        """KVM_ARM_VCPU_INIT with features[0] = features."""
        self._ioctl(uapi.KVM_ARM_VCPU_INIT, _L["kvm_vcpu_init"].pack(target, features, *[0] * 6))

    def run(self) -> None:
        """KVM_RUN: the exit is in the kvm_run area (see `exit_of`)."""
        self._ioctl(uapi.KVM_RUN)

    def get_one_reg(self, reg_id: int) -> int:
        """KVM_GET_ONE_REG of a 64-bit register (uapi.CORE_REGS)."""
        value = bytearray(8)
        with memoryview(value):
            self._ioctl(uapi.KVM_GET_ONE_REG, _L["kvm_one_reg"].pack(reg_id, address_of(value)))
        return int.from_bytes(value, "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """KVM_SET_ONE_REG of a 64-bit register."""
        data = value.to_bytes(8, "little")
        self._ioctl(uapi.KVM_SET_ONE_REG, _L["kvm_one_reg"].pack(reg_id, address_of(data)))

    def get_reg_list(self) -> list[int]:
        """KVM_GET_REG_LIST."""
        head = bytearray(8)
        try:
            self._ioctl(uapi.KVM_GET_REG_LIST, head)
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
        n = int.from_bytes(head, "little")
        buf = bytearray(n.to_bytes(8, "little") + bytes(8 * n))
        self._ioctl(uapi.KVM_GET_REG_LIST, buf)
        return list(struct.unpack_from(f"<{n}Q", buf, 8))


@dataclass(frozen=True)
class RunExit:
    """The exit a KVM_RUN left in the kvm_run area."""

    reason: int
    mmio_addr: int = 0  # KVM_EXIT_MMIO
    mmio_data: bytes = b""
    event: int = 0  # KVM_EXIT_SYSTEM_EVENT type, or KVM_EXIT_INTERNAL_ERROR suberror
    data: tuple[int, ...] = ()  # system_event.data / internal.data, ndata of them


def exit_of(run: _mmap.mmap | bytes) -> RunExit:
    """Decode the kvm_run area after KVM_RUN."""
    reason = struct.unpack_from("<I", run, 8)[0]
    at = uapi.KVM_RUN_EXIT_OFFSET
    if reason == uapi.KVM_EXIT_MMIO:
        addr, data, length, _ = _L["kvm_run_mmio"].unpack_from(run, at)
        return RunExit(reason, addr, data[:length])
    if reason in (uapi.KVM_EXIT_SYSTEM_EVENT, uapi.KVM_EXIT_INTERNAL_ERROR):
        kind, ndata, *data = _L["kvm_run_system_event"].unpack_from(run, at)
        return RunExit(reason, event=kind, data=tuple(data[: min(ndata, 16)]))
    return RunExit(reason)


def _pinned(buf: int | ReadableBuffer) -> contextlib.AbstractContextManager[object]:
    """Hold a memoryview of a buffer so it can neither be resized nor closed meanwhile."""
    return contextlib.nullcontext() if isinstance(buf, int) else memoryview(buf)
