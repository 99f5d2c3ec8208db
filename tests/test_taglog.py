"""The tag log (kvmtag's extension, issue 5): KVMTAG_CAP_TAG_LOG and KVMTAG_GET_TAG_LOG.

Invariant under test everywhere: every page the tag log reports valid has saved (packed) tags
equal to its current tags. Errors and the invariant under a running two-vCPU guest go through a
real kvmtagd; the exact semantics (which pages become valid, and when they stop being valid)
are checked in process, deterministically and with a Hypothesis state machine.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmtag import Host, SimulatedFile, SimulatedProcess, Vm, client, dirtylog, tagkernel, uapi
from kvmtag.guest import GUEST_ENTRY, GuestDescriptor
from kvmtag.guestmem import GuestMemory
from kvmtag.kvm import Kvm, address_of, exit_of
from kvmtag.uapi import LAYOUT

from .test_guest import (
    BAD_ADDR,
    GPA,
    LIVE_HEAP,
    LOG,
    PAGE,
    TPP,
    GuestVm,
    VcpuThreads,
    errno_of,
    heartbeat_steps,
    pages_of,
)

PPP = PAGE // 32  # packed tag bytes per page
TAG_LOG_MAX_PAGES = (4 << 20) // PPP  # one call returns at most 4 MiB of packed tags
FROM, TO = uapi.KVM_ARM_TAGS_FROM_GUEST, uapi.KVM_ARM_TAGS_TO_GUEST


def tag_log_struct(slot: int, first: int, num: int, tags: int, valid: int, flags: int = 0) -> bytes:
    return LAYOUT["kvmtag_tag_log"].pack(slot, flags, first, num, tags, valid)


def valid_pages(valid: bytes, npages: int) -> list[int]:
    return pages_of(valid, npages)


def stale_pages(
    saved: bytes, valid: bytes, current_packed: bytes | bytearray, npages: int
) -> list[int]:
    """Pages reported valid whose saved tags differ from the current ones (must be none)."""
    return [
        p for p in valid_pages(valid, npages)
        if saved[p * PPP : (p + 1) * PPP] != current_packed[p * PPP : (p + 1) * PPP]
    ]  # fmt: skip


# --- through kvmtagd: the capability and the ioctl's errors ----------------------------------


def test_capability_and_handshake(kvmtagd: str) -> None:
    with Kvm(socket=kvmtagd) as kvm, kvm.create_vm() as vm:
        assert kvm.check_extension(uapi.KVMTAG_CAP_TAG_LOG) == 1
        assert vm.check_extension(uapi.KVMTAG_CAP_TAG_LOG) == 1
        assert client.info(kvm.fd).extensions & uapi.KVMTAG_EXT_TAG_LOG
        assert errno_of(lambda: vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG, flags=1)) == errno.EINVAL
        vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)
        vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)  # twice is fine


def test_get_tag_log_errors(kvmtagd: str) -> None:
    with GuestVm(kvmtagd, nvcpus=0, flags=LOG) as g:  # 256 pages, logging; tag log not enabled
        tags, valid = bytearray(256 * PPP), bytearray(32)
        taddr, vaddr = address_of(tags), address_of(valid)

        def get(slot: int = 0, first: int = 0, num: int = 256, t: int = taddr, v: int = vaddr,
                flags: int = 0) -> int:  # fmt: skip
            arg = tag_log_struct(slot, first, num, t, v, flags)
            return errno_of(lambda: client.ioctl(g.vm.fd, uapi.KVMTAG_GET_TAG_LOG, arg))

        assert get() == errno.EINVAL  # not enabled
        g.vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)  # logging already: nothing valid until cleaned
        saved, bits = g.vm.get_tag_log(0, 0, 256, PPP)
        assert not any(bits) and len(saved) == 256 * PPP and len(bits) == 32
        assert get(flags=1) == errno.EINVAL
        assert get(first=32, num=64) == errno.EINVAL  # first_page % 64
        assert get(slot=1 << 16) == errno.EINVAL  # address space 1
        assert get(slot=32767) == errno.EINVAL  # beyond the slot ids
        assert get(slot=5) == errno.ENOENT  # no such slot
        assert get(first=0, num=257) == errno.EINVAL  # past the slot's end
        assert get(first=320, num=0) == errno.EINVAL  # starts past the end
        assert get(num=TAG_LOG_MAX_PAGES + 1) == errno.E2BIG
        assert get(t=BAD_ADDR) == errno.EFAULT
        assert get(v=BAD_ADDR) == errno.EFAULT
        assert errno_of(lambda: client.ioctl(g.vm.fd, uapi.KVMTAG_GET_TAG_LOG, BAD_ADDR)) == (
            errno.EFAULT
        )
        # A slot that does not log has no tag log.
        g.vm.set_user_memory_region(0, GPA, g.size, g.ram, 0)
        assert get() == errno.ENOENT
        # Logging switched on again (no INITIALLY_SET): every page is clean and saved.
        g.vm.set_user_memory_region(0, GPA, g.size, g.ram, LOG)
        saved, bits = g.vm.get_tag_log(0, 64, 192, PPP)
        assert valid_pages(bits, 192) == list(range(192))
        assert saved == tagkernel.packed(g.tags(64, 192))


# --- through kvmtagd: the invariant under a running two-vCPU guest ----------------------------


@pytest.mark.parametrize("manual", [0, 1], ids=["get-and-clear", "manual-protect"])
def test_invariant_under_a_running_guest(kvmtagd: str, manual: int) -> None:
    with GuestVm(kvmtagd, flags=LOG, manual=manual, tag_log=True) as g:
        g.boot(g.descriptor(**LIVE_HEAP))  # small slices: few stores per page between checks
        n = g.npages

        def clean_pass() -> None:
            """Re-protect what the dirty log reports (tags are saved then)."""
            bitmap = bytearray(dirtylog.bitmap_bytes(n))
            g.vm.get_dirty_log(0, bitmap)
            if manual and any(bitmap):
                g.vm.clear_dirty_log(0, 0, n, bitmap)

        saw_invalid = checked = 0
        with VcpuThreads(g) as threads:
            for _ in range(24):
                threads.wait_slices(threads.mark())
                clean_pass()  # while both vCPUs store
                threads.wait_slices(threads.mark())  # more stores, to pages just cleaned too
                with threads.paused():
                    saved, valid = g.vm.get_tag_log(0, 0, n, PPP)
                    current = tagkernel.packed(g.tags())
                    assert stale_pages(saved, valid, current, n) == []
                    nvalid = len(valid_pages(valid, n))
                    checked += nvalid
                    saw_invalid += n - nvalid
                    # At a quiescent point one pass leaves every page valid, and current.
                    clean_pass()
                    saved, valid = g.vm.get_tag_log(0, 0, n, PPP)
                    assert valid_pages(valid, n) == list(range(n))
                    assert saved == current
        assert checked > 0 and saw_invalid > 0  # both kinds of page were seen


# --- in process: exact semantics --------------------------------------------------------------


class ModelVm:
    """An MTE VM of the kernel model with one memfd-backed slot of `npages` at GPA."""

    def __init__(
        self, npages: int = 100, *, manual: int = 0, tag_log: bool = True, log: bool = True
    ) -> None:
        self.proc = SimulatedProcess()
        self.npages = npages
        self.file = SimulatedFile(npages * PAGE)
        self.uaddr = self.proc.mmap(npages * PAGE, file=self.file, shared=True)
        vm = Host().open().create_vm(self.proc, 0)
        assert isinstance(vm, Vm)
        self.vm = vm
        assert vm.enable_cap(uapi.KVM_CAP_ARM_MTE, 0, 0) == 0
        if manual:
            assert vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, manual) == 0
        if tag_log:
            assert vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG, 0, 0) == 0
        self.mem = GuestMemory(vm)
        self.logging = False
        self.set_logging(log)

    def set_logging(self, on: bool) -> None:
        size = self.npages * PAGE
        flags = LOG if on else 0
        assert self.vm.set_user_memory_region(self.proc, 0, flags, GPA, size, self.uaddr) == 0
        self.logging = on

    def _ioctl(self, request: int, arg: bytes) -> int:
        result = self.vm.ioctl(self.proc, request, self.proc.alloc(arg))
        assert isinstance(result, int)
        return result

    def get_dirty_log(self) -> bytes:
        size = dirtylog.bitmap_bytes(self.npages)
        addr = self.proc.alloc(size)
        assert self._ioctl(uapi.KVM_GET_DIRTY_LOG, LAYOUT["kvm_dirty_log"].pack(0, 0, addr)) == 0
        return self.proc.read(addr, size)

    def clear_dirty_log(self, first: int, num: int, mask: bytes) -> None:
        addr = self.proc.alloc(mask)
        arg = LAYOUT["kvm_clear_dirty_log"].pack(0, num, first, addr)
        assert self._ioctl(uapi.KVM_CLEAR_DIRTY_LOG, arg) == 0

    def tag_log(self) -> tuple[bytes, bytes]:
        """KVMTAG_GET_TAG_LOG of the whole slot; raises OSError on an error."""
        n = self.npages
        taddr, vaddr = self.proc.alloc(n * PPP), self.proc.alloc(dirtylog.bitmap_bytes(n))
        result = self._ioctl(uapi.KVMTAG_GET_TAG_LOG, tag_log_struct(0, 0, n, taddr, vaddr))
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return self.proc.read(taddr, n * PPP), self.proc.read(vaddr, dirtylog.bitmap_bytes(n))

    def tags(self) -> bytes:
        """Current tags of the slot, one per byte."""
        n = self.npages
        addr = self.proc.alloc(n * TPP)
        assert self.vm.mte_copy_tags(self.proc, GPA, n * PAGE, addr, FROM) == n * PAGE
        return self.proc.read(addr, n * TPP)

    def set_tags(self, tags: bytes) -> int:
        addr = self.proc.alloc(tags)
        return self.vm.mte_copy_tags(self.proc, GPA, len(tags) // TPP * PAGE, addr, TO)

    def store(self, page: int, tag: int, granule: int = 0, count: int = 1) -> None:
        """A guest store of data and tags (STGP-like) to `count` granules of a page."""
        data = bytes([tag * 17]) * (16 * count)
        self.mem.store(GPA + page * PAGE + 16 * granule, data, tag)

    def valid(self) -> list[int]:
        return valid_pages(self.tag_log()[1], self.npages)

    def stale(self) -> list[int]:
        saved, valid = self.tag_log()
        return stale_pages(saved, valid, tagkernel.packed(self.tags()), self.npages)


def bits_of(pages: list[int] | range, npages: int) -> bytes:
    out = bytearray(dirtylog.bitmap_bytes(npages))
    for p in pages:
        out[p // 8] |= 1 << p % 8
    return bytes(out)


def test_logging_on_without_initially_set_saves_every_page() -> None:
    m = ModelVm(log=False)
    tags = bytes(random.Random(1).randrange(16) for _ in range(m.npages * TPP))
    assert m.set_tags(tags) == m.npages * PAGE
    assert errno_of(m.tag_log) == errno.ENOENT  # no logging, no tag log
    m.set_logging(True)
    saved, valid = m.tag_log()
    assert valid_pages(valid, m.npages) == list(range(m.npages))
    assert saved == tagkernel.packed(tags)
    assert int.from_bytes(valid, "little") >> m.npages == 0  # the last word's tail bits stay 0


def test_initially_set_nothing_valid_until_cleaned() -> None:
    m = ModelVm(manual=3)
    assert m.valid() == []
    assert m.get_dirty_log() == bits_of(range(m.npages), m.npages)  # manual: only copies
    assert m.valid() == []
    m.clear_dirty_log(0, 64, b"\xff" * 8)
    assert m.valid() == list(range(64))
    m.clear_dirty_log(64, 36, bits_of([70 - 64, 99 - 64], 36))  # up to the slot's end
    assert m.valid() == [*range(64), 70, 99]
    assert m.stale() == []


def test_get_and_clear_cleans_and_saves_current_tags() -> None:
    m = ModelVm()
    m.store(3, 0x5, 2, 4)
    m.store(70, 0xA)
    assert m.valid() == [p for p in range(m.npages) if p not in (3, 70)]
    assert m.stale() == []
    assert m.get_dirty_log() == bits_of([3, 70], m.npages)
    assert m.valid() == list(range(m.npages))
    saved, _ = m.tag_log()
    assert tagkernel.unpacked(saved[3 * PPP : 4 * PPP])[2:6] == b"\x05" * 4
    assert m.stale() == []
    assert m.get_dirty_log() == bytes(16)  # clean stays clean


def test_clear_cleans_and_saves_current_tags_in_manual_mode() -> None:
    m = ModelVm(manual=1)
    m.store(3, 0x5)
    m.store(70, 0xA)
    assert m.get_dirty_log() == bits_of([3, 70], m.npages)  # manual: GET saves nothing
    assert 3 not in m.valid() and 70 not in m.valid()
    m.clear_dirty_log(0, 64, bits_of([3], 64))
    assert 3 in m.valid() and 70 not in m.valid()
    m.store(3, 0x6)  # dirtied again: saved tags dropped
    assert 3 not in m.valid()
    m.clear_dirty_log(0, 100, bits_of([3, 70], m.npages))
    assert m.valid() == list(range(m.npages))
    assert m.stale() == []


def test_mark_page_dirty_invalidates() -> None:
    m = ModelVm()
    m.vm.mark_page_dirty((GPA >> 12) + 42)
    assert 42 not in m.valid() and len(m.valid()) == m.npages - 1
    assert m.get_dirty_log() == bits_of([42], m.npages)
    assert 42 in m.valid()


def test_tag_log_enabled_while_logging_starts_empty() -> None:
    m = ModelVm(tag_log=False)
    assert m.vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG, 0, 0) == 0
    assert m.valid() == []  # nothing was saved: pages become valid when cleaned
    m.store(8, 3)
    assert m.get_dirty_log() == bits_of([8], m.npages)
    assert m.valid() == [8]
    assert m.stale() == []


def test_a_real_guest_slice_invalidates_exactly_the_pages_it_stored() -> None:
    m = ModelVm(npages=64, manual=1)
    desc = GuestDescriptor(GPA + PAGE, 32 * PAGE, 64, 1, 9, steps_per_run=300)
    m.proc.copy_to_user(m.uaddr, desc.pack())  # the VMM boots the guest: not a guest store
    vcpu = m.vm.create_vcpu(0)
    assert not isinstance(vcpu, int)
    assert vcpu.init(uapi.KVM_ARM_TARGET_GENERIC_V8, (0,) * 7) == 0
    vcpu.regs.update(x0=GPA, x1=0, pc=GUEST_ENTRY)
    for _ in range(3):
        assert m.valid() == list(range(m.npages))
        assert vcpu.run() == 0
        heartbeat_steps(exit_of(os.pread(vcpu.run_fd, uapi.KVM_RUN_SIZE, 0)))
        dirty = m.get_dirty_log()
        stored = pages_of(dirty, m.npages)
        assert stored and all(1 <= p < 33 for p in stored)  # heap pages only
        assert m.valid() == [p for p in range(m.npages) if p not in stored]
        assert m.stale() == []
        m.clear_dirty_log(0, m.npages, dirty)
    assert vcpu.stores > 0


# --- in process: a Hypothesis state machine ---------------------------------------------------


NPAGES = 100  # two bitmap words, the second one partly used


class TagLogMachine(RuleBasedStateMachine):
    """Guest stores, dirty-log passes, logging on and off, tag copies. The tag log must report
    valid every page cleaned (re-protected) and not stored to since, no page stored to since
    its last cleaning, and, for every page it reports valid, the current tags."""

    m: ModelVm
    manual: int
    dirty: set[int]
    valid: set[int]  # pages that must be valid; dirty pages must not be

    @initialize(manual=st.sampled_from([0, 1, 3]))
    def start(self, manual: int) -> None:
        self.manual = manual
        self.m = ModelVm(NPAGES, manual=manual)
        self.logging_started()

    def logging_started(self) -> None:
        if self.manual == 3:  # KVM_DIRTY_LOG_INITIALLY_SET: all dirty, nothing saved
            self.dirty, self.valid = set(range(NPAGES)), set()
        else:  # all clean and saved
            self.dirty, self.valid = set(), set(range(NPAGES))

    def stored(self, page: int) -> None:
        self.dirty.add(page)
        self.valid.discard(page)

    @rule(page=st.integers(0, NPAGES - 1), tag=st.integers(0, 15),
          granule=st.integers(0, TPP - 1), count=st.integers(1, 8))  # fmt: skip
    def store(self, page: int, tag: int, granule: int, count: int) -> None:
        self.m.store(page, tag, granule, min(count, TPP - granule))
        if self.m.logging:
            self.stored(page)

    @precondition(lambda self: self.m.logging)
    @rule(page=st.integers(0, NPAGES - 1))
    def mark_dirty(self, page: int) -> None:
        self.m.vm.mark_page_dirty((GPA >> 12) + page)
        self.stored(page)

    @precondition(lambda self: self.m.logging)
    @rule()
    def get_dirty_log(self) -> None:
        assert set(pages_of(self.m.get_dirty_log(), NPAGES)) == self.dirty
        if not self.manual:  # get-and-clear: the pages reported are re-protected
            self.valid |= self.dirty
            self.dirty = set()

    @precondition(lambda self: self.m.logging)
    @rule(chunk=st.sampled_from([0, 64]), mask=st.integers(0, 2**64 - 1))
    def clear_dirty_log(self, chunk: int, mask: int) -> None:
        num = min(64, NPAGES - chunk)
        self.m.clear_dirty_log(chunk, num, mask.to_bytes(8, "little"))
        named = {chunk + b for b in range(num) if mask >> b & 1}
        cleaned = named & self.dirty  # only pages in both bitmaps are re-protected
        self.dirty -= cleaned
        self.valid |= cleaned

    @rule(on=st.booleans())
    def set_logging(self, on: bool) -> None:
        if on != self.m.logging:
            self.m.set_logging(on)
            if on:  # a fresh bitmap and a fresh tag log
                self.logging_started()

    @rule(seed=st.integers(0, 2**32))
    def to_guest(self, seed: int) -> None:
        tags = random.Random(seed).randbytes(NPAGES * TPP)
        if self.m.logging:  # 6.12 and later: EBUSY while any slot logs dirty pages
            assert self.m.set_tags(tags) == -errno.EBUSY
        else:
            assert self.m.set_tags(tags) == NPAGES * PAGE

    @invariant()
    def valid_pages_hold_current_tags(self) -> None:
        if not self.m.logging:
            assert errno_of(self.m.tag_log) == errno.ENOENT
            return
        assert self.m.stale() == []
        valid = set(self.m.valid())
        assert self.valid <= valid, sorted(self.valid - valid)
        assert not valid & self.dirty, sorted(valid & self.dirty)


TagLogMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)
test_tag_log_state_machine = TagLogMachine.TestCase
