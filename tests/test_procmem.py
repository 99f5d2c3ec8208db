"""kvmtag.procmem against the real thing: this process's own memory and mappings, no mocks.

Every mapping is made with mmap(2) through ctypes so its address is known and it can be cut
(munmap, mprotect); the fixtures unmap them and close every descriptor find_vmas hands out.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmtag import procmem
from kvmtag.usermem import Vma, VmaKind

PAGE = mmap.PAGESIZE
PROT_NONE = 0
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10  # <asm-generic/mman-common.h>, same on x86_64 and aarch64
MAP_HUGETLB = 0x40000
IPC_PRIVATE, IPC_RMID, IPC_CREAT = 0, 0, 0o1000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

ANON_RW = (VmaKind.ANON, True, True)  # kind, shared, writable
LP64 = ctypes.sizeof(ctypes.c_long) == 8
IS_ROOT = os.geteuid() == 0


def raw_mmap(
    length: int, prot: int = PROT_RW, flags: int = 0, fd: int = -1, offset: int = 0
) -> int:
    flags |= mmap.MAP_SHARED if flags & mmap.MAP_SHARED else mmap.MAP_PRIVATE
    if fd < 0:
        flags |= mmap.MAP_ANONYMOUS
    addr = libc.mmap(None, length, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


def munmap(addr: int, length: int) -> None:
    assert libc.munmap(addr, length) == 0


class Maps:
    """Mappings and descriptors a test made, undone at teardown."""

    def __init__(self) -> None:
        self.mapped: list[tuple[int, int]] = []
        self.fds: list[int] = []

    def map(
        self, length: int, prot: int = PROT_RW, flags: int = 0, fd: int = -1, offset: int = 0
    ) -> int:
        addr = raw_mmap(length, prot, flags, fd, offset)
        self.mapped.append((addr, length))
        return addr

    def isolated(
        self, length: int, prot: int = PROT_RW, flags: int = 0, fd: int = -1, offset: int = 0
    ) -> int:
        """Map between two PROT_NONE guard pages, so the kernel cannot merge the mapping
        with a neighbour (adjacent anonymous mappings with equal flags become one VMA)."""
        guard = self.map(length + 2 * PAGE, PROT_NONE)
        flags |= mmap.MAP_SHARED if flags & mmap.MAP_SHARED else mmap.MAP_PRIVATE
        flags |= MAP_FIXED | (mmap.MAP_ANONYMOUS if fd < 0 else 0)
        assert libc.mmap(guard + PAGE, length, prot, flags, fd, offset) == guard + PAGE
        return guard + PAGE

    def memfd(self, size: int, name: str = "guest-ram", flags: int = 0) -> int:
        fd = os.memfd_create(name, flags)
        self.fds.append(fd)
        os.ftruncate(fd, size)
        return fd

    def vmas(self, start: int, end: int) -> list[Vma]:
        found = procmem.find_vmas(start, end)
        self.fds += [v.fd for v in found if v.fd is not None]
        return found

    def vma(self, addr: int) -> Vma:
        (found,) = self.vmas(addr, addr + 1)
        return found

    def close(self) -> None:
        for addr, length in self.mapped:
            libc.munmap(addr, length)
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def maps() -> Iterator[Maps]:
    m = Maps()
    yield m
    m.close()


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def fs_type_name(path: Path) -> str:
    """The filesystem of path, as coreutils names it: an oracle independent of procmem."""
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def shmem_dev() -> int:
    fd = os.memfd_create("oracle")
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def maps_special(name: str) -> int | None:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(name):
                return int(line.split("-")[0], 16)
    return None


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.skipif(not LP64, reason="the layouts asserted are x86_64's and aarch64's (LP64)")
def test_struct_layouts() -> None:
    # <linux/uio.h> struct iovec
    assert ctypes.sizeof(procmem.iovec) == 16
    assert (procmem.iovec.iov_base.offset, procmem.iovec.iov_len.offset) == (0, 8)
    # glibc <bits/statfs.h> struct statfs, identical on x86_64 and aarch64
    s = procmem.statfs
    assert ctypes.sizeof(s) == 120
    offsets = [getattr(s, field[0]).offset for field in s._fields_]
    assert offsets == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88]
    # CPython <cpython/object.h> Py_buffer
    b = procmem.Py_buffer
    assert ctypes.sizeof(b) == 80
    offsets = [getattr(b, field[0]).offset for field in b._fields_]
    assert offsets == [0, 8, 16, 24, 32, 36, 40, 48, 56, 64, 72]


# --- copies -------------------------------------------------------------------------------------


def test_round_trip_through_a_bytearray() -> None:
    target = bytearray(10_000)
    addr, nbytes, writable = procmem.buffer_address(target)
    assert (nbytes, writable) == (10_000, True)
    data = pattern(9_000, 3)
    assert procmem.write_memory(addr + 500, data) == 9_000
    assert target[500:9_500] == data and not any(target[:500]) and not any(target[9_500:])
    assert procmem.read_memory(addr + 500, 9_000) == data
    assert procmem.read_memory(addr, 0) == b"" and procmem.write_memory(addr, b"") == 0


@pytest.fixture(scope="module")
def holed() -> Iterator[int]:
    """Five pages with holes at pages 1 and 4: [rw][hole][rw][rw][hole]. Page 0 holds
    pattern(PAGE, 0), pages 2-3 pattern(2 * PAGE, 2)."""
    base = raw_mmap(5 * PAGE)
    munmap(base + PAGE, PAGE)
    munmap(base + 4 * PAGE, PAGE)
    assert procmem.write_memory(base, pattern(PAGE, 0)) == PAGE
    assert procmem.write_memory(base + 2 * PAGE, pattern(2 * PAGE, 2)) == 2 * PAGE
    yield base
    # Nothing was mapped into the holes meanwhile (which would have made failures puzzling).
    assert procmem.find_vmas(base + PAGE, base + 2 * PAGE) == []
    assert procmem.find_vmas(base + 4 * PAGE, base + 5 * PAGE) == []
    munmap(base, PAGE)
    munmap(base + 2 * PAGE, 2 * PAGE)


def reachable(offset: int, size: int) -> int:
    """The length of the prefix of [offset, offset+size) in `holed` that is mapped."""
    for lo, hi in ((0, PAGE), (2 * PAGE, 4 * PAGE)):
        if lo <= offset < hi:
            return min(size, hi - offset)
    return 0


@given(offset=st.integers(0, 4 * PAGE - 1), size=st.integers(0, 3 * PAGE))
def test_read_prefix_stops_exactly_at_a_hole(holed: int, offset: int, size: int) -> None:
    got = procmem.read_memory(holed + offset, size)
    assert len(got) == reachable(offset, size)
    contents = pattern(PAGE, 0) + bytes(PAGE) + pattern(2 * PAGE, 2)
    assert got == contents[offset : offset + len(got)]
    buf = bytearray(size)
    assert procmem.read_into(holed + offset, buf) == len(got)


@given(offset=st.integers(0, 4 * PAGE - 1), size=st.integers(0, 3 * PAGE))
def test_write_prefix_stops_exactly_at_a_hole(holed: int, offset: int, size: int) -> None:
    expected = reachable(offset, size)
    before = procmem.read_memory(holed + offset, expected)
    assert procmem.write_memory(holed + offset, b"\xa5" * size) == expected
    assert procmem.read_memory(holed + offset, expected) == b"\xa5" * expected
    assert procmem.write_memory(holed + offset, before) == expected  # put it back


def test_writes_stop_at_read_only_and_inaccessible_pages(maps: Maps) -> None:
    # process_vm_writev pins pages with FOLL_WRITE and without FOLL_FORCE: protections hold.
    base = maps.map(3 * PAGE)
    procmem.write_memory(base, pattern(3 * PAGE))
    assert libc.mprotect(base + PAGE, PAGE, mmap.PROT_READ) == 0
    assert libc.mprotect(base + 2 * PAGE, PAGE, PROT_NONE) == 0
    assert procmem.write_memory(base + 100, b"\xff" * (2 * PAGE)) == PAGE - 100
    assert procmem.write_memory(base + PAGE, b"\xff") == 0
    assert procmem.read_memory(base + PAGE, PAGE) == pattern(3 * PAGE)[PAGE : 2 * PAGE]
    # a PROT_NONE page faults for reads as well
    assert len(procmem.read_memory(base, 3 * PAGE)) == 2 * PAGE
    assert procmem.write_memory(base + 2 * PAGE, b"\xff") == 0
    # a whole PROT_READ mapping, private and anonymous
    ro = maps.map(PAGE, mmap.PROT_READ)
    assert procmem.write_memory(ro, b"x" * 16) == 0
    assert procmem.read_memory(ro, 16) == bytes(16)


def test_writes_stop_at_a_read_only_shared_file_mapping(maps: Maps) -> None:
    fd = maps.memfd(PAGE)
    os.pwrite(fd, b"original", 0)
    ro = maps.map(PAGE, mmap.PROT_READ, mmap.MAP_SHARED, fd)
    assert procmem.write_memory(ro, b"changed!") == 0
    assert os.pread(fd, 8, 0) == b"original"
    assert procmem.read_memory(ro, 8) == b"original"


@pytest.mark.parametrize(
    "addr",
    [0, 16, -1, -PAGE, -(2**70), 2**64, 2**64 + PAGE, 2**100, 2**64 - 1, 2**64 - 8, 2**63],
)
def test_addresses_outside_user_memory_are_faults_not_errors(addr: int) -> None:
    assert procmem.read_memory(addr, 16) == b""
    assert procmem.read_memory(addr, 0) == b""
    assert procmem.read_into(addr, bytearray(16)) == 0
    assert procmem.write_memory(addr, b"x" * 16) == 0


def test_special_mappings_gup_cannot_reach_read_as_faults() -> None:
    """[vvar] (VM_PFNMAP) and [vsyscall] are readable by loads but not by get_user_pages."""
    for name in ("[vvar]", "[vsyscall]"):
        addr = maps_special(name)
        if addr is not None:
            assert procmem.read_memory(addr, 16) == b"", name
    vdso = maps_special("[vdso]")
    if vdso is not None:
        assert procmem.read_memory(vdso, 4) == b"\x7fELF"


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        procmem.read_memory(0x1000, -1)


def test_large_copies_loop_over_calls(maps: Maps, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the per-call limit (normally 1 GiB) so that 64 pages take 20 unaligned calls.
    monkeypatch.setattr(procmem, "_MAX_CALL", 3 * PAGE + 123)
    base = maps.map(64 * PAGE)
    data = pattern(64 * PAGE, 9)
    assert procmem.write_memory(base, data) == 64 * PAGE
    assert procmem.read_memory(base, 64 * PAGE) == data
    munmap(base + 40 * PAGE, PAGE)
    assert procmem.read_memory(base + 5, 64 * PAGE) == data[5 : 40 * PAGE]
    assert procmem.write_memory(base + 5, data) == 40 * PAGE - 5


def test_one_iovec_per_page_finds_the_fault(maps: Maps) -> None:
    """The fallback for kernels that keep to the man page (no partial transfer inside an
    iovec): after a fault, one call with a remote iovec per page."""
    base = maps.map(8 * PAGE)
    munmap(base + 6 * PAGE, PAGE)
    out = bytearray(8 * PAGE)
    with procmem._exported(out, writable=True) as local:
        got = procmem._transfer_paged(procmem._process_vm_readv, local.address, base + 7, 8 * PAGE)
    assert got == 6 * PAGE - 7
    # at most IOV_MAX pages per call
    big = maps.map((procmem.IOV_MAX + 2) * PAGE)
    out = bytearray((procmem.IOV_MAX + 2) * PAGE)
    with procmem._exported(out, writable=True) as local:
        got = procmem._transfer_paged(procmem._process_vm_readv, local.address, big, len(out))
    assert got == procmem.IOV_MAX * PAGE


# --- buffers ------------------------------------------------------------------------------------


def test_buffer_address_of_every_kind_of_buffer(tmp_path: Path) -> None:
    data = pattern(300, 5)
    backing = bytearray(data)
    anon = mmap.mmap(-1, PAGE)
    anon[:300] = data
    path = tmp_path / "ro"
    path.write_bytes(data)
    with open(path, "rb") as f:
        ro_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    carr = (ctypes.c_char * 300).from_buffer_copy(data)
    cases: list[tuple[procmem.ReadableBuffer, bool]] = [
        (bytes(data), False),
        (backing, True),
        (memoryview(backing)[7:], True),
        (memoryview(backing).toreadonly(), False),
        (memoryview(backing).cast("H"), True),
        (anon, True),
        (ro_map, False),
        (carr, True),
    ]
    for buf, writable in cases:
        info = procmem.buffer_address(buf)
        assert info.writable is writable, buf
        assert info.nbytes == memoryview(buf).nbytes
        assert procmem.read_memory(info.address, info.nbytes) == bytes(buf)
    assert procmem.buffer_address(memoryview(backing)[7:]).address == (
        procmem.buffer_address(backing).address + 7
    )
    assert procmem.buffer_address(carr).address == ctypes.addressof(carr)
    anon.close()  # no export is left behind: closing an exported mmap would raise BufferError
    ro_map.close()


def test_buffer_address_rejects_what_is_not_a_contiguous_buffer() -> None:
    with pytest.raises(TypeError):
        procmem.buffer_address(5)  # type: ignore[arg-type]  # the error is the point
    with pytest.raises(BufferError):
        procmem.buffer_address(memoryview(bytearray(10))[::2])


def test_read_into_fills_the_buffer_in_place(maps: Maps) -> None:
    base = maps.map(PAGE)
    procmem.write_memory(base, pattern(PAGE))
    target = bytearray(b"." * 20)
    assert procmem.read_into(base, memoryview(target)[3:10]) == 7
    assert target == b"..." + pattern(7) + b"." * 10
    mm = mmap.mmap(-1, PAGE)
    assert procmem.read_into(base, mm) == PAGE and mm[:] == pattern(PAGE)
    mm.close()
    with pytest.raises(BufferError):
        procmem.read_into(base, b"immutable")  # type: ignore[arg-type]  # the error is the point


# --- mappings: parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b"7f52797ba000-7f52797bc000 rw-s 00001000 00:01 27"
            b"                         /memfd:with space\\012and newline (deleted)",
            (0x7F52797BA000, 0x7F52797BC000, True, True, 0x1000, os.makedev(0, 1), 27,
             "/memfd:with space\\012and newline (deleted)"),
        ),
        (
            b"55a2a9186000-55a2a9188000 r--p 00000000 fe:00 260386   /usr/bin/head",
            (0x55A2A9186000, 0x55A2A9188000, False, False, 0, os.makedev(254, 0), 260386,
             "/usr/bin/head"),
        ),
        (
            b"7eff2c5c7000-7eff2c60e000 rw-p 00000000 00:00 0 ",
            (0x7EFF2C5C7000, 0x7EFF2C60E000, True, False, 0, 0, 0, ""),
        ),
        (
            b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
            (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, False, False, 0, 0, 0, "[vsyscall]"),
        ),
        (
            b"7f0000000000-7f0000001000 r--s 00000000 103:1a 5 /data/file\rwith cr",
            (0x7F0000000000, 0x7F0000001000, False, True, 0, os.makedev(0x103, 0x1A), 5,
             "/data/file\rwith cr"),
        ),
    ],
)  # fmt: skip
def test_parse_maps_line(line: bytes, expected: tuple[object, ...]) -> None:
    m = procmem.parse_maps_line(line)
    assert (m.start, m.end, m.writable, m.shared, m.pgoff, m.dev, m.ino, m.path) == expected
    assert m.range_text == line.split(b" ")[0].decode()


def unmounted_internal_dev() -> int:
    """A device number no mount of ours uses and that is not shmem's: like hugetlbfs's internal
    mounts, which mountinfo never lists."""
    used = set(procmem._mount_types()) | {shmem_dev()}
    return next(os.makedev(0, n) for n in range(200, 10_000) if os.makedev(0, n) not in used)


def test_hugetlbfs_lines_as_observed_with_huge_pages() -> None:
    """Lines copied from this kernel (6.18) with vm.nr_hugepages=4, classified by the real
    classifier with the real mount table (CI machines have no huge pages to map)."""
    dev = unmounted_internal_dev()
    major, minor = os.major(dev), os.minor(dev)
    lookup = procmem._Lookup()
    for perms, path in [
        ("rw-s", "/anon_hugepage (deleted)"),  # MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB
        ("rw-p", "/anon_hugepage (deleted)"),  # MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB
        ("rw-p", "/memfd:huge (deleted)"),  # memfd_create(MFD_HUGETLB), mapped private
        ("rw-s", "/SYSV00000000 (deleted)"),  # shmget(SHM_HUGETLB)
    ]:
        line = f"7eff2b200000-7eff2b400000 {perms} 00000000 {major:02x}:{minor:02x} 17038 {path}"
        m = procmem.parse_maps_line(line.encode())
        kind = procmem.line_kind(m) or procmem.backing_kind(m, lookup, None)
        assert kind is VmaKind.HUGETLBFS, line


# --- mappings: real ones ------------------------------------------------------------------------


def test_anonymous_private(maps: Maps) -> None:
    base = maps.isolated(4 * PAGE)
    vma = maps.vma(base + 2 * PAGE)  # unclipped: the whole mapping comes back
    assert vma == Vma(base, base + 4 * PAGE, VmaKind.ANON, False, True, 0, 0, 0, None)


def test_anonymous_shared_is_shmem_with_an_inode(maps: Maps) -> None:
    a = maps.map(2 * PAGE, flags=mmap.MAP_SHARED)
    b = maps.map(2 * PAGE, flags=mmap.MAP_SHARED)
    va, vb = maps.vma(a), maps.vma(b)
    assert (va.start, va.end, va.kind, va.shared, va.writable) == (a, a + 2 * PAGE, *ANON_RW)
    assert va.dev == shmem_dev() and va.ino != 0 and va.pgoff == 0
    assert (vb.dev, vb.ino) != (va.dev, va.ino)  # two MAP_SHARED|MAP_ANONYMOUS, two objects
    if IS_ROOT:  # found only through /proc/self/map_files
        assert va.fd is not None
        procmem.write_memory(a + PAGE, b"shared anon")
        assert os.pread(va.fd, 11, PAGE) == b"shared anon"
        assert os.get_inheritable(va.fd) is False
    else:
        assert va.fd is None


def test_memfd_shared(maps: Maps) -> None:
    fd = maps.memfd(4 * PAGE)
    st_ = os.fstat(fd)
    addr = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd, offset=PAGE)
    vma = maps.vma(addr)
    assert vma == Vma(
        addr, addr + 2 * PAGE, VmaKind.SHMEM, True, True, st_.st_dev, st_.st_ino, PAGE, vma.fd
    )
    assert vma.fd is not None and vma.fd != fd and not os.get_inheritable(vma.fd)
    # the descriptor reaches the very memory of the mapping, both ways
    procmem.write_memory(addr + 100, b"through the mapping")
    assert os.pread(vma.fd, 19, vma.pgoff + 100) == b"through the mapping"
    os.pwrite(vma.fd, b"through the fd", vma.pgoff + PAGE)
    assert procmem.read_memory(addr + PAGE, 14) == b"through the fd"


def test_two_mappings_of_one_memfd_are_one_memory(maps: Maps) -> None:
    fd = maps.memfd(4 * PAGE)
    a = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd)
    b = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd, offset=2 * PAGE)
    c = maps.map(PAGE, mmap.PROT_READ, flags=mmap.MAP_SHARED, fd=fd, offset=PAGE)
    va, vb, vc = maps.vma(a), maps.vma(b), maps.vma(c)
    assert (va.dev, va.ino) == (vb.dev, vb.ino) == (vc.dev, vc.ino)
    assert (va.pgoff, vb.pgoff, vc.pgoff) == (0, 2 * PAGE, PAGE)
    assert vc.writable is False and vc.fd is not None  # read-only, still shared
    procmem.write_memory(a + PAGE, b"alias")
    assert procmem.read_memory(c, 5) == b"alias"
    assert procmem.write_memory(c, b"nope") == 0


def test_private_mappings_never_get_a_descriptor(maps: Maps, tmp_path: Path) -> None:
    fd = maps.memfd(2 * PAGE)
    os.pwrite(fd, b"file data", 0)
    addr = maps.map(2 * PAGE, flags=0, fd=fd)
    vma = maps.vma(addr)
    ino = os.fstat(fd).st_ino
    assert (vma.kind, vma.shared, vma.fd, vma.ino) == (VmaKind.SHMEM, False, None, ino)
    # the private copy is ours alone: a write through it does not reach the file
    procmem.write_memory(addr, b"our copy!")
    assert os.pread(fd, 9, 0) == b"file data"
    path = tmp_path / "private"
    path.write_bytes(bytes(2 * PAGE))
    pfd = os.open(path, os.O_RDWR)
    maps.fds.append(pfd)
    vma = maps.vma(maps.map(PAGE, flags=0, fd=pfd, offset=PAGE))
    assert (vma.kind, vma.shared, vma.fd, vma.pgoff) == (VmaKind.FILE, False, None, PAGE)


@pytest.mark.skipif(not IS_ROOT, reason="/proc/self/map_files needs CAP_SYS_ADMIN")
def test_memfd_closed_after_mmap_is_found_through_map_files(maps: Maps) -> None:
    fd = os.memfd_create("closed-after-mmap")
    os.ftruncate(fd, 2 * PAGE)
    ino = os.fstat(fd).st_ino
    addr = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd)
    os.close(fd)
    vma = maps.vma(addr)
    assert vma.kind is VmaKind.SHMEM and vma.ino == ino and vma.fd is not None
    assert os.fstat(vma.fd).st_ino == ino and not os.get_inheritable(vma.fd)
    procmem.write_memory(addr + PAGE, b"via map_files")
    assert os.pread(vma.fd, 13, PAGE) == b"via map_files"


def test_memfd_named_with_space_and_newline(maps: Maps) -> None:
    fd = maps.memfd(PAGE, name="a b\nc (deleted)")
    vma = maps.vma(maps.map(PAGE, flags=mmap.MAP_SHARED, fd=fd))
    assert (vma.kind, vma.ino) == (VmaKind.SHMEM, os.fstat(fd).st_ino) and vma.fd is not None


def test_file_in_tmp_path(maps: Maps, tmp_path: Path) -> None:
    fstype = fs_type_name(tmp_path)
    print(f"tmp_path {tmp_path} is on {fstype}")
    expected = VmaKind.SHMEM if fstype == "tmpfs" else VmaKind.FILE
    path = tmp_path / "guest.img"
    path.write_bytes(bytes(3 * PAGE))
    fd = os.open(path, os.O_RDWR)
    maps.fds.append(fd)
    st_ = os.fstat(fd)
    addr = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd, offset=PAGE)
    vma = maps.vma(addr)
    assert (vma.kind, vma.shared, vma.writable, vma.dev, vma.ino, vma.pgoff) == (
        expected,
        True,
        True,
        st_.st_dev,
        st_.st_ino,
        PAGE,
    )
    assert vma.fd is not None
    procmem.write_memory(addr + 10, b"file-backed")
    assert os.pread(vma.fd, 11, PAGE + 10) == b"file-backed"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_file_in_dev_shm_is_shmem(maps: Maps) -> None:
    assert fs_type_name(Path("/dev/shm")) == "tmpfs"
    path = Path("/dev/shm") / f"kvmtag-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 2 * PAGE)
        shared = maps.map(PAGE, flags=mmap.MAP_SHARED, fd=fd)
        private = maps.map(PAGE, flags=0, fd=fd, offset=PAGE)
        vs, vp = maps.vma(shared), maps.vma(private)
        assert (vs.kind, vs.shared, vs.ino) == (VmaKind.SHMEM, True, os.fstat(fd).st_ino)
        assert vs.fd is not None
        procmem.write_memory(shared, b"tmpfs")
        assert os.pread(vs.fd, 5, 0) == b"tmpfs"
        assert (vp.kind, vp.shared, vp.fd, vp.pgoff) == (VmaKind.SHMEM, False, None, PAGE)
    finally:
        os.close(fd)
        path.unlink()


@pytest.mark.parametrize(
    "flags", [os.O_RDONLY, os.O_PATH, os.O_RDWR | os.O_APPEND], ids=["rdonly", "path", "append"]
)
def test_a_descriptor_unfit_for_the_mapping_is_reopened(maps: Maps, flags: int) -> None:
    """The only descriptor left cannot serve a writable mapping as it is: read-only, O_PATH, or
    O_APPEND (pwrite through a dup would append). find_vmas reopens it through /proc/self/fd.
    (As root, map_files would also do: the unprivileged child below checks this path alone.)"""
    fd = os.memfd_create("reopen-me")
    os.ftruncate(fd, 2 * PAGE)
    addr = maps.map(2 * PAGE, flags=mmap.MAP_SHARED, fd=fd)
    maps.fds.append(os.open(f"/proc/self/fd/{fd}", flags))
    os.close(fd)
    vma = maps.vma(addr)
    assert vma.fd is not None
    status = fcntl.fcntl(vma.fd, fcntl.F_GETFL)
    assert status & os.O_ACCMODE == os.O_RDWR and not status & (os.O_APPEND | os.O_PATH)
    os.pwrite(vma.fd, b"at page 1", PAGE)
    assert procmem.read_memory(addr + PAGE, 9) == b"at page 1"


def test_private_dev_zero_is_anonymous(maps: Maps) -> None:
    fd = os.open("/dev/zero", os.O_RDWR)
    maps.fds.append(fd)
    addr = maps.map(PAGE, flags=0, fd=fd)
    vma = maps.vma(addr)
    st_ = os.stat("/dev/zero")
    assert stat.S_ISCHR(st_.st_mode)
    assert (vma.kind, vma.shared, vma.fd, vma.ino) == (VmaKind.ANON, False, None, st_.st_ino)


def test_sysv_shm_is_shmem_with_its_id_as_inode(maps: Maps) -> None:
    shmid = libc.shmget(IPC_PRIVATE, 2 * PAGE, IPC_CREAT | 0o600)
    if shmid < 0:
        pytest.skip(f"shmget: {os.strerror(ctypes.get_errno())}")
    addr = libc.shmat(shmid, None, 0)
    libc.shmctl(shmid, IPC_RMID, None)  # destroyed at the last detach
    assert addr not in (None, MAP_FAILED)
    try:
        vma = maps.vma(addr)
        assert (vma.kind, vma.shared, vma.dev, vma.ino) == (VmaKind.SHMEM, True, shmem_dev(), shmid)
        if IS_ROOT:
            assert vma.fd is not None
            procmem.write_memory(addr, b"sysv")
            assert os.pread(vma.fd, 4, 0) == b"sysv"
    finally:
        libc.shmdt(addr)


def test_special_mappings() -> None:
    stack, vdso, vvar = maps_special("[stack]"), maps_special("[vdso]"), maps_special("[vvar]")
    assert stack is not None
    assert procmem.find_vmas(stack, stack + 1)[0].kind is VmaKind.ANON
    for addr in (vdso, vvar):
        if addr is not None:
            (vma,) = procmem.find_vmas(addr, addr + 1)
            assert (vma.kind, vma.shared, vma.fd) == (VmaKind.OTHER, False, None)


def test_holes_are_omitted_and_order_is_ascending(maps: Maps) -> None:
    base = maps.isolated(3 * PAGE)
    munmap(base + PAGE, PAGE)
    assert libc.mprotect(base + 2 * PAGE, PAGE, mmap.PROT_READ) == 0
    found = maps.vmas(base, base + 3 * PAGE)
    assert [(v.start, v.end, v.writable) for v in found] == [
        (base, base + PAGE, True),
        (base + 2 * PAGE, base + 3 * PAGE, False),
    ]
    assert maps.vmas(base + PAGE, base + 2 * PAGE) == []
    assert procmem.find_vmas(base, base) == [] and procmem.find_vmas(base + PAGE, base) == []


def test_descriptors_are_scanned_once_and_only_when_needed(
    maps: Maps, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = procmem.scan_fds

    def counting() -> dict[tuple[int, int], tuple[int, int]]:
        calls.append(1)
        return real()

    monkeypatch.setattr(procmem, "scan_fds", counting)
    fd = maps.memfd(4 * PAGE)
    region = maps.map(4 * PAGE, PROT_NONE)  # reserve 4 adjacent pages, then map over them
    for i, kind in enumerate([mmap.MAP_PRIVATE, mmap.MAP_SHARED] * 2):
        at = region + i * PAGE
        assert libc.mmap(at, PAGE, PROT_RW, kind | MAP_FIXED, fd, i * PAGE) == at
    found = maps.vmas(region, region + 4 * PAGE)
    assert [v.shared for v in found] == [False, True, False, True]
    assert [v.fd is not None for v in found] == [False, True, False, True]
    assert len(calls) == 1
    maps.vmas(region, region + PAGE)
    maps.vmas(region + 2 * PAGE, region + 3 * PAGE)
    assert len(calls) == 1  # private mappings need no scan


def free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(free_huge_pages() < 2, reason="no free huge pages (vm.nr_hugepages)")
def test_hugetlb_mappings(maps: Maps) -> None:
    huge = 2 << 20
    anon = maps.map(huge, flags=MAP_HUGETLB)
    assert maps.vma(anon).kind is VmaKind.HUGETLBFS
    fd = maps.memfd(huge, flags=os.MFD_HUGETLB)
    shared = maps.map(huge, flags=mmap.MAP_SHARED, fd=fd)
    vma = maps.vma(shared)
    assert (vma.kind, vma.shared, vma.ino) == (VmaKind.HUGETLBFS, True, os.fstat(fd).st_ino)
    assert vma.fd is not None


# --- the unprivileged path ----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import ctypes, errno, fcntl, json, mmap, os
    from kvmtag import procmem

    if os.geteuid() == 0:  # drop root before any mapping exists
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]

    def shared(fd, flags=mmap.MAP_SHARED):
        return libc.mmap(None, 2 * PAGE, 3, flags, fd, 0)

    def describe(addr):
        (vma,) = procmem.find_vmas(addr, addr + 1)
        out = {"kind": vma.kind.value, "shared": vma.shared, "fd": vma.fd is not None}
        if vma.fd is not None:
            procmem.write_memory(addr + 8, b"seen")
            out["same_memory"] = os.pread(vma.fd, 4, 8) == b"seen"
            out["new_fd"] = vma.fd not in (kept,)
            os.close(vma.fd)
        return out

    def reopened(flags):
        fd = os.memfd_create("reopened")
        os.ftruncate(fd, 2 * PAGE)
        addr = shared(fd)
        left = os.open(f"/proc/self/fd/{fd}", flags)  # the only descriptor left
        os.close(fd)
        (vma,) = procmem.find_vmas(addr, addr + 1)
        if vma.fd is None:
            return None
        mode = fcntl.fcntl(vma.fd, fcntl.F_GETFL) & os.O_ACCMODE
        procmem.write_memory(addr, b"reopened")
        same = os.pread(vma.fd, 8, 0) == b"reopened"
        os.close(vma.fd)
        os.close(left)
        return {"rdwr": mode == os.O_RDWR, "same_memory": same}

    kept = os.memfd_create("kept")
    os.ftruncate(kept, 2 * PAGE)
    closed = os.memfd_create("closed")
    os.ftruncate(closed, 2 * PAGE)
    a, b = shared(kept), shared(closed)
    os.close(closed)
    anon = shared(-1, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    result = {
        "uid": os.geteuid(),
        "kept": describe(a),
        "closed": describe(b),
        "anon_shared": describe(anon),
        "from_rdonly": reopened(os.O_RDONLY),
        "from_path": reopened(os.O_PATH),
        "copies": procmem.write_memory(a, b"x" * 100) == 100
        and procmem.read_memory(a, 100) == b"x" * 100,
    }
    try:
        os.close(os.open(f"/proc/self/map_files/{b:x}-{b + 2 * PAGE:x}", os.O_RDWR))
        result["map_files"] = "opened"
    except OSError as e:
        result["map_files"] = errno.errorcode[e.errno]
    print(json.dumps(result))
    """
)


def test_unprivileged_process_finds_open_fds_but_not_closed_ones() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["uid"] != 0
    assert result["map_files"] == "EPERM"  # map_files wants CAP_SYS_ADMIN
    assert result["kept"] == {
        "kind": "shmem",
        "shared": True,
        "fd": True,
        "same_memory": True,
        "new_fd": True,
    }
    assert result["closed"] == {"kind": "shmem", "shared": True, "fd": False}
    assert result["anon_shared"] == {"kind": "anon", "shared": True, "fd": False}
    reopened = {"rdwr": True, "same_memory": True}  # map_files refused: /proc/self/fd it is
    assert result["from_rdonly"] == result["from_path"] == reopened
    assert result["copies"] is True


def test_exports_are_released() -> None:
    target = bytearray(16)
    assert procmem.read_into(2**70, target) == 0
    assert procmem.write_memory(0, target) == 0
    with pytest.raises(TypeError):
        procmem.read_into(0, 5)  # type: ignore[arg-type]  # the error is the point
    target.extend(b"resizable again")  # a held export would make this raise BufferError
