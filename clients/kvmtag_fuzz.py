# any bytes: a reply, an errno or a clean close; never a crash, never a hang, never another client's data changed.  # noqa: E501
"""kvmtag-fuzz: the fuzzer of kvmtag's untrusted surfaces; the line above is the invariant.

Each mode checks it on its own surface:

  decoder  wire.Codec (either side) on arbitrary bytes, in arbitrary pieces, with descriptors
           attached anywhere: every input ends in events, NEED_DATA or RemoteProtocolError;
           each event encodes again and decodes to itself; no descriptor leaks.
  model    random ioctl programs against the kernel model in process (kvmtag.host, through
           the daemon's limits, kvmtag.limits.Quota): every call answers a result >= 0, a
           known negative errno or a new object; tags copied in read back; the limits'
           accounts agree with the model.
  live     against a running kvmtagd (started here unless --socket is given): random frames
           on raw connections (ended by a shutdown: the daemon must answer or close within
           --hang seconds) and random ioctl programs through kvmtag.client on VMs of the
           fuzzer's own; meanwhile a well-behaved client in another process holds a VM whose
           tags must never change, and the daemon must stay the same process.

Engines: atheris (coverage-guided libFuzzer, `pip install atheris`; kvmtag's modules are
instrumented) when installed, else a seeded random generator (--engine random forces it). A
failing input is saved under --artifacts (crash-<sha1>); `kvmtag-fuzz MODE FILE...` runs saved
inputs once, to reproduce. Budgets: --time seconds and/or --runs inputs.

    kvmtag-fuzz decoder --time 60
    kvmtag-fuzz live --time 600 --artifacts /tmp/crashes
    kvmtag-fuzz model /tmp/crashes/crash-0123abcd
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno as errno_module
import hashlib
import logging
import mmap
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

INVARIANT = (
    "any bytes: a reply, an errno or a clean close; never a crash, never a hang, never "
    "another client's data changed."
)
KNOWN_ERRNOS = set(errno_module.errorcode)
MODES = ("decoder", "model", "live")


class Failure(Exception):
    """The invariant does not hold for this input."""


# --- input decoding ------------------------------------------------------------------------


class Input:
    """Values drawn from an input's bytes (atheris' FuzzedDataProvider, or the same API over a
    plain byte string for the random engine and for reproducing)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def left(self) -> int:
        return len(self.data) - self.at

    def bytes(self, n: int) -> bytes:
        out = self.data[self.at : self.at + n]
        self.at += len(out)
        return out

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]; lo when the input is exhausted."""
        span = hi - lo
        if span <= 0:
            return lo
        nbytes = (span.bit_length() + 7) // 8
        raw = self.bytes(nbytes)
        return lo + int.from_bytes(raw.ljust(nbytes, b"\0"), "little") % (span + 1)

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.int(0, len(options) - 1)]

    def bool(self) -> bool:
        return bool(self.int(0, 1))


# --- decoder ------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _same_event(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    fa, fb = dataclasses.asdict(a), dataclasses.asdict(b)
    for d in (fa, fb):
        d.pop("fds", None)
        for key, value in list(d.items()):
            if isinstance(value, bytes | bytearray | memoryview):
                d[key] = bytes(value)
            if key == "vmas":
                d[key] = [dict(v, fd=v["fd"] is not None) for v in value]
    return fa == fb


def fuzz_decoder(data: bytes) -> None:
    from kvmtag import wire

    inp = Input(data)
    daemon_side = inp.bool()
    codec = wire.Codec(daemon=daemon_side, max_message=inp.pick([wire.MAX_MESSAGE, 4096, 64]))
    before = _open_fds()
    events = []
    try:
        while inp.left():
            piece = inp.bytes(inp.int(1, 512))
            fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(inp.int(0, 3)
                   if inp.int(0, 7) == 0 else 0)]  # fmt: skip
            codec.receive_data(piece, fds)
            while True:
                event = codec.next_event()
                if event is wire.NEED_DATA:
                    break
                events.append(event)
    except wire.RemoteProtocolError:
        pass  # the peer broke the protocol: the connection would close
    finally:
        codec.close_stray_fds()
    for event in events:
        fds = list(getattr(event, "fds", []))
        try:
            # Every event the decoder hands out can be sent again by the other side, and reads
            # back as itself.
            encoder = wire.Codec(daemon=not daemon_side)
            frame, out_fds = encoder.send(event)
            again = wire.Codec(daemon=daemon_side)
            dups = [os.dup(fd) for fd in out_fds]
            again.receive_data(frame, dups)
            decoded = again.next_event()
            for fd in getattr(decoded, "fds", []):
                os.close(fd)
            if not _same_event(event, decoded):
                raise Failure(f"{event!r:.300} re-encoded decodes as {decoded!r:.300}")
        except wire.ProtocolError as e:
            raise Failure(f"a decoded event does not encode again: {event!r:.300}: {e}") from e
        finally:
            for fd in fds:
                os.close(fd)
    if _open_fds() != before:
        raise Failure(f"descriptors leaked: {before} open before, {_open_fds()} after")


# --- model --------------------------------------------------------------------------------

P = 4096


def _ioctl_numbers() -> list[int]:
    from kvmtag import uapi

    return [*sorted(uapi.IOCTLS), 0xAE05, 0xAEFF, 0x4010AE99, 0xC008AE99, 0]


def _pack(layout: struct.Struct, values: tuple[int, ...]) -> bytes:
    """layout.pack, each value wrapped to its field's width (any integer fits)."""
    codes = []
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", layout.format):
        if code != "x":
            codes += [code] if code == "s" else [code] * int(count or 1)
    out = []
    for code, value in zip(codes, values, strict=False):
        if code == "s":
            out.append(value)
            continue
        bits = 8 * struct.calcsize(code)
        value %= 2**bits
        if code.islower() and value >= 2 ** (bits - 1):
            value -= 2**bits
        out.append(value)
    return layout.pack(*out)


def fuzz_model(data: bytes) -> None:
    from kvmtag import Host, SimulatedFile, SimulatedProcess, Vcpu, Vm, VmaKind, uapi
    from kvmtag.limits import Limits, Quota

    inp = Input(data)
    host = Host()
    # Small limits: the model itself allocates whatever a valid memslot asks (a dirty bitmap
    # of 2**31 pages); the daemon never lets it, and neither does the fuzzer.
    quota = Quota(host, Limits(max_guest_memory=64 << 20, max_tag_storage=8 << 20, max_vms=4))
    procs = [SimulatedProcess(), SimulatedProcess()]
    kvm = host.open()
    vms: list[tuple[Any, Any]] = []
    vcpus: list[tuple[Any, Any]] = []
    regions: list[tuple[int, int]] = []
    files: list[Any] = []
    numbers = _ioctl_numbers()
    layout = uapi.LAYOUT

    def call(target: Any, mm: Any, request: int, arg: int) -> Any:
        try:
            result = quota.ioctl(target, mm, request, arg)
        except Exception as e:
            raise Failure(f"ioctl {request:#x} raised {type(e).__name__}: {e}") from e
        if isinstance(result, Vm | Vcpu):
            return result
        if not isinstance(result, int) or (result < 0 and -result not in KNOWN_ERRNOS):
            raise Failure(f"ioctl {request:#x} answered {result!r}")
        return result

    def address(mm: Any, size: int) -> int:
        how = inp.int(0, 5)
        if how == 0:
            return mm.hole(max(size, 1))
        if how == 1 and regions:
            return inp.pick(regions)[0] + inp.int(0, 4) * P
        if how == 2:
            return inp.int(0, 2**64 - 1)
        return mm.alloc(min(max(size, 1), 64 * P))  # (a slot may reach past it: a hole)

    def struct_arg(mm: Any, name: str, fields: tuple[int, ...]) -> int:
        data = _pack(layout[name], fields)
        if inp.int(0, 7) == 0:  # a struct that faults part way
            addr = mm.hole(2 * P) + P - inp.int(1, len(data))
            with contextlib.suppress(ValueError):
                mm.mmap(P, addr=addr - addr % P)
            mm.copy_to_user(addr, data)
            return addr
        return mm.alloc(data)

    for _ in range(inp.int(1, 40)):
        if not inp.left():
            break
        mm = procs[inp.int(0, 7) == 0]  # now and then the other process: EIO
        op = inp.int(0, 11)
        if op == 0 or not vms:
            result = call(kvm, mm, uapi.KVM_CREATE_VM, inp.pick([0, 0, 36, 48, 1 << 8, 52]))
            if isinstance(result, Vm):
                vms.append((result, mm))
                cap = layout["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))
                call(result, mm, uapi.KVM_ENABLE_CAP, mm.alloc(cap)) if inp.bool() else None
            continue
        vm, owner = inp.pick(vms)
        if op == 1:
            pages = inp.int(1, 64)
            kind = inp.pick([VmaKind.SHMEM, VmaKind.ANON, VmaKind.FILE, VmaKind.HUGETLBFS])
            if kind is VmaKind.ANON:
                addr = owner.mmap(pages * P, readable=inp.int(0, 7) != 0, writable=inp.bool())
            else:
                # (A SimulatedProcess mapping does not keep its file alive: we do.)
                files.append(SimulatedFile(pages * P, kind))
                addr = owner.mmap(pages * P, file=files[-1], shared=inp.int(0, 3) != 0)
            regions.append((addr, pages))
        elif op in (2, 3):
            slot = inp.pick([0, 1, 2, 3, 32766, 32767, 1 << 16, inp.int(0, 2**32 - 1)])
            flags = inp.pick([0, 0, 1, 2, 3, 4])
            gpa = inp.pick([0x1000_0000, 0x1000_0000 + P * inp.int(0, 64), inp.int(0, 2**64 - 1)])
            pages = inp.pick([inp.int(0, 64), 0, 2**31, inp.int(0, 2**40)])
            uaddr = address(owner, pages * P) if inp.bool() else inp.pick(regions or [(0, 0)])[0]
            arg = struct_arg(mm, "kvm_userspace_memory_region",
                             (slot, flags, gpa, min(pages * P, 2**64 - 1), uaddr))  # fmt: skip
            call(vm, mm, uapi.KVM_SET_USER_MEMORY_REGION, arg)
        elif op in (4, 5, 6):
            npages = inp.int(0, 64)
            ipa = 0x1000_0000 + P * inp.int(-2, 80) if inp.int(0, 7) else inp.int(0, 2**64 - 1)
            length = npages * P if inp.int(0, 7) else inp.int(0, 2**32)
            flags = inp.pick([0, 1, 1, 2])
            buf = address(mm, npages * 256)
            tags = bytes(inp.int(0, 255) for _ in range(min(npages, 4) * 256))
            if flags == 0:
                mm.copy_to_user(buf, tags)
            reserved = (0, 0) if inp.int(0, 7) else (inp.int(0, 2), inp.int(0, 2))
            arg = struct_arg(mm, "kvm_arm_copy_mte_tags", (max(ipa, 0) % 2**64, length, buf,
                                                           flags, *reserved))  # fmt: skip
            result = call(vm, mm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
            if flags == 0 and result == length and 0 < length <= 4 * P and mm is owner:
                # What went in comes out (unless the same pages are read-only for tags).
                back = mm.alloc(npages * 256)
                out = layout["kvm_arm_copy_mte_tags"].pack(ipa, length, back, 1, 0, 0)
                if call(vm, mm, uapi.KVM_ARM_MTE_COPY_TAGS, mm.alloc(out)) == length:
                    want = bytes(b & 15 for b in mm.read(buf, npages * 256))
                    if mm.read(back, npages * 256) != want:
                        raise Failure(f"tags copied to {ipa:#x} read back differently")
        elif op == 7:
            request = inp.pick([uapi.KVM_GET_DIRTY_LOG, uapi.KVM_CLEAR_DIRTY_LOG,
                                uapi.KVMTAG_GET_TAG_LOG])  # fmt: skip
            spec = uapi.IOCTLS[request]
            assert spec.struct is not None
            size = layout[spec.struct].size
            values = [inp.int(0, 3) if i == 0 else inp.pick([0, 64, inp.int(0, 2**32),
                      address(mm, 4096)]) for i in range(len(layout[spec.struct].unpack(
                      bytes(size))))]  # fmt: skip
            call(vm, mm, request, struct_arg(mm, spec.struct, tuple(values)))
        elif op == 8:
            cap = inp.pick([uapi.KVM_CAP_ARM_MTE, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                            uapi.KVMTAG_CAP_TAG_LOG, inp.int(0, 300)])  # fmt: skip
            arg = layout["kvm_enable_cap"].pack(cap, inp.pick([0, 0, 1]), inp.int(0, 3), 0, 0, 0,
                                                bytes(64))  # fmt: skip
            call(vm, mm, uapi.KVM_ENABLE_CAP, mm.alloc(arg))
        elif op == 9:
            result = call(vm, mm, uapi.KVM_CREATE_VCPU, inp.pick([0, 1, 2, 511, 512, -1 % 2**32]))
            if isinstance(result, Vcpu):
                vcpus.append((result, mm))
        elif op == 10 and vcpus:
            vcpu, vmm = inp.pick(vcpus)
            request = inp.pick([uapi.KVM_ARM_VCPU_INIT, uapi.KVM_GET_ONE_REG,
                                uapi.KVM_SET_ONE_REG, uapi.KVM_GET_REG_LIST])  # fmt: skip
            if request == uapi.KVM_ARM_VCPU_INIT:
                arg = struct_arg(vmm, "kvm_vcpu_init", (inp.pick([5, 5, 0]), inp.pick([0, 1, 16]),
                                 *[0] * 6))  # fmt: skip
            elif request == uapi.KVM_GET_REG_LIST:
                arg = struct_arg(vmm, "kvm_reg_list", (inp.int(0, 64),))
            else:
                reg = inp.pick([*uapi.CORE_REGS.values(), inp.int(0, 2**64 - 1)])
                arg = struct_arg(vmm, "kvm_one_reg", (reg, address(vmm, 8)))
            call(vcpu, vmm, request, arg)
        else:  # any number, any argument, on any object
            target = inp.pick([kvm, vm] + [v for v, _ in vcpus[:2]])
            call(target, mm, inp.pick(numbers), inp.pick([0, 1, address(mm, 64)]))
    try:
        quota.check()
    except AssertionError as e:
        raise Failure(f"the limits' accounts disagree with the model: {e}") from e


# --- live ---------------------------------------------------------------------------------


class Guardian:
    """A well-behaved client in a process of its own: one VM whose tags it set once, and reads
    back on request (a line on stdin, "ok" or what differs on stdout)."""

    CODE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from tests.test_daemon import Vmm, TPP
from kvmtag import client, uapi
from tests.test_daemon import GPA, copy_tags
v = Vmm(sys.argv[1], npages=16)
tags = bytes((i * 7 + 3) % 16 for i in range(16 * TPP))
v.tags[:] = tags
size = 16 * 4096
assert client.ioctl(v.vm, uapi.KVM_ARM_MTE_COPY_TAGS, copy_tags(GPA, size, v.taddr, 0)) == size
print("ready", flush=True)
for line in sys.stdin:
    v.tags[:] = bytes(len(tags))
    got = client.ioctl(v.vm, uapi.KVM_ARM_MTE_COPY_TAGS, copy_tags(GPA, size, v.taddr, 1))
    print("ok" if got == size and v.tags[:] == tags else f"changed: {got}", flush=True)
"""

    def __init__(self, path: str) -> None:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE, path, str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the guardian client did not start")

    def check(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        answer = self.proc.stdout.readline().strip() if ready else "no answer in 30 s"
        if answer != "ok":
            raise Failure(f"another client's VM was disturbed: {answer}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Live:
    """The daemon under test, the guardian, and the fuzzer's own client state."""

    def __init__(self, socket_path: str | None, hang: float, workdir: Path) -> None:
        self.hang = hang
        self.daemon: subprocess.Popen[bytes] | None = None
        # Beside the artifacts (libFuzzer may leave by _exit, with no chance to remove it),
        # unless a socket path there would be too long for a Unix socket address.
        workdir.mkdir(parents=True, exist_ok=True)
        where = workdir if len(str(workdir)) < 64 else None
        self.tmp = tempfile.TemporaryDirectory(prefix="kvmtagd-", dir=where)
        if socket_path is None:
            socket_path = os.path.join(self.tmp.name, "kvm.sock")
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "kvmtag", "--socket-path", socket_path],
                stderr=open(os.path.join(self.tmp.name, "kvmtagd.log"), "wb"),  # noqa: SIM115
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + 30
            while not os.path.exists(socket_path):
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("kvmtagd did not start")
                time.sleep(0.01)
        self.path = socket_path
        self.pid = _peer_pid(socket_path)
        self.guardian = Guardian(socket_path)
        from kvmtag import client

        self.kvm = client.open(socket=socket_path)
        self.inputs = 0

    def close(self) -> None:
        from kvmtag import client

        self.guardian.close()
        with contextlib.suppress(OSError):
            client.close(self.kvm)
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.tmp.cleanup()

    def check_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise Failure(f"kvmtagd exited with status {self.daemon.returncode}")
        if _peer_pid(self.path) != self.pid:
            raise Failure("kvmtagd was replaced by another process")


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the fuzzer goes (libFuzzer leaves by _exit on a
    failure, with no chance to stop the daemon and the guardian itself)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _peer_pid(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int(struct.unpack("3i", creds)[0])


_live: Live | None = None


def _frames(inp: Input) -> Iterator[tuple[bytes, bool]]:
    """Frames, some well formed and most nearly so, and whether to attach a descriptor."""
    from kvmtag import uapi

    for _ in range(inp.int(1, 6)):
        kind = inp.int(0, 5)
        if kind == 0:
            yield inp.bytes(inp.int(0, 256)), inp.int(0, 15) == 0
            continue
        mtype = inp.pick([1, 3, 3, 3, 6, 8, 10, 2, 4, 5, 11, 0, 99])
        if mtype == 1:
            body = b"KVMT" + struct.pack("<HHI", inp.pick([1, 1, 2, 0]), 0, inp.int(0, 3))
        elif mtype == 3:
            request = inp.pick(_ioctl_numbers())
            spec = uapi.IOCTLS.get(request)
            flags = inp.int(0, 3)
            size = uapi.LAYOUT[spec.struct].size if spec and spec.struct else 16
            inline = inp.bytes(inp.int(0, size)) if flags & 1 else b""
            body = struct.pack("<IIQ", request, flags, inp.int(0, 2**64 - 1)) + inline
        elif mtype == 10:
            count = inp.int(0, 3)
            body = struct.pack("<II", count, 0) + inp.bytes(48 * count)
        else:
            body = inp.bytes(inp.int(0, 64))
        length = len(body) + 16 if inp.int(0, 7) else inp.int(0, 2**32 - 1)
        nfds = 0 if inp.int(0, 7) else inp.int(0, 40)
        header = struct.pack("<IHHII", length, mtype, nfds, inp.int(0, 5),
                             0 if inp.int(0, 15) else 1)  # fmt: skip
        yield header + body, nfds > 0 and inp.bool()


def _raw_session(live: Live, inp: Input) -> None:
    """Random frames on a fresh /dev/kvm connection, or on a VM connection of our own."""
    from kvmtag import client, uapi, wire

    vm = None
    if inp.bool():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(live.path)
    else:
        vm = client.ioctl(live.kvm, uapi.KVM_CREATE_VM, 0)
        sock = socket.socket(fileno=os.dup(vm))
    r, w = os.pipe()
    try:
        sock.settimeout(live.hang)
        if inp.int(0, 3):
            hello = b"KVMT" + struct.pack("<HHI", 1, 0, 0)
            sock.sendall(struct.pack("<IHHII", 28, 1, 0, 1, 0) + hello)
        try:
            for data, with_fd in _frames(inp):
                if with_fd and data:
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           struct.pack("i", w))])  # fmt: skip
                else:
                    sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return  # closed on us: a clean close
        codec = wire.Codec(daemon=False)
        deadline = time.monotonic() + live.hang
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 32))
            except ConnectionResetError:
                return
            except TimeoutError:
                raise Failure(f"no answer and no close within {live.hang} s") from None
            for level, kind, raw in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    for fd in struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4]):
                        os.close(fd)
            if not data:
                return  # a clean close
            codec.receive_data(data)
            try:
                while codec.next_event() is not wire.NEED_DATA:
                    pass
            except wire.RemoteProtocolError as e:
                raise Failure(f"kvmtagd sent a frame that is not the protocol: {e}") from e
            if time.monotonic() > deadline:
                raise Failure(f"still talking after {live.hang} s")
    finally:
        sock.close()
        os.close(r)
        os.close(w)
        if vm is not None:
            client.close(vm)


def _ioctl_session(live: Live, inp: Input) -> None:
    """A random ioctl program through the real client on a VM of our own."""
    from kvmtag import client, procmem, uapi

    vm = client.ioctl(live.kvm, uapi.KVM_CREATE_VM, 0)
    files: list[int] = [vm]
    maps: list[mmap.mmap] = []
    memfds: list[int] = []
    buf = mmap.mmap(-1, 64 * P)
    base = procmem.buffer_address(buf).address

    def ioctl(fd: int, request: int, arg: int | bytes) -> None:
        try:
            result = client.ioctl(fd, request, arg)
        except OSError as e:
            if e.errno == errno_module.EIO or e.errno not in KNOWN_ERRNOS:
                raise Failure(f"ioctl {request:#x}: {e}") from e
            return
        if request in (uapi.KVM_CREATE_VCPU,) and result >= 0:
            files.append(result)

    try:
        for _ in range(inp.int(1, 12)):
            if not inp.left():
                break
            op = inp.int(0, 6)
            if op == 0:
                pages = inp.int(1, 64)
                fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
                os.ftruncate(fd, pages * P)
                memfds.append(fd)
                m = mmap.mmap(fd, pages * P)
                maps.append(m)
                arg = uapi.LAYOUT["kvm_userspace_memory_region"].pack(
                    inp.int(0, 3), inp.pick([0, 1, 2]), 0x1000_0000 + inp.int(0, 64) * P,
                    pages * P, procmem.buffer_address(m).address)  # fmt: skip
                ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, arg)
            elif op == 1 and memfds:
                os.ftruncate(inp.pick(memfds), inp.int(0, 4) * P)  # the VMM pulls RAM away
            elif op == 2:
                cap = uapi.LAYOUT["kvm_enable_cap"].pack(
                    inp.pick([uapi.KVM_CAP_ARM_MTE, uapi.KVMTAG_CAP_TAG_LOG,
                              uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2]), 0, inp.int(0, 3),
                    0, 0, 0, bytes(64))  # fmt: skip
                ioctl(vm, uapi.KVM_ENABLE_CAP, cap)
            elif op == 3:
                npages = inp.int(0, 64)
                addr = inp.pick([base, base, base + 63 * P, 0, 0x10, inp.int(0, 2**64 - 1)])
                arg = uapi.LAYOUT["kvm_arm_copy_mte_tags"].pack(
                    0x1000_0000 + inp.int(0, 64) * P, npages * P, addr, inp.int(0, 1), 0, 0)
                ioctl(vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg if inp.bool() else _at(buf, arg))
            elif op == 4:
                ioctl(vm, uapi.KVM_CREATE_VCPU, inp.int(0, 3))
            elif op == 5 and len(files) > 1:
                vcpu = inp.pick(files[1:])
                request = inp.pick([uapi.KVM_RUN, uapi.KVM_ARM_VCPU_INIT, uapi.KVM_GET_ONE_REG])
                if request == uapi.KVM_RUN:
                    ioctl(vcpu, request, 0)
                else:
                    ioctl(vcpu, request, inp.bytes(32).ljust(32, b"\0"))
            else:
                request = inp.pick(_ioctl_numbers())
                spec = uapi.IOCTLS.get(request)
                size = uapi.LAYOUT[spec.struct].size if spec and spec.struct else 8
                arg = inp.bytes(size).ljust(size, b"\0") if inp.bool() else inp.pick([0, base])
                ioctl(inp.pick(files), request, arg)
    finally:
        for fd in reversed(files):
            with contextlib.suppress(OSError):
                client.close(fd)
        for m in maps:
            m.close()
        for fd in memfds:
            os.close(fd)
        buf.close()


def _at(buf: mmap.mmap, data: bytes) -> int:
    """data placed at the end of buf (whose address is then passed, not the bytes)."""
    from kvmtag import procmem

    buf[len(buf) - len(data) :] = data
    return procmem.buffer_address(buf).address + len(buf) - len(data)


def fuzz_live(data: bytes) -> None:
    live = _live
    assert live is not None, "start_live first"
    inp = Input(data)
    live.inputs += 1
    if inp.bool():
        _raw_session(live, inp)
    else:
        _ioctl_session(live, inp)
    live.check_daemon()
    if live.inputs % 8 == 1 or not inp.left():
        live.guardian.check()


# --- engines ------------------------------------------------------------------------------

TARGETS: dict[str, Callable[[bytes], None]] = {
    "decoder": fuzz_decoder, "model": fuzz_model, "live": fuzz_live,
}  # fmt: skip


def _save(artifacts: Path, data: bytes) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def run_random(target: Callable[[bytes], None], args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    start, runs = time.monotonic(), 0
    while (args.runs is None or runs < args.runs) and (
        args.time is None or time.monotonic() - start < args.time
    ):
        size = rng.choice([8, 32, 128, 512, 2048])
        data = rng.randbytes(rng.randint(0, size))
        runs += 1
        try:
            target(data)
        except Exception:
            traceback.print_exc()
            print(f"kvmtag-fuzz: failing input saved as {_save(args.artifacts, data)}",
                  file=sys.stderr)  # fmt: skip
            return 1
    print(f"Done {runs} runs in {time.monotonic() - start:.0f} second(s)", flush=True)
    return 0


def run_atheris(target: Callable[[bytes], None], args: argparse.Namespace) -> int:
    import atheris

    argv = [sys.argv[0], f"-artifact_prefix={args.artifacts}/", f"-seed={args.seed or 1}",
            f"-timeout={int(args.hang * 2) + 5}", "-rss_limit_mb=4096", "-print_final_stats=1"]
    if args.time is not None:
        argv.append(f"-max_total_time={int(args.time)}")
    if args.runs is not None:
        argv.append(f"-runs={args.runs}")
    args.artifacts.mkdir(parents=True, exist_ok=True)
    atheris.Setup(argv, target)
    atheris.Fuzz()  # exits the process: 0 when the budget is spent, non-zero on a failure
    return 0


def _instrument(engine: str) -> None:
    """Import kvmtag's modules, instrumented for coverage when atheris runs."""
    if engine != "atheris":
        import kvmtag.limits
        import kvmtag.wire
        return
    import atheris

    with atheris.instrument_imports(include=["kvmtag"]):
        import kvmtag.client
        import kvmtag.host
        import kvmtag.limits
        import kvmtag.wire  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvmtag-fuzz", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))  # fmt: skip
    p.add_argument("mode", choices=MODES)
    p.add_argument("inputs", nargs="*", type=Path, help="run these saved inputs once")
    p.add_argument("--time", type=float, default=None, help="seconds to fuzz")
    p.add_argument("--runs", type=int, default=None, help="inputs to run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    p.add_argument("--socket", default=None, help="live: fuzz this kvmtagd (else start one)")
    p.add_argument("--hang", type=float, default=10.0,
                   help="live: seconds within which kvmtagd must answer or close")
    args = p.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if args.inputs:
        engine = "random"  # reproducing: no instrumentation needed
    if not args.inputs and args.time is None and args.runs is None:
        args.time = 60.0
    _instrument(engine)
    logging.disable(logging.WARNING)  # the limits' refusals are expected here, by the thousand
    print(f"kvmtag-fuzz {args.mode}: {INVARIANT} (engine: {engine})", flush=True)
    global _live
    if args.mode == "live":
        _live = Live(args.socket, args.hang, args.artifacts)
    try:
        target = TARGETS[args.mode]
        if args.inputs:
            for path in args.inputs:
                target(path.read_bytes())
                print(f"{path}: ok")
            return 0
        if engine == "atheris":
            if _live is not None:
                import atexit

                atexit.register(_live.close)  # atheris leaves through exit()
            return run_atheris(target, args)
        return run_random(target, args)
    finally:
        logging.disable(logging.NOTSET)
        if _live is not None and engine != "atheris":
            _live.close()


if __name__ == "__main__":
    sys.exit(main())
