"""kvmtagd's connections: the kernel model served over Unix sockets, with trio.

One connection per open file: the listening socket's connections are /dev/kvm opens; each VM
and vCPU the model creates gets a socketpair, whose far end travels back in the REPLY so the
VMM holds a real fd. Each connection has one request in flight; bulk work runs on worker
threads so no client stalls another. A protocol violation closes only its connection.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import struct
from collections.abc import Hashable
from typing import Any

import trio

from kvmtag import uapi, wire
from kvmtag.host import Host, KvmFile
from kvmtag.remote import INLINE_ADDR, RemoteMemory
from kvmtag.usermem import Vma
from kvmtag.vcpu import Vcpu
from kvmtag.vm import Vm

log = logging.getLogger("kvmtag.daemon")

# Requests that never reach user memory beyond an inline struct: answered on the event loop,
# without a thread hop (they are the latency-sensitive small ioctls).
_ON_LOOP = {
    uapi.KVM_GET_API_VERSION, uapi.KVM_CREATE_VM, uapi.KVM_CHECK_EXTENSION,
    uapi.KVM_GET_VCPU_MMAP_SIZE, uapi.KVM_CREATE_VCPU, uapi.KVM_ENABLE_CAP,
}  # fmt: skip
_RECV_SIZE = wire.MAX_MESSAGE  # a whole bulk frame in one receive when the socket has it
_ANC_SIZE = socket.CMSG_SPACE(wire.MAX_FDS * 4)
MAX_HELD_FDS = 1024  # backing-memory fds held per client process


class ConnectionClosed(Exception):
    pass


class Connection:
    """Frame I/O on one socket: events in, events out, descriptors both ways."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.codec = wire.Codec(daemon=True)
        # Received into, then handed to the codec; small until bulk data arrives (a daemon
        # serves many connections, most of which only ever carry small ioctls).
        self._rbuf = bytearray(65536)

    async def next_event(self) -> wire.Event:
        while True:
            event = self.codec.next_event()
            if event is not wire.NEED_DATA:
                return event  # type: ignore[return-value]
            n, ancdata, flags, _ = await self.sock.recvmsg_into(
                [self._rbuf], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            fds = _fds_of(ancdata)
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                raise wire.RemoteProtocolError("too many descriptors in one message")
            if not n:
                _close(fds)
                raise ConnectionClosed
            self.codec.receive_data(memoryview(self._rbuf)[:n], fds)
            if n == len(self._rbuf) < _RECV_SIZE:
                self._rbuf = bytearray(_RECV_SIZE)

    async def send(self, event: wire.Event) -> None:
        parts, fds = self.codec.frame(event)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = await self.sock.sendmsg(parts, anc)  # bulk data goes out without a copy
        for part in parts:
            view = memoryview(part).cast("B")
            while sent < len(view):
                view = view[sent:]
                sent = await self.sock.send(view)
            sent -= len(view)

    async def roundtrip(self, event: wire.Event) -> wire.Event:
        """A callback of the request in flight: send it, return the client's answer."""
        await self.send(event)
        answer = await self.next_event()
        expected = {wire.Read: wire.ReadData, wire.Write: wire.WriteDone, wire.Vmas: wire.VmasData}
        if answer.id != event.id or not isinstance(answer, expected[type(event)]):
            _close(getattr(answer, "fds", []))
            got, asked = type(answer).__name__, type(event).__name__
            raise wire.RemoteProtocolError(f"{got} {answer.id} in answer to {asked} {event.id}")
        return answer


class Server:
    """Serves one `Host` to any number of connections."""

    def __init__(self, host: Host, *, threads: int = 32) -> None:
        self.host = host
        self.limiter = trio.CapacityLimiter(threads)
        self._connections: dict[Hashable, int] = {}  # open connections per client process
        self._held: dict[Hashable, dict[tuple[int, int], int]] = {}  # (dev, ino) -> fd
        self._nursery: trio.Nursery | None = None

    async def serve(
        self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as e:  # EMFILE and friends: keep serving the others
                    log.warning("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                key = _peer_process(sock)
                self._hold(key)
                nursery.start_soon(self.serve_connection, sock, self.host.open(), key)

    async def serve_connection(
        self, sock: trio.socket.SocketType, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> None:
        """Serve one connection; the caller has counted it with `_hold(process)`."""
        kind = _kind_of(target)
        conn = Connection(sock)
        try:
            await self._serve(conn, kind, target, process)
        except ConnectionClosed:
            pass
        except wire.RemoteProtocolError as e:
            log.warning("%s connection of %s broke the protocol: %s", kind.name, process, e)
            with contextlib.suppress(OSError, trio.ClosedResourceError, wire.ProtocolError):
                await conn.send(wire.Error(0, errno.EPROTO, str(e)))
                await _drain(sock)
        except (OSError, trio.BrokenResourceError) as e:
            log.info("%s connection of %s: %s", kind.name, process, e)
        except Exception:  # kvmtag's own bug: lose this connection, never the daemon
            log.exception("%s connection of %s failed; closing it", kind.name, process)
        finally:
            sock.close()
            conn.codec.close_stray_fds()
            self._connections[process] -= 1
            if not self._connections[process]:
                self._release(process)

    async def _serve(
        self, conn: Connection, kind: wire.FdKind, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> None:
        await self._handshake(conn, kind)
        while True:
            event = await conn.next_event()
            if not isinstance(event, wire.Ioctl):
                _close(getattr(event, "fds", []))
                raise wire.RemoteProtocolError(f"{type(event).__name__} out of turn")
            reply = await self._dispatch(conn, event, target, process)
            try:
                await conn.send(reply)
            finally:
                _close(reply.fds)

    async def _handshake(self, conn: Connection, kind: wire.FdKind) -> None:
        hello = await conn.next_event()
        if not isinstance(hello, wire.Hello):
            raise wire.RemoteProtocolError("the first frame must be HELLO")
        config = self.host.config
        reply = wire.HelloReply(
            hello.id, kind, config.page_size, config.profile.name,
            errno=0 if hello.major == wire.VERSION[0] else errno.EPROTONOSUPPORT,
            extensions=uapi.KVMTAG_EXT_TAG_LOG,
        )  # fmt: skip
        await conn.send(reply)
        if reply.errno:
            raise ConnectionClosed

    async def _dispatch(
        self, conn: Connection, req: wire.Ioctl, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> wire.Reply:
        arg = INLINE_ADDR if req.inline is not None else req.arg
        spec = uapi.IOCTLS.get(req.request)
        if spec is None:
            on_loop = True  # unknown to arm64 KVM: EINVAL, no memory touched
        elif spec.arg in (uapi.Arg.INT, uapi.Arg.NONE):
            arg = req.arg  # a value, never a pointer: an inline struct means nothing here
            on_loop = req.request in _ON_LOOP
        else:
            on_loop = req.request in _ON_LOOP and req.inline is not None

        def adopt(vmas: list[Vma]) -> list[Vma]:
            return self._adopt(process, vmas)

        mm = RemoteMemory(req, process, None if on_loop else conn.roundtrip, adopt)
        if on_loop:
            result = target.ioctl(mm, req.request, arg)
        else:
            result = await trio.to_thread.run_sync(
                target.ioctl, mm, req.request, arg, limiter=self.limiter
            )
        back = bytes(mm.inline) if mm.written_back and mm.inline is not None else None
        if isinstance(result, Vm | Vcpu):
            return wire.Reply(req.id, 0, 0, back, self._new_connection(result, process))
        if result < 0:
            return wire.Reply(req.id, -1, -result, back)
        return wire.Reply(req.id, result, 0, back)

    def _new_connection(self, target: Vm | Vcpu, process: Hashable) -> list[int]:
        """A socketpair for a new VM or vCPU: serve one end, hand the other to the client
        (and, for a vCPU, the shared memory object behind its kvm_run area)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._hold(process)
        assert self._nursery is not None
        self._nursery.start_soon(
            self.serve_connection, trio.socket.from_stdlib_socket(ours), target, process
        )
        fds = [theirs.detach()]
        if isinstance(target, Vcpu):
            fds.append(os.dup(target.run_fd))  # the kvm_run area, which the model updates
        return fds

    def _adopt(self, process: Hashable, vmas: list[Vma]) -> list[Vma]:
        """Hold the backing fds that came with a VMAS answer for the life of the process,
        one per (dev, ino), so an inode number cannot be reused under its tags."""
        held = self._held.setdefault(process, {})
        out = []
        for vma in vmas:
            if vma.fd is None:
                out.append(vma)
                continue
            key = (vma.dev, vma.ino)
            if key in held:
                os.close(vma.fd)
                fd: int | None = held[key]
            elif len(held) < MAX_HELD_FDS:
                fd = held[key] = vma.fd
            else:
                log.warning("%s holds %d backing fds: treating more as tags-only", process,
                            MAX_HELD_FDS)  # fmt: skip
                os.close(vma.fd)
                fd = None
            out.append(dataclasses.replace(vma, fd=fd))
        return out

    def _hold(self, process: Hashable) -> None:
        self._connections[process] = self._connections.get(process, 0) + 1

    def _release(self, process: Hashable) -> None:
        del self._connections[process]
        self.host.release_process(process)
        _close(list(self._held.pop(process, {}).values()))
        log.info("client process %s gone: its memory and tags released", process)


async def _drain(sock: trio.socket.SocketType) -> None:
    """Read and drop what the peer still sends, briefly: closing a Unix socket with unread
    bytes makes the peer's next read fail with ECONNRESET before it sees our ERROR frame."""
    sock.shutdown(socket.SHUT_WR)
    with trio.move_on_after(0.2):
        for _ in range(64):
            data, ancdata, _, _ = await sock.recvmsg(_RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            _close(_fds_of(ancdata))
            if not data:
                break


def _kind_of(target: KvmFile | Vm | Vcpu) -> wire.FdKind:
    if isinstance(target, Vm):
        return wire.FdKind.VM
    if isinstance(target, Vcpu):
        return wire.FdKind.VCPU
    return wire.FdKind.SYSTEM


def _peer_process(sock: trio.socket.SocketType) -> Hashable:
    """The connecting process, from SO_PEERCRED: (pid, start time), so a recycled pid is a
    different process."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        start = 0
    log.info("connection from pid %d uid %d gid %d", pid, uid, gid)
    return (pid, start)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
