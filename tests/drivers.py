"""Drivers: one way of doing what a VMM does (open, ioctl, map memory), so that the rule tables
run unchanged in process, through the client and daemon, and under every profile."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import os
from typing import Protocol

from kvmtag import Host, HostConfig, SimulatedFile, SimulatedProcess, Vcpu, Vm, VmaKind

MEMORY_KINDS = (
    "anon",  # MAP_PRIVATE|MAP_ANONYMOUS
    "anon-readonly",  # the same, PROT_READ
    "anon-none",  # the same, PROT_NONE
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
    profile: str  # the kernel profile's name

    def open(self) -> int:
        """open("/dev/kvm")"""

    def ioctl(self, fd: int, request: int, arg: int | bytes = 0) -> tuple[int, bytes]:
        """The result (an fd for CREATE_VM/CREATE_VCPU) and, for a bytes argument, the struct
        as the kernel left it; raises OSError with the kernel's errno."""

    def close(self, fd: int) -> None: ...

    def mmap(self, size: int, kind: str = "memfd", file: object | None = None) -> int:
        """Map guest RAM of a MEMORY_KINDS kind; `file` maps an object from `new_file` again."""

    def new_file(self, size: int, kind: str = "memfd") -> object: ...

    def mmap_with_hole(self, size: int, mapped: int, kind: str = "memfd") -> int:
        """An address range of `size` bytes of which only the first `mapped` are mapped."""

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
        self.profile = self.host.config.profile.name
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
        if kind in ("anon-readonly", "anon-none"):
            readable = kind == "anon-readonly"
            return proc.mmap(size, readable=readable, writable=False, align=self.page_size)
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

    def mmap_with_hole(self, size: int, mapped: int, kind: str = "memfd") -> int:
        if not mapped:
            return self.process.hole(size, align=self.page_size)
        addr = self.mmap(mapped, kind)
        self.process.hole(size)  # nothing is ever mapped after a mapping's end here
        return addr

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


# --- through the client and a real kvmtagd ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10  # the same on x86_64 and arm64
_MAP_NORESERVE = 0x4000
_MAP_FAILED = 2**64 - 1


class ClientDriver:
    """A real VMM: this process's memory, kvmtag.client, and a kvmtagd on `socket_path`."""

    unsupported = frozenset({"hugetlbfs", "device"})  # need a mount / a device driver

    def __init__(self, socket_path: str, file_dir: str) -> None:
        from kvmtag import client

        self.client = client
        self.socket_path = socket_path
        self.file_dir = file_dir  # a disk filesystem (not tmpfs) for "file" mappings
        self._keep: list[int] = []  # fds that live as long as the driver
        self._maps: list[tuple[int, int]] = []  # (address, size) to unmap at the end
        self._fds: list[int] = []
        fd = self.open()
        self.page_size = client.info(fd).page_size
        self.profile = client.info(fd).profile

    def open(self) -> int:
        fd = self.client.open("/dev/kvm", socket=self.socket_path)
        self._fds.append(fd)
        return fd

    def ioctl(self, fd: int, request: int, arg: int | bytes = 0) -> tuple[int, bytes]:
        if isinstance(arg, bytes):
            buf = bytearray(arg)
            result = self.client.ioctl(fd, request, buf)
            out = bytes(buf)
        else:
            result, out = self.client.ioctl(fd, request, arg), b""
        if request in (0xAE01, 0xAE41):
            self._fds.append(result)
        return result, out

    def close(self, fd: int) -> None:
        self.client.close(fd)

    def finish(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                self.client.close(fd)
        for fd in self._keep:
            os.close(fd)
        for addr, size in self._maps:
            _libc.munmap(addr, size)

    def _map(self, size: int, fd: int = -1, flags: int = mmap.MAP_SHARED) -> int:
        """mmap at an address aligned to the emulated page size, as a VMM must on a host with
        16 or 64 KiB pages: reserve a larger range, map inside it, give back the rest."""
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        align = max(self.page_size, mmap.PAGESIZE)
        anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        base = _libc.mmap(None, size + align, _PROT_NONE, anon, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap")
        addr = -(-base // align) * align
        got = _libc.mmap(addr, size, _PROT_RW, flags | _MAP_FIXED, fd, 0)
        if got != addr:
            raise OSError(ctypes.get_errno(), "mmap")
        if addr > base:
            _libc.munmap(base, addr - base)
        if base + align > addr:
            _libc.munmap(addr + size, base + align - addr)
        self._maps.append((addr, size))
        return addr

    def new_file(self, size: int, kind: str = "memfd") -> int:
        if kind.startswith("file"):
            fd = os.open(self.file_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._keep.append(fd)
        return fd

    def mmap(self, size: int, kind: str = "memfd", file: object | None = None) -> int:
        if kind in self.unsupported:
            raise ValueError(f"{kind} memory cannot be had here")
        if kind in ("anon", "anon-readonly", "anon-none"):
            addr = self._map(size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if kind != "anon":
                self._protect(addr, size, mmap.PROT_READ if kind == "anon-readonly" else _PROT_NONE)
            return addr
        if kind == "anon-shared":
            return self._map(size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        fd = file if isinstance(file, int) else self.new_file(size, kind)
        private = kind.endswith("-private")
        return self._map(size, fd, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED)

    def mmap_with_hole(self, size: int, mapped: int, kind: str = "memfd") -> int:
        addr = self.mmap(size, kind)
        if _libc.munmap(addr + mapped, size - mapped) != 0:
            raise OSError(ctypes.get_errno(), "munmap")
        return addr

    def buffer(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        addr = self._map(max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if not isinstance(data, int):
            ctypes.memmove(addr, data, len(data))
        return addr

    def edge(self, data: bytes) -> int:
        span = -(-max(len(data), 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        addr = self._map(span + mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._protect(addr + span, mmap.PAGESIZE, _PROT_NONE)
        start = addr + span - len(data)
        ctypes.memmove(start, data, len(data))
        return start

    def readonly(self, data: bytes) -> int:
        addr = self.buffer(data)
        self._protect(addr, max(len(data), 1), mmap.PROT_READ)
        return addr

    def unmapped(self) -> int:
        addr = self._map(mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._protect(addr, mmap.PAGESIZE, _PROT_NONE)
        return addr

    def read(self, addr: int, size: int) -> bytes:
        return ctypes.string_at(addr, size)

    @staticmethod
    def _protect(addr: int, size: int, prot: int) -> None:
        start = addr - addr % mmap.PAGESIZE
        length = -(-(addr + size - start) // mmap.PAGESIZE) * mmap.PAGESIZE
        if _libc.mprotect(start, length, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
