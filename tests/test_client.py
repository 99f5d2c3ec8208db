"""kvmtag.client's contract (issue 3), each test against a real kvmtagd subprocess.

The client stands in for open("/dev/kvm") and ioctl(2): real fds, the kernel's results and
errnos, pointers that are addresses in this process (a fault is EFAULT or a partial result,
never a crash of the caller), dup, threads and fork as with a kernel file, and guest RAM of
every kind found through /proc/self/maps. Tests share the session kvmtagd (fresh connections
each) unless they need a daemon of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import random
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmtag import client, procmem, uapi, wire
from kvmtag.uapi import LAYOUT
from kvmtag.usermem import VmaKind

from .conftest import running_kvmtagd

PAGE = 4096  # the page size of every kvmtagd used here (the default; test_info checks it)
TPP = PAGE // 16  # tags per page in the ioctl's format, one per byte
GPA = 0x1000_0000  # guest physical address of slot 0
GPA2 = 0x2000_0000
TO, FROM = uapi.KVM_ARM_TAGS_TO_GUEST, uapi.KVM_ARM_TAGS_FROM_GUEST
COPY_TAGS = uapi.KVM_ARM_MTE_COPY_TAGS
TIMEOUT = 30  # seconds after which a child process or a thread has hung
TOP_PAGE = 2**64 - PAGE  # the last page of the address space: kernel space on arm64
NOBODY = 65534
PROT_NONE = 0  # not in the mmap module

_NIBBLES = bytes(i & 15 for i in range(256))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# --- structs and small helpers ----------------------------------------------------------------


def tags_of(n: int, seed: int) -> bytes:
    """n tags (one per byte, 0..15), reproducible from seed."""
    return random.Random(seed).randbytes(n).translate(_NIBBLES)


def enable_cap(cap: int, flags: int = 0, arg0: int = 0) -> bytes:
    return LAYOUT["kvm_enable_cap"].pack(cap, flags, arg0, 0, 0, 0, bytes(64))


def region(slot: int, gpa: int, size: int, uaddr: int, flags: int = 0) -> bytes:
    return LAYOUT["kvm_userspace_memory_region"].pack(slot, flags, gpa, size, uaddr)


def copy_tags(gpa: int, length: int, addr: int, flags: int) -> bytes:
    return LAYOUT["kvm_arm_copy_mte_tags"].pack(gpa, length, addr, flags, 0, 0)


def address_of(buf: Any) -> int:
    return procmem.buffer_address(buf).address


def outcome(call: Callable[[], int]) -> int:
    """The call's result, or minus the errno of the OSError it raised (the kernel's style)."""
    try:
        return call()
    except OSError as e:
        assert e.errno, e
        return -e.errno


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


def protect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def peer_pid(fd: int) -> int:
    """The pid of the process at the other end of a Unix socket fd (SO_PEERCRED)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    finally:
        sock.close()
    return int(struct.unpack("3i", creds)[0])


def daemon_fds(pid: int) -> list[os.stat_result]:
    """What the daemon's descriptors refer to."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.stat(f"/proc/{pid}/fd/{name}"))
    return found


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll for a state the daemon reaches asynchronously (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class Vmm:
    """What a VMM holds: kvmtag fds, guest RAM and tag buffers, all released by finish()."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.fds: list[int] = []  # kvmtag fds and their dups
        self._files: list[int] = []
        self._maps: list[mmap.mmap] = []

    def open(self) -> int:
        fd = client.open("/dev/kvm", socket=self.socket_path)
        self.fds.append(fd)
        return fd

    def ioctl(self, fd: int, request: int, arg: int | bytes | bytearray = 0) -> int:
        result = client.ioctl(fd, request, arg)
        if request in (uapi.KVM_CREATE_VM, uapi.KVM_CREATE_VCPU):
            self.fds.append(result)
        return result

    def dup(self, fd: int, to: int | None = None) -> int:
        new = os.dup(fd) if to is None else os.dup2(fd, to)
        self.fds.append(new)
        return new

    def close(self, fd: int) -> None:
        self.fds.remove(fd)
        client.close(fd)

    def vm(self, kvm: int | None = None, *, mte: bool = True) -> int:
        vm = self.ioctl(self.open() if kvm is None else kvm, uapi.KVM_CREATE_VM, 0)
        if mte:
            assert self.ioctl(vm, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE)) == 0
        return vm

    def memfd(self, size: int) -> int:
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._files.append(fd)
        return fd

    def disk_file(self, directory: Path, size: int) -> int:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
        os.ftruncate(fd, size)
        self._files.append(fd)
        return fd

    def map(self, size: int, fd: int = -1, flags: int = mmap.MAP_SHARED, offset: int = 0) -> int:
        m = mmap.mmap(fd, size, flags, offset=offset)
        self._maps.append(m)
        return address_of(m)

    def map_kind(self, kind: str, size: int, directory: Path) -> int:
        """Guest RAM of one kind: memfd, memfd-private, anon, anon-shared, file, file-private."""
        if kind == "anon":
            return self.map(size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if kind == "anon-shared":
            return self.map(size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        fd = self.disk_file(directory, size) if kind.startswith("file") else self.memfd(size)
        return self.map(size, fd, mmap.MAP_PRIVATE if kind.endswith("private") else mmap.MAP_SHARED)

    def ram(self, vm: int, npages: int, *, slot: int = 0, gpa: int = GPA, flags: int = 0) -> int:
        """A memfd, mapped shared, as memslot `slot`; returns its address."""
        uaddr = self.map(npages * PAGE, self.memfd(npages * PAGE))
        assert (
            self.ioctl(
                vm, uapi.KVM_SET_USER_MEMORY_REGION, region(slot, gpa, npages * PAGE, uaddr, flags)
            )
            == 0
        )
        return uaddr

    def buffer(self, data: bytes | int) -> int:
        """Private anonymous memory holding data (or that many zero bytes)."""
        size = data if isinstance(data, int) else len(data)
        m = mmap.mmap(-1, max(size, 1), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if not isinstance(data, int):
            m[:size] = data
        self._maps.append(m)
        return address_of(m)

    def to_guest(self, vm: int, gpa: int, tags: bytes) -> int:
        length = len(tags) // TPP * PAGE
        return client.ioctl(vm, COPY_TAGS, copy_tags(gpa, length, self.buffer(tags), TO))

    def from_guest(self, vm: int, gpa: int, npages: int) -> bytes:
        out = self.buffer(npages * TPP)
        assert (
            client.ioctl(vm, COPY_TAGS, copy_tags(gpa, npages * PAGE, out, FROM)) == npages * PAGE
        )
        return ctypes.string_at(out, npages * TPP)

    def finish(self) -> None:
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):
                client.close(fd)
        for fd in self._files:
            os.close(fd)
        for m in self._maps:
            m.close()


@pytest.fixture
def vmm(kvmtagd: str) -> Iterator[Vmm]:
    v = Vmm(kvmtagd)
    yield v
    v.finish()


@pytest.fixture(params=[True, False], ids=["shared window", "socket"])
def bulk_vmm(
    kvmtagd: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Vmm]:
    """A VMM whose bulk copies go through the shared window, or (protocol 1.0) the socket."""
    monkeypatch.setattr(client, "SHARED_WINDOW", request.param)
    v = Vmm(kvmtagd)
    yield v
    v.finish()


# --- open() -----------------------------------------------------------------------------------


def test_open_returns_a_socket_fd_serving_dev_kvm(vmm: Vmm) -> None:
    kvm = vmm.open()
    assert stat.S_ISSOCK(os.fstat(kvm).st_mode)
    assert client.ioctl(kvm, uapi.KVM_GET_API_VERSION) == uapi.KVM_API_VERSION


def test_info(vmm: Vmm) -> None:
    kvm = vmm.open()
    vm = vmm.vm(kvm, mte=False)
    vcpu = vmm.ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
    for fd, kind in ((kvm, wire.FdKind.SYSTEM), (vm, wire.FdKind.VM), (vcpu, wire.FdKind.VCPU)):
        hello = client.info(fd)
        assert (hello.fd_kind, hello.page_size, hello.profile) == (kind, PAGE, "latest")
        assert (hello.major, hello.errno) == (wire.VERSION[0], 0)


@pytest.mark.parametrize("path", ["/dev/kvm0", "/dev/null", "kvm", "/dev/kvm/", ""])
def test_open_refuses_any_other_device_path(kvmtagd: str, path: str) -> None:
    with pytest.raises(FileNotFoundError):
        client.open(path, socket=kvmtagd)


def test_kvmtag_device_changes_the_accepted_path(
    kvmtagd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMTAG_DEVICE", "/dev/kvmtag0")
    with pytest.raises(FileNotFoundError):
        client.open("/dev/kvm", socket=kvmtagd)
    for path in ("/dev/kvmtag0", Path("/dev/kvmtag0")):
        fd = client.open(path, socket=kvmtagd)
        try:
            assert client.ioctl(fd, uapi.KVM_GET_API_VERSION) == uapi.KVM_API_VERSION
        finally:
            client.close(fd)


def _daemon_of(fd: int) -> int:
    try:
        return peer_pid(fd)
    finally:
        client.close(fd)


def test_socket_argument_then_kvmtag_socket_then_xdg_runtime_dir(
    kvmtagd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session_pid = _daemon_of(client.open(socket=kvmtagd))
    runtime = tmp_path / "runtime"
    (runtime / "kvmtag").mkdir(parents=True)
    with running_kvmtagd(runtime / "kvmtag") as (path, proc):
        assert path == str(runtime / "kvmtag" / "kvm.sock")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        monkeypatch.delenv("KVMTAG_SOCKET", raising=False)
        assert _daemon_of(client.open()) == proc.pid  # $XDG_RUNTIME_DIR/kvmtag/kvm.sock
        monkeypatch.setenv("KVMTAG_SOCKET", kvmtagd)
        assert _daemon_of(client.open()) == session_pid  # $KVMTAG_SOCKET first
        assert _daemon_of(client.open(socket=path)) == proc.pid  # the argument before all
        monkeypatch.setenv("KVMTAG_SOCKET", str(tmp_path / "absent.sock"))
        assert _daemon_of(client.open(socket=Path(kvmtagd))) == session_pid


@pytest.mark.parametrize("state", ["absent", "stale"])
def test_open_names_the_socket_it_could_not_reach(tmp_path: Path, state: str) -> None:
    path = tmp_path / "kvm.sock"
    if state == "stale":  # a socket file nobody listens on
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.close()
    with pytest.raises(OSError) as info:
        client.open(socket=path)
    expected = FileNotFoundError if state == "absent" else ConnectionRefusedError
    assert isinstance(info.value, expected)
    assert str(path) in str(info.value), f"the message does not say which socket: {info.value}"


def test_open_without_any_socket_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if Path("/run/kvmtag/kvm.sock").exists():
        pytest.skip("a system kvmtagd listens on /run/kvmtag/kvm.sock")
    monkeypatch.delenv("KVMTAG_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        client.open()
    assert "KVMTAG_SOCKET" in str(info.value)
    assert str(tmp_path / "kvmtag" / "kvm.sock") in str(info.value)


@pytest.mark.parametrize(
    ("flags", "inheritable"),
    [(None, False), (os.O_RDWR | os.O_CLOEXEC, False), (os.O_RDWR, True)],
    ids=["default", "O_CLOEXEC", "no O_CLOEXEC"],
)
def test_open_honours_o_cloexec(kvmtagd: str, flags: int | None, inheritable: bool) -> None:
    fd = (
        client.open(socket=kvmtagd)
        if flags is None
        else client.open("/dev/kvm", flags, socket=kvmtagd)
    )
    try:
        assert os.get_inheritable(fd) is inheritable
        assert client.ioctl(fd, uapi.KVM_GET_API_VERSION) == uapi.KVM_API_VERSION
    finally:
        client.close(fd)


# --- ioctl(): results and errnos ---------------------------------------------------------------


def test_ioctl_returns_the_kernels_results(vmm: Vmm) -> None:
    kvm = vmm.open()
    assert client.ioctl(kvm, uapi.KVM_GET_API_VERSION) == 12
    assert client.ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE) == 2 * PAGE
    assert client.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_VM_IPA_SIZE) == 48
    vm = vmm.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    assert vm >= 0 and vm != kvm
    assert client.ioctl(vm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE) == 1
    assert client.ioctl(vm, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE)) == 0
    vmm.ram(vm, 8)
    assert vmm.to_guest(vm, GPA, tags_of(8 * TPP, 1)) == 8 * PAGE
    vcpu = vmm.ioctl(vm, uapi.KVM_CREATE_VCPU, 3)
    assert vcpu >= 0 and vcpu not in (kvm, vm)


@pytest.mark.parametrize(
    ("fd", "request_", "arg", "expected"),
    [
        ("kvm", uapi.KVM_GET_API_VERSION, 1, errno.EINVAL),
        ("kvm", uapi.KVM_CREATE_VM, 31, errno.EINVAL),
        ("kvm", uapi.KVM_CREATE_VM, 1 << 8, errno.EINVAL),
        ("kvm", 0xAEFF, 0, errno.EINVAL),
        ("vm", uapi.KVM_CREATE_VCPU, 512, errno.EINVAL),
        ("vm", uapi.KVM_CREATE_VCPU, 0, errno.EEXIST),  # vCPU 0 exists
        ("vm", uapi.KVM_ENABLE_CAP, enable_cap(9999), errno.EINVAL),
        ("vm", uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE), errno.EINVAL),  # vCPUs
        ("vm", uapi.KVM_GET_DIRTY_LOG, LAYOUT["kvm_dirty_log"].pack(3, 0, 0), errno.ENOENT),
        ("vm", COPY_TAGS, copy_tags(GPA, PAGE, 0, TO), errno.EINVAL),  # MTE not enabled
    ],
    ids=[
        "API_VERSION with an argument",
        "CREATE_VM IPA 31",
        "CREATE_VM unknown type bit",
        "unknown system ioctl",
        "CREATE_VCPU 512",
        "CREATE_VCPU twice",
        "ENABLE_CAP unknown",
        "ENABLE_CAP MTE after a vCPU",
        "GET_DIRTY_LOG no slot",
        "COPY_TAGS without MTE",
    ],
)
def test_ioctl_raises_the_kernels_errno(
    vmm: Vmm, fd: str, request_: int, arg: int | bytes, expected: int
) -> None:
    kvm = vmm.open()
    vm = vmm.vm(kvm, mte=False)
    vmm.ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
    with pytest.raises(OSError) as info:
        client.ioctl(kvm if fd == "kvm" else vm, request_, arg)
    assert info.value.errno == expected
    assert info.value.strerror == os.strerror(expected)


def test_ioctl_on_a_closed_fd_is_ebadf(vmm: Vmm) -> None:
    kvm = client.open(socket=vmm.socket_path)
    vm = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    plain = client.open(socket=vmm.socket_path)
    client.close(vm)
    client.close(kvm)
    os.close(plain)  # close(2) behind the client's back
    for fd in (kvm, vm, plain, -1):
        assert errno_of(lambda fd=fd: client.ioctl(fd, uapi.KVM_CHECK_EXTENSION, 1)) == errno.EBADF
    assert errno_of(lambda: client.close(kvm)) == errno.EBADF


def test_ioctl_on_an_fd_that_is_not_kvmtags_is_enotty(tmp_path: Path) -> None:
    r, w = os.pipe()
    regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in (r, w, regular, a.fileno(), b.fileno(), null):
            for request, arg in ((uapi.KVM_GET_API_VERSION, 0), (COPY_TAGS, bytes(48))):
                assert errno_of(lambda fd=fd, rq=request, arg=arg: client.ioctl(fd, rq, arg)) == (
                    errno.ENOTTY
                )
        assert a.send(b"x") == 1 and b.recv(1) == b"x"  # untouched
    finally:
        for fd in (r, w, regular, null):
            os.close(fd)
        a.close()
        b.close()


# --- ioctl(): the struct argument --------------------------------------------------------------


def test_struct_as_bytes_bytearray_memoryview_or_ctypes(vmm: Vmm) -> None:
    """The modelled struct ioctls only read their struct (nothing is written back): any
    buffer works, read-only ones included, and a writable one is left as it was."""
    vm = vmm.vm(mte=False)
    cap = enable_cap(uapi.KVM_CAP_ARM_MTE)
    for arg in (
        cap,
        bytearray(cap),
        memoryview(cap),
        memoryview(bytearray(cap)),
        ctypes.create_string_buffer(cap, len(cap)),
    ):
        assert client.ioctl(vm, uapi.KVM_ENABLE_CAP, arg) == 0
        assert bytes(arg) == cap
    vmm.ram(vm, 4)
    tags = tags_of(4 * TPP, 2)
    src, dst = vmm.buffer(tags), vmm.buffer(4 * TPP)
    for kind in (bytes, bytearray, lambda b: memoryview(bytes(b))):
        to = kind(copy_tags(GPA, 4 * PAGE, src, TO))
        back = kind(copy_tags(GPA, 4 * PAGE, dst, FROM))
        assert client.ioctl(vm, COPY_TAGS, to) == 4 * PAGE
        assert client.ioctl(vm, COPY_TAGS, back) == 4 * PAGE
        assert ctypes.string_at(dst, len(tags)) == tags
        assert bytes(to) == copy_tags(GPA, 4 * PAGE, src, TO)
        assert bytes(back) == copy_tags(GPA, 4 * PAGE, dst, FROM)
    # A struct buffer longer than the struct: the kernel reads sizeof(struct) bytes.
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, 4 * PAGE, dst, FROM) + b"\xff" * 8) == (
        4 * PAGE
    )


@pytest.mark.parametrize(
    ("request_", "struct_"),
    [
        (uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE)),
        (uapi.KVM_SET_USER_MEMORY_REGION, region(1, GPA2, PAGE, 0x7000_0000)),
        (COPY_TAGS, copy_tags(GPA, PAGE, 0x7000_0000, FROM)),
        (uapi.KVM_GET_DIRTY_LOG, LAYOUT["kvm_dirty_log"].pack(0, 0, 0x7000_0000)),
        (uapi.KVM_CLEAR_DIRTY_LOG, LAYOUT["kvm_clear_dirty_log"].pack(0, 0, 0, 0x7000_0000)),
    ],
    ids=["ENABLE_CAP", "SET_USER_MEMORY_REGION", "COPY_TAGS", "GET_DIRTY_LOG", "CLEAR_DIRTY_LOG"],
)
def test_a_buffer_shorter_than_the_struct_is_efault(
    vmm: Vmm, request_: int, struct_: bytes
) -> None:
    vm = vmm.vm()
    vmm.ram(vm, 8, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    for short in (struct_[:-1], bytearray(struct_[:8]), b""):
        assert errno_of(lambda s=short: client.ioctl(vm, request_, s)) == errno.EFAULT


def test_a_struct_by_address_works_as_the_buffer_does(vmm: Vmm) -> None:
    vm = vmm.vm(mte=False)
    bad = ctypes.create_string_buffer(enable_cap(uapi.KVM_CAP_ARM_MTE, flags=1), 104)
    good = ctypes.create_string_buffer(enable_cap(uapi.KVM_CAP_ARM_MTE), 104)
    assert outcome(lambda: client.ioctl(vm, uapi.KVM_ENABLE_CAP, bytes(bad))) == -errno.EINVAL
    assert outcome(lambda: client.ioctl(vm, uapi.KVM_ENABLE_CAP, ctypes.addressof(bad))) == (
        -errno.EINVAL
    )
    assert client.ioctl(vm, uapi.KVM_ENABLE_CAP, ctypes.addressof(good)) == 0
    uaddr = vmm.map(4 * PAGE, vmm.memfd(4 * PAGE))
    slot = ctypes.create_string_buffer(region(0, GPA, 4 * PAGE, uaddr), 32)
    assert client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(slot)) == 0
    tags = tags_of(4 * TPP, 3)
    src, dst = vmm.buffer(tags), vmm.buffer(4 * TPP)
    to = ctypes.create_string_buffer(copy_tags(GPA, 4 * PAGE, src, TO), 48)
    back = ctypes.create_string_buffer(copy_tags(GPA, 4 * PAGE, dst, FROM), 48)
    assert client.ioctl(vm, COPY_TAGS, ctypes.addressof(to)) == 4 * PAGE
    assert client.ioctl(vm, COPY_TAGS, ctypes.addressof(back)) == 4 * PAGE
    assert ctypes.string_at(dst, len(tags)) == tags
    # The same slot again, now through a buffer: the kernel's "identical call" answer.
    assert client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, slot.raw) == 0


def test_a_struct_address_that_faults_is_efault(vmm: Vmm) -> None:
    vm = vmm.vm()
    vmm.ram(vm, 4)
    edge = vmm.buffer(2 * PAGE)  # a readable page, then an unmapped one
    protect(edge + PAGE, PAGE, PROT_NONE)
    ctypes.memset(edge, 0, PAGE)
    for request, name in (
        (uapi.KVM_ENABLE_CAP, "kvm_enable_cap"),
        (COPY_TAGS, "kvm_arm_copy_mte_tags"),
        (uapi.KVM_SET_USER_MEMORY_REGION, "kvm_userspace_memory_region"),
    ):
        straddling = edge + PAGE - LAYOUT[name].size + 8  # its last 8 bytes fault
        for arg in (0, edge + PAGE, straddling, 2**64 - 8, TOP_PAGE):
            assert errno_of(lambda a=arg, r=request: client.ioctl(vm, r, a)) == errno.EFAULT
    assert errno_of(lambda: client.ioctl(vm, uapi.KVM_ENABLE_CAP)) == errno.EFAULT  # arg=0


# --- pointers inside structs -------------------------------------------------------------------


def test_copy_tags_with_an_unmapped_buffer_is_efault(bulk_vmm: Vmm) -> None:
    vmm = bulk_vmm
    vm = vmm.vm()
    vmm.ram(vm, 4)
    hole = vmm.buffer(PAGE)
    protect(hole, PAGE, PROT_NONE)
    readonly = vmm.buffer(tags_of(4 * TPP, 4))
    protect(readonly, PAGE, mmap.PROT_READ)
    for addr in (0, hole, 2**64 - TPP):
        for flags in (TO, FROM):
            args = copy_tags(GPA, 4 * PAGE, addr, flags)
            assert errno_of(lambda a=args: client.ioctl(vm, COPY_TAGS, a)) == errno.EFAULT
    assert (
        errno_of(lambda: client.ioctl(vm, COPY_TAGS, copy_tags(GPA, 4 * PAGE, readonly, FROM)))
        == errno.EFAULT
    )
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, 4 * PAGE, readonly, TO)) == 4 * PAGE


def test_copy_tags_with_a_partly_mapped_buffer_is_partial(bulk_vmm: Vmm) -> None:
    """The tag buffer holds 2.5 pages of tags, then faults: 2 pages are done, in both
    directions, and the caller is still alive to see it."""
    vmm = bulk_vmm
    vm = vmm.vm()
    vmm.ram(vm, 8)
    old = tags_of(8 * TPP, 5)
    assert vmm.to_guest(vm, GPA, old) == 8 * PAGE
    base = vmm.buffer(2 * PAGE)
    protect(base + PAGE, PAGE, PROT_NONE)
    start = base + PAGE - (5 * TPP // 2)  # 2.5 pages of tags before the fault
    new = tags_of(5 * TPP // 2, 6)
    ctypes.memmove(start, new, len(new))
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, 4 * PAGE, start, TO)) == 2 * PAGE
    # Pages 0-1 took the new tags; page 2, where the buffer faulted, is cleared (since 6.2).
    expected = new[: 2 * TPP] + bytes(TPP) + old[3 * TPP :]
    assert vmm.from_guest(vm, GPA, 8) == expected
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA + 4 * PAGE, 4 * PAGE, start, FROM)) == (
        2 * PAGE
    )
    assert ctypes.string_at(start, 2 * TPP) == old[4 * TPP : 6 * TPP]


def test_a_bulk_copy_that_faults_midway_is_partial(bulk_vmm: Vmm) -> None:
    """As above, with more tags than one small copy (the shared window's path): 40.5 pages of
    tags, then a fault."""
    vmm = bulk_vmm
    npages = 64
    vm = vmm.vm()
    vmm.ram(vm, npages)
    old = tags_of(npages * TPP, 5)
    assert vmm.to_guest(vm, GPA, old) == npages * PAGE
    buffer_pages = -(-41 * TPP // PAGE)
    base = vmm.buffer((buffer_pages + 1) * PAGE)
    protect(base + buffer_pages * PAGE, PAGE, PROT_NONE)
    start = base + buffer_pages * PAGE - (81 * TPP // 2)  # 40.5 pages of tags before the fault
    new = tags_of(81 * TPP // 2, 6)
    ctypes.memmove(start, new, len(new))
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, npages * PAGE, start, TO)) == 40 * PAGE
    expected = new[: 40 * TPP] + bytes(TPP) + old[41 * TPP :]
    assert vmm.from_guest(vm, GPA, npages) == expected
    ctypes.memset(start, 0xFF, len(new))
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, npages * PAGE, start, FROM)) == 40 * PAGE
    assert ctypes.string_at(start, 81 * TPP // 2) == expected[: 81 * TPP // 2]


@pytest.mark.parametrize("by", ["buffer", "address"])
@pytest.mark.parametrize("ioctl", ["COPY_TAGS from guest", "GET_DIRTY_LOG", "CLEAR_DIRTY_LOG"])
def test_a_kernel_address_inside_a_struct_is_efault(vmm: Vmm, ioctl: str, by: str) -> None:
    """access_ok() refuses a pointer into the top page of the address space, whatever the
    ioctl; these ioctls only read their struct, so the caller's struct stays as it was."""
    vm = vmm.vm()
    vmm.ram(vm, 8, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    if ioctl == "COPY_TAGS from guest":
        request, arg = COPY_TAGS, copy_tags(GPA, PAGE, TOP_PAGE, FROM)
    elif ioctl == "GET_DIRTY_LOG":
        request, arg = uapi.KVM_GET_DIRTY_LOG, LAYOUT["kvm_dirty_log"].pack(0, 0, TOP_PAGE)
    else:
        request = uapi.KVM_CLEAR_DIRTY_LOG
        arg = LAYOUT["kvm_clear_dirty_log"].pack(0, 8, 0, TOP_PAGE)
    buf = ctypes.create_string_buffer(arg, len(arg))
    call_arg: int | bytearray = ctypes.addressof(buf) if by == "address" else bytearray(arg)
    assert outcome(lambda: client.ioctl(vm, request, call_arg)) == -errno.EFAULT
    assert bytes(call_arg if isinstance(call_arg, bytearray) else buf.raw) == arg


# --- the fds CREATE_VM and CREATE_VCPU return ------------------------------------------------


def test_new_fds_are_real_close_on_exec_fds(vmm: Vmm) -> None:
    kvm = vmm.open()
    vm = vmm.vm(kvm, mte=False)
    vcpu = vmm.ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
    poller = select.poll()
    for fd in (vm, vcpu):
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)
        assert not os.get_inheritable(fd)
        poller.register(fd, select.POLLIN | select.POLLOUT)
    events = dict(poller.poll(0))
    for fd in (vm, vcpu):  # idle and open: writable, nothing to read, no error
        assert events[fd] == select.POLLOUT
    size = client.ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE)
    run = client.mmap(vcpu, size)
    try:
        assert len(run) == size
    finally:
        run.close()
    assert errno_of(lambda: client.mmap(vm, size)) == errno.ENODEV


def test_a_vm_lives_while_any_fd_refers_to_it(tmp_path: Path) -> None:
    """Closing the VM fd closes the file only when no dup is left; then the daemon ends the
    VM (its end of the VM's connection goes) and the numbers are EBADF."""
    with running_kvmtagd(tmp_path) as (path, proc):
        vmm = Vmm(path)
        try:
            kvm = vmm.open()
            before = len(daemon_fds(proc.pid))
            vm = vmm.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
            # The VM's connection and the window it shares with this client.
            wait_until(lambda: len(daemon_fds(proc.pid)) == before + 2, "the VM is served")
            dup = vmm.dup(vm)
            vmm.close(vm)
            assert errno_of(lambda: client.ioctl(vm, uapi.KVM_CHECK_EXTENSION, 1)) == errno.EBADF
            assert client.ioctl(dup, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE)) == 0
            assert len(daemon_fds(proc.pid)) == before + 2
            vmm.close(dup)
            wait_until(lambda: len(daemon_fds(proc.pid)) == before, "the daemon ends the VM")
            assert errno_of(lambda: client.ioctl(dup, uapi.KVM_CHECK_EXTENSION, 1)) == errno.EBADF
            assert client.ioctl(kvm, uapi.KVM_GET_API_VERSION) == 12
        finally:
            vmm.finish()


# --- dup ---------------------------------------------------------------------------------------


def test_dup_and_dup2_share_the_open_file(vmm: Vmm) -> None:
    kvm = vmm.open()
    kvm_dup = vmm.dup(kvm)
    kvm_dup2 = vmm.dup(kvm, os.open(os.devnull, os.O_RDONLY))  # dup2 onto a used number
    for fd in (kvm_dup, kvm_dup2):
        assert client.ioctl(fd, uapi.KVM_GET_API_VERSION) == 12
        assert client.info(fd).fd_kind is wire.FdKind.SYSTEM
    vm = vmm.ioctl(kvm_dup2, uapi.KVM_CREATE_VM, 0)
    vm_dup = vmm.dup(vm)
    vm_dup2 = vmm.dup(vm, os.open(os.devnull, os.O_RDONLY))
    assert client.ioctl(vm_dup, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE)) == 0
    uaddr = vmm.map(8 * PAGE, vmm.memfd(8 * PAGE))
    other = vmm.map(8 * PAGE, vmm.memfd(8 * PAGE))
    assert (
        client.ioctl(vm_dup2, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, 8 * PAGE, uaddr)) == 0
    )
    # The slot made through the dup2 is there for the original and the dup.
    assert (
        outcome(
            lambda: client.ioctl(
                vm, uapi.KVM_SET_USER_MEMORY_REGION, region(1, GPA + PAGE, PAGE, other)
            )
        )
        == -errno.EEXIST
    )
    tags = tags_of(8 * TPP, 7)
    assert vmm.to_guest(vm_dup, GPA, tags) == 8 * PAGE  # MTE, enabled through vm_dup
    assert vmm.from_guest(vm, GPA, 8) == tags
    vmm.close(vm)
    vmm.close(kvm)
    assert vmm.from_guest(vm_dup2, GPA, 8) == tags
    assert client.ioctl(kvm_dup, uapi.KVM_GET_API_VERSION) == 12


# --- threads -----------------------------------------------------------------------------------

CAPS = [
    (uapi.KVM_CAP_ARM_MTE, 1),
    (uapi.KVM_CAP_ARM_VM_IPA_SIZE, 48),
    (uapi.KVM_CAP_NR_MEMSLOTS, 32767),
    (uapi.KVM_CAP_MAX_VCPUS, 512),
    (uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3),
    (9999, 0),
]


def test_threads_on_one_fd_and_its_dups_never_see_another_threads_reply(vmm: Vmm) -> None:
    nthreads, pages, rounds = 8, 4, 20
    kvm = vmm.open()
    vm = vmm.vm(kvm)
    vmm.ram(vm, nthreads * pages)
    vm_fds = [vm, vmm.dup(vm), vmm.dup(vm)]
    kvm_fds = [kvm, vmm.dup(kvm)]
    barrier = threading.Barrier(nthreads, timeout=TIMEOUT)
    errors: list[str] = []

    def worker(t: int) -> None:
        try:
            src, dst = vmm.buffer(pages * TPP), vmm.buffer(pages * TPP)
            gpa, length = GPA + t * pages * PAGE, pages * PAGE
            barrier.wait()
            for i in range(rounds):
                cap, value = CAPS[(t + i) % len(CAPS)]
                fd = vm_fds[(t + i) % len(vm_fds)]
                assert client.ioctl(fd, uapi.KVM_CHECK_EXTENSION, cap) == value
                assert client.ioctl(kvm_fds[(t + i) % 2], uapi.KVM_CHECK_EXTENSION, cap) == value
                tags = tags_of(pages * TPP, t * 1000 + i)
                ctypes.memmove(src, tags, len(tags))
                assert client.ioctl(fd, COPY_TAGS, copy_tags(gpa, length, src, TO)) == length
                back = vm_fds[(t + i + 1) % len(vm_fds)]
                assert client.ioctl(back, COPY_TAGS, copy_tags(gpa, length, dst, FROM)) == length
                assert ctypes.string_at(dst, len(tags)) == tags, f"round {i}: not my tags"
        except BaseException as e:
            errors.append(f"thread {t}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors


# --- fork --------------------------------------------------------------------------------------


def _read_to_eof(fd: int, deadline: float) -> bytes:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError("the child did not finish")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _wait(pid: int, deadline: float) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {pid} did not exit")
        time.sleep(0.005)


def run_in_fork(fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child that leaves with os._exit; return its result (JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            try:
                payload = {"result": fn()}
                code = 0
            except BaseException:
                payload = {"error": traceback.format_exc()}
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + TIMEOUT
    try:
        data = _read_to_eof(r, deadline)
        code = _wait(pid, deadline)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(r)
    payload = json.loads(data) if data else {"error": "the child wrote nothing"}
    assert "error" not in payload, payload["error"]
    assert code == 0
    return payload["result"]


def test_fork_reconnects_system_fds_and_vm_fds_answer_eio(vmm: Vmm) -> None:
    kvm = vmm.open()
    system = [kvm, vmm.dup(kvm), vmm.dup(kvm, os.open(os.devnull, os.O_RDONLY))]
    inheritable = [os.get_inheritable(fd) for fd in system]
    assert inheritable == [False, False, True]  # os.dup2 makes an inheritable copy
    parent_ino = os.fstat(kvm).st_ino
    vm = vmm.vm(kvm)
    ram = vmm.ram(vm, 8)
    vcpu = vmm.ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
    vcpu_before = outcome(lambda: client.ioctl(vcpu, uapi.KVM_RUN))
    tags = tags_of(8 * TPP, 8)
    assert vmm.to_guest(vm, GPA, tags) == 8 * PAGE
    probe = vmm.buffer(TPP)

    def child() -> dict[str, Any]:
        vm2 = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)  # its own VM, over the shared RAM
        client.ioctl(vm2, uapi.KVM_ENABLE_CAP, enable_cap(uapi.KVM_CAP_ARM_MTE))
        client.ioctl(vm2, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA2, 8 * PAGE, ram))
        return {
            "api": [client.ioctl(fd, uapi.KVM_GET_API_VERSION) for fd in system],
            "ino": [os.fstat(fd).st_ino for fd in system],
            "sock": [stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in system],
            "inheritable": [os.get_inheritable(fd) for fd in system],
            "vm": outcome(lambda: client.ioctl(vm, uapi.KVM_CHECK_EXTENSION, 1)),
            "vm copy": outcome(
                lambda: client.ioctl(vm, COPY_TAGS, copy_tags(GPA, PAGE, probe, FROM))
            ),
            "vcpu": outcome(lambda: client.ioctl(vcpu, uapi.KVM_RUN)),
            "tags": vmm.from_guest(vm2, GPA2, 8).hex(),
        }

    # Threads keep the parent's locks busy: a lock held at fork must not hold up the child.
    stop = threading.Event()

    def hammer(fd: int) -> None:
        while not stop.is_set():
            client.ioctl(fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE)

    threads = [threading.Thread(target=hammer, args=(fd,)) for fd in (kvm, vm)]
    for thread in threads:
        thread.start()
    try:
        got = run_in_fork(child)
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert got["api"] == [12, 12, 12]
    assert got["sock"] == [True, True, True]
    assert len(set(got["ino"])) == 1 and got["ino"][0] != parent_ino  # one new connection
    assert got["inheritable"] == inheritable
    assert (got["vm"], got["vm copy"], got["vcpu"]) == (-errno.EIO, -errno.EIO, -errno.EIO)
    assert bytes.fromhex(got["tags"]) == tags  # tags belong to the memory the child shares
    # The parent's fds are untouched.
    assert [os.fstat(fd).st_ino for fd in system] == [parent_ino] * 3
    assert [client.ioctl(fd, uapi.KVM_GET_API_VERSION) for fd in system] == [12, 12, 12]
    assert client.ioctl(vm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE) == 1
    assert outcome(lambda: client.ioctl(vcpu, uapi.KVM_RUN)) == vcpu_before
    new = tags_of(8 * TPP, 9)
    assert vmm.to_guest(vm, GPA, new) == 8 * PAGE
    assert vmm.from_guest(vm, GPA, 8) == new


# --- big copies --------------------------------------------------------------------------------


def test_copy_tags_of_256_mib_of_guest_ram_in_one_call(bulk_vmm: Vmm) -> None:
    vmm = bulk_vmm
    size = 256 << 20
    vm = vmm.vm()
    vmm.ram(vm, size // PAGE)
    tags = tags_of(size // 16, 256)
    src, dst = vmm.buffer(tags), vmm.buffer(size // 16)
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, size, src, TO)) == size
    assert client.ioctl(vm, COPY_TAGS, copy_tags(GPA, size, dst, FROM)) == size
    assert ctypes.string_at(dst, size // 16) == tags


# --- guest RAM through /proc/self/maps ---------------------------------------------------------

KINDS = ["memfd", "memfd-private", "anon", "anon-shared", "file", "file-private"]
MTE_REFUSED = {"file", "file-private"}  # an ordinary file: no MTE (kvm_vma_mte_allowed)


def _kind_of_mapping(uaddr: int, size: int) -> VmaKind:
    vmas = procmem.find_vmas(uaddr, uaddr + size)
    for vma in vmas:
        if vma.fd is not None:
            os.close(vma.fd)
    return vmas[0].kind


@pytest.mark.parametrize("mte", [True, False], ids=["MTE VM", "non-MTE VM"])
@pytest.mark.parametrize("kind", KINDS)
def test_memory_kinds(vmm: Vmm, tmp_path: Path, kind: str, mte: bool) -> None:
    size = 8 * PAGE
    uaddr = vmm.map_kind(kind, size, tmp_path)
    if kind.startswith("file") and _kind_of_mapping(uaddr, size) is not VmaKind.FILE:
        pytest.skip(f"{tmp_path} is not on a disk filesystem here")
    vm = vmm.vm(mte=mte)
    result = outcome(
        lambda: client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, size, uaddr))
    )
    assert result == (-errno.EINVAL if mte and kind in MTE_REFUSED else 0)
    if mte and not result:
        tags = tags_of(8 * TPP, 10)
        assert vmm.to_guest(vm, GPA, tags) == size
        assert vmm.from_guest(vm, GPA, 8) == tags


def test_one_memfd_mapped_twice_shares_its_tags(vmm: Vmm) -> None:
    fd = vmm.memfd(8 * PAGE)
    first, second = vmm.map(8 * PAGE, fd), vmm.map(8 * PAGE, fd)
    tail = vmm.map(4 * PAGE, fd, offset=4 * PAGE)  # file pages 4-7
    vm = vmm.vm()
    for slot, gpa, uaddr, size in (
        (0, GPA, first, 8 * PAGE),
        (1, GPA2, second, 8 * PAGE),
        (2, 2 * GPA2, tail, 4 * PAGE),
    ):
        assert (
            client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region(slot, gpa, size, uaddr)) == 0
        )
    tags = tags_of(8 * TPP, 11)
    assert vmm.to_guest(vm, GPA, tags) == 8 * PAGE
    assert vmm.from_guest(vm, GPA2, 8) == tags
    assert vmm.from_guest(vm, 2 * GPA2, 4) == tags[4 * TPP :]
    new = tags_of(2 * TPP, 12)
    assert vmm.to_guest(vm, 2 * GPA2 + PAGE, new) == 2 * PAGE  # file pages 5-6
    assert vmm.from_guest(vm, GPA, 8) == tags[: 5 * TPP] + new + tags[7 * TPP :]


@pytest.mark.parametrize("kind", ["anon", "memfd-private"])
def test_private_mappings_do_not_share_tags(vmm: Vmm, kind: str) -> None:
    fd = vmm.memfd(4 * PAGE)
    flags = mmap.MAP_PRIVATE | (mmap.MAP_ANONYMOUS if kind == "anon" else 0)
    a, b = (vmm.map(4 * PAGE, -1 if kind == "anon" else fd, flags) for _ in range(2))
    vm = vmm.vm()
    assert client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, 4 * PAGE, a)) == 0
    assert client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region(1, GPA2, 4 * PAGE, b)) == 0
    tags = tags_of(4 * TPP, 13)
    assert vmm.to_guest(vm, GPA, tags) == 4 * PAGE
    assert vmm.from_guest(vm, GPA2, 4) == bytes(4 * TPP)
    assert vmm.from_guest(vm, GPA, 4) == tags


# A VMM in another process: maps guest RAM (an inherited memfd, or its own), creates an MTE VM
# with one memslot over it, copies tags in and out, prints what it saw as JSON, and with "hold"
# stays connected until its stdin closes.
CHILD_VMM = textwrap.dedent(
    """
    import json, mmap, os, sys
    from kvmtag import client, procmem, uapi
    from kvmtag.uapi import LAYOUT

    args = json.loads(sys.argv[1])
    if args.get("uid") is not None:  # drop root before any memory or connection exists
        os.setgroups([])
        os.setgid(args["uid"])
        os.setuid(args["uid"])
    PAGE, GPA = 4096, 0x1000_0000
    TPP = PAGE // 16
    if args.get("memfd") is None:
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, args["size"])
    else:
        fd = args["memfd"]
    size = os.fstat(fd).st_size
    ram = mmap.mmap(fd, size, mmap.MAP_SHARED)
    uaddr = procmem.buffer_address(ram).address
    try:
        os.close(os.open(f"/proc/self/map_files/{uaddr:x}-{uaddr + size:x}", os.O_RDONLY))
        map_files = "allowed"
    except PermissionError:
        map_files = "denied"
    kvm = client.open(socket=args["socket"])
    vm = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    client.ioctl(vm, uapi.KVM_ENABLE_CAP,
                 LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64)))
    client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION,
                 LAYOUT["kvm_userspace_memory_region"].pack(0, 0, GPA, size, uaddr))
    tags = bytearray(size // 16)
    pin = memoryview(tags)  # the buffer cannot move while its address is in use
    taddr = procmem.buffer_address(tags).address

    def copy(first, n, flags):
        args = LAYOUT["kvm_arm_copy_mte_tags"].pack(
            GPA + first * PAGE, n * PAGE, taddr + first * TPP, flags, 0, 0)
        return client.ioctl(vm, uapi.KVM_ARM_MTE_COPY_TAGS, args)

    st = os.fstat(fd)
    out = {"euid": os.geteuid(), "map_files": map_files, "backing": [st.st_dev, st.st_ino]}
    for first, n, data in args.get("write", []):
        tags[first * TPP : (first + n) * TPP] = bytes.fromhex(data)
        out.setdefault("wrote", []).append(copy(first, n, uapi.KVM_ARM_TAGS_TO_GUEST))
    for first, n in args.get("read", []):
        assert copy(first, n, uapi.KVM_ARM_TAGS_FROM_GUEST) == n * PAGE
        out.setdefault("read", []).append(tags[first * TPP : (first + n) * TPP].hex())
    print(json.dumps(out), flush=True)
    if args.get("hold"):
        sys.stdin.read()
    """
)


def run_child_vmm(args: dict[str, Any], pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_VMM, json.dumps(args)],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_two_processes_mapping_one_memfd_share_its_tags(vmm: Vmm) -> None:
    fd = vmm.memfd(8 * PAGE)
    vm = vmm.vm()
    assert (
        client.ioctl(
            vm, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, 8 * PAGE, vmm.map(8 * PAGE, fd))
        )
        == 0
    )
    mine, theirs = tags_of(4 * TPP, 14), tags_of(4 * TPP, 15)
    assert vmm.to_guest(vm, GPA, mine) == 4 * PAGE
    os.set_inheritable(fd, True)  # only into the child: pass_fds
    got = run_child_vmm(
        {"socket": vmm.socket_path, "memfd": fd, "read": [[0, 4]], "write": [[4, 4, theirs.hex()]]},
        pass_fds=(fd,),
    )
    assert got["wrote"] == [4 * PAGE]
    assert bytes.fromhex(got["read"][0]) == mine  # the child's VM sees this VM's tags ...
    assert vmm.from_guest(vm, GPA, 8) == mine + theirs  # ... and this one the child's


# --- the unprivileged path ---------------------------------------------------------------------


def first_line(proc: subprocess.Popen[str]) -> str:
    """The first line a child prints; its stderr in the failure if it prints none."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=TIMEOUT)
        raise AssertionError(f"the child printed nothing: {err}")
    return line


def test_an_unprivileged_vmm_round_trips_tags() -> None:
    """A child drops root before it creates its memfd or connects: /proc/self/map_files is
    closed to it, so the client finds the memfd among its own fds, and the daemon gets it."""
    with tempfile.TemporaryDirectory(prefix="kvmtag-unprivileged-") as directory:
        os.chmod(directory, 0o711)  # reachable by nobody
        with running_kvmtagd(Path(directory)) as (path, proc):
            os.chmod(path, 0o666)
            tags = tags_of(4 * TPP, 16)
            args = {
                "socket": path,
                "uid": NOBODY,
                "size": 8 * PAGE,
                "hold": True,
                "write": [[2, 4, tags.hex()]],
                "read": [[0, 8]],
            }
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD_VMM, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
            try:
                got = json.loads(first_line(child))
                assert (got["euid"], got["map_files"]) == (NOBODY, "denied")
                assert got["wrote"] == [4 * PAGE]
                assert bytes.fromhex(got["read"][0]) == bytes(2 * TPP) + tags + bytes(2 * TPP)
                # The daemon holds the child's memfd: guest RAM it can reach, not tags-only.
                dev, ino = got["backing"]
                assert any((s.st_dev, s.st_ino) == (dev, ino) for s in daemon_fds(proc.pid))
                _, err = child.communicate("", timeout=TIMEOUT)
                assert child.returncode == 0, err
            finally:
                if child.poll() is None:
                    child.kill()
                    child.communicate()


# --- after the daemon is gone -----------------------------------------------------------------


def test_ioctl_after_the_daemon_is_gone_is_eio(tmp_path: Path) -> None:
    """A lost connection is a protocol failure, turned into EIO at the client's boundary, on
    the first ioctl and every one after; never a transport errno such as EPIPE."""
    with running_kvmtagd(tmp_path) as (path, proc):
        kvm = client.open(socket=path)
        vm = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    try:
        for fd in (kvm, vm, kvm, vm):
            assert outcome(lambda fd=fd: client.ioctl(fd, uapi.KVM_CHECK_EXTENSION, 1)) == (
                -errno.EIO
            )
    finally:
        client.close(vm)
        client.close(kvm)


# --- the shared window ---------------------------------------------------------------------------


def _window_fd(size: int, seal: bool) -> int:
    fd = os.memfd_create("test-window", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _pipe_read_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


WINDOWS: dict[str, Callable[[], tuple[list[int], int]]] = {
    "a sealed memfd of its size": lambda: ([_window_fd(wire.WINDOW, True)], 0),
    "not sealed": lambda: ([_window_fd(wire.WINDOW, False)], 0),
    "smaller than the window": lambda: ([_window_fd(wire.WINDOW // 2, True)], 0),
    "two descriptors": lambda: ([_window_fd(wire.WINDOW, True), _window_fd(wire.WINDOW, True)], 0),
    "not a file": lambda: ([_pipe_read_end()], 0),
    "with a refusal": lambda: ([_window_fd(wire.WINDOW, True)], errno.EMFILE),
}


@contextlib.contextmanager
def fake_kvmtagd(
    tmp_path: Path, serve: Callable[[socket.socket, wire.Codec], None]
) -> Iterator[str]:
    """A stand-in daemon on a socket in tmp_path: serve(connection, codec) answers the first
    connection; yields the socket's path. The test then checks no descriptor is left."""
    before = set(os.listdir("/proc/self/fd"))
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            serve(conn, wire.Codec(daemon=True))
            conn.recv(1)  # until the client closes

    server = threading.Thread(target=run, daemon=True)
    server.start()
    try:
        yield path
    finally:
        server.join(TIMEOUT)
        listener.close()
    assert set(os.listdir("/proc/self/fd")) == before


def fake_send(conn: socket.socket, codec: wire.Codec, event: wire.Event) -> None:
    data, fds = codec.send(event)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    conn.sendmsg([data], anc if fds else [])
    for fd in fds:
        os.close(fd)


def fake_receive(conn: socket.socket, codec: wire.Codec) -> wire.Event:
    while (event := codec.next_event()) is wire.NEED_DATA:
        data, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        fds = [fd for _, _, raw in anc for fd in struct.unpack(f"{len(raw) // 4}i", raw)]
        codec.receive_data(data, fds)
    return event  # type: ignore[return-value]


@pytest.mark.parametrize("window", list(WINDOWS))
def test_a_window_that_could_fault_the_client_is_refused(tmp_path: Path, window: str) -> None:
    """A daemon could hand over a window it may later shrink under the client (SIGBUS on
    copies): the client maps only a memfd sealed against shrinking, of the window's size; any
    other answer is EIO and leaves no descriptor behind."""

    def serve(conn: socket.socket, codec: wire.Codec) -> None:
        hello = fake_receive(conn, codec)
        assert isinstance(hello, wire.Hello) and hello.flags & wire.HELLO_SHARED_WINDOW
        fds, refusal = WINDOWS[window]()
        fake_send(conn, codec, wire.HelloReply(hello.id, wire.FdKind.VM, PAGE, "latest",
                                               errno=refusal, fds=fds))  # fmt: skip

    with fake_kvmtagd(tmp_path, serve) as path:
        try:
            fd = client.open("/dev/kvm", socket=path)
        except OSError as e:
            assert window != "a sealed memfd of its size", e
            assert e.errno == errno.EIO, e
        else:
            assert window == "a sealed memfd of its size"
            assert client._lookup(fd).window is not None
            client.close(fd)


def test_the_client_honours_the_daemons_descriptor_limit(tmp_path: Path, vmm: Vmm) -> None:
    """A daemon that takes at most one descriptor a frame gets one: the other mapping of the
    range is described without its descriptor (tags-only for that daemon)."""
    first, second = (vmm.map(PAGE, vmm.memfd(PAGE)) for _ in range(2))
    low, high = min(first, second), max(first, second) + PAGE
    got: list[wire.Event] = []

    def serve(conn: socket.socket, codec: wire.Codec) -> None:
        hello = fake_receive(conn, codec)
        fake_send(conn, codec, wire.HelloReply(hello.id, wire.FdKind.SYSTEM, PAGE, "latest",
                                               max_fds=1))  # fmt: skip
        request = fake_receive(conn, codec)
        fake_send(conn, codec, wire.Vmas(request.id, low, high))
        got.append(answer := fake_receive(conn, codec))
        assert isinstance(answer, wire.VmasData)
        for fd in answer.fds:
            os.close(fd)
        fake_send(conn, codec, wire.Reply(request.id, 0))

    with fake_kvmtagd(tmp_path, serve) as path:
        fd = client.open("/dev/kvm", socket=path)
        try:
            assert client.ioctl(fd, uapi.KVM_CHECK_EXTENSION, 0) == 0
        finally:
            client.close(fd)
    (answer,) = got
    assert isinstance(answer, wire.VmasData)
    described = [v for v in answer.vmas if v.start in (first, second)]
    assert len(described) == 2 and len(answer.fds) == 1, answer
    assert sum(v.fd is not None for v in described) == 1


def test_closing_a_vm_fd_while_its_window_is_in_use(vmm: Vmm) -> None:
    """Another thread's bulk copy holds a view of the window while close() runs, and a fork in
    the middle of one leaves the child a view it can never release: close() works in both."""
    vm = vmm.vm()
    window = client._lookup(vm).window
    assert window is not None
    view = memoryview(window)  # what _serve_window holds during a copy
    try:
        pid = os.fork()
        if pid == 0:  # the child: its VM fds answer EIO; closing them must not raise
            code = 0
            try:
                client.close(vm)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        vmm.close(vm)  # in this process, with the view still held
    finally:
        view.release()
