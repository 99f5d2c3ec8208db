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
import mmap as _mmap
import os
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


def _pinned(buf: int | ReadableBuffer) -> contextlib.AbstractContextManager[object]:
    """Hold a memoryview of a buffer so it can neither be resized nor closed meanwhile."""
    return contextlib.nullcontext() if isinstance(buf, int) else memoryview(buf)
