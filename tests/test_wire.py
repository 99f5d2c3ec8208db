"""The wire codec: one table of events, read whole, byte at a time and with trailing bytes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmtag import wire
from kvmtag.usermem import Vma, VmaKind


def _pipe_fds(n: int) -> list[int]:
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# (sender is the daemon?, event) — events without descriptors.
EVENTS: list[tuple[bool, wire.Event]] = [
    (False, wire.Hello(1)),
    (True, wire.HelloReply(1, wire.FdKind.VM, 16384, "6.12", extensions=5)),
    (False, wire.Ioctl(7, 0xAE03, 205)),
    (False, wire.Ioctl(8, 0x8030AEB4, 0, bytes(range(48)), True)),
    (False, wire.Ioctl(9, 0x4020AEAF, 0, b"", False)),
    (True, wire.Reply(7, 1)),
    (True, wire.Reply(8, -1, 14)),
    (True, wire.Reply(8, 0, 0, b"\x01" * 32)),
    (True, wire.Read(3, 0x7F00_0000_1000, 4096)),
    (False, wire.ReadData(3, b"tag" * 100)),
    (False, wire.ReadData(3, b"")),
    (True, wire.Write(4, 2**64 - 1, b"\x0f" * 1000)),
    (False, wire.WriteDone(4, 999)),
    (True, wire.Vmas(5, 0x1000, 0x9000)),
    (False, wire.VmasData(5, [Vma(0x1000, 0x5000, VmaKind.ANON, False, True)])),
    (True, wire.Error(0, 71, "bad frame")),
]


def roundtrip(daemon_sends: bool, event: wire.Event, chunk: int | None) -> wire.Event:
    sender, receiver = wire.Codec(daemon=daemon_sends), wire.Codec(daemon=not daemon_sends)
    data, _ = sender.send(event)
    trailing = wire.Codec(daemon=daemon_sends).send(event)[0]
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    got = wire.NEED_DATA
    for piece in pieces:
        assert got is wire.NEED_DATA
        receiver.receive_data(piece, [])
        got = receiver.next_event()
    receiver.receive_data(trailing)
    assert receiver.buffered == len(trailing)  # the next frame is left intact
    assert isinstance(receiver.next_event(), type(event))
    return got  # type: ignore[return-value]


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize(("daemon_sends", "event"), EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(daemon_sends: bool, event: wire.Event, chunk: int | None) -> None:
    got = roundtrip(daemon_sends, event, chunk)
    if isinstance(event, wire.ReadData | wire.Write):
        assert bytes(got.data) == bytes(event.data)  # type: ignore[union-attr]
        assert got.id == event.id
    else:
        assert got == event


def test_descriptors_travel_with_their_frame() -> None:
    fds = _pipe_fds(2)
    vmas = [
        Vma(0x1000, 0x3000, VmaKind.SHMEM, True, True, 0x1A, 77, 0x2000, fds[0]),
        Vma(0x3000, 0x4000, VmaKind.ANON, False, True),
        Vma(0x5000, 0x6000, VmaKind.HUGETLBFS, True, False, 0x1B, 78, 0, fds[1]),
        Vma(0x7000, 0x8000, VmaKind.ANON, False, False, readable=False),
    ]
    data, out_fds = wire.Codec(daemon=False).send(wire.VmasData(2, vmas))
    assert out_fds == fds
    receiver = wire.Codec(daemon=True)
    receiver.receive_data(data[:5], out_fds)  # descriptors come with the first byte
    assert receiver.next_event() is wire.NEED_DATA
    receiver.receive_data(data[5:])
    got = receiver.next_event()
    assert isinstance(got, wire.VmasData) and got.vmas == vmas and got.fds == fds
    for fd in fds:
        os.close(fd)


def frame(mtype: int, body: bytes = b"", nfds: int = 0, length: int | None = None,
          reserved: int = 0) -> bytes:
    size = wire.HEADER_SIZE + len(body) if length is None else length
    return struct.pack("<IHHII", size, mtype, nfds, 1, reserved) + body


def one_vma(start: int, end: int, kind: int = 0) -> bytes:
    return struct.pack("<II", 1, 0) + struct.pack("<5QII", start, end, 0, 0, 0, kind, 0)


HELLO_BODY = wire.MAGIC + struct.pack("<HHI", 1, 0, 0)

VIOLATIONS = [
    ("too long", frame(wire.MessageType.HELLO, length=wire.MAX_MESSAGE + 1), 0),
    ("shorter than a header", frame(wire.MessageType.HELLO, length=15), 0),
    ("unknown type", frame(99), 0),
    ("daemon's message from a client", frame(wire.MessageType.REPLY, bytes(16)), 0),
    ("reserved field", frame(wire.MessageType.HELLO, HELLO_BODY, reserved=1), 0),
    ("bad magic", frame(wire.MessageType.HELLO, b"XXXX" + HELLO_BODY[4:]), 0),
    ("short body", frame(wire.MessageType.HELLO, HELLO_BODY[:-1]), 0),
    ("long body", frame(wire.MessageType.HELLO, HELLO_BODY + b"\0"), 0),
    ("descriptors on an IOCTL", frame(wire.MessageType.IOCTL, bytes(16), nfds=1), 1),
    ("fewer descriptors than declared", frame(wire.MessageType.VMAS_DATA, bytes(8), nfds=2), 1),
    ("descriptors with no record", frame(wire.MessageType.VMAS_DATA, bytes(8), nfds=1), 1),
    ("inline bytes without the flag", frame(wire.MessageType.IOCTL, bytes(20)), 0),
    ("VMA with a bad kind", frame(wire.MessageType.VMAS_DATA, one_vma(0, 4096, kind=9)), 0),
    ("VMA ending before it starts", frame(wire.MessageType.VMAS_DATA, one_vma(8192, 4096)), 0),
]


@pytest.mark.parametrize(("name", "data", "nfds"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_violations_are_the_peers_and_close_descriptors(name: str, data: bytes, nfds: int) -> None:
    fds = _pipe_fds(nfds)
    codec = wire.Codec(daemon=True)
    codec.receive_data(data, fds)
    with pytest.raises(wire.RemoteProtocolError):
        codec.next_event()
    assert not any(_is_open(fd) for fd in fds)


def test_frame_length_is_checked_before_the_body_arrives() -> None:
    codec = wire.Codec(daemon=True)
    codec.receive_data(frame(wire.MessageType.READ_DATA, length=2**31)[: wire.HEADER_SIZE])
    with pytest.raises(wire.RemoteProtocolError, match="frame length"):
        codec.next_event()


@pytest.mark.parametrize(
    "event",
    [wire.Reply(1, 0), wire.Read(1, 0, 1)],
    ids=["reply", "read"],
)
def test_a_client_cannot_send_daemon_messages(event: wire.Event) -> None:
    with pytest.raises(wire.LocalProtocolError):
        wire.Codec(daemon=False).send(event)


def test_oversized_frame_is_refused_locally() -> None:
    with pytest.raises(wire.LocalProtocolError):
        wire.Codec(daemon=False).send(wire.ReadData(1, bytes(wire.MAX_MESSAGE)))


def test_declarations_match_the_compiled_layouts() -> None:
    assert wire.header.sizeof() == wire.HEADER_SIZE == 16
    assert wire.hello_reply.sizeof() == 56
    assert wire.vma_record.sizeof() == 48


@pytest.mark.parametrize("piece", [1000, 65536, 300_000])
def test_a_bulk_frame_is_received_in_place(piece: int) -> None:
    """receive_into() gives room for the rest of a large frame; bytes before and after it, and
    the next frame, still go through receive_data."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    sender = wire.Codec(daemon=True)
    first, _ = sender.send(wire.Write(9, 0x1000, payload))
    second, _ = sender.send(wire.Read(10, 0x2000, 16))
    stream = first + second
    receiver = wire.Codec(daemon=False)
    receiver.receive_data(stream[:20])  # the header and a little more
    assert receiver.next_event() is wire.NEED_DATA
    at = 20
    while (room := receiver.receive_into()) is not None:
        n = min(piece, len(room))
        room[:n] = stream[at : at + n]
        room.release()
        receiver.received(n)
        at += n
        if at < len(first):
            assert receiver.next_event() is wire.NEED_DATA
    assert at == len(first)
    got = receiver.next_event()
    assert isinstance(got, wire.Write) and got.id == 9 and bytes(got.data) == payload
    receiver.receive_data(stream[at:])
    assert receiver.next_event() == wire.Read(10, 0x2000, 16)


# --- the fast paths: one IOCTL with a value argument, one plain REPLY ------------------------

U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


@given(U32, U32, U64)
def test_fast_ioctl_frames_are_the_general_ones(req_id: int, request: int, arg: int) -> None:
    client, daemon = wire.Codec(daemon=False), wire.Codec(daemon=True)
    frame = client.ioctl_frame(req_id, request, arg)
    assert frame == client.send(wire.Ioctl(req_id, request, arg))[0]
    assert daemon.plain_ioctl(frame) == wire.Ioctl(req_id, request, arg)
    assert daemon.next_event() is wire.NEED_DATA  # consumed, and the stream is in step
    daemon.receive_data(frame)
    assert daemon.next_event() == wire.Ioctl(req_id, request, arg)


@given(U32, st.integers(-(2**63), 2**63 - 1), U32)
def test_fast_reply_frames_are_the_general_ones(req_id: int, result: int, err: int) -> None:
    client, daemon = wire.Codec(daemon=False), wire.Codec(daemon=True)
    frame = daemon.reply_frame(req_id, result, err)
    assert frame == daemon.send(wire.Reply(req_id, result, err))[0]
    assert client.plain_reply(frame) == wire.Reply(req_id, result, err)
    client.receive_data(frame)
    assert client.next_event() == wire.Reply(req_id, result, err)


@pytest.mark.parametrize("event", [
    wire.Reply(1, 0, 0, written_back=b"\x01" * 8),  # writes back
    wire.Reply(1, 0, 0, fds=[0]),  # carries a descriptor (declared in the header)
    wire.Write(1, 0x1000, b"\x02" * 8),  # a callback
    wire.Error(1, 71, "x" * 12),
])  # fmt: skip
def test_anything_else_takes_the_general_path(event: wire.Event) -> None:
    client = wire.Codec(daemon=False)
    frame = wire.Codec(daemon=True).frame(event)[0]
    data = b"".join(bytes(p) for p in frame)
    assert client.plain_reply(data) is None
    assert client.plain_reply(data[:32]) is None
    assert client.next_event() is wire.NEED_DATA and client.buffered == 0  # nothing consumed


def test_fast_paths_need_an_empty_buffer_and_the_right_side() -> None:
    client, daemon = wire.Codec(daemon=False), wire.Codec(daemon=True)
    reply = daemon.reply_frame(1, 0, 0)
    client.receive_data(reply[:5])  # a frame already begun: its bytes come first
    assert client.plain_reply(reply) is None
    assert daemon.plain_ioctl(b"") is None
    with pytest.raises(wire.RemoteProtocolError):
        daemon.plain_reply(reply)
    with pytest.raises(wire.LocalProtocolError):
        client.reply_frame(1, 0, 0)
    with pytest.raises(wire.LocalProtocolError):
        daemon.ioctl_frame(1, 0, 0)
