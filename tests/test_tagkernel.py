"""kvmtag.tagkernel (the C tag kernel behind its facade) against the pure-Python oracle.

Every routine is compared with tests/oracle_tags.py on random inputs (lengths from 0, odd
granule offsets, buffers at odd addresses, high nibbles set), packing is pinned by hand-written
vectors and round trips, every misuse must raise before the C code runs, and a few MiB exercise
the vectorised loops and their early exits.
"""

from __future__ import annotations

import array
import mmap
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtag import tagkernel as tk

from . import oracle_tags as oracle

GUARD = b"\xa5" * 16
"""Bytes around every output window: a write out of bounds changes them."""

tags = st.integers(0, tk.MAX_TAG)
even_tags = st.binary(max_size=1200).map(lambda b: b[: len(b) // 2 * 2])
misalignments = st.integers(0, 15)


def guarded(data: bytes, offset: int) -> tuple[bytearray, memoryview]:
    """`data` at `offset` bytes into a buffer with guard bytes around it; returns the whole
    buffer and a writable view of the data (at an address `offset` past the buffer's)."""
    whole = bytearray(GUARD[:offset] + data + GUARD)
    return whole, memoryview(whole)[offset : offset + len(data)]


def assert_guards_intact(whole: bytearray, offset: int, size: int) -> None:
    assert whole[:offset] == GUARD[:offset]
    assert whole[offset + size :] == GUARD


# --- packing -------------------------------------------------------------------------------------

# (one-per-byte tags, packed): byte k holds granule 2k in its low nibble, 2k+1 in its high one.
NIBBLE_ORDER_VECTORS = [
    (b"", b""),
    (bytes([0x1, 0x2]), bytes([0x21])),
    (bytes([0x3, 0xC]), bytes([0xC3])),
    (bytes([0xF, 0x0, 0x0, 0xF]), bytes([0x0F, 0xF0])),
    (bytes(range(16)), bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])),
]


@pytest.mark.parametrize(("tags_", "packed_"), NIBBLE_ORDER_VECTORS)
def test_nibble_order_vectors(tags_: bytes, packed_: bytes) -> None:
    assert tk.packed(tags_) == packed_
    assert tk.unpacked(packed_) == tags_


def test_pack_ignores_high_nibbles() -> None:
    assert tk.packed(bytes([0xA3, 0x5C])) == bytes([0xC3])
    assert tk.packed(bytes([0xF1, 0xE2, 0x10, 0x0F])) == bytes([0x21, 0xF0])


@given(src=even_tags, src_offset=misalignments, dst_offset=misalignments)
@settings(deadline=None)
def test_pack_matches_oracle(src: bytes, src_offset: int, dst_offset: int) -> None:
    _, src_view = guarded(src, src_offset)
    whole, dst = guarded(bytes(len(src) // 2), dst_offset)
    tk.pack(dst, src_view)
    assert dst == oracle.pack(src)
    assert_guards_intact(whole, dst_offset, len(src) // 2)


@given(src=st.binary(max_size=600), src_offset=misalignments, dst_offset=misalignments)
@settings(deadline=None)
def test_unpack_matches_oracle(src: bytes, src_offset: int, dst_offset: int) -> None:
    _, src_view = guarded(src, src_offset)
    whole, dst = guarded(bytes(2 * len(src)), dst_offset)
    tk.unpack(dst, src_view)
    assert dst == oracle.unpack(src)
    assert_guards_intact(whole, dst_offset, 2 * len(src))


@given(src=even_tags)
@settings(deadline=None)
def test_unpack_of_pack_is_the_low_nibbles(src: bytes) -> None:
    assert tk.unpacked(tk.packed(src)) == bytes(b & 0x0F for b in src)


@given(src=st.binary(max_size=600))
@settings(deadline=None)
def test_pack_of_unpack_is_identity(src: bytes) -> None:
    assert tk.packed(tk.unpacked(src)) == src


# --- zero detection ------------------------------------------------------------------------------


@st.composite
def mostly_zero(draw: st.DrawFn, max_size: int = 3000) -> bytes:
    """Zeros with at most one non-zero byte anywhere (before, in or after a 256-byte block)."""
    size = draw(st.integers(0, max_size))
    buf = bytearray(size)
    if size and draw(st.booleans()):
        buf[draw(st.integers(0, size - 1))] = draw(st.integers(1, 255))
    return bytes(buf)


@given(buf=st.one_of(mostly_zero(), st.binary(max_size=300)), offset=misalignments)
@settings(deadline=None)
def test_is_zero_matches_oracle(buf: bytes, offset: int) -> None:
    _, view = guarded(buf, offset)
    assert tk.is_zero(view) is oracle.is_zero(buf)


@st.composite
def pages(draw: st.DrawFn) -> tuple[bytes, int]:
    """(buf, page_bytes): whole pages, each zero or with one non-zero byte."""
    page_bytes = draw(st.sampled_from([1, 2, 3, 16, 255, 256, 257, 300]))
    out = bytearray()
    for _ in range(draw(st.integers(0, 20))):
        page = bytearray(page_bytes)
        if draw(st.booleans()):
            page[draw(st.integers(0, page_bytes - 1))] = draw(st.integers(1, 255))
        out += page
    return bytes(out), page_bytes


@given(case=pages(), data=st.data())
@settings(deadline=None)
def test_zero_pages_matches_oracle(case: tuple[bytes, int], data: st.DataObject) -> None:
    buf, page_bytes = case
    npages = len(buf) // page_bytes
    bitmap = data.draw(st.binary(min_size=(npages + 7) // 8, max_size=(npages + 7) // 8 + 2))
    whole, view = guarded(bitmap, 3)
    tk.zero_pages(view, buf, page_bytes)
    assert view == oracle.zero_pages(bitmap, buf, page_bytes)
    assert_guards_intact(whole, 3, len(bitmap))


# --- fills and comparisons in packed storage -----------------------------------------------------


@st.composite
def granule_range(draw: st.DrawFn, packed: bytes) -> tuple[int, int]:
    """(first_granule, ngranules) inside packed storage, odd ends included."""
    total = 2 * len(packed)
    first = draw(st.integers(0, total))
    return first, draw(st.integers(0, total - first))


@given(packed=st.binary(max_size=700), tag=tags, data=st.data())
@settings(deadline=None)
def test_fill_matches_oracle(packed: bytes, tag: int, data: st.DataObject) -> None:
    first, n = data.draw(granule_range(packed))
    whole, view = guarded(packed, 1)
    tk.fill(view, first, n, tag)
    assert view == oracle.fill(packed, first, n, tag)
    assert_guards_intact(whole, 1, len(packed))


@given(buf=st.binary(max_size=300), offset=misalignments)
@settings(deadline=None)
def test_fill_zero_zeroes_every_byte(buf: bytes, offset: int) -> None:
    whole, view = guarded(buf, offset)
    tk.fill_zero(view)
    assert view == bytes(len(buf))
    assert_guards_intact(whole, offset, len(buf))


@st.composite
def mostly_uniform(draw: st.DrawFn) -> tuple[bytes, int]:
    """(packed, tag): every granule tagged `tag` but for a few, so that matches run long."""
    tag = draw(tags)
    packed = bytearray([tag * 0x11] * draw(st.integers(0, 1500)))
    for _ in range(draw(st.integers(0, 3)) if packed else 0):
        granule = draw(st.integers(0, 2 * len(packed) - 1))
        oracle.set_tag(packed, granule, draw(tags.filter(lambda t: t != tag)))
    return bytes(packed), tag


@given(
    case=st.one_of(mostly_uniform(), st.tuples(st.binary(max_size=100), tags)),
    data=st.data(),
)
@settings(deadline=None)
def test_find_mismatch_matches_oracle(case: tuple[bytes, int], data: st.DataObject) -> None:
    packed, tag = case
    first, n = data.draw(granule_range(packed))
    assert tk.find_mismatch(packed, first, n, tag) == oracle.find_mismatch(packed, first, n, tag)


def test_find_mismatch_after_fill_is_none() -> None:
    packed = bytearray(os.urandom(1000))
    tk.fill(packed, 3, 1995, 0x7)
    assert tk.find_mismatch(packed, 3, 1995, 0x7) is None
    assert tk.find_mismatch(packed, 3, 0, 0x7) is None
    assert tk.find_mismatch(packed, 2, 1996, 0x7) in (0, None)


# --- bitmaps -------------------------------------------------------------------------------------


@given(data=st.data(), nwords=st.integers(0, 16))
@settings(deadline=None)
def test_bitmap_andnot_matches_oracle(data: st.DataObject, nwords: int) -> None:
    bitmap = data.draw(st.binary(min_size=8 * nwords, max_size=8 * nwords))
    mask = data.draw(st.binary(min_size=8 * nwords, max_size=8 * nwords))
    bitmap_buf, mask_buf = bytearray(bitmap), bytearray(mask)
    count = tk.bitmap_andnot(bitmap_buf, mask_buf)
    assert (bytes(bitmap_buf), bytes(mask_buf), count) == oracle.bitmap_andnot(bitmap, mask)


def test_bitmap_andnot_reports_only_bits_it_cleared() -> None:
    bitmap = bytearray((0b1100).to_bytes(8, "little"))
    mask = bytearray((0b1010).to_bytes(8, "little"))
    assert tk.bitmap_andnot(bitmap, mask) == 1
    assert int.from_bytes(bitmap, "little") == 0b0100
    assert int.from_bytes(mask, "little") == 0b1000


@st.composite
def bit_range(draw: st.DrawFn) -> tuple[bytes, int, int]:
    bitmap = draw(st.binary(max_size=64))
    first = draw(st.integers(0, 8 * len(bitmap)))
    return bitmap, first, draw(st.integers(0, 8 * len(bitmap) - first))


@given(case=bit_range())
@settings(deadline=None)
def test_bitmap_set_matches_oracle(case: tuple[bytes, int, int]) -> None:
    bitmap, first, n = case
    whole, view = guarded(bitmap, 5)
    tk.bitmap_set(view, first, n)
    assert view == oracle.bitmap_set(bitmap, first, n)
    assert_guards_intact(whole, 5, len(bitmap))


@given(case=bit_range(), offset=misalignments)
@settings(deadline=None)
def test_bitmap_count_matches_oracle(case: tuple[bytes, int, int], offset: int) -> None:
    bitmap, first, n = case
    _, view = guarded(bitmap, offset)
    assert tk.bitmap_count(view, first, n) == oracle.bitmap_count(bitmap, first, n)


def test_bitmap_bit_order_is_lsb_first() -> None:
    bitmap = bytearray(2)
    tk.bitmap_set(bitmap, 0, 1)
    tk.bitmap_set(bitmap, 9, 1)
    assert bitmap == bytes([0x01, 0x02])
    tk.zero_pages(bitmap, bytes(3) + b"\x01", 1)
    assert bitmap == bytes([0x07, 0x02])


# --- buffers -------------------------------------------------------------------------------------


def test_accepts_every_kind_of_buffer() -> None:
    src = bytes([0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8])
    expected = bytes([0x21, 0x43, 0x65, 0x87])
    for make in (bytes, bytearray, memoryview, lambda b: array.array("B", b)):
        assert tk.packed(make(src)) == expected
    for dst in (bytearray(4), array.array("B", bytes(4)), memoryview(bytearray(4))):
        tk.pack(dst, src)
        assert bytes(dst) == expected
    words = memoryview(bytearray(src)).cast("Q")  # len() counts items, the kernel bytes
    assert tk.packed(words) == expected
    with mmap.mmap(-1, mmap.PAGESIZE) as m:
        tk.pack(memoryview(m)[:4], src)
        assert m[:4] == expected


def test_buffers_are_released_after_each_call() -> None:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    tk.fill(m, 0, 4, 1)
    with pytest.raises(ValueError):
        tk.fill(m, 0, 2 * mmap.PAGESIZE + 1, 1)
    m.close()  # BufferError if a call still held an export of m
    buf = bytearray(8)
    tk.bitmap_set(buf, 0, 3)
    buf.extend(b"more")  # likewise for resizing a bytearray


MISUSE = {
    "pack: odd number of tags": lambda: tk.pack(bytearray(1), bytes(3)),
    "pack: dst too small": lambda: tk.pack(bytearray(1), bytes(4)),
    "pack: dst too large": lambda: tk.pack(bytearray(3), bytes(4)),
    "pack: dst read-only": lambda: tk.pack(bytes(2), bytes(4)),
    "pack: dst overlaps src": lambda: _overlapping(tk.pack, 4, 8),
    "pack: src not contiguous": lambda: tk.pack(bytearray(2), memoryview(bytes(8))[::2]),
    "unpack: dst too small": lambda: tk.unpack(bytearray(3), bytes(2)),
    "unpack: dst too large": lambda: tk.unpack(bytearray(5), bytes(2)),
    "unpack: dst read-only": lambda: tk.unpack(memoryview(bytes(4)), bytes(2)),
    "unpack: dst overlaps src": lambda: _overlapping(tk.unpack, 8, 4),
    "packed: odd number of tags": lambda: tk.packed(bytes(5)),
    "fill: past the end": lambda: tk.fill(bytearray(4), 7, 2, 1),
    "fill: start past the end": lambda: tk.fill(bytearray(4), 9, 0, 1),
    "fill: negative start": lambda: tk.fill(bytearray(4), -1, 2, 1),
    "fill: negative count": lambda: tk.fill(bytearray(4), 2, -1, 1),
    "fill: huge count": lambda: tk.fill(bytearray(4), 1, 2**64 - 1, 1),
    "fill: tag too large": lambda: tk.fill(bytearray(4), 0, 1, 0x10),
    "fill: negative tag": lambda: tk.fill(bytearray(4), 0, 1, -1),
    "fill: read-only": lambda: tk.fill(bytes(4), 0, 1, 1),
    "fill_zero: read-only": lambda: tk.fill_zero(bytes(4)),
    "find_mismatch: past the end": lambda: tk.find_mismatch(bytes(4), 0, 9, 1),
    "find_mismatch: tag too large": lambda: tk.find_mismatch(bytes(4), 0, 1, 0x11),
    "zero_pages: page_bytes 0": lambda: tk.zero_pages(bytearray(1), bytes(8), 0),
    "zero_pages: partial page": lambda: tk.zero_pages(bytearray(1), bytes(9), 4),
    "zero_pages: bitmap too small": lambda: tk.zero_pages(bytearray(1), bytes(9), 1),
    "zero_pages: bitmap read-only": lambda: tk.zero_pages(bytes(1), bytes(8), 1),
    "zero_pages: bitmap overlaps buf": lambda: _overlapping(
        lambda a, b: tk.zero_pages(a, b, 1), 1, 8
    ),
    "bitmap_andnot: sizes differ": lambda: tk.bitmap_andnot(bytearray(8), bytearray(16)),
    "bitmap_andnot: not whole words": lambda: tk.bitmap_andnot(bytearray(12), bytearray(12)),
    "bitmap_andnot: mask read-only": lambda: tk.bitmap_andnot(bytearray(8), bytes(8)),
    "bitmap_andnot: bitmap read-only": lambda: tk.bitmap_andnot(bytes(8), bytearray(8)),
    "bitmap_andnot: misaligned": lambda: tk.bitmap_andnot(
        memoryview(bytearray(9))[1:], bytearray(8)
    ),
    "bitmap_andnot: same buffer": lambda: (lambda b: tk.bitmap_andnot(b, b))(bytearray(8)),
    "bitmap_set: past the end": lambda: tk.bitmap_set(bytearray(2), 10, 7),
    "bitmap_set: read-only": lambda: tk.bitmap_set(bytes(2), 0, 1),
    "bitmap_count: past the end": lambda: tk.bitmap_count(bytes(2), 17, 0),
    "bitmap_count: negative": lambda: tk.bitmap_count(bytes(2), 0, -1),
}


def _overlapping(
    func: Callable[[memoryview, memoryview], object], out_size: int, in_size: int
) -> None:
    """Calls func(out, in) with two views of one buffer that share a byte."""
    whole = memoryview(bytearray(out_size + in_size - 1))
    func(whole[:out_size], whole[out_size - 1 :])


@pytest.mark.parametrize("misuse", MISUSE.values(), ids=MISUSE.keys())
def test_misuse_raises_value_error(misuse: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        misuse()


def test_non_buffers_raise_type_error() -> None:
    with pytest.raises(TypeError):
        tk.pack(bytearray(1), "ab")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tk.fill(bytearray(1), 0.0, 1, 1)  # type: ignore[arg-type]


# --- large buffers: the vectorised loops ---------------------------------------------------------

LARGE = 4 << 20  # 4 MiB of one-per-byte tags
LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
HIGH_NIBBLE = bytes(b >> 4 for b in range(256))


@pytest.mark.slow
def test_large_pack_and_unpack() -> None:
    src = os.urandom(LARGE + 2)[1:-1]  # an odd address is likely too; high nibbles are random
    packed = tk.packed(src)
    tags_ = tk.unpacked(packed)
    # Independent checks by slicing, at C speed: even granules are the low nibbles, odd ones
    # the high nibbles, and unpacking gives back each source byte's low nibble.
    assert tags_[0::2] == packed.translate(LOW_NIBBLE)
    assert tags_[1::2] == packed.translate(HIGH_NIBBLE)
    assert tags_ == src.translate(LOW_NIBBLE)


@pytest.mark.slow
def test_large_scans_find_the_last_byte() -> None:
    packed = bytearray(LARGE // 2)
    assert tk.is_zero(packed)
    tk.fill(packed, 0, LARGE, 0x9)
    assert tk.find_mismatch(packed, 1, LARGE - 1, 0x9) is None
    oracle.set_tag(packed, LARGE - 1, 0x3)
    assert tk.find_mismatch(packed, 1, LARGE - 1, 0x9) == LARGE - 2
    assert tk.find_mismatch(packed, 0, LARGE - 1, 0x9) is None
    zeros = bytearray(LARGE)
    zeros[-1] = 1
    assert not tk.is_zero(zeros)
    bitmap = bytearray(LARGE // 4096 // 8)
    tk.zero_pages(bitmap, zeros, 4096)
    assert tk.bitmap_count(bitmap, 0, LARGE // 4096) == LARGE // 4096 - 1
    assert bitmap[-1] == 0x7F


@pytest.mark.slow
def test_large_bitmaps() -> None:
    nbits = 8 * (1 << 20)
    bitmap, mask = bytearray(os.urandom(nbits // 8)), bytearray(os.urandom(nbits // 8))
    expected = (int.from_bytes(bitmap, "little") & int.from_bytes(mask, "little")).bit_count()
    assert tk.bitmap_count(bitmap, 0, nbits) == int.from_bytes(bitmap, "little").bit_count()
    assert tk.bitmap_andnot(bitmap, mask) == expected
    assert tk.bitmap_count(mask, 3, nbits - 3) + tk.bitmap_count(mask, 0, 3) == expected
    tk.bitmap_set(bitmap, 5, nbits - 11)
    assert tk.bitmap_count(bitmap, 5, nbits - 11) == nbits - 11


# --- guarded copies -----------------------------------------------------------------------------


def test_guarded_copy_survives_a_truncated_file() -> None:
    fd = os.memfd_create("guarded", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8192)
        mapping = mmap.mmap(fd, 8192)
        tail = memoryview(mapping)[4096:]
        out = bytearray(4096)
        assert tk.guarded_copy(tail, b"\x5a" * 4096)
        assert tk.guarded_copy(out, tail) and out == b"\x5a" * 4096
        os.ftruncate(fd, 4096)  # the VMM shrinks its memfd under us: SIGBUS, caught
        assert not tk.guarded_copy(out, tail)
        assert not tk.guarded_copy(tail, bytes(4096))
        assert os.fstat(fd).st_size == 4096  # nothing grew the file back
        assert tk.guarded_copy(out, memoryview(mapping)[:4096])  # the rest still works
        with pytest.raises(ValueError):
            tk.guarded_copy(out, b"short")
        tail.release()
        mapping.close()
    finally:
        os.close(fd)


# --- the tag store: page tables over a slab ------------------------------------------------------
#
# The oracle is a dict of pages, written from tagkernel.h's definitions: which page gets which
# slot (the next one, on its first tagging with a non-zero tag), what stops an inserting call
# (the next page needs a table entry and count is max_count, or a slot and the slab is full),
# and where an entry may sit (its home: the key's low GROUP_BITS bits kept, the rest hashed).

FIBONACCI = 0x9E3779B97F4A7C15


def home(key: int, capacity: int) -> int:
    """A key's home entry, from the definition in tagkernel.h."""
    groups = capacity >> tk.GROUP_BITS
    hashed = ((key >> tk.GROUP_BITS) * FIBONACCI % 2**64) >> (64 - groups.bit_length() + 1)
    return hashed << tk.GROUP_BITS | key & ((1 << tk.GROUP_BITS) - 1)


class StoreOracle:
    """One region's pages as a dict: key -> its tags, and key -> its slot if it has one."""

    def __init__(self, slot_bytes: int, slots_per_arena: int, capacity: int) -> None:
        self.tpp = 2 * slot_bytes
        self.slots_per_arena = slots_per_arena
        self.tags: dict[int, bytes] = {}  # every tagged page (zeros for one without a slot)
        self.slots: dict[int, int] = {}
        self.slot_limit = 0
        self.max_count = capacity * 3 // 4

    def value(self, key: int) -> int:
        if key in self.slots:
            return self.slots[key] + 1
        return tk.ZERO if key in self.tags else tk.EMPTY

    def read(self, key: int, npages: int) -> bytes:
        return b"".join(self.tags.get(key + i, bytes(self.tpp)) for i in range(npages))

    def _room(self, key: int, needs_slot: bool) -> bool:
        if key not in self.tags and len(self.tags) >= self.max_count:
            return False
        return not (needs_slot and key not in self.slots and len(self.slots) >= self.slot_limit)

    def _slot(self, key: int) -> None:
        if key not in self.slots:
            self.slots[key] = len(self.slots)

    def write(self, key: int, src: bytes) -> int:
        for i in range(len(src) // self.tpp):
            tags = bytes(b & 0xF for b in src[i * self.tpp : (i + 1) * self.tpp])
            nonzero = any(tags)
            if not self._room(key + i, nonzero):
                return i
            if nonzero:
                self._slot(key + i)
            self.tags[key + i] = tags
        return len(src) // self.tpp

    def clear(self, key: int, npages: int) -> int:
        for i in range(npages):
            if not self._room(key + i, False):
                return i
            self.tags[key + i] = bytes(self.tpp)
        return npages

    def fill(self, key: int, first: int, n: int, tag: int) -> bool:
        if not self._room(key, tag != 0 and n != 0):
            return False
        tags = bytearray(self.tags.get(key, bytes(self.tpp)))
        tags[first : first + n] = bytes([tag]) * n
        if any(tags):
            self._slot(key)
        self.tags[key] = bytes(tags)
        return True

    def find_mismatch(self, key: int, first: int, n: int, tag: int) -> int | None:
        tags = self.read(key, 1)
        return next((i for i in range(n) if tags[first + i] != tag), None)


def check_table(table: tk.PageTable, model: StoreOracle) -> None:
    """Every entry is the model's, and sits where a probe from its home finds it."""
    entries = table.entries()
    words = [int.from_bytes(entries[i : i + 8], "little") for i in range(0, len(entries), 8)]
    found = {}
    for at, word in enumerate(words):
        if word >> 32 == tk.EMPTY:
            assert word == 0
            continue
        key = word & 0xFFFFFFFF
        found[key] = word >> 32
        i = home(key, table.capacity)
        while i != at:  # no free entry between its home and it
            assert words[i] >> 32 != tk.EMPTY
            i = (i + 1) % table.capacity
    assert found == {key: model.value(key) for key in model.tags}
    assert table.count == len(model.tags) and table.slab.nslots == len(model.slots)
    for key, slot in model.slots.items():
        assert table.slab.packed_slot(slot) == oracle.pack(model.tags[key])


# Keys near 0 collide in few groups; keys near 2^32 reach the end of the key space.
store_keys = st.one_of(st.integers(0, 300), st.integers(2**32 - 300, 2**32 - 1))


@st.composite
def store_ops(draw: st.DrawFn, tpp: int) -> list[tuple[object, ...]]:
    ops: list[tuple[object, ...]] = []
    for _ in range(draw(st.integers(1, 25))):
        key = draw(store_keys)
        npages = draw(st.integers(0, min(40, 2**32 - key)))
        kind = draw(st.sampled_from(["write", "write", "clear", "fill", "read", "check"]))
        if kind == "write":
            # Some pages all zero (high nibbles set or not): they must not take a slot.
            pages = [
                draw(st.sampled_from([bytes(tpp), b"\xf0" * tpp, None])) for _ in range(npages)
            ]
            src = b"".join(p if p is not None else draw(st.binary(min_size=tpp, max_size=tpp))
                           for p in pages)  # fmt: skip
            ops.append(("write", key, src))
        elif kind == "clear":
            ops.append(("clear", key, npages))
        elif kind in ("fill", "check"):
            first = draw(st.integers(0, tpp))
            ops.append((kind, key, first, draw(st.integers(0, tpp - first)), draw(tags)))
        else:
            ops.append(("read", key, npages))
    return ops


@given(
    slot_bytes=st.sampled_from([2, 4, 8]),
    slots_per_arena=st.sampled_from([1, 2, 8]),
    data=st.data(),
)
@settings(deadline=None, max_examples=150)
def test_page_table_matches_oracle(
    slot_bytes: int, slots_per_arena: int, data: st.DataObject
) -> None:
    slab = tk.Slab(slot_bytes, slot_bytes * slots_per_arena)
    table = tk.PageTable(slab, tk.PageTable.MIN_CAPACITY)
    model = StoreOracle(slot_bytes, slots_per_arena, table.capacity)
    tpp = 2 * slot_bytes

    def make_room() -> tk.PageTable:
        """What the tag store does when a call stops: grow the table or the slab."""
        nonlocal table
        grew = False
        if table.full:
            before = table.entries()
            table, old = table.grown(), table
            assert old.entries() == before  # the old table is left as it was, for its readers
            model.max_count = table.capacity * 3 // 4
            grew = True
        if slab.full:
            slab.add_arena()
            model.slot_limit += slots_per_arena
            grew = True
        assert grew, "the kernel stopped with room left"
        return table

    for op in data.draw(store_ops(tpp)):
        kind, key = op[0], op[1]
        assert isinstance(key, int)
        if kind == "write":
            src = op[2]
            assert isinstance(src, bytes)
            done = 0
            while done < len(src) // tpp:
                got = table.write(key + done, src[done * tpp :])
                assert got == model.write(key + done, src[done * tpp :])
                done += got
                if done < len(src) // tpp:
                    make_room()
        elif kind == "clear":
            npages = op[2]
            assert isinstance(npages, int)
            done = 0
            while done < npages:
                got = table.clear(key + done, npages - done)
                assert got == model.clear(key + done, npages - done)
                done += got
                if done < npages:
                    make_room()
        elif kind == "fill":
            _, _, first, n, tag = op
            assert isinstance(first, int) and isinstance(n, int) and isinstance(tag, int)
            while not table.fill(key, first, n, tag):
                assert not model.fill(key, first, n, tag)
                make_room()
            assert model.fill(key, first, n, tag)
        elif kind == "check":
            _, _, first, n, tag = op
            assert isinstance(first, int) and isinstance(n, int) and isinstance(tag, int)
            assert table.find_mismatch(key, first, n, tag) == model.find_mismatch(
                key, first, n, tag
            )
        else:
            npages = op[2]
            assert isinstance(npages, int)
            out = bytearray(b"\xee" * npages * tpp)
            table.read(key, out)
            assert out == model.read(key, npages)
            packed = bytearray(b"\xee" * npages * slot_bytes)
            table.read_packed(key, packed)
            assert packed == oracle.pack(model.read(key, npages))
        assert table.value(key) == model.value(key)
        assert table.is_tagged(key) == (key in model.tags)
    check_table(table, model)


def test_page_table_fresh_pages_read_as_zero_and_cost_no_slot() -> None:
    slab = tk.Slab(128, 4096)
    table = tk.PageTable(slab, tk.PageTable.MIN_CAPACITY)
    slab.add_arena()
    out = bytearray(b"\xff" * 3 * 256)
    table.read(7, out)
    assert out == bytes(len(out)) and table.value(7) == tk.EMPTY
    assert table.write(7, b"\xf0" * 256) == 1  # high nibbles only: all tags zero
    assert table.clear(8, 1) == 1
    assert table.fill(9, 0, 256, 0)
    assert [table.value(k) for k in (7, 8, 9)] == [tk.ZERO] * 3 and slab.nslots == 0
    assert table.fill(9, 255, 1, 3)  # the first non-zero tag takes a slot
    assert table.value(9) == 1 and slab.nslots == 1
    assert table.find_mismatch(9, 0, 256, 0) == 255
    assert table.find_mismatch(7, 10, 5, 0) is None and table.find_mismatch(7, 10, 5, 1) == 0


@pytest.mark.slow
def test_page_table_large_runs() -> None:
    """16,384 pages (4 MiB of tags) in one call each, through several table doublings and
    arenas, written in order and then rewritten in a scattered order of first tagging."""
    npages, tpp = 16384, 256
    src = os.urandom(npages * tpp)
    slab = tk.Slab(128, 1 << 20)
    table = tk.PageTable(slab, tk.PageTable.MIN_CAPACITY)
    done = 0
    while done < npages:
        done += table.write(1000 + done, src[done * tpp :])
        if done < npages and table.full:
            table = table.grown()
        if done < npages and slab.full:
            slab.add_arena()
    assert table.count == npages and table.capacity == 32768 and slab.narenas == 2
    out = bytearray(npages * tpp)
    table.read(1000, out)
    assert out == src.translate(LOW_NIBBLE)
    packed = bytearray(npages * 128)
    table.read_packed(1000, packed)
    assert packed == tk.packed(src)
    # Holes: every third page of a fresh region tagged, in reverse order.
    holes = tk.PageTable(slab, 1 << 16)
    for page in reversed(range(0, npages, 3)):
        if not holes.write(page, src[page * tpp : (page + 1) * tpp]):
            slab.add_arena()
            assert holes.write(page, src[page * tpp : (page + 1) * tpp]) == 1
    holes.read(0, out)
    expected = bytearray(len(src))
    for page in range(0, npages, 3):
        expected[page * tpp : (page + 1) * tpp] = src[page * tpp : (page + 1) * tpp]
    assert out == expected.translate(LOW_NIBBLE)
    holes.read_packed(0, packed)
    assert packed == tk.packed(expected)


STORE_MISUSE = {
    "slab: odd slot": lambda: tk.Slab(3, 4096),
    "slab: slot 1": lambda: tk.Slab(1, 4096),
    "slab: arena not a power of two": lambda: tk.Slab(128, 3000),
    "slab: arena smaller than a slot": lambda: tk.Slab(128, 64),
    "table: capacity not a power of two": lambda: tk.PageTable(tk.Slab(2, 8), 1000),
    "table: capacity too small": lambda: tk.PageTable(tk.Slab(2, 8), 16),
    "table: key past 32 bits": lambda: _table().value(2**32),
    "table: negative key": lambda: _table().is_tagged(-1),
    "table: run past 32 bits": lambda: _table().clear(2**32 - 2, 3),
    "table: read past 32 bits": lambda: _table().read(2**32 - 1, bytearray(16)),
    "table: read a partial page": lambda: _table().read(0, bytearray(9)),
    "table: read into read-only": lambda: _table().read(0, bytes(8)),
    "table: read_packed a partial page": lambda: _table().read_packed(0, bytearray(5)),
    "table: write a partial page": lambda: _table().write(0, bytes(9)),
    "table: fill past the page": lambda: _table().fill(0, 7, 2, 1),
    "table: fill tag too large": lambda: _table().fill(0, 0, 1, 16),
    "table: find_mismatch past the page": lambda: _table().find_mismatch(0, 9, 0, 1),
    "table: negative clear": lambda: _table().clear(0, -1),
}


def _table() -> tk.PageTable:
    """A table of 8-granule pages (slot_bytes 4) with room for pages and slots."""
    slab = tk.Slab(4, 64)
    slab.add_arena()
    return tk.PageTable(slab, tk.PageTable.MIN_CAPACITY)


@pytest.mark.parametrize("misuse", STORE_MISUSE.values(), ids=STORE_MISUSE.keys())
def test_store_misuse_raises_value_error(misuse: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        misuse()


def test_table_needs_a_slab() -> None:
    with pytest.raises(TypeError):
        tk.PageTable(object(), 1024)  # type: ignore[arg-type]
