"""Dirty logging: the bits KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG show and leave behind."""

from __future__ import annotations

import errno

import pytest

from kvmtag import Host, SimulatedProcess, Vm, dirtylog
from kvmtag.uapi import (
    KVM_ARM_TAGS_TO_GUEST,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CLEAR_DIRTY_LOG,
    KVM_GET_DIRTY_LOG,
    KVM_MEM_LOG_DIRTY_PAGES,
    LAYOUT,
)

PAGE = 4096
GPA = 0x4000_0000
LOG = KVM_MEM_LOG_DIRTY_PAGES


class Setup:
    def __init__(self, manual: int = 0, pages: int = 100) -> None:
        self.proc = SimulatedProcess()
        vm = Host().open().ioctl(self.proc, 0xAE01, 0)
        assert isinstance(vm, Vm)
        self.vm = vm
        self.pages = pages
        if manual:
            assert vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, manual) == 0
        self.uaddr = self.proc.mmap(pages * PAGE)

    def region(self, flags: int = LOG, gpa: int = GPA) -> int:
        return self.vm.set_user_memory_region(
            self.proc, 0, flags, gpa, self.pages * PAGE, self.uaddr
        )

    def get(self) -> bytes:
        size = dirtylog.bitmap_bytes(self.pages)
        addr = self.proc.alloc(size)
        arg = self.proc.alloc(LAYOUT["kvm_dirty_log"].pack(0, 0, addr))
        assert self.vm.ioctl(self.proc, KVM_GET_DIRTY_LOG, arg) == 0
        return self.proc.read(addr, size)

    def clear(self, first: int, num: int, mask: bytes) -> int:
        addr = self.proc.alloc(mask)
        arg = self.proc.alloc(LAYOUT["kvm_clear_dirty_log"].pack(0, num, first, addr))
        result = self.vm.ioctl(self.proc, KVM_CLEAR_DIRTY_LOG, arg)
        assert isinstance(result, int)
        return result


def bits(*pages: int, size: int = 16) -> bytes:
    out = bytearray(size)
    for p in pages:
        out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def test_bitmap_size_is_whole_words() -> None:
    assert [dirtylog.bitmap_bytes(n) for n in (1, 64, 65, 100, 128)] == [8, 8, 16, 16, 16]


def test_initially_set_sets_every_page_and_no_tail_bit() -> None:
    s = Setup(manual=3)
    assert s.region() == 0
    got = s.get()
    assert got == bytes([0xFF] * 12 + [0x0F] + [0] * 3)  # 100 bits, then zero to the word end


@pytest.mark.parametrize("manual", [0, 1])
def test_without_initially_set_the_bitmap_starts_empty(manual: int) -> None:
    s = Setup(manual=manual)
    assert s.region() == 0
    assert s.get() == bytes(16)


def test_get_and_clear_mode_clears_on_read() -> None:
    s = Setup()
    s.region()
    s.vm.mark_page_dirty(GPA // PAGE + 3)
    s.vm.mark_page_dirty(GPA // PAGE + 99)
    assert s.get() == bits(3, 99)
    assert s.get() == bytes(16)


def test_manual_mode_keeps_bits_until_cleared() -> None:
    s = Setup(manual=1)
    s.region()
    for page in (1, 2, 70):
        s.vm.mark_page_dirty(GPA // PAGE + page)
    assert s.get() == bits(1, 2, 70)
    assert s.get() == bits(1, 2, 70)
    # Clears only pages set both in the mask and in the slot's bitmap.
    assert s.clear(0, 64, bits(2, 5, size=8)) == 0
    assert s.get() == bits(1, 70)
    assert s.clear(64, 36, bits(6, size=8)) == 0  # page 70, the range ending at the slot's end
    assert s.get() == bits(1)


def test_get_fault_in_get_and_clear_mode_loses_the_bits() -> None:
    s = Setup()
    s.region()
    s.vm.mark_page_dirty(GPA // PAGE)
    arg = s.proc.alloc(LAYOUT["kvm_dirty_log"].pack(0, 0, s.proc.hole()))
    assert s.vm.ioctl(s.proc, KVM_GET_DIRTY_LOG, arg) == -errno.EFAULT
    assert s.get() == bytes(16)


def test_get_fault_in_manual_mode_keeps_the_bits() -> None:
    s = Setup(manual=1)
    s.region()
    s.vm.mark_page_dirty(GPA // PAGE)
    arg = s.proc.alloc(LAYOUT["kvm_dirty_log"].pack(0, 0, s.proc.hole()))
    assert s.vm.ioctl(s.proc, KVM_GET_DIRTY_LOG, arg) == -errno.EFAULT
    assert s.get() == bits(0)


def test_stores_outside_logging_slots_mark_nothing() -> None:
    s = Setup()
    s.region(flags=0)
    s.vm.mark_page_dirty(GPA // PAGE)  # the slot does not log
    s.vm.mark_page_dirty(0x10)  # no slot at all
    assert s.region(flags=LOG) == 0
    assert s.get() == bytes(16)


def test_move_keeps_the_bitmap_and_toggling_starts_afresh() -> None:
    s = Setup(manual=1)
    s.region()
    s.vm.mark_page_dirty(GPA // PAGE + 5)
    assert s.region(gpa=2 * GPA) == 0  # a move that keeps logging keeps the bits
    assert s.get() == bits(5)
    assert s.region(flags=0, gpa=2 * GPA) == 0
    assert s.region(gpa=2 * GPA) == 0
    assert s.get() == bytes(16)


def test_copy_tags_does_not_dirty() -> None:
    s = Setup()
    assert s.vm.enable_cap(205, 0, 0) == 0
    s.region(flags=0)
    addr = s.proc.alloc(bytes(range(16)) * 16)
    assert s.vm.mte_copy_tags(s.proc, GPA, PAGE, addr, KVM_ARM_TAGS_TO_GUEST) == PAGE
    assert s.region() == 0
    assert s.get() == bytes(16)
