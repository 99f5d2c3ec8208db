"""The tag store: packed, lazily allocated, keyed by backing memory, released with its holders.

A Backing is compared with a dict of pages under random operation sequences (small first tables
and arenas, so a few hundred pages go through several table doublings and arenas; page indexes
near 0, across a region boundary at 2^32 and near 2^52); the memory it holds is compared with
the RSS it costs; and writers and readers race in threads while tables grow.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvmtag import tagkernel, tagstore
from kvmtag.bench import memory
from kvmtag.tagstore import ARENA_BYTES, FIRST_TABLE_ENTRIES, TagStore, private_key, shared_key

REGION = 1 << tagstore.REGION_BITS
LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
HIGH_NIBBLE = bytes(b >> 4 for b in range(256))


def tags(pages: int, tpp: int, seed: int = 0) -> bytes:
    return bytes((i * 5 + seed) % 16 for i in range(pages * tpp))


@pytest.fixture
def small_layout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The smallest first tables and 4 KiB arenas: growth after a few dozen pages."""
    monkeypatch.setattr(tagstore, "FIRST_TABLE_ENTRIES", tagkernel.PageTable.MIN_CAPACITY)
    monkeypatch.setattr(tagstore, "ARENA_BYTES", 4096)
    yield


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_write_read_across_a_region_boundary(page_size: int) -> None:
    store = TagStore(page_size)
    backing = store.attach(shared_key(1, 2), "vmm")
    tpp = page_size // 16
    first = REGION - 2  # straddles the first region boundary: two page tables
    data = tags(5, tpp)
    backing.write(first, 5, memoryview(data))
    out = bytearray(9 * tpp)
    backing.read(first - 2, 9, memoryview(out))
    assert out == bytes(2 * tpp) + data + bytes(2 * tpp)
    packed = bytearray(9 * tpp // 2)
    backing.read_packed(first - 2, 9, memoryview(packed))
    assert packed.translate(LOW_NIBBLE) == out[0::2]
    assert packed.translate(HIGH_NIBBLE) == out[1::2]
    assert backing.tagged_pages() == 5
    assert backing.is_tagged(first) and not backing.is_tagged(first - 1)
    assert backing.is_tagged(REGION + 2) and not backing.is_tagged(REGION + 3)
    assert backing.nbytes >= 2 * 8 * FIRST_TABLE_ENTRIES + 5 * page_size // 32


def test_never_tagged_costs_nothing() -> None:
    backing = TagStore(4096).attach(private_key("p"), "p")
    out = bytearray(b"\xaa" * 256 * 3)
    backing.read(10**9, 3, memoryview(out))  # far away: no table, reads as zero
    assert out == bytes(len(out))
    assert backing.find_mismatch(10**9, 0, 4, 0) is None
    assert backing.find_mismatch(10**9, 0, 4, 1) == 0
    assert backing.nbytes == 0


def test_clear_zeroes_and_marks_tagged() -> None:
    backing = TagStore(4096).attach(shared_key(1, 3), "vmm")
    backing.write(0, 2, memoryview(tags(2, 256, 1)))
    backing.clear(1, 2)
    out = bytearray(3 * 256)
    backing.read(0, 3, memoryview(out))
    assert out == tags(2, 256, 1)[:256] + bytes(512)
    assert [backing.is_tagged(p) for p in range(4)] == [True, True, True, False]


def test_write_prefix_only_touches_tagged_pages() -> None:
    backing = TagStore(4096).attach(shared_key(1, 4), "vmm")
    backing.write_prefix(0, memoryview(b"\x07" * 3))
    assert not backing.is_tagged(0)
    backing.write(1, 1, memoryview(bytes(256)))
    backing.write_prefix(1, memoryview(b"\x07" * 3))  # odd length: ends mid-byte when packed
    out = bytearray(256)
    backing.read(1, 1, memoryview(out))
    assert out == b"\x07" * 3 + bytes(253)


def test_backings_live_while_a_holder_does() -> None:
    store = TagStore(4096)
    key = shared_key(7, 8)
    a = store.attach(key, "first")
    assert store.attach(key, "second") is a
    store.release_process("first")
    assert store.get(key) is a
    store.release_process("second")
    assert store.get(key) is None and len(store) == 0


def test_pages_with_zero_tags_take_no_slot() -> None:
    """TO_GUEST of zero tags over a whole 1 GiB guest costs its table only."""
    backing = TagStore(4096).attach(shared_key(1, 5), "vmm")
    npages = 1 << 18
    backing.write(0, npages, memoryview(bytes(npages * 256)))
    backing.clear(npages, 1000)
    backing.set_granules(npages + 2000, 0, 256, 0)
    assert backing.tagged_pages() == npages + 1001
    table_bytes = 8 * FIRST_TABLE_ENTRIES
    while (npages + 1001) > table_bytes // 8 * 3 // 4:  # doubled when 3/4 full
        table_bytes *= 2
    assert table_bytes == 4 << 20
    assert backing.nbytes == table_bytes  # no slab: not a single slot
    backing.set_granules(5, 3, 1, 9)  # a non-zero tag: now it needs one
    assert backing.nbytes == table_bytes + 2 * mmap.PAGESIZE  # a slab page, its arena pointers'
    assert backing.find_mismatch(5, 0, 256, 0) == 3


# --- against a dict of pages ----------------------------------------------------------------------


class Reference:
    """The tag store as a dict: page -> its tags, one per byte, for every tagged page."""

    def __init__(self, tpp: int) -> None:
        self.tpp = tpp
        self.pages: dict[int, bytearray] = {}

    def read(self, first: int, npages: int) -> bytes:
        return b"".join(bytes(self.pages.get(first + i, bytes(self.tpp))) for i in range(npages))

    def write(self, first: int, src: bytes) -> None:
        for i in range(len(src) // self.tpp):
            chunk = src[i * self.tpp : (i + 1) * self.tpp]
            self.pages[first + i] = bytearray(chunk.translate(LOW_NIBBLE))

    def clear(self, first: int, npages: int) -> None:
        for i in range(npages):
            self.pages[first + i] = bytearray(self.tpp)

    def write_prefix(self, page: int, src: bytes) -> None:
        if page in self.pages:
            self.pages[page][: len(src)] = bytes(b & 0xF for b in src)

    def set_granules(self, page: int, first: int, n: int, tag: int) -> None:
        self.pages.setdefault(page, bytearray(self.tpp))[first : first + n] = bytes([tag]) * n


# Page indexes: near 0, across the region boundary at 2^32, and near 2^52 (a private backing's
# virtual page numbers go that far).
bases = st.sampled_from([0, REGION - 24, 2**52 - 64])


@st.composite
def operations(draw: st.DrawFn, tpp: int) -> list[tuple[object, ...]]:
    base = draw(bases)
    # Mostly a few pages among 48, where operations meet; now and then a run of hundreds, so
    # the table doubles a few times (from MIN_CAPACITY: 96 entries).
    page = st.integers(base, base + 48) | st.integers(base, base + 400)
    count = st.integers(0, 12) | st.integers(100, 300)
    ops: list[tuple[object, ...]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["write", "write", "clear", "prefix", "granules", "read"]))
        first = draw(page)
        npages = draw(count)
        if kind == "write":
            # A page of zeros (no slot) now and then, and high nibbles that must be ignored.
            pattern = draw(st.sampled_from([b"\x00", b"\xf0", b"\x3c\x01", bytes(range(16))]))
            rotate = draw(st.integers(0, 15))
            src = (pattern[rotate % len(pattern) :] + pattern * (npages * tpp))[: npages * tpp]
            ops.append(("write", first, src))
        elif kind == "clear":
            ops.append(("clear", first, npages))
        elif kind == "prefix":
            ops.append(("prefix", first, bytes([draw(tags_)]) * draw(st.integers(0, tpp))))
        elif kind == "granules":
            start = draw(st.integers(0, tpp))
            ops.append(("granules", first, start, draw(st.integers(0, tpp - start)), draw(tags_)))
        else:
            ops.append(("read", first, npages, draw(tags_)))
    return ops


tags_ = st.integers(0, 15)


@pytest.mark.usefixtures("small_layout")
@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
@given(data=st.data())
@settings(deadline=None, max_examples=40)
def test_backing_matches_a_dict_of_pages(page_size: int, data: st.DataObject) -> None:
    tpp = page_size // 16
    backing = TagStore(page_size).attach(private_key("p"), "p")
    ref = Reference(tpp)
    for op in data.draw(operations(tpp)):
        kind, first = op[0], op[1]
        assert isinstance(first, int)
        if kind == "write":
            src = op[2]
            assert isinstance(src, bytes)
            backing.write(first, len(src) // tpp, memoryview(src))
            ref.write(first, src)
        elif kind == "clear":
            npages = op[2]
            assert isinstance(npages, int)
            backing.clear(first, npages)
            ref.clear(first, npages)
        elif kind == "prefix":
            src = op[2]
            assert isinstance(src, bytes)
            backing.write_prefix(first, memoryview(src))
            ref.write_prefix(first, src)
        elif kind == "granules":
            _, _, start, n, tag = op
            assert isinstance(start, int) and isinstance(n, int) and isinstance(tag, int)
            backing.set_granules(first, start, n, tag)
            ref.set_granules(first, start, n, tag)
        else:
            _, _, npages, tag = op
            assert isinstance(npages, int) and isinstance(tag, int)
            out = bytearray(b"\xee" * npages * tpp)
            backing.read(first, npages, memoryview(out))
            assert out == ref.read(first, npages)
            packed = bytearray(b"\xee" * (npages * tpp // 2))
            backing.read_packed(first, npages, memoryview(packed))
            # Packed: granule 2k in the low nibble of byte k, 2k+1 in its high nibble.
            assert packed.translate(LOW_NIBBLE) == out[0::2]
            assert packed.translate(HIGH_NIBBLE) == out[1::2]
            page_tags = ref.read(first, 1)
            assert backing.find_mismatch(first, 1, tpp - 1, tag) == next(
                (i for i in range(tpp - 1) if page_tags[1 + i] != tag), None
            )
        assert backing.is_tagged(first) == (first in ref.pages)
    assert backing.tagged_pages() == len(ref.pages)
    tables = backing._tables.values()  # white box: how far the tables grew
    event(f"table doublings: {max((t.capacity for t in tables), default=128).bit_length() - 8}")
    lo, hi = min(ref.pages, default=0), max(ref.pages, default=0) + 1
    out = bytearray((hi - lo) * tpp)
    backing.read(lo, hi - lo, memoryview(out))
    assert out == ref.read(lo, hi - lo)


@pytest.mark.usefixtures("small_layout")
def test_many_table_doublings_and_arenas() -> None:
    """Scattered pages in two regions, through six doublings of each table and 40 arenas."""
    backing = TagStore(4096).attach(shared_key(2, 2), "vmm")
    ref = Reference(256)
    pages = [(i * 7919) % 12007 for i in range(6000)] + [REGION + i * 3 for i in range(3000)]
    for i, page in enumerate(pages):
        src = bytes([i % 15 + 1]) * 256
        backing.write(page, 1, memoryview(src))
        ref.write(page, src)
    assert backing.tagged_pages() == len(ref.pages)
    for first in (0, REGION - 5000):
        out = bytearray(20000 * 256)
        backing.read(first, 20000, memoryview(out))
        assert out == ref.read(first, 20000)


# --- memory held ----------------------------------------------------------------------------------


def test_nbytes_tracks_real_memory() -> None:
    """nbytes against the RSS a fresh process gains by tagging 10% of a 1 GiB guest at random
    (the benchmark's measurement, small): within 64 KiB plus 10%."""
    held = memory.measure_in_child(1 << 30, seed=1)
    assert held["packed"] == (1 << 18) // 10 * 128
    assert held["nbytes"] <= 1.2 * held["packed"] + 256 * 1024
    assert abs(held["rss"] - held["nbytes"]) <= 64 * 1024 + 0.1 * held["nbytes"]


def test_the_first_tagging_is_counted() -> None:
    backing = TagStore(4096).attach(shared_key(3, 3), "vmm")
    backing.write(10, 1, memoryview(bytes(range(16)) * 16))
    # The table (in whole host pages), a host page of the slab, one of its arena pointers.
    table = -(-8 * FIRST_TABLE_ENTRIES // mmap.PAGESIZE) * mmap.PAGESIZE
    assert backing.nbytes == table + 2 * mmap.PAGESIZE
    assert ARENA_BYTES > mmap.PAGESIZE  # the arena's untouched rest is not counted


# --- threads --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_layout")
def test_writers_and_readers_race_while_tables_grow() -> None:
    """Two writers (even and odd pages) and two readers on one backing, while its table doubles
    again and again: nothing crashes, readers only ever see tags, and every write lands."""
    backing = TagStore(4096).attach(shared_key(4, 4), "vmm")
    npages, rounds = 4000, 6
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(parity: int) -> None:
        try:
            for r in range(rounds):
                for page in range(parity, npages, 2):
                    tag = (page + r) % 15 + 1
                    if page % 3:
                        backing.write(page, 1, memoryview(bytes([tag]) * 256))
                    else:
                        backing.set_granules(page, 0, 256, tag)
                backing.clear(npages + parity * 500, 500)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        out = bytearray(512 * 256)
        packed = bytearray(512 * 128)
        try:
            while not stop.is_set():
                for first in range(0, npages + 1000, 512):
                    backing.read(first, 512, memoryview(out))
                    assert max(out) <= 0xF
                    backing.read_packed(first, 512, memoryview(packed))
                    backing.find_mismatch(first, 0, 256, 1)
                    backing.is_tagged(first)
                time.sleep(0.001)  # a sweep at a time: the writers need the GIL too
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    assert not errors, errors
    out = bytearray(npages * 256)
    backing.read(0, npages, memoryview(out))
    expected = b"".join(bytes([(p + rounds - 1) % 15 + 1]) * 256 for p in range(npages))
    assert out == expected
    assert backing.tagged_pages() == npages + 1000
