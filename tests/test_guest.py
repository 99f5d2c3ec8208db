"""The running guest (issue 5): vCPUs, KVM_RUN exits, live dirty logging, crashes, moving a guest.

Most tests are what a VMM does through kvmtag.client against the session's kvmtagd: boot the
tagged-heap guest in memfd RAM, run it on vCPU threads, log dirty pages while it runs, corrupt
or move it. A few are in process where the model is easier to steer. Every wait has a timeout,
every thread is joined in a `finally`, and nothing asserts on timing.

The helpers `GuestVm` and `VcpuThreads` are shared with tests/test_taglog.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import mmap
import os
import random
import re
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from kvmtag import Host, SimulatedFile, SimulatedProcess, Vcpu, client, dirtylog, uapi
from kvmtag.guest import (
    ALLOCATED,
    GUEST_ENTRY,
    GUEST_LOOP,
    HEARTBEAT_GPA,
    GuestDescriptor,
    Slice,
)
from kvmtag.guestmem import GuestMemory
from kvmtag.kvm import Kvm, RunExit, VcpuFd, VmFd, exit_of
from kvmtag.uapi import LAYOUT

PAGE = 4096  # the session kvmtagd's page size (the default)
TPP = PAGE // 16  # tags per page, one per byte (the ioctl's format)
GPA = 0x8000_0000  # slot 0: guest RAM, the descriptor in its first page, the heap after it
GPA2 = 0xC000_0000  # slot 1, where a test needs a second one
FROM, TO = uapi.KVM_ARM_TAGS_FROM_GUEST, uapi.KVM_ARM_TAGS_TO_GUEST
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
REG = uapi.CORE_REGS
TIMEOUT = 30.0  # seconds after which a thread, a child or a wait has hung
BATCH_PAGES = 128  # pages per COPY_TAGS call when moving whole ranges of tags
BAD_ADDR = 0x10  # in the never-mapped first page: any pointer there faults
HEADER = struct.Struct("<IIQ")  # an object's header: state, index, generation
ROOT = Path(__file__).resolve().parent.parent
HUGE_SKIP = "no free huge pages: .ci/run reserves 8 as root; this machine refused"


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


def runs(bitmap: bytes | bytearray, npages: int) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of set bits: one COPY_TAGS per run, not per page."""
    bits = int.from_bytes(bitmap, "little") & ((1 << npages) - 1)
    while bits:
        low = (bits & -bits).bit_length() - 1
        shifted = bits >> low
        count = (shifted ^ (shifted + 1)).bit_length() - 1  # trailing ones
        yield low, count
        bits &= ~(((1 << count) - 1) << low)


def pages_of(bitmap: bytes | bytearray, npages: int) -> list[int]:
    return [p for first, n in runs(bitmap, npages) for p in range(first, first + n)]


def heartbeat_steps(ex: RunExit) -> int:
    """The steps a slice did, from its heartbeat exit; fails on any other exit."""
    assert ex.reason == uapi.KVM_EXIT_MMIO and ex.mmio_addr == HEARTBEAT_GPA, ex
    assert len(ex.mmio_data) == 8, ex
    steps = int.from_bytes(ex.mmio_data, "little")
    assert steps > 0, ex
    return steps


# --- a VMM with the guest, through kvmtagd ----------------------------------------------------


class GuestVm:
    """An MTE VM served by kvmtagd, as a VMM holds it: memfd RAM mapped shared as slot 0 at GPA,
    `nvcpus` initialised vCPUs with their kvm_run areas mapped. `boot()` writes the guest's
    descriptor into the first page and points the vCPUs at the image."""

    def __init__(
        self,
        socket: str,
        *,
        ram_pages: int = 256,
        nvcpus: int = 2,
        flags: int = 0,
        manual: int = 0,
        tag_log: bool = False,
        hugetlb: bool = False,
    ) -> None:
        self.stack = contextlib.ExitStack()
        try:
            self.kvm = self.stack.enter_context(Kvm(socket=socket))
            self.vm: VmFd = self.stack.enter_context(self.kvm.create_vm())
            self.vm.enable_cap(uapi.KVM_CAP_ARM_MTE)
            if manual:
                self.vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args=(manual,))
            if tag_log:
                self.vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)
            self.npages = ram_pages
            self.size = ram_pages * PAGE
            memfd_flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
            self.memfd = os.memfd_create("guest-ram", memfd_flags)
            self.stack.callback(os.close, self.memfd)
            os.ftruncate(self.memfd, self.size)
            self.ram = mmap.mmap(self.memfd, self.size)
            self.stack.callback(self.ram.close)
            self.flags = flags
            self.vm.set_user_memory_region(0, GPA, self.size, self.ram, flags)
            run_size = self.kvm.get_vcpu_mmap_size()
            self.vcpus: list[VcpuFd] = []
            self.run_areas: list[mmap.mmap] = []
            for i in range(nvcpus):
                vcpu = self.stack.enter_context(self.vm.create_vcpu(i))
                vcpu.init()
                self.vcpus.append(vcpu)
                area = vcpu.mmap_run(run_size)
                self.stack.callback(area.close)
                self.run_areas.append(area)
        except BaseException:
            self.stack.close()
            raise

    def __enter__(self) -> GuestVm:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stack.close()

    def descriptor(self, **overrides: int) -> GuestDescriptor:
        fields = {
            "heap_gpa": GPA + PAGE, "heap_size": 64 * PAGE, "obj_size": 64,
            "nvcpus": len(self.vcpus), "seed": 1, "steps_per_run": 500,
        } | overrides  # fmt: skip
        return GuestDescriptor(**fields)

    def boot(self, desc: GuestDescriptor | None = None) -> GuestDescriptor:
        """Write the descriptor at GPA (a VMM write: not a guest store, nothing is logged) and
        set x0, x1 and pc of every vCPU."""
        desc = desc or self.descriptor()
        self.ram[: desc.SIZE] = desc.pack()
        for i, vcpu in enumerate(self.vcpus):
            vcpu.set_one_reg(REG["x0"], GPA)
            vcpu.set_one_reg(REG["x1"], i)
            vcpu.set_one_reg(REG["pc"], GUEST_ENTRY)
        self.desc = desc
        return desc

    def run(self, i: int) -> RunExit:
        self.vcpus[i].run()
        return exit_of(self.run_areas[i])

    def reg(self, i: int, name: str) -> int:
        return self.vcpus[i].get_one_reg(REG[name])

    def tags(self, first: int = 0, npages: int | None = None) -> bytes:
        """Tags of a range of slot 0 (one per byte), read in batches with COPY_TAGS."""
        npages = self.npages - first if npages is None else npages
        out = bytearray(npages * TPP)
        view = memoryview(out)
        for at in range(0, npages, BATCH_PAGES):
            n = min(BATCH_PAGES, npages - at)
            buf = bytearray(n * TPP)
            gpa = GPA + (first + at) * PAGE
            assert self.vm.mte_copy_tags(gpa, n * PAGE, buf, FROM) == n * PAGE
            view[at * TPP : (at + n) * TPP] = buf
        return bytes(out)

    def set_tags(self, first: int, tags: bytes) -> None:
        """TO_GUEST over a range of slot 0, in batches (the slot must not be logging)."""
        npages = len(tags) // TPP
        for at in range(0, npages, BATCH_PAGES):
            n = min(BATCH_PAGES, npages - at)
            gpa = GPA + (first + at) * PAGE
            assert self.vm.mte_copy_tags(gpa, n * PAGE, tags[at * TPP : (at + n) * TPP], TO) == (
                n * PAGE
            )

    def objects(self) -> list[tuple[int, int, int]]:
        """(gpa, state, generation) of every object of the heap, from the VMM's mapping."""
        desc = self.desc
        base = desc.heap_gpa - GPA
        found = []
        for k in range(desc.heap_size // desc.obj_size):
            state, _, generation = HEADER.unpack_from(self.ram, base + k * desc.obj_size)
            found.append((desc.heap_gpa + k * desc.obj_size, state, generation))
        return found

    def allocated(self) -> list[int]:
        return [gpa for gpa, state, _ in self.objects() if state == ALLOCATED]


class VcpuThreads:
    """One thread per vCPU of a GuestVm, calling KVM_RUN in a loop; every exit must be a
    heartbeat. `paused()` parks them all between two KVM_RUNs; leaving the `with` block stops
    and joins them, and reports what went wrong in any of them."""

    def __init__(self, guest: GuestVm) -> None:
        self.guest = guest
        n = len(guest.vcpus)
        self.go = threading.Event()
        self.go.set()
        self.stopping = threading.Event()
        self.parked = [threading.Event() for _ in range(n)]
        self.cond = threading.Condition()
        self.slices = [0] * n
        self.steps = [0] * n
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"vcpu-{i}", daemon=True)
            for i in range(n)
        ]

    def __enter__(self) -> VcpuThreads:
        try:
            for t in self.threads:
                t.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(check=t is None)

    def _loop(self, i: int) -> None:
        try:
            while not self.stopping.is_set():
                if not self.go.is_set():
                    self.parked[i].set()
                    self.go.wait(0.05)  # until resumed or stopped
                    continue
                steps = heartbeat_steps(self.guest.run(i))
                with self.cond:
                    self.slices[i] += 1
                    self.steps[i] += steps
                    self.cond.notify_all()
        except BaseException as e:
            with self.cond:
                self.failures.append(f"vCPU {i}: {e!r}")
                self.cond.notify_all()
        finally:
            self.parked[i].set()

    def mark(self) -> list[int]:
        with self.cond:
            return list(self.slices)

    def wait_slices(self, mark: list[int], more: int = 1) -> None:
        """Until every vCPU has finished `more` slices after `mark`."""
        deadline = time.monotonic() + TIMEOUT
        with self.cond:
            while not all(s >= m + more for s, m in zip(self.slices, mark, strict=True)):
                assert not self.failures, self.failures
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"vCPUs stuck at {self.slices} slices"
                self.cond.wait(remaining)
            assert not self.failures, self.failures

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Every vCPU out of KVM_RUN (the guest is quiescent) for the block."""
        for p in self.parked:
            p.clear()
        self.go.clear()
        try:
            for i, p in enumerate(self.parked):
                assert p.wait(TIMEOUT), f"vCPU {i} did not pause"
            assert not self.failures, self.failures
            yield
        finally:
            self.go.set()

    def stop(self, check: bool = True) -> None:
        self.stopping.set()
        self.go.set()
        for t in self.threads:
            if t.ident is not None:
                t.join(TIMEOUT)
        alive = [t.name for t in self.threads if t.is_alive()]
        if check:
            assert not alive, f"threads still running: {alive}"
            assert not self.failures, self.failures


# --- booting and running ----------------------------------------------------------------------


def test_guest_boots_and_runs_on_two_vcpu_threads(kvmtagd: str) -> None:
    with GuestVm(kvmtagd) as g:
        desc = g.boot()
        with VcpuThreads(g) as threads:
            for _ in range(3):
                threads.wait_slices(threads.mark(), 3)
                with threads.paused():
                    # x3 counts the guest's steps: exactly what the heartbeats reported.
                    assert [g.reg(i, "x3") for i in range(2)] == threads.steps
        assert all(s >= 9 for s in threads.slices)
        for i in range(2):
            assert g.reg(i, "x3") == threads.steps[i] > 0
            assert g.reg(i, "pc") == GUEST_LOOP
            assert (g.reg(i, "x0"), g.reg(i, "x1")) == (GPA, i)
            assert g.reg(i, "x4") > 0  # objects allocated, by the guest's own count
        # Its stores are in the VMM's memory: allocated objects carry one non-zero tag in all
        # their granules; free and untouched ones carry tag 0.
        tags = g.tags()
        per_object = desc.obj_size // 16
        allocated = 0
        for gpa, state, _ in g.objects():
            first = (gpa - GPA) // 16
            mine = set(tags[first : first + per_object])
            if state == ALLOCATED:
                allocated += 1
                assert len(mine) == 1 and 0 not in mine, (hex(gpa), mine)
            else:
                assert mine == {0}, (hex(gpa), mine)
        assert allocated == g.reg(0, "x4") + g.reg(1, "x4")
        # Nothing outside the heap was touched.
        heap_end = (desc.heap_gpa + desc.heap_size - GPA) // 16
        assert not any(tags[heap_end:])


def test_kvm_run_in_process_pending_signal_is_eintr_with_exit_intr() -> None:
    """A signal arriving during KVM_RUN (the VMM's handler sets immediate_exit) ends the slice:
    EINTR and exit reason KVM_EXIT_INTR; the work done stays done; the next run carries on."""
    proc = SimulatedProcess()
    ram = SimulatedFile(64 * PAGE)
    uaddr = proc.mmap(64 * PAGE, file=ram, shared=True)
    vm = Host().open().create_vm(proc, 0)
    assert not isinstance(vm, int)
    assert vm.enable_cap(uapi.KVM_CAP_ARM_MTE, 0, 0) == 0
    assert vm.set_user_memory_region(proc, 0, 0, GPA, 64 * PAGE, uaddr) == 0
    desc = GuestDescriptor(GPA + PAGE, 32 * PAGE, 64, 1, 3, steps_per_run=100_000)
    proc.copy_to_user(uaddr, desc.pack())
    vcpu = vm.create_vcpu(0)
    assert isinstance(vcpu, Vcpu)
    assert vcpu.init(uapi.KVM_ARM_TARGET_GENERIC_V8, (0,) * 7) == 0
    vcpu.regs.update(x0=GPA, x1=0, pc=GUEST_ENTRY)
    run_fd = vcpu.run_fd

    class SignalAfter:
        """Guest memory that "delivers a signal" (sets immediate_exit) on the 5th store."""

        def __init__(self, inner: GuestMemory) -> None:
            self.inner, self.stores = inner, 0

        def read(self, gpa: int, n: int) -> bytes:
            return self.inner.read(gpa, n)

        def check_tags(self, gpa: int, n: int, tag: int) -> int | None:
            return self.inner.check_tags(gpa, n, tag)

        def store(
            self, gpa: int, data: bytes, tag: int | None = None, tag_bytes: int | None = None
        ) -> None:
            self.stores += 1
            if self.stores == 5:
                os.pwrite(run_fd, b"\1", 1)
            self.inner.store(gpa, data, tag, tag_bytes)

    vcpu.guest.mem = SignalAfter(GuestMemory(vm))
    # Slices end on the signal, not on the 50 ms time limit (no timing in this test).
    guest_run = vcpu.guest.run

    def run_until_signalled(should_stop: Callable[[], bool], max_seconds: float = 0.05) -> Slice:
        return guest_run(should_stop, TIMEOUT)

    vcpu.guest.run = run_until_signalled  # type: ignore[method-assign]
    assert vcpu.run() == -errno.EINTR
    assert exit_of(os.pread(vcpu.run_fd, uapi.KVM_RUN_SIZE, 0)).reason == uapi.KVM_EXIT_INTR
    done = vcpu.regs["x3"]
    assert done > 0
    os.pwrite(vcpu.run_fd, b"\0", 1)
    proc.copy_to_user(uaddr, GuestDescriptor(GPA + PAGE, 32 * PAGE, 64, 1, 3, 200).pack())
    assert vcpu.run() == 0
    steps = heartbeat_steps(exit_of(os.pread(vcpu.run_fd, uapi.KVM_RUN_SIZE, 0)))
    assert vcpu.regs["x3"] == done + steps


# --- live dirty logging -----------------------------------------------------------------------


class Shadow:
    """A migration destination: guest RAM and tags as the VMM copied them, pass by pass."""

    def __init__(self, g: GuestVm) -> None:
        self.g = g
        self.data = bytearray(g.size)
        self.tags = bytearray(g.size // 16)

    def copy(self, first: int, npages: int) -> None:
        """Data (from the VMM's own mapping) and tags (one COPY_TAGS) of a run of pages."""
        g = self.g
        self.data[first * PAGE : (first + npages) * PAGE] = g.ram[
            first * PAGE : (first + npages) * PAGE
        ]
        buf = bytearray(npages * TPP)
        assert g.vm.mte_copy_tags(GPA + first * PAGE, npages * PAGE, buf, FROM) == npages * PAGE
        self.tags[first * TPP : (first + npages) * TPP] = buf

    def dirty_pass(
        self, manual: bool, *, everything: bool = False, skip: bool = False
    ) -> list[int]:
        """Re-protect first (GET in get-and-clear mode; GET then CLEAR, 64 pages at a time, in
        manual mode), then copy what was reported (everything, on the first pass). With `skip`,
        the first reported page is not copied (a VMM bug). Returns the pages reported."""
        g = self.g
        bitmap = bytearray(dirtylog.bitmap_bytes(g.npages))
        g.vm.get_dirty_log(0, bitmap)
        if manual:
            for chunk in range(0, g.npages, 64):
                part = bitmap[chunk // 8 : chunk // 8 + 8]
                if any(part):
                    g.vm.clear_dirty_log(0, chunk, min(64, g.npages - chunk), part)
        reported = pages_of(bitmap, g.npages)
        if everything:
            for at in range(0, g.npages, BATCH_PAGES):
                self.copy(at, min(BATCH_PAGES, g.npages - at))
            return reported
        if skip and reported:
            bitmap[reported[0] // 8] &= ~(1 << reported[0] % 8)
        for first, n in runs(bitmap, g.npages):
            self.copy(first, n)
        return reported

    def mismatches(self) -> list[int]:
        """Pages whose data or tags differ from a full dump of the guest's RAM and tags."""
        g = self.g
        data, tags = bytes(g.ram), g.tags()
        return [
            p for p in range(g.npages)
            if data[p * PAGE : (p + 1) * PAGE] != self.data[p * PAGE : (p + 1) * PAGE]
            or tags[p * TPP : (p + 1) * TPP] != self.tags[p * TPP : (p + 1) * TPP]
        ]  # fmt: skip


# A heap of 128 pages and slices of 100 steps: between two passes most pages take at most one
# store, so a store lost by the dirty log is rarely hidden by a later one to the same page.
LIVE_HEAP = {"heap_size": 128 * PAGE, "steps_per_run": 100}


@pytest.mark.parametrize(
    "manual", [0, 1, 3], ids=["get-and-clear", "manual-protect", "manual-initially-set"]
)
def test_live_dirty_log_loses_no_store(kvmtagd: str, manual: int) -> None:
    with GuestVm(kvmtagd, flags=LOG, manual=manual) as g:
        g.boot(g.descriptor(**LIVE_HEAP))
        shadow = Shadow(g)
        reported = 0
        with VcpuThreads(g) as threads:
            threads.wait_slices(threads.mark())
            first = shadow.dirty_pass(bool(manual), everything=True)
            if manual == 3:  # KVM_DIRTY_LOG_INITIALLY_SET: the first GET reports every page
                assert first == list(range(g.npages))
            for _ in range(20):
                for _ in range(2):
                    # At least one slice of guest stores on every vCPU since the last pass,
                    # and this pass races with the slices that follow.
                    threads.wait_slices(threads.mark())
                    reported += len(shadow.dirty_pass(bool(manual)))
                threads.wait_slices(threads.mark())
                with threads.paused():  # a pass with the guest quiescent: a full copy
                    shadow.dirty_pass(bool(manual))
                    assert shadow.mismatches() == []
        assert reported > 0
        shadow.dirty_pass(bool(manual))  # the final pass, the guest stopped
        assert shadow.mismatches() == []

        # Negative control: a pass that drops one reported page leaves the shadow stale (every
        # guest store changes its object), and the comparison sees exactly that page.
        missed: list[int] = []
        for _ in range(20):
            heartbeat_steps(g.run(0))
            missed = shadow.dirty_pass(bool(manual), skip=True)
            if missed:
                break
        assert missed, "one vCPU's slices stored nothing"
        assert shadow.mismatches() == [missed[0]]
        shadow.copy(missed[0], 1)
        assert shadow.mismatches() == []


# --- crashes ----------------------------------------------------------------------------------


def run_until_crash(g: GuestVm, i: int = 0, limit: int = 40) -> RunExit:
    """Run vCPU i until it exits with anything but a heartbeat (at most `limit` slices)."""
    for _ in range(limit):
        ex = g.run(i)
        if ex.reason != uapi.KVM_EXIT_MMIO or ex.mmio_addr != HEARTBEAT_GPA:
            return ex
    raise AssertionError(f"vCPU {i} ran {limit} slices without crashing")


def assert_crash(ex: RunExit) -> int:
    assert ex.reason == uapi.KVM_EXIT_SYSTEM_EVENT, ex
    assert ex.event == uapi.KVM_SYSTEM_EVENT_CRASH, ex
    assert len(ex.data) >= 1, ex
    return ex.data[0]


def warm_up(g: GuestVm, slices: int = 4) -> None:
    for _ in range(slices):
        for i in range(len(g.vcpus)):
            heartbeat_steps(g.run(i))


@pytest.mark.parametrize("kind", ["random", "zero"])
def test_crash_exit_on_corrupted_tags(kvmtagd: str, kind: str) -> None:
    with GuestVm(kvmtagd) as g:
        desc = g.boot()
        warm_up(g)
        allocated = g.allocated()
        assert allocated
        heap_first = (desc.heap_gpa - GPA) // PAGE
        n = desc.heap_size // PAGE
        bad = random.Random(5).randbytes(n * TPP) if kind == "random" else bytes(n * TPP)
        g.set_tags(heap_first, bad)  # logging is off: TO_GUEST is allowed
        address = assert_crash(run_until_crash(g, 0))
        assert desc.heap_gpa <= address < desc.heap_gpa + desc.heap_size
        assert address % 16 == 0  # a granule
        if kind == "zero":  # only allocated objects expect a non-zero tag
            assert any(obj <= address < obj + desc.obj_size for obj in allocated), hex(address)
        # The guest stays crashed, and says so again.
        assert assert_crash(g.run(0)) == address
        assert g.reg(0, "x6") == address


def test_crash_exit_on_corrupted_object(kvmtagd: str) -> None:
    with GuestVm(kvmtagd) as g:
        desc = g.boot()
        warm_up(g)
        allocated = g.allocated()
        assert allocated
        for obj in allocated:  # flip one payload byte of every allocated object
            at = obj - GPA + HEADER.size + 5
            g.ram[at] ^= 0x40
        address = assert_crash(run_until_crash(g, 1))
        assert any(obj <= address < obj + desc.obj_size for obj in allocated), hex(address)
        assert address in allocated  # the guest names the object it found broken


# --- moving a guest to a second VM ------------------------------------------------------------


@pytest.mark.parametrize("with_tags", [True, False], ids=["with-tags", "without-tags"])
def test_move_guest_to_a_second_vm_by_hand(kvmtagd: str, with_tags: bool) -> None:
    with GuestVm(kvmtagd) as a:
        desc = a.boot()
        warm_up(a, 6)
        steps_a = [a.reg(i, "x3") for i in range(2)]
        with GuestVm(kvmtagd) as b:  # the same daemon, a fresh memfd, vCPUs initialised
            b.ram[:] = a.ram[:]
            if with_tags:
                b.set_tags(0, a.tags())  # FROM_GUEST on A, TO_GUEST on B, in batches
            for src, dst in zip(a.vcpus, b.vcpus, strict=True):
                ids = src.get_reg_list()
                assert set(REG.values()) <= set(ids)
                for reg_id in ids:
                    dst.set_one_reg(reg_id, src.get_one_reg(reg_id))
            if not with_tags:
                address = assert_crash(run_until_crash(b, 0))
                assert desc.heap_gpa <= address < desc.heap_gpa + desc.heap_size
                return
            for _ in range(20):  # 20 000 steps: every vCPU re-checks and scans its objects
                for i in range(2):
                    heartbeat_steps(b.run(i))
            assert all(b.reg(i, "x3") > steps_a[i] for i in range(2))
            # A was left alone and carries on too.
            heartbeat_steps(a.run(0))


# --- memory the guest cannot use --------------------------------------------------------------


def test_tags_only_heap_is_an_internal_error_exit(kvmtagd: str) -> None:
    with GuestVm(kvmtagd, nvcpus=1) as g:
        anon = mmap.mmap(-1, 64 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            g.vm.set_user_memory_region(1, GPA2, 64 * PAGE, anon)
            g.boot(g.descriptor(heap_gpa=GPA2, heap_size=64 * PAGE))
            ex = g.run(0)
            assert ex.reason == uapi.KVM_EXIT_INTERNAL_ERROR == 17, ex
            assert ex.event == uapi.KVM_INTERNAL_ERROR_EMULATION, ex
            assert GPA2 <= ex.data[0] < GPA2 + 64 * PAGE
            # Tag copies work on it as anywhere, and the daemon keeps serving.
            buf = bytes(range(16)) * 16
            assert g.vm.mte_copy_tags(GPA2, PAGE, buf, TO) == PAGE
            assert g.run(0).reason == uapi.KVM_EXIT_INTERNAL_ERROR
            with Kvm(socket=kvmtagd) as kvm2:
                assert kvm2.get_api_version() == uapi.KVM_API_VERSION
        finally:
            g.vm.set_user_memory_region(1, GPA2, 0, 0)
            anon.close()


def test_heap_outside_ram_or_read_only_is_an_mmio_exit(kvmtagd: str) -> None:
    """No memslot behind the heap: an MMIO exit at the address the guest loads from. A
    read-only slot: the loads work, the first store is an MMIO exit (arm64's behaviour)."""
    with GuestVm(kvmtagd, nvcpus=1) as g:
        g.boot(g.descriptor(heap_gpa=GPA2, heap_size=16 * PAGE))
        ex = g.run(0)
        assert ex.reason == uapi.KVM_EXIT_MMIO and GPA2 <= ex.mmio_addr < GPA2 + 16 * PAGE, ex
        assert not mmio_is_write(g.run_areas[0])
        ro = os.memfd_create("guest-rom", os.MFD_CLOEXEC)
        try:
            os.ftruncate(ro, 16 * PAGE)
            with mmap.mmap(ro, 16 * PAGE) as rom:
                g.vm.set_user_memory_region(1, GPA2, 16 * PAGE, rom, uapi.KVM_MEM_READONLY)
                ex = g.run(0)
                assert ex.reason == uapi.KVM_EXIT_MMIO, ex
                assert GPA2 <= ex.mmio_addr < GPA2 + 16 * PAGE, ex
                assert mmio_is_write(g.run_areas[0])
                g.vm.set_user_memory_region(1, GPA2, 0, 0)
        finally:
            os.close(ro)


def mmio_is_write(area: mmap.mmap) -> bool:
    return bool(LAYOUT["kvm_run_mmio"].unpack_from(area, uapi.KVM_RUN_EXIT_OFFSET)[3])


def test_truncated_memfd_is_efault_and_the_daemon_survives(kvmtagd: str) -> None:
    with GuestVm(kvmtagd) as g:
        g.boot()
        warm_up(g, 2)
        os.ftruncate(g.memfd, 0)  # the VMM pulls the guest's RAM away (and never touches it)
        for i in range(2):
            assert errno_of(g.vcpus[i].run) == errno.EFAULT
        assert errno_of(lambda: g.vcpus[0].run()) == errno.EFAULT  # still, and still serving
        assert os.fstat(g.memfd).st_size == 0  # kvmtagd never grows the VMM's file back
        with Kvm(socket=kvmtagd) as kvm2, kvm2.create_vm() as vm2:
            vm2.enable_cap(uapi.KVM_CAP_ARM_MTE)
            assert vm2.preferred_target()[0] == uapi.KVM_ARM_TARGET_GENERIC_V8


def test_truncation_racing_with_running_vcpus_never_regrows_the_memfd(kvmtagd: str) -> None:
    """Truncating while both vCPUs are inside KVM_RUN: the slice in flight may finish or fail,
    but afterwards the file stays empty and every KVM_RUN is EFAULT."""
    for trial in range(12):
        with GuestVm(kvmtagd) as g:
            g.boot(g.descriptor(seed=trial))
            results = truncate_while_running(g, random.Random(trial).uniform(0.0, 0.03))
            assert [r[-1:] for r in results] == [[errno.EFAULT]] * 2, (trial, results)
            for i in range(2):
                assert errno_of(g.vcpus[i].run) == errno.EFAULT, trial
            assert os.fstat(g.memfd).st_size == 0, trial


def truncate_while_running(g: GuestVm, delay: float) -> list[list[int]]:
    """Run every vCPU on a thread until KVM_RUN fails or exits with anything but a heartbeat,
    truncate the memfd after `delay` seconds; each vCPU's results (0: a heartbeat, an errno,
    or minus an unexpected exit reason)."""
    started = threading.Barrier(len(g.vcpus) + 1, timeout=TIMEOUT)
    results: list[list[int]] = [[] for _ in g.vcpus]

    def loop(i: int) -> None:
        try:
            started.wait()
        except threading.BrokenBarrierError:
            return
        for _ in range(400):
            try:
                ex = g.run(i)
            except OSError as e:
                results[i].append(e.errno or 0)
                return
            if ex.reason != uapi.KVM_EXIT_MMIO or ex.mmio_addr != HEARTBEAT_GPA:
                results[i].append(-ex.reason)  # e.g. a crash: RAM that reads as zeros
                return
            results[i].append(0)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(results))]
    try:
        for t in threads:
            t.start()
        started.wait()
        time.sleep(delay)
        os.ftruncate(g.memfd, 0)
    finally:
        started.abort()
        for t in threads:
            t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    return results


def _huge_pages() -> tuple[int, int, int]:
    """(nr_hugepages, HugePages_Free, Hugepagesize in bytes)."""
    reserved = int(Path("/proc/sys/vm/nr_hugepages").read_text())
    info = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    free = int(info.get("HugePages_Free", "0").split()[0])
    size = int(info.get("Hugepagesize", "2048 kB").split()[0]) * 1024
    return reserved, free, size


def test_guest_ram_on_hugetlbfs(kvmtagd: str) -> None:
    reserved, free, size = _huge_pages()
    if not reserved or not free:
        pytest.skip(HUGE_SKIP)
    try:
        g = GuestVm(kvmtagd, ram_pages=size // PAGE, hugetlb=True)
    except OSError as e:
        if e.errno in (errno.ENOMEM, errno.ENOSPC):  # taken by someone else meanwhile
            pytest.skip(HUGE_SKIP)
        raise
    with g:
        desc = g.boot()
        with VcpuThreads(g) as threads:
            threads.wait_slices(threads.mark(), 4)
        assert [g.reg(i, "x3") for i in range(2)] == threads.steps
        allocated = g.allocated()  # the guest's stores reached the huge page
        assert len(allocated) == g.reg(0, "x4") + g.reg(1, "x4") > 0
        tags = g.tags(0, g.npages)
        for obj in allocated:
            assert tags[(obj - GPA) // 16] != 0
        # A VMM-side corruption is seen through the huge page too.
        for obj in allocated:
            g.ram[obj - GPA + HEADER.size] ^= 1
        address = assert_crash(run_until_crash(g, 0))
        assert desc.heap_gpa <= address < desc.heap_gpa + desc.heap_size


# --- vCPU ioctls and their errors -------------------------------------------------------------


def test_vcpu_ioctl_errors(kvmtagd: str) -> None:
    with Kvm(socket=kvmtagd) as kvm, kvm.create_vm() as vm:
        vm.enable_cap(uapi.KVM_CAP_ARM_MTE)
        assert vm.preferred_target() == (uapi.KVM_ARM_TARGET_GENERIC_V8, (0,) * 7)
        with vm.create_vcpu(0) as vcpu:
            run = vcpu.mmap_run(kvm.get_vcpu_mmap_size())
            try:
                # Before KVM_ARM_VCPU_INIT.
                assert errno_of(vcpu.run) == errno.ENOEXEC
                assert errno_of(lambda: vcpu.get_one_reg(REG["pc"])) == errno.ENOEXEC
                assert errno_of(lambda: vcpu.set_one_reg(REG["pc"], 0)) == errno.ENOEXEC
                assert errno_of(vcpu.get_reg_list) == errno.ENOEXEC
                # MTE cannot be enabled once a vCPU exists.
                assert errno_of(lambda: vm.enable_cap(uapi.KVM_CAP_ARM_MTE)) == errno.EINVAL
                # KVM_ARM_VCPU_INIT.
                assert errno_of(lambda: vcpu.init(target=4)) == errno.EINVAL
                assert errno_of(lambda: vcpu.init(features=1 << 8)) == errno.EINVAL
                raw = LAYOUT["kvm_vcpu_init"].pack(5, 0, 1, 0, 0, 0, 0, 0)  # features[1]
                assert errno_of(lambda: client.ioctl(vcpu.fd, uapi.KVM_ARM_VCPU_INIT, raw)) == (
                    errno.EINVAL
                )
                el1_32 = 1 << uapi.KVM_ARM_VCPU_EL1_32BIT
                assert errno_of(lambda: vcpu.init(features=el1_32)) == errno.EINVAL
                assert errno_of(vcpu.run) == errno.ENOEXEC  # none of those initialised it
                vcpu.init()
                # KVM_RUN's argument must be 0; immediate_exit is EINTR.
                assert errno_of(lambda: client.ioctl(vcpu.fd, uapi.KVM_RUN, 1)) == errno.EINVAL
                run[1] = 1
                assert errno_of(vcpu.run) == errno.EINTR
                run[1] = 0
                # ONE_REG.
                vcpu.set_one_reg(REG["x7"], 0x1234)
                assert vcpu.get_one_reg(REG["x7"]) == 0x1234
                unknown = uapi.core_reg(200)
                assert errno_of(lambda: vcpu.get_one_reg(unknown)) == errno.ENOENT
                assert errno_of(lambda: vcpu.set_one_reg(unknown, 1)) == errno.ENOENT
                for request in (uapi.KVM_GET_ONE_REG, uapi.KVM_SET_ONE_REG):
                    arg = LAYOUT["kvm_one_reg"].pack(REG["pc"], BAD_ADDR)
                    call = functools.partial(client.ioctl, vcpu.fd, request)
                    assert errno_of(functools.partial(call, arg)) == errno.EFAULT
                    assert errno_of(functools.partial(call, BAD_ADDR)) == errno.EFAULT
                # GET_REG_LIST: n too small is E2BIG, with n updated.
                head = bytearray(8)
                assert errno_of(lambda: client.ioctl(vcpu.fd, uapi.KVM_GET_REG_LIST, head)) == (
                    errno.E2BIG
                )
                assert int.from_bytes(head, "little") == len(REG)
                assert vcpu.get_reg_list() == list(REG.values())
            finally:
                run.close()
    # AArch32 EL1 is fine without MTE.
    with Kvm(socket=kvmtagd) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.init(features=1 << uapi.KVM_ARM_VCPU_EL1_32BIT)
        assert vcpu.get_one_reg(REG["pstate"]) != 0


def test_vcpu_fd_in_a_forked_child_answers_eio(kvmtagd: str) -> None:
    with Kvm(socket=kvmtagd) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.init()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report errnos, never return into pytest
            try:
                os.close(r)
                codes = []
                calls = [vcpu.run, lambda: vcpu.get_one_reg(REG["pc"]), vcpu.get_reg_list,
                         vcpu.init, vm.preferred_target]  # fmt: skip
                for call in calls:
                    try:
                        call()
                        codes.append(0)
                    except OSError as e:
                        codes.append(e.errno or -1)
                os.write(w, json.dumps(codes).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], TIMEOUT)
            assert ready, "the child hung"
            codes = json.loads(os.read(r, 4096))
        finally:
            os.close(r)
            deadline = time.monotonic() + TIMEOUT
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        assert codes == [errno.EIO] * 5
        assert vcpu.get_one_reg(REG["pc"]) == 0  # the parent's stream was not disturbed


def test_vcpu_of_another_process_is_eio_in_the_model() -> None:
    proc = SimulatedProcess()
    vm = Host().open().create_vm(proc, 0)
    assert not isinstance(vm, int)
    vcpu = vm.create_vcpu(0)
    assert not isinstance(vcpu, int)
    assert vcpu.ioctl(SimulatedProcess(), uapi.KVM_RUN) == -errno.EIO
    assert vcpu.ioctl(proc, uapi.KVM_RUN) == -errno.ENOEXEC


# --- the VMM example of issue 5 ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy-tags", "tag-log"])
def test_guest_example_runs(kvmtagd: str, mode: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "guest_example.py"), "--socket", kvmtagd,
         "--ram-mib", "16", "--seconds", "0.4", "--mode", mode],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    number = r"[0-9][0-9,.]*"
    expected = [
        r"^booted the guest: 2 vCPUs, 16 MiB of memfd RAM",
        rf"^guest store rate: {number} steps/s on 2 vCPUs",
        rf"^dirty-log pass over 16 MiB \({mode}\): {number} ms",
        rf"^first pass over 16 MiB \(every page's tags, {mode}\): {number} ms",
        r"^shadow tags equal the guest's after the final pass: True$",
        r"^stale tags .*: crash exit KVM_SYSTEM_EVENT_CRASH at 0x[0-9a-f]+",
        rf"^tag log overhead on the store rate: [+-]?{number}% \({number} steps/s without "
        rf"KVMTAG_CAP_TAG_LOG, {number} with\)",
    ]
    for pattern in expected:
        assert re.search(pattern, text, re.MULTILINE), (pattern, text)
