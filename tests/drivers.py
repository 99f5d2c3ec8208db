"""Drivers: one way of doing what a VMM does (open, ioctl, map memory), so that the rule tables
run unchanged in process, through the client and daemon, and under every profile."""

from __future__ import annotations

import errno
import itertools
import os
from typing import Protocol

from kvmtag import Host, HostConfig, SimulatedFile, SimulatedProcess, Vcpu, Vm, VmaKind

MEMORY_KINDS = (
    "anon",  # MAP_PRIVATE|MAP_ANONYMOUS
    "anon-readonly",  # the same, PROT_READ
    "anon-shared",  # MAP_SHARED|MAP_ANONYMOUS
    "memfd",  # memfd, MAP_SHARED
    "memfd-private",  # memfd, MAP_PRIVATE
    "file",  # a file on a non-shmem filesystem, MAP_SHARED
    "file-private",  # the same, MAP_PRIVATE
    "hugetlbfs",  # a hugetlbfs file, MAP_SHARED
    "device",  # device memory (VM_PFNMAP)
)


class Driver(Protocol):
    page_size: int

    def open(self) -> int:
        """open("/dev/kvm")"""

    def ioctl(self, fd: int, request: int, arg: int | bytes = 0) -> tuple[int, bytes]:
        """The result (an fd for CREATE_VM/CREATE_VCPU) and, for a bytes argument, the struct
        as the kernel left it; raises OSError with the kernel's errno."""

    def close(self, fd: int) -> None: ...

    def mmap(self, size: int, kind: str = "memfd", file: object | None = None) -> int:
        """Map guest RAM of a MEMORY_KINDS kind; `file` maps an object from `new_file` again."""

    def new_file(self, size: int, kind: str = "memfd") -> object: ...

    def buffer(self, data: bytes | int) -> int:
        """Read-write user memory holding data (or that many zero bytes)."""

    def edge(self, data: bytes) -> int:
        """User memory holding data, followed directly by an unmapped page."""

    def readonly(self, data: bytes) -> int:
        """Read-only user memory holding data."""

    def unmapped(self) -> int:
        """An address that faults."""

    def read(self, addr: int, size: int) -> bytes: ...


class InProcessDriver:
    """The kernel model in this process, a SimulatedProcess as the VMM."""

    def __init__(self, config: HostConfig | None = None, host: Host | None = None) -> None:
        self.host = host or Host(config)
        self.page_size = self.host.config.page_size
        self.process = SimulatedProcess()
        self._files: dict[int, object] = {}
        self._fds = itertools.count(100)

    def open(self) -> int:
        return self._install(self.host.open())

    def close(self, fd: int) -> None:
        del self._files[fd]

    def ioctl(self, fd: int, request: int, arg: int | bytes = 0) -> tuple[int, bytes]:
        target = self._files.get(fd)
        if target is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        addr = self.buffer(arg) if isinstance(arg, bytes) else arg
        result = target.ioctl(self.process, request, addr)  # type: ignore[attr-defined]
        if isinstance(result, Vm | Vcpu):
            result = self._install(result)
        elif result < 0:
            raise OSError(-result, os.strerror(-result))
        out = self.read(addr, len(arg)) if isinstance(arg, bytes) else b""
        return result, out

    def new_file(self, size: int, kind: str = "memfd") -> SimulatedFile:
        vma_kind = {
            "memfd": VmaKind.SHMEM,
            "memfd-private": VmaKind.SHMEM,
            "file": VmaKind.FILE,
            "file-private": VmaKind.FILE,
            "hugetlbfs": VmaKind.HUGETLBFS,
        }[kind]
        return SimulatedFile(size, vma_kind)

    def mmap(self, size: int, kind: str = "memfd", file: object | None = None) -> int:
        proc = self.process
        if kind == "anon":
            return proc.mmap(size, align=self.page_size)
        if kind == "anon-readonly":
            return proc.mmap(size, writable=False, align=self.page_size)
        if kind == "anon-shared":  # shmem underneath, with an inode of its own
            return proc.mmap(
                size,
                file=SimulatedFile(size, VmaKind.SHMEM),
                shared=True,
                kind=VmaKind.ANON,
                align=self.page_size,
            )
        if kind == "device":
            return proc.mmap(size, shared=True, kind=VmaKind.OTHER, align=self.page_size)
        if file is None:
            file = self.new_file(size, kind)
        assert isinstance(file, SimulatedFile)
        return proc.mmap(
            size, file=file, shared=not kind.endswith("-private"), align=self.page_size
        )

    def buffer(self, data: bytes | int) -> int:
        return self.process.alloc(data)

    def edge(self, data: bytes) -> int:
        size = max(-(-len(data) // 4096) * 4096, 4096)
        addr = self.process.mmap(size)
        self.process.hole()  # the next mapping starts a page later: unmapped in between
        start = addr + size - len(data)
        self.process.copy_to_user(start, data)
        return start

    def readonly(self, data: bytes) -> int:
        addr = self.process.alloc(data)
        size = max(-(-len(data) // 4096) * 4096, 4096)
        self.process.mprotect(addr, size, readable=True, writable=False)
        return addr

    def unmapped(self) -> int:
        return self.process.hole()

    def read(self, addr: int, size: int) -> bytes:
        return self.process.read(addr, size)

    def _install(self, target: object) -> int:
        fd = next(self._fds)
        self._files[fd] = target
        return fd
