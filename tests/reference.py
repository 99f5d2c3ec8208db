"""A small, obviously correct reference of memslots and KVM_ARM_MTE_COPY_TAGS: a test oracle.

Written from shared/KVM-SEMANTICS.md (sections "Memslots", "Tags", "KVM_CAP_ARM_MTE" and
"KVM_ARM_MTE_COPY_TAGS", latest-kernel behaviour), never from kvmtag's code. It is slow on
purpose: one Python loop iteration per page, tags in a dict, no shared helpers with kvmtag
(even the numbers are restated here from the spec's table).

What it models:

- a VMM process as a list of mappings, each either private (its memory, and so its tags,
  belong to the process at that virtual page) or shared (they belong to the backing object:
  a memfd, a file or shared anonymous memory, at the file page); a read-only mapping cannot
  take a TO_GUEST copy and a PROT_NONE one cannot be reached at all ("memory that cannot be
  reached": EFAULT);
- tags as one dict for the whole host: memory identity -> PAGE_SIZE/16 tag bytes (0x0..0xF);
  a page absent from the dict has never been tagged and reads as zeros;
- VMs with memslots, MTE enable and vCPU count, and COPY_TAGS, whose user buffer is described
  by what can be read at `addr` before a fault (TO_GUEST) or how many bytes can be written there
  before a fault (FROM_GUEST);
- optionally, kvmtagd's limits on memslots (README.md, "Limits": written from that table, not
  from kvmtag.limits): memslots per VM (ENOSPC) and bytes of memslots per process (a slot
  alone larger: E2BIG; in all: ENOMEM), refused after the kernel's own checks, only for a
  slot being created, before the MTE check of its memory.

Results follow the kernel: a value >= 0, or a negative errno.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

# --- numbers from the spec's table -------------------------------------------------------------

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1

INT_MAX = 2**31 - 1
U64_LIMIT = 2**64
SLOT_LIMIT = 32767  # KVM_CAP_NR_MEMSLOTS on arm64: ids 0..32766
MAX_NR_PAGES = 2**31 - 1  # KVM_MEM_MAX_NR_PAGES, "the maximum page count"
DEFAULT_IPA_BITS = 40

# Mapping kinds, named like tests/drivers.py MEMORY_KINDS ("anon-readonly": PROT_READ anonymous
# memory, "anon-none": PROT_NONE anonymous memory).
MTE_ALLOWED_KINDS = frozenset(  # anonymous memory, shmem, and hugetlbfs (since 6.13)
    {"anon", "anon-readonly", "anon-none", "anon-shared", "memfd", "memfd-private", "hugetlbfs"}
)
SHARED_KINDS = frozenset({"anon-shared", "memfd", "file", "hugetlbfs"})
PRIVATE_KINDS = frozenset({"anon", "anon-readonly", "anon-none", "memfd-private", "file-private"})
READ_ONLY_KINDS = frozenset({"anon-readonly"})  # the kernel can read these pages, not write them
NO_ACCESS_KINDS = frozenset({"anon-none"})  # the kernel cannot reach these pages at all


# --- the VMM's address space ---------------------------------------------------------------------


@dataclass(eq=False)
class Backing:
    """Memory that can be mapped shared (a memfd, a file, shared anonymous memory). Compared by
    identity: two mappings of one Backing share its pages, and so their tags."""

    name: str = ""


@dataclass
class Mapping:
    start: int
    end: int
    kind: str
    backing: Backing | None  # for shared kinds: whose pages these are
    offset: int = 0  # byte offset of `start` in the backing


@dataclass(eq=False)
class Process:
    """A VMM process: the mappings the harness told us about. Anything else is unmapped."""

    name: str = ""
    mappings: list[Mapping] = field(default_factory=list)

    def map(
        self, start: int, size: int, kind: str, backing: Backing | None = None, offset: int = 0
    ) -> Backing | None:
        """Record a mapping; a shared kind without `backing` gets a new one. Returns it."""
        assert kind in SHARED_KINDS | PRIVATE_KINDS, kind
        for m in self.mappings:
            assert not (m.start < start + size and start < m.end), "mappings overlap"
        if kind in SHARED_KINDS and backing is None:
            backing = Backing(kind)
        if kind in PRIVATE_KINDS:
            backing = None
        self.mappings.append(Mapping(start, start + size, kind, backing, offset))
        return backing

    def mappings_in(self, start: int, end: int) -> list[Mapping]:
        return [m for m in self.mappings if m.start < end and start < m.end]

    def page_identity(
        self, hva: int, page_size: int, write: bool = False
    ) -> tuple[object, ...] | None:
        """Whose memory the host page at `hva` is, or None if the kernel cannot reach it: not
        (wholly) mapped, PROT_NONE, or read-only when it must `write` (get_user_pages)."""
        for m in self.mappings:
            if m.start <= hva and hva + page_size <= m.end:
                if m.kind in NO_ACCESS_KINDS or (write and m.kind in READ_ONLY_KINDS):
                    return None
                if m.backing is not None:  # shared: the backing's page
                    return ("shared", m.backing, (m.offset + hva - m.start) // page_size)
                return ("private", self, hva // page_size)  # private: this process's page
        return None


# --- the host, its VMs and their memslots -------------------------------------------------------


@dataclass
class Memslot:
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@dataclass
class UserBuffer:
    """The VMM's tag buffer at `addr`, as the kernel can reach it.

    readable: the bytes that can be read at addr before the first fault (TO_GUEST);
    writable: how many bytes can be written at addr before the first fault (FROM_GUEST).
    """

    readable: bytes = b""
    writable: int = 0


@dataclass
class CopyResult:
    ret: int
    written: bytes = b""  # what the kernel wrote at addr (FROM_GUEST), from addr on


@dataclass(frozen=True)
class Limits:
    """kvmtagd's memslot limits; None: unlimited (the kernel alone)."""

    memslots_per_vm: int | None = None
    bytes_per_process: int | None = None


class Host:
    """Physical memory's tags, shared by every VM and process of the host."""

    def __init__(self, page_size: int = 4096, limits: Limits | None = None) -> None:
        assert page_size in (4096, 16384, 65536)
        self.page_size = page_size
        self.tags: dict[tuple[object, ...], bytes] = {}
        self.limits = limits or Limits()
        self.vms: list[Vm] = []

    @property
    def tags_per_page(self) -> int:
        return self.page_size // 16

    def create_vm(self, process: Process, ipa_bits: int = DEFAULT_IPA_BITS) -> Vm:
        vm = Vm(self, process, ipa_bits)
        self.vms.append(vm)
        return vm

    def bytes_in_memslots(self, process: Process) -> int:
        return sum(
            s.npages * self.page_size
            for vm in self.vms
            if vm.process is process
            for s in vm.slots.values()
        )

    def read_tags(self, identity: tuple[object, ...]) -> bytes:
        return self.tags.get(identity, bytes(self.tags_per_page))  # never tagged: zeros


class Vm:
    def __init__(self, host: Host, process: Process, ipa_bits: int) -> None:
        self.host = host
        self.process = process
        self.ipa_bits = ipa_bits
        self.mte = False
        self.vcpus = 0
        self.slots: dict[int, Memslot] = {}

    # --- KVM_CAP_ARM_MTE and vCPUs ---------------------------------------------------------

    def enable_mte(self, flags: int = 0) -> int:
        if flags:
            return -errno.EINVAL
        if self.vcpus:
            return -errno.EINVAL
        self.mte = True
        return 0

    def create_vcpu(self) -> int:
        self.vcpus += 1
        return 0

    # --- KVM_SET_USER_MEMORY_REGION --------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> int:
        page = self.host.page_size
        if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            return -errno.EINVAL
        if guest_phys_addr % page or memory_size % page or userspace_addr % page:
            return -errno.EINVAL
        if userspace_addr >> 56:  # a pointer tag in the top byte
            return -errno.EINVAL
        address_space, slot_id = slot >> 16, slot & 0xFFFF
        if address_space != 0 or slot_id >= SLOT_LIMIT:
            return -errno.EINVAL
        if guest_phys_addr + memory_size >= U64_LIMIT:  # wraps
            return -errno.EINVAL
        npages = memory_size // page
        if npages > MAX_NR_PAGES:
            return -errno.EINVAL

        old = self.slots.get(slot_id)
        if npages == 0:  # delete
            if old is None:
                return -errno.EINVAL
            del self.slots[slot_id]
            return 0

        base_gfn = guest_phys_addr // page
        if old is not None:
            if (
                userspace_addr != old.userspace_addr
                or npages != old.npages
                or (flags ^ old.flags) & KVM_MEM_READONLY
            ):
                return -errno.EINVAL
            if base_gfn == old.base_gfn and flags == old.flags:
                return 0  # identical: a no-op
        moving = old is None or base_gfn != old.base_gfn  # created or moved
        if moving:
            for other in self.slots.values():
                if other.id == slot_id:
                    continue
                if other.base_gfn < base_gfn + npages and base_gfn < other.base_gfn + other.npages:
                    return -errno.EEXIST
        if base_gfn + npages > 2**self.ipa_bits // page:
            return -errno.EFAULT
        limits = self.host.limits
        if old is None:  # kvmtagd's limits, for a slot being created
            if limits.memslots_per_vm is not None and len(self.slots) >= limits.memslots_per_vm:
                return -errno.ENOSPC
            if limits.bytes_per_process is not None:
                if memory_size > limits.bytes_per_process:
                    return -errno.E2BIG
                in_use = self.host.bytes_in_memslots(self.process)
                if in_use + memory_size > limits.bytes_per_process:
                    return -errno.ENOMEM
        if self.mte:  # new, moved or flags changed: every mapping in it must allow MTE
            for m in self.process.mappings_in(userspace_addr, userspace_addr + memory_size):
                if m.kind not in MTE_ALLOWED_KINDS:
                    return -errno.EINVAL
        self.slots[slot_id] = Memslot(slot_id, flags, base_gfn, npages, userspace_addr)
        return 0

    # --- KVM_GET_DIRTY_LOG (only what COPY_TAGS can influence: nothing) -----------------------

    def get_dirty_log(self, slot: int) -> tuple[int, bytes]:
        """The result and the bitmap written: no guest runs, so nothing is ever dirty."""
        address_space, slot_id = slot >> 16, slot & 0xFFFF
        if address_space != 0 or slot_id >= SLOT_LIMIT:
            return -errno.EINVAL, b""
        memslot = self.slots.get(slot_id)
        if memslot is None or not memslot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return -errno.ENOENT, b""
        return 0, bytes((memslot.npages + 63) // 64 * 8)

    # --- KVM_ARM_MTE_COPY_TAGS ---------------------------------------------------------------

    def copy_tags(
        self,
        guest_ipa: int,
        length: int,
        buffer: UserBuffer,
        flags: int = KVM_ARM_TAGS_TO_GUEST,
        reserved: tuple[int, int] = (0, 0),
        struct_readable: bool = True,
    ) -> CopyResult:
        page = self.host.page_size
        tpp = self.host.tags_per_page
        # The checks, in the spec's order.
        if not struct_readable:
            return CopyResult(-errno.EFAULT)
        if not self.mte:
            return CopyResult(-errno.EINVAL)
        if reserved[0] or reserved[1]:
            return CopyResult(-errno.EINVAL)
        if flags & ~KVM_ARM_TAGS_FROM_GUEST:
            return CopyResult(-errno.EINVAL)
        if guest_ipa % page or length % page:
            return CopyResult(-errno.EINVAL)
        if length > INT_MAX:
            return CopyResult(-errno.EINVAL)
        to_guest = not flags & KVM_ARM_TAGS_FROM_GUEST
        if to_guest and any(s.flags & KVM_MEM_LOG_DIRTY_PAGES for s in self.slots.values()):
            return CopyResult(-errno.EBUSY)

        total = length // page
        done = 0
        written = bytearray()
        for i in range(total):
            gfn = guest_ipa // page + i
            slot = self._slot_of(gfn)
            if slot is None:
                break  # a hole in the guest's memory map: EFAULT
            if to_guest and slot.flags & KVM_MEM_READONLY:
                break
            hva = slot.userspace_addr + (gfn - slot.base_gfn) * page
            identity = self.process.page_identity(hva, page, write=to_guest)
            if identity is None:
                break  # a hole in the VMM's mappings, or memory it cannot reach
            first = i * tpp  # this page's tags start here in the buffer
            if to_guest:
                chunk = buffer.readable[first : first + tpp]
                if len(chunk) < tpp:
                    # The buffer faults inside this page's tags: never half-written, all zero.
                    self.host.tags[identity] = bytes(tpp)
                    break
                self.host.tags[identity] = bytes(b & 0xF for b in chunk)  # high nibble ignored
            else:
                tags = self.host.read_tags(identity)
                room = min(tpp, max(0, buffer.writable - first))
                written += tags[:room]
                if room < tpp:
                    break
            done += 1

        if done == total:
            return CopyResult(length, bytes(written))
        if done:
            return CopyResult(done * page, bytes(written))  # the errno is lost
        return CopyResult(-errno.EFAULT, bytes(written))

    def _slot_of(self, gfn: int) -> Memslot | None:
        for s in self.slots.values():
            if s.contains(gfn):
                return s
        return None
