"""A simulated VMM process: an address space of mappings over Python-owned memory.

This is the `UserMemory` that tests, fuzzers and in-process users give the kernel model when no
real process is on the other side. It keeps only what an ioctl can observe: which ranges are
mapped, readable and writable, what backs them (for the MTE rules and tag identity), and the
bytes themselves. Addresses are plain integers in a 48-bit user address space.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import mmap
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmtag.usermem import Buffer, Vma, VmaKind

_PAGE = 4096
_next_ino = itertools.count(1000)
_next_pid = itertools.count(1)


@dataclass(eq=False)
class SimulatedFile:
    """A file whose pages can be mapped shared: a memfd, a tmpfs or hugetlbfs file, or an ext4
    file. Two processes mapping one SimulatedFile share its data and, in the model, its tags.

    The data lives in a real memfd (`fd`), so shared mappings of it hand the model a descriptor
    that reaches the data, as the daemon gets for a VMM's memfd.
    """

    size: int
    kind: VmaKind = VmaKind.SHMEM
    dev: int = 0x1A
    ino: int = field(default_factory=lambda: next(_next_ino))

    def __post_init__(self) -> None:
        self.fd = os.memfd_create(f"simulated-{self.ino}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.data = mmap.mmap(self.fd, self.size)
        weakref.finalize(self, _release, self.data, self.fd)


def _release(data: mmap.mmap, fd: int) -> None:
    with contextlib.suppress(BufferError):
        data.close()
    os.close(fd)


@dataclass(eq=False)
class _Mapping:
    start: int
    end: int
    vma: Vma
    memory: bytearray | mmap.mmap  # private copy, or the shared file's data
    offset: int  # where start lies in memory
    readable: bool
    writable: bool
    file: SimulatedFile | None = None  # kept alive while mapped, as the kernel's vma->vm_file


class SimulatedProcess:
    """An address space. Implements `kvmtag.usermem.UserMemory`."""

    def __init__(self, base: int = 0x7F00_0000_0000, pid: int | None = None) -> None:
        self.pid = next(_next_pid) if pid is None else pid
        self._next = base
        self._starts: list[int] = []
        self._maps: list[_Mapping] = []

    # --- UserMemory ----------------------------------------------------------------------------

    @property
    def process(self) -> int:
        return self.pid

    def copy_from_user(self, addr: int, size: int) -> Buffer:
        out = bytearray()
        for m, lo, hi in self._walk(addr, size):
            if not m.readable:
                break
            out += m.memory[m.offset + lo - m.start : m.offset + hi - m.start]
        return out

    def copy_to_user(self, addr: int, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        done = 0
        for m, lo, hi in self._walk(addr, len(view)):
            if not m.writable:
                break
            at = m.offset + lo - m.start
            m.memory[at : at + hi - lo] = view[done : done + hi - lo]
            done += hi - lo
        return done

    def bounce_buffer(self, size: int) -> memoryview:
        return memoryview(bytearray(size))

    def find_vmas(self, start: int, end: int) -> Sequence[Vma]:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        return [m.vma for m in self._maps[i:] if m.start < end and m.end > start]

    # --- the VMM's side: mmap and friends ------------------------------------------------------

    def mmap(
        self,
        size: int,
        *,
        file: SimulatedFile | None = None,
        offset: int = 0,
        shared: bool = False,
        kind: VmaKind | None = None,
        readable: bool = True,
        writable: bool = True,
        addr: int | None = None,
        align: int = _PAGE,
    ) -> int:
        """Map `size` bytes: anonymous memory, or `file` at `offset`. Returns the address.

        With `addr`, map exactly there (MAP_FIXED: it must not overlap another mapping); `kind`
        overrides what the mapping reports (e.g. VmaKind.OTHER for device memory).
        """
        if size <= 0 or size % _PAGE or offset % _PAGE:
            raise ValueError("size and offset must be positive multiples of 4096")
        if addr is None:
            addr = -(-self._next // align) * align
            self._next = addr + size + _PAGE  # leave a hole after each mapping
        if any(m.start < addr + size and m.end > addr for m in self._maps):
            raise ValueError(f"mapping at {addr:#x} overlaps another")
        memory: bytearray | mmap.mmap
        if file is None:
            memory, mem_offset = bytearray(size), 0
            vma = Vma(addr, addr + size, kind or VmaKind.ANON, shared, writable, readable=readable)
        else:
            if offset + size > file.size:
                raise ValueError("mapping beyond the end of the file")
            # A private file mapping gets its own copy of the data (copy-on-write, eagerly).
            memory = file.data if shared else bytearray(file.data[offset : offset + size])
            mem_offset = offset if shared else 0
            vma = Vma(
                addr, addr + size, kind or file.kind, shared, writable, file.dev, file.ino, offset,
                fd=file.fd if shared else None, readable=readable,
            )
        mapping = _Mapping(addr, addr + size, vma, memory, mem_offset, readable, writable, file)
        i = bisect.bisect(self._starts, addr)
        self._starts.insert(i, addr)
        self._maps.insert(i, mapping)
        return addr

    def munmap(self, addr: int, size: int) -> None:
        """Unmap whole mappings inside [addr, addr+size) (partial unmaps are not simulated)."""
        keep = [m for m in self._maps if not (addr <= m.start and m.end <= addr + size)]
        self._maps = keep
        self._starts = [m.start for m in keep]

    def mprotect(self, addr: int, size: int, *, readable: bool, writable: bool) -> None:
        """Change the protection of whole mappings inside [addr, addr+size)."""
        for m in self._maps:
            if addr <= m.start and m.end <= addr + size:
                m.readable, m.writable = readable, writable
                m.vma = dataclasses.replace(m.vma, writable=writable, readable=readable)

    def hole(self, size: int = _PAGE, align: int = _PAGE) -> int:
        """An address range guaranteed unmapped: a pointer there faults."""
        addr = -(-self._next // align) * align
        self._next = addr + size + _PAGE
        return addr

    def alloc(self, data: Buffer | int) -> int:
        """Anonymous read-write memory holding `data` (or that many zero bytes)."""
        size = data if isinstance(data, int) else len(data)
        addr = self.mmap(max(-(-size // _PAGE) * _PAGE, _PAGE))
        if not isinstance(data, int):
            self.copy_to_user(addr, data)
        return addr

    def read(self, addr: int, size: int) -> bytes:
        got = bytes(self.copy_from_user(addr, size))
        if len(got) != size:
            raise ValueError(f"{addr + len(got):#x} is not mapped readable")
        return got

    def _walk(self, addr: int, size: int) -> list[tuple[_Mapping, int, int]]:
        """Contiguous mapped pieces of [addr, addr+size), stopping at the first gap."""
        pieces = []
        i = bisect.bisect_right(self._starts, addr) - 1
        end = addr + size
        while addr < end and 0 <= i < len(self._maps):
            m = self._maps[i]
            if not m.start <= addr < m.end:
                break
            hi = min(end, m.end)
            pieces.append((m, addr, hi))
            addr, i = hi, i + 1
        return pieces
