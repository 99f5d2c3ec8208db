"""The rules of shared/KVM-SEMANTICS.md as one table of data, run through any `Driver`.

Each `Case` names a VM to build (`VmSpec`), one operation, and the kernel's answer: a result or
an errno name. Addresses and sizes are in host pages wherever the kernel counts in pages, so the
same table holds at 4, 16 and 64 KiB pages. Post-conditions that need more than the result are
checked by `then`, with the `World` the case built.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmtag import uapi
from kvmtag.uapi import LAYOUT

from .drivers import Driver

GFN0 = 0x100  # first guest frame of the default slot


@dataclass(frozen=True)
class Slot:
    id: int = 0
    gfn: int = GFN0
    pages: int = 8
    kind: str = "anon"  # private anonymous: MTE-capable under every kernel profile
    flags: int = 0
    mapped_pages: int | None = None  # map only this many pages: the rest is a hole


@dataclass(frozen=True)
class VmSpec:
    mte: bool = True
    manual: int = 0  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0], enabled before slots if set
    slots: tuple[Slot, ...] = (Slot(),)
    vcpus: int = 0
    vm_type: int = 0
    create: bool = True  # False: the case starts from the system fd only


@dataclass
class World:
    driver: Driver
    kvm: int
    vm: int = -1
    uaddr: dict[int, int] = field(default_factory=dict)  # slot id -> userspace_addr
    vcpus: list[int] = field(default_factory=list)

    @property
    def page(self) -> int:
        return self.driver.page_size

    @property
    def tpp(self) -> int:
        return self.driver.page_size // 16


def region(slot: int, flags: int, gpa: int, size: int, uaddr: int) -> bytes:
    return LAYOUT["kvm_userspace_memory_region"].pack(slot, flags, gpa, size, uaddr)


def enable_cap(cap: int, flags: int = 0, arg0: int = 0) -> bytes:
    return LAYOUT["kvm_enable_cap"].pack(cap, flags, arg0, 0, 0, 0, bytes(64))


def build(driver: Driver, spec: VmSpec) -> World:
    world = World(driver, driver.open())
    if not spec.create:
        return world
    world.vm, _ = driver.ioctl(world.kvm, uapi.KVM_CREATE_VM, spec.vm_type)
    if spec.manual:
        driver.ioctl(
            world.vm, uapi.KVM_ENABLE_CAP,
            enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, spec.manual),
        )
    if spec.mte:
        driver.ioctl(world.vm, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE))
    page = driver.page_size
    for s in spec.slots:
        mapped = s.pages if s.mapped_pages is None else s.mapped_pages
        if mapped == s.pages:
            uaddr = driver.mmap(s.pages * page, s.kind)
        else:  # only the first pages mapped: the rest of the range is a hole
            uaddr = driver.mmap_with_hole(s.pages * page, mapped * page, s.kind)
        world.uaddr[s.id] = uaddr
        driver.ioctl(
            world.vm, uapi.KVM_SET_USER_MEMORY_REGION,
            region(s.id, s.flags, s.gfn * page, s.pages * page, uaddr),
        )
    for i in range(spec.vcpus):
        world.vcpus.append(driver.ioctl(world.vm, uapi.KVM_CREATE_VCPU, i)[0])
    return world


# --- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ioctl:
    """A raw ioctl on the system ("kvm") or VM ("vm") fd with an integer argument."""

    request: int
    arg: int = 0
    fd: str = "vm"

    def __call__(self, w: World) -> int:
        return w.driver.ioctl(getattr(w, self.fd), self.request, self.arg)[0]


@dataclass(frozen=True)
class StructFault:
    """The struct pointer itself faults."""

    request: int
    fd: str = "vm"

    def __call__(self, w: World) -> int:
        return w.driver.ioctl(getattr(w, self.fd), self.request, w.driver.unmapped())[0]


@dataclass(frozen=True)
class EnableCap:
    cap: int
    flags: int = 0
    arg0: int = 0

    def __call__(self, w: World) -> int:
        arg = enable_cap(self.cap, self.flags, self.arg0)
        return w.driver.ioctl(w.vm, uapi.KVM_ENABLE_CAP, arg)[0]


@dataclass(frozen=True)
class SetRegion:
    """KVM_SET_USER_MEMORY_REGION. uaddr: "new" maps fresh memory of `kind`, "slotN" reuses
    slot N's, "unmapped" an address nothing is mapped at; byte offsets misalign on purpose."""

    slot: int = 1
    gfn: int = 0x1000
    pages: int = 4
    flags: int = 0
    kind: str = "anon"
    uaddr: str = "new"
    gpa_offset: int = 0
    size_offset: int = 0
    uaddr_offset: int = 0
    raw_gpa: int | None = None

    def __call__(self, w: World) -> int:
        page = w.page
        if self.uaddr == "new":
            uaddr = w.driver.mmap(max(self.pages, 1) * page, self.kind)
        elif self.uaddr == "unmapped":
            uaddr = w.driver.mmap_with_hole(max(self.pages, 1) * page, 0, "anon")
        else:
            uaddr = w.uaddr[int(self.uaddr.removeprefix("slot"))]
        gpa = self.gfn * page if self.raw_gpa is None else self.raw_gpa
        arg = region(
            self.slot, self.flags, gpa + self.gpa_offset,
            self.pages * page + self.size_offset, uaddr + self.uaddr_offset,
        )
        return w.driver.ioctl(w.vm, uapi.KVM_SET_USER_MEMORY_REGION, arg)[0]


@dataclass(frozen=True)
class CopyTags:
    """KVM_ARM_MTE_COPY_TAGS. buffer: "rw", "unmapped", "readonly", or "edge" (only
    `edge_tags` tag bytes readable/writable, then a fault)."""

    gfn: int = GFN0
    pages: int = 4
    flags: int = uapi.KVM_ARM_TAGS_TO_GUEST
    reserved: tuple[int, int] = (0, 0)
    buffer: str = "rw"
    edge_pages: float = 0  # with buffer="edge": how many pages of tags precede the fault
    ipa_offset: int = 0
    length: int | None = None  # bytes, overriding pages

    def __call__(self, w: World) -> int:
        length = self.pages * w.page if self.length is None else self.length
        nbytes = min(length // 16, 1 << 20)
        data = bytes(i % 16 for i in range(nbytes))
        if self.buffer == "rw":
            addr = w.driver.buffer(data)
        elif self.buffer == "unmapped":
            addr = w.driver.unmapped()
        elif self.buffer == "readonly":
            addr = w.driver.readonly(data)
        else:
            addr = w.driver.edge(data[: int(self.edge_pages * w.tpp)])
        arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(
            self.gfn * w.page + self.ipa_offset, length, addr, self.flags, *self.reserved
        )
        return w.driver.ioctl(w.vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)[0]


@dataclass(frozen=True)
class GetDirtyLog:
    slot: int = 0
    bitmap: str = "rw"

    def __call__(self, w: World) -> int:
        addr = w.driver.buffer(4096) if self.bitmap == "rw" else w.driver.unmapped()
        arg = LAYOUT["kvm_dirty_log"].pack(self.slot, 0, addr)
        return w.driver.ioctl(w.vm, uapi.KVM_GET_DIRTY_LOG, arg)[0]


@dataclass(frozen=True)
class ClearDirtyLog:
    slot: int = 0
    first_page: int = 0
    num_pages: int = 64
    bitmap: str = "rw"

    def __call__(self, w: World) -> int:
        addr = w.driver.buffer(b"\xff" * 4096) if self.bitmap == "rw" else w.driver.unmapped()
        arg = LAYOUT["kvm_clear_dirty_log"].pack(self.slot, self.num_pages, self.first_page, addr)
        return w.driver.ioctl(w.vm, uapi.KVM_CLEAR_DIRTY_LOG, arg)[0]


def tag_pattern(nbytes: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 16 for i in range(nbytes))


def read_tags(w: World, gfn: int, pages: int) -> bytes:
    addr = w.driver.buffer(pages * w.tpp)
    arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(gfn * w.page, pages * w.page, addr, FROM, 0, 0)
    assert w.driver.ioctl(w.vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)[0] == pages * w.page
    return w.driver.read(addr, pages * w.tpp)


@dataclass(frozen=True)
class RetagWithFault:
    """Tag 4 pages (pattern A), then copy pattern B over them from a buffer that faults half-way
    through page 2: returns the second copy's result."""

    def __call__(self, w: World) -> int:
        first = tag_pattern(4 * w.tpp, 3)
        arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(GFN0 * w.page, 4 * w.page,
                                                   w.driver.buffer(first), TO, 0, 0)
        w.driver.ioctl(w.vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
        second = tag_pattern(4 * w.tpp, 9)[: 2 * w.tpp + w.tpp // 2]
        arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(GFN0 * w.page, 4 * w.page,
                                                   w.driver.edge(second), TO, 0, 0)
        return w.driver.ioctl(w.vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)[0]


def faulted_page_contents(w: World) -> None:
    """Since 6.2 the faulting page is cleared; before, it keeps what was copied, then the rest
    of its old tags. Pages before it have the new tags, pages after it the old ones."""
    tpp = w.tpp
    old, new = tag_pattern(4 * tpp, 3), tag_pattern(4 * tpp, 9)
    got = read_tags(w, GFN0, 4)
    assert got[: 2 * tpp] == new[: 2 * tpp]
    if w.driver.profile == "5.14":
        assert got[2 * tpp : 3 * tpp] == new[2 * tpp : 2 * tpp + tpp // 2] + old[2 * tpp + tpp // 2 : 3 * tpp]
    else:
        assert got[2 * tpp : 3 * tpp] == bytes(tpp)
    assert got[3 * tpp :] == old[3 * tpp :]


def vcpu_init(target: int = uapi.KVM_ARM_TARGET_GENERIC_V8, *features: int) -> bytes:
    return LAYOUT["kvm_vcpu_init"].pack(target, *(features + (0,) * 7)[:7])


@dataclass(frozen=True)
class VcpuIoctl:
    """An ioctl on vCPU 0 (after KVM_ARM_VCPU_INIT if `init`). `arg`: a value, struct bytes, or
    "reg:NAME" / "reg:ID" for a kvm_one_reg pointing at an 8-byte buffer."""

    request: int
    arg: int | bytes | str = 0
    init: bool = False

    def __call__(self, w: World) -> int:
        vcpu = w.vcpus[0]
        if self.init:
            w.driver.ioctl(vcpu, uapi.KVM_ARM_VCPU_INIT, vcpu_init())
        arg = self.arg
        if isinstance(arg, str):
            name = arg.removeprefix("reg:")
            reg = uapi.CORE_REGS[name] if name in uapi.CORE_REGS else int(name, 0)
            arg = LAYOUT["kvm_one_reg"].pack(reg, w.driver.buffer(8))
        return w.driver.ioctl(vcpu, self.request, arg)[0]


# --- expectations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pages:
    """A result of n host pages' worth of bytes (COPY_TAGS)."""

    n: int


PROFILE_ORDER = ("5.14", "6.2", "6.4", "6.12", "latest")


def before(profile: str, expect: int | str | Pages) -> dict[str, int | str | Pages]:
    """An expectation for every kernel profile older than `profile`."""
    return {p: expect for p in PROFILE_ORDER[: PROFILE_ORDER.index(profile)]}


@dataclass(frozen=True)
class Case:
    name: str
    op: Callable[[World], int]
    expect: int | str | Pages  # a result, an errno name, or Pages
    vm: VmSpec = VmSpec()
    then: Callable[[World], None] | None = None
    older: dict[str, int | str | Pages] = field(default_factory=dict)  # per-profile answers
    since: str = "5.14"  # the case exists from this profile on (e.g. needs shared memory)

    def applies(self, profile: str) -> bool:
        return PROFILE_ORDER.index(profile) >= PROFILE_ORDER.index(self.since)

    def run(self, driver: Driver) -> None:
        world = build(driver, self.vm)
        try:
            got: int | str = self.op(world)
        except OSError as e:
            got = errno.errorcode[e.errno or 0]
        expect = self.older.get(driver.profile, self.expect)
        want = expect.n * driver.page_size if isinstance(expect, Pages) else expect
        if want == "fd":  # CREATE_VM / CREATE_VCPU: any new file descriptor
            assert isinstance(got, int) and got >= 0, f"{self.name}: got {got!r}, want an fd"
        else:
            assert got == want, f"{self.name}: got {got!r}, want {want!r}"
        if self.then is not None:
            self.then(world)


NO_VM = VmSpec(create=False)
NO_MTE = VmSpec(mte=False)
LOGGING = VmSpec(slots=(Slot(flags=uapi.KVM_MEM_LOG_DIRTY_PAGES),))
INT_MAX = 2**31 - 1
TO, FROM = uapi.KVM_ARM_TAGS_TO_GUEST, uapi.KVM_ARM_TAGS_FROM_GUEST
LOG, RO = uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY

SYSTEM_CASES = [
    Case("api version", Ioctl(uapi.KVM_GET_API_VERSION, fd="kvm"), 12, NO_VM),
    Case("api version with an argument", Ioctl(uapi.KVM_GET_API_VERSION, 1, "kvm"), "EINVAL", NO_VM),
    Case("unknown system ioctl", Ioctl(0xAEFF, fd="kvm"), "EINVAL", NO_VM),
    Case("copy tags on the system fd", Ioctl(uapi.KVM_ARM_MTE_COPY_TAGS, fd="kvm"), "EINVAL", NO_VM),
    Case("unknown VM ioctl", Ioctl(0xAEFF), "EINVAL"),
    Case("mmap size: two host pages", Ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE, fd="kvm"), Pages(2), NO_VM),
    Case("mmap size with an argument", Ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE, 1, "kvm"), "EINVAL", NO_VM),
    Case("create VM, default IPA", Ioctl(uapi.KVM_CREATE_VM, 0, "kvm"), "fd", NO_VM),
    Case("create VM, 32-bit IPA", Ioctl(uapi.KVM_CREATE_VM, 32, "kvm"), "fd", NO_VM),
    Case("create VM, 48-bit IPA", Ioctl(uapi.KVM_CREATE_VM, 48, "kvm"), "fd", NO_VM),
    Case("create VM, IPA below 32", Ioctl(uapi.KVM_CREATE_VM, 31, "kvm"), "EINVAL", NO_VM),
    Case("create VM, IPA above limit", Ioctl(uapi.KVM_CREATE_VM, 49, "kvm"), "EINVAL", NO_VM),
    Case("create VM, unknown type bit", Ioctl(uapi.KVM_CREATE_VM, 0x100, "kvm"), "EINVAL", NO_VM),
    Case("create VM, protected type", Ioctl(uapi.KVM_CREATE_VM, 1 << 31, "kvm"), "EINVAL", NO_VM),
] + [
    Case(f"check extension {name} on {fd}", Ioctl(uapi.KVM_CHECK_EXTENSION, cap, fd), value)
    for fd in ("kvm", "vm")
    for name, cap, value in (
        ("MTE", uapi.KVM_CAP_ARM_MTE, 1),
        ("MANUAL_DIRTY_LOG_PROTECT2", uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3),
        ("ARM_VM_IPA_SIZE", uapi.KVM_CAP_ARM_VM_IPA_SIZE, 48),
        ("NR_MEMSLOTS", uapi.KVM_CAP_NR_MEMSLOTS, 32767),
        ("USER_MEMORY", uapi.KVM_CAP_USER_MEMORY, 1),
        ("READONLY_MEM", uapi.KVM_CAP_READONLY_MEM, 1),
        ("ONE_REG", uapi.KVM_CAP_ONE_REG, 1),
        ("CHECK_EXTENSION_VM", uapi.KVM_CAP_CHECK_EXTENSION_VM, 1),
        ("IMMEDIATE_EXIT", uapi.KVM_CAP_IMMEDIATE_EXIT, 1),
        ("MAX_VCPUS", uapi.KVM_CAP_MAX_VCPUS, 512),
        ("unknown", 9999, 0),
    )
]

VM_CASES = [
    Case("enable MTE", EnableCap(uapi.KVM_CAP_ARM_MTE), 0, NO_MTE),
    Case("enable MTE twice", EnableCap(uapi.KVM_CAP_ARM_MTE), 0),
    Case("enable MTE with flags", EnableCap(uapi.KVM_CAP_ARM_MTE, flags=1), "EINVAL", NO_MTE),
    Case("enable MTE after a vCPU", EnableCap(uapi.KVM_CAP_ARM_MTE), "EINVAL", VmSpec(vcpus=1)),
    Case("enable MTE ignores args", EnableCap(uapi.KVM_CAP_ARM_MTE, arg0=7), 0, NO_MTE),
    Case("enable an unknown cap", EnableCap(9999), "EINVAL"),
    Case("enable a cap that only reports", EnableCap(uapi.KVM_CAP_USER_MEMORY), "EINVAL"),
    Case("enable cap: struct faults", StructFault(uapi.KVM_ENABLE_CAP), "EFAULT"),
    Case("manual protect: enable", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 1), 0),
    Case("manual protect: enable|init", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 3), 0),
    Case("manual protect: disable", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 0), 0),
    Case("manual protect: init alone", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 2),
         "EINVAL"),
    Case("manual protect: unknown bit", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 5),
         "EINVAL"),
    Case("manual protect: flags", EnableCap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, 1),
         "EINVAL"),
    Case("create vCPU 0", Ioctl(uapi.KVM_CREATE_VCPU, 0), "fd"),
    Case("create vCPU 511", Ioctl(uapi.KVM_CREATE_VCPU, 511), "fd"),
    Case("create vCPU 512", Ioctl(uapi.KVM_CREATE_VCPU, 512), "EINVAL"),
    Case("create vCPU twice", Ioctl(uapi.KVM_CREATE_VCPU, 0), "EEXIST", VmSpec(vcpus=1)),
]

MEMSLOT_CASES = [
    Case("new slot", SetRegion(), 0),
    Case("new slot, READONLY and logging", SetRegion(flags=LOG | RO), 0),
    Case("unknown flag", SetRegion(flags=4), "EINVAL"),
    Case("struct faults", StructFault(uapi.KVM_SET_USER_MEMORY_REGION), "EFAULT"),
    Case("size not page aligned", SetRegion(size_offset=16), "EINVAL"),
    Case("gpa not page aligned", SetRegion(gpa_offset=16), "EINVAL"),
    Case("userspace_addr not page aligned", SetRegion(uaddr_offset=16), "EINVAL"),
    Case("userspace_addr with a pointer tag", SetRegion(uaddr_offset=0x0A00_0000_0000_0000),
         "EINVAL"),
    Case("gpa + size wraps", SetRegion(raw_gpa=2**64 - 65536, pages=32), "EINVAL"),
    Case("slot id at the limit", SetRegion(slot=32767), "EINVAL"),
    Case("last slot id", SetRegion(slot=32766), 0),
    Case("address space 1", SetRegion(slot=1 << 16), "EINVAL"),
    Case("delete a missing slot", SetRegion(slot=5, pages=0), "EINVAL"),
    Case("delete a slot", SetRegion(slot=0, pages=0, uaddr="slot0"), 0),
    Case("overlap", SetRegion(gfn=GFN0 + 7), "EEXIST"),
    Case("overlap from below", SetRegion(gfn=GFN0 - 3), "EEXIST"),
    Case("covering another", SetRegion(gfn=GFN0 - 1, pages=16), "EEXIST"),
    Case("adjacent below", SetRegion(gfn=GFN0 - 4), 0),
    Case("adjacent above", SetRegion(gfn=GFN0 + 8), 0),
    Case("beyond the IPA space", SetRegion(raw_gpa=1 << 40), "EFAULT"),
    Case("straddling the IPA limit", SetRegion(raw_gpa=(1 << 40) - 65536, pages=32), "EFAULT"),
    Case("last pages of the IPA space", SetRegion(raw_gpa=(1 << 40) - 4 * 65536), 0),
    Case("beyond a 32-bit IPA space", SetRegion(raw_gpa=1 << 32), "EFAULT",
         VmSpec(vm_type=32)),
    Case("unmapped range", SetRegion(uaddr="unmapped"), 0),
    Case("identical call", SetRegion(slot=0, gfn=GFN0, pages=8, uaddr="slot0"), 0),
    Case("move", SetRegion(slot=0, gfn=0x2000, pages=8, uaddr="slot0"), 0),
    Case("move onto another slot", SetRegion(slot=0, gfn=0x2002, pages=8, uaddr="slot0"),
         "EEXIST", VmSpec(slots=(Slot(), Slot(id=1, gfn=0x2000)))),
    Case("logging on", SetRegion(slot=0, gfn=GFN0, pages=8, uaddr="slot0", flags=LOG), 0),
    Case("logging off", SetRegion(slot=0, gfn=GFN0, pages=8, uaddr="slot0"), 0, LOGGING),
    Case("resize", SetRegion(slot=0, gfn=GFN0, pages=4, uaddr="slot0"), "EINVAL"),
    Case("new userspace_addr", SetRegion(slot=0, gfn=GFN0, pages=8), "EINVAL"),
    Case("READONLY on", SetRegion(slot=0, gfn=GFN0, pages=8, uaddr="slot0", flags=RO), "EINVAL"),
] + [
    Case(f"MTE VM, {kind} memory", SetRegion(kind=kind), expect, VmSpec(), older=older)
    for kind, expect, older in (
        ("anon", 0, {}),
        ("anon-shared", 0, before("6.2", "EINVAL")),  # before 6.2: no MAP_SHARED at all
        ("memfd", 0, before("6.2", "EINVAL")),
        ("memfd-private", 0, {}),
        ("hugetlbfs", 0, before("latest", "EINVAL")),  # hugetlbfs since 6.13
        ("file", "EINVAL", {}),
        ("file-private", "EINVAL", before("6.2", 0)),  # before 6.2 only VM_SHARED was checked
        ("device", "EINVAL", {}),
    )
] + [
    Case(f"non-MTE VM, {kind} memory", SetRegion(kind=kind), 0, NO_MTE)
    for kind in ("anon", "anon-shared", "memfd", "memfd-private", "hugetlbfs", "file",
                 "file-private", "device")
] + [
    Case("device memory with logging", SetRegion(kind="device", flags=LOG), "EINVAL", NO_MTE),
]

COPY_TAGS_CASES = [
    Case("to guest", CopyTags(), Pages(4)),
    Case("from guest", CopyTags(flags=FROM), Pages(4)),
    Case("whole slot", CopyTags(pages=8), Pages(8)),
    Case("length 0", CopyTags(pages=0), 0),
    Case("struct faults", StructFault(uapi.KVM_ARM_MTE_COPY_TAGS), "EFAULT"),
    Case("MTE not enabled", CopyTags(), "EINVAL", NO_MTE),
    Case("reserved[0]", CopyTags(reserved=(1, 0)), "EINVAL"),
    Case("reserved[1]", CopyTags(reserved=(0, 1)), "EINVAL"),
    Case("unknown flag", CopyTags(flags=2), "EINVAL"),
    Case("ipa not page aligned", CopyTags(ipa_offset=16), "EINVAL"),
    Case("length not page aligned", CopyTags(length=4096 + 16), "EINVAL"),
    Case("length above INT_MAX", CopyTags(length=INT_MAX + 1), "EINVAL",
         older=before("6.4", Pages(8))),  # copied until the slot's end, then stops
    Case("no memslot", CopyTags(gfn=0x10), "EFAULT"),
    Case("runs off the slot's end", CopyTags(gfn=GFN0 + 6, pages=4), Pages(2)),
    Case("runs off the slot's end, from guest", CopyTags(gfn=GFN0 + 6, pages=4, flags=FROM),
         Pages(2)),
    Case("across two slots", CopyTags(gfn=GFN0 + 6, pages=4), Pages(4),
         VmSpec(slots=(Slot(), Slot(id=1, gfn=GFN0 + 8)))),
    Case("across a hole between slots", CopyTags(gfn=GFN0 + 6, pages=4), Pages(2),
         VmSpec(slots=(Slot(), Slot(id=1, gfn=GFN0 + 9)))),
    Case("hole in the VMM's mappings", CopyTags(pages=8), Pages(3),
         VmSpec(slots=(Slot(mapped_pages=3),))),
    Case("slot with nothing mapped", CopyTags(), "EFAULT", VmSpec(slots=(Slot(mapped_pages=0),))),
    Case("read-only slot, to guest", CopyTags(), "EFAULT", VmSpec(slots=(Slot(flags=RO),))),
    Case("read-only slot, from guest", CopyTags(flags=FROM), Pages(4),
         VmSpec(slots=(Slot(flags=RO),))),
    Case("read-only mapping, to guest", CopyTags(), "EFAULT",
         VmSpec(slots=(Slot(kind="anon-readonly"),))),
    Case("read-only mapping, from guest", CopyTags(flags=FROM), Pages(4),
         VmSpec(slots=(Slot(kind="anon-readonly"),))),
    Case("PROT_NONE mapping, to guest", CopyTags(), "EFAULT",
         VmSpec(slots=(Slot(kind="anon-none"),))),
    Case("PROT_NONE mapping, from guest", CopyTags(flags=FROM), "EFAULT",
         VmSpec(slots=(Slot(kind="anon-none"),))),
    Case("buffer unmapped, to guest", CopyTags(buffer="unmapped"), "EFAULT"),
    Case("buffer unmapped, from guest", CopyTags(buffer="unmapped", flags=FROM), "EFAULT"),
    Case("buffer read-only, from guest", CopyTags(buffer="readonly", flags=FROM), "EFAULT"),
    Case("buffer read-only, to guest", CopyTags(buffer="readonly"), Pages(4)),
    Case("buffer faults inside page 2, to guest", CopyTags(buffer="edge", edge_pages=2.5),
         Pages(2)),
    Case("buffer faults inside page 2, from guest",
         CopyTags(buffer="edge", edge_pages=2.5, flags=FROM), Pages(2)),
    Case("buffer faults at page 2, to guest", CopyTags(buffer="edge", edge_pages=2), Pages(2)),
    Case("buffer faults at page 2, from guest", CopyTags(buffer="edge", edge_pages=2, flags=FROM),
         Pages(2)),
    Case("buffer faults inside page 0", CopyTags(buffer="edge", edge_pages=0.5), "EFAULT"),
    Case("buffer faults inside a tagged page", RetagWithFault(), Pages(2),
         then=faulted_page_contents),
    Case("buffer faults inside page 0, from guest",
         CopyTags(buffer="edge", edge_pages=0.5, flags=FROM), "EFAULT"),
    Case("to guest while logging", CopyTags(), "EBUSY", LOGGING, older=before("6.12", Pages(4))),
    Case("length 0 to guest while logging", CopyTags(pages=0), "EBUSY", LOGGING,
         older=before("6.12", 0)),
    Case("from guest while logging", CopyTags(flags=FROM), Pages(4), LOGGING),
    Case("checks before EBUSY", CopyTags(reserved=(1, 0)), "EINVAL", LOGGING),
    Case("private memfd memory", CopyTags(), Pages(4),
         VmSpec(slots=(Slot(kind="memfd-private"),))),
    Case("shared memfd memory", CopyTags(), Pages(4), VmSpec(slots=(Slot(kind="memfd"),)),
         since="6.2"),
    Case("shared anonymous memory", CopyTags(), Pages(4),
         VmSpec(slots=(Slot(kind="anon-shared"),)), since="6.2"),
]

ONE_VCPU = VmSpec(vcpus=1)
EL1_32BIT = 1 << uapi.KVM_ARM_VCPU_EL1_32BIT

VCPU_CASES = [
    Case("preferred target", Ioctl(uapi.KVM_ARM_PREFERRED_TARGET, 0), "EFAULT"),
    Case("run before init", VcpuIoctl(uapi.KVM_RUN), "ENOEXEC", ONE_VCPU),
    Case("run with an argument", VcpuIoctl(uapi.KVM_RUN, 1, init=True), "EINVAL", ONE_VCPU),
    Case("init", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init()), 0, ONE_VCPU),
    Case("init twice", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(), init=True), 0, ONE_VCPU),
    Case("init: struct faults", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, 0), "EFAULT", ONE_VCPU),
    Case("init: another target", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(4)), "EINVAL", ONE_VCPU),
    Case("init: unknown feature", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(5, 1 << 20)), "EINVAL", ONE_VCPU),
    Case("init: features[1]", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(5, 0, 1)), "EINVAL", ONE_VCPU),
    Case("init: AArch32 in an MTE VM", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(5, EL1_32BIT)), "EINVAL", ONE_VCPU),
    Case("init: AArch32 without MTE", VcpuIoctl(uapi.KVM_ARM_VCPU_INIT, vcpu_init(5, EL1_32BIT)), 0, VmSpec(mte=False, vcpus=1)),
    Case("get a register before init", VcpuIoctl(uapi.KVM_GET_ONE_REG, "reg:pc"), "ENOEXEC", ONE_VCPU),
    Case("get a register", VcpuIoctl(uapi.KVM_GET_ONE_REG, "reg:pc", init=True), 0, ONE_VCPU),
    Case("set a register", VcpuIoctl(uapi.KVM_SET_ONE_REG, "reg:x30", init=True), 0, ONE_VCPU),
    Case("get an unknown register", VcpuIoctl(uapi.KVM_GET_ONE_REG, "reg:0x6030000000100044", init=True), "ENOENT", ONE_VCPU),
    Case("one reg: struct faults", VcpuIoctl(uapi.KVM_GET_ONE_REG, 0, init=True), "EFAULT", ONE_VCPU),
    Case("register list too short", VcpuIoctl(uapi.KVM_GET_REG_LIST, bytes(8), init=True), "E2BIG", ONE_VCPU),
    Case("register list", VcpuIoctl(uapi.KVM_GET_REG_LIST, (34).to_bytes(8, "little") + bytes(34 * 8), init=True), 0, ONE_VCPU),
    Case("unknown vCPU ioctl", VcpuIoctl(0xAEFF, init=True), "EINVAL", ONE_VCPU),
    Case("another ioctl type on a vCPU", VcpuIoctl(0x5401, init=True), "EINVAL", ONE_VCPU),
]

DIRTY_LOG_CASES = [
    Case("get", GetDirtyLog(), 0, LOGGING),
    Case("get: struct faults", StructFault(uapi.KVM_GET_DIRTY_LOG), "EFAULT", LOGGING),
    Case("get: slot id at the limit", GetDirtyLog(slot=32767), "EINVAL", LOGGING),
    Case("get: address space 1", GetDirtyLog(slot=1 << 16), "EINVAL", LOGGING),
    Case("get: missing slot", GetDirtyLog(slot=3), "ENOENT", LOGGING),
    Case("get: slot not logging", GetDirtyLog(), "ENOENT"),
    Case("get: bitmap unmapped", GetDirtyLog(bitmap="unmapped"), "EFAULT", LOGGING),
    Case("clear", ClearDirtyLog(num_pages=8), 0, LOGGING),
    Case("clear: struct faults", StructFault(uapi.KVM_CLEAR_DIRTY_LOG), "EFAULT", LOGGING),
    Case("clear: slot id at the limit", ClearDirtyLog(slot=32767), "EINVAL", LOGGING),
    Case("clear: first_page not a multiple of 64", ClearDirtyLog(first_page=1), "EINVAL", LOGGING),
    Case("clear: unaligned first_page, missing slot", ClearDirtyLog(slot=3, first_page=1),
         "EINVAL", LOGGING),
    Case("clear: missing slot", ClearDirtyLog(slot=3), "ENOENT", LOGGING),
    Case("clear: slot not logging", ClearDirtyLog(num_pages=8), "ENOENT"),
    Case("clear: first_page beyond the slot", ClearDirtyLog(first_page=128, num_pages=0),
         "EINVAL", LOGGING),
    Case("clear: range past the end", ClearDirtyLog(num_pages=9), "EINVAL", LOGGING),
    Case("clear: zero pages", ClearDirtyLog(num_pages=0), 0, LOGGING),
    Case("clear: 64 pages of a bigger slot", ClearDirtyLog(num_pages=64), 0,
         VmSpec(slots=(Slot(pages=200, flags=LOG),))),
    Case("clear: partial word, not at the end", ClearDirtyLog(num_pages=65), "EINVAL",
         VmSpec(slots=(Slot(pages=200, flags=LOG),))),
    Case("clear: partial word at the end", ClearDirtyLog(first_page=128, num_pages=72), 0,
         VmSpec(slots=(Slot(pages=200, flags=LOG),))),
    Case("clear: bitmap unmapped", ClearDirtyLog(num_pages=8, bitmap="unmapped"), "EFAULT",
         LOGGING),
    Case("clear works without manual protect", ClearDirtyLog(num_pages=8), 0,
         VmSpec(manual=0, slots=(Slot(flags=LOG),))),
]

ALL_CASES = (
    SYSTEM_CASES + VM_CASES + MEMSLOT_CASES + COPY_TAGS_CASES + DIRTY_LOG_CASES + VCPU_CASES
)
