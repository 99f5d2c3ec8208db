"""The calling process's own memory and mappings, as the client library sees them (Linux only).

The client emulates what the kernel does with the VMM's pointers: copy_from_user and
copy_to_user become `read_memory`/`read_into` and `write_memory`, and a memslot's mappings come
from `find_vmas`. Nothing here needs privilege except the /proc/self/map_files fallback.

Copies use process_vm_readv/process_vm_writev on our own pid rather than plain loads: the kernel
walks the page tables for us (get_user_pages), so a hole or a protection is an EFAULT and a short
count, never a SIGSEGV. Writes honour protections: GUP asks for FOLL_WRITE without FOLL_FORCE,
so a PROT_READ page stops a write exactly as copy_to_user would (unlike /proc/self/mem, which
forces its way through). Mappings that GUP cannot pin (VM_IO/VM_PFNMAP: [vvar], device memory;
the [vsyscall] page) read as a fault even though the process itself can load from them. The
kernel does move a partial iovec, up to the faulting page (seen on 6.18), but the man page
promises partial transfers only at iovec granularity, so we do not rely on it: after an EFAULT,
one more call with one remote iovec per page finds the fault to the page on any kernel.

What backs a mapping is decided, most exact first, by:
  1. the maps line itself: no inode (anonymous, [heap], [stack], [anon:…]; other [specials]),
     shared anonymous memory (shmem's "/dev/zero (deleted)", "[anon_shmem:…]"), MAP_HUGETLB
     ("/anon_hugepage (deleted)"), and device nodes (stat of the path, trusted only when its
     device and inode are the mapping's);
  2. fstatfs on the descriptor found for a shared mapping: the kernel's answer for that very file;
  3. /proc/self/mountinfo, whose "major:minor" is the superblock's device, the very number the
     maps line prints: no path lookup, so deleted, renamed and private-mapped files work, and no
     descriptor is needed;
  4. the kernel-internal mounts, which mountinfo never lists: shmem's (memfd, shared anonymous,
     SysV shm), recognised by probing one memfd, and hugetlbfs's (memfd with MFD_HUGETLB,
     SHM_HUGETLB), recognised by their names on any other internal device.
statfs on a path is not used: the path may be deleted, replaced, escaped or from another mount
namespace, and a device node on a tmpfs /dev would read as tmpfs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

from kvmtag.usermem import Vma, VmaKind

__all__ = [
    "BufferAddress",
    "buffer_address",
    "find_vmas",
    "read_into",
    "read_memory",
    "write_memory",
]

# Anything exporting a C-contiguous buffer: bytes, bytearray, memoryview, mmap, ctypes arrays.
ReadableBuffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap | ctypes.Array[Any]"
WritableBuffer: TypeAlias = "bytearray | memoryview | mmap.mmap | ctypes.Array[Any]"

PAGE_SIZE = mmap.PAGESIZE
ADDRESS_LIMIT = 1 << 64  # an address at or above this (or below 0) reads as a fault
IOV_MAX = 1024  # UIO_MAXIOV: iovecs per process_vm_* call
# Bytes asked of one call: under MAX_RW_COUNT (INT_MAX & PAGE_MASK), beyond which the kernel
# silently truncates a transfer (a short count that would look like a fault).
_MAX_CALL = 1 << 30

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_DEV_ZERO = os.makedev(1, 5)
_FS_KINDS = {"tmpfs": VmaKind.SHMEM, "devtmpfs": VmaKind.SHMEM, "hugetlbfs": VmaKind.HUGETLBFS}
_ANON_SPECIALS = ("[heap]", "[stack", "[anon:")  # prefixes of anonymous memory's names
_REOPEN_FLAGS = os.O_PATH | os.O_APPEND | os.O_DIRECT  # a dup of such an fd would not do


# --- C declarations -----------------------------------------------------------------------------


class iovec(ctypes.Structure):  # <linux/uio.h>
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class statfs(ctypes.Structure):  # <bits/statfs.h>: __fsword_t is long; 120 bytes on LP64
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


class Py_buffer(ctypes.Structure):  # CPython's <cpython/object.h>
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # not py_object: PyBuffer_Release owns this reference
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


PyBUF_SIMPLE = 0
PyBUF_WRITABLE = 0x0001

_libc = ctypes.CDLL(None, use_errno=True)
_vm_argtypes: list[type[Any]] = [
    ctypes.c_int,  # pid_t pid
    ctypes.POINTER(iovec),  # const struct iovec *local_iov
    ctypes.c_ulong,  # unsigned long liovcnt
    ctypes.POINTER(iovec),  # const struct iovec *remote_iov
    ctypes.c_ulong,  # unsigned long riovcnt
    ctypes.c_ulong,  # unsigned long flags
]
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = _vm_argtypes
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.argtypes = _vm_argtypes
_process_vm_writev.restype = ctypes.c_ssize_t
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(statfs)]
_fstatfs.restype = ctypes.c_int

# PyDLL: called with the GIL held, and a Python error it sets is raised (TypeError for a
# non-buffer, BufferError for a read-only or non-contiguous one).
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(Py_buffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(Py_buffer)]
_release_buffer.restype = None


# --- buffers ------------------------------------------------------------------------------------


class BufferAddress(NamedTuple):
    address: int
    nbytes: int
    writable: bool


@contextmanager
def _exported(buf: ReadableBuffer, writable: bool) -> Iterator[BufferAddress]:
    """Hold buf's buffer export: while it is held, a bytearray cannot be resized (reallocated)
    nor an mmap closed, so the address stays valid even if another thread tries."""
    view = Py_buffer()
    _get_buffer(buf, ctypes.byref(view), PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    try:
        yield BufferAddress(view.buf or 0, view.len, not view.readonly)
    finally:
        _release_buffer(ctypes.byref(view))


def buffer_address(buf: ReadableBuffer) -> BufferAddress:
    """Where a Python buffer's bytes live, for building a struct that points at them.

    The address stays valid while buf is alive and, for a bytearray, not resized; hold a
    memoryview of buf for as long as the address is in use to make resizing (or closing an mmap)
    fail instead.

    Args:
        buf: bytes, bytearray, a C-contiguous memoryview, an mmap or a ctypes array.
    Returns:
        (address, nbytes, writable).
    Raises:
        TypeError: buf has no buffer. BufferError: its buffer is not C-contiguous.
    """
    with _exported(buf, writable=False) as info:
        return info


# --- copies -------------------------------------------------------------------------------------


def _call(syscall: Any, local: int, remote: Any, nremote: int, size: int) -> int:
    """One process_vm_readv/writev on ourselves: bytes moved, 0 on EFAULT at the first page."""
    liov = iovec(local, size)
    moved = int(syscall(os.getpid(), ctypes.byref(liov), 1, remote, nremote, 0))
    if moved >= 0:
        return moved
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        return 0
    raise OSError(err, os.strerror(err))


def _transfer(syscall: Any, local: int, remote: int, size: int) -> int:
    """Move size bytes between our buffer at local and memory at remote, stopping at the first
    fault; return the count moved."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    if not 0 <= remote < ADDRESS_LIMIT:
        return 0
    size = min(size, ADDRESS_LIMIT - remote)
    done = 0
    while done < size:
        n = min(size - done, _MAX_CALL)
        moved = _call(syscall, local + done, ctypes.byref(iovec(remote + done, n)), 1, n)
        if moved == 0 and n > PAGE_SIZE - (remote + done) % PAGE_SIZE:
            moved = _transfer_paged(syscall, local + done, remote + done, n)
        if moved == 0:
            break
        # A short count is a fault or another error: the next call, starting there, tells.
        done += moved
    return done


def _transfer_paged(syscall: Any, local: int, remote: int, size: int) -> int:
    """One call with a remote iovec per page (at most IOV_MAX): the documented granularity of a
    partial transfer is the iovec, so this finds the fault to the page on any kernel."""
    vecs = (iovec * IOV_MAX)()
    count, at, end = 0, remote, remote + size
    while at < end and count < IOV_MAX:
        step = min(PAGE_SIZE - at % PAGE_SIZE, end - at)
        vecs[count].iov_base, vecs[count].iov_len = at, step
        count, at = count + 1, at + step
    return _call(syscall, local, vecs, count, at - remote)


def read_into(addr: int, buf: WritableBuffer) -> int:
    """copy_from_user into buf, without an intermediate copy.

    Args:
        addr: any integer; outside [0, 2**64) it reads as a fault.
        buf: a writable C-contiguous buffer; len(buf) bytes are asked for.
    Returns:
        How many leading bytes of buf were filled: fewer than asked means [addr+n] faults.
    Raises:
        BufferError/TypeError: buf is not a writable buffer. OSError: the syscall failed for a
        reason other than EFAULT (ENOSYS or EPERM under a seccomp filter, ENOMEM).
    """
    with _exported(buf, writable=True) as info:
        return _transfer(_process_vm_readv, info.address, addr, info.nbytes)


def read_memory(addr: int, size: int) -> bytes:
    """copy_from_user: the readable prefix of [addr, addr+size), b"" if addr itself faults.

    size bytes are allocated up front: callers bound it, as every size on the wire is bounded.
    """
    if size < 0:
        raise ValueError(f"negative size {size}")
    buf = bytearray(size)
    n = read_into(addr, buf)
    return bytes(buf) if n == size else bytes(memoryview(buf)[:n])


def write_memory(addr: int, data: ReadableBuffer) -> int:
    """copy_to_user: write data at addr; return how many leading bytes were written.

    A hole, a PROT_READ or PROT_NONE page stops the write there (the count is short); an address
    outside [0, 2**64) writes nothing.
    """
    with _exported(data, writable=False) as info:
        return _transfer(_process_vm_writev, info.address, addr, info.nbytes)


# --- mappings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapsLine:
    """One line of /proc/self/maps."""

    start: int
    end: int
    range_text: str  # "start-end" as printed: the mapping's name in /proc/self/map_files
    writable: bool
    shared: bool  # 's': VM_MAYSHARE, even when mapped read-only
    pgoff: int  # bytes
    dev: int
    ino: int
    path: str  # as printed: "\n" is escaped as "\012", a deleted file ends in " (deleted)"
    readable: bool = True

    @property
    def file_backed(self) -> bool:
        return self.dev != 0 or self.ino != 0  # SysV segment 0 has inode 0 on shmem's device


def parse_maps_line(line: bytes) -> MapsLine:
    """Parse "start-end perms offset maj:min inode   path" (the path may hold spaces)."""
    fields = line.split(None, 5)
    start, end = fields[0].split(b"-")
    perms = fields[1]
    major, minor = fields[3].split(b":")
    return MapsLine(
        start=int(start, 16),
        end=int(end, 16),
        range_text=fields[0].decode(),
        writable=perms[1:2] == b"w",
        shared=perms[3:4] == b"s",
        pgoff=int(fields[2], 16),
        dev=os.makedev(int(major, 16), int(minor, 16)),
        ino=int(fields[4]),
        path=os.fsdecode(fields[5]) if len(fields) > 5 else "",
        readable=perms[0:1] == b"r",
    )


def _read_maps(start: int, end: int) -> list[MapsLine]:
    """The lines of /proc/self/maps intersecting [start, end), in ascending order."""
    with open("/proc/self/maps", "rb") as f:
        text = f.read()
    found = []
    # Not splitlines(): it also splits at "\r", which a file name may hold ("\n" is escaped).
    for line in text.split(b"\n"):
        if not line:
            continue
        dash = line.index(b"-")
        if int(line[:dash], 16) >= end:
            break
        if int(line[dash + 1 : line.index(b" ")], 16) > start:
            found.append(parse_maps_line(line))
    return found


@functools.cache
def shmem_device() -> int | None:
    """The device of shmem's internal mount (memfd, shared anonymous memory, SysV shm), which
    mountinfo never lists. Fixed at boot, so probing one memfd once is safe to remember."""
    try:
        fd = os.memfd_create("kvmtag-probe", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def _mount_types() -> dict[int, str]:
    """Filesystem type by superblock device, from /proc/self/mountinfo."""
    types: dict[int, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # "id parent maj:min root mountpoint options [optional…] - fstype source super"
            fields = line.split(b" ")
            major, minor = fields[2].split(b":")
            fstype = fields[fields.index(b"-", 6) + 1]
            types.setdefault(os.makedev(int(major), int(minor)), os.fsdecode(fstype))
    return types


def _fs_magic(fd: int) -> int | None:
    buf = statfs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF  # a 32-bit magic, sign-extended on 32-bit longs


def _same_file(st: os.stat_result, m: MapsLine) -> bool:
    return st.st_dev == m.dev and st.st_ino == m.ino


class _Lookup:
    """What one find_vmas call learns about the process, each at most once and only if needed."""

    def __init__(self) -> None:
        self._mounts: dict[int, str] | None = None
        self._fds: dict[tuple[int, int], tuple[int, int]] | None = None

    def mount_type(self, dev: int) -> str | None:
        if self._mounts is None:
            self._mounts = _mount_types()
        return self._mounts.get(dev)

    def open_fds(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(st_dev, st_ino) → (fd, access mode) of our open regular files, best mode kept."""
        if self._fds is None:
            self._fds = scan_fds()
        return self._fds


def scan_fds() -> dict[tuple[int, int], tuple[int, int]]:
    """One pass over /proc/self/fd: each regular file's best descriptor, O_RDWR preferred, then
    O_RDONLY, then anything else, usable only by reopening it: O_WRONLY, O_PATH, and O_APPEND or
    O_DIRECT (a dup shares those flags, and with O_APPEND pwrite ignores its offset)."""
    rank = {os.O_RDWR: 2, os.O_RDONLY: 1}
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:  # the listing's own descriptor, or closed since by another thread
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        mode = -1 if flags & _REOPEN_FLAGS else flags & os.O_ACCMODE
        key = (st.st_dev, st.st_ino)
        if key not in best or rank.get(mode, 0) > rank.get(best[key][1], 0):
            best[key] = (fd, mode)
    return best


def _open_verified(m: MapsLine, opener: Any) -> int | None:
    """Call opener() for a new descriptor and keep it only if it is the mapping's file (an fd
    number may have been closed and reused since the scan, a mapping replaced since the read)."""
    try:
        fd = int(opener())
    except OSError:
        return None
    try:
        if _same_file(os.fstat(fd), m):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _find_fd(m: MapsLine, lookup: _Lookup) -> int | None:
    """A new descriptor (O_CLOEXEC) for a shared mapping's memory, or None (tags-only).

    Our own open descriptors first: dup one whose access suffices, else reopen it through
    /proc/self/fd (works from O_PATH, or O_RDONLY when the file permits writing). Then
    /proc/self/map_files, which needs CAP_SYS_ADMIN (checkpoint_restore_ns_capable).
    """
    need = os.O_RDWR if m.writable else os.O_RDONLY
    found = lookup.open_fds().get((m.dev, m.ino))
    if found is not None:
        fd, mode = found
        if mode == os.O_RDWR or mode == need:
            new = _open_verified(m, lambda: os.dup(fd))  # os.dup: non-inheritable
        else:
            new = _open_verified(m, lambda: os.open(f"/proc/self/fd/{fd}", need | os.O_CLOEXEC))
        if new is not None:
            return new
    path = f"/proc/self/map_files/{m.range_text}"
    return _open_verified(m, lambda: os.open(path, need | os.O_CLOEXEC))


def _device_node_kind(m: MapsLine) -> VmaKind | None:
    """ANON for a private /dev/zero mapping, OTHER for any other device node, else None."""
    if not m.path.startswith("/") or m.path.endswith(" (deleted)"):
        return None
    try:
        st = os.stat(m.path.replace("\\012", "\n"))
    except (OSError, ValueError):
        return None
    if not _same_file(st, m) or not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return None
    return VmaKind.ANON if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_ZERO else VmaKind.OTHER


def line_kind(m: MapsLine) -> VmaKind | None:
    """What the maps line alone tells (step 1 of the module docstring), or None."""
    if not m.file_backed:
        if m.path == "" or m.path.startswith(_ANON_SPECIALS):
            return VmaKind.ANON
        return VmaKind.OTHER  # [vvar], [vdso], [vsyscall], [uprobes], …
    if m.path.startswith("[anon_shmem:"):
        return VmaKind.ANON  # shared anonymous memory given a name (PR_SET_VMA_ANON_NAME)
    if m.path == "/dev/zero (deleted)" and shmem_device() in (None, m.dev):
        return VmaKind.ANON  # MAP_SHARED|MAP_ANONYMOUS: mmap_zero's shmem_zero_setup
    if m.path in ("/anon_hugepage (deleted)", "anon_hugepage"):
        return VmaKind.HUGETLBFS  # MAP_HUGETLB|MAP_ANONYMOUS, shared or private
    if not m.path.startswith("/"):
        return VmaKind.OTHER  # "anon_inode:…" and other pseudo files
    return _device_node_kind(m)


def backing_kind(m: MapsLine, lookup: _Lookup, fd: int | None) -> VmaKind:
    """The filesystem behind a file mapping (steps 2 to 4 of the module docstring)."""
    magic = None if fd is None else _fs_magic(fd)
    if magic is not None:
        return {TMPFS_MAGIC: VmaKind.SHMEM, HUGETLBFS_MAGIC: VmaKind.HUGETLBFS}.get(
            magic, VmaKind.FILE
        )
    fstype = lookup.mount_type(m.dev)
    if fstype is not None:
        return _FS_KINDS.get(fstype, VmaKind.FILE)
    if m.dev == shmem_device():
        return VmaKind.SHMEM
    if m.path.startswith(("/memfd:", "/SYSV")):
        return VmaKind.HUGETLBFS  # on an internal mount that is not shmem's: hugetlbfs's
    return VmaKind.FILE


def find_vmas(start: int, end: int) -> list[Vma]:
    """The calling process's mappings intersecting [start, end), unclipped, in ascending order.

    Each shared mapping of a file (memfd, tmpfs, hugetlbfs, shared anonymous memory, or a file
    elsewhere; never a device) carries a new O_CLOEXEC descriptor for the same memory when one
    could be had; the caller owns it (sends it, then closes it). Private mappings never do: the
    daemon's writes through it would land in the file, not in our private copy.
    """
    if start >= end:
        return []
    lookup = _Lookup()
    vmas: list[Vma] = []
    fd: int | None = None
    try:
        for m in _read_maps(start, end):
            kind = line_kind(m)
            if m.shared and m.file_backed and kind is not VmaKind.OTHER:
                fd = _find_fd(m, lookup)
            if kind is None:
                kind = backing_kind(m, lookup, fd)
            if kind is VmaKind.OTHER and fd is not None:
                os.close(fd)
                fd = None
            vma = Vma(
                m.start, m.end, kind, m.shared, m.writable, m.dev, m.ino, m.pgoff, fd, m.readable
            )
            vmas.append(vma)
            fd = None
    except BaseException:
        for owned in [fd, *(vma.fd for vma in vmas)]:
            if owned is not None:
                os.close(owned)
        raise
    return vmas
