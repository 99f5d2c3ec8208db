"""The migration stream codec (clients/kvmtag_vmm/stream.py) and the destination's loading
(`incoming.receive`), with no daemon: docs/MIGRATION.md as tests.

One table of streams drives the reader (whole, byte at a time, with trailing bytes left
intact) and the loader; Hypothesis builds random machines and passes, then mutates their streams
(bit flips, truncation, inserted, deleted, repeated and swapped records, garbage): every bad
stream is refused with a StreamError, the loader never commits, and a snapshot that fails
verification never even creates its destination.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.kvmtag_vmm import _bits, incoming, stream
from clients.kvmtag_vmm.stream import (
    NEED_DATA,
    Header,
    Pages,
    Reader,
    SlotLayout,
    StreamError,
    Writer,
)
from clients.kvmtag_vmm.transport import ByteSource

GPA = 0x8000_0000


# --- a source machine, as the tests model it -----------------------------------------------------


@dataclass
class Model:
    """Guest RAM and tags as dicts of non-zero pages (slot index, page) -> bytes."""

    header: Header
    data: dict[tuple[int, int], bytes] = field(default_factory=dict)
    tags: dict[tuple[int, int], bytes] = field(default_factory=dict)
    regs: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def ps(self) -> int:
        return self.header.page_size

    def npages(self, k: int) -> int:
        return self.header.slots[k].size // self.ps


def oracle_digest(model: Model) -> bytes:
    """CHECK's digest straight from docs/MIGRATION.md, one page at a time (an oracle)."""
    h = model.header
    outer = hashlib.sha256()
    for k, s in enumerate(h.slots):
        n = s.size // h.page_size
        outer.update(struct.pack("<IIQQ", s.slot, 0, s.gpa, s.size))
        for table, on in ((model.data, True), (model.tags, h.mte)):
            if not on:
                continue
            pages = sorted(p for (kk, p) in table if kk == k and any(table[(kk, p)]))
            outer.update(_bits.to_bytes(sum(1 << p for p in pages), n))
            outer.update(hashlib.sha256(b"".join(table[(k, p)] for p in pages)).digest())
    return outer.digest()


def write_windows(w: Writer, model: Model, windows: list[tuple[int, int, int]]) -> list[bytes]:
    """PAGES records of (slot index, first page, present bits) windows, from the model's
    current content."""
    out: list[bytes] = []
    h, ps = model.header, model.ps
    for k, first, present in windows:
        npages = present.bit_length()
        zero_data = zero_tags = 0
        data, tags = bytearray(), bytearray()
        for i in range(npages):
            if not present >> i & 1:
                continue
            d = model.data.get((k, first + i), b"")
            t = model.tags.get((k, first + i), b"") if h.mte else b""
            if any(d):
                data += d
            else:
                zero_data |= 1 << i
            if any(t):
                tags += t
            else:
                zero_tags |= 1 << i
        gpa = h.slots[k].gpa + first * ps
        out += [bytes(p) for p in w.pages(gpa, npages, present, zero_data, zero_tags, data, tags)]
    return out


def write_end(w: Writer, model: Model, *, check: bool = False) -> list[bytes]:
    out = []
    for i in range(model.header.nvcpus):
        out += [bytes(p) for p in w.registers(i, model.regs[i])]
    if check:
        out += [bytes(p) for p in w.check(oracle_digest(model))]
    return out + [bytes(p) for p in w.end()]


def encode(model: Model, passes: list[list[tuple[int, int, int]]], *, check: bool = False
           ) -> bytes:  # fmt: skip
    """A stream of `model`: each pass a list of windows (see write_windows); the last pass is
    final."""
    w = Writer()
    out: list[bytes] = [bytes(p) for p in w.start(model.header)]
    for number, windows in enumerate(passes):
        out += write_windows(w, model, windows)
        out += [bytes(p) for p in w.pass_end(number, number == len(passes) - 1)]
    return b"".join(out + write_end(w, model, check=check))


def full_pass(model: Model) -> list[tuple[int, int, int]]:
    """Windows covering every page of every slot."""
    out = []
    for k in range(len(model.header.slots)):
        n = model.npages(k)
        for at in range(0, n, model.header.max_window):
            out.append((k, at, _bits.mask(min(model.header.max_window, n - at))))
    return out


def small_model(seed: int = 1, *, mte: bool = True, page_size: int = 4096, nvcpus: int = 2,
                slots: tuple[int, ...] = (16, 8)) -> Model:  # fmt: skip
    rng = random.Random(seed)
    layout, gpa = [], GPA
    for i, n in enumerate(slots):
        layout.append(SlotLayout(i, gpa, n * page_size))
        gpa += (n + 4) * page_size  # a hole after each slot
    m = Model(Header(page_size, mte, nvcpus, "latest", tuple(layout)))
    for k, n in enumerate(slots):
        for p in range(n):
            if rng.random() < 0.6:
                m.data[(k, p)] = rng.randbytes(page_size)
            if mte and rng.random() < 0.5:
                m.tags[(k, p)] = rng.randbytes(page_size // 32)
    m.regs = [[(0x6030_0000_0010_0000 + 2 * r, rng.getrandbits(64)) for r in range(34)]
              for _ in range(nvcpus)]  # fmt: skip
    return m


# --- a destination for the loader ----------------------------------------------------------------


class MemoryTarget:
    """A destination in memory; records how it was used."""

    def __init__(self, header: Header) -> None:
        self.model = Model(header)
        self.staged: dict[int, tuple[tuple[int, int], ...]] = {}
        self.committed = self.aborted = False
        self.loaded = 0

    def load_pages(self, p: Pages) -> None:
        h = self.model.header
        ps, ppp = h.page_size, h.packed_per_page
        k = max(i for i, s in enumerate(h.slots) if s.gpa <= p.gpa)
        first = (p.gpa - h.slots[k].gpa) // ps
        d = t = 0
        for i in range(p.npages):
            if not p.present >> i & 1:
                continue
            key = (k, first + i)
            if p.zero_data >> i & 1:
                self.model.data.pop(key, None)
            else:
                self.model.data[key] = bytes(p.data[d * ps : (d + 1) * ps])
                d += 1
            if p.zero_tags >> i & 1:
                self.model.tags.pop(key, None)
            else:
                self.model.tags[key] = bytes(p.tags[t * ppp : (t + 1) * ppp])
                t += 1
        self.loaded += 1

    def stage_registers(self, regs: stream.Registers) -> None:
        self.staged[regs.vcpu] = regs.regs

    def content_digest(self) -> bytes:
        return oracle_digest(self.model)

    def commit(self) -> None:
        assert not self.aborted
        self.model.regs = [list(self.staged[i]) for i in range(self.model.header.nvcpus)]
        self.committed = True

    def abort(self) -> None:
        assert not self.committed
        self.aborted = True


class BytesSource(ByteSource):
    def __init__(self, data: bytes, chunk: int = 1 << 16) -> None:
        self.data, self.chunk, self.at = data, chunk, 0
        self.replies: list[bool] = []

    def read_into(self, buf: memoryview) -> int:
        out = self.data[self.at : self.at + min(self.chunk, len(buf))]
        buf[: len(out)] = out
        self.at += len(out)
        return len(out)

    def rewind(self) -> bool:
        self.at = 0
        return True

    def at_end(self) -> bool:
        return self.at >= len(self.data)

    def close(self) -> None:
        pass


@dataclass
class Factory:
    targets: list[MemoryTarget] = field(default_factory=list)

    def __call__(self, header: Header) -> MemoryTarget:
        t = MemoryTarget(header)
        self.targets.append(t)
        return t


def load(data: bytes, *, verify_first: bool, chunk: int = 1 << 16) -> tuple[Factory, object]:
    """receive() into MemoryTargets; returns the factory and the result or the StreamError."""
    factory = Factory()
    try:
        target, _ = incoming.receive(BytesSource(data, chunk), factory, verify_first=verify_first)
    except StreamError as e:
        return factory, e
    return factory, target


def events(data: bytes, *, step: int | None = None) -> tuple[list[object], Reader]:
    """Every event of `data`, fed whole or `step` bytes at a time."""
    r = Reader()
    out: list[object] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        r.receive_data(piece)
        while (ev := r.next_event()) is not NEED_DATA:
            out.append(ev)
    return out, r


def refused(data: bytes) -> StreamError:
    with pytest.raises(StreamError) as info:
        r = Reader()
        r.receive_data(data)
        while r.next_event() is not NEED_DATA:
            pass
        r.eof()
    return info.value


# --- the table of good streams -------------------------------------------------------------------


def cases() -> Iterator[tuple[str, Model, list[list[tuple[int, int, int]]], bool]]:
    m = small_model(1)
    yield "one final pass", m, [full_pass(m)], False
    m = small_model(2)
    yield "pre-copy, sparse dirty passes, CHECK", m, [
        full_pass(m), [(0, 3, 0b1011), (1, 0, 0b1)], [(0, 1, 0b1)]], True
    m = small_model(3, mte=False)
    yield "MTE off", m, [full_pass(m)], True
    m = small_model(4, page_size=65536, nvcpus=1, slots=(300,))
    yield "64 KiB pages, windows of 128 pages", m, [full_pass(m)], True
    m = small_model(5, page_size=16384, nvcpus=3, slots=(5, 1, 7))
    yield "16 KiB pages, three slots", m, [full_pass(m), [(2, 6, 1)]], True


CASES = list(cases())


@pytest.mark.parametrize(("name", "model", "passes", "check"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("how", ["whole", "byte-at-a-time", "trailing"])
def test_reader_round_trip(
    name: str, model: Model, passes: list[list[tuple[int, int, int]]], check: bool, how: str
) -> None:
    data = encode(model, passes, check=check)
    if how == "byte-at-a-time" and len(data) > 200_000:
        how = "chunks of 997"
    if how == "whole":
        evs, r = events(data)
    elif how == "trailing":
        evs, r = events(data + b"after the end")
        assert r.trailing == b"after the end"
    else:
        evs, r = events(data, step=1 if how == "byte-at-a-time" else 997)
    assert r.done and r.nbytes == len(data)
    r.eof()  # a complete stream: no complaint
    assert isinstance(evs[0], Header) and evs[0] == model.header
    assert isinstance(evs[-1], stream.End)
    pages = [e for e in evs if isinstance(e, Pages)]
    assert len(pages) == sum(len(p) for p in passes)
    passes_seen = [e for e in evs if isinstance(e, stream.PassEnd)]
    assert [(p.number, p.final) for p in passes_seen] == [
        (i, i == len(passes) - 1) for i in range(len(passes))
    ]
    regs = [e for e in evs if isinstance(e, stream.Registers)]
    assert [list(r.regs) for r in regs] == model.regs
    assert any(isinstance(e, stream.Check) for e in evs) == check


@pytest.mark.parametrize(("name", "model", "passes", "check"), CASES, ids=[c[0] for c in CASES])
def test_reader_fed_in_place(
    name: str, model: Model, passes: list[list[tuple[int, int, int]]], check: bool
) -> None:
    """buffer()/received(): payloads are read straight into their own buffers; a header is
    never read past, so the bytes after it land in place too; what follows END is kept."""
    data = encode(model, passes, check=check) + b"tail"
    r, at, evs = Reader(), 0, []
    while at < len(data):
        view = r.buffer()
        n = min(len(view), len(data) - at, 100_000)
        view[:n] = data[at : at + n]
        r.received(n)
        at += n
        while (ev := r.next_event()) is not NEED_DATA:
            evs.append(ev)
    assert r.done and r.trailing == b"tail"
    assert [type(e).__name__ for e in evs] == [type(e).__name__ for e in events(data)[0]]
    with pytest.raises(ValueError):
        r.received(len(r.buffer()) + 1)


@pytest.mark.parametrize(("name", "model", "passes", "check"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("verify_first", [True, False], ids=["snapshot", "live"])
def test_loader_rebuilds_the_machine(
    name: str, model: Model, passes: list[list[tuple[int, int, int]]], check: bool,
    verify_first: bool,
) -> None:  # fmt: skip
    factory, result = load(encode(model, passes, check=check), verify_first=verify_first)
    assert isinstance(result, MemoryTarget), result
    assert factory.targets == [result] and result.committed and not result.aborted
    assert result.model.data == {k: v for k, v in model.data.items() if any(v)}
    assert result.model.tags == ({k: v for k, v in model.tags.items() if any(v)}
                                 if model.header.mte else {})  # fmt: skip
    assert result.model.regs == model.regs


def test_later_passes_replace_data_and_tags_even_with_zeros() -> None:
    """A page carried again replaces what an earlier pass sent, zeros included."""
    m = small_model(7)
    page = next(p for (k, p) in m.data if k == 0 and (k, p) in m.tags)
    w = Writer()
    out = [bytes(p) for p in w.start(m.header)]
    out += write_windows(w, m, full_pass(m))
    out += [bytes(p) for p in w.pass_end(0, False)]
    del m.data[(0, page)], m.tags[(0, page)]  # the guest zeroed the page and its tags
    out += write_windows(w, m, [(0, page, 1)])
    out += [bytes(p) for p in w.pass_end(1, True)]
    out += write_end(w, m, check=True)
    _, target = load(b"".join(out), verify_first=False)
    assert isinstance(target, MemoryTarget), target
    assert target.model.data == m.data and target.model.tags == m.tags


# --- the writer refuses to write nonsense --------------------------------------------------------


def test_writer_checks_its_input() -> None:
    m = small_model(1)
    w = Writer()
    with pytest.raises(ValueError):
        w.pages(GPA, 1, 1, 0, 0, bytes(4096), bytes(128))  # before the header
    w.start(m.header)
    with pytest.raises(ValueError):
        w.start(m.header)
    bad = [
        (GPA, 0, 0, 0, 0, b"", b""),  # empty window
        (GPA, 1, 0b10, 0, 0, b"", b""),  # present beyond npages
        (GPA, 1, 1, 0b10, 0, b"", b""),  # zero_data not a subset
        (GPA, 1, 1, 0, 0, bytes(4095), bytes(128)),  # wrong data length
        (GPA, 1, 1, 0, 0, bytes(4096), bytes(127)),  # wrong tags length
        (GPA, 3000, _bits.mask(3000), 0, 0, b"", b""),  # window above 8 MiB
    ]
    for args in bad:
        with pytest.raises(ValueError):
            w.pages(*args)
    w2 = Writer()
    with pytest.raises(ValueError):
        w2.start(Header(4096, True, 1, "latest", (SlotLayout(0, GPA, 100),)))  # not whole pages
    with pytest.raises(ValueError):
        w2.start(Header(4096, True, 1, "lätest", (SlotLayout(0, GPA, 4096),)))
    w3 = Writer()
    w3.start(Header(4096, False, 1, "6.12", (SlotLayout(0, GPA, 4096),)))
    with pytest.raises(ValueError):
        w3.pages(GPA, 1, 1, 0, 0, bytes(4096), bytes(128))  # tags in a stream without MTE


# --- specific refusals, each with its message ----------------------------------------------------


def _records(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each record after the preamble."""
    out, at = [], stream.PREAMBLE_SIZE
    while at < len(data):
        _, length, _, _ = struct.unpack_from("<IIII", data, at)
        out.append((at, stream.RECORD_HEADER_SIZE + length))
        at += stream.RECORD_HEADER_SIZE + length
    return out


def _recrc(record: bytearray) -> bytearray:
    """Recompute a record's CRC, as a buggy or malicious writer would."""
    crc = zlib.crc32(bytes(record[16:]), zlib.crc32(bytes(record[:12])))
    record[12:16] = struct.pack("<I", crc)
    return record


def _resigned(data: bytes, edit: Callable[[list[bytearray]], list[bytearray]]) -> bytes:
    """Edit the records, then fix every CRC, sequence number and the END digest: what is left
    for the reader to find is the semantic error itself."""
    recs = [bytearray(data[a : a + n]) for a, n in _records(data)]
    recs = edit(recs)
    out = bytearray(data[: stream.PREAMBLE_SIZE])
    h = hashlib.sha256(out)
    for seq, r in enumerate(recs):
        r[8:12] = struct.pack("<I", seq)
        if struct.unpack_from("<I", r)[0] == stream.RecordType.END:
            r[16:] = struct.pack("<QQ32s", seq, len(out), h.digest())
        _recrc(r)
        h.update(r[:16])
        out += r
    return bytes(out)


def _payload_edit(index: int, offset: int, value: bytes) -> Callable[[list[bytearray]],
                                                                      list[bytearray]]:  # fmt: skip
    def edit(recs: list[bytearray]) -> list[bytearray]:
        recs[index][16 + offset : 16 + offset + len(value)] = value
        return recs

    return edit


GOOD = encode(CASES[1][1], CASES[1][2], check=True)
N_RECORDS = len(_records(GOOD))


def _drop(i: int) -> Callable[[list[bytearray]], list[bytearray]]:
    return lambda recs: recs[:i] + recs[i + 1 :]


REFUSALS: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "truncated stream"),
    ("bad magic", lambda: b"QEMU" + GOOD[4:], "not a kvmtag migration stream"),
    ("version 2.0", lambda: _with_version(2, 0), "version 2.0 is not supported"),
    ("version 1.1", lambda: _with_version(1, 1), "version 1.1 is not supported"),
    ("preamble CRC", lambda: GOOD[:12] + b"\0\0\0\0" + GOOD[16:], "preamble is corrupt"),
    ("truncated", lambda: GOOD[:-1], "truncated stream"),
    ("record flipped", lambda: _flip(GOOD, 200), "checksum mismatch"),
    ("record dropped", lambda: _splice(GOOD, drop=3), "sequence number"),
    ("record repeated", lambda: _splice(GOOD, repeat=3), "sequence number"),
    ("unknown type", lambda: _resigned(GOOD, lambda r: [*r[:2], _typed(r[2], 99), *r[3:]]),
     "unknown record type 99"),
    ("PAGES before HEADER", lambda: _resigned(GOOD, lambda r: [r[1], r[0], *r[2:]]),
     "a PAGES record where the HEADER record must come"),
    ("REGS before the final PASS", lambda: _resigned(
        GOOD, lambda r: [*r[:2], r[-4], *r[2:-4], *r[-3:]]), "a REGS record where PAGES"),
    ("no END digest match", lambda: _end_digest_zeroed(), "digest does not match"),
    ("END counts", lambda: _end_counts_wrong(), "END counts"),
    ("page size", lambda: _resigned(GOOD, _payload_edit(0, 0, struct.pack("<I", 8192))),
     "page size 8192"),
    ("HEADER flags", lambda: _resigned(GOOD, _payload_edit(0, 4, struct.pack("<I", 3))),
     "unknown flags"),
    ("no vCPUs", lambda: _resigned(GOOD, _payload_edit(0, 8, struct.pack("<I", 0))),
     "0 vCPUs"),
    ("profile not ASCII", lambda: _resigned(GOOD, _payload_edit(0, 16, b"\xff")),
     "not printable ASCII"),
    ("RAM total", lambda: _resigned(GOOD, _payload_edit(0, 32, struct.pack("<Q", 1))),
     "bytes of RAM"),
    ("overlapping slots", lambda: _resigned(
        GOOD, _payload_edit(0, 48 + 24 + 8, struct.pack("<Q", GPA))), "overlaps"),
    ("window outside a slot", lambda: _resigned(
        GOOD, _payload_edit(1, 0, struct.pack("<Q", GPA + 15 * 4096))),
     "not inside one memslot"),
    ("window unaligned", lambda: _resigned(GOOD, _payload_edit(1, 0, struct.pack("<Q", GPA + 1))),
     "not page aligned"),
    ("PAGES flags", lambda: _resigned(GOOD, _payload_edit(1, 12, b"\1")), "unknown flags"),
    ("zero bits not present", lambda: _zero_not_present(), "does not carry"),
    ("pass out of order", lambda: _resigned(GOOD, _payload_edit(_pass_index(), 0, b"\7")),
     "PASS 7, expected pass 0"),
    ("register twice", lambda: _resigned(GOOD, _same_register), "names a register twice"),
    ("missing vCPU", lambda: _resigned(GOOD, _drop(N_RECORDS - 3)), "registers of 1 of 2"),
    ("page never sent", lambda: _resigned(GOOD, _drop(1)), "never sent"),
    ("CHECK is 32 bytes", lambda: _resigned(GOOD, lambda r: [*r[:-2], _resized(r[-2], 31),
                                                              r[-1]]), "CHECK of 31 bytes"),
    ("oversized record", lambda: GOOD[: sum(_records(GOOD)[0])]
     + struct.pack("<IIII", 2, 17 << 20, 1, 0), "exceeds the limit"),
]


def _same_register(recs: list[bytearray]) -> list[bytearray]:
    r = recs[-4]  # REGS of vCPU 0: its second register gets the first one's id
    r[16 + 24 : 16 + 32] = r[16 + 8 : 16 + 16]
    return recs


def _with_version(major: int, minor: int) -> bytes:
    head = struct.pack("<8sHH", stream.MAGIC, major, minor)
    return head + struct.pack("<I", zlib.crc32(head)) + GOOD[16:]


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x10
    return bytes(out)


def _splice(data: bytes, *, drop: int | None = None, repeat: int | None = None) -> bytes:
    recs = [data[a : a + n] for a, n in _records(data)]
    if drop is not None:
        del recs[drop]
    if repeat is not None:
        recs.insert(repeat, recs[repeat])
    return data[: stream.PREAMBLE_SIZE] + b"".join(recs)


def _typed(record: bytearray, rtype: int) -> bytearray:
    record[0:4] = struct.pack("<I", rtype)
    return record


def _resized(record: bytearray, n: int) -> bytearray:
    out = record[: 16 + n]
    out[4:8] = struct.pack("<I", n)
    return out


def _pass_index() -> int:
    return next(i for i, (a, _) in enumerate(_records(GOOD))
                if struct.unpack_from("<I", GOOD, a)[0] == stream.RecordType.PASS)  # fmt: skip


def _end_digest_zeroed() -> bytes:
    a, n = _records(GOOD)[-1]
    end = _recrc(bytearray(GOOD[a : a + n][:32]) + bytes(32))
    return GOOD[:a] + bytes(end)


def _end_counts_wrong() -> bytes:
    a, n = _records(GOOD)[-1]
    rec = bytearray(GOOD[a : a + n])
    rec[16:24] = struct.pack("<Q", 12345)
    return GOOD[:a] + bytes(_recrc(rec))


def _zero_not_present() -> bytes:
    def edit(recs: list[bytearray]) -> list[bytearray]:
        # Slot 1's window is 8 pages, so each bitmap is one 8-byte word: present at payload
        # offset 16, zero_data at 24, zero_tags at 32. Page 7 leaves present but stays marked
        # zero in both zero bitmaps.
        r = recs[2]
        for at, set_bit in ((32, False), (40, True), (48, True)):
            word = int.from_bytes(r[at : at + 8], "little")
            word = word | 0x80 if set_bit else word & ~0x80
            r[at : at + 8] = word.to_bytes(8, "little")
        return recs

    return _resigned(GOOD, edit)


@pytest.mark.parametrize(("name", "make", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_streams_are_refused_with_a_clear_message(
    name: str, make: Callable[[], bytes], message: str
) -> None:
    data = make()
    assert message in str(refused(data)), (name, str(refused(data)))
    for verify_first in (True, False):
        factory, result = load(data, verify_first=verify_first)
        assert isinstance(result, StreamError)
        assert not any(t.committed for t in factory.targets)
        assert all(t.aborted for t in factory.targets)
        if verify_first:
            assert factory.targets == []  # the snapshot's destination was never created


def test_a_record_spliced_in_from_another_stream_is_refused() -> None:
    """A whole, CRC-correct record with the right sequence number, from another stream of the
    same machine: only END's digest (over every header, hence every CRC) can tell."""
    other_model = small_model(2)
    key = min(k for k in other_model.data if k[0] == 0)
    page = bytearray(other_model.data[key])
    page[-1] ^= 1  # one byte of one page differs: the same lengths everywhere
    other_model.data[key] = bytes(page)
    other = encode(other_model, CASES[1][2], check=False)
    mine = encode(CASES[1][1], CASES[1][2], check=False)
    (a, n), (b, m) = _records(mine)[1], _records(other)[1]
    assert n == m and mine[a : a + n] != other[b : b + m]
    spliced = mine[:a] + other[b : b + m] + mine[a + n :]
    assert "digest does not match" in str(refused(spliced))


def test_a_refused_reader_stays_refused() -> None:
    r = Reader()
    r.receive_data(_flip(GOOD, 200))
    with pytest.raises(StreamError):
        while r.next_event() is not NEED_DATA:
            pass
    r.receive_data(b"more")
    with pytest.raises(StreamError, match="already refused"):
        r.next_event()
    with pytest.raises(StreamError, match="already refused"):
        r.eof()


def test_check_mismatch_is_refused_and_the_destination_torn_down() -> None:
    m = small_model(9)
    data = encode(m, [full_pass(m)], check=True)

    class Lying(MemoryTarget):
        def content_digest(self) -> bytes:
            return bytes(32)

    made: list[Lying] = []

    def factory(h: Header) -> Lying:
        made.append(Lying(h))
        return made[-1]

    with pytest.raises(StreamError, match="CHECK"):
        incoming.receive(BytesSource(data), factory, verify_first=True)
    assert len(made) == 1 and made[0].aborted and not made[0].committed


def test_a_snapshot_file_with_data_after_end_is_refused() -> None:
    m = small_model(10)
    factory, result = load(encode(m, [full_pass(m)]) + b"x", verify_first=True)
    assert isinstance(result, StreamError) and "after the END" in str(result)
    assert factory.targets == []


# --- Hypothesis: random machines, random passes, random damage -----------------------------------


@st.composite
def machines(draw: st.DrawFn) -> tuple[Model, list[list[tuple[int, int, int]]], bool]:
    page_size = draw(st.sampled_from([4096, 16384, 65536]))
    mte = draw(st.booleans())
    nslots = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 40), min_size=nslots, max_size=nslots)))
    nvcpus = draw(st.integers(1, 3))
    model = small_model(draw(st.integers(0, 2**32)), mte=mte, page_size=page_size,
                        nvcpus=nvcpus, slots=sizes)  # fmt: skip
    passes = [full_pass(model)]
    for _ in range(draw(st.integers(0, 2))):
        windows = []
        for k, n in enumerate(sizes):
            if draw(st.booleans()):
                first = draw(st.integers(0, n - 1))
                count = draw(st.integers(1, n - first))
                bits = draw(st.integers(1, _bits.mask(count)))
                lo = (bits & -bits).bit_length() - 1
                windows.append((k, first + lo, bits >> lo))
        passes.append(windows)
    return model, passes, draw(st.booleans())


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), st.integers(1, 5000))
def test_any_valid_stream_round_trips(
    case: tuple[Model, list[list[tuple[int, int, int]]], bool], chunk: int
) -> None:
    model, passes, check = case
    data = encode(model, passes, check=check)
    chunk = max(chunk, len(data) // 500)  # small pieces, but a bounded number of them
    for verify_first in (True, False):
        factory, result = load(data, verify_first=verify_first, chunk=chunk)
        assert isinstance(result, MemoryTarget), result
        assert result.committed and len(factory.targets) == 1
        assert result.model.data == model.data
        assert result.model.tags == (model.tags if model.header.mte else {})


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a good stream, a damaged copy of it)."""
    model, passes, check = draw(machines())
    data = encode(model, passes, check=check)
    kind = draw(st.sampled_from(["flip", "flips", "truncate", "insert", "delete", "drop",
                                 "repeat", "swap", "garbage", "zero-run"]))  # fmt: skip
    out = bytearray(data)
    recs = _records(data)
    if kind == "flip":
        at = draw(st.integers(0, len(out) - 1))
        out[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flips":
        for at in draw(st.lists(st.integers(0, len(out) - 1), min_size=2, max_size=8,
                                unique=True)):  # fmt: skip
            out[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        out = out[: draw(st.integers(0, len(out) - 1))]
    elif kind == "insert":
        at = draw(st.integers(0, len(out)))
        out[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        at = draw(st.integers(0, len(out) - 1))
        del out[at : at + draw(st.integers(1, 64))]
    elif kind in ("drop", "repeat", "swap"):
        i = draw(st.integers(0, len(recs) - 1))
        pieces = [data[a : a + n] for a, n in recs]
        if kind == "drop":
            del pieces[i]
        elif kind == "repeat":
            pieces.insert(i, pieces[i])
        else:
            j = draw(st.integers(0, len(recs) - 1).filter(lambda j: pieces[j] != pieces[i]))
            pieces[i], pieces[j] = pieces[j], pieces[i]
        out = bytearray(data[: stream.PREAMBLE_SIZE] + b"".join(pieces))
    elif kind == "garbage":
        out = bytearray(draw(st.binary(max_size=512)))
    else:
        at = draw(st.integers(0, len(out) - 1))
        n = draw(st.integers(1, 4096))
        if any(out[at : at + n]):
            out[at : at + n] = bytes(len(out[at : at + n]))
        else:
            out[at] ^= 0xFF
    return data, bytes(out)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(damaged(), st.integers(1, 3000))
def test_every_damaged_stream_is_refused_cleanly(case: tuple[bytes, bytes], chunk: int) -> None:
    """Any damage: a StreamError (never another exception), and nothing is committed; a
    snapshot's destination is never even created."""
    good, bad = case
    if bad == good:  # the damage undid itself (e.g. swapping two equal records)
        return
    chunk = max(chunk, len(bad) // 500)
    for verify_first in (True, False):
        factory, result = load(bad, verify_first=verify_first, chunk=chunk)
        assert isinstance(result, StreamError), (verify_first, result)
        assert str(result)
        assert not any(t.committed for t in factory.targets)
        assert all(t.aborted for t in factory.targets)
        if verify_first:
            assert factory.targets == []


@settings(max_examples=200)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(StreamError):
        r = Reader()
        r.receive_data(data)
        while r.next_event() is not NEED_DATA:
            pass
        r.eof()


@settings(max_examples=200)
@given(st.integers(0, 2**200), st.integers(1, 64), st.integers(1, 64))
def test_bit_runs_and_spans(bits: int, gap: int, max_len: int) -> None:
    runs = list(_bits.runs(bits))
    assert sum(_bits.mask(c) << f for f, c in runs) == bits
    assert all(a + c < b for (a, c), (b, _) in itertools.pairwise(runs))
    spans = list(_bits.spans(bits, gap, max_len))
    covered = sum(_bits.mask(c) << f for f, c in spans)
    assert covered & bits == bits
    assert all(0 < c <= max_len for _, c in spans)
    assert all(a + c <= b for (a, c), (b, _) in itertools.pairwise(spans))
