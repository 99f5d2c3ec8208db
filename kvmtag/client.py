"""The drop-in client: talk to kvmtagd exactly as to /dev/kvm.

    fd = kvmtag.client.open("/dev/kvm")                    # a real fd (a connected socket)
    vm = kvmtag.client.ioctl(fd, KVM_CREATE_VM, 0)         # a new real fd
    kvmtag.client.ioctl(vm, KVM_ARM_MTE_COPY_TAGS, struct_bytes_or_address)

`ioctl` returns the kernel's integer result and raises OSError with the kernel's errno. Pointers
inside structs are addresses in this process, as with the kernel: the daemon asks for the
memory they name (READ / WRITE callbacks) and this module reads or writes it with
process_vm_readv / process_vm_writev on its own pid, so a bad pointer gives the kernel's EFAULT
or partial result, never a crash. For KVM_SET_USER_MEMORY_REGION it describes the mappings of
the range and passes the fds of shared ones (kvmtag.procmem).

Every open file is one socket; state is kept per socket inode, so dups share it, a lock per
socket keeps threads from stealing each other's replies, and after fork the child's system fds
are reconnected onto the same numbers while its VM and vCPU fds answer EIO, as KVM does for a
process other than a VM's creator. A protocol error becomes EIO here, once.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import fcntl
import itertools
import mmap as _mmap
import os
import socket as _socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmtag import procmem, wire
from kvmtag.usermem import Vma

_ANC_SIZE = _socket.CMSG_SPACE(wire.MAX_FDS * 4)
_MSG_CTRUNC = int(_socket.MSG_CTRUNC)  # a plain int: an IntFlag operation costs a call
_RECV_SIZE = wire.MAX_MESSAGE  # a whole bulk frame in one receive when the socket has it
SHARED_WINDOW = True
"""Ask kvmtagd for a shared window on new connections (docs/PROTOCOL.md): bulk copies then skip
the socket. False speaks protocol 1.0's READ and WRITE only (tests of that path)."""


def device_path() -> str:
    """The emulated device path: $KVMTAG_DEVICE, default /dev/kvm."""
    return os.environ.get("KVMTAG_DEVICE") or "/dev/kvm"


def socket_path(explicit: str | os.PathLike[str] | None = None) -> str:
    """Where kvmtagd listens: the argument, else $KVMTAG_SOCKET, else the first that exists of
    $XDG_RUNTIME_DIR/kvmtag/kvm.sock and /run/kvmtag/kvm.sock."""
    if explicit is not None:
        return os.fspath(explicit)
    if os.environ.get("KVMTAG_SOCKET"):
        return os.environ["KVMTAG_SOCKET"]
    candidates = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "kvmtag" / "kvm.sock")
    candidates.append(Path("/run/kvmtag/kvm.sock"))
    for path in candidates:
        if path.exists():
            return str(path)
    raise FileNotFoundError(
        errno.ENOENT, "no kvmtagd socket (set KVMTAG_SOCKET or start kvmtagd)",
        " or ".join(map(str, candidates)),
    )  # fmt: skip


@dataclass(eq=False)
class _File:
    """One open file: a connection to kvmtagd."""

    kind: wire.FdKind
    path: str | None = None  # system files: where to reconnect after fork
    pid: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)
    codec: wire.Codec = field(default_factory=lambda: wire.Codec(daemon=False))
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    hello: wire.HelloReply | None = None
    run_fd: int | None = None  # vCPU: the shared memory behind kvm_run
    window: _mmap.mmap | None = None  # VM: the window shared with kvmtagd for bulk copies
    broken: bool = False


_files: dict[tuple[int, int], _File] = {}
_local = threading.local()


def _rbuf() -> bytearray:
    """This thread's receive buffer (one bulk frame), reused across requests."""
    buf: bytearray | None = getattr(_local, "rbuf", None)
    if buf is None:
        buf = _local.rbuf = bytearray(_RECV_SIZE)
    return buf
_files_lock = threading.Lock()


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)  # EBADF for a closed fd
    return st.st_dev, st.st_ino


def _lookup(fd: int) -> _File:
    if not isinstance(fd, int) or fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    key = _key(fd)
    file = _files.get(key)
    if file is None:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))  # not one of kvmtag's fds
    return file


def _eio(why: str) -> OSError:
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} (kvmtag: {why})")


# --- the public contract ---------------------------------------------------------------------


def open(  # the name of the call it stands in for
    path: str | os.PathLike[str] = "/dev/kvm",
    flags: int = os.O_RDWR | os.O_CLOEXEC,
    *,
    socket: str | os.PathLike[str] | None = None,
) -> int:
    """open("/dev/kvm"): connect to kvmtagd and return the connection's fd."""
    if os.fspath(path) != device_path():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path))
    where = socket_path(socket)
    fd = _connect(where, bool(flags & os.O_CLOEXEC))
    file = _File(wire.FdKind.SYSTEM, where)
    try:
        _handshake(file, fd)
    except BaseException:
        os.close(fd)
        raise
    with _files_lock:
        _files[_key(fd)] = file
    return fd


def ioctl(fd: int, request: int, arg: int | bytes | bytearray | memoryview = 0) -> int:
    """ioctl(2) on a kvmtag fd: the kernel's result; OSError with the kernel's errno."""
    file = _lookup(fd)
    if file.pid != os.getpid():
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # a VM or vCPU fd inherited by fork
    view = None
    if isinstance(arg, int):
        event = wire.Ioctl(0, request, arg)
    else:
        view = memoryview(arg).cast("B")
        event = wire.Ioctl(0, request, 0, view.tobytes(), not view.readonly)
    reply = _request(file, fd, event)
    if reply.written_back is not None and view is not None and not view.readonly:
        n = min(len(view), len(reply.written_back))
        view[:n] = reply.written_back[:n]
    if reply.errno:
        _close_fds(reply.fds)
        raise OSError(reply.errno, os.strerror(reply.errno))
    if reply.fds:
        return _adopt_new_file(file, reply.fds)
    return reply.result


def close(fd: int) -> None:
    """close(2), forgetting the file once no fd of this process refers to it."""
    key = _key(fd)
    os.close(fd)
    if key in _files and not _still_open(key):
        with _files_lock:
            file = _files.pop(key, None)
        if file is not None and file.run_fd is not None:
            os.close(file.run_fd)
        if file is not None and file.window is not None:
            with contextlib.suppress(BufferError):  # another thread's copy holds a view
                file.window.close()


def mmap(fd: int, size: int) -> _mmap.mmap:
    """mmap(2) of a vCPU fd: its kvm_run area (KVM_GET_VCPU_MMAP_SIZE bytes), shared with the
    daemon, which updates it in place."""
    file = _lookup(fd)
    if file.run_fd is None:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))  # only vCPU fds can be mapped
    return _mmap.mmap(file.run_fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)


def info(fd: int) -> wire.HelloReply:
    """The daemon's handshake on this fd: page size, kernel profile, limits."""
    hello = _lookup(fd).hello
    assert hello is not None
    return hello


# --- frames on a user's fd ------------------------------------------------------------------


def _connect(path: str, cloexec: bool) -> int:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise type(e)(e.errno, f"cannot reach kvmtagd: {e.strerror}", path) from None
    if not cloexec:
        sock.set_inheritable(True)  # open() without O_CLOEXEC: the fd survives exec
    return sock.detach()


def _handshake(file: _File, fd: int) -> None:
    hello = wire.Hello(next(file.ids), flags=wire.HELLO_SHARED_WINDOW if SHARED_WINDOW else 0)
    reply = _exchange(file, fd, hello)
    if not isinstance(reply, wire.HelloReply):
        raise _eio("no handshake")
    if reply.fds:
        try:
            if len(reply.fds) != 1 or reply.errno:
                raise _eio(f"{len(reply.fds)} descriptors with the handshake")
            file.window = _map_window(reply.fds[0], reply.window)
        finally:
            _close_fds(reply.fds)
    if reply.errno:
        raise OSError(reply.errno, f"kvmtagd refused the connection: {os.strerror(reply.errno)}")
    # The daemon's limits, not ours: it may accept less than this client's defaults.
    file.codec.max_message = min(reply.max_message, wire.MAX_MESSAGE)
    file.hello = reply


def _request(file: _File, fd: int, event: wire.Ioctl) -> wire.Reply:
    event.id = next(file.ids)
    reply = _exchange(file, fd, event)
    if not isinstance(reply, wire.Reply):
        raise _eio(f"unexpected {type(reply).__name__}")
    return reply


def _exchange(file: _File, fd: int, event: wire.Event) -> wire.Event:
    """Send one request and serve its callbacks until its answer comes, under the file's lock.
    Anything that leaves the stream in an unknown state marks the file broken (EIO after)."""
    with file.lock:
        if file.broken:
            raise _eio("the connection was broken earlier")
        # Family and type given: no getsockopt calls to discover them on every request.
        sock = _socket.SocketType(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)  # the C type: cheap
        try:
            if isinstance(event, wire.Ioctl) and event.inline is None:  # the common case
                sock.sendall(file.codec.ioctl_frame(event.id, event.request, event.arg))
            else:
                _send(sock, file.codec, event)
            while True:
                answer = _receive(sock, file.codec)
                if answer.id != event.id:
                    raise wire.RemoteProtocolError(f"answer for {answer.id}, not {event.id}")
                if isinstance(answer, wire.Read | wire.Write | wire.Vmas):
                    _serve_callback(sock, file, answer)
                    continue
                if isinstance(answer, wire.ReadWindow | wire.WriteWindow):
                    _serve_window(sock, file, answer)
                    continue
                if isinstance(answer, wire.Error):
                    raise wire.RemoteProtocolError(f"kvmtagd: {answer.message}")
                return answer
        except wire.ProtocolError as e:
            file.broken = True
            raise _eio(str(e)) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            file.broken = True  # kvmtagd went away
            raise _eio(str(e)) from None
        except BaseException:
            file.broken = True  # interrupted mid-exchange: the stream is out of step
            raise
        finally:
            sock.detach()


def _serve_callback(sock: _socket.SocketType, file: _File, ask: wire.Event) -> None:
    codec = file.codec
    if isinstance(ask, wire.Read):
        buf = bytearray(min(ask.size, wire.WINDOW))
        got = procmem.read_into(ask.addr, buf)
        _send(sock, codec, wire.ReadData(ask.id, memoryview(buf)[:got]))
    elif isinstance(ask, wire.Write):
        _send(sock, codec, wire.WriteDone(ask.id, procmem.write_memory(ask.addr, ask.data)))
    else:
        assert isinstance(ask, wire.Vmas)
        vmas = procmem.find_vmas(ask.start, ask.end)
        try:
            max_fds = min(file.hello.max_fds, wire.MAX_FDS) if file.hello else wire.MAX_FDS
            _send(sock, codec, wire.VmasData(ask.id, _limit_fds(vmas, max_fds)))
        finally:
            _close_fds([v.fd for v in vmas if v.fd is not None])


def _map_window(fd: int, size: int) -> _mmap.mmap:
    """The shared window, if it is one: a memfd sealed against shrinking (so the daemon cannot
    make our copies fault with SIGBUS) of at least `size` bytes."""
    try:
        sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        if not sealed or not 0 < size <= os.fstat(fd).st_size:
            raise _eio("the shared window is not a sealed memfd of its size")
        return _mmap.mmap(fd, size, _mmap.MAP_SHARED)
    except (OSError, ValueError) as e:
        raise _eio(f"the shared window: {e}") from None


def _serve_window(sock: _socket.SocketType, file: _File, ask: wire.ReadWindow | wire.WriteWindow
                  ) -> None:  # fmt: skip
    if file.window is None or ask.size > len(file.window):
        raise wire.RemoteProtocolError(f"{type(ask).__name__} of {ask.size} bytes: no such window")
    view = memoryview(file.window)[: ask.size]
    try:
        if isinstance(ask, wire.ReadWindow):
            count = procmem.read_into(ask.addr, view)
        else:
            count = procmem.write_memory(ask.addr, view)
    finally:
        view.release()  # so the window can be unmapped when the file is forgotten
    sock.sendall(file.codec.send(wire.WindowDone(ask.id, count))[0])


def _limit_fds(vmas: list[Vma], max_fds: int) -> list[Vma]:
    """At most max_fds descriptors (the daemon's, at most MAX_FDS) fit in one frame: mappings
    beyond that go without one, and are tags-only for the daemon (docs/PROTOCOL.md)."""
    out, sent = [], 0
    for vma in vmas:
        if vma.fd is not None:
            if sent == max_fds:
                vma = dataclasses.replace(vma, fd=None)
            else:
                sent += 1
        out.append(vma)
    return out


def _send(sock: _socket.SocketType, codec: wire.Codec, event: wire.Event) -> None:
    parts, fds = codec.frame(event)
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg(parts, anc)  # one iovec: bulk data is never copied into a frame
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= len(view):
            sent -= len(view)
            continue
        sock.sendall(view[sent:])
        sent = 0


def _receive(sock: _socket.SocketType, codec: wire.Codec) -> wire.Event:
    while True:
        event = codec.next_event()
        if event is not wire.NEED_DATA:
            return event  # type: ignore[return-value]
        room = codec.receive_into()  # a bulk frame: straight into its own buffer
        target = room if room is not None else _rbuf()
        n, anc, flags, _ = sock.recvmsg_into([target], _ANC_SIZE, _socket.MSG_CMSG_CLOEXEC)
        if room is None and not anc and not flags & _MSG_CTRUNC:
            reply = codec.plain_reply(memoryview(target)[:n])  # the common case, in one step
            if reply is not None:
                return reply
        fds = [fd for level, kind, raw in anc
               if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
               for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]  # fmt: skip
        if flags & _MSG_CTRUNC:
            _close_fds(fds)
            raise wire.RemoteProtocolError("descriptors truncated")
        if not n:
            _close_fds(fds)
            raise wire.RemoteProtocolError("kvmtagd closed the connection")
        if room is not None:
            codec.received(n, fds)
        else:
            codec.receive_data(memoryview(target)[:n], fds)


def _adopt_new_file(parent: _File, fds: list[int]) -> int:
    """CREATE_VM / CREATE_VCPU: the new connection (and a vCPU's kvm_run object)."""
    kind = wire.FdKind.VM if parent.kind is wire.FdKind.SYSTEM else wire.FdKind.VCPU
    fd, extra = fds[0], fds[1:]
    file = _File(kind, run_fd=extra[0] if kind is wire.FdKind.VCPU and extra else None)
    _close_fds(extra[1:] if file.run_fd is not None else extra)
    try:
        _handshake(file, fd)
    except BaseException:
        _close_fds(fds)
        raise
    with _files_lock:
        _files[_key(fd)] = file
    return fd


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_of(key: tuple[int, int]) -> list[int]:
    """This process's fds that refer to the open file `key`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == key:
            found.append(int(name))
    return found


def _still_open(key: tuple[int, int]) -> bool:
    return bool(_fds_of(key))


# --- fork -----------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    """The child must not share a stream with its parent: reconnect its system fds onto the
    same numbers; its VM and vCPU fds keep the parent's pid and answer EIO."""
    global _files_lock
    _files_lock = threading.Lock()
    for key, file in list(_files.items()):
        file.lock = threading.Lock()
        # The parent's window stays mapped here, unused (this child's VM fds answer EIO); a
        # parent thread's copy at the fork left a view the child can never release.
        file.window = None
        if file.kind is not wire.FdKind.SYSTEM or file.path is None:
            continue
        del _files[key]
        numbers = _fds_of(key)
        if not numbers:
            continue
        try:
            fresh = _File(wire.FdKind.SYSTEM, file.path)
            new = _connect(file.path, True)
            _handshake(fresh, new)
        except OSError:
            continue  # the child's system fds then answer ENOTTY: the daemon is gone
        for number in numbers:
            inheritable = os.get_inheritable(number)
            os.dup2(new, number, inheritable=inheritable)
        os.close(new)
        _files[_key(numbers[0])] = fresh


os.register_at_fork(after_in_child=_after_fork_in_child)
