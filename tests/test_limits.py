"""kvmtagd's limits (issue 7): the Quota in process (each limit, its errno, that the kernel's
own errnos come first, the accounts, a struct read once), then each limit through a real
kvmtagd with small values (errno and log line), and a stalled client that cannot take the
daemon's worker threads from another.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmtag import Host, HostConfig, SimulatedFile, SimulatedProcess, Vm, client, uapi, wire
from kvmtag.limits import GiB, Limits, Quota, format_size, parse_size
from kvmtag.uapi import LAYOUT

from .conftest import running_kvmtagd
from .test_daemon import GPA, PAGE, TPP, Raw, Vmm, copy_tags, wait_until

P = 4096
TIMEOUT = 30


def region(slot: int, gpa: int, size: int, uaddr: int, flags: int = 0) -> bytes:
    return LAYOUT["kvm_userspace_memory_region"].pack(slot, flags, gpa, size, uaddr)


def enable_mte() -> bytes:
    return LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))


class InProcess:
    """A VMM process and the host's Quota, driving the model as the daemon does."""

    def __init__(self, limits: Limits, host: Host | None = None) -> None:
        self.host = host or Host()
        self.quota = Quota(self.host, limits)
        self.mm = SimulatedProcess()
        self.kvm = self.host.open()

    def call(self, target: object, request: int, arg: int | bytes = 0) -> int | object:
        addr = self.mm.alloc(arg) if isinstance(arg, bytes) else arg
        return self.quota.ioctl(target, self.mm, request, addr)  # type: ignore[arg-type]

    def vm(self) -> Vm:
        vm = self.call(self.kvm, uapi.KVM_CREATE_VM, 0)
        assert isinstance(vm, Vm)
        assert self.call(vm, uapi.KVM_ENABLE_CAP, enable_mte()) == 0
        return vm

    def slot(self, vm: Vm, slot: int, pages: int, gfn: int = 0x100, flags: int = 0) -> object:
        ram = self.mm.mmap(pages * P, file=SimulatedFile(pages * P), shared=True)
        return self.call(vm, uapi.KVM_SET_USER_MEMORY_REGION,
                         region(slot, gfn * P, pages * P, ram, flags))  # fmt: skip


def test_sizes() -> None:
    assert parse_size("4096") == 4096 and parse_size("64k") == 65536
    assert parse_size("128G") == 128 * GiB and parse_size("1T") == 1 << 40
    for bad in ("", "G", "1.5G", "-1", "12X"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(8 * GiB) == "8G" and format_size(4097) == "4097"


def test_defaults_serve_a_64_gib_guest_with_30000_memslots_and_512_vcpus() -> None:
    d = Limits()
    assert d.max_memslots >= 30_000
    assert d.max_guest_memory >= 2 * 64 * GiB  # a migration's two guests in one process
    assert d.max_tag_storage >= 2 * (64 * GiB // 32)  # both fully tagged (PAGE_SIZE/32 a page)
    assert d.max_connections_per_process >= 512 + 2 + 2  # vCPUs, two VMs, /dev/kvm opens
    assert d.max_connections >= 4 * d.max_connections_per_process
    assert HostConfig().max_vcpus == 512


def test_vms_per_process() -> None:
    p = InProcess(Limits(max_vms=2))
    vms = [p.vm(), p.vm()]
    assert p.call(p.kvm, uapi.KVM_CREATE_VM, 0) == -errno.ENOMEM
    assert p.call(p.kvm, uapi.KVM_CREATE_VM, 1 << 8) == -errno.EINVAL  # the kernel's check first
    p.quota.vm_released(vms[0])
    assert isinstance(p.call(p.kvm, uapi.KVM_CREATE_VM, 0), Vm)
    other = InProcess(Limits(max_vms=2), p.host)  # another process has its own count
    other.quota = p.quota
    assert isinstance(other.call(other.kvm, uapi.KVM_CREATE_VM, 0), Vm)


def test_memslots_per_vm_and_the_kernels_errnos_first() -> None:
    p = InProcess(Limits(max_memslots=2))
    vm = p.vm()
    assert p.slot(vm, 0, 1, 0x100) == 0
    assert p.slot(vm, 1, 1, 0x200) == 0
    assert p.slot(vm, 2, 1, 0x300) == -errno.ENOSPC
    assert p.slot(vm, 2, 1, 0x100) == -errno.EEXIST  # overlapping: the kernel's answer
    assert p.slot(vm, 2, 1, 0x300, flags=4) == -errno.EINVAL  # bad flags: the kernel's answer
    assert p.slot(vm, 32767, 1, 0x300) == -errno.EINVAL  # no such slot id
    ram = p.mm.mmap(P)
    assert p.call(vm, uapi.KVM_SET_USER_MEMORY_REGION, region(1, 0x200 * P, 0, ram)) == 0
    assert p.slot(vm, 2, 1, 0x300) == 0  # room again
    # (a new mapping: another userspace_addr for slot 0, which the kernel refuses)
    assert p.slot(vm, 0, 1, 0x100, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES) == -errno.EINVAL
    p.quota.check()


def test_guest_memory_per_process() -> None:
    p = InProcess(Limits(max_guest_memory=16 * P))
    a, b = p.vm(), p.vm()
    assert p.slot(a, 0, 32, 0x100) == -errno.E2BIG  # alone larger than the limit
    assert p.slot(a, 0, 10, 0x100) == 0
    assert p.slot(b, 0, 6, 0x100) == 0  # another VM of the same process: the same account
    assert p.slot(b, 1, 1, 0x200) == -errno.ENOMEM
    assert p.quota.guest_memory(p.mm.process) == 16 * P
    ram = p.mm.mmap(P)
    assert p.call(b, uapi.KVM_SET_USER_MEMORY_REGION, region(0, 0x100 * P, 0, ram)) == 0
    assert p.slot(b, 1, 6, 0x200) == 0
    # A memslot of 2**31 pages is the kernel's EINVAL, not a limit's.
    huge = region(2, 0x10000 * P, (2**31) * P, 0x1000_0000_0000)
    assert p.call(a, uapi.KVM_SET_USER_MEMORY_REGION, huge) == -errno.EINVAL
    p.quota.vm_released(a)
    assert p.quota.guest_memory(p.mm.process) == 6 * P
    p.quota.check()


def test_a_dirty_logging_slot_larger_than_memory_allocates_nothing() -> None:
    """The model would allocate a dirty bitmap and tag log for any valid slot, mapped or not:
    1 TiB of unmapped range is refused before that."""
    p = InProcess(Limits(max_guest_memory=GiB))
    vm = p.vm()
    arg = region(0, 0, 1 << 40, p.mm.hole(P), uapi.KVM_MEM_LOG_DIRTY_PAGES)
    assert p.call(vm, uapi.KVM_SET_USER_MEMORY_REGION, arg) == -errno.E2BIG
    assert len(vm.memslots) == 0


def test_tag_storage_per_daemon() -> None:
    p = InProcess(Limits(max_tag_storage=4096))
    vm = p.vm()
    assert p.slot(vm, 0, 2048, 0x100) == 0  # 8 MiB of guest RAM
    tags = p.mm.alloc(bytes([5]) * (2048 * TPP))
    args = LAYOUT["kvm_arm_copy_mte_tags"].pack(0x100 * P, P, tags, 0, 0, 0)
    assert p.call(vm, uapi.KVM_ARM_MTE_COPY_TAGS, args) == P  # one page: a slot and a table
    assert p.host.tags.nbytes >= 4096
    more = LAYOUT["kvm_arm_copy_mte_tags"].pack((0x100 + 1024) * P, P, tags, 0, 0, 0)
    assert p.call(vm, uapi.KVM_ARM_MTE_COPY_TAGS, more) == -errno.ENOSPC
    back = LAYOUT["kvm_arm_copy_mte_tags"].pack(0x100 * P, 2048 * P, tags, 1, 0, 0)
    assert p.call(vm, uapi.KVM_ARM_MTE_COPY_TAGS, back) == 2048 * P  # reading is never refused
    bad = LAYOUT["kvm_arm_copy_mte_tags"].pack(0x100 * P + 16, P, tags, 0, 0, 0)
    assert p.call(vm, uapi.KVM_ARM_MTE_COPY_TAGS, bad) == -errno.EINVAL  # the kernel's first


class Fickle(SimulatedProcess):
    """A client that shows one struct to the first read and another to every later one."""

    def __init__(self, at: int, later: bytes) -> None:
        super().__init__()
        self.at, self.later, self.reads = at, later, 0

    def copy_from_user(self, addr: int, size: int) -> bytes:  # type: ignore[override]
        if addr == self.at:
            self.reads += 1
            if self.reads > 1:
                return self.later[:size]
        return bytes(super().copy_from_user(addr, size))


def test_the_struct_is_read_once() -> None:
    """A memslot request is checked and carried out on the same bytes: a client cannot pass
    the check with a small slot and have the model create a huge one."""
    host = Host()
    quota = Quota(host, Limits(max_guest_memory=16 * P))
    small = region(0, 0x100 * P, P, 0x7000_0000_0000)
    huge = region(0, 0x100 * P, 1 << 36, 0x7000_0000_0000)
    mm = Fickle(0, huge)
    at = mm.alloc(small)
    mm.at = at
    vm = quota.ioctl(host.open(), mm, uapi.KVM_CREATE_VM, 0)
    assert isinstance(vm, Vm)
    assert quota.ioctl(vm, mm, uapi.KVM_SET_USER_MEMORY_REGION, at) == 0
    assert mm.reads == 1 and vm.memslots.get(0).npages == 1  # type: ignore[union-attr]
    quota.check()


# --- through a real kvmtagd -------------------------------------------------------------------

SMALL = (
    "--max-vms", "2", "--max-memslots", "2", "--max-guest-memory", "256K",
    "--max-tag-storage", "4K", "--max-connections-per-process", "6", "--max-vcpus", "2",
)  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("kvmtagd-small")
    with running_kvmtagd(directory, *SMALL) as (path, _):
        yield path, directory / "kvmtagd.log"


def errno_of(call: object) -> int:
    try:
        call()  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def test_help_documents_each_limit_and_its_default() -> None:
    done = subprocess.run([sys.executable, "-m", "kvmtag", "--help"], capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    text = " ".join(done.stdout.split())
    for flag in ("--max-connections", "--max-connections-per-process", "--max-requests-per-process",
                 "--threads", "--max-vms", "--max-memslots", "--max-guest-memory",
                 "--max-tag-storage", "--max-backing-fds", "--max-vcpus"):  # fmt: skip
        assert flag in text
    assert "(default 128G)" in text and "(default 32767)" in text and "(default 8G)" in text


def test_each_limit_through_the_daemon(small: tuple[str, Path]) -> None:
    path, log = small
    vmm = Vmm(path, npages=8)  # 32 KiB of guest memory, 1 memslot
    try:
        # memslots per VM (2): a second is fine, a third ENOSPC
        extra = os.memfd_create("extra")
        os.ftruncate(extra, 64 * PAGE)
        import mmap

        ram = mmap.mmap(extra, 64 * PAGE)
        from kvmtag import procmem

        uaddr = procmem.buffer_address(ram).address
        assert client.ioctl(vmm.vm, uapi.KVM_SET_USER_MEMORY_REGION,
                            region(1, GPA + 0x100_0000, 16 * PAGE, uaddr)) == 0  # fmt: skip
        assert errno_of(lambda: client.ioctl(
            vmm.vm, uapi.KVM_SET_USER_MEMORY_REGION, region(2, GPA + 0x200_0000, PAGE, uaddr)
        )) == errno.ENOSPC  # fmt: skip
        # guest memory per process (256 KiB): a 64-page slot in a second VM is too much now
        vm2 = client.ioctl(vmm.kvm, uapi.KVM_CREATE_VM, 0)
        assert errno_of(lambda: client.ioctl(
            vm2, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, 64 * PAGE, uaddr)
        )) == errno.ENOMEM  # fmt: skip
        assert errno_of(lambda: client.ioctl(
            vm2, uapi.KVM_SET_USER_MEMORY_REGION, region(0, GPA, 1 << 30, uaddr)
        )) == errno.E2BIG  # fmt: skip
        # VMs per process (2)
        assert errno_of(lambda: client.ioctl(vmm.kvm, uapi.KVM_CREATE_VM, 0)) == errno.ENOMEM
        # connections per process (6): kvm, vm, vm2, a vCPU, 2 more opens; then EMFILE
        vcpus = [client.ioctl(vm2, uapi.KVM_CREATE_VCPU, 0)]
        opens = [client.open(socket=path), client.open(socket=path)]
        assert errno_of(lambda: client.open(socket=path)) == errno.EMFILE
        assert errno_of(lambda: client.ioctl(vm2, uapi.KVM_CREATE_VCPU, 1)) == errno.EMFILE
        assert errno_of(lambda: client.ioctl(vm2, uapi.KVM_CREATE_VCPU, 7)) == errno.EINVAL
        for fd in opens:
            client.close(fd)
        wait_until(lambda: errno_of(lambda: vcpus.append(
            client.ioctl(vm2, uapi.KVM_CREATE_VCPU, 1))) == 0, "a file is free again")
        # vCPUs per VM (--max-vcpus 2): the kernel's EINVAL
        assert errno_of(lambda: client.ioctl(vm2, uapi.KVM_CREATE_VCPU, 2)) == errno.EINVAL
        # tag storage (4 KiB): the first page's tags fit (a slot and a table), then ENOSPC
        vmm.tags[:] = bytes([5]) * len(vmm.tags)
        assert client.ioctl(vmm.vm, uapi.KVM_ARM_MTE_COPY_TAGS,
                            copy_tags(GPA, PAGE, vmm.taddr, 0)) == PAGE  # fmt: skip
        got = errno_of(lambda: client.ioctl(
            vmm.vm, uapi.KVM_ARM_MTE_COPY_TAGS,
            copy_tags(GPA + 0x100_0000, PAGE, vmm.taddr, 0),
        ))  # fmt: skip
        assert got == errno.ENOSPC
        for fd in (*vcpus, vm2):
            client.close(fd)
        ram.close()
        os.close(extra)
    finally:
        vmm.close()
    text = log.read_text()
    for what in ("--max-memslots", "--max-guest-memory", "--max-vms", "EMFILE",
                 "--max-tag-storage"):  # fmt: skip
        assert f"{what}" in text, what
    assert text.count("limit: client process") >= 5


def test_max_connections_closes_the_next_one(tmp_path: Path) -> None:
    with running_kvmtagd(tmp_path, "--max-connections", "2") as (path, proc):
        fds = [client.open(socket=path), client.open(socket=path)]
        assert errno_of(lambda: client.open(socket=path)) == errno.EIO
        vm = errno_of(lambda: client.ioctl(fds[0], uapi.KVM_CREATE_VM, 0))
        assert vm == errno.ENFILE
        client.close(fds.pop())
        wait_until(lambda: errno_of(lambda: client.close(client.open(socket=path))) == 0,
                   "a connection is free again")  # fmt: skip
        client.close(fds[0])
        assert proc.poll() is None
    assert "(--max-connections)" in (tmp_path / "kvmtagd.log").read_text()


def test_backing_fds_beyond_the_limit_are_tags_only(tmp_path: Path) -> None:
    with running_kvmtagd(tmp_path, "--max-backing-fds", "1") as (path, _):
        a, b = Vmm(path), Vmm(path)  # one process, two memfds: the second is not held
        try:
            a.round_trip(1)
            b.round_trip(2)  # tags work on tags-only memory
        finally:
            a.close()
            b.close()
    assert "(--max-backing-fds)" in (tmp_path / "kvmtagd.log").read_text()


def test_a_client_stalling_its_callbacks_cannot_take_every_worker_thread(tmp_path: Path) -> None:
    """With 2 worker threads and 1 per process, a client whose COPY_TAGS requests wait forever
    for their tag buffers (three of them, on three VMs) holds one thread; another process
    is served meanwhile."""
    with running_kvmtagd(tmp_path, "--threads", "2", "--max-requests-per-process", "1") as (
        path, _
    ):  # fmt: skip
        staller = [Vmm(path) for _ in range(3)]
        raws = []
        try:
            for i, v in enumerate(staller):
                raw = Raw(socket.socket(fileno=os.dup(v.vm)))
                raws.append(raw)
                raw.send_event(wire.Ioctl(100 + i, uapi.KVM_ARM_MTE_COPY_TAGS, 0,
                                          copy_tags(GPA, PAGE, 0x7F00_0000, 0), True))
            ready, _, _ = select.select([r.sock for r in raws], [], [], TIMEOUT)
            assert len(ready) == 1  # one holds a thread, asking for memory; two wait
            held = next(r for r in raws if r.sock is ready[0])
            first = held.receive()
            assert isinstance(first, wire.Read)
            code = (
                "import sys\n"
                "from tests.test_daemon import Vmm\n"
                "v = Vmm(sys.argv[1]); v.round_trip(9); v.close(); print('served')\n"
            )
            done = subprocess.run(
                [sys.executable, "-c", code, path], capture_output=True, text=True,
                timeout=TIMEOUT, cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            assert done.stdout.strip() == "served", done.stderr
            # The staller answers at last: its queued requests then run, one at a time.
            held.send_event(wire.ReadData(first.id, bytes(TPP)))
            reply = held.receive()
            assert isinstance(reply, wire.Reply) and reply.result == PAGE
            waiting = [r for r in raws if r is not held]
            ready, _, _ = select.select([r.sock for r in waiting], [], [], TIMEOUT)
            assert len(ready) == 1
        finally:
            for raw in raws:
                raw.sock.close()
            for v in staller:
                v.close()
