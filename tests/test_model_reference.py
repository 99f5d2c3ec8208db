"""The kernel model against tests/reference.py, side by side, over random operation sequences.

Invariant: after every operation the model (driven through InProcessDriver, as a VMM sees it)
and the reference give the same result or errno and leave the same bytes in the VMM's buffer;
at checkpoints every page of every memslot reads back the same tags through both.

Memory layout: InProcessDriver's process leaves an unmapped 4 KiB page before and after every
mapping it makes, and `driver.unmapped()` is followed by a second unmapped page (at larger page
sizes the harness reserves such guard pages itself). Slots reach at most one page beyond their
mapping on either side, so the reference only needs to know about guest-RAM mappings:
everything else a slot can reach is a hole, and the harness asserts so when it maps.

The machines: OneVm (one VM, one VMM process), TwoVms (two VMs over one memfd, in one process
or two) and OneVmLargePages (OneVm at 16 KiB pages). Fixed scenarios follow them, and plain
tests showing the reference itself answers what the spec says.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmtag import HostConfig, SimulatedFile, Vcpu, Vm, VmaKind, uapi
from kvmtag.limits import Limits, Quota
from kvmtag.uapi import LAYOUT

from . import reference as ref
from .drivers import InProcessDriver

GFN0 = 0x100  # slots and copies live around here, so that they overlap often
FILL = 0xEE  # what a FROM_GUEST buffer holds before the call: never a tag (> 0xF)
LOG, RO = ref.KVM_MEM_LOG_DIRTY_PAGES, ref.KVM_MEM_READONLY

MEMORY_KINDS = (
    "memfd", "memfd", "memfd-private", "anon", "anon", "anon-shared", "anon-readonly", "file",
    "file-private", "hugetlbfs",
)


def _name(result: int) -> str:
    return errno.errorcode.get(-result, str(result)) if result < 0 else str(result)


def _event(what: str) -> None:
    """hypothesis.event, also usable by the fixed scenarios (outside any Hypothesis test)."""
    if currently_in_test_context():
        event(what)


def _call(driver: InProcessDriver, fd: int, request: int, arg: int | bytes) -> int:
    """An ioctl through the driver as the kernel answers it: a result or a negative errno."""
    try:
        return driver.ioctl(fd, request, arg)[0]
    except OSError as e:
        return -(e.errno or 0)


def _same(what: str, model: int, reference: int) -> int:
    assert model == reference, f"{what}: model {_name(model)}, reference {_name(reference)}"
    return model


# --- the two sides of one VMM process and one VM -----------------------------------------------


@dataclass
class Region:
    """Guest RAM the VMM mapped: [addr, addr + pages * page_size)."""

    addr: int
    pages: int
    kind: str


@dataclass
class SharedFile:
    """A memfd that can be mapped again, by this process or another: the model's file object
    and the reference's backing."""

    file: object
    backing: ref.Backing
    pages: int


@dataclass
class Vmm:
    driver: InProcessDriver
    process: ref.Process
    kvm: int
    regions: list[Region] = field(default_factory=list)

    @property
    def page(self) -> int:
        return self.driver.page_size

    def assert_unmapped(self, addr: int, size: int) -> None:
        """Every 4 KiB of [addr, addr+size) faults: the layout assumption of this file."""
        for off in range(0, size, 4096):
            with pytest.raises(ValueError):
                self.driver.read(addr + off, 1)

    def _place(self, size: int) -> int:
        """(Pages above 4 KiB) a page-aligned address with a free page on either side."""
        hole = self.driver.process.hole(size + 3 * self.page)
        return -(-hole // self.page) * self.page + self.page

    def map(self, kind: str, pages: int, shared: SharedFile | None = None) -> Region:
        """Maps guest RAM on both sides; `shared` maps that memfd (MAP_SHARED) again."""
        size = pages * self.page
        d = self.driver
        if shared is not None:
            kind = "memfd"
            size = min(size, shared.pages * self.page)
            pages = size // self.page
        if self.page == 4096 and kind == "anon-none":
            addr = d.mmap(size, "anon")
            d.process.mprotect(addr, size, readable=False, writable=False)
        elif self.page == 4096:
            file = shared.file if shared is not None else None
            addr = d.mmap(size, kind, file=file)
        else:  # 4 KiB buffers may follow a mapping closer than a page: place it by hand
            addr = self._place(size)
            proc = d.process
            if kind in ("anon", "anon-readonly", "anon-none"):
                proc.mmap(size, addr=addr, readable=kind != "anon-none", writable=kind == "anon")
            elif kind == "anon-shared":
                proc.mmap(size, file=SimulatedFile(size, VmaKind.SHMEM), shared=True,
                          kind=VmaKind.ANON, addr=addr)
            else:
                f = shared.file if shared is not None else d.new_file(size, kind)
                assert isinstance(f, SimulatedFile)
                proc.mmap(size, file=f, shared=not kind.endswith("-private"), addr=addr)
        self.assert_unmapped(addr - self.page, self.page)
        self.assert_unmapped(addr + size, self.page)
        backing = shared.backing if shared is not None else None
        self.process.map(addr, size, kind, backing)
        region = Region(addr, pages, kind)
        self.regions.append(region)
        return region

    def new_memfd(self, pages: int) -> SharedFile:
        return SharedFile(self.driver.new_file(pages * self.page, "memfd"),
                          ref.Backing("memfd"), pages)

    def unmapped(self) -> int:
        """Two unmapped pages."""
        addr = self.driver.unmapped() if self.page == 4096 else self._place(2 * self.page)
        self.assert_unmapped(addr, 2 * self.page)
        return addr


@dataclass
class Twin:
    """One VM on both sides."""

    vmm: Vmm
    fd: int
    ref: ref.Vm
    name: str


class LimitedDriver(InProcessDriver):
    """InProcessDriver whose ioctls go through kvmtagd's limits (kvmtag.limits.Quota), as the
    daemon makes them."""

    def __init__(self, quota: Quota) -> None:
        super().__init__(host=quota.host)
        self.quota = quota

    def ioctl(self, fd: int, request: int, arg: int | bytes = 0) -> tuple[int, bytes]:
        target = self._files.get(fd)
        if target is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        addr = self.buffer(arg) if isinstance(arg, bytes) else arg
        result = self.quota.ioctl(target, self.process, request, addr)  # type: ignore[arg-type]
        if isinstance(result, Vm | Vcpu):
            return self._install(result), b""
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return result, self.read(addr, len(arg)) if isinstance(arg, bytes) else b""


class World:
    """A host on both sides: the model behind one or more InProcessDrivers, and ref.Host;
    with `limits`, kvmtagd's memslot limits on both sides too."""

    def __init__(self, page_size: int = 4096, limits: ref.Limits | None = None) -> None:
        self.page = page_size
        self.tpp = page_size // 16
        self.host = ref.Host(page_size, limits)
        self.quota: Quota | None = None
        if limits is not None:
            from kvmtag import Host

            self.quota = Quota(Host(HostConfig(page_size=page_size)), Limits(
                max_memslots=limits.memslots_per_vm or Limits.max_memslots,
                max_guest_memory=limits.bytes_per_process or Limits.max_guest_memory,
            ))  # fmt: skip
        self.vmms: list[Vmm] = []
        self.vms: list[Twin] = []
        self.files: list[SharedFile] = []

    def new_vmm(self) -> Vmm:
        """A VMM process; every one after the first shares the first one's host."""
        driver: InProcessDriver
        if self.quota is not None:
            driver = LimitedDriver(self.quota)
        elif self.vmms:
            driver = InProcessDriver(host=self.vmms[0].driver.host)
        else:
            driver = InProcessDriver(HostConfig(page_size=self.page))
        vmm = Vmm(driver, ref.Process(f"process{len(self.vmms)}"), driver.open())
        self.vmms.append(vmm)
        return vmm

    def new_vm(self, vmm: Vmm) -> Twin:
        fd = vmm.driver.ioctl(vmm.kvm, uapi.KVM_CREATE_VM, 0)[0]
        twin = Twin(vmm, fd, self.host.create_vm(vmm.process), f"vm{len(self.vms)}")
        self.vms.append(twin)
        return twin

    def map(self, vmm: Vmm, kind: str, pages: int, shared: SharedFile | None = None) -> Region:
        if kind == "memfd" and shared is None:
            shared = vmm.new_memfd(pages)
            self.files.append(shared)
        return vmm.map(kind, pages, shared)

    # --- ioctls on both sides ------------------------------------------------------------------

    def enable_mte(self, vm: Twin, flags: int = 0) -> int:
        arg = LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, flags, 0, 0, 0, 0, bytes(64))
        model = _call(vm.vmm.driver, vm.fd, uapi.KVM_ENABLE_CAP, arg)
        return _same(f"{vm.name} ENABLE_CAP(ARM_MTE, flags={flags})", model,
                     vm.ref.enable_mte(flags))

    def create_vcpu(self, vm: Twin) -> None:
        model = _call(vm.vmm.driver, vm.fd, uapi.KVM_CREATE_VCPU, vm.ref.vcpus)
        assert model >= 0, f"{vm.name} CREATE_VCPU: {_name(model)}"
        vm.ref.create_vcpu()

    def set_region(self, vm: Twin, slot: int, flags: int, gpa: int, size: int, uaddr: int) -> int:
        arg = LAYOUT["kvm_userspace_memory_region"].pack(slot, flags, gpa, size, uaddr)
        model = _call(vm.vmm.driver, vm.fd, uapi.KVM_SET_USER_MEMORY_REGION, arg)
        reference = vm.ref.set_user_memory_region(slot, flags, gpa, size, uaddr)
        _event(f"memslot -> {_name(reference) if reference < 0 else 'ok'}")
        return _same(
            f"{vm.name} SET_USER_MEMORY_REGION(slot={slot:#x}, flags={flags}, gpa={gpa:#x}, "
            f"size={size:#x}, uaddr={uaddr:#x})", model, reference,
        )

    def copy_tags(
        self, vm: Twin, ipa: int, length: int, from_guest: bool, buffer: str = "rw",
        data: bytes | None = None, fault_at: int = 0, flags: int = 0,
        reserved: tuple[int, int] = (0, 0),
    ) -> tuple[int, bytes]:
        """COPY_TAGS on both sides. buffer: "rw", "edge" (`fault_at` bytes, then a fault),
        "unmapped" or "readonly". Returns the result and, FROM_GUEST, the buffer's bytes."""
        d = vm.vmm.driver
        n = min(length // 16, 64 * self.tpp)  # absurd lengths fail before the buffer is used
        flags |= ref.KVM_ARM_TAGS_FROM_GUEST if from_guest else 0
        if not from_guest:
            data = bytes(n) if data is None else data[:n]
            shown = {"rw": data, "edge": data[:fault_at], "readonly": data}.get(buffer, b"")
            addr = {"rw": d.buffer, "edge": d.edge, "readonly": d.readonly}.get(
                buffer, lambda _: d.unmapped())(shown)
            user = ref.UserBuffer(readable=shown)
            size = 0
        else:
            fill = bytes([FILL]) * n
            size = {"rw": n, "edge": fault_at}.get(buffer, 0)
            if buffer == "readonly":
                addr = d.readonly(fill)
            elif buffer == "unmapped":
                addr = d.unmapped()
            else:
                addr = d.buffer(fill) if buffer == "rw" else d.edge(fill[:fault_at])
            user = ref.UserBuffer(writable=size)
        arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(ipa, length, addr, flags, *reserved)
        model = _call(d, vm.fd, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
        want = vm.ref.copy_tags(ipa, length, user, flags, reserved)
        what = (
            f"{vm.name} COPY_TAGS(ipa={ipa:#x}, length={length:#x}, flags={flags}, "
            f"reserved={reserved}, buffer={buffer}, fault_at={fault_at})"
        )
        _event(f"copy_tags {'from' if from_guest else 'to'} guest -> {_classify(want.ret, length)}")
        _same(what, model, want.ret)
        if not from_guest:
            return model, b""
        if buffer == "readonly":
            assert d.read(addr, n) == fill, f"{what}: model wrote into a read-only buffer"
            return model, b""
        got = d.read(addr, size)
        expected = want.written + fill[len(want.written) : size]
        assert got == expected, (
            f"{what}: buffer differs\nmodel     {got.hex()}\nreference {expected.hex()}"
        )
        return model, got

    def copy_tags_bad_struct(self, vm: Twin, how: str) -> None:
        d = vm.vmm.driver
        if how == "unmapped":
            addr = d.unmapped()
        else:  # the struct's last 8 bytes fault
            whole = LAYOUT["kvm_arm_copy_mte_tags"].pack(GFN0 * self.page, self.page,
                                                          d.buffer(self.tpp), 0, 0, 0)
            addr = d.edge(whole[:40])
        model = _call(d, vm.fd, uapi.KVM_ARM_MTE_COPY_TAGS, addr)
        want = vm.ref.copy_tags(0, 0, ref.UserBuffer(), struct_readable=False)
        _same(f"{vm.name} COPY_TAGS(struct {how})", model, want.ret)

    def get_dirty_log(self, vm: Twin, slot: int) -> None:
        d = vm.vmm.driver
        addr = d.buffer(bytes([FILL]) * 64)
        arg = LAYOUT["kvm_dirty_log"].pack(slot, 0, addr)
        model = _call(d, vm.fd, uapi.KVM_GET_DIRTY_LOG, arg)
        want, bitmap = vm.ref.get_dirty_log(slot)
        _same(f"{vm.name} GET_DIRTY_LOG(slot={slot:#x})", model, want)
        if want == 0:
            assert d.read(addr, len(bitmap)) == bitmap, "COPY_TAGS must never mark pages dirty"

    def check_tags(self, vm: Twin, per_page: bool) -> None:
        """FROM_GUEST over every memslot on both sides: whole slots, or page by page (which
        also reads the pages behind a hole)."""
        if per_page:
            self._note_aliases()
        for slot in sorted(vm.ref.slots.values(), key=lambda s: s.id):
            if per_page:
                for gfn in range(slot.base_gfn, slot.base_gfn + slot.npages):
                    self.copy_tags(vm, gfn * self.page, self.page, True)
            else:
                self.copy_tags(vm, slot.base_gfn * self.page, slot.npages * self.page, True)

    def _note_aliases(self) -> None:
        """Statistics: did this run check tagged memory that two slots reach?"""
        seen: dict[tuple[object, ...], int] = {}
        for twin in self.vms:
            for slot in twin.ref.slots.values():
                for i in range(slot.npages):
                    hva = slot.userspace_addr + i * self.page
                    identity = twin.ref.process.page_identity(hva, self.page)
                    if identity is not None:
                        seen[identity] = seen.get(identity, 0) + 1
        for identity, count in seen.items():
            if count > 1 and any(self.host.read_tags(identity)):
                _event("checked tagged memory reached through two slots")
                return


def _classify(ret: int, length: int) -> str:
    if ret < 0:
        return _name(ret)
    return "all" if ret == length else "partial"


# --- the state machines ----------------------------------------------------------------------

SLOT_IDS = st.sampled_from([0, 0, 1, 1, 2, 3])
MEM_FLAGS = st.sampled_from([0, 0, 0, 0, RO, RO, LOG, LOG | RO, 4])
SLOT_QUIRKS = st.sampled_from(
    ["none"] * 30
    + ["gpa+16", "size+16", "uaddr+16", "uaddr-tag", "wrap", "u64-top", "ipa-top",
       "ipa-straddle", "ipa-straddle", "slot-32766", "slot-32767", "as-1", "too-many-pages"]
)
COPY_QUIRKS = st.sampled_from(
    ["none"] * 60
    + ["ipa+16", "len+16", "len>INT_MAX", "reserved0", "reserved1", "flag2", "ipa-top", "wrap",
       "struct-unmapped", "struct-short"]
)
BUFFERS = st.sampled_from(["rw", "rw", "rw", "edge", "edge", "edge", "unmapped", "readonly"])
PICK = st.integers(0, 7)  # an index into whatever list the rule picks from, modulo its length
VM = st.integers(0, 1)  # which VM, modulo how many there are


@dataclass(frozen=True)
class CopyOp:
    """A COPY_TAGS step. It starts at or near an existing slot (`near` < 7 picks it, `gfn` is
    the offset from its base) or anywhere around GFN0; an "edge" buffer faults at page
    `fault_page`'s tags, at their start (twice as likely), one tag in, half way or at the last
    tag; `seed` makes the tag bytes (high nibbles set)."""

    near: int
    gfn: int
    npages: int
    buffer: str
    fault_page: int
    fault_offset: int
    seed: int
    quirk: str


COPY_OPS = st.builds(
    CopyOp, near=st.integers(0, 9), gfn=st.integers(-2, 36), npages=st.integers(0, 10),
    buffer=BUFFERS, fault_page=st.integers(0, 10), fault_offset=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1), quirk=COPY_QUIRKS,
)


class ModelVsReferenceBase(RuleBasedStateMachine):
    """Rules shared by the machines below; they differ in the world they start from."""

    page_size = 4096
    limits: ref.Limits | None = None

    def __init__(self) -> None:
        super().__init__()
        self.world = World(self.page_size, self.limits)

    @property
    def ipa_pages(self) -> int:
        return int(2**ref.DEFAULT_IPA_BITS) // self.page_size

    def vm(self, i: int) -> Twin:
        return self.world.vms[i % len(self.world.vms)]

    def pick_slot(self, vm: Twin, i: int) -> ref.Memslot | None:
        slots = sorted(vm.ref.slots.values(), key=lambda s: s.id)
        return slots[i % len(slots)] if slots else None

    # --- memory ----------------------------------------------------------------------------------

    @precondition(lambda self: sum(len(v.regions) for v in self.world.vmms) < 10)
    @rule(vm=VM, kind=st.sampled_from(MEMORY_KINDS), pages=st.integers(1, 6),
          alias=st.sampled_from([False, False, True]), pick=PICK)
    def map_memory(self, vm: int, kind: str, pages: int, alias: bool, pick: int) -> None:
        """Maps guest RAM; `alias` maps an existing memfd again (shared) instead."""
        twin = self.vm(vm)
        files = self.world.files
        shared = files[pick % len(files)] if alias and files else None
        self.world.map(twin.vmm, kind, pages, shared)

    # --- memslots --------------------------------------------------------------------------

    @rule(vm=VM, slot=SLOT_IDS, flags=MEM_FLAGS, memory=PICK, start=PICK,
          npages=st.integers(1, 9), gfn=st.integers(0, 28), quirk=SLOT_QUIRKS)
    def create_slot(self, vm: int, slot: int, flags: int, memory: int, start: int, npages: int,
                    gfn: int, quirk: str) -> None:
        """A new slot (or any change to one: the ids collide often) over a region, reaching at
        most one page beyond it on either side, or over unmapped memory."""
        twin = self.vm(vm)
        page = self.page_size
        regions = twin.vmm.regions
        if memory == 0 or not regions:
            uaddr, npages = twin.vmm.unmapped(), 1 + npages % 2
        else:
            region = regions[(memory - 1) % len(regions)]
            first = start % (region.pages + 1) - 1  # -1: the page before the mapping
            npages = 1 + (npages - 1) % (region.pages + 1 - first)  # up to the page after it
            uaddr = region.addr + first * page
        base_gfn = GFN0 + gfn
        gpa, size = base_gfn * page, npages * page
        if quirk == "gpa+16":
            gpa += 16
        elif quirk == "size+16":
            size += 16
        elif quirk == "uaddr+16":
            uaddr += 16
        elif quirk == "uaddr-tag":
            uaddr |= 0x0A << 56
        elif quirk == "wrap":
            gpa = 2**64 - size  # gpa + size is exactly 2**64
        elif quirk == "u64-top":
            gpa = 2**64 - size - page  # fits in 64 bits, far beyond the IPA space
        elif quirk == "ipa-top":
            gpa = (self.ipa_pages - npages) * page
        elif quirk == "ipa-straddle":
            gpa = (self.ipa_pages - npages + 1) * page
        elif quirk == "slot-32766":
            slot = 32766
        elif quirk == "slot-32767":
            slot = 32767
        elif quirk == "as-1":
            slot |= 1 << 16
        elif quirk == "too-many-pages":
            size = 2**31 * page
        self.world.set_region(twin, slot, flags, gpa, size, uaddr)

    @rule(vm=VM, pick=PICK, how=st.sampled_from(["exists", "exists", "missing", "gpa+16"]))
    def delete_slot(self, vm: int, pick: int, how: str) -> None:
        twin = self.vm(vm)
        slot = self.pick_slot(twin, pick)
        if how == "missing" or slot is None:
            missing = min(set(range(5)) - set(twin.ref.slots))
            self.world.set_region(twin, missing, 0, 0, 0, 0)
            return
        gpa = slot.base_gfn * self.page_size + (16 if how == "gpa+16" else 0)
        self.world.set_region(twin, slot.id, slot.flags, gpa, 0, slot.userspace_addr)

    @rule(vm=VM, pick=PICK, gfn=st.integers(0, 28),
          where=st.sampled_from(["near", "near", "near", "ipa-top", "ipa-straddle"]))
    def move_slot(self, vm: int, pick: int, gfn: int, where: str) -> None:
        twin = self.vm(vm)
        slot = self.pick_slot(twin, pick)
        if slot is None:
            return
        base_gfn = {
            "near": GFN0 + gfn,
            "ipa-top": self.ipa_pages - slot.npages,
            "ipa-straddle": self.ipa_pages - slot.npages + 1,
        }[where]
        self.world.set_region(twin, slot.id, slot.flags, base_gfn * self.page_size,
                              slot.npages * self.page_size, slot.userspace_addr)

    @rule(vm=VM, pick=PICK, on=st.sampled_from([False, False, True]))
    def set_logging(self, vm: int, pick: int, on: bool) -> None:
        """Dirty logging on or off (a flags-only change; the same flags again are a no-op).
        Mostly off: while any slot logs, every TO_GUEST copy is EBUSY."""
        twin = self.vm(vm)
        slot = self.pick_slot(twin, pick)
        if slot is None:
            return
        flags = slot.flags | LOG if on else slot.flags & ~LOG
        self.world.set_region(twin, slot.id, flags, slot.base_gfn * self.page_size,
                              slot.npages * self.page_size, slot.userspace_addr)

    @rule(vm=VM, pick=PICK,
          what=st.sampled_from(["size-", "size+", "uaddr", "readonly", "identical", "flag4"]))
    def change_slot(self, vm: int, pick: int, what: str) -> None:
        """Changes the kernel refuses (or ignores) on an existing slot."""
        twin = self.vm(vm)
        slot = self.pick_slot(twin, pick)
        if slot is None:
            return
        page = self.page_size
        flags, npages, uaddr = slot.flags, slot.npages, slot.userspace_addr
        if what == "size-" and npages > 1:
            npages -= 1
        elif what == "size+":
            npages += 1
        elif what == "uaddr":
            uaddr += page
        elif what == "readonly":
            flags ^= RO
        elif what == "flag4":
            flags |= 4
        self.world.set_region(twin, slot.id, flags, slot.base_gfn * page, npages * page, uaddr)

    @rule(vm=VM, pick=PICK, gfn=st.one_of(st.none(), st.integers(0, 28)))
    def recreate_slot(self, vm: int, pick: int, gfn: int | None) -> None:
        """Deletes a slot and adds it again over the same memory (its tags must survive)."""
        twin = self.vm(vm)
        slot = self.pick_slot(twin, pick)
        if slot is None:
            return
        page = self.page_size
        size = slot.npages * page
        self.world.set_region(twin, slot.id, slot.flags, slot.base_gfn * page, 0,
                              slot.userspace_addr)
        base_gfn = slot.base_gfn if gfn is None else GFN0 + gfn
        self.world.set_region(twin, slot.id, slot.flags, base_gfn * page, size,
                              slot.userspace_addr)

    # --- MTE and vCPUs ---------------------------------------------------------------------

    @rule(vm=VM, flags=st.sampled_from([0, 0, 0, 1]))
    def enable_mte(self, vm: int, flags: int) -> None:
        self.world.enable_mte(self.vm(vm), flags)

    @precondition(lambda self: not all(v.ref.mte for v in self.world.vms))
    @rule()
    def enable_mte_everywhere(self) -> None:
        """Ends a VM's time without MTE soon (argument-free rules are drawn often)."""
        for twin in self.world.vms:
            self.world.enable_mte(twin)

    @precondition(lambda self: sum(v.ref.vcpus for v in self.world.vms) < 2)
    @rule(vm=VM)
    def create_vcpu(self, vm: int) -> None:
        self.world.create_vcpu(self.vm(vm))

    # --- COPY_TAGS -------------------------------------------------------------------------

    @rule(vm=VM, op=COPY_OPS)
    def copy_tags_to_guest(self, vm: int, op: CopyOp) -> None:
        self._copy_tags(vm, op, from_guest=False)

    @rule(vm=VM, op=COPY_OPS)
    def copy_tags_from_guest(self, vm: int, op: CopyOp) -> None:
        self._copy_tags(vm, op, from_guest=True)

    def _copy_tags(self, vm: int, op: CopyOp, from_guest: bool) -> None:
        near, gfn, npages, quirk = op.near, op.gfn, op.npages, op.quirk
        twin = self.vm(vm)
        page, tpp = self.page_size, self.world.tpp
        slot = self.pick_slot(twin, near)
        if slot is not None and near < 7:
            first_gfn = slot.base_gfn + gfn % (slot.npages + 2) - 1
        else:
            first_gfn = GFN0 + gfn
        ipa, length = first_gfn * page, npages * page
        flags, reserved = 0, (0, 0)
        if quirk == "ipa+16":
            ipa += 16
        elif quirk == "len+16":
            length += 16
        elif quirk == "len>INT_MAX":
            length = 2**31
        elif quirk == "reserved0":
            reserved = (1, 0)
        elif quirk == "reserved1":
            reserved = (0, 1 << 63)
        elif quirk == "flag2":
            flags = 2
        elif quirk == "ipa-top":  # where slots placed at the IPA limit live
            ipa = (self.ipa_pages - 1 - gfn % 4) * page
        elif quirk == "wrap":
            ipa = 2**64 - page
        elif quirk.startswith("struct-"):
            self.world.copy_tags_bad_struct(twin, quirk.removeprefix("struct-"))
            return
        data = random.Random(op.seed).randbytes(npages * tpp)  # the kernel ignores high nibbles
        fault_at = op.fault_page * tpp + (0, 0, 1, tpp // 2, tpp - 1)[op.fault_offset]
        self.world.copy_tags(twin, ipa, length, from_guest, op.buffer, data,
                             min(fault_at, npages * tpp), flags, reserved)

    # --- checks ----------------------------------------------------------------------------

    @rule()
    def checkpoint(self) -> None:
        """Every page of every slot, and every slot's dirty log (COPY_TAGS never dirties)."""
        for twin in self.world.vms:
            self.world.check_tags(twin, per_page=True)
            for slot in (0, 1, 2, 3, 32767, 1 << 16):
                self.world.get_dirty_log(twin, slot)

    @invariant()
    def whole_slots_read_the_same(self) -> None:
        for twin in self.world.vms:
            self.world.check_tags(twin, per_page=False)

    @invariant()
    def limits_account_for_the_model(self) -> None:
        if self.world.quota is not None:
            self.world.quota.check()

    def teardown(self) -> None:
        for twin in self.world.vms:
            self.world.check_tags(twin, per_page=True)


class OneVm(ModelVsReferenceBase):
    """One VM, one VMM process; MTE on from the start most of the time."""

    @initialize(mte=st.sampled_from([True, True, True, False]),
                kinds=st.lists(st.sampled_from(MEMORY_KINDS), min_size=1, max_size=2),
                flags=st.sampled_from([0, 0, 0, RO]), pages=st.integers(1, 6), alias=st.booleans(),
                file_slot=st.booleans())
    def start(self, mte: bool, kinds: list[str], flags: int, pages: int, alias: bool,
              file_slot: bool) -> None:
        """MTE on, or off until an enable_mte step (then perhaps over a slot of ext4 memory,
        which MTE forbids from then on); one slot per mapping, and perhaps a second slot over
        the first memfd."""
        w = self.world
        twin = w.new_vm(w.new_vmm())
        if mte:
            w.enable_mte(twin)
        page = self.page_size
        for i, kind in enumerate(kinds):
            region = w.map(twin.vmm, kind, pages)
            w.set_region(twin, i, flags, (GFN0 + 8 * i) * page, pages * page, region.addr)
        if alias and w.files:  # a second slot over the first memfd
            region = w.map(twin.vmm, "memfd", pages, w.files[0])
            w.set_region(twin, 3, 0, (GFN0 + 20) * page, region.pages * page, region.addr)
        if file_slot and not mte:
            region = w.map(twin.vmm, "file", 2)
            w.set_region(twin, 2, 0, (GFN0 + 16) * page, 2 * page, region.addr)


class TwoVms(ModelVsReferenceBase):
    """Two VMs on one host over one memfd: in one VMM process (mapped twice) or in two."""

    @initialize(two_processes=st.booleans(), pages=st.integers(2, 6),
                gfn_b=st.integers(0, 8), mte_b=st.sampled_from([True, True, True, False]))
    def start(self, two_processes: bool, pages: int, gfn_b: int, mte_b: bool) -> None:
        w = self.world
        vmm_a = w.new_vmm()
        vmm_b = w.new_vmm() if two_processes else vmm_a
        a, b = w.new_vm(vmm_a), w.new_vm(vmm_b)
        w.enable_mte(a)
        if mte_b:
            w.enable_mte(b)
        # Private memory first: in two processes it lies at the same address in both, and
        # must not be shared for that.
        private_a = w.map(vmm_a, "anon", 2)
        private_b = private_a if vmm_b is vmm_a else w.map(vmm_b, "anon", 2)
        memfd = vmm_a.new_memfd(pages)
        w.files.append(memfd)
        region_a = w.map(vmm_a, "memfd", pages, memfd)
        region_b = w.map(vmm_b, "memfd", pages, memfd)
        page = self.page_size
        for twin, region, gfn in ((a, region_a, GFN0), (b, region_b, GFN0 + gfn_b)):
            w.set_region(twin, 0, 0, gfn * page, region.pages * page, region.addr)
        for twin, region in ((a, private_a), (b, private_b)):
            w.set_region(twin, 1, 0, (GFN0 + 16) * page, 2 * page, region.addr)


class OneVmLargePages(OneVm):
    """OneVm at a larger host page size (the reference is written per page, at any size)."""

    page_size = 16384


class OneVmUnderLimits(OneVm):
    """OneVm through kvmtagd's limits (kvmtag.limits.Quota), small enough to be reached often:
    four memslots per VM, six pages of memslots per process (a slot of seven: E2BIG)."""

    limits = ref.Limits(memslots_per_vm=4, bytes_per_process=6 * 4096)


class TwoVmsUnderLimits(TwoVms):
    """TwoVms under the limits: in one process, both VMs' memslots count against one total."""

    limits = ref.Limits(memslots_per_vm=3, bytes_per_process=8 * 4096)


# Bounded budgets: about 400 sequences of up to 40 steps in all, a few seconds (each step is
# one or two ioctls on both sides plus the whole-slot reads of the invariant). Found by mutation:
# each of ~25 one-line bugs planted in the reference is caught at these budgets.
# Health checks: rule preconditions reject some draws by design, and a slow shared machine
# must not turn generation time into a failure.
_SETTINGS = dict(
    deadline=None,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
TestOneVm = OneVm.TestCase
TestOneVm.settings = settings(max_examples=250, **_SETTINGS)  # type: ignore[arg-type]
TestTwoVms = TwoVms.TestCase
TestTwoVms.settings = settings(max_examples=120, **_SETTINGS)  # type: ignore[arg-type]
TestOneVmLargePages = OneVmLargePages.TestCase
TestOneVmLargePages.settings = settings(max_examples=30, **_SETTINGS)  # type: ignore[arg-type]
TestOneVmUnderLimits = OneVmUnderLimits.TestCase
TestOneVmUnderLimits.settings = settings(max_examples=80, **_SETTINGS)  # type: ignore[arg-type]
TestTwoVmsUnderLimits = TwoVmsUnderLimits.TestCase
TestTwoVmsUnderLimits.settings = settings(max_examples=60, **_SETTINGS)  # type: ignore[arg-type]


EINVAL, EEXIST, EFAULT, EBUSY = -errno.EINVAL, -errno.EEXIST, -errno.EFAULT, -errno.EBUSY


# --- fixed scenarios through both sides (the aliasing rules, checked with known values) -------


def _one_vm(page_size: int = 4096) -> tuple[World, Twin]:
    w = World(page_size)
    twin = w.new_vm(w.new_vmm())
    assert w.enable_mte(twin) == 0
    return w, twin


def _tags(w: World, pages: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(pages * w.tpp)


def _low(data: bytes) -> bytes:
    return bytes(b & 0xF for b in data)


def test_two_slots_over_one_memfd_share_tags() -> None:
    w, vm = _one_vm()
    memfd = w.vmms[0].new_memfd(4)
    r1, r2 = w.map(vm.vmm, "memfd", 4, memfd), w.map(vm.vmm, "memfd", 4, memfd)
    page = w.page
    assert w.set_region(vm, 0, 0, GFN0 * page, 4 * page, r1.addr) == 0
    assert w.set_region(vm, 1, 0, (GFN0 + 8) * page, 4 * page, r2.addr) == 0
    data = _tags(w, 4)
    assert w.copy_tags(vm, GFN0 * page, 4 * page, False, data=data)[0] == 4 * page
    assert w.copy_tags(vm, (GFN0 + 8) * page, 4 * page, True) == (4 * page, _low(data))


def test_tags_survive_delete_and_recreate() -> None:
    w, vm = _one_vm()
    page = w.page
    region = w.map(vm.vmm, "anon", 3)
    assert w.set_region(vm, 2, 0, GFN0 * page, 3 * page, region.addr) == 0
    data = _tags(w, 3)
    w.copy_tags(vm, GFN0 * page, 3 * page, False, data=data)
    assert w.set_region(vm, 2, 0, GFN0 * page, 0, region.addr) == 0
    assert w.copy_tags(vm, GFN0 * page, page, True)[0] == -errno.EFAULT
    assert w.set_region(vm, 2, 0, (GFN0 + 40) * page, 3 * page, region.addr) == 0
    assert w.copy_tags(vm, (GFN0 + 40) * page, 3 * page, True) == (3 * page, _low(data))


def test_two_vms_in_one_process_share_a_memfd() -> None:
    w = World()
    vmm = w.new_vmm()
    a, b = w.new_vm(vmm), w.new_vm(vmm)
    w.enable_mte(a)
    w.enable_mte(b)
    memfd = vmm.new_memfd(2)
    ra, rb = w.map(vmm, "memfd", 2, memfd), w.map(vmm, "memfd", 2, memfd)
    page = w.page
    w.set_region(a, 0, 0, GFN0 * page, 2 * page, ra.addr)
    w.set_region(b, 3, 0, 0x40 * page, 2 * page, rb.addr)
    data = _tags(w, 2)
    w.copy_tags(b, 0x40 * page, 2 * page, False, data=data)
    assert w.copy_tags(a, GFN0 * page, 2 * page, True) == (2 * page, _low(data))


def test_two_processes_share_a_memfd_but_not_private_memory() -> None:
    w = World()
    p, q = w.new_vmm(), w.new_vmm()
    a, b = w.new_vm(p), w.new_vm(q)
    w.enable_mte(a)
    w.enable_mte(b)
    anon_p, anon_q = w.map(p, "anon", 1), w.map(q, "anon", 1)
    assert anon_p.addr == anon_q.addr  # same address, different processes
    memfd = p.new_memfd(1)
    rp, rq = w.map(p, "memfd", 1, memfd), w.map(q, "memfd", 1, memfd)
    page = w.page
    for vm, anon, shared in ((a, anon_p, rp), (b, anon_q, rq)):
        w.set_region(vm, 0, 0, GFN0 * page, page, anon.addr)
        w.set_region(vm, 1, 0, (GFN0 + 1) * page, page, shared.addr)
    data = _tags(w, 2)
    assert w.copy_tags(a, GFN0 * page, 2 * page, False, data=data)[0] == 2 * page
    assert w.copy_tags(b, GFN0 * page, page, True) == (page, bytes(w.tpp))  # private: untouched
    assert w.copy_tags(b, (GFN0 + 1) * page, page, True) == (page, _low(data[w.tpp :]))


def test_buffer_fault_inside_a_page_clears_that_page() -> None:
    w, vm = _one_vm()
    page, tpp = w.page, w.tpp
    region = w.map(vm.vmm, "memfd", 3)
    w.set_region(vm, 0, 0, GFN0 * page, 3 * page, region.addr)
    first = bytes([0x5]) * 3 * tpp
    w.copy_tags(vm, GFN0 * page, 3 * page, False, data=first)
    second = bytes([0xA7]) * 3 * tpp
    assert w.copy_tags(vm, GFN0 * page, 3 * page, False, "edge", second, tpp + 7)[0] == page
    want = bytes([0x7]) * tpp + bytes(tpp) + bytes([0x5]) * tpp  # page 1 cleared, page 2 kept
    assert w.copy_tags(vm, GFN0 * page, 3 * page, True) == (3 * page, want)


def test_read_only_memory_and_slots_refuse_to_guest() -> None:
    """A PROT_READ mapping: get_user_pages refuses the TO_GUEST write, not a read; a
    KVM_MEM_READONLY slot: the same."""
    w, vm = _one_vm()
    page = w.page
    readonly, memfd = w.map(vm.vmm, "anon-readonly", 1), w.map(vm.vmm, "memfd", 1)
    assert w.set_region(vm, 0, 0, GFN0 * page, page, readonly.addr) == 0
    assert w.set_region(vm, 1, RO, (GFN0 + 1) * page, page, memfd.addr) == 0
    for gfn in (GFN0, GFN0 + 1):
        assert w.copy_tags(vm, gfn * page, page, False, data=_tags(w, 1))[0] == EFAULT
        assert w.copy_tags(vm, gfn * page, page, True) == (page, bytes(w.tpp))


def test_prot_none_guest_memory_cannot_be_reached() -> None:
    """"memory that cannot be reached: EFAULT", in both directions: get_user_pages refuses a
    PROT_NONE mapping for reading too. (Fails against the model as of this writing: it reads
    such a page's tags as zeros.)"""
    w, vm = _one_vm()
    page = w.page
    none = w.map(vm.vmm, "anon-none", 1)
    assert w.set_region(vm, 0, 0, GFN0 * page, page, none.addr) == 0
    assert w.copy_tags(vm, GFN0 * page, page, False, data=_tags(w, 1))[0] == EFAULT
    assert w.copy_tags(vm, GFN0 * page, page, True)[0] == EFAULT


def test_memslot_rules_on_both_sides() -> None:
    """Each memslot rule once, in a fixed order, with the spec's answer."""
    w, vm = _one_vm()
    page = w.page
    memfd, ext4 = w.map(vm.vmm, "memfd", 4), w.map(vm.vmm, "file", 2)
    ipa_top = 2**ref.DEFAULT_IPA_BITS
    calls = [  # slot, flags, gpa, size, uaddr, answer
        (0, 4, GFN0 * page, 4 * page, memfd.addr, EINVAL),
        (0, 0, GFN0 * page + 16, 4 * page, memfd.addr, EINVAL),
        (0, 0, GFN0 * page, 4 * page + 16, memfd.addr, EINVAL),
        (0, 0, GFN0 * page, 4 * page, memfd.addr + 16, EINVAL),
        (0, 0, GFN0 * page, 4 * page, memfd.addr | 0x0A << 56, EINVAL),
        (32767, 0, GFN0 * page, 4 * page, memfd.addr, EINVAL),
        (1 << 16, 0, GFN0 * page, 4 * page, memfd.addr, EINVAL),
        (0, 0, 2**64 - 4 * page, 4 * page, memfd.addr, EINVAL),
        (0, 0, GFN0 * page, 2**31 * page, memfd.addr, EINVAL),
        (0, 0, 0, 0, 0, EINVAL),
        (0, 0, ipa_top, page, memfd.addr, EFAULT),
        (0, 0, GFN0 * page, 2 * page, ext4.addr, EINVAL),
        (0, 0, GFN0 * page, 4 * page, memfd.addr, 0),
        (1, 0, (GFN0 + 3) * page, page, memfd.addr, EEXIST),
        (1, 0, ipa_top - page, page, memfd.addr, 0),
        (2, 0, ipa_top - page, 2 * page, memfd.addr, EEXIST),
        (0, 0, GFN0 * page, 3 * page, memfd.addr, EINVAL),
        (0, 0, GFN0 * page, 4 * page, memfd.addr + page, EINVAL),
        (0, RO, GFN0 * page, 4 * page, memfd.addr, EINVAL),
        (0, LOG, GFN0 * page, 4 * page, memfd.addr, 0),
        (0, LOG, (ipa_top - page) // page * page - 3 * page, 4 * page, memfd.addr, EEXIST),
        (0, LOG, (GFN0 + 8) * page, 4 * page, memfd.addr, 0),
        (0, 0, (GFN0 + 8) * page, 4 * page, memfd.addr, 0),
        (0, 0, (GFN0 + 8) * page, 4 * page, memfd.addr, 0),
        (32766, 0, 0, page, memfd.addr, 0),
        (1, 0, 0, 0, 0, 0),
    ]
    for slot, flags, gpa, size, uaddr, answer in calls:
        assert w.set_region(vm, slot, flags, gpa, size, uaddr) == answer, (slot, flags, gpa)


def test_mte_forbids_moving_or_relogging_a_slot_of_ext4_memory() -> None:
    w = World()
    vm = w.new_vm(w.new_vmm())
    page = w.page
    ext4 = w.map(vm.vmm, "file", 2)
    assert w.set_region(vm, 0, 0, GFN0 * page, 2 * page, ext4.addr) == 0  # no MTE yet
    assert w.enable_mte(vm) == 0
    assert w.set_region(vm, 0, LOG, GFN0 * page, 2 * page, ext4.addr) == EINVAL
    assert w.set_region(vm, 0, 0, (GFN0 + 8) * page, 2 * page, ext4.addr) == EINVAL
    assert w.set_region(vm, 0, 0, GFN0 * page, 2 * page, ext4.addr) == 0  # identical
    assert w.set_region(vm, 0, 0, GFN0 * page, 0, ext4.addr) == 0
    assert w.set_region(vm, 0, 0, GFN0 * page, 2 * page, ext4.addr) == EINVAL


def test_copy_tags_checks_on_both_sides() -> None:
    w, vm = _one_vm()
    page = w.page
    region = w.map(vm.vmm, "anon", 2)
    assert w.set_region(vm, 0, LOG, GFN0 * page, 2 * page, region.addr) == 0
    ipa = GFN0 * page
    assert w.copy_tags(vm, ipa, page, False, reserved=(0, 1))[0] == EINVAL
    assert w.copy_tags(vm, ipa, page, False, flags=2)[0] == EINVAL
    assert w.copy_tags(vm, ipa + 16, page, False)[0] == EINVAL
    assert w.copy_tags(vm, ipa, page + 16, False)[0] == EINVAL
    assert w.copy_tags(vm, ipa, 2**31, False)[0] == EINVAL
    assert w.copy_tags(vm, ipa, page, False)[0] == EBUSY
    assert w.copy_tags(vm, ipa, 0, False)[0] == EBUSY
    assert w.copy_tags(vm, ipa, 2 * page, True)[0] == 2 * page
    w.copy_tags_bad_struct(vm, "unmapped")
    w.copy_tags_bad_struct(vm, "short")


def test_buffer_fault_at_a_page_start_clears_that_page() -> None:
    w, vm = _one_vm()
    page, tpp = w.page, w.tpp
    region = w.map(vm.vmm, "anon-shared", 2)
    w.set_region(vm, 0, 0, GFN0 * page, 2 * page, region.addr)
    w.copy_tags(vm, GFN0 * page, 2 * page, False, data=bytes([0x3]) * 2 * tpp)
    assert w.copy_tags(vm, GFN0 * page, 2 * page, False, "edge", bytes(2 * tpp), tpp)[0] == page
    assert w.copy_tags(vm, (GFN0 + 1) * page, page, True) == (page, bytes(tpp))
    w.copy_tags(vm, GFN0 * page, page, False, data=bytes([0x3]) * tpp)
    assert w.copy_tags(vm, GFN0 * page, page, False, "unmapped")[0] == EFAULT
    assert w.copy_tags(vm, GFN0 * page, page, True) == (page, bytes(tpp))


def test_large_pages_share_tags_through_two_slots() -> None:
    w, vm = _one_vm(65536)
    memfd = w.vmms[0].new_memfd(2)
    r1, r2 = w.map(vm.vmm, "memfd", 2, memfd), w.map(vm.vmm, "memfd", 1, memfd)
    page = w.page
    w.set_region(vm, 0, 0, GFN0 * page, 2 * page, r1.addr)
    w.set_region(vm, 1, 0, (GFN0 + 4) * page, page, r2.addr)
    data = _tags(w, 2)
    assert w.copy_tags(vm, GFN0 * page, 2 * page, False, data=data)[0] == 2 * page
    assert w.copy_tags(vm, (GFN0 + 4) * page, page, True) == (page, _low(data[: w.tpp]))


# --- the reference alone: it says what the spec says (it is not vacuous) --------------------


def _ref_vm(page_size: int = 4096, mte: bool = True) -> tuple[ref.Vm, ref.Process]:
    process = ref.Process()
    vm = ref.Host(page_size).create_vm(process)
    if mte:
        assert vm.enable_mte() == 0
    return vm, process


P = 4096
BASE = 0x7F00_0000_0000


def test_reference_numbers_match_the_uapi() -> None:
    assert (ref.KVM_MEM_LOG_DIRTY_PAGES, ref.KVM_MEM_READONLY) == (
        uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY)
    assert (ref.KVM_ARM_TAGS_TO_GUEST, ref.KVM_ARM_TAGS_FROM_GUEST) == (
        uapi.KVM_ARM_TAGS_TO_GUEST, uapi.KVM_ARM_TAGS_FROM_GUEST)


def test_reference_memslot_errors() -> None:
    vm, process = _ref_vm()
    process.map(BASE, 8 * P, "memfd")
    process.map(BASE + 16 * P, 8 * P, "file")
    s = vm.set_user_memory_region
    assert s(0, 4, GFN0 * P, 8 * P, BASE) == EINVAL  # unknown flag
    assert s(0, 0, GFN0 * P + 16, 8 * P, BASE) == EINVAL
    assert s(0, 0, GFN0 * P, 8 * P + 16, BASE) == EINVAL
    assert s(0, 0, GFN0 * P, 8 * P, BASE + 16) == EINVAL
    assert s(0, 0, GFN0 * P, 8 * P, BASE | 0x0A << 56) == EINVAL  # pointer tag
    assert s(32767, 0, GFN0 * P, 8 * P, BASE) == EINVAL
    assert s(1 << 16, 0, GFN0 * P, 8 * P, BASE) == EINVAL  # address space 1
    assert s(0, 0, 2**64 - 8 * P, 8 * P, BASE) == EINVAL  # wraps
    assert s(0, 0, 0, 2**31 * P, BASE) == EINVAL  # too many pages
    assert s(0, 0, 0, 0, 0) == EINVAL  # delete a missing slot
    assert s(0, 0, 2**40, P, BASE) == EFAULT  # beyond the 40-bit IPA space
    assert s(0, 0, 2**40 - P, 2 * P, BASE) == EFAULT
    assert s(0, 0, 2**64 - 9 * P, 8 * P, BASE) == EFAULT  # no wrap, far beyond the IPA space
    assert s(0, 0, GFN0 * P, 4 * P, BASE + 16 * P) == EINVAL  # MTE: an ext4 file
    assert s(0, 0, GFN0 * P, 4 * P, BASE + 12 * P) == 0  # the hole before it is not checked
    assert s(0, 0, GFN0 * P, 4 * P, BASE + 12 * P) == 0  # identical: no-op
    assert s(0, 0, GFN0 * P, 0, 0) == 0  # delete
    assert s(32766, 0, GFN0 * P, 8 * P, BASE) == 0  # last slot id
    assert s(1, 0, (GFN0 + 7) * P, 4 * P, BASE) == EEXIST
    assert s(1, 0, (GFN0 - 3) * P, 4 * P, BASE) == EEXIST
    assert s(1, 0, (GFN0 - 4) * P, 4 * P, BASE) == 0  # adjacent
    assert s(1, 0, (GFN0 - 4) * P, 5 * P, BASE) == EINVAL  # resize
    assert s(1, 0, (GFN0 - 4) * P, 4 * P, BASE + P) == EINVAL  # new userspace_addr
    assert s(1, RO, (GFN0 - 4) * P, 4 * P, BASE) == EINVAL  # READONLY changed
    assert s(1, LOG, (GFN0 - 4) * P, 4 * P, BASE) == 0  # logging on
    assert s(1, LOG, (GFN0 - 2) * P, 4 * P, BASE) == EEXIST  # a move onto another slot
    assert s(1, LOG, 0x2000 * P, 4 * P, BASE) == 0  # moved
    assert vm.slots[1].base_gfn == 0x2000 and vm.slots[1].flags == LOG
    assert s(2, 0, (2**28 - 1) * P, P, BASE) == 0  # the last page of the IPA space
    assert s(3, 0, (2**28 - 1) * P, 2 * P, BASE) == EEXIST  # EEXIST is checked before EFAULT


def test_reference_mte_check_applies_to_moved_and_flag_changed_slots() -> None:
    vm, process = _ref_vm(mte=False)
    process.map(BASE, 4 * P, "file")
    assert vm.set_user_memory_region(0, 0, GFN0 * P, 4 * P, BASE) == 0  # no MTE yet
    assert vm.enable_mte() == 0
    assert vm.set_user_memory_region(0, LOG, GFN0 * P, 4 * P, BASE) == EINVAL
    assert vm.set_user_memory_region(0, 0, 0x200 * P, 4 * P, BASE) == EINVAL
    assert vm.set_user_memory_region(0, 0, GFN0 * P, 4 * P, BASE) == 0  # identical: no check
    assert vm.slots[0].base_gfn == GFN0 and vm.slots[0].flags == 0


def test_reference_enable_mte() -> None:
    vm, _ = _ref_vm(mte=False)
    assert vm.copy_tags(0, 0, ref.UserBuffer()).ret == EINVAL
    assert vm.enable_mte(flags=1) == EINVAL
    assert vm.enable_mte() == 0
    assert vm.enable_mte() == 0
    vm.create_vcpu()
    assert vm.enable_mte() == EINVAL


def test_reference_copy_tags_checks_in_order() -> None:
    vm, process = _ref_vm()
    process.map(BASE, 4 * P, "anon")
    assert vm.set_user_memory_region(0, LOG, GFN0 * P, 4 * P, BASE) == 0
    buf = ref.UserBuffer(bytes(1024), 1024)
    c = vm.copy_tags
    assert c(GFN0 * P, P, buf, struct_readable=False).ret == EFAULT
    assert c(GFN0 * P, P, buf, reserved=(0, 1)).ret == EINVAL
    assert c(GFN0 * P, P, buf, flags=2).ret == EINVAL
    assert c(GFN0 * P + 16, P, buf).ret == EINVAL
    assert c(GFN0 * P, P + 16, buf).ret == EINVAL
    assert c(GFN0 * P, 2**31, buf).ret == EINVAL
    assert c(GFN0 * P, P, buf).ret == EBUSY  # TO_GUEST while logging
    assert c(GFN0 * P, 0, buf).ret == EBUSY  # even of nothing
    assert c(GFN0 * P, 4 * P, buf, flags=1).ret == 4 * P  # reads stay allowed
    assert c(0, 0, buf, flags=1).ret == 0
    assert vm.get_dirty_log(0) == (0, bytes(8))
    assert vm.get_dirty_log(1)[0] == -errno.ENOENT


def test_reference_copy_tags_walk() -> None:
    vm, process = _ref_vm()
    process.map(BASE, 3 * P, "memfd")
    process.map(BASE + 8 * P, 2 * P, "anon")
    assert vm.set_user_memory_region(0, 0, GFN0 * P, 4 * P, BASE) == 0  # page 3: a hole
    assert vm.set_user_memory_region(1, RO, (GFN0 + 4) * P, 2 * P, BASE + 8 * P) == 0
    tags = bytes(range(256)) * 8
    full = ref.UserBuffer(tags, len(tags))
    c = vm.copy_tags
    assert c(GFN0 * P, 2 * P, full).ret == 2 * P
    assert c(GFN0 * P, 8 * P, full).ret == 3 * P  # stops at the hole in the VMM's mappings
    assert c((GFN0 + 3) * P, P, full).ret == EFAULT
    assert c((GFN0 + 4) * P, P, full).ret == EFAULT  # read-only slot
    assert c((GFN0 - 1) * P, P, full).ret == EFAULT  # no slot
    got = c(GFN0 * P, 2 * P, full, flags=1)
    assert got.ret == 2 * P and got.written == bytes(b & 0xF for b in tags[: 2 * 256])
    got = c((GFN0 + 4) * P, 2 * P, full, flags=1)  # never tagged: zeros, from a RO slot too
    assert got.ret == 2 * P and got.written == bytes(512)
    partial = c(GFN0 * P, 2 * P, ref.UserBuffer(writable=300), flags=1)
    assert partial.ret == P and partial.written == bytes(b & 0xF for b in tags[:300])
    assert c(GFN0 * P, 2 * P, ref.UserBuffer(writable=100), flags=1).ret == EFAULT
    # A TO_GUEST buffer that faults inside page 1: page 0 done, page 1 cleared, page 2 kept.
    assert c(GFN0 * P, 3 * P, ref.UserBuffer(bytes([0x3F]) * 300)).ret == P
    got = c(GFN0 * P, 3 * P, full, flags=1)
    want = bytes([0xF]) * 256 + bytes(256) + bytes(b & 0xF for b in tags[512:768])
    assert got.written == want
    assert c(GFN0 * P, P, ref.UserBuffer()).ret == EFAULT  # first page faults: cleared too
    assert c(GFN0 * P, P, full, flags=1).written == bytes(256)


def test_reference_unreachable_memory() -> None:
    vm, process = _ref_vm()
    process.map(BASE, P, "anon-readonly")
    process.map(BASE + 2 * P, P, "anon-none")
    assert vm.set_user_memory_region(0, 0, GFN0 * P, 3 * P, BASE) == 0
    full = ref.UserBuffer(bytes(768), 768)
    assert vm.copy_tags(GFN0 * P, P, full).ret == EFAULT  # read-only: no TO_GUEST
    assert vm.copy_tags(GFN0 * P, P, full, flags=1).ret == P
    assert vm.copy_tags(GFN0 * P, 3 * P, full, flags=1).ret == P  # page 1: a hole
    assert vm.copy_tags((GFN0 + 2) * P, P, full, flags=1).ret == EFAULT  # PROT_NONE


def test_reference_tag_identity() -> None:
    host = ref.Host(16384)
    p, q = ref.Process("p"), ref.Process("q")
    memfd = p.map(BASE, 2 * 16384, "memfd")
    q.map(BASE + 4 * 16384, 16384, "memfd", memfd, offset=16384)  # the memfd's second page
    p.map(BASE + 8 * 16384, 16384, "anon")
    q.map(BASE + 8 * 16384, 16384, "anon")
    assert p.page_identity(BASE + 16384, 16384) == q.page_identity(BASE + 4 * 16384, 16384)
    assert p.page_identity(BASE + 8 * 16384, 16384) != q.page_identity(BASE + 8 * 16384, 16384)
    assert p.page_identity(BASE + 2 * 16384, 16384) is None
    a, b = host.create_vm(p), host.create_vm(q)
    for vm in (a, b):
        assert vm.enable_mte() == 0
    assert a.set_user_memory_region(0, 0, 0, 2 * 16384, BASE) == 0
    assert b.set_user_memory_region(0, 0, 0, 16384, BASE + 4 * 16384) == 0
    data = bytes([0x12]) * 1024 + bytes([0x34]) * 1024
    assert a.copy_tags(0, 2 * 16384, ref.UserBuffer(data)).ret == 2 * 16384
    assert b.copy_tags(0, 16384, ref.UserBuffer(writable=1024), 1).written == bytes([4]) * 1024
