"""The wire protocol between kvmtag clients and kvmtagd: frames ⇄ events, with no I/O.

docs/PROTOCOL.md is the reference a C client is written from; this module is its one
declaration. Every frame is a 16-byte little-endian header followed by a body:

    u32 length   whole frame, header included: 16 <= length <= the peer's max_message
    u16 type     a MessageType
    u16 nfds     descriptors passed with SCM_RIGHTS alongside this frame (0 unless allowed)
    u32 id       request id: a reply, and every callback of a request, echoes it
    u32 reserved 0

`Codec` buffers bytes and descriptors and hands out events (`receive_data`, `next_event`,
which returns NEED_DATA instead of raising), and turns events into bytes and fds (`send`).
A peer's violation raises `RemoteProtocolError`; asking to send something invalid raises
`LocalProtocolError`. Neither is an errno: the daemon closes the connection, the client turns it
into EIO once, at its boundary.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import construct as cs

from kvmtag.uapi import compiled
from kvmtag.usermem import Vma, VmaKind

MAGIC = b"KVMT"
VERSION = (1, 1)  # 1.1: the shared window (HELLO_SHARED_WINDOW); a 1.0 peer never sees it
MAX_FDS = 32  # descriptors in one frame
WINDOW = 4 << 20  # bytes of user memory moved by one READ or WRITE callback
MAX_MESSAGE = WINDOW + 4096  # largest frame either side sends or accepts


class MessageType(enum.IntEnum):
    HELLO = 1  # client → daemon, first frame of every connection
    HELLO_REPLY = 2  # daemon → client
    IOCTL = 3  # client → daemon
    REPLY = 4  # daemon → client: the ioctl's result (may carry fds: CREATE_VM, CREATE_VCPU)
    READ = 5  # daemon → client: copy_from_user callback
    READ_DATA = 6  # client → daemon
    WRITE = 7  # daemon → client: copy_to_user callback
    WRITE_DONE = 8  # client → daemon
    VMAS = 9  # daemon → client: the mappings of a range (memslot creation)
    VMAS_DATA = 10  # client → daemon (may carry fds: one per mapping that has one)
    ERROR = 11  # daemon → client: protocol violation; the daemon then closes
    READ_WINDOW = 12  # daemon → client: copy_from_user into the shared window (1.1)
    WRITE_WINDOW = 13  # daemon → client: copy_to_user from the shared window (1.1)
    WINDOW_DONE = 14  # client → daemon: bytes copied by READ_WINDOW or WRITE_WINDOW (1.1)


FROM_CLIENT = {MessageType.HELLO, MessageType.IOCTL, MessageType.READ_DATA,
               MessageType.WRITE_DONE, MessageType.VMAS_DATA, MessageType.WINDOW_DONE}  # fmt: skip
FROM_DAEMON = set(MessageType) - FROM_CLIENT
MAY_CARRY_FDS = {MessageType.HELLO_REPLY, MessageType.REPLY, MessageType.VMAS_DATA}
HELLO_SHARED_WINDOW = 1 << 0  # HELLO flags: the client can use a shared window (below)


class FdKind(enum.IntEnum):
    SYSTEM = 0
    VM = 1
    VCPU = 2


class ProtocolError(Exception):
    """A protocol violation (not an errno)."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


# --- declarations --------------------------------------------------------------------------------

header = cs.Struct(
    "length" / cs.Int32ul, "type" / cs.Int16ul, "nfds" / cs.Int16ul, "id" / cs.Int32ul,
    "reserved" / cs.Int32ul,
)  # fmt: skip
hello = cs.Struct(
    "magic" / cs.Bytes(4), "major" / cs.Int16ul, "minor" / cs.Int16ul, "flags" / cs.Int32ul
)
hello_reply = cs.Struct(
    "magic" / cs.Bytes(4),
    "major" / cs.Int16ul,
    "minor" / cs.Int16ul,
    "fd_kind" / cs.Int32ul,
    "page_size" / cs.Int32ul,
    "max_message" / cs.Int32ul,
    "max_fds" / cs.Int32ul,
    "window" / cs.Int32ul,
    "errno" / cs.Int32ul,  # non-zero: the connection is refused (e.g. version)
    "extensions" / cs.Int64ul,
    "profile" / cs.Bytes(16),  # kernel profile name, ASCII, NUL padded
)
ioctl = cs.Struct(  # followed by the inline struct, if any
    "request" / cs.Int32ul, "flags" / cs.Int32ul, "arg" / cs.Int64ul
)
reply = cs.Struct(  # followed by the written-back inline struct, if any
    "result" / cs.Int64sl, "errno" / cs.Int32ul, "flags" / cs.Int32ul
)
read = cs.Struct("addr" / cs.Int64ul, "size" / cs.Int64ul)
write = cs.Struct("addr" / cs.Int64ul)  # followed by the data
write_done = cs.Struct("written" / cs.Int64ul)
vmas = cs.Struct("start" / cs.Int64ul, "end" / cs.Int64ul)
vmas_data = cs.Struct("count" / cs.Int32ul, "pad" / cs.Int32ul)  # followed by count records
vma_record = cs.Struct(
    "start" / cs.Int64ul,
    "end" / cs.Int64ul,
    "pgoff" / cs.Int64ul,
    "dev" / cs.Int64ul,
    "ino" / cs.Int64ul,
    "kind" / cs.Int32ul,  # VMA_KINDS index
    "flags" / cs.Int32ul,  # VMA_SHARED | VMA_WRITABLE | VMA_HAS_FD | VMA_READABLE
)
error = cs.Struct("code" / cs.Int32ul)  # followed by a UTF-8 message
window_op = cs.Struct("addr" / cs.Int64ul, "size" / cs.Int64ul)  # READ_WINDOW, WRITE_WINDOW
window_done = cs.Struct("count" / cs.Int64ul)

IOCTL_INLINE = 1 << 0  # an inline struct follows: the ioctl's argument points at it
IOCTL_INLINE_WRITABLE = 1 << 1  # the inline struct may be written back (a writable buffer)
REPLY_WRITTEN_BACK = 1 << 0  # the reply carries the inline struct as the kernel left it
VMA_SHARED, VMA_WRITABLE, VMA_HAS_FD, VMA_READABLE = 1, 2, 4, 8
VMA_KINDS = (VmaKind.ANON, VmaKind.SHMEM, VmaKind.HUGETLBFS, VmaKind.FILE, VmaKind.OTHER)

_HEADER = compiled(header)
_HELLO = compiled(hello)
_HELLO_REPLY = compiled(hello_reply)
_IOCTL = compiled(ioctl)
_REPLY = compiled(reply)
_READ = compiled(read)
_WRITE = compiled(write)
_WRITE_DONE = compiled(write_done)
_VMAS = compiled(vmas)
_VMAS_DATA = compiled(vmas_data)
_VMA = compiled(vma_record)
_ERROR = compiled(error)
_WINDOW_OP = compiled(window_op)
_WINDOW_DONE = compiled(window_done)
HEADER_SIZE = _HEADER.size
_LENGTH = compiled(cs.Struct("length" / cs.Int32ul))
# Whole frames of the commonest exchange, an IOCTL with a value argument and its plain REPLY,
# packed and parsed in one step each (Codec.ioctl_frame, Codec.plain_reply).
_IOCTL_FRAME = struct.Struct(_HEADER.format + _IOCTL.format[1:])
_REPLY_FRAME = struct.Struct(_HEADER.format + _REPLY.format[1:])
_IOCTL_TYPE, _REPLY_TYPE = int(MessageType.IOCTL), int(MessageType.REPLY)  # plain ints: faster
_TYPES = {int(t): t for t in MessageType}  # a lookup, not an enum call, for every frame
_BULK = 65536  # frames larger than this are received in place and handed over without a copy

# --- events ------------------------------------------------------------------------------------


@dataclass
class Hello:
    id: int = 0
    major: int = VERSION[0]
    minor: int = VERSION[1]
    flags: int = 0


@dataclass
class HelloReply:
    id: int
    fd_kind: FdKind
    page_size: int
    profile: str
    errno: int = 0
    extensions: int = 0
    max_message: int = MAX_MESSAGE
    max_fds: int = MAX_FDS
    window: int = WINDOW
    major: int = VERSION[0]
    minor: int = VERSION[1]
    fds: list[int] = field(default_factory=list)  # the shared window, if one was asked for


@dataclass
class Ioctl:
    id: int
    request: int
    arg: int
    inline: bytes | None = None  # the struct, when the caller passed a buffer
    inline_writable: bool = False


@dataclass
class Reply:
    id: int
    result: int
    errno: int = 0
    written_back: bytes | None = None
    fds: list[int] = field(default_factory=list)


@dataclass
class Read:
    id: int
    addr: int
    size: int


@dataclass
class ReadData:
    id: int
    data: bytes | bytearray | memoryview  # the readable prefix


@dataclass
class Write:
    id: int
    addr: int
    data: bytes | bytearray | memoryview


@dataclass
class WriteDone:
    id: int
    written: int


@dataclass
class Vmas:
    id: int
    start: int
    end: int


@dataclass
class VmasData:
    id: int
    vmas: list[Vma]  # fd fields are the descriptors passed with the frame, in order
    fds: list[int] = field(default_factory=list)


@dataclass
class ReadWindow:
    """Read [addr, addr+size) of your memory into the shared window, from its first byte."""

    id: int
    addr: int
    size: int


@dataclass
class WriteWindow:
    """Write the shared window's first size bytes at addr."""

    id: int
    addr: int
    size: int


@dataclass
class WindowDone:
    id: int
    count: int  # bytes copied, a prefix: fewer than asked means a fault there


@dataclass
class Error:
    id: int
    code: int
    message: str


Event = (
    Hello | HelloReply | Ioctl | Reply | Read | ReadData | Write | WriteDone | Vmas | VmasData
    | ReadWindow | WriteWindow | WindowDone | Error
)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

# --- the codec ---------------------------------------------------------------------------------


class Codec:
    """One side of one connection. `daemon=True` on kvmtagd's side.

    Descriptors arrive (SCM_RIGHTS) with the bytes of the sendmsg that carried them, and a
    Unix stream socket never merges such a message with bytes sent before it: so the
    descriptors of one receive_data belong to the frame that starts at its first byte. Any
    other descriptor (on a frame that starts elsewhere, or that declares another count, or may
    carry none) is closed, and is the peer's error.
    """

    def __init__(self, *, daemon: bool, max_message: int = MAX_MESSAGE) -> None:
        self.daemon = daemon
        self.max_message = max_message
        self._incoming = FROM_CLIENT if daemon else FROM_DAEMON
        self._outgoing = FROM_DAEMON if daemon else FROM_CLIENT
        self._buffer = bytearray()
        self._filled = 0  # bytes of _buffer received (it is presized for a large frame)
        self._offset = 0  # stream offset of the buffer's first byte
        self._marks: list[tuple[int, list[int]]] = []  # (stream offset, descriptors with it)

    # reading

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> None:
        if fds:
            self._marks.append((self._offset + self._filled, list(fds)))
        view = memoryview(data).cast("B")
        room = len(self._buffer) - self._filled
        if room:  # a presized frame: fill it first
            k = min(room, len(view))
            self._buffer[self._filled : self._filled + k] = view[:k]
            self._filled += k
            view = view[k:]
            if not len(view):
                return
        self._buffer += view
        self._filled = len(self._buffer)

    def receive_into(self) -> memoryview | None:
        """Room for the rest of a large frame whose header has arrived: receive straight into
        it (recvmsg_into), then call received(). None: use receive_data. Call next_event first,
        so the header has been checked."""
        if self._filled < HEADER_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length <= _BULK or length > self.max_message or self._filled >= length:
            return None
        if len(self._buffer) < length:
            frame = bytearray(length)
            frame[: self._filled] = self._buffer[: self._filled]
            self._buffer = frame
        return memoryview(self._buffer)[self._filled : length]

    def received(self, n: int, fds: Sequence[int] = ()) -> None:
        """n bytes arrived in the room receive_into() gave (with these descriptors)."""
        if fds:
            self._marks.append((self._offset + self._filled, list(fds)))
        self._filled += n

    def next_event(self) -> Event | _NeedData:
        buf = self._buffer
        filled = self._filled
        if filled < HEADER_SIZE:
            return NEED_DATA
        length, mtype, nfds, req_id, reserved = _HEADER.unpack_from(buf)
        # Bound the frame before buffering its body.
        if not HEADER_SIZE <= length <= self.max_message:
            raise self._violation(f"frame length {length} outside [16, {self.max_message}]")
        if reserved:
            raise self._violation("reserved header field is not 0")
        kind = _TYPES.get(mtype)
        if kind is None:
            raise self._violation(f"unknown message type {mtype}")
        if kind not in self._incoming:
            raise self._violation(f"{kind.name} may not be sent by this peer")
        if nfds and (kind not in MAY_CARRY_FDS or nfds > MAX_FDS):
            raise self._violation(f"{kind.name} may not carry {nfds} descriptors")
        start = self._offset
        fds: list[int] = []
        if self._marks and self._marks[0][0] == start:
            fds = self._marks[0][1]
        if len(fds) != nfds:
            raise self._violation(f"{kind.name} declares {nfds} descriptors, {len(fds)} came")
        if filled < length:
            return NEED_DATA
        if fds:
            self._marks.pop(0)
        if self._marks and self._marks[0][0] < start + length:
            raise self._violation(f"descriptors inside a {kind.name} frame")
        if filled == length == len(buf) and length > _BULK:  # a bulk frame, alone: hand it over
            body: bytes | memoryview = memoryview(buf)[HEADER_SIZE:]
            self._buffer = bytearray()
        else:
            body = bytes(buf[HEADER_SIZE:length])
            del buf[:length]
        self._filled -= length
        self._offset += length
        try:
            return _decode(kind, req_id, body, fds)
        except (ValueError, IndexError) as e:
            _close_all(fds)
            raise self._violation(f"bad {kind.name}: {e}") from None

    def close_stray_fds(self) -> None:
        """Close descriptors that arrived with no frame to claim them."""
        for _, fds in self._marks:
            _close_all(fds)
        self._marks = []

    @property
    def pending_fds(self) -> int:
        return sum(len(fds) for _, fds in self._marks)

    @property
    def buffered(self) -> int:
        return self._filled

    def plain_reply(self, data: bytes | bytearray | memoryview) -> Reply | None:
        """The fast path of receiving: `data`, received on an empty buffer with no descriptors,
        as a REPLY, if it is exactly one REPLY frame that writes nothing back and carries no
        descriptors (what most ioctls answer); else None, and nothing is consumed: give
        `data` to receive_data."""
        if self._filled or len(data) != _REPLY_FRAME.size:
            return None
        length, mtype, nfds, req_id, reserved, result, err, flags = _REPLY_FRAME.unpack_from(data)
        if length != _REPLY_FRAME.size or mtype != _REPLY_TYPE or nfds or reserved or flags:
            return None
        if self.daemon:
            raise self._violation("REPLY may not be sent by this peer")
        self._offset += length
        return Reply(req_id, result, err)

    def plain_ioctl(self, data: bytes | bytearray | memoryview) -> Ioctl | None:
        """The daemon's fast path of receiving: like plain_reply, for an IOCTL frame with a
        value argument (no inline struct)."""
        if self._filled or len(data) != _IOCTL_FRAME.size:
            return None
        length, mtype, nfds, req_id, reserved, request, flags, arg = _IOCTL_FRAME.unpack_from(data)
        if length != _IOCTL_FRAME.size or mtype != _IOCTL_TYPE or nfds or reserved or flags:
            return None
        if not self.daemon:
            raise self._violation("IOCTL may not be sent by this peer")
        self._offset += length
        return Ioctl(req_id, request, arg)

    def reply_frame(self, req_id: int, result: int, err: int) -> bytes:
        """The daemon's fast path of sending: the frame of Reply(req_id, result, err), with
        nothing written back and no descriptors."""
        if not self.daemon:
            raise LocalProtocolError("REPLY may not be sent from this side")
        return _REPLY_FRAME.pack(_REPLY_FRAME.size, MessageType.REPLY, 0, req_id, 0, result, err, 0)

    def ioctl_frame(self, req_id: int, request: int, arg: int) -> bytes:
        """The fast path of sending: the frame of Ioctl(req_id, request, arg), no inline
        struct."""
        if self.daemon:
            raise LocalProtocolError("IOCTL may not be sent from this side")
        return _IOCTL_FRAME.pack(
            _IOCTL_FRAME.size, MessageType.IOCTL, 0, req_id, 0, request & 0xFFFFFFFF, 0,
            arg & (2**64 - 1),
        )  # fmt: skip

    def _violation(self, message: str) -> RemoteProtocolError:
        self.close_stray_fds()
        return RemoteProtocolError(message)

    # writing

    def send(self, event: Event) -> tuple[bytes, list[int]]:
        """The frame for event, and the descriptors to pass with it."""
        parts, fds = self.frame(event)
        return b"".join(parts), fds

    def frame(self, event: Event) -> tuple[list[bytes | bytearray | memoryview], list[int]]:
        """The frame for event as buffers to send in order (bulk data is not copied: give them
        to sendmsg as an iovec), and the descriptors to pass with the first byte."""
        kind, body, fds = _encode(event)
        if kind not in self._outgoing:
            raise LocalProtocolError(f"{kind.name} may not be sent from this side")
        if (fds and kind not in MAY_CARRY_FDS) or len(fds) > MAX_FDS:
            raise LocalProtocolError(f"{kind.name} may not carry {len(fds)} descriptors")
        head, bulk = body if isinstance(body, tuple) else (body, b"")
        length = HEADER_SIZE + len(head) + memoryview(bulk).nbytes
        if length > self.max_message:
            raise LocalProtocolError(f"{kind.name} of {length} bytes exceeds {self.max_message}")
        header = _HEADER.pack(length, kind, len(fds), event.id, 0)
        parts: list[bytes | bytearray | memoryview] = [header + bytes(head)]
        if bulk:
            parts.append(bulk)
        return parts, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


Body = bytes | bytearray | memoryview | tuple[bytes, bytes | bytearray | memoryview]


def _encode(event: Event) -> tuple[MessageType, Body, list[int]]:
    """The frame's type, body (or a fixed part and a bulk part, never copied) and descriptors."""
    if isinstance(event, Hello):
        return MessageType.HELLO, _HELLO.pack(MAGIC, event.major, event.minor, event.flags), []
    if isinstance(event, HelloReply):
        body = _HELLO_REPLY.pack(
            MAGIC, event.major, event.minor, event.fd_kind, event.page_size, event.max_message,
            event.max_fds, event.window, event.errno, event.extensions,
            event.profile.encode("ascii"),
        )  # fmt: skip
        return MessageType.HELLO_REPLY, body, list(event.fds)
    if isinstance(event, Ioctl):
        flags = 0
        if event.inline is not None:
            flags |= IOCTL_INLINE | (IOCTL_INLINE_WRITABLE if event.inline_writable else 0)
        body = _IOCTL.pack(event.request & 0xFFFFFFFF, flags, event.arg & (2**64 - 1))
        return MessageType.IOCTL, body + (event.inline or b""), []
    if isinstance(event, Reply):
        flags = REPLY_WRITTEN_BACK if event.written_back is not None else 0
        body = _REPLY.pack(event.result, event.errno, flags) + (event.written_back or b"")
        return MessageType.REPLY, body, list(event.fds)
    if isinstance(event, Read):
        return MessageType.READ, _READ.pack(event.addr, event.size), []
    if isinstance(event, ReadData):
        return MessageType.READ_DATA, event.data, []
    if isinstance(event, Write):
        return MessageType.WRITE, (_WRITE.pack(event.addr), event.data), []
    if isinstance(event, WriteDone):
        return MessageType.WRITE_DONE, _WRITE_DONE.pack(event.written), []
    if isinstance(event, Vmas):
        return MessageType.VMAS, _VMAS.pack(event.start, event.end), []
    if isinstance(event, VmasData):
        records = []
        for vma in event.vmas:
            flags = (VMA_SHARED if vma.shared else 0) | (VMA_WRITABLE if vma.writable else 0)
            flags |= VMA_HAS_FD if vma.fd is not None else 0
            flags |= VMA_READABLE if vma.readable else 0
            records.append(_VMA.pack(
                vma.start, vma.end, vma.pgoff, vma.dev, vma.ino, VMA_KINDS.index(vma.kind), flags
            ))  # fmt: skip
        fds = [vma.fd for vma in event.vmas if vma.fd is not None]
        return MessageType.VMAS_DATA, _VMAS_DATA.pack(len(records), 0) + b"".join(records), fds
    if isinstance(event, ReadWindow):
        return MessageType.READ_WINDOW, _WINDOW_OP.pack(event.addr, event.size), []
    if isinstance(event, WriteWindow):
        return MessageType.WRITE_WINDOW, _WINDOW_OP.pack(event.addr, event.size), []
    if isinstance(event, WindowDone):
        return MessageType.WINDOW_DONE, _WINDOW_DONE.pack(event.count), []
    if isinstance(event, Error):
        return MessageType.ERROR, _ERROR.pack(event.code) + event.message.encode(), []
    raise LocalProtocolError(f"not an event: {event!r}")


def _fixed(
    layout: object, body: bytes | memoryview, exact: bool = True
) -> tuple[int | bytes, ...]:
    size = layout.size  # type: ignore[attr-defined]
    if len(body) < size or (exact and len(body) != size):
        raise ValueError(f"body of {len(body)} bytes, expected {size}")
    return layout.unpack_from(body)  # type: ignore[attr-defined, no-any-return]


def _decode(kind: MessageType, req_id: int, body: bytes | memoryview, fds: list[int]) -> Event:
    if kind is MessageType.HELLO:
        magic, major, minor, flags = _fixed(_HELLO, body)
        if magic != MAGIC:
            raise ValueError("bad magic")
        return Hello(req_id, int(major), int(minor), int(flags))
    if kind is MessageType.HELLO_REPLY:
        (magic, major, minor, fd_kind, page, max_msg, max_fds, window, err, ext,
         profile) = _fixed(_HELLO_REPLY, body)  # fmt: skip
        if magic != MAGIC:
            raise ValueError("bad magic")
        assert isinstance(profile, bytes) and isinstance(fd_kind, int)
        return HelloReply(
            req_id, FdKind(fd_kind), int(page), profile.rstrip(b"\0").decode("ascii"), int(err),
            int(ext), int(max_msg), int(max_fds), int(window), int(major), int(minor), fds,
        )  # fmt: skip
    if kind is MessageType.IOCTL:
        request, flags, arg = _fixed(_IOCTL, body, exact=False)
        assert isinstance(flags, int)
        rest = bytes(body[_IOCTL.size :])
        if not flags & IOCTL_INLINE and rest:
            raise ValueError("inline bytes without IOCTL_INLINE")
        inline = rest if flags & IOCTL_INLINE else None
        return Ioctl(req_id, int(request), int(arg), inline, bool(flags & IOCTL_INLINE_WRITABLE))
    if kind is MessageType.REPLY:
        result, err, flags = _fixed(_REPLY, body, exact=False)
        assert isinstance(flags, int)
        back = bytes(body[_REPLY.size :]) if flags & REPLY_WRITTEN_BACK else None
        return Reply(req_id, int(result), int(err), back, fds)
    if kind is MessageType.READ:
        addr, size = _fixed(_READ, body)
        return Read(req_id, int(addr), int(size))
    if kind is MessageType.READ_DATA:
        return ReadData(req_id, body)
    if kind is MessageType.WRITE:
        (addr,) = _fixed(_WRITE, body, exact=False)
        return Write(req_id, int(addr), body[_WRITE.size :])
    if kind is MessageType.WRITE_DONE:
        (written,) = _fixed(_WRITE_DONE, body)
        return WriteDone(req_id, int(written))
    if kind is MessageType.VMAS:
        start, end = _fixed(_VMAS, body)
        return Vmas(req_id, int(start), int(end))
    if kind is MessageType.VMAS_DATA:
        return _decode_vmas(req_id, body, fds)
    if kind is MessageType.READ_WINDOW or kind is MessageType.WRITE_WINDOW:
        addr, size = _fixed(_WINDOW_OP, body)
        op = ReadWindow if kind is MessageType.READ_WINDOW else WriteWindow
        return op(req_id, int(addr), int(size))
    if kind is MessageType.WINDOW_DONE:
        (count,) = _fixed(_WINDOW_DONE, body)
        return WindowDone(req_id, int(count))
    code, = _fixed(_ERROR, body, exact=False)  # fmt: skip
    return Error(req_id, int(code), bytes(body[_ERROR.size :]).decode(errors="replace"))


def _decode_vmas(req_id: int, body: bytes | memoryview, fds: list[int]) -> VmasData:
    count, _pad = _fixed(_VMAS_DATA, body, exact=False)
    assert isinstance(count, int)
    if len(body) != _VMAS_DATA.size + count * _VMA.size:
        raise ValueError(f"{count} records do not fill {len(body)} bytes")
    result, fd_at = [], 0
    for i in range(count):
        start, end, pgoff, dev, ino, kind, flags = _VMA.unpack_from(
            body, _VMAS_DATA.size + i * _VMA.size
        )
        fd = None
        if flags & VMA_HAS_FD:
            if fd_at >= len(fds):
                raise ValueError("more records with descriptors than descriptors")
            fd, fd_at = fds[fd_at], fd_at + 1
        result.append(Vma(
            start, end, VMA_KINDS[kind], bool(flags & VMA_SHARED), bool(flags & VMA_WRITABLE),
            dev, ino, pgoff, fd, bool(flags & VMA_READABLE),
        ))  # fmt: skip
    if fd_at != len(fds):
        raise ValueError("descriptors with no record")
    return VmasData(req_id, result, fds)
