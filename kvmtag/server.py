"""kvmtagd's connections: the kernel model served over Unix sockets, with trio.

One connection per open file: the listening socket's connections are /dev/kvm opens; each VM
and vCPU the model creates gets a socketpair, whose far end travels back in the REPLY so the
VMM holds a real fd. Each connection has one request in flight, served on the connection's own
thread with blocking I/O, as KVM runs an ioctl in its caller's thread: no client stalls
another, a callback (READ, WRITE, VMAS) is a plain send and receive, and a small ioctl costs
two system calls and the model's work rather than trips through an event loop (the budget of
shared/DESIGN.md is 2.5 socketpair ping-pongs; trio's own echo server takes about 2). trio
supervises: it accepts, starts and counts connections, enforces the limits on them, runs the
watchdog and the collector, and stops the daemon. A protocol violation closes only its
connection.

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
import fcntl
import gc
import logging
import mmap
import os
import socket
import struct
import threading
import time
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

# Requests that never reach user memory beyond an inline struct: they take no bulk-work slot.
_SMALL = {
    uapi.KVM_GET_API_VERSION, uapi.KVM_CREATE_VM, uapi.KVM_CHECK_EXTENSION,
    uapi.KVM_GET_VCPU_MMAP_SIZE, uapi.KVM_CREATE_VCPU, uapi.KVM_ENABLE_CAP,
}  # fmt: skip
_VALUE_ARG = frozenset(
    request for request, spec in uapi.IOCTLS.items() if spec.arg in (uapi.Arg.INT, uapi.Arg.NONE)
)  # requests whose argument is a value, never a pointer
# Per connection, for small frames (most are 32 bytes; a larger one takes a few receives);
# bulk frames are received straight into their own buffer.
RECEIVE_BUFFER = 16 * 1024
_ANC_SIZE = socket.CMSG_SPACE(wire.MAX_FDS * 4)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: an IntFlag operation costs a call
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

    def allows(self, peer: Peer, sock: socket.socket) -> bool:
        if not self.uids and not self.gids:
            return True
        if peer.uid in self.uids or peer.gid in self.gids:
            return True
        return bool(self.gids) and not self.gids.isdisjoint(_peer_groups(sock))


class ConnectionClosed(Exception):
    pass


class Slots:
    """At most `n` holders at once; more wait. threading.BoundedSemaphore does the same through
    a Python-level Condition on every acquire and release; this takes only a C lock unless
    someone has to wait."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting = 0
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    def __enter__(self) -> None:
        with self._lock:
            while not self._free:
                self._waiting += 1
                try:
                    self._freed.wait()
                finally:
                    self._waiting -= 1
            self._free -= 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._free += 1
            if self._waiting:
                self._freed.notify()


class Connection:
    """Frame I/O on one socket, blocking, used by the connection's thread only: events in,
    events out, descriptors both ways."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.codec = wire.Codec(daemon=True)
        self.window: mmap.mmap | None = None  # shared with the client, if it asked (VM only)
        # Small frames are received into this, then handed to the codec; bulk frames go
        # straight into their own buffer (Codec.receive_into).
        self._rbuf = bytearray(RECEIVE_BUFFER)

    def next_event(self) -> wire.Event:
        while True:
            event = self.codec.next_event()
            if event is not wire.NEED_DATA:
                return event  # type: ignore[return-value]
            room = self.codec.receive_into()  # a bulk frame: straight into its own buffer
            target = room if room is not None else self._rbuf
            n, ancdata, flags, _ = self.sock.recvmsg_into(
                [target], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            if room is None and not ancdata and not flags & _MSG_CTRUNC:
                request = self.codec.plain_ioctl(memoryview(target)[:n])  # the common case
                if request is not None:
                    return request
            fds = _fds_of(ancdata) if ancdata else []
            if flags & _MSG_CTRUNC:
                _close(fds)
                raise wire.RemoteProtocolError("too many descriptors in one message")
            if not n:
                _close(fds)
                raise ConnectionClosed
            if room is not None:
                self.codec.received(n, fds)
            else:
                self.codec.receive_data(memoryview(target)[:n], fds)

    def send(self, event: wire.Event) -> None:
        if isinstance(event, wire.Reply) and event.written_back is None and not event.fds:
            self.sock.sendall(self.codec.reply_frame(event.id, event.result, event.errno))
            return  # the common case, in one step
        parts, fds = self.codec.frame(event)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg(parts, anc)  # bulk data goes out without a copy
        for part in parts:
            view = memoryview(part).cast("B")
            if sent < len(view):
                self.sock.sendall(view[sent:])
                sent = 0
            else:
                sent -= len(view)

    def roundtrip(self, event: wire.Event) -> wire.Event:
        """A callback of the request in flight: send it, return the client's answer."""
        self.send(event)
        answer = self.next_event()
        expected = {wire.Read: wire.ReadData, wire.Write: wire.WriteDone, wire.Vmas: wire.VmasData,
                    wire.ReadWindow: wire.WindowDone, wire.WriteWindow: wire.WindowDone}
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
        # Threads: one per connection (bounded by max_connections), and of those at most
        # `threads` doing bulk work at once.
        self._connection_threads = trio.CapacityLimiter(self.limits.max_connections)
        self._work_slots = Slots(threads or self.limits.threads)
        self._lock = threading.Lock()  # what connection threads share: below, marked (T)
        self._connections: dict[Hashable, int] = {}  # (T) open connections per client process
        self._total = 0  # (T) open connections of all processes
        self._held: dict[Hashable, dict[tuple[int, int], int]] = {}  # (T) (dev, ino) -> fd
        self._process_limiters: dict[Hashable, Slots] = {}  # (T)
        self._vm_connections: dict[Vm, int] = {}  # connections that keep each VM alive
        self._nursery: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None
        self._idle: set[Connection] = set()  # (T) connections waiting for a request
        self._busy = 0  # (T) requests received and not yet answered
        self._quiet = trio.Event()  # set when draining and no request is left
        self.draining = False  # (T)
        self._released = False  # a VM or process was released since the last collection
        self.served = 0  # (T) requests answered, for figures
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

    def _accept(self, accepted: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Check a new connection's peer and the limits; serve it, or close it."""
        sock = socket.socket(fileno=accepted.detach())  # a plain socket: see Connection
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
        with self._lock:
            total, held = self._total, self._connections.get(peer.process, 0)
            full = total >= self.limits.max_connections
            if not full:
                self._hold_locked(peer.process)
        if full:
            log.warning("refused connection from pid %d: the daemon serves %d connections "
                        "(--max-connections)", peer.pid, total)  # fmt: skip
            self.refused += 1
            sock.close()
            return
        refusal = 0
        if held >= self.limits.max_connections_per_process:
            log.warning("refused connection from pid %d: it holds %d connections "
                        "(--max-connections-per-process): EMFILE", peer.pid, held)  # fmt: skip
            self.refused += 1
            refusal = errno.EMFILE
        nursery.start_soon(self.serve_connection, sock, self.host.open(), peer.process, refusal)

    def _fd_available(self, process: Hashable) -> int:
        """May process open one more file (a VM or vCPU connection)? 0, or the errno. (The
        quota asks first, in the kernel's order of checks; _new_connection then reserves.)"""
        with self._lock:
            return self._fd_available_locked(process)

    def _fd_available_locked(self, process: Hashable) -> int:
        if self._connections.get(process, 0) >= self.limits.max_connections_per_process:
            return errno.EMFILE
        if self._total >= self.limits.max_connections:
            return errno.ENFILE
        return 0

    async def serve_connection(
        self,
        sock: socket.socket,
        target: KvmFile | Vm | Vcpu,
        process: Hashable,
        refusal: int = 0,
    ) -> None:
        """Serve one connection on its own thread; the caller has counted it with
        `_hold_locked(process)`. With `refusal`, answer the handshake with that errno and
        close."""
        vm = target if isinstance(target, Vm) else target.vm if isinstance(target, Vcpu) else None
        if vm is not None:
            self._vm_connections[vm] = self._vm_connections.get(vm, 0) + 1
        abandoned = False
        try:
            await trio.to_thread.run_sync(
                self._serve_thread, sock, target, process, refusal,
                limiter=self._connection_threads, abandon_on_cancel=True,
            )  # fmt: skip
        except trio.Cancelled:
            # The daemon is stopping past its timeout: unblock the thread's I/O; the thread
            # closes the socket itself, so its number is never reused under it. It may still be
            # inside a model call, so nothing it uses is released here: the process exits.
            abandoned = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            raise
        except Exception:  # no thread (the system refused one): lose this connection only
            log.exception("%s connection of %s could not be served", _kind_of(target).name,
                          process)  # fmt: skip
            sock.close()  # (a no-op if the thread got to close it)
        finally:
            if not abandoned:
                self._forget_connection(vm, process)

    def _forget_connection(self, vm: Vm | None, process: Hashable) -> None:
        """A connection closed: release what no connection refers to any more."""
        if vm is not None:
            self._vm_connections[vm] -= 1
            if not self._vm_connections[vm]:  # no fd refers to the VM any more
                del self._vm_connections[vm]
                self.quota.vm_released(vm)
                self._released = True
        with self._lock:
            self._connections[process] -= 1
            self._total -= 1
            gone = not self._connections[process]
            if gone:
                del self._connections[process]
        if gone:
            self._release(process)

    def _serve_thread(
        self, sock: socket.socket, target: KvmFile | Vm | Vcpu, process: Hashable, refusal: int
    ) -> None:
        kind = _kind_of(target)
        conn: Connection | None = None
        try:
            conn = Connection(sock)
            if refusal:
                sock.settimeout(REFUSED_HELLO_TIMEOUT)
                self._handshake(conn, kind, refusal)
            else:
                self._serve(conn, kind, target, process)
        except (ConnectionClosed, TimeoutError):
            pass
        except wire.RemoteProtocolError as e:
            log.warning("%s connection of %s broke the protocol: %s", kind.name, process, e)
            with contextlib.suppress(OSError, wire.ProtocolError):
                assert conn is not None
                conn.send(wire.Error(0, errno.EPROTO, str(e)))
                _drain(sock)
        except OSError as e:
            log.info("%s connection of %s: %s", kind.name, process, e)
        except Exception:  # kvmtag's own bug: lose this connection, never the daemon
            log.exception("%s connection of %s failed; closing it", kind.name, process)
        finally:
            sock.close()
            if conn is not None:
                conn.codec.close_stray_fds()
                if conn.window is not None:
                    with contextlib.suppress(BufferError):  # a view still held: the GC unmaps
                        conn.window.close()
                with self._lock:
                    self._idle.discard(conn)
                    quiet = self._quiet_locked()
                if quiet:
                    self._set_quiet()

    def _serve(
        self, conn: Connection, kind: wire.FdKind, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> None:
        if self.draining:
            return
        self._handshake(conn, kind)
        while True:
            # Waiting for a request: `drain` shuts the socket down here.
            with self._lock:
                if self.draining:
                    return
                self._idle.add(conn)
            conn.codec.max_message = IDLE_MAX_MESSAGE
            event = conn.next_event()
            with self._lock:
                self._idle.discard(conn)
                self._busy += 1
            conn.codec.max_message = wire.MAX_MESSAGE  # callback answers may be bulk
            try:
                if not isinstance(event, wire.Ioctl):
                    _close(getattr(event, "fds", []))
                    raise wire.RemoteProtocolError(f"{type(event).__name__} out of turn")
                reply = self._dispatch(conn, event, target, process)
                try:
                    conn.send(reply)
                finally:
                    _close(reply.fds)
            finally:
                with self._lock:
                    self._busy -= 1
                    self.served += 1
                    quiet = self._quiet_locked()
                if quiet:
                    self._set_quiet()

    def _handshake(self, conn: Connection, kind: wire.FdKind, refusal: int = 0) -> None:
        conn.codec.max_message = IDLE_MAX_MESSAGE
        hello = conn.next_event()
        if not isinstance(hello, wire.Hello):
            raise wire.RemoteProtocolError("the first frame must be HELLO")
        config = self.host.config
        reply = wire.HelloReply(
            hello.id, kind, config.page_size, config.profile.name,
            errno=refusal or (0 if hello.major == wire.VERSION[0] else errno.EPROTONOSUPPORT),
            extensions=uapi.KVMTAG_EXT_TAG_LOG,
        )  # fmt: skip
        # Bulk copies (COPY_TAGS, the tag log) are VM ioctls: only a VM connection gets a window.
        if not reply.errno and kind is wire.FdKind.VM and hello.flags & wire.HELLO_SHARED_WINDOW:
            try:
                fd, conn.window = _shared_window(reply.window)
                reply.fds = [fd]
            except OSError as e:  # the window is optional: bulk callbacks then use the socket
                log.warning("no shared window for a VM connection: %s", e)
        try:
            conn.send(reply)
        finally:
            _close(reply.fds)
        if reply.errno:
            raise ConnectionClosed

    async def drain(self) -> None:
        """Stop: accept nothing more, close every connection waiting for a request, and
        return once each request in flight is answered (its connection then closes). The
        caller bounds the wait and then cancels what is left."""
        if self._accepting is not None:
            self._accepting.cancel()
        with self._lock:
            self.draining = True
            idle = list(self._idle)
            quiet = self._quiet_locked()
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)  # its blocked receive sees end of file
        # An "idle" connection may have just received a request it has not counted yet: wait
        # until every one of them has either closed or answered.
        if not quiet:
            await self._quiet.wait()

    def _quiet_locked(self) -> bool:
        """Draining, and no connection waits for a request or serves one."""
        return self.draining and not self._idle and not self._busy

    def _set_quiet(self) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._quiet.set)

    def _dispatch(
        self, conn: Connection, req: wire.Ioctl, target: KvmFile | Vm | Vcpu, process: Hashable
    ) -> wire.Reply:
        request = req.request
        if request in _VALUE_ARG:
            arg = req.arg  # a value, never a pointer: an inline struct means nothing here
            small = request in _SMALL
        else:
            arg = INLINE_ADDR if req.inline is not None else req.arg
            # Unknown to arm64 KVM: EINVAL, no memory touched.
            small = request not in uapi.IOCTLS or (request in _SMALL and req.inline is not None)

        def adopt(vmas: list[Vma]) -> list[Vma]:
            return self._adopt(process, vmas)

        mm = RemoteMemory(req, process, conn.roundtrip, adopt, shared=conn.window)
        if small:
            result = self.quota.ioctl(target, mm, req.request, arg)
        else:
            # Bulk work and anything that may reach user memory: at most `threads` at once,
            # and at most max_requests_per_process of one process's (a client that stalls its
            # callbacks holds only its own share).
            with self._process_slots(process), self._work_slots:
                result = self.quota.ioctl(target, mm, req.request, arg)
        back = bytes(mm.inline) if mm.written_back and mm.inline is not None else None
        if isinstance(result, Vm | Vcpu):
            made = self._new_connection(result, process)
            if isinstance(made, int):  # no file for it: as the kernel, undo and fail
                if isinstance(result, Vm):
                    self.quota.vm_released(result)
                else:
                    result.vm.drop_vcpu(result.id)
                return wire.Reply(req.id, -1, made, back)
            return wire.Reply(req.id, 0, 0, back, made)
        if result < 0:
            return wire.Reply(req.id, -1, -result, back)
        return wire.Reply(req.id, result, 0, back)

    def _process_slots(self, process: Hashable) -> Slots:
        with self._lock:
            slots = self._process_limiters.get(process)
            if slots is None:
                slots = self._process_limiters[process] = Slots(
                    self.limits.max_requests_per_process
                )
            return slots

    def _new_connection(self, target: Vm | Vcpu, process: Hashable) -> list[int] | int:
        """A socketpair for a new VM or vCPU: serve one end, hand the other to the client
        (and, for a vCPU, the shared memory object behind its kvm_run area). Or the errno
        when no file can be made: a limit (counted here, atomically with the reservation;
        the quota's earlier check only orders the errnos as the kernel does) or the daemon's
        own descriptors running out."""
        with self._lock:
            err = self._fd_available_locked(process)
            if not err:
                self._hold_locked(process)
        if err:
            return err
        ours: socket.socket | None = None
        fds: list[int] = []
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(theirs.detach())
            if isinstance(target, Vcpu):
                fds.append(os.dup(target.run_fd))  # the kvm_run area, which the model updates
            trio.from_thread.run_sync(self._start_connection, ours, target, process)
            return fds
        except BaseException as e:
            if ours is not None:
                ours.close()
            _close(fds)
            with self._lock:
                self._connections[process] -= 1  # (never to 0: this request's connection)
                self._total -= 1
            if isinstance(e, OSError) and e.errno:
                log.warning("no file for a new %s of %s: %s", type(target).__name__, process, e)
                return e.errno
            raise

    def _start_connection(self, ours: socket.socket, target: Vm | Vcpu, process: Hashable) -> None:
        assert self._nursery is not None  # (counted by _new_connection)
        self._nursery.start_soon(self.serve_connection, ours, target, process)

    def _adopt(self, process: Hashable, vmas: list[Vma]) -> list[Vma]:
        """Hold the backing fds that came with a VMAS answer for the life of the process,
        one per (dev, ino), so an inode number cannot be reused under its tags."""
        with self._lock:
            return self._adopt_locked(process, vmas)

    def _adopt_locked(self, process: Hashable, vmas: list[Vma]) -> list[Vma]:
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

    def _hold_locked(self, process: Hashable) -> None:
        self._connections[process] = self._connections.get(process, 0) + 1
        self._total += 1

    def _release(self, process: Hashable) -> None:
        with self._lock:
            self._process_limiters.pop(process, None)
            held = list(self._held.pop(process, {}).values())
        self.quota.process_released(process)
        self.host.release_process(process)
        _close(held)
        log.info("client process %s gone: its memory and tags released", process)

    def stats(self) -> dict[str, int]:
        """What the daemon holds, for its STATUS line, SIGUSR1 and tests."""
        return {
            "connections": self._total,
            "processes": len(self._connections),
            "vms": self.quota.vms(),
            "guest_memory": self.quota.guest_memory(),
            "tag_storage": self.host.tags.nbytes,
            "backing_fds": sum(len(h) for h in list(self._held.values())),
            "in_flight": self._busy,
            "served": self.served,
            "refused": self.refused,
            "tasks": _count_tasks(),
            "threads": threading.active_count(),
        }


def _drain(sock: socket.socket) -> None:
    """Read and drop what the peer still sends, briefly: closing a Unix socket with unread
    bytes makes the peer's next read fail with ECONNRESET before it sees our ERROR frame."""
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 0.2
    for _ in range(64):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        data, ancdata, _, _ = sock.recvmsg(65536, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        _close(_fds_of(ancdata))
        if not data:
            break


def _shared_window(size: int) -> tuple[int, mmap.mmap]:
    """A shared memory window for bulk callbacks: a memfd sealed at its size, so the client
    can neither shrink it under the daemon (SIGBUS) nor grow it; and the daemon's mapping."""
    fd = os.memfd_create("kvmtag-window", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SEAL)  # fmt: skip
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise


def _kind_of(target: KvmFile | Vm | Vcpu) -> wire.FdKind:
    if isinstance(target, Vm):
        return wire.FdKind.VM
    if isinstance(target, Vcpu):
        return wire.FdKind.VCPU
    return wire.FdKind.SYSTEM


def _peer_credentials(sock: socket.socket) -> Peer:
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


def _peer_groups(sock: socket.socket) -> set[int]:
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
