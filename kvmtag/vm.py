"""A VM and its ioctls (virt/kvm/kvm_main.c kvm_vm_ioctl, arch/arm64/kvm/arm.c and mmu.c).

Every method returns what the kernel's ioctl handler returns: a result >= 0 or a negative
errno. Checks run in the kernel's order; each one names the rule of shared/KVM-SEMANTICS.md.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from kvmtag import copytags, dirtylog, uapi
from kvmtag.capabilities import check_extension
from kvmtag.memslots import Memslot, Memslots, segments_of
from kvmtag.profiles import HostConfig
from kvmtag.taglog import SlotTagLog
from kvmtag.tagstore import TagStore
from kvmtag.usermem import UserMemory, Vma, VmaKind
from kvmtag.vcpu import Vcpu

if TYPE_CHECKING:
    IoctlResult = int | Vcpu

KVM_MEM_MAX_NR_PAGES = 2**31 - 1
TAG_LOG_MAX_BYTES = 4 << 20  # packed tags returned by one KVMTAG_GET_TAG_LOG
_VALID_MEM_FLAGS = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
_U64 = 2**64 - 1


class Vm:
    """One VM: memslots, dirty logging, MTE state and vCPUs."""

    def __init__(
        self, config: HostConfig, tags: TagStore, process: Hashable, ipa_bits: int
    ) -> None:
        self.config = config
        self.tags = tags
        self.process = process  # the creator (kvm->mm): other processes get EIO
        self.ipa_bits = ipa_bits
        self.mte_enabled = False
        self.manual_dirty_log_protect = 0
        self.tag_log_enabled = False  # kvmtag's extension (kvmtag.taglog)
        self.memslots = Memslots()
        self.vcpus: dict[int, Vcpu] = {}
        # kvm->slots_lock: memslot changes, dirty-log ioctls and COPY_TAGS. A real lock: bulk
        # copies and guest work run on threads.
        self.slots_lock = threading.Lock()
        # Guards dirty bitmaps against guest stores running on other threads (the kernel uses
        # atomic bit operations for the same).
        self.dirty_lock = threading.Lock()
        self._handlers: dict[int, Callable[[UserMemory, int], IoctlResult]] = {
            uapi.KVM_CHECK_EXTENSION: lambda mm, arg: check_extension(self.config, arg),
            uapi.KVM_CREATE_VCPU: lambda mm, arg: self.create_vcpu(arg),
            uapi.KVM_ENABLE_CAP: self._ioctl_enable_cap,
            uapi.KVM_SET_USER_MEMORY_REGION: self._ioctl_set_user_memory_region,
            uapi.KVM_GET_DIRTY_LOG: self._ioctl_get_dirty_log,
            uapi.KVM_CLEAR_DIRTY_LOG: self._ioctl_clear_dirty_log,
            uapi.KVM_ARM_MTE_COPY_TAGS: self._ioctl_mte_copy_tags,
            uapi.KVM_ARM_PREFERRED_TARGET: self._ioctl_preferred_target,
            uapi.KVMTAG_GET_TAG_LOG: self._ioctl_get_tag_log,
        }

    # --- entry point -----------------------------------------------------------------------------

    def ioctl(self, mm: UserMemory, request: int, arg: int = 0) -> IoctlResult:
        """An ioctl on this VM's fd, as the kernel takes it: the request and its raw argument."""
        if mm.process != self.process:
            return -errno.EIO  # KVM refuses VM ioctls from any process but the creator
        handler = self._handlers.get(request)
        if handler is None:
            return -errno.EINVAL  # kvm_arch_vm_ioctl's default on arm64
        return handler(mm, arg)

    # --- KVM_CREATE_VCPU -------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> IoctlResult:
        if not 0 <= vcpu_id < self.config.max_vcpus:  # KVM_MAX_VCPU_IDS
            return -errno.EINVAL
        if len(self.vcpus) >= self.config.max_vcpus:
            return -errno.EINVAL
        if vcpu_id in self.vcpus:
            return -errno.EEXIST
        vcpu = self.vcpus[vcpu_id] = Vcpu(self, vcpu_id)
        return vcpu

    def drop_vcpu(self, vcpu_id: int) -> None:
        """KVM_CREATE_VCPU's error path once the vCPU exists but no fd can be made for it
        (kvm_vm_ioctl_create_vcpu: the vCPU is unlinked and destroyed, its id free again)."""
        self.vcpus.pop(vcpu_id, None)

    # --- KVM_ENABLE_CAP ----------------------------------------------------------------------

    def _ioctl_enable_cap(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvm_enable_cap")
        if fields is None:
            return -errno.EFAULT
        cap, flags, a0 = fields[0], fields[1], fields[2]
        return self.enable_cap(cap, flags, a0)

    def enable_cap(self, cap: int, flags: int, arg0: int) -> int:
        if cap == uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:  # the generic code's own cap
            allowed = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if arg0 & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = uapi.KVM_DIRTY_LOG_MANUAL_CAPS
            if flags or arg0 & ~allowed:
                return -errno.EINVAL
            self.manual_dirty_log_protect = arg0
            return 0
        if flags:  # arm64's kvm_vm_ioctl_enable_cap
            return -errno.EINVAL
        if cap == uapi.KVM_CAP_ARM_MTE:
            if self.vcpus:
                return -errno.EINVAL
            self.mte_enabled = True
            return 0
        if cap == uapi.KVMTAG_CAP_TAG_LOG:
            with self.slots_lock, self.dirty_lock:
                self.tag_log_enabled = True
                for slot in self.memslots:  # logging already: pages become valid when cleaned
                    if slot.dirty_bitmap is not None and slot.tag_log is None:
                        slot.tag_log = SlotTagLog(slot.npages, self.config.packed_per_page)
            return 0
        return -errno.EINVAL

    # --- KVM_SET_USER_MEMORY_REGION --------------------------------------------------------------

    def _ioctl_set_user_memory_region(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvm_userspace_memory_region")
        if fields is None:
            return -errno.EFAULT
        return self.set_user_memory_region(mm, *fields)

    def set_user_memory_region(
        self,
        mm: UserMemory,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
    ) -> int:
        config = self.config
        page_mask = config.page_size - 1
        if flags & ~_VALID_MEM_FLAGS:
            return -errno.EINVAL
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        if slot_id >= config.user_mem_slots:
            return -errno.EINVAL
        if memory_size & page_mask or guest_phys_addr & page_mask:
            return -errno.EINVAL
        if (
            userspace_addr & page_mask
            or _untagged(userspace_addr) != userspace_addr
            or userspace_addr + memory_size > 1 << config.task_size_bits  # access_ok()
        ):
            return -errno.EINVAL
        if as_id != 0:  # arm64 has one address space
            return -errno.EINVAL
        if guest_phys_addr + memory_size > _U64:
            return -errno.EINVAL
        npages = memory_size >> config.page_shift
        if npages > KVM_MEM_MAX_NR_PAGES:
            return -errno.EINVAL
        with self.slots_lock:
            return self._set_memslot(mm, slot_id, flags, guest_phys_addr, npages, userspace_addr)

    def _set_memslot(
        self, mm: UserMemory, slot_id: int, flags: int, gpa: int, npages: int, uaddr: int
    ) -> int:
        old = self.memslots.get(slot_id)
        if npages == 0:
            if old is None:
                return -errno.EINVAL
            self.memslots.remove(old)
            return 0
        base_gfn = gpa >> self.config.page_shift
        if old is not None:
            if (
                uaddr != old.userspace_addr
                or npages != old.npages
                or (flags ^ old.flags) & uapi.KVM_MEM_READONLY
            ):
                return -errno.EINVAL
            if base_gfn == old.base_gfn and flags == old.flags:
                return 0  # nothing to change
        moving = old is None or base_gfn != old.base_gfn
        if moving and self.memslots.overlaps(slot_id, base_gfn, base_gfn + npages):
            return -errno.EEXIST
        # kvm_arch_prepare_memory_region
        if base_gfn + npages > 1 << (self.ipa_bits - self.config.page_shift):
            return -errno.EFAULT
        vmas = mm.find_vmas(uaddr, uaddr + (npages << self.config.page_shift))
        for vma in vmas:
            if self.mte_enabled and not self._mte_allowed(vma):
                return -errno.EINVAL
            if vma.kind is VmaKind.OTHER and flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
                return -errno.EINVAL  # VM_PFNMAP: no dirty logging of IO regions
        # kvm_prepare_memory_region: a slot that keeps logging keeps its bitmap.
        bitmap, tag_log, fresh = None, None, False
        initially_set = bool(self.manual_dirty_log_protect & uapi.KVM_DIRTY_LOG_INITIALLY_SET)
        if flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            if old is not None and old.dirty_bitmap is not None:
                bitmap, tag_log = old.dirty_bitmap, old.tag_log
            else:
                bitmap, fresh = dirtylog.new_bitmap(npages, initially_set), True
                if self.tag_log_enabled:
                    tag_log = SlotTagLog(npages, self.config.packed_per_page)
        segments = segments_of(vmas, uaddr, npages, self.config.page_size, self.tags, self.process)
        new = Memslot(slot_id, flags, base_gfn, npages, uaddr, segments, bitmap, tag_log)
        with self.dirty_lock:
            if fresh and tag_log is not None and not initially_set:
                tag_log.save_all(new)  # logging on write-protects every page: all clean
            if old is not None:
                self.memslots.remove(old)
            self.memslots.add(new)
        return 0

    def _mte_allowed(self, vma: Vma) -> bool:
        """May this mapping back an MTE memslot? (kvm_vma_mte_allowed, and its history)"""
        profile = self.config.profile
        if not profile.mte_allowed_vma_rule:
            return not vma.shared  # before 6.2: any MAP_SHARED mapping was refused
        if vma.kind is VmaKind.HUGETLBFS:
            return profile.mte_hugetlbfs
        return vma.kind in (VmaKind.ANON, VmaKind.SHMEM)

    # --- dirty logging ---------------------------------------------------------------------------

    def _dirty_slot_id(self, slot: int) -> int | None:
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        if as_id != 0 or slot_id >= self.config.user_mem_slots:
            return None
        return slot_id

    def _ioctl_get_dirty_log(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvm_dirty_log")
        if fields is None:
            return -errno.EFAULT
        slot, _padding, bitmap_addr = fields
        slot_id = self._dirty_slot_id(slot)
        if slot_id is None:
            return -errno.EINVAL
        with self.slots_lock:
            memslot = self.memslots.get(slot_id)
            if memslot is None or memslot.dirty_bitmap is None:
                return -errno.ENOENT
            with self.dirty_lock:
                if self.manual_dirty_log_protect:
                    bits = bytes(memslot.dirty_bitmap)
                else:
                    # Fetched and cleared first: if the copy faults, the bits are lost, as in
                    # the kernel. The pages fetched are re-protected: clean, tags saved.
                    bits = dirtylog.fetch_and_clear(memslot.dirty_bitmap)
                    if memslot.tag_log is not None:
                        memslot.tag_log.save(memslot, bits)
            if mm.copy_to_user(bitmap_addr, bits) != len(bits):
                return -errno.EFAULT
            return 0

    def _ioctl_clear_dirty_log(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvm_clear_dirty_log")
        if fields is None:
            return -errno.EFAULT
        slot, num_pages, first_page, bitmap_addr = fields
        slot_id = self._dirty_slot_id(slot)
        if slot_id is None:
            return -errno.EINVAL
        if first_page & 63:
            return -errno.EINVAL
        with self.slots_lock:
            memslot = self.memslots.get(slot_id)
            if memslot is None or memslot.dirty_bitmap is None:
                return -errno.ENOENT
            npages = memslot.npages
            if (
                first_page > npages
                or num_pages > npages - first_page
                or (num_pages < npages - first_page and num_pages & 63)
            ):
                return -errno.EINVAL
            size = dirtylog.bitmap_bytes(num_pages)
            mask = bytearray(mm.copy_from_user(bitmap_addr, size))
            if len(mask) != size:
                return -errno.EFAULT
            with self.dirty_lock:
                dirtylog.clear_masked(memslot.dirty_bitmap, first_page, mask)
                if memslot.tag_log is not None:
                    memslot.tag_log.save(memslot, mask, first_page)  # the pages re-protected
            return 0

    def mark_page_dirty(self, gfn: int) -> None:
        """The guest stored to frame gfn (data or tags): set its bit if its slot logs."""
        slot = self.memslots.find(gfn)
        if slot is not None:
            with self.dirty_lock:
                self.page_stored_locked(slot, gfn - slot.base_gfn)

    def page_stored_locked(self, slot: Memslot, page: int) -> None:
        """A guest store to page (an offset in slot) happened; the dirty lock is held."""
        if slot.dirty_bitmap is not None:
            dirtylog.mark(slot.dirty_bitmap, page)
        if slot.tag_log is not None:
            slot.tag_log.discard(page)

    # --- KVMTAG_GET_TAG_LOG (kvmtag's extension) -----------------------------------------------

    def _ioctl_get_tag_log(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvmtag_tag_log")
        if fields is None:
            return -errno.EFAULT
        slot, flags, first_page, num_pages, tags_addr, valid_addr = fields
        if not self.tag_log_enabled or flags:
            return -errno.EINVAL
        slot_id = self._dirty_slot_id(slot)
        if slot_id is None or first_page & 63:
            return -errno.EINVAL
        if num_pages * self.config.packed_per_page > TAG_LOG_MAX_BYTES:
            return -errno.E2BIG
        with self.slots_lock:
            memslot = self.memslots.get(slot_id)
            if memslot is None or memslot.tag_log is None:
                return -errno.ENOENT
            if first_page > memslot.npages or num_pages > memslot.npages - first_page:
                return -errno.EINVAL
            with self.dirty_lock:
                tags, valid = memslot.tag_log.read(first_page, num_pages)
            if mm.copy_to_user(tags_addr, tags) != len(tags):
                return -errno.EFAULT
            if mm.copy_to_user(valid_addr, valid) != len(valid):
                return -errno.EFAULT
            return 0

    # --- KVM_ARM_PREFERRED_TARGET --------------------------------------------------------------

    def _ioctl_preferred_target(self, mm: UserMemory, arg: int) -> int:
        init = uapi.LAYOUT["kvm_vcpu_init"].pack(uapi.KVM_ARM_TARGET_GENERIC_V8, *[0] * 7)
        return 0 if mm.copy_to_user(arg, init) == len(init) else -errno.EFAULT

    # --- KVM_ARM_MTE_COPY_TAGS -------------------------------------------------------------------

    def _ioctl_mte_copy_tags(self, mm: UserMemory, arg: int) -> int:
        fields = _read_struct(mm, arg, "kvm_arm_copy_mte_tags")
        if fields is None:
            return -errno.EFAULT
        guest_ipa, length, addr, flags, r0, r1 = fields
        return self.mte_copy_tags(mm, guest_ipa, length, addr, flags, (r0, r1))

    def mte_copy_tags(
        self,
        mm: UserMemory,
        guest_ipa: int,
        length: int,
        addr: int,
        flags: int,
        reserved: tuple[int, int] = (0, 0),
    ) -> int:
        args = copytags.CopyTagsArgs(guest_ipa, length, addr, flags, reserved)
        ret = copytags.check(args, self.mte_enabled, self.config)
        if ret:
            return ret
        with self.slots_lock:
            to_guest = not flags & uapi.KVM_ARM_TAGS_FROM_GUEST
            if (
                to_guest
                and self.config.profile.copy_tags_busy_while_logging
                and self.memslots.logging()
            ):
                return -errno.EBUSY
            return copytags.copy(self.memslots, mm, args, self.config)


def _read_struct(mm: UserMemory, addr: int, name: str) -> tuple[int, ...] | None:
    """copy_from_user of a whole struct, unpacked; None if any of it faults."""
    layout = uapi.LAYOUT[name]
    data = mm.copy_from_user(addr, layout.size)
    if len(data) != layout.size:
        return None
    return layout.unpack(data)


def _untagged(addr: int) -> int:
    """arm64 untagged_addr(): the top byte replaced by the sign extension of bit 55."""
    low = addr & ((1 << 56) - 1)
    return low | (0xFF << 56) if addr >> 55 & 1 else low
