"""The migration stream: records ⇄ events, with no I/O (docs/MIGRATION.md is the reference).

A stream is a 16-byte preamble (magic "KVMTAGVM", version, CRC) followed by records, each a
16-byte header (type, payload length, sequence number, CRC-32 of header and payload) and its
payload:

    HEADER   the machine: page size, MTE, vCPUs, kernel profile, the RAM layout (memslots)
    PAGES    a window of guest pages: which are carried, which are all-zero (data elided),
             which have all-zero tags (tags elided); then the data pages, then packed tags
    PASS     the end of a pre-copy pass (the last one is marked final: the guest was paused)
    REGS     one vCPU's registers (after the final pass: registers last)
    CHECK    optional: a SHA-256 of all guest RAM and tags at the switchover
    END      record count, byte count, and a SHA-256 over the preamble and every record
             header before it (each header holds its payload's CRC-32)

`Writer` turns records into lists of buffers (a scatter list for sendmsg/writev). `Reader`
buffers bytes (`receive_data`) and hands out events (`next_event`, which returns NEED_DATA
instead of raising); every violation raises `StreamError` with a message naming the record and
the rule broken. The reader bounds a record's length before buffering its payload, checks the
order of records with a transition table, each record's CRC and sequence number, every field
against the stream's own RAM layout, and at END the digest and that every page of guest RAM was
sent at least once. Bytes after END are left alone (`trailing`).

Why END's digest covers the headers and not the payloads again: each header carries its
payload's CRC-32, so a SHA-256 of the headers commits to every byte (through the CRCs) and to
the number, order and types of the records: nothing lost, repeated or reordered. Hashing 1 GiB
of pages a second time with SHA-256 would cost about 0.6 s of CPU on each side for no protection
against accidental damage that the CRCs do not already give (and no unkeyed digest stops a
forger: the reader's structural checks are what keep a hostile stream harmless).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clients.kvmtag_vmm import _bits

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Buffer

__all__ = [
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_WINDOW_BYTES",
    "NEED_DATA",
    "VERSION",
    "Check",
    "End",
    "Header",
    "NeedData",
    "Pages",
    "PassEnd",
    "Reader",
    "RecordType",
    "Registers",
    "SlotLayout",
    "StreamError",
    "Writer",
]

MAGIC = b"KVMTAGVM"
VERSION = (1, 0)
PAGE_SIZES = (4096, 16384, 65536)
MAX_PAYLOAD = 16 << 20  # no record payload is larger: bounded before it is buffered
MAX_WINDOW_BYTES = 8 << 20  # guest RAM covered by one PAGES record
MAX_SLOTS = 32767  # arm64's KVM_USER_MEM_SLOTS
MAX_VCPUS = 512
MAX_REGS = 1024  # registers in one REGS record
MAX_RAM = 1 << 40  # guest RAM a stream may describe
PROFILE_BYTES = 16

FLAG_MTE = 1 << 0  # HEADER.flags
FLAG_FINAL = 1 << 0  # PASS.flags: the last pass, made with every vCPU paused

_PREAMBLE = struct.Struct("<8sHHI")  # magic, major, minor, crc32 of the first 12 bytes
_RECORD = struct.Struct("<IIII")  # type, length, seq, crc32 of bytes 0..11 and the payload
_HEADER = struct.Struct("<IIII16sQQ")  # page_size, flags, nvcpus, nslots, profile, ram, 0
_SLOT = struct.Struct("<IIQQ")  # slot id, flags (0), guest_phys_addr, size
_PAGES = struct.Struct("<QII")  # gpa, npages, flags (0); then 3 bitmaps, data, tags
_PASS = struct.Struct("<II")  # number, flags
_REGS = struct.Struct("<II")  # vcpu index, count; then count × (u64 id, u64 value)
_REG = struct.Struct("<QQ")
_END = struct.Struct("<QQ32s")  # records before END, bytes before END, sha256

PREAMBLE_SIZE = _PREAMBLE.size
RECORD_HEADER_SIZE = _RECORD.size


class RecordType(enum.IntEnum):
    HEADER = 1
    PAGES = 2
    PASS = 3
    REGS = 4
    CHECK = 5
    END = 6


class StreamError(Exception):
    """The stream is refused: wrong, truncated or corrupt. The message says why."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """One memslot of guest RAM."""

    slot: int
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class Header:
    """The machine a stream carries."""

    page_size: int
    mte: bool
    nvcpus: int
    profile: str
    slots: tuple[SlotLayout, ...]

    @property
    def ram_bytes(self) -> int:
        return sum(s.size for s in self.slots)

    @property
    def packed_per_page(self) -> int:
        """Packed tag bytes per page: PAGE_SIZE/32 (two 4-bit tags per byte)."""
        return self.page_size // 32

    @property
    def max_window(self) -> int:
        """Pages in one PAGES record at most."""
        return MAX_WINDOW_BYTES // self.page_size


@dataclass(frozen=True)
class Pages:
    """A window of `npages` pages from `gpa`. Bitmaps are ints, bit i = page i of the window.

    `data` holds PAGE_SIZE bytes for each page in present & ~zero_data, in ascending order;
    `tags` PAGE_SIZE/32 packed bytes (byte k: granule 2k low nibble, 2k+1 high nibble) for each
    page in present & ~zero_tags. Carried pages not in those sets are all zero."""

    gpa: int
    npages: int
    present: int
    zero_data: int
    zero_tags: int
    data: memoryview
    tags: memoryview


@dataclass(frozen=True)
class PassEnd:
    number: int
    final: bool


@dataclass(frozen=True)
class Registers:
    vcpu: int
    regs: tuple[tuple[int, int], ...]  # (KVM register id, value)


@dataclass(frozen=True)
class Check:
    """SHA-256 of guest RAM and tags at the switchover (vm.Machine.content_digest)."""

    digest: bytes


@dataclass(frozen=True)
class End:
    records: int
    nbytes: int
    digest: bytes


Event = Header | Pages | PassEnd | Registers | Check | End


# --- writer ------------------------------------------------------------------------------------


class Writer:
    """Encodes a stream. Each method returns the buffers to send, in order (nothing is copied
    but the small headers); it keeps the sequence number, the byte count and the digest."""

    def __init__(self) -> None:
        self._seq = 0
        self._nbytes = 0
        self._hash = hashlib.sha256()
        self._header: Header | None = None
        self.ended = False

    @property
    def nbytes(self) -> int:
        """Stream bytes produced so far."""
        return self._nbytes

    def _emit(self, parts: Sequence[Buffer]) -> list[Buffer]:
        """Count the bytes; hash the first part (the preamble, or a record's header)."""
        self._hash.update(parts[0])
        self._nbytes += sum(memoryview(p).nbytes for p in parts)
        return list(parts)

    def record(self, rtype: RecordType, parts: Sequence[Buffer]) -> list[Buffer]:
        if self.ended:
            raise ValueError("the stream has ended")
        length = sum(memoryview(p).nbytes for p in parts)
        if length > MAX_PAYLOAD:
            raise ValueError(f"{rtype.name} payload of {length} bytes exceeds {MAX_PAYLOAD}")
        head = struct.pack("<III", rtype, length, self._seq)
        crc = zlib.crc32(head)
        for p in parts:
            crc = zlib.crc32(p, crc)
        self._seq += 1
        return self._emit([head + struct.pack("<I", crc), *parts])

    def start(self, header: Header) -> list[Buffer]:
        """The preamble and the HEADER record."""
        if self._nbytes:
            raise ValueError("the stream has started")
        _check_header(header, ValueError)
        self._header = header
        head = struct.pack("<8sHH", MAGIC, *VERSION)
        preamble = head + struct.pack("<I", zlib.crc32(head))
        profile = header.profile.encode("ascii")[:PROFILE_BYTES]
        payload = bytearray(_HEADER.pack(
            header.page_size, FLAG_MTE if header.mte else 0, header.nvcpus, len(header.slots),
            profile, header.ram_bytes, 0,
        ))  # fmt: skip
        for s in header.slots:
            payload += _SLOT.pack(s.slot, 0, s.gpa, s.size)
        return self._emit([preamble]) + self.record(RecordType.HEADER, [payload])

    def pages(
        self, gpa: int, npages: int, present: int, zero_data: int, zero_tags: int,
        data: Buffer, tags: Buffer,
    ) -> list[Buffer]:  # fmt: skip
        """A PAGES record. `data` and `tags` are exactly the carried pages' bytes (see Pages)."""
        h = self._header
        if h is None:
            raise ValueError("PAGES before the header")
        nbytes = _bits.words_bytes(npages)
        all_bits = _bits.mask(npages)
        if not 0 < npages <= h.max_window or present & ~all_bits or not present:
            raise ValueError(f"bad window: {npages} pages, present {present:#x}")
        if zero_data & ~present or zero_tags & ~present:
            raise ValueError("zero bitmaps must be subsets of present")
        if not h.mte and zero_tags != present:
            raise ValueError("a stream without MTE carries no tags")
        want_data = (present & ~zero_data).bit_count() * h.page_size
        want_tags = (present & ~zero_tags).bit_count() * h.packed_per_page
        if memoryview(data).nbytes != want_data or memoryview(tags).nbytes != want_tags:
            raise ValueError("data or tags do not match the bitmaps")
        fixed = _PAGES.pack(gpa, npages, 0) + b"".join(
            b.to_bytes(nbytes, "little") for b in (present, zero_data, zero_tags)
        )
        return self.record(RecordType.PAGES, [fixed, data, tags])

    def pass_end(self, number: int, final: bool) -> list[Buffer]:
        return self.record(RecordType.PASS, [_PASS.pack(number, FLAG_FINAL if final else 0)])

    def registers(self, vcpu: int, regs: Sequence[tuple[int, int]]) -> list[Buffer]:
        payload = _REGS.pack(vcpu, len(regs)) + b"".join(_REG.pack(i, v) for i, v in regs)
        return self.record(RecordType.REGS, [payload])

    def check(self, digest: bytes) -> list[Buffer]:
        if len(digest) != 32:
            raise ValueError("a CHECK digest is 32 bytes (SHA-256)")
        return self.record(RecordType.CHECK, [digest])

    def end(self) -> list[Buffer]:
        payload = _END.pack(self._seq, self._nbytes, self._hash.digest())
        out = self.record(RecordType.END, [payload])
        self.ended = True
        return out


# --- reader ------------------------------------------------------------------------------------


class _State(enum.Enum):
    PREAMBLE = "the preamble"
    HEADER = "the HEADER record"
    RAM = "PAGES or PASS records"
    REGS = "REGS records"
    CHECKED = "END (after CHECK)"
    DONE = "nothing (the stream has ended)"


# The order of records, as data: (state, record type) -> next state. A missing key is an error.
_TRANSITIONS: dict[tuple[_State, RecordType], _State] = {
    (_State.HEADER, RecordType.HEADER): _State.RAM,
    (_State.RAM, RecordType.PAGES): _State.RAM,
    (_State.RAM, RecordType.PASS): _State.RAM,  # REGS after a final PASS: see _on_pass
    (_State.REGS, RecordType.REGS): _State.REGS,
    (_State.REGS, RecordType.CHECK): _State.CHECKED,
    (_State.REGS, RecordType.END): _State.DONE,
    (_State.CHECKED, RecordType.END): _State.DONE,
}


def _max_payload(rtype: RecordType) -> int:
    """The largest payload a record of this type can have (checked before buffering it)."""
    return {
        RecordType.HEADER: _HEADER.size + MAX_SLOTS * _SLOT.size,
        RecordType.PAGES: MAX_PAYLOAD,
        RecordType.PASS: _PASS.size,
        RecordType.REGS: _REGS.size + MAX_REGS * _REG.size,
        RecordType.CHECK: 32,
        RecordType.END: _END.size,
    }[rtype]


@dataclass
class _Progress:
    """What the reader knows about the stream so far."""

    header: Header | None = None
    passes: int = 0
    vcpus_done: int = 0
    coverage: dict[int, int] = field(default_factory=dict)  # slot index -> pages seen (bits)


class Reader:
    """Decodes a stream. Feed it with `receive_data(bytes)`, or without a copy by reading into
    `buffer()` and calling `received(n)`; then call `next_event()` until NEED_DATA.

    Raises StreamError on the first violation; the reader is then unusable. After END,
    `done` is true and bytes beyond it are kept in `trailing`.

    Headers are assembled in a small buffer; once a header has been checked (its type allowed
    here, its length within its type's limit), the payload gets a buffer of its own, which
    `buffer()` exposes so that a socket or file can be read straight into it. The events of a
    record (Pages.data, Pages.tags) are views of that buffer, which the reader never touches
    again."""

    def __init__(self) -> None:
        self._buf = bytearray()  # the preamble or a record header being assembled; trailing
        self._head: tuple[RecordType, int, int, int] | None = None  # the header being served
        self._payload = bytearray()
        self._filled = 0  # bytes of _payload received
        self._scratch = bytearray(64 << 10)
        self._state = _State.PREAMBLE
        self._seq = 0
        self._nbytes = 0  # stream bytes consumed (preamble and whole records)
        self._hash = hashlib.sha256()
        self._p = _Progress()
        self._starts: list[int] = []  # slot gpas, sorted, for bisect
        self._failed: StreamError | None = None
        self.version: tuple[int, int] | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def nbytes(self) -> int:
        """Stream bytes consumed so far."""
        return self._nbytes

    @property
    def header(self) -> Header | None:
        return self._p.header

    @property
    def trailing(self) -> bytes:
        """Bytes received after END (only meaningful once done)."""
        return bytes(self._buf) if self.done else b""

    def receive_data(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if self._head is not None and self._filled < len(self._payload):
            take = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        self._buf += view

    def buffer(self) -> memoryview:
        """Where the next bytes of the stream should be read to (then call `received`): the
        rest of the current payload, else just what the next header still lacks, so that the
        payload after it lands in its own buffer too."""
        if self._head is not None and self._filled < len(self._payload):
            return memoryview(self._payload)[self._filled :]
        if self._state is _State.DONE:
            return memoryview(self._scratch)
        want = (_PREAMBLE.size if self._state is _State.PREAMBLE else _RECORD.size) - len(
            self._buf
        )
        return memoryview(self._scratch)[: max(want, 1)]

    def received(self, n: int) -> None:
        """n bytes were read into the last `buffer()`."""
        if self._head is not None and self._filled < len(self._payload):
            if not 0 <= n <= len(self._payload) - self._filled:
                raise ValueError(f"received({n}) beyond the buffer")
            self._filled += n
        else:
            if not 0 <= n <= len(self._scratch):
                raise ValueError(f"received({n}) beyond the buffer")
            self._buf += memoryview(self._scratch)[:n]

    def eof(self) -> None:
        """The byte source ended: refuse a stream that has not reached END."""
        self._raise_if_failed()
        if not self.done:
            where = f"after {self._nbytes} bytes ({self._seq} records)"
            pending = len(self._buf) + (_RECORD.size + self._filled if self._head else 0)
            extra = f", with {pending} bytes of an incomplete record" if pending else ""
            raise self._fail(f"truncated stream: it ends {where}{extra}, expecting "
                             f"{self._state.value}")  # fmt: skip

    def next_event(self) -> Event | NeedData:
        self._raise_if_failed()
        try:
            return self._next_event()
        except StreamError as e:
            self._failed = e
            raise

    # --- framing ----------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise StreamError(f"the stream was already refused: {self._failed}")

    def _fail(self, why: str) -> StreamError:
        self._failed = StreamError(why)
        return self._failed

    def _where(self) -> str:
        return f"record {self._seq} at byte {self._nbytes}"

    def _next_event(self) -> Event | NeedData:
        if self._state is _State.DONE:
            return NEED_DATA
        if self._state is _State.PREAMBLE:
            if len(self._buf) < _PREAMBLE.size:
                return NEED_DATA
            self._preamble()
        if self._head is None:
            if len(self._buf) < _RECORD.size:
                return NEED_DATA
            self._start_record()
        assert self._head is not None
        if self._filled < len(self._payload):
            return NEED_DATA
        rtype, length, seq, crc = self._head
        where = self._where()
        header = _RECORD.pack(rtype, length, seq, crc)
        payload, self._payload, self._filled, self._head = self._payload, bytearray(), 0, None
        got = zlib.crc32(payload, zlib.crc32(header[:12]))
        if got != crc:
            raise StreamError(f"{where}: {rtype.name} checksum mismatch (CRC-32 {got:#010x}, "
                              f"record says {crc:#010x}): the stream is corrupt")  # fmt: skip
        if seq != self._seq:
            raise StreamError(f"{where}: sequence number {seq}, expected {self._seq} (a record "
                              "is missing or repeated)")  # fmt: skip
        event = self._decode(rtype, memoryview(payload), where)
        if rtype is not RecordType.END:
            self._hash.update(header)
        self._nbytes += _RECORD.size + length
        self._seq += 1
        return event

    def _start_record(self) -> None:
        """Check the header in _buf and give its payload a buffer (moving any payload bytes
        that arrived with the header)."""
        rtype_raw, length, seq, crc = _RECORD.unpack_from(self._buf)
        where = self._where()
        try:
            rtype = RecordType(rtype_raw)
        except ValueError:
            why = f"{where}: unknown record type {rtype_raw} (corrupt stream?)"
            raise StreamError(why) from None
        if (self._state, rtype) not in _TRANSITIONS:
            raise StreamError(f"{where}: a {rtype.name} record where {self._state.value} "
                              "must come")  # fmt: skip
        if length > _max_payload(rtype):
            raise StreamError(f"{where}: {rtype.name} payload of {length} bytes exceeds the "
                              f"limit of {_max_payload(rtype)}")  # fmt: skip
        self._head = (rtype, length, seq, crc)
        self._payload = bytearray(length)
        take = min(length, len(self._buf) - _RECORD.size)
        with memoryview(self._buf) as view:
            self._payload[:take] = view[_RECORD.size : _RECORD.size + take]
        self._filled = take
        del self._buf[: _RECORD.size + take]

    def _preamble(self) -> None:
        magic, major, minor, crc = _PREAMBLE.unpack_from(self._buf)
        if magic != MAGIC:
            raise StreamError(f"not a kvmtag migration stream (magic {bytes(magic)!r}, "
                              f"expected {MAGIC!r})")  # fmt: skip
        if zlib.crc32(self._buf[:12]) != crc:
            raise StreamError("the stream's preamble is corrupt (CRC-32 mismatch)")
        if major != VERSION[0] or minor > VERSION[1]:
            ours = f"{VERSION[0]}.0 to {VERSION[0]}.{VERSION[1]}"
            raise StreamError(f"stream format version {major}.{minor} is not supported (this "
                              f"VMM reads {ours})")  # fmt: skip
        self.version = (major, minor)
        self._hash.update(self._buf[: _PREAMBLE.size])
        self._nbytes += _PREAMBLE.size
        del self._buf[: _PREAMBLE.size]
        self._state = _State.HEADER

    # --- records ----------------------------------------------------------------------------

    def _decode(self, rtype: RecordType, payload: memoryview, where: str) -> Event:
        next_state = _TRANSITIONS[(self._state, rtype)]
        if rtype is RecordType.HEADER:
            event: Event = self._on_header(payload, where)
        elif rtype is RecordType.PAGES:
            event = self._on_pages(payload, where)
        elif rtype is RecordType.PASS:
            event = self._on_pass(payload, where)
            if event.final:
                next_state = _State.REGS
        elif rtype is RecordType.REGS:
            event = self._on_regs(payload, where)
        elif rtype is RecordType.CHECK:
            event = self._on_check(payload, where)
        else:
            event = self._on_end(payload, where)
        self._state = next_state
        return event

    def _on_header(self, payload: memoryview, where: str) -> Header:
        if len(payload) < _HEADER.size:
            raise StreamError(f"{where}: HEADER of {len(payload)} bytes is too short")
        page_size, flags, nvcpus, nslots, profile_raw, ram, reserved = _HEADER.unpack_from(payload)
        if len(payload) != _HEADER.size + nslots * _SLOT.size:
            raise StreamError(f"{where}: HEADER of {len(payload)} bytes does not hold "
                              f"{nslots} slots")  # fmt: skip
        if flags & ~FLAG_MTE or reserved:
            raise StreamError(f"{where}: HEADER has unknown flags {flags:#x} or reserved bits")
        profile = bytes(profile_raw).rstrip(b"\0")
        if not _printable(profile):
            raise StreamError(f"{where}: HEADER kernel profile {bytes(profile_raw)!r} is not "
                              "printable ASCII")  # fmt: skip
        slots = []
        for k in range(nslots):
            slot, sflags, gpa, size = _SLOT.unpack_from(payload, _HEADER.size + k * _SLOT.size)
            if sflags:
                raise StreamError(f"{where}: slot {slot} has unknown flags {sflags:#x}")
            slots.append(SlotLayout(slot, gpa, size))
        header = Header(page_size, bool(flags & FLAG_MTE), nvcpus, profile.decode(), tuple(slots))
        try:
            _check_header(header, StreamError)
        except StreamError as e:
            raise StreamError(f"{where}: {e}") from None
        if ram != header.ram_bytes:
            raise StreamError(f"{where}: HEADER says {ram} bytes of RAM, its slots hold "
                              f"{header.ram_bytes}")  # fmt: skip
        self._p.header = header
        self._starts = [s.gpa for s in header.slots]
        return header

    def _on_pages(self, payload: memoryview, where: str) -> Pages:
        h = self._p.header
        assert h is not None  # the transition table puts HEADER first
        if len(payload) < _PAGES.size:
            raise StreamError(f"{where}: PAGES of {len(payload)} bytes is too short")
        gpa, npages, flags = _PAGES.unpack_from(payload)
        if flags:
            raise StreamError(f"{where}: PAGES has unknown flags {flags:#x}")
        if not 0 < npages <= h.max_window:
            raise StreamError(f"{where}: PAGES window of {npages} pages (1 to {h.max_window})")
        if gpa % h.page_size:
            raise StreamError(f"{where}: PAGES at {gpa:#x} is not page aligned")
        index = bisect.bisect_right(self._starts, gpa) - 1
        end = gpa + npages * h.page_size
        if index < 0 or end > h.slots[index].end:
            raise StreamError(f"{where}: PAGES [{gpa:#x}, {end:#x}) is not inside one memslot "
                              "of the stream's RAM layout")  # fmt: skip
        nb = _bits.words_bytes(npages)
        at = _PAGES.size
        if len(payload) < at + 3 * nb:
            raise StreamError(f"{where}: PAGES of {len(payload)} bytes is too short for its "
                              "bitmaps")  # fmt: skip
        present, zero_data, zero_tags = (
            _bits.from_bytes(payload[at + k * nb : at + (k + 1) * nb]) for k in range(3)
        )
        at += 3 * nb
        if (present | zero_data | zero_tags) >> npages:
            raise StreamError(f"{where}: PAGES bitmap bits set beyond its {npages} pages")
        if not present:
            raise StreamError(f"{where}: PAGES carries no page")
        if zero_data & ~present or zero_tags & ~present:
            raise StreamError(f"{where}: PAGES zero-page bitmaps mark pages it does not carry")
        if not h.mte and zero_tags != present:
            raise StreamError(f"{where}: PAGES carries tags in a stream without MTE")
        ndata = (present & ~zero_data).bit_count() * h.page_size
        ntags = (present & ~zero_tags).bit_count() * h.packed_per_page
        if len(payload) != at + ndata + ntags:
            raise StreamError(f"{where}: PAGES of {len(payload)} bytes, its bitmaps say "
                              f"{at + ndata + ntags}")  # fmt: skip
        first = (gpa - h.slots[index].gpa) // h.page_size
        self._p.coverage[index] = self._p.coverage.get(index, 0) | present << first
        return Pages(gpa, npages, present, zero_data, zero_tags,
                     payload[at : at + ndata], payload[at + ndata :])  # fmt: skip

    def _on_pass(self, payload: memoryview, where: str) -> PassEnd:
        if len(payload) != _PASS.size:
            raise StreamError(f"{where}: PASS of {len(payload)} bytes (expected {_PASS.size})")
        number, flags = _PASS.unpack(payload)
        if flags & ~FLAG_FINAL:
            raise StreamError(f"{where}: PASS has unknown flags {flags:#x}")
        if number != self._p.passes:
            raise StreamError(f"{where}: PASS {number}, expected pass {self._p.passes}")
        self._p.passes += 1
        return PassEnd(number, bool(flags & FLAG_FINAL))

    def _on_regs(self, payload: memoryview, where: str) -> Registers:
        h = self._p.header
        assert h is not None
        if len(payload) < _REGS.size:
            raise StreamError(f"{where}: REGS of {len(payload)} bytes is too short")
        vcpu, count = _REGS.unpack_from(payload)
        if vcpu != self._p.vcpus_done or vcpu >= h.nvcpus:
            raise StreamError(f"{where}: REGS of vCPU {vcpu}, expected vCPU "
                              f"{self._p.vcpus_done} of {h.nvcpus}")  # fmt: skip
        if not 0 < count <= MAX_REGS or len(payload) != _REGS.size + count * _REG.size:
            raise StreamError(f"{where}: REGS of {len(payload)} bytes for {count} registers")
        regs = tuple(_REG.iter_unpack(payload[_REGS.size :]))
        if len({r for r, _ in regs}) != count:
            raise StreamError(f"{where}: REGS names a register twice")
        self._p.vcpus_done += 1
        return Registers(vcpu, regs)

    def _on_check(self, payload: memoryview, where: str) -> Check:
        if len(payload) != 32:
            raise StreamError(f"{where}: CHECK of {len(payload)} bytes (expected 32)")
        return Check(bytes(payload))

    def _on_end(self, payload: memoryview, where: str) -> End:
        h = self._p.header
        assert h is not None
        if len(payload) != _END.size:
            raise StreamError(f"{where}: END of {len(payload)} bytes (expected {_END.size})")
        records, nbytes, digest = _END.unpack(payload)
        if self._p.vcpus_done != h.nvcpus:
            raise StreamError(f"{where}: END after registers of {self._p.vcpus_done} of "
                              f"{h.nvcpus} vCPUs")  # fmt: skip
        if (records, nbytes) != (self._seq, self._nbytes):
            raise StreamError(f"{where}: END counts {records} records and {nbytes} bytes, the "
                              f"stream had {self._seq} and {self._nbytes}")  # fmt: skip
        if digest != self._hash.digest():
            raise StreamError(f"{where}: the stream's SHA-256 digest does not match: the "
                              "stream is corrupt")  # fmt: skip
        for index, slot in enumerate(h.slots):
            npages = slot.size // h.page_size
            missing = npages - (self._p.coverage.get(index, 0)).bit_count()
            if missing:
                raise StreamError(f"{where}: {missing} pages of slot {slot.slot} were never "
                                  "sent")  # fmt: skip
        return End(records, nbytes, bytes(digest))


def _printable(name: bytes) -> bool:
    return 0 < len(name) <= PROFILE_BYTES and all(0x21 <= c < 0x7F for c in name)


def _check_header(h: Header, error: type[Exception]) -> None:
    """The rules of HEADER; raises `error` (ValueError for the writer, StreamError to read)."""
    if not h.profile.isascii() or not _printable(h.profile.encode()):
        raise error(f"kernel profile {h.profile!r} is not 1 to 16 printable ASCII characters")
    if h.page_size not in PAGE_SIZES:
        raise error(f"page size {h.page_size} is not one of {PAGE_SIZES}")
    if not 0 < h.nvcpus <= MAX_VCPUS:
        raise error(f"{h.nvcpus} vCPUs (1 to {MAX_VCPUS})")
    if not 0 < len(h.slots) <= MAX_SLOTS:
        raise error(f"{len(h.slots)} memslots (1 to {MAX_SLOTS})")
    ids = set()
    prev_end = 0
    for s in h.slots:
        if s.slot >= MAX_SLOTS or s.slot in ids:
            raise error(f"slot id {s.slot} is out of range or repeated")
        ids.add(s.slot)
        if s.gpa % h.page_size or s.size % h.page_size or not s.size:
            raise error(f"slot {s.slot} [{s.gpa:#x}, +{s.size:#x}) is not whole pages")
        if s.gpa < prev_end:
            raise error(f"slot {s.slot} at {s.gpa:#x} overlaps or precedes the previous slot")
        prev_end = s.end
    if prev_end > 1 << 52 or h.ram_bytes > MAX_RAM:
        raise error(f"{h.ram_bytes} bytes of RAM up to {prev_end:#x} exceed the format's limits")
