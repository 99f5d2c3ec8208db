"""What the kernel model sees of the calling process: its memory and its mappings.

The kernel reaches a VMM's memory with copy_from_user / copy_to_user and looks at its mappings
(VMAs) when a memslot is created. The model does the same through `UserMemory`, which the caller
provides: the daemon with data that travels over the socket, tests and fuzzers with
`kvmtag.simulated`. Everything is expressed as whole ranges, never byte callbacks: a copy returns
the prefix that could be reached, so a fault at offset N is simply a short result, and every
partial result the kernel gives is computed by the model itself.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class VmaKind(enum.Enum):
    """What backs a mapping, as far as MTE cares (arm64 VM_MTE_ALLOWED)."""

    ANON = "anon"  # MAP_ANONYMOUS, private or shared
    SHMEM = "shmem"  # memfd, tmpfs, SysV shm
    HUGETLBFS = "hugetlbfs"  # hugetlbfs files and MAP_HUGETLB
    FILE = "file"  # a file on any other filesystem (ext4, xfs, overlayfs, …)
    OTHER = "other"  # device memory, DAX, pmem: never MTE-capable


@dataclass(frozen=True)
class Vma:
    """One mapping of the calling process, [start, end), like the kernel's vm_area_struct.

    `dev`, `ino` and `pgoff` (a byte offset into the file) identify the memory of a shared
    mapping; a private mapping's memory belongs to the process and is identified by address.
    `fd` is a descriptor the daemon holds for the backing file, when it could be obtained (the
    emulated guest reaches data through it; tags never need it). A mapping that is not
    `writable` cannot take TO_GUEST tags (the kernel pins such pages for writing), and one that
    is not `readable` (PROT_NONE) cannot be reached at all.
    """

    start: int
    end: int
    kind: VmaKind
    shared: bool
    writable: bool = True
    dev: int = 0
    ino: int = 0
    pgoff: int = 0
    fd: int | None = None
    readable: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad vma range [{self.start:#x}, {self.end:#x})")


class UserMemory(Protocol):
    """The calling process, as an ioctl sees it (the kernel's `current` and its mm)."""

    @property
    def process(self) -> Hashable:
        """Identity of the calling process: VMs remember their creator's (KVM's kvm->mm)."""
        ...

    def copy_from_user(self, addr: int, size: int) -> Buffer:
        """Read [addr, addr+size): the readable prefix (shorter than size = a fault there)."""
        ...

    def copy_to_user(self, addr: int, data: Buffer) -> int:
        """Write data at addr; return how many leading bytes were written (short = a fault)."""
        ...

    def find_vmas(self, start: int, end: int) -> Sequence[Vma]:
        """The mappings intersecting [start, end), in ascending order (holes omitted)."""
        ...

    def bounce_buffer(self, size: int) -> memoryview:
        """A writable scratch buffer of `size` bytes to fill and then give whole to
        copy_to_user (the kernel's bounce buffer). kvmtagd's is the connection's shared
        window, which spares a copy; valid until the next call on this object."""
        ...
