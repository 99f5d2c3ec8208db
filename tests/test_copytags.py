"""KVM_ARM_MTE_COPY_TAGS beyond its result: what ends up in memory and in the caller's buffer."""

from __future__ import annotations

import errno

import pytest

from kvmtag import PROFILES, Host, HostConfig, SimulatedFile, SimulatedProcess, Vm
from kvmtag.uapi import KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST, KVM_MEM_LOG_DIRTY_PAGES

PAGE = 4096
TPP = PAGE // 16
GPA = 0x4000_0000


def new_vm(host: Host, proc: SimulatedProcess) -> Vm:
    vm = host.open().ioctl(proc, 0xAE01, 0)
    assert isinstance(vm, Vm)
    assert vm.enable_cap(205, 0, 0) == 0
    return vm


def add_slot(
    vm: Vm,
    proc: SimulatedProcess,
    uaddr: int,
    pages: int,
    slot: int = 0,
    gpa: int = GPA,
    flags: int = 0,
) -> None:
    assert vm.set_user_memory_region(proc, slot, flags, gpa, pages * PAGE, uaddr) == 0


def put(vm: Vm, proc: SimulatedProcess, gpa: int, tags: bytes) -> int:
    return vm.mte_copy_tags(proc, gpa, len(tags) * 16, proc.alloc(tags), KVM_ARM_TAGS_TO_GUEST)


def get(vm: Vm, proc: SimulatedProcess, gpa: int, pages: int) -> bytes:
    addr = proc.alloc(pages * TPP)
    assert vm.mte_copy_tags(proc, gpa, pages * PAGE, addr, KVM_ARM_TAGS_FROM_GUEST) == pages * PAGE
    return proc.read(addr, pages * TPP)


def pattern(pages: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 16 for i in range(pages * TPP))


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def proc() -> SimulatedProcess:
    return SimulatedProcess()


def test_round_trip_and_high_nibble(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(8 * PAGE), 8)
    tags = bytes((0xF0 | i % 16) if i % 3 else i % 16 for i in range(4 * TPP))
    assert put(vm, proc, GPA + PAGE, tags) == 4 * PAGE
    got = get(vm, proc, GPA, 8)
    assert got[:TPP] == bytes(TPP)  # never tagged: zeros
    assert got[TPP : 5 * TPP] == bytes(b & 0xF for b in tags)  # high nibble ignored, read as 0
    assert got[5 * TPP :] == bytes(3 * TPP)


def test_fault_inside_a_page_clears_it(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(4 * PAGE), 4)
    assert put(vm, proc, GPA, pattern(4, seed=3)) == 4 * PAGE
    # New tags for 4 pages, but the buffer ends half-way through the third page.
    new = pattern(4, seed=9)
    addr = proc.mmap(PAGE)
    proc.hole()
    start = addr + PAGE - (2 * TPP + TPP // 2)
    proc.copy_to_user(start, new[: 2 * TPP + TPP // 2])
    assert vm.mte_copy_tags(proc, GPA, 4 * PAGE, start, KVM_ARM_TAGS_TO_GUEST) == 2 * PAGE
    got = get(vm, proc, GPA, 4)
    assert got[: 2 * TPP] == new[: 2 * TPP]
    assert got[2 * TPP : 3 * TPP] == bytes(TPP)  # the faulting page: cleared, never half-written
    assert got[3 * TPP :] == pattern(4, seed=3)[3 * TPP :]  # untouched after the fault


def test_fault_before_6_2_leaves_what_was_written(proc: SimulatedProcess) -> None:
    host = Host(HostConfig(profile=PROFILES["5.14"]))
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(4 * PAGE), 4)
    old = pattern(4, seed=3)
    assert put(vm, proc, GPA, old) == 4 * PAGE
    new = pattern(4, seed=9)
    half = TPP // 2
    start = proc.mmap(PAGE) + PAGE - half
    proc.hole()
    proc.copy_to_user(start, new[:half])
    assert vm.mte_copy_tags(proc, GPA, PAGE, start, KVM_ARM_TAGS_TO_GUEST) == -errno.EFAULT
    got = get(vm, proc, GPA, 1)
    assert got == new[:half] + old[half:TPP]  # the page was tagged: it shows the mix


def test_fault_before_6_2_on_untagged_page_reads_zero(proc: SimulatedProcess) -> None:
    host = Host(HostConfig(profile=PROFILES["5.14"]))
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(PAGE), 1)
    start = proc.mmap(PAGE) + PAGE - 10
    proc.hole()
    proc.copy_to_user(start, b"\x05" * 10)
    assert vm.mte_copy_tags(proc, GPA, PAGE, start, KVM_ARM_TAGS_TO_GUEST) == -errno.EFAULT
    assert get(vm, proc, GPA, 1) == bytes(TPP)


def test_from_guest_partial_copy_leaves_written_bytes(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(2 * PAGE), 2)
    tags = pattern(2, seed=5)
    put(vm, proc, GPA, tags)
    start = proc.mmap(PAGE) + PAGE - (TPP + 10)
    proc.hole()
    assert vm.mte_copy_tags(proc, GPA, 2 * PAGE, start, KVM_ARM_TAGS_FROM_GUEST) == PAGE
    assert proc.read(start, TPP + 10) == tags[: TPP + 10]


def test_aliased_slots_share_tags(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    memfd = SimulatedFile(8 * PAGE)
    a = proc.mmap(8 * PAGE, file=memfd, shared=True)
    b = proc.mmap(4 * PAGE, file=memfd, offset=4 * PAGE, shared=True)
    add_slot(vm, proc, a, 8, slot=0, gpa=GPA)
    add_slot(vm, proc, b, 4, slot=1, gpa=2 * GPA)
    put(vm, proc, 2 * GPA, pattern(4))  # through slot 1 = file pages 4..7
    assert get(vm, proc, GPA + 4 * PAGE, 4) == pattern(4)  # seen through slot 0


def test_deleted_and_readded_slot_keeps_tags(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    uaddr = proc.mmap(4 * PAGE)  # private anonymous: tags belong to the process and address
    add_slot(vm, proc, uaddr, 4)
    put(vm, proc, GPA, pattern(4))
    assert vm.set_user_memory_region(proc, 0, 0, GPA, 0, 0) == 0
    assert vm.mte_copy_tags(proc, GPA, PAGE, proc.alloc(TPP), 1) == -errno.EFAULT
    add_slot(vm, proc, uaddr, 4, slot=3, gpa=3 * GPA)
    assert get(vm, proc, 3 * GPA, 4) == pattern(4)


def test_two_vms_share_one_memfd(host: Host) -> None:
    memfd = SimulatedFile(4 * PAGE)
    first, second = SimulatedProcess(), SimulatedProcess()
    vm1, vm2 = new_vm(host, first), new_vm(host, second)
    add_slot(vm1, first, first.mmap(4 * PAGE, file=memfd, shared=True), 4)
    add_slot(vm2, second, second.mmap(4 * PAGE, file=memfd, shared=True), 4, gpa=2 * GPA)
    put(vm1, first, GPA, pattern(4, seed=11))
    assert get(vm2, second, 2 * GPA, 4) == pattern(4, seed=11)


def test_private_memory_is_per_process(host: Host) -> None:
    first, second = SimulatedProcess(), SimulatedProcess()
    vm1, vm2 = new_vm(host, first), new_vm(host, second)
    addr = 0x7000_0000_0000
    add_slot(vm1, first, first.mmap(PAGE, addr=addr), 1)
    add_slot(vm2, second, second.mmap(PAGE, addr=addr), 1)  # same address, other process
    put(vm1, first, GPA, pattern(1))
    assert get(vm2, second, GPA, 1) == bytes(TPP)


def test_private_mapping_of_a_memfd_is_not_the_file(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    memfd = SimulatedFile(PAGE)
    add_slot(vm, proc, proc.mmap(PAGE, file=memfd, shared=True), 1)
    add_slot(vm, proc, proc.mmap(PAGE, file=memfd, shared=False), 1, slot=1, gpa=2 * GPA)
    put(vm, proc, GPA, pattern(1))
    assert get(vm, proc, 2 * GPA, 1) == bytes(TPP)


def test_tags_are_released_with_the_last_process(host: Host) -> None:
    memfd = SimulatedFile(PAGE)
    first, second = SimulatedProcess(), SimulatedProcess()
    vm1, vm2 = new_vm(host, first), new_vm(host, second)
    add_slot(vm1, first, first.mmap(PAGE, file=memfd, shared=True), 1)
    add_slot(vm2, second, second.mmap(PAGE, file=memfd, shared=True), 1)
    put(vm1, first, GPA, pattern(1))
    host.release_process(first.process)
    assert get(vm2, second, GPA, 1) == pattern(1)  # the second process still holds the memfd
    host.release_process(second.process)
    assert len(host.tags) == 0


def test_from_another_process_is_eio(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    other = SimulatedProcess()
    assert vm.ioctl(other, 0x8030AEB4, other.alloc(48)) == -errno.EIO


def test_copy_leaves_the_dirty_log_alone(host: Host, proc: SimulatedProcess) -> None:
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(4 * PAGE), 4)
    put(vm, proc, GPA, pattern(4))
    assert (
        vm.set_user_memory_region(
            proc, 0, KVM_MEM_LOG_DIRTY_PAGES, GPA, 4 * PAGE, vm.memslots.get(0).userspace_addr
        )
        == 0
    )
    get(vm, proc, GPA, 4)
    assert not any(vm.memslots.get(0).dirty_bitmap)


def test_large_copy_spans_windows(host: Host, proc: SimulatedProcess) -> None:
    """64 MiB of guest RAM: several copy windows and tag-store chunks."""
    pages = 16384
    vm = new_vm(host, proc)
    add_slot(vm, proc, proc.mmap(pages * PAGE), pages)
    tags = bytes(range(16)) * (pages * TPP // 16)
    assert put(vm, proc, GPA, tags) == pages * PAGE
    assert get(vm, proc, GPA, pages) == tags
