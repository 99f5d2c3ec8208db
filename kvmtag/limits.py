"""kvmtagd's resource limits: what one client process, one VM and the whole daemon may hold.

The kernel model allocates what it is asked for (a memslot's dirty bitmap and tag log, tag
storage for every page tagged); a daemon serving many VMMs at once must not. `Quota` stands
between the server and the model: the server makes every model call through `Quota.ioctl`,
which refuses a request that would take a client past a limit before the model allocates
anything, with a clear errno and a log line, and accounts for what each call created.

Limits are checked after the kernel's own checks, so a request the kernel refuses keeps the
kernel's errno: a memslot of 2**31 pages is EINVAL, as on a real host, whatever the limits. Each
memslot-creating request is read once (its struct is served from that copy to the model), so a
client cannot show one size to the check and another to the model.

    max_vms            VMs of one process            KVM_CREATE_VM: ENOMEM
    max_memslots       memslots of one VM            a new memslot: ENOSPC
    max_guest_memory   memslot bytes of a process    a larger memslot: E2BIG; in all: ENOMEM
    max_tag_storage    packed tags of the daemon     COPY_TAGS to the guest: ENOSPC

The server applies the others itself (connections: EMFILE; requests in flight: queued; backing
fds: tags-only). Dirty bitmaps (a bit per page) and tag logs (PAGE_SIZE/32 bytes per logged page)
scale with guest memory, so `max_guest_memory` bounds them too; the emulated guest's own tag
stores stay within its memslots, so they are bounded by the same limit.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any

from kvmtag import copytags, uapi
from kvmtag.host import Host, KvmFile
from kvmtag.usermem import Buffer, UserMemory, Vma
from kvmtag.vcpu import Vcpu
from kvmtag.vm import KVM_MEM_MAX_NR_PAGES, Vm

log = logging.getLogger("kvmtag.daemon")

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class Limits:
    """Every bound kvmtagd enforces, with its default. The defaults serve a 64 GiB guest with
    30,000 memslots and 512 vCPUs, plus a second guest of that size in the same process (a
    migration's source and destination), with room to spare."""

    # per daemon
    max_connections: int = 8192  # open connections (system, VM and vCPU fds) of all clients
    threads: int = 32  # requests that reach user memory or run the guest, at once
    max_tag_storage: int = 8 * GiB  # packed tags held (a 64 GiB guest fully tagged: 2 GiB)
    # per client process
    max_connections_per_process: int = 1024  # open files: 512 vCPUs, VMs, /dev/kvm opens
    max_requests_per_process: int = 16  # such requests of one process at once; more wait
    max_vms: int = 64
    max_guest_memory: int = 128 * GiB  # bytes in memslots, over all the process's VMs
    # Backing-memory fds held; more mappings are tags-only. Generous: a fd not held lets the
    # VMM's closed memfd's inode number be reused under its tags (README, known differences).
    max_backing_fds: int = 16384
    # per VM
    max_memslots: int = 32767  # the kernel's KVM_USER_MEM_SLOTS on arm64

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1")


def parse_size(text: str) -> int:
    """A byte count: digits with an optional K, M, G or T suffix (powers of 1024)."""
    text = text.strip()
    scale = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit():
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64M, 128G)")
    return int(digits) * scale


def format_size(n: int) -> str:
    for unit, size in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class Quota:
    """The daemon's accounts, and the model calls that respect them. Thread-safe: calls come
    from the event loop and from connection threads.

    `fd_available(process)` tells whether a process may open one more file (a VM or vCPU
    connection): 0, or the errno that refuses it (EMFILE: the process's limit, ENFILE: the
    daemon's); the server answers it from its connection counts.
    """

    def __init__(
        self,
        host: Host,
        limits: Limits | None = None,
        fd_available: Callable[[Hashable], int] = lambda process: 0,
    ) -> None:
        self.host = host
        self.limits = limits or Limits()
        self.fd_available = fd_available
        self._lock = threading.Lock()
        self._vms: dict[Hashable, set[Vm]] = {}  # live VMs by creating process
        self._vm_bytes: dict[Vm, int] = {}  # bytes in each live VM's memslots
        self._process_bytes: dict[Hashable, int] = {}  # the sum, per process, plus reserved

    # --- the model calls --------------------------------------------------------------------

    def ioctl(self, target: KvmFile | Vm | Vcpu, mm: UserMemory, request: int, arg: int
              ) -> int | Vm | Vcpu:  # fmt: skip
        """`target.ioctl(mm, request, arg)`, unless a limit refuses it (a negative errno)."""
        if isinstance(target, KvmFile) and request == uapi.KVM_CREATE_VM:
            return self._create_vm(target, mm, arg)
        if isinstance(target, Vm) and mm.process == target.process:
            if request == uapi.KVM_CREATE_VCPU:
                return self._create_vcpu(target, mm, arg)
            if request == uapi.KVM_SET_USER_MEMORY_REGION:
                return self._set_user_memory_region(target, mm, arg)
            if request == uapi.KVM_ARM_MTE_COPY_TAGS:
                return self._copy_tags(target, mm, arg)
        return target.ioctl(mm, request, arg)

    def _create_vm(self, kvm: KvmFile, mm: UserMemory, vm_type: int) -> int | Vm:
        # The model's KVM_CREATE_VM has no side effect but the object: let it check the type
        # first (EINVAL wins, as in the kernel), then count the VM or drop it.
        result = kvm.ioctl(mm, uapi.KVM_CREATE_VM, vm_type)
        if not isinstance(result, Vm):
            return result
        process = mm.process
        with self._lock:
            held = len(self._vms.get(process, ()))
            if held >= self.limits.max_vms:
                return self._refuse(errno.ENOMEM, process, f"holds {held} VMs (--max-vms)")
            err = self.fd_available(process)
            if err:
                return self._refuse(err, process, "has no file left for a new VM")
            self._vms.setdefault(process, set()).add(result)
            self._vm_bytes[result] = 0
            self._process_bytes.setdefault(process, 0)
        return result

    def _create_vcpu(self, vm: Vm, mm: UserMemory, vcpu_id: int) -> int | Vcpu:
        # Fails only as the kernel would fail it (id range, count, EEXIST), then: no file left.
        valid = 0 <= vcpu_id < vm.config.max_vcpus and len(vm.vcpus) < vm.config.max_vcpus
        if valid and vcpu_id not in vm.vcpus:
            err = self.fd_available(vm.process)
            if err:
                return self._refuse(err, vm.process, "has no file left for a new vCPU")
        return vm.ioctl(mm, uapi.KVM_CREATE_VCPU, vcpu_id)

    def _set_user_memory_region(self, vm: Vm, mm: UserMemory, arg: int) -> int:
        read = _pin_struct(mm, arg, "kvm_userspace_memory_region")
        if read is None:
            return -errno.EFAULT
        pinned, (slot, flags, gpa, size, uaddr) = read
        created = _creates_memslot(vm, slot, flags, gpa, size, uaddr)
        slot_id = slot & 0xFFFF
        old = vm.memslots.get(slot_id)
        before = old.npages << vm.config.page_shift if old is not None else 0
        process = vm.process
        reserved = 0
        if created:
            limits = self.limits
            with self._lock:
                if len(vm.memslots) >= limits.max_memslots:
                    return self._refuse(errno.ENOSPC, process,
                                        f"VM has {len(vm.memslots)} memslots (--max-memslots)")
                in_use = self._process_bytes.get(process, 0)
                if size > limits.max_guest_memory:
                    return self._refuse(errno.E2BIG, process, f"a memslot of {size} bytes is "
                                        "larger than --max-guest-memory")  # fmt: skip
                if in_use + size > limits.max_guest_memory:
                    return self._refuse(errno.ENOMEM, process, f"has {in_use} bytes of guest "
                                        f"memory; {size} more exceed --max-guest-memory")
                reserved = size
                self._process_bytes[process] = in_use + size
        result = -errno.EFAULT
        try:
            result = vm.ioctl(pinned, uapi.KVM_SET_USER_MEMORY_REGION, arg)  # type: ignore[assignment]
        finally:
            now = vm.memslots.get(slot_id)
            after = now.npages << vm.config.page_shift if now is not None else 0
            with self._lock:
                change = -reserved
                if vm in self._vm_bytes:  # (a VM this quota counts)
                    self._vm_bytes[vm] += after - before
                    change += after - before
                if process in self._process_bytes:
                    self._process_bytes[process] += change
        return result

    def _copy_tags(self, vm: Vm, mm: UserMemory, arg: int) -> int:
        read = _pin_struct(mm, arg, "kvm_arm_copy_mte_tags")
        if read is None:
            return -errno.EFAULT
        pinned, (ipa, length, addr, flags, r0, r1) = read
        args = copytags.CopyTagsArgs(ipa, length, addr, flags, (r0, r1))
        # Only a TO_GUEST copy the kernel would carry out can allocate tag storage.
        if (
            not flags & uapi.KVM_ARM_TAGS_FROM_GUEST
            and length
            and not copytags.check(args, vm.mte_enabled, vm.config)
        ):
            in_use = self.host.tags.nbytes
            if in_use >= self.limits.max_tag_storage:
                return self._refuse(errno.ENOSPC, vm.process, f"the daemon holds {in_use} "
                                    "bytes of tags (--max-tag-storage)")  # fmt: skip
        result = vm.ioctl(pinned, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
        assert isinstance(result, int)
        return result

    def _refuse(self, err: int, process: Hashable, why: str) -> int:
        log.warning("limit: client process %s %s: %s", process, why, errno.errorcode[err])
        return -err

    # --- lifetimes --------------------------------------------------------------------------

    def vm_released(self, vm: Vm) -> None:
        """No fd refers to the VM any more: its memslots and its place are free."""
        with self._lock:
            size = self._vm_bytes.pop(vm, None)
            if size is None:
                return
            vms = self._vms.get(vm.process)
            if vms is not None:
                vms.discard(vm)
            if vm.process in self._process_bytes:
                self._process_bytes[vm.process] -= size

    def process_released(self, process: Hashable) -> None:
        """The client process is gone: forget everything it held."""
        with self._lock:
            for vm in self._vms.pop(process, set()):
                self._vm_bytes.pop(vm, None)
            self._process_bytes.pop(process, None)

    # --- figures ----------------------------------------------------------------------------

    def vms(self, process: Hashable | None = None) -> int:
        with self._lock:
            if process is not None:
                return len(self._vms.get(process, ()))
            return sum(len(v) for v in self._vms.values())

    def guest_memory(self, process: Hashable | None = None) -> int:
        """Bytes in memslots (and reserved for memslots being created)."""
        with self._lock:
            if process is not None:
                return self._process_bytes.get(process, 0)
            return sum(self._process_bytes.values())

    def check(self) -> None:
        """Assert that the accounts agree with the model (tests and the fuzzer call this)."""
        with self._lock:
            for process, vms in self._vms.items():
                total = 0
                for vm in vms:
                    real = sum(s.npages for s in vm.memslots) << vm.config.page_shift
                    assert self._vm_bytes[vm] == real, (process, self._vm_bytes[vm], real)
                    total += real
                assert self._process_bytes[process] == total, (process, total)
            assert set(self._vm_bytes) == {vm for vms in self._vms.values() for vm in vms}


def _creates_memslot(vm: Vm, slot: int, flags: int, gpa: int, size: int, uaddr: int) -> bool:
    """Would KVM_SET_USER_MEMORY_REGION create a memslot, if the memory's MTE rule allows? (The
    kernel's checks of kvm_set_memory_region and kvm_arch_prepare_memory_region, in vm.py's
    order, up to where memory is allocated: False if any of them refuses, or for a change to
    an existing slot, which keeps its size.)"""
    config = vm.config
    mask = config.page_size - 1
    slot_id = slot & 0xFFFF
    if flags & ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
        return False
    if slot_id >= config.user_mem_slots or slot >> 16 != 0:
        return False
    if size & mask or gpa & mask or uaddr & mask:
        return False
    top = uaddr >> 55 & 1
    untagged = uaddr & ((1 << 56) - 1) | (0xFF << 56 if top else 0)
    if untagged != uaddr or uaddr + size > 1 << config.task_size_bits:
        return False
    if gpa + size > 2**64 - 1:
        return False
    npages = size >> config.page_shift
    if npages == 0 or npages > KVM_MEM_MAX_NR_PAGES:
        return False
    if vm.memslots.get(slot_id) is not None:
        return False
    base_gfn = gpa >> config.page_shift
    if vm.memslots.overlaps(slot_id, base_gfn, base_gfn + npages):
        return False
    return base_gfn + npages <= 1 << (vm.ipa_bits - config.page_shift)


def _pin_struct(mm: UserMemory, arg: int, name: str) -> tuple[_Pinned, tuple[Any, ...]] | None:
    """The struct `name` at arg, read once (None: it faults) and its fields; the caller's
    memory with that copy pinned, so the model sees what the limit checked."""
    layout = uapi.LAYOUT[name]
    data = bytes(mm.copy_from_user(arg, layout.size))
    if len(data) != layout.size:
        return None
    return _Pinned(mm, arg, data), layout.unpack(data)


class _Pinned:
    """The caller's memory, with the struct at `addr` served from the copy already read."""

    def __init__(self, mm: UserMemory, addr: int, data: bytes) -> None:
        self._mm, self._addr, self._data = mm, addr, data

    @property
    def process(self) -> Hashable:
        return self._mm.process

    def copy_from_user(self, addr: int, size: int) -> Buffer:
        if addr == self._addr and size <= len(self._data):
            return self._data[:size]
        return self._mm.copy_from_user(addr, size)

    def copy_to_user(self, addr: int, data: Buffer) -> int:
        return self._mm.copy_to_user(addr, data)

    def find_vmas(self, start: int, end: int) -> list[Vma]:
        return list(self._mm.find_vmas(start, end))

    def bounce_buffer(self, size: int) -> memoryview:
        return self._mm.bounce_buffer(size)
