"""The daemon's view of the caller's memory: inline structs, windows, the address space's end."""

from __future__ import annotations

from kvmtag import wire
from kvmtag.remote import INLINE_ADDR, RemoteMemory


class Recorder:
    """Answers READ with `readable` bytes of 0xAB (a fault after them), WRITE fully."""

    def __init__(self, readable: int = 2**70) -> None:
        self.asked: list[wire.Event] = []
        self.readable = readable

    def __call__(self, event: wire.Event) -> wire.Event:
        self.asked.append(event)
        if isinstance(event, wire.Read):
            n = max(0, min(event.size, self.readable - event.addr))
            return wire.ReadData(event.id, b"\xab" * n)
        assert isinstance(event, wire.Write)
        return wire.WriteDone(event.id, len(event.data))


def memory(recorder: Recorder, inline: bytes | None = None, writable: bool = False,
           window: int = 4096) -> RemoteMemory:
    req = wire.Ioctl(7, 0x8030AEB4, 0, inline, writable)
    return RemoteMemory(req, "p", recorder, lambda v: v, window)


def test_reads_go_in_windows_and_stop_at_a_fault() -> None:
    rec = Recorder(readable=0x1000 + 10_000)
    got = memory(rec).copy_from_user(0x1000, 20_000)
    assert len(got) == 10_000
    assert [e.size for e in rec.asked] == [4096, 4096, 4096]  # type: ignore[union-attr]


def test_nothing_is_asked_beyond_the_end_of_the_address_space() -> None:
    rec = Recorder()
    got = memory(rec).copy_from_user(2**64 - 100, 4096)
    assert len(got) == 100
    assert all(e.addr + e.size <= 2**64 for e in rec.asked)  # type: ignore[union-attr]
    assert memory(rec).copy_to_user(2**64 - 10, b"x" * 50) == 10


def test_the_inline_struct_is_served_here_and_written_back_only_if_writable() -> None:
    rec = Recorder()
    mem = memory(rec, b"\x01" * 16, writable=True)
    assert mem.copy_from_user(INLINE_ADDR, 16) == b"\x01" * 16
    assert mem.copy_from_user(INLINE_ADDR, 32) == b"\x01" * 16  # ends with the struct
    assert mem.copy_to_user(INLINE_ADDR + 8, b"\x02" * 8) == 8
    assert mem.written_back and mem.inline == bytearray(b"\x01" * 8 + b"\x02" * 8)
    readonly = memory(rec, b"\x01" * 16, writable=False)
    assert readonly.copy_to_user(INLINE_ADDR, b"\x02") == 0 and not readonly.written_back
    assert not rec.asked  # the inline struct never costs a callback
