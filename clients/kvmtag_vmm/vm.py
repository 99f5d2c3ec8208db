"""The machine: a VM on kvmtagd with memfd-backed RAM, its vCPU threads, and the guest's boot.

`Machine` owns everything a VMM holds for one guest: the /dev/kvm, VM and vCPU fds (through
kvmtag.kvm), the guest RAM (one memfd, mapped shared at an address aligned to the emulated page
size, split into memslots with optional holes between them), each vCPU's kvm_run area, and one
thread per vCPU calling KVM_RUN. Every ioctl it makes is counted in `ioctls`.

Pausing uses `immediate_exit` in kvm_run, as QEMU's SIG_IPI handler does: a KVM_RUN in flight
returns EINTR within a few hundred guest steps, so stop-and-copy starts without waiting for a
slice to end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import mmap
import random
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from clients.kvmtag_vmm import _bits
from clients.kvmtag_vmm.ram import GuestRam
from clients.kvmtag_vmm.stream import MAX_WINDOW_BYTES, SlotLayout
from kvmtag import client, tagkernel, uapi
from kvmtag.guest import GUEST_ENTRY, HEARTBEAT_GPA, GuestDescriptor
from kvmtag.kvm import Kvm, VcpuFd, VmFd, exit_of

log = logging.getLogger("kvmtag.vmm")

GPA_BASE = 0x8000_0000  # where guest RAM starts: 2 GiB (the image and MMIO are below)
MiB = 1 << 20
TAG_BATCH_BYTES = 4 << 20  # one-per-byte tags per KVM_ARM_MTE_COPY_TAGS (16,384 4 KiB pages)
_local = threading.local()


def _scratch() -> memoryview:
    """This thread's buffer for one batch of one-per-byte tags."""
    buf: memoryview | None = getattr(_local, "tags", None)
    if buf is None:
        buf = _local.tags = memoryview(bytearray(TAG_BATCH_BYTES))
    return buf
FROM_GUEST, TO_GUEST = uapi.KVM_ARM_TAGS_FROM_GUEST, uapi.KVM_ARM_TAGS_TO_GUEST
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
IMMEDIATE_EXIT = 1  # offsetof(struct kvm_run, immediate_exit)
PAUSE_TIMEOUT = 30.0
# Kernel profiles before 6.2 refuse MAP_SHARED memory in MTE memslots (kvm_vma_mte_allowed).
SHARED_MTE_FROM = (6, 2)


Layout = Sequence[SlotLayout] | Callable[[int], Sequence[SlotLayout]]


class VmmError(Exception):
    """Something the user must hear about: the VMM says it and exits non-zero."""


class OutcomeUnknown(VmmError):
    """The whole stream went out but the destination's reply never came: it may be running
    the guest. The source must not resume it (two running copies); it stays paused."""


def profile_version(name: str) -> tuple[int, ...]:
    """A kernel profile as a comparable version ("latest" sorts after every number)."""
    if name == "latest":
        return (1 << 30,)
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)


def check_profile(profile: str, mte: bool) -> None:
    """MTE guest RAM must be shared memory (the daemon reaches it through its fd): kernels
    before 6.2 refuse that, as the real ones did, and the VMM says so."""
    if mte and profile_version(profile) < SHARED_MTE_FROM:
        raise VmmError(
            f"kvmtagd emulates Linux {profile}: kernels before 6.2 refuse shared memory "
            "(MAP_SHARED memfd) in MTE memslots, and guest RAM must be shared to run the guest "
            "and to migrate it. Use --no-mte, or a kvmtagd with --kernel 6.2 or later."
        )


def plan_layout(
    ram_bytes: int, nslots: int, hole_bytes: int, page_size: int, base: int = GPA_BASE
) -> tuple[SlotLayout, ...]:
    """RAM split into nslots memslots (the last takes the remainder), consecutive in guest
    physical memory with hole_bytes unmapped between neighbours."""
    pages = ram_bytes // page_size
    if ram_bytes % page_size or nslots < 1 or pages < 2 * nslots:
        raise VmmError(f"{ram_bytes} bytes of RAM cannot be split into {nslots} memslots of "
                       f"whole {page_size}-byte pages (at least 2 each)")  # fmt: skip
    if hole_bytes % page_size:
        raise VmmError(f"the hole ({hole_bytes} bytes) must be whole {page_size}-byte pages")
    per = pages // nslots
    slots = []
    gpa = base
    for i in range(nslots):
        n = per if i < nslots - 1 else pages - per * (nslots - 1)
        slots.append(SlotLayout(i, gpa, n * page_size))
        gpa += n * page_size + hole_bytes
    return tuple(slots)


@dataclass(frozen=True)
class GuestConfig:
    """The tagged-heap workload and what the VMM loads around it."""

    seed: int = 1
    working_set: int = 4 * MiB  # heap bytes, spread over the memslots that host vCPUs
    obj_size: int = 64
    store_rate: int = 0  # stores per second per vCPU; 0: as fast as it goes
    steps_per_run: int = 500
    scan_interval: int = 2000
    populate: int = 0  # bytes of VMM-written data outside the heaps (a used guest's RAM)
    populate_tagged: int = 50  # percent of populated memory that also carries random tags


@dataclass
class RunStats:
    """What the vCPU threads saw."""

    slices: list[int]
    steps: list[int]
    crash: tuple[int, int] | None = None  # (vCPU, faulting guest address)
    failure: str | None = None


# --- the machine -------------------------------------------------------------------------------


@dataclass
class _Slot:
    layout: SlotLayout
    offset: int  # in the memfd
    npages: int
    logging: bool = False


@dataclass
class _Vcpus:
    cond: threading.Condition = field(default_factory=threading.Condition)
    pause_requested: bool = False
    stopping: bool = False
    parked: list[bool] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)  # a crash or a failure


class Machine:
    """A VM on kvmtagd, built from a RAM layout: memslots over one memfd, `nvcpus` initialised
    vCPUs with their kvm_run areas mapped, MTE enabled if asked."""

    def __init__(
        self, socket: str | None, layout: Layout, nvcpus: int, mte: bool,
        *, page_size: int | None = None,
    ) -> None:  # fmt: skip
        """`layout` is the memslots, or a function of the daemon's page size that plans them;
        with `page_size`, a daemon emulating another page size is refused."""
        self.ioctls: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        try:
            self._build(socket, layout, nvcpus, mte, page_size)
        except BaseException:
            self._stack.close()
            raise

    def _build(
        self, socket: str | None, layout: Layout, nvcpus: int, mte: bool, want: int | None
    ) -> None:
        try:
            self.kvm = self._stack.enter_context(Kvm(socket=socket))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise VmmError(f"cannot reach kvmtagd ({e}): start it, or pass --socket") from None
        hello = client.info(self.kvm.fd)
        self.page_size: int = hello.page_size
        self.profile: str = hello.profile
        self.tag_log_supported = bool(hello.extensions & uapi.KVMTAG_EXT_TAG_LOG)
        self.mte = mte
        if want is not None and want != self.page_size:
            raise VmmError(f"the stream's guest has {want}-byte pages, this kvmtagd emulates a "
                           f"host with {self.page_size}-byte pages")  # fmt: skip
        check_profile(self.profile, mte)
        slots = layout(self.page_size) if callable(layout) else layout
        for s in slots:
            if s.gpa % self.page_size or s.size % self.page_size:
                raise VmmError(f"memslot {s.slot} is not whole {self.page_size}-byte pages: "
                               "kvmtagd's page size differs from the stream's or the layout's")
        self.vm: VmFd = self._stack.enter_context(self.kvm.create_vm())
        self._count("KVM_CREATE_VM")
        if mte:
            self.vm.enable_cap(uapi.KVM_CAP_ARM_MTE)
            self._count("KVM_ENABLE_CAP")
        total = sum(s.size for s in slots)
        self.ram = GuestRam(total, self.page_size)
        self._stack.callback(self.ram.close)
        self.slots: list[_Slot] = []
        offset = 0
        for s in slots:
            self.slots.append(_Slot(s, offset, s.size // self.page_size))
            offset += s.size
        for slot in self.slots:
            self._set_region(slot, 0)
        self.vcpus: list[VcpuFd] = []
        self.run_areas: list[mmap.mmap] = []
        run_size = self.kvm.get_vcpu_mmap_size()
        for i in range(nvcpus):
            vcpu = self._stack.enter_context(self.vm.create_vcpu(i))
            vcpu.init()
            self._count("KVM_CREATE_VCPU", "KVM_ARM_VCPU_INIT")
            area = vcpu.mmap_run(run_size)
            self._stack.callback(area.close)
            self.vcpus.append(vcpu)
            self.run_areas.append(area)
        self.stats = RunStats([0] * nvcpus, [0] * nvcpus)
        self._v = _Vcpus(parked=[True] * nvcpus)
        self._stack.callback(self.stop)

    @property
    def layout(self) -> tuple[SlotLayout, ...]:
        return tuple(s.layout for s in self.slots)

    @property
    def packed_per_page(self) -> int:
        return self.page_size // 32

    def _count(self, *names: str, n: int = 1) -> None:
        with self._count_lock:  # vCPUs' registers are read and written from several threads
            for name in names:
                self.ioctls[name] += n

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- memslots and dirty logging ------------------------------------------------------------

    def _set_region(self, slot: _Slot, flags: int) -> None:
        s = slot.layout
        try:
            self.vm.set_user_memory_region(s.slot, s.gpa, s.size, self.ram.addr + slot.offset,
                                           flags)  # fmt: skip
        except OSError as e:
            if e.errno == errno.EINVAL and self.mte:
                check_profile(self.profile, self.mte)  # the clear message, if that is why
            raise VmmError(f"KVM_SET_USER_MEMORY_REGION of memslot {s.slot}: {e}") from None
        finally:
            self._count("KVM_SET_USER_MEMORY_REGION")
        slot.logging = bool(flags & LOG)

    def set_logging(self, on: bool) -> None:
        """Dirty logging on or off for every memslot (a flags-only memslot update)."""
        for slot in self.slots:
            if slot.logging != on:
                self._set_region(slot, LOG if on else 0)

    @property
    def logging(self) -> bool:
        return any(s.logging for s in self.slots)

    def enable_cap(self, cap: int, *args: int) -> None:
        self.vm.enable_cap(cap, args=args)
        self._count("KVM_ENABLE_CAP")

    def get_dirty_log(self, index: int) -> int:
        """KVM_GET_DIRTY_LOG of slot `index`, as bits."""
        slot = self.slots[index]
        bitmap = bytearray(_bits.words_bytes(slot.npages))
        self.vm.get_dirty_log(slot.layout.slot, bitmap)
        self._count("KVM_GET_DIRTY_LOG")
        return _bits.from_bytes(bitmap)

    def clear_dirty_log(self, index: int, bits: int) -> None:
        """KVM_CLEAR_DIRTY_LOG over the whole slot: re-protects the pages of `bits`."""
        slot = self.slots[index]
        self.vm.clear_dirty_log(slot.layout.slot, 0, slot.npages, _bits.to_bytes(bits, slot.npages))
        self._count("KVM_CLEAR_DIRTY_LOG")

    def get_tag_log(self, index: int, first: int, npages: int) -> tuple[bytes, int]:
        """KVMTAG_GET_TAG_LOG (first a multiple of 64): saved packed tags and validity bits."""
        slot = self.slots[index]
        tags, valid = self.vm.get_tag_log(slot.layout.slot, first, npages, self.packed_per_page)
        self._count("KVMTAG_GET_TAG_LOG")
        return tags, _bits.from_bytes(valid) & _bits.mask(npages)

    # --- tags ------------------------------------------------------------------------------------

    def read_tags(self, index: int, first: int, npages: int) -> bytearray:
        """Packed tags of pages [first, first+npages) of slot `index`, with FROM_GUEST copies of
        up to TAG_BATCH_BYTES of tags each (they arrive one per byte and are packed in C)."""
        slot = self.slots[index]
        ps, tpp, ppp = self.page_size, self.page_size // 16, self.packed_per_page
        out = bytearray(npages * ppp)
        scratch = _scratch()  # reused: a fresh 4 MiB buffer per batch costs its page faults
        batch = TAG_BATCH_BYTES // tpp
        for at in range(0, npages, batch):
            n = min(batch, npages - at)
            buf = scratch[: n * tpp]
            gpa = slot.layout.gpa + (first + at) * ps
            got = self.vm.mte_copy_tags(gpa, n * ps, buf, FROM_GUEST)
            self._count("KVM_ARM_MTE_COPY_TAGS")
            if got != n * ps:
                raise VmmError(f"KVM_ARM_MTE_COPY_TAGS at {gpa:#x} copied {got} of {n * ps} bytes")
            tagkernel.pack(memoryview(out)[at * ppp : (at + n) * ppp], buf)
        return out

    def write_tags(self, gpa: int, packed: bytes | bytearray | memoryview) -> None:
        """TO_GUEST of packed tags (PAGE_SIZE/32 bytes a page) from gpa, unpacked in C a batch at
        a time (no memslot may be logging: EBUSY since 6.12)."""
        tpp, ppp = self.page_size // 16, self.packed_per_page
        view = memoryview(packed)
        scratch = _scratch()
        step = TAG_BATCH_BYTES // tpp * ppp
        for at in range(0, len(view), step):
            part = view[at : at + step]
            unpacked = scratch[: len(part) * 2]
            tagkernel.unpack(unpacked, part)
            length = len(part) // ppp * self.page_size
            where = gpa + at // ppp * self.page_size
            got = self.vm.mte_copy_tags(where, length, unpacked, TO_GUEST)
            self._count("KVM_ARM_MTE_COPY_TAGS")
            if got != length:
                raise VmmError(f"KVM_ARM_MTE_COPY_TAGS TO_GUEST at {where:#x} copied {got} of "
                               f"{length} bytes")  # fmt: skip

    # --- registers -------------------------------------------------------------------------------

    def get_registers(self, i: int) -> list[tuple[int, int]]:
        vcpu = self.vcpus[i]
        ids = vcpu.get_reg_list()
        self._count("KVM_GET_REG_LIST")
        regs = [(r, vcpu.get_one_reg(r)) for r in ids]
        self._count("KVM_GET_ONE_REG", n=len(ids))
        return regs

    def set_registers(self, i: int, regs: Sequence[tuple[int, int]]) -> None:
        vcpu = self.vcpus[i]
        for reg_id, value in regs:
            try:
                vcpu.set_one_reg(reg_id, value)
            except OSError as e:
                raise VmmError(f"vCPU {i}: KVM_SET_ONE_REG {reg_id:#x}: {e}") from None
            finally:
                self._count("KVM_SET_ONE_REG")

    def all_registers(self) -> list[list[tuple[int, int]]]:
        """Every vCPU's registers, the vCPUs in parallel (each vCPU fd is its own connection
        to kvmtagd): this is downtime."""
        with concurrent.futures.ThreadPoolExecutor(len(self.vcpus)) as pool:
            return list(pool.map(self.get_registers, range(len(self.vcpus))))

    def set_all_registers(self, regs: dict[int, Sequence[tuple[int, int]]]) -> None:
        """KVM_SET_ONE_REG of every vCPU's registers, the vCPUs in parallel."""
        with concurrent.futures.ThreadPoolExecutor(max(1, len(regs))) as pool:
            for f in [pool.submit(self.set_registers, i, r) for i, r in regs.items()]:
                f.result()

    def register(self, i: int, name: str) -> int:
        self._count("KVM_GET_ONE_REG")
        return self.vcpus[i].get_one_reg(uapi.CORE_REGS[name])

    # --- the CHECK digest ----------------------------------------------------------------------

    def content_digest(self) -> bytes:
        """CHECK's digest (docs/MIGRATION.md, "CHECK"): SHA-256 over, for each memslot in
        order, its (id, 0, gpa, size) as <IIQQ, the bitmap of its pages whose data is not all
        zero, the SHA-256 of those pages' data in ascending order, and with MTE the same two
        for packed tags. Zero pages cost nothing, and it does not matter whether one is a hole
        or written zeros. Call it with the vCPUs paused."""
        outer = hashlib.sha256()
        ps, ppp = self.page_size, self.packed_per_page
        window = MAX_WINDOW_BYTES // ps
        for k, slot in enumerate(self.slots):
            npages = slot.npages
            extents = self.ram.data_extents(slot.offset, slot.offset + slot.layout.size)
            data_hash, nonzero = hashlib.sha256(), 0
            for at in range(0, npages, window):
                n = min(window, npages - at)
                offset = slot.offset + at * ps
                data, zero = self.ram.read_pages(offset, n, ps, _bits.mask(n), extents)
                data_hash.update(data)
                nonzero |= (~zero & _bits.mask(n)) << at
            s = slot.layout
            outer.update(struct.pack("<IIQQ", s.slot, 0, s.gpa, s.size))
            outer.update(_bits.to_bytes(nonzero, npages))
            outer.update(data_hash.digest())
            if not self.mte:
                continue
            tag_hash, tagged = hashlib.sha256(), 0
            span = TAG_BATCH_BYTES // (ps // 16)
            for at in range(0, npages, span):
                n = min(span, npages - at)
                packed = self.read_tags(k, at, n)
                bitmap = bytearray(_bits.words_bytes(n))
                tagkernel.zero_pages(bitmap, packed, ppp)
                bits = ~_bits.from_bytes(bitmap) & _bits.mask(n)
                with memoryview(packed) as view:
                    for f, c in _bits.runs(bits):
                        tag_hash.update(view[f * ppp : (f + c) * ppp])
                tagged |= bits << at
            outer.update(_bits.to_bytes(tagged, npages))
            outer.update(tag_hash.digest())
        return outer.digest()

    # --- booting the guest -----------------------------------------------------------------------

    def boot(self, guest: GuestConfig) -> None:
        """Load the guest like firmware loads a kernel: optional populated RAM (data, some of it
        tagged), a descriptor per memslot that hosts vCPUs, and x0/x1/pc of every vCPU."""
        ps = self.page_size
        nvcpus = len(self.vcpus)
        hosts = min(len(self.slots), nvcpus)
        obj = guest.obj_size
        heap = guest.working_set // hosts // max(obj, ps) * max(obj, ps)
        if heap < obj:
            raise VmmError(f"a working set of {guest.working_set} bytes is too small for "
                           f"{hosts} heaps of {obj}-byte objects")  # fmt: skip
        free_after: list[tuple[int, int]] = []  # (slot index, first free byte in the slot)
        for k, slot in enumerate(self.slots):
            s = slot.layout
            if k >= hosts:
                free_after.append((k, 0))
                continue
            group = len(range(k, nvcpus, hosts))
            if ps + heap > s.size:
                raise VmmError(f"memslot {s.slot} ({s.size // MiB} MiB) cannot hold a "
                               f"{heap // MiB} MiB heap: lower --working-set")  # fmt: skip
            desc = GuestDescriptor(
                s.gpa + ps, heap, obj, group, guest.seed + k, guest.steps_per_run,
                guest.store_rate, guest.scan_interval,
            )  # fmt: skip
            self.ram.write(slot.offset, desc.pack())
            for local, i in enumerate(range(k, nvcpus, hosts)):
                vcpu = self.vcpus[i]
                for name, value in (("x0", s.gpa), ("x1", local), ("pc", GUEST_ENTRY)):
                    vcpu.set_one_reg(uapi.CORE_REGS[name], value)
                    self._count("KVM_SET_ONE_REG")
            free_after.append((k, ps + heap))
        if guest.populate:
            self._populate(guest, free_after)

    def _populate(self, guest: GuestConfig, free_after: list[tuple[int, int]]) -> None:
        """VMM-written data after the heaps, in 64 KiB blocks, a share of them with random tags:
        what a used guest's RAM looks like to a migration (page cache, tagged heaps)."""
        block = max(64 * 1024, self.page_size)
        per_slot = guest.populate // len(self.slots) // block * block
        rng = random.Random(guest.seed)
        chunk = rng.randbytes(MiB)
        tags_chunk = rng.randbytes(TAG_BATCH_BYTES // 32)  # packed: 2 tags a byte
        for k, first_free in free_after:
            slot = self.slots[k]
            start = -(-first_free // block) * block
            if start + per_slot > slot.layout.size:
                raise VmmError(f"--populate does not fit in memslot {slot.layout.slot} after "
                               "the guest's heap")  # fmt: skip
            for at in range(0, per_slot, len(chunk)):
                n = min(len(chunk), per_slot - at)
                self.ram.write(slot.offset + start + at, chunk[:n])
            tagged = 0
            for b in range(per_slot // block if self.mte else 0):  # no tags without MTE
                if rng.randrange(100) < guest.populate_tagged:
                    tagged |= 1 << b
            for first, count in _bits.runs(tagged):
                gpa = slot.layout.gpa + start + first * block
                nbytes = count * block // 32  # packed
                for at in range(0, nbytes, len(tags_chunk)):
                    part = tags_chunk[: min(len(tags_chunk), nbytes - at)]
                    self.write_tags(gpa + at * 32, part)
        log.info("populated %d MiB outside the heaps (%d%% tagged)",
                 per_slot * len(self.slots) // MiB,
                 guest.populate_tagged if self.mte else 0)  # fmt: skip

    # --- vCPU threads --------------------------------------------------------------------------

    def start(self) -> None:
        """One thread per vCPU, calling KVM_RUN until stopped, paused, or the guest crashes."""
        v = self._v
        if v.threads:
            raise RuntimeError("the vCPUs are already running")
        v.parked = [False] * len(self.vcpus)
        for i in range(len(self.vcpus)):
            t = threading.Thread(target=self._vcpu_loop, args=(i,), name=f"vcpu-{i}",
                                 daemon=True)  # fmt: skip
            v.threads.append(t)
            t.start()

    def _vcpu_loop(self, i: int) -> None:
        v, vcpu, area = self._v, self.vcpus[i], self.run_areas[i]
        try:
            while True:
                with v.cond:
                    while v.pause_requested and not v.stopping:
                        v.parked[i] = True
                        v.cond.notify_all()
                        v.cond.wait()
                    v.parked[i] = False
                    if v.stopping:
                        return
                try:
                    vcpu.run()
                except OSError as e:
                    if e.errno == errno.EINTR:  # immediate_exit: a pause or a stop
                        continue
                    raise
                ex = exit_of(area)
                if ex.reason == uapi.KVM_EXIT_MMIO and ex.mmio_addr == HEARTBEAT_GPA:
                    with v.cond:
                        self.stats.slices[i] += 1
                        self.stats.steps[i] += int.from_bytes(ex.mmio_data, "little")
                    continue
                crash = uapi.KVM_EXIT_SYSTEM_EVENT, uapi.KVM_SYSTEM_EVENT_CRASH
                if (ex.reason, ex.event) == crash:
                    gpa = ex.data[0] if ex.data else 0
                    log.error("the guest crashed: vCPU %d, tag-check fault or corrupt object at "
                              "%#x", i, gpa)  # fmt: skip
                    with v.cond:
                        self.stats.crash = self.stats.crash or (i, gpa)
                    return
                raise VmmError(f"vCPU {i}: unexpected exit {ex}")
        except Exception as e:
            with v.cond:
                self.stats.failure = self.stats.failure or f"vCPU {i}: {e}"
            log.error("vCPU %d stopped: %s", i, e)
        finally:
            with v.cond:
                v.parked[i] = True
                v.cond.notify_all()
            v.ended.set()

    def _kick(self, value: int) -> None:
        for area in self.run_areas:
            area[IMMEDIATE_EXIT] = value

    def pause(self) -> None:
        """Every vCPU out of KVM_RUN and parked; returns once they are."""
        v = self._v
        with v.cond:
            v.pause_requested = True
        self._kick(1)
        deadline = time.monotonic() + PAUSE_TIMEOUT
        with v.cond:
            while not all(v.parked):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmmError("the vCPUs did not pause")
                v.cond.wait(left)
        self._kick(0)

    def resume(self) -> None:
        v = self._v
        self._kick(0)
        with v.cond:
            v.pause_requested = False
            v.cond.notify_all()

    def stop(self) -> None:
        v = self._v
        with v.cond:
            v.stopping = True
            v.cond.notify_all()
        self._kick(1)
        for t in v.threads:
            t.join(PAUSE_TIMEOUT)
        self._kick(0)

    def run_for(self, seconds: float | None) -> None:
        """Let the guest run for `seconds` (None: until a crash or failure); returns early if a
        vCPU crashed or failed."""
        self._v.ended.wait(seconds)

    def guest_steps(self) -> list[int]:
        """Each vCPU's x3, the guest's own step counter (call with the vCPUs paused)."""
        return [self.register(i, "x3") for i in range(len(self.vcpus))]

    @property
    def healthy(self) -> bool:
        return self.stats.crash is None and self.stats.failure is None
