"""Guest RAM as the emulated CPU reaches it: data through the backing fds, tags in the store.

Data is reached through a mapping of the descriptor the VMM passed for each shared mapping
(memfd, tmpfs, hugetlbfs alike), always with copies guarded in C (kvmtag.tagkernel.guarded_copy):
a VMM may truncate its file at any moment, and the page that then raises SIGBUS makes the
access fail (KVM_RUN gets EFAULT) instead of ending the daemon. Nothing is ever written past
the file's end, so the VMM's truncation sticks (pwrite would grow the file back).

Every store takes the VM's dirty lock for the data or tag write, the dirty bit and the tag log
together, so a store racing with KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG is seen in this pass
or the next, and a page the tag log reports valid has not been stored to since its tags were
saved.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from typing import TYPE_CHECKING

from kvmtag import tagkernel
from kvmtag.memslots import Memslot, Segment

if TYPE_CHECKING:
    from kvmtag.vm import Vm


class GuestExit(Exception):
    """The access leaves the guest: the vCPU exits to the VMM."""


class MmioExit(GuestExit):
    """No memslot (or a read-only one, for a write): KVM_EXIT_MMIO, as on arm64."""

    def __init__(self, gpa: int, data: bytes, is_write: bool) -> None:
        super().__init__(f"MMIO {'write' if is_write else 'read'} at {gpa:#x}")
        self.gpa, self.data, self.is_write = gpa, data, is_write


class TagsOnlyExit(GuestExit):
    """The page's data cannot be reached by kvmtagd: KVM_EXIT_INTERNAL_ERROR."""

    def __init__(self, gpa: int, why: str) -> None:
        super().__init__(f"guest RAM at {gpa:#x} is tags-only: {why}")
        self.gpa = gpa


class FaultExit(GuestExit):
    """The backing memory is gone (a hole, a truncated file): KVM_RUN fails with EFAULT."""

    errno = errno.EFAULT


class _Mappings:
    """The backing files of one VM, each mapped once (again when it has grown)."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def view(self, fd: int, offset: int, n: int, gpa: int) -> memoryview:
        """[offset, offset+n) of the file behind fd."""
        m = self._maps.get(fd)
        if m is None or offset + n > len(m):
            with self._lock:
                try:
                    size = os.fstat(fd).st_size
                    if offset + n > size:
                        raise FaultExit(f"guest RAM at {gpa:#x} is beyond the end of its file")
                    readonly = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                    access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
                    m = self._maps[fd] = mmap.mmap(fd, size, access=access)
                except OSError as e:
                    raise FaultExit(f"mapping guest RAM at {gpa:#x}: {e.strerror}") from None
        return memoryview(m)[offset : offset + n]


class GuestMemory:
    """One VM's guest physical memory, for its vCPUs."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.page = vm.config.page_size
        self.shift = vm.config.page_shift
        # Per VM: the fds it holds live as long as the VM's process, so a number in this
        # cache is never another file's.
        self._maps = _Mappings()

    def _locate(self, gpa: int, write: bool) -> tuple[Memslot, Segment, int]:
        """The slot and segment of gpa, and the page offset in the slot."""
        gfn = gpa >> self.shift
        slot = self.vm.memslots.find(gfn)
        if slot is None or (write and slot.readonly):
            raise MmioExit(gpa, b"", write)
        page = gfn - slot.base_gfn
        segment = slot.segment_for(page)
        if segment is None or not segment.vma.readable or (write and not segment.vma.writable):
            raise FaultExit(f"no usable VMM mapping behind {gpa:#x}")
        return slot, segment, page

    def _file_offset(self, segment: Segment, slot: Memslot, gpa: int) -> int:
        vma = segment.vma
        uaddr = slot.userspace_addr + gpa - (slot.base_gfn << self.shift)
        return vma.pgoff + uaddr - vma.start

    def read(self, gpa: int, n: int) -> bytes:
        """Data of [gpa, gpa+n), within one page."""
        slot, segment, _ = self._locate(gpa, write=False)
        src = self._maps.view(self._fd(segment, gpa), self._file_offset(segment, slot, gpa), n, gpa)
        out = bytearray(n)
        if not tagkernel.guarded_copy(out, src):
            raise FaultExit(f"guest RAM at {gpa:#x} was truncated by the VMM")
        return bytes(out)

    def check_tags(self, gpa: int, n: int, tag: int) -> int | None:
        """A tag-checked access of [gpa, gpa+n) within one page: the first granule address whose
        tag is not `tag`, or None. Without KVM_CAP_ARM_MTE the guest has no tags: never."""
        _, segment, page = self._locate(gpa, write=False)
        if not self.vm.mte_enabled:
            return None
        within = gpa & (self.page - 1)
        bad = segment.backing.find_mismatch(
            segment.index + page - segment.first, within // 16, -(-n // 16), tag
        )
        return None if bad is None else (gpa & ~15) + 16 * bad

    def store(
        self, gpa: int, data: bytes, tag: int | None = None, tag_bytes: int | None = None
    ) -> None:
        """Write data at gpa (within one page) and, with `tag`, set the tags of the granules of
        [gpa, gpa + tag_bytes or len(data)) (gpa 16-aligned then): one guest store, logged."""
        slot, segment, page = self._locate(gpa, write=True)
        fd = self._fd(segment, gpa)
        dst = self._maps.view(fd, self._file_offset(segment, slot, gpa), len(data), gpa)
        vm = self.vm
        with vm.dirty_lock:
            if data and dst.readonly:
                raise FaultExit(f"guest RAM at {gpa:#x}: the VMM's descriptor is read-only")
            if data and not tagkernel.guarded_copy(dst, data):
                raise FaultExit(f"guest RAM at {gpa:#x} was truncated by the VMM")
            if tag is not None and vm.mte_enabled:  # no MTE: tag stores do nothing
                within = gpa & (self.page - 1)
                granules = -(-(tag_bytes if tag_bytes is not None else len(data)) // 16)
                segment.backing.set_granules(
                    segment.index + page - segment.first, within // 16, granules, tag
                )
            # The memslot may have been replaced (logging switched on, the tag log saved)
            # while this store waited for the lock: log the store in the current one.
            gfn = gpa >> self.shift
            current = vm.memslots.find(gfn)
            if current is not None:
                vm.page_stored_locked(current, gfn - current.base_gfn)

    def _fd(self, segment: Segment, gpa: int) -> int:
        fd = segment.vma.fd
        if fd is None:
            why = "private or anonymous memory" if not segment.vma.shared else "no descriptor"
            raise TagsOnlyExit(gpa, why)
        return fd
