"""Where a stream goes and comes from: `unix:PATH`, `tcp:HOST:PORT` and `file:PATH`.

Sockets carry the stream one way and a 16-byte acknowledgement back once the destination has
loaded it and resumed the guest (or refused it): the source measures downtime up to that reply
and resumes its own guest if the answer is not OK. Files are written under a temporary name and
renamed into place once complete, so a snapshot file that exists is whole.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clients.kvmtag_vmm.vm import OutcomeUnknown, VmmError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Buffer

log = logging.getLogger("kvmtag.vmm")

ACK_OK, ACK_REFUSED = b"KVMTAGOK", b"KVMTAGNO"
_ACK = struct.Struct("<8sII")  # status, code (0, or an errno-like reason), crc32 of bytes 0..11
_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}
SOCKET_BUFFER = 8 << 20  # a record or so in flight: the default (~200 KiB) makes the two
# sides take turns on a Unix socket instead of overlapping


@dataclass(frozen=True)
class Uri:
    kind: str  # "unix", "tcp" or "file"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.kind}:{self.path}"


def parse_uri(text: str, *, default_kind: str | None = None) -> Uri:
    """unix:PATH, tcp:HOST:PORT (HOST may be [v6]), file:PATH; a bare PATH with default_kind."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("unix", "tcp", "file"):
        if default_kind is None:
            raise VmmError(f"{text!r}: expected unix:PATH, tcp:HOST:PORT or file:PATH")
        kind, rest = default_kind, text
    if kind in ("unix", "file"):
        if not rest:
            raise VmmError(f"{text!r}: the path is empty")
        return Uri(kind, path=rest)
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise VmmError(f"{text!r}: expected tcp:HOST:PORT")
    return Uri("tcp", host=host or "0.0.0.0", port=int(port))


def _ack(status: bytes, code: int = 0) -> bytes:
    head = struct.pack("<8sI", status, code)
    return head + struct.pack("<I", zlib.crc32(head))


# --- the sending side ----------------------------------------------------------------------------


class Sink(abc.ABC):
    """Where the source writes the stream."""

    @abc.abstractmethod
    def send(self, parts: Sequence[Buffer]) -> None:
        ...

    @abc.abstractmethod
    def finish(self, timeout: float) -> None:
        """The stream is complete: wait for the destination's OK (sockets) or make the file
        durable and visible. Raises VmmError if the destination refused, OutcomeUnknown if it
        did not answer."""
        ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up: close, remove a partial file."""
        ...


class SocketSink(Sink):
    def __init__(self, sock: socket.socket, uri: Uri) -> None:
        self.sock, self.uri = sock, uri

    def send(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
        try:
            while views:
                sent = self.sock.sendmsg(views[:64])
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as e:
            # A destination that refuses the stream says so before it closes: say why.
            status = self._reply(1.0)
            if status is not None and status[0] == ACK_REFUSED:
                raise self._refused(status[1]) from None
            raise VmmError(f"sending to {self.uri}: {e.strerror or e}") from None

    def _reply(self, timeout: float) -> tuple[bytes, int] | None:
        """The destination's 16-byte answer (status, code), or None if none came whole."""
        self.sock.settimeout(timeout)
        reply = b""
        try:
            while len(reply) < _ACK.size:
                more = self.sock.recv(_ACK.size - len(reply))
                if not more:
                    break
                reply += more
        except OSError:
            return None
        if len(reply) != _ACK.size:
            return None
        status, code, crc = _ACK.unpack(reply)
        if crc != zlib.crc32(reply[:12]) or status not in (ACK_OK, ACK_REFUSED):
            raise VmmError(f"the destination at {self.uri} sent a garbled acknowledgement")
        return status, code

    def _refused(self, code: int) -> VmmError:
        return VmmError(f"the destination at {self.uri} refused the stream (code {code}); "
                        "see its log")  # fmt: skip

    def finish(self, timeout: float) -> None:
        try:
            status = self._reply(timeout)
        finally:
            self.sock.close()
        if status is None:
            raise OutcomeUnknown(f"the destination at {self.uri} did not answer after the whole "
                                 "stream: it may be running the guest")  # fmt: skip
        if status[0] != ACK_OK:
            raise self._refused(status[1])

    def abort(self) -> None:
        self.sock.close()


class FileSink(Sink):
    def __init__(self, path: str) -> None:
        self.path = path
        self.partial = f"{path}.partial"
        self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def send(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        try:
            for v in views:
                while v:
                    v = v[os.write(self.fd, v) :]
        except OSError as e:
            raise VmmError(f"writing {self.partial}: {e.strerror}") from None

    def finish(self, timeout: float) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)


def connect(uri: Uri, timeout: float) -> Sink:
    """Open the destination; sockets are retried until `timeout` (it may still be starting)."""
    if uri.kind == "file":
        try:
            return FileSink(uri.path)
        except OSError as e:
            raise VmmError(f"cannot create {uri.path}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            if uri.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(uri.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((uri.host, uri.port), timeout=5)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _grow_buffer(sock, socket.SO_SNDBUF)
            return SocketSink(sock, uri)
        except OSError as e:
            if e.errno not in _RETRY_ERRNOS or time.monotonic() > deadline:
                raise VmmError(f"cannot connect to {uri}: {e.strerror or e}") from None
            time.sleep(0.05)


# --- the receiving side --------------------------------------------------------------------------


class ByteSource(abc.ABC):
    """Where the destination reads the stream from."""

    @abc.abstractmethod
    def read_into(self, buf: memoryview) -> int:
        """Read the next bytes into buf; 0 at the end."""
        ...

    def rewind(self) -> bool:
        """Start again from the first byte (files only: False otherwise)."""
        return False

    def at_end(self) -> bool:
        """After END: is the source exhausted? (A socket's source waits for our reply and
        sends nothing more: True without reading.)"""
        return True

    def reply(self, ok: bool, code: int = 0) -> None:  # noqa: B027 - a no-op for files
        """Tell the source how it went (sockets only)."""

    @abc.abstractmethod
    def close(self) -> None:
        ...


class SocketSource(ByteSource):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._replied = False

    def read_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except OSError as e:
            raise VmmError(f"reading the stream: {e.strerror or e}") from None

    def reply(self, ok: bool, code: int = 0) -> None:
        if self._replied:
            return
        self._replied = True
        with contextlib.suppress(OSError):
            self.sock.sendall(_ack(ACK_OK if ok else ACK_REFUSED, code))

    def close(self) -> None:
        self.sock.close()


class FileSource(ByteSource):
    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise VmmError(f"cannot open {path}: {e.strerror}") from None
        self.path = path

    def read_into(self, buf: memoryview) -> int:
        return os.readv(self.fd, [buf])

    def rewind(self) -> bool:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return True

    def at_end(self) -> bool:
        return not os.read(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Listener:
    """`--incoming`: listen on a socket (one connection is accepted), or open a file."""

    def __init__(self, uri: Uri) -> None:
        self.uri = uri
        self.sock: socket.socket | None = None
        if uri.kind == "unix":
            self.sock = _listen_unix(uri.path)
        elif uri.kind == "tcp":
            family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
            try:
                self.sock = socket.create_server((uri.host, uri.port), family=family)
            except OSError as e:
                raise VmmError(f"cannot listen on {uri}: {e.strerror or e}") from None
            self.uri = Uri("tcp", host=uri.host, port=self.sock.getsockname()[1])
        if self.sock is not None:
            log.info("waiting for the migration stream on %s", self.uri)

    def accept(self, timeout: float | None) -> ByteSource:
        if self.sock is None:
            return FileSource(self.uri.path)
        self.sock.settimeout(timeout)
        try:
            conn, peer = self.sock.accept()
        except TimeoutError:
            raise VmmError(f"no source connected to {self.uri} in {timeout} s") from None
        finally:
            self.close()
        conn.settimeout(None)
        _grow_buffer(conn, socket.SO_RCVBUF)
        log.info("source connected from %s", peer or "a unix socket")
        return SocketSource(conn)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.uri.path)


def _grow_buffer(sock: socket.socket, option: int) -> None:
    """Ask for SOCKET_BUFFER bytes of send or receive buffer: with privilege beyond
    net.core.[wr]mem_max (SO_SNDBUFFORCE / SO_RCVBUFFORCE), else as far as allowed."""
    force = {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}[option]  # SO_*BUFFORCE
    for opt in (force, option):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            return
        except OSError:
            continue


def _listen_unix(path: str) -> socket.socket:
    """Bind under a temporary name and rename into place: a path that exists accepts."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there
        else:
            raise VmmError(f"{path}: another process is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        sock.bind(temp)
        sock.listen(1)
        os.replace(temp, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise VmmError(f"cannot listen on unix:{path}: {e.strerror or e}") from None
    return sock
