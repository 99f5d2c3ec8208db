"""kvmtagd's connections: the kernel model served over Unix sockets, with trio.

One connection per open file: the listening socket's connections are /dev/kvm opens; each VM
and vCPU the model creates gets a socketpair, whose far end travels back in the REPLY so the
VMM holds a real fd. Each connection has one request in flight; bulk work runs on worker
threads so no client stalls another. A protocol violation closes only its connection.

Who may connect: every connection's peer credentials (SO_PEERCRED) are logged, and checked
against `Access` (--allow-uid, --allow-gid) before anything is read from it; a refused peer's
connection is closed at once. What it may hold: `kvmtag.limits` (connections per process and
per daemon, requests in flight per process, VMs, memslots, guest memory, tag storage, backing
fds). Stopping: `drain` closes idle connections at once and lets requests in flight finish
for a bounded time.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import socket
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import trio

from kvmtag import uapi, wire
from kvmtag.host import Host, KvmFile
from kvmtag.limits import Limits, Quota
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
MAX_HELD_FDS = Limits.max_backing_fds  # backing-memory fds held per client process (default)
# The largest HELLO or IOCTL frame (an IOCTL's inline struct: KVM's are all far smaller). Only
# an answer to a callback may be bulk-sized, so a connection waiting for its next request never
# buffers more than this (nor grows its receive buffer), whatever its peer sends.
IDLE_MAX_MESSAGE = wire.HEADER_SIZE + 16 + 64 * 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python 3.11's socket
REFUSED_HELLO_TIMEOUT = 5.0  # seconds a connection refused by a limit has to say HELLO
GC_DELAY = 1.0  # seconds between a VM's release and the collection that frees it


@dataclass(frozen=True)
class Peer:
    """The credentials of a connecting process (SO_PEERCRED), and its identity: (pid, start
    time), so that a recycled pid is a different process."""

    pid: int
    uid: int
    gid: int
    start: int

    @property
    def process(self) -> Hashable:
        return (self.pid, self.start)


@dataclass(frozen=True)
class Access:
    """Who may connect: with no list, anyone who can open the socket (its mode and group
    decide); else a peer whose uid is in `uids`, or whose primary or supplementary group is
    in `gids` (SO_PEERGROUPS)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, peer: Peer, sock: trio.socket.SocketType) -> bool:
        if not self.uids and not self.gids:
            return True
        if peer.uid in self.uids or peer.gid in self.gids:
            return True
        return bool(self.gids) and not self.gids.isdisjoint(_peer_groups(sock))


class ConnectionClosed(Exception):
    pass


class Connection:
    """Frame I/O on one socket: events in, events out, descriptors both ways."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.codec = wire.Codec(daemon=True)
        # Small frames are received into this, then handed to the codec; bulk frames go
        # straight into their own buffer (Codec.receive_into).
        self._rbuf = bytearray(65536)

    async def next_event(self) -> wire.Event:
        while True:
            event = self.codec.next_event()
            if event is not wire.NEED_DATA:
                return event  # type: ignore[return-value]
            room = self.codec.receive_into()  # a bulk frame: straight into its own buffer
            target = room if room is not None else self._rbuf
            n, ancdata, flags, _ = await self.sock.recvmsg_into(
                [target], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            fds = _fds_of(ancdata)
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                raise wire.RemoteProtocolError("too many descriptors in one message")
            if not n:
                _close(fds)
                raise ConnectionClosed
            if room is not None:
                self.codec.received(n, fds)
            else:
                self.codec.receive_data(memoryview(target)[:n], fds)

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

    def __init__(
        self,
        host: Host,
        *,
        threads: int | None = None,
        limits: Limits | None = None,
        access: Access | None = None,
    ) -> None:
        self.host = host
        self.limits = limits or Limits()
        self.access = access or Access()
        self.quota = Quota(host, self.limits, self._fd_available)
        self.limiter = trio.CapacityLimiter(threads or self.limits.threads)
        self._connections: dict[Hashable, int] = {}  # open connections per client process
        self._total = 0  # open connections of all processes
        self._held: dict[Hashable, dict[tuple[int, int], int]] = {}  # (dev, ino) -> fd
        self._process_limiters: dict[Hashable, trio.CapacityLimiter] = {}
        self._vm_connections: dict[Vm, int] = {}  # connections that keep each VM alive
        self._nursery: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None
        self._idle: set[trio.CancelScope] = set()  # connections waiting for a request
        self._busy = 0  # requests received and not yet answered
        self._quiet = trio.Event()  # set when draining and no request is left
        self.draining = False
        self._released = False  # a VM or process was released since the last collection
        self.served = 0  # requests answered, for figures
        self.refused = 0  # connections refused (access control or a limit)

    async def serve(
        self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until cancelled (or `drain` stops accepting; connections already
        open are served until they close or the caller cancels)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._collect_garbage)
            with trio.CancelScope() as self._accepting:
                task_status.started()
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as e:  # EMFILE and friends: keep serving the others
                        log.warning("accept failed: %s", e)
                        await trio.sleep(0.1)
                        continue
                    self._accept(sock, nursery)
            await trio.sleep_forever()  # the connections' tasks run in this nursery

    async def _collect_garbage(self) -> None:
        """A VM is in reference cycles (its ioctl table of bound methods, its vCPUs and their
        VM), so reference counting alone never frees a released one: its vCPUs' kvm_run
        memfds and its bitmaps would wait for the cyclic collector's next full pass, which an
        idle daemon may not run for a long time. Collect within a second of a release."""
        while True:
            await trio.sleep(GC_DELAY)
            if self._released:
                self._released = False
                gc.collect()

    def _accept(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Check a new connection's peer and the limits; serve it, or close it."""
        try:
            peer = _peer_credentials(sock)
            allowed = self.access.allows(peer, sock)
        except OSError as e:  # the peer is already gone
            log.info("connection closed before its credentials were read: %s", e)
            sock.close()
            return
        if not allowed:
            log.warning("refused connection from pid %d uid %d gid %d: not allowed by "
                        "--allow-uid/--allow-gid", peer.pid, peer.uid, peer.gid)  # fmt: skip
            self.refused += 1
            sock.close()
            return
        if self._total >= self.limits.max_connections:
            log.warning("refused connection from pid %d: the daemon serves %d connections "
                        "(--max-connections)", peer.pid, self._total)  # fmt: skip
            self.refused += 1
            sock.close()
            return
        refusal = 0
        if self._connections.get(peer.process, 0) >= self.limits.max_connections_per_process:
            log.warning("refused connection from pid %d: it holds %d connections "
                        "(--max-connections-per-process): EMFILE", peer.pid,
                        self._connections[peer.process])  # fmt: skip
            self.refused += 1
            refusal = errno.EMFILE
        self._hold(peer.process)
        nursery.start_soon(self.serve_connection, sock, self.host.open(), peer.process, refusal)

    def _fd_available(self, process: Hashable) -> int:
        """May process open one more file (a VM or vCPU connection)? 0, or the errno."""
        if self._connections.get(process, 0) >= self.limits.max_connections_per_process:
            return errno.EMFILE
        if self._total >= self.limits.max_connections:
            return errno.ENFILE
        return 0

    async def serve_connection(
        self,
        sock: trio.socket.SocketType,
        target: KvmFile | Vm | Vcpu,
        process: Hashable,
        refusal: int = 0,
    ) -> None:
        """Serve one connection; the caller has counted it with `_hold(process)`. With
        `refusal`, answer the handshake with that errno and close."""
        kind = _kind_of(target)
        conn = Connection(sock)
        vm = target if isinstance(target, Vm) else target.vm if isinstance(target, Vcpu) else None
        if vm is not None:
            self._vm_connections[vm] = self._vm_connections.get(vm, 0) + 1
        try:
            if refusal:
                with trio.move_on_after(REFUSED_HELLO_TIMEOUT):
                    await self._handshake(conn, kind, refusal)
            else:
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
            if vm is not None:
                self._vm_connections[vm] -= 1
                if not self._vm_connections[vm]:  # no fd refers to the VM any more
                    del self._vm_connections[vm]
                    self.quota.vm_released(vm)
                    self._released = True
            self._connections[process] -= 1
            self._total -= 1
            if not self._connections[process]:
                self._release(process)

    async def _serve(
        self, conn: Connection, kind: wire.FdKind, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> None:
        if self.draining:
            return
        await self._handshake(conn, kind)
        while True:
            # Waiting for a request: `drain` closes the connection here.
            conn.codec.max_message = IDLE_MAX_MESSAGE
            with trio.CancelScope() as idle:
                self._idle.add(idle)
                try:
                    event = await conn.next_event()
                finally:
                    self._idle.discard(idle)
            if idle.cancelled_caught:
                return
            conn.codec.max_message = wire.MAX_MESSAGE  # callback answers may be bulk
            self._busy += 1
            try:
                if not isinstance(event, wire.Ioctl):
                    _close(getattr(event, "fds", []))
                    raise wire.RemoteProtocolError(f"{type(event).__name__} out of turn")
                reply = await self._dispatch(conn, event, target, process)
                try:
                    await conn.send(reply)
                finally:
                    _close(reply.fds)
                self.served += 1
            finally:
                self._busy -= 1
                if self.draining and not self._busy:
                    self._quiet.set()
            if self.draining:
                return  # the request in flight is answered; refuse the next by closing

    async def _handshake(self, conn: Connection, kind: wire.FdKind, refusal: int = 0) -> None:
        conn.codec.max_message = IDLE_MAX_MESSAGE
        hello = await conn.next_event()
        if not isinstance(hello, wire.Hello):
            raise wire.RemoteProtocolError("the first frame must be HELLO")
        config = self.host.config
        reply = wire.HelloReply(
            hello.id, kind, config.page_size, config.profile.name,
            errno=refusal or (0 if hello.major == wire.VERSION[0] else errno.EPROTONOSUPPORT),
            extensions=uapi.KVMTAG_EXT_TAG_LOG,
        )  # fmt: skip
        await conn.send(reply)
        if reply.errno:
            raise ConnectionClosed

    async def drain(self) -> None:
        """Stop: accept nothing more, close every connection waiting for a request, and
        return once each request in flight is answered (its connection then closes). The
        caller bounds the wait and then cancels what is left."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for idle in list(self._idle):
            idle.cancel()
        # Let a connection whose request arrived just before the cancellation count it.
        await trio.lowlevel.checkpoint()
        if self._busy:
            await self._quiet.wait()

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
            result = self.quota.ioctl(target, mm, req.request, arg)
        else:
            # At most max_requests_per_process of one process's requests hold worker threads
            # at once: a client that stalls its callbacks cannot take every thread.
            per_process = self._process_limiters.get(process)
            if per_process is None:
                per_process = self._process_limiters[process] = trio.CapacityLimiter(
                    self.limits.max_requests_per_process
                )
            async with per_process:
                result = await trio.to_thread.run_sync(
                    self.quota.ioctl, target, mm, req.request, arg, limiter=self.limiter
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
        self._hold(process)  # (the quota checked that the process may open it)
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
            elif len(held) < self.limits.max_backing_fds:
                fd = held[key] = vma.fd
            else:
                log.warning("limit: client process %s holds %d backing fds "
                            "(--max-backing-fds): treating more as tags-only", process,
                            len(held))  # fmt: skip
                os.close(vma.fd)
                fd = None
            out.append(dataclasses.replace(vma, fd=fd))
        return out

    def _hold(self, process: Hashable) -> None:
        self._connections[process] = self._connections.get(process, 0) + 1
        self._total += 1

    def _release(self, process: Hashable) -> None:
        del self._connections[process]
        self._process_limiters.pop(process, None)
        self.quota.process_released(process)
        self.host.release_process(process)
        _close(list(self._held.pop(process, {}).values()))
        log.info("client process %s gone: its memory and tags released", process)

    def stats(self) -> dict[str, int]:
        """What the daemon holds, for its STATUS line, SIGUSR1 and tests."""
        return {
            "connections": self._total,
            "processes": len(self._connections),
            "vms": self.quota.vms(),
            "guest_memory": self.quota.guest_memory(),
            "tag_storage": self.host.tags.nbytes,
            "backing_fds": sum(len(h) for h in self._held.values()),
            "in_flight": self._busy,
            "served": self.served,
            "refused": self.refused,
            "tasks": _count_tasks(),
        }


async def _drain(sock: trio.socket.SocketType) -> None:
    """Read and drop what the peer still sends, briefly: closing a Unix socket with unread
    bytes makes the peer's next read fail with ECONNRESET before it sees our ERROR frame."""
    sock.shutdown(socket.SHUT_WR)
    with trio.move_on_after(0.2):
        for _ in range(64):
            data, ancdata, _, _ = await sock.recvmsg(65536, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            _close(_fds_of(ancdata))
            if not data:
                break


def _kind_of(target: KvmFile | Vm | Vcpu) -> wire.FdKind:
    if isinstance(target, Vm):
        return wire.FdKind.VM
    if isinstance(target, Vcpu):
        return wire.FdKind.VCPU
    return wire.FdKind.SYSTEM


def _peer_credentials(sock: trio.socket.SocketType) -> Peer:
    """The connecting process, from SO_PEERCRED, logged."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        start = 0
    log.info("connection from pid %d uid %d gid %d", pid, uid, gid)
    return Peer(pid, uid, gid, start)


def _peer_groups(sock: trio.socket.SocketType) -> set[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, as they were when it connected)."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 65536 * 4:
                size *= 4
                continue
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return set()  # a kernel before 4.13: the primary group only
            raise
        return set(array.array("I", raw[: len(raw) - len(raw) % 4]))


def _count_tasks() -> int:
    """Tasks alive in this trio run (a leak shows here)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:  # not in a trio run
        return 0
    count, todo = 0, [root] if root is not None else []
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


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
