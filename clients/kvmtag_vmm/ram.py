"""Guest RAM as the VMM holds it: one memfd, mapped shared at an address aligned to the emulated
page size, which the memslots name.

The VMM itself never touches guest RAM through that mapping: it reads pages with preadv and
writes them with pwrite, finds all-zero pages with SEEK_DATA/SEEK_HOLE (holes are zero without
being read; reading one through a mapping would allocate it, about 3 s per GiB on this kind of
machine) and the C tag kernel (kvmtag.tagkernel.zero_pages) for the rest.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import mmap
import os
from collections.abc import Sequence

from clients.kvmtag_vmm import _bits
from kvmtag import tagkernel


class RamError(OSError):
    """Guest RAM could not be read (a short read: the memfd was truncated under the VMM)."""


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000


class GuestRam:
    """One memfd holding all guest RAM, mapped MAP_SHARED at an address aligned to the emulated
    page size (mmap only aligns to the machine's 4 KiB: reserve more, map inside, trim). The
    mapping is what the memslots name; the VMM itself reads and writes the memfd with
    preadv/pwrite (no page faults in this process, and holes are never touched)."""

    def __init__(self, size: int, page_size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("kvmtag-vmm-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.addr = self._map_aligned(size, max(page_size, mmap.PAGESIZE))
        except BaseException:
            os.close(self.fd)
            raise

    def _map_aligned(self, size: int, align: int) -> int:
        anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        base = _libc.mmap(None, size + align, 0, anon, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap (reserve)")
        addr = -(-base // align) * align
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        got = _libc.mmap(addr, size, prot, mmap.MAP_SHARED | _MAP_FIXED, self.fd, 0)
        if got != addr:
            err = ctypes.get_errno()
            _libc.munmap(base, size + align)
            raise OSError(err, "mmap (guest RAM)")
        if addr > base:
            _libc.munmap(base, addr - base)
        if base + align > addr:
            _libc.munmap(addr + size, base + align - addr)
        return int(addr)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) ranges of the memfd that hold data (SEEK_DATA / SEEK_HOLE); the rest
        are holes, zero without being read. Reading a hole through the mapping would allocate
        it (about 3 s per GiB here), so the VMM never does. One call walks the whole range:
        callers ask once per memslot and pass, not once per page window."""
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, end)))
            pos = hole
        return out

    def read_pages(
        self, start: int, npages: int, page_size: int, wanted: int,
        extents: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[bytearray, int]:  # fmt: skip
        """The data of the `wanted` pages of the window of npages pages at memfd offset start:
        (the non-zero ones, in ascending order, concatenated; the bits of the wanted pages that
        are all zero). Pages in holes are zero without being read; the others are read with
        preadv (no page faults in this process) and checked for zeros in C. `extents` are
        data_extents() of a range covering the window, if the caller has them."""
        ps = page_size
        if extents is None:
            extents = self.data_extents(start, start + npages * ps)
        has_data = 0
        end = start + npages * ps
        k = bisect.bisect_right(extents, (start, end)) - 1
        for lo, hi in extents[max(k, 0) :]:
            if lo >= end:
                break
            if hi <= start:
                continue
            first = (max(lo, start) - start) // ps
            last = -(-(min(hi, end) - start) // ps)
            has_data |= _bits.mask(last - first) << first
        candidates = wanted & has_data
        zero = wanted & ~has_data
        buf = bytearray(candidates.bit_count() * ps)
        with memoryview(buf) as view:
            pos = 0
            for f, c in _bits.runs(candidates):
                part = view[pos : pos + c * ps]
                offset = start + f * ps
                while part:
                    got = os.preadv(self.fd, [part], offset)
                    if got <= 0:
                        raise RamError(f"guest RAM at memfd offset {offset:#x}: short read")
                    part, offset = part[got:], offset + got
                pos += c * ps
            bitmap = bytearray(_bits.words_bytes(candidates.bit_count()))
            tagkernel.zero_pages(bitmap, buf, ps)
            packed_zero = _bits.from_bytes(bitmap)
            if not packed_zero:
                return buf, zero
            # Some pages read are zero after all: map them back and drop them from the data.
            out = bytearray()
            pos = 0
            for f, c in _bits.runs(candidates):
                z = (packed_zero >> pos) & _bits.mask(c)
                zero |= z << f
                for g, d in _bits.runs(~z & _bits.mask(c)):
                    out += view[(pos + g) * ps : (pos + g + d) * ps]
                pos += c
        return out, zero

    def prealloc(self) -> None:
        """Allocate every page now (QEMU's -mem-prealloc): later writes only copy."""
        os.posix_fallocate(self.fd, 0, self.size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """pwrite into the memfd (allocating tmpfs pages this way is ~3x faster than faulting
        them in through the mapping)."""
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)
        os.close(self.fd)
