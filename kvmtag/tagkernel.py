"""The tag store's bulk work, done by the C tag kernel (cdefs/tagkernel.c) at memory bandwidth.

This is the only module that touches the cffi extension's `lib` and `ffi`. Every function takes
Python buffers (bytes, bytearray, memoryview, mmap, array: anything C-contiguous with the buffer
protocol), hands the C code pointers into them with `ffi.from_buffer` (no copies), and checks
every length and index against the buffers' sizes first, so the C code can never read or write
out of bounds. Misuse raises ValueError; an object that is not a buffer at all raises TypeError.

Formats (cdefs/tagkernel.h states them for the C side):

- *unpacked* tags are KVM_ARM_MTE_COPY_TAGS's: one MTE tag per byte, one byte per 16-byte
  granule. Readers ignore the high nibble of each byte; writers emit 0x0..0xF.
- *packed* tags are the tag store's: two per byte, byte k holding granule 2k in its low nibble
  and granule 2k+1 in its high nibble (so [0x1, 0x2] packs to [0x21]).
- *bitmaps* are Linux little-endian bitmaps, like the dirty log: bit i is (1 << i % 8) of byte
  i // 8.

The tag store's memory (kvmtag/tagstore.py) is built here too: `Slab` (packed page slots in
arenas of anonymous memory) and `PageTable` (one region's hash table from page keys to slots)
own the buffers and the C structs that describe them, so the C code that indexes them can trust
those structs; their methods check every key, length and tag like the functions above.

The GIL: cffi releases it around every call into `lib` (the generated kvmtag/_tagkernel.c wraps
each call in Py_BEGIN_ALLOW_THREADS / Py_END_ALLOW_THREADS), so a pack of 64 MiB never blocks
other Python threads. The buffers stay exported for the whole call (the `with` blocks below):
nobody can resize a bytearray or close an mmap under the C code, and the export is released
as soon as the call returns, even when it raises.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
from typing import TYPE_CHECKING, Any

# The cffi extension ships no type information: `ffi` and `lib` are Any to mypy.
from kvmtag._tagkernel import ffi, lib  # type: ignore[import-not-found]

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "EMPTY",
    "GROUP_BITS",
    "KEYS_PER_TABLE",
    "MAX_TAG",
    "ZERO",
    "PageTable",
    "Slab",
    "bitmap_andnot",
    "bitmap_count",
    "bitmap_set",
    "fill",
    "fill_zero",
    "find_mismatch",
    "is_zero",
    "pack",
    "packed",
    "unpack",
    "unpacked",
    "zero_pages",
]

MAX_TAG = 0xF
"""The largest MTE allocation tag (tags are 4 bits)."""

_WORD_BYTES = 8
"""kt_bitmap_andnot works on 64-bit words."""

KEYS_PER_TABLE = 1 << 32
"""A page table's keys are 32-bit: page indexes within a region of 2^32 pages."""

EMPTY: int = lib.KT_EMPTY
"""PageTable.value of a page never tagged."""

ZERO: int = lib.KT_ZERO
"""PageTable.value of a page tagged with all tags zero (it has no slot); else slot + 1."""

GROUP_BITS: int = lib.KT_GROUP_BITS
"""A page key's home entry in a table keeps the key's low GROUP_BITS bits (tagkernel.h)."""


# --- buffers and arguments -----------------------------------------------------------------------


def _readable(buf: ReadableBuffer, what: str) -> Any:
    """A `uint8_t[]` view of `buf` for reading; its len() is the size in bytes."""
    try:
        return ffi.from_buffer("uint8_t[]", buf)
    except BufferError as e:
        raise ValueError(f"{what} must be a C-contiguous buffer ({e})") from None


def _writable(buf: WriteableBuffer, what: str) -> Any:
    """A `uint8_t[]` view of `buf` for writing; its len() is the size in bytes."""
    try:
        return ffi.from_buffer("uint8_t[]", buf, require_writable=True)
    except BufferError as e:
        raise ValueError(
            f"{what} must be a writable C-contiguous buffer, not {type(buf).__name__} ({e})"
        ) from None


def _address(view: Any) -> int:
    return int(ffi.cast("uintptr_t", view))


def _check_disjoint(out: Any, out_what: str, other: Any, other_what: str) -> None:
    """The C code declares its outputs `restrict`: an output must not overlap an input."""
    if not len(out) or not len(other):
        return
    a, b = _address(out), _address(other)
    if a < b + len(other) and b < a + len(out):
        raise ValueError(f"{out_what} must not overlap {other_what}")


def _count(value: int, what: str) -> int:
    """`value` as a non-negative int (operator.index: floats and the like are a TypeError)."""
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _check_range(first: int, n: int, limit: int, what: str, unit: str) -> tuple[int, int]:
    """Checks that [first, first + n) lies within [0, limit); returns both as ints."""
    first, n = _count(first, f"first {unit}"), _count(n, f"number of {unit}s")
    if first + n > limit:
        raise ValueError(
            f"{unit}s [{first}, {first + n}) out of range: {what} holds {limit} {unit}s"
        )
    return first, n


def _check_tag(tag: int) -> int:
    tag = operator.index(tag)
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be in 0..{MAX_TAG:#x}, got {tag:#x}")
    return tag


# --- packing -------------------------------------------------------------------------------------


def pack(dst: WriteableBuffer, src: ReadableBuffer) -> None:
    """Packs one-per-byte tags into two-per-byte storage.

    Args:
        dst: the packed output, exactly len(src) // 2 bytes, writable.
        src: one tag per byte (the high nibble of each byte is ignored), an even number.

    Raises:
        ValueError: odd or mismatched lengths, dst read-only or overlapping src.
    """
    with _writable(dst, "dst") as d, _readable(src, "src") as s:
        _pack(d, s)


def unpack(dst: WriteableBuffer, src: ReadableBuffer) -> None:
    """Unpacks two-per-byte storage into one-per-byte tags (each 0x0..0xF).

    Args:
        dst: the one-per-byte output, exactly 2 * len(src) bytes, writable.
        src: packed tags.

    Raises:
        ValueError: mismatched lengths, dst read-only or overlapping src.
    """
    with _writable(dst, "dst") as d, _readable(src, "src") as s:
        _unpack(d, s)


def packed(src: ReadableBuffer) -> bytearray:
    """Returns one-per-byte tags `src` packed, in a new bytearray (see `pack`)."""
    with _readable(src, "src") as s:
        out = bytearray(len(s) // 2)
        with _writable(out, "dst") as d:
            _pack(d, s)
    return out


def unpacked(src: ReadableBuffer) -> bytearray:
    """Returns packed tags `src` unpacked, one per byte, in a new bytearray (see `unpack`)."""
    with _readable(src, "src") as s:
        out = bytearray(2 * len(s))
        with _writable(out, "dst") as d:
            _unpack(d, s)
    return out


def _pack(d: Any, s: Any) -> None:
    if len(s) % 2:
        raise ValueError(f"src must hold an even number of tags, got {len(s)}")
    if len(d) != len(s) // 2:
        raise ValueError(f"dst must be {len(s) // 2} bytes to pack {len(s)} tags, got {len(d)}")
    _check_disjoint(d, "dst", s, "src")
    lib.kt_pack(d, s, len(s))


def _unpack(d: Any, s: Any) -> None:
    if len(d) != 2 * len(s):
        raise ValueError(
            f"dst must be {2 * len(s)} bytes to unpack {len(s)} packed bytes, got {len(d)}"
        )
    _check_disjoint(d, "dst", s, "src")
    lib.kt_unpack(d, s, len(d))


# --- packed storage ------------------------------------------------------------------------------


def is_zero(buf: ReadableBuffer) -> bool:
    """True if every byte of `buf` is zero (also when it is empty)."""
    with _readable(buf, "buf") as b:
        return bool(lib.kt_is_zero(b, len(b)))


def fill(packed: WriteableBuffer, first_granule: int, ngranules: int, tag: int) -> None:
    """Sets granules [first_granule, first_granule + ngranules) of packed storage to `tag`.

    Either end may fall in the middle of a byte; the neighbouring granule keeps its tag.

    Raises:
        ValueError: the range exceeds the buffer (2 granules per byte), tag not in 0..15,
            packed read-only.
    """
    tag = _check_tag(tag)
    with _writable(packed, "packed") as p:
        first, n = _check_range(first_granule, ngranules, 2 * len(p), "packed", "granule")
        lib.kt_fill(p, first, n, tag)


def fill_zero(buf: WriteableBuffer) -> None:
    """Zeroes every byte of `buf` (packed storage: every tag 0; a bitmap: every bit clear).

    Raises:
        ValueError: buf read-only.
    """
    with _writable(buf, "buf") as b:
        # All granules of a packed buffer to tag 0 is a memset of the whole buffer to zero.
        lib.kt_fill(b, 0, 2 * len(b), 0)


def find_mismatch(
    packed: ReadableBuffer, first_granule: int, ngranules: int, tag: int
) -> int | None:
    """Finds the first granule in a range of packed storage whose tag is not `tag`.

    Returns:
        Its index relative to first_granule, or None if every granule matches.

    Raises:
        ValueError: the range exceeds the buffer (2 granules per byte), tag not in 0..15.
    """
    tag = _check_tag(tag)
    with _readable(packed, "packed") as p:
        first, n = _check_range(first_granule, ngranules, 2 * len(p), "packed", "granule")
        index = int(lib.kt_find_mismatch(p, first, n, tag))
    return None if index == n else index


# --- bitmaps -------------------------------------------------------------------------------------


def zero_pages(bitmap: WriteableBuffer, buf: ReadableBuffer, page_bytes: int) -> None:
    """Marks which pages of `buf` are all zero: bit i of `bitmap` is set if page i is, else
    cleared. Bits past the last page are left alone.

    Args:
        bitmap: writable, at least one bit per page, not overlapping buf.
        buf: a whole number of pages.
        page_bytes: the page size, > 0.

    Raises:
        ValueError: page_bytes not positive, buf not a whole number of pages, bitmap too small,
            read-only or overlapping buf.
    """
    page_bytes = _count(page_bytes, "page_bytes")
    if page_bytes == 0:
        raise ValueError("page_bytes must be > 0")
    with _writable(bitmap, "bitmap") as bm, _readable(buf, "buf") as b:
        npages, rest = divmod(len(b), page_bytes)
        if rest:
            raise ValueError(
                f"buf ({len(b)} bytes) is not a whole number of {page_bytes}-byte pages"
            )
        if 8 * len(bm) < npages:
            raise ValueError(f"bitmap ({len(bm)} bytes) is too small for {npages} pages")
        _check_disjoint(bm, "bitmap", b, "buf")
        lib.kt_zero_pages(bm, b, npages, page_bytes)


def bitmap_andnot(bitmap: WriteableBuffer, mask: WriteableBuffer) -> int:
    """Clears the bits of `mask` in `bitmap`, and leaves in `mask` the bits actually cleared:
    KVM_CLEAR_DIRTY_LOG's core.

    Per 64-bit word: cleared = mask & bitmap; bitmap &= ~mask; mask = cleared.

    Returns:
        The number of bits cleared.

    Raises:
        ValueError: lengths unequal or not a multiple of 8 bytes, buffers not 8-byte aligned,
            read-only or overlapping.
    """
    with _writable(bitmap, "bitmap") as bm, _writable(mask, "mask") as m:
        if len(bm) != len(m):
            raise ValueError(f"bitmap ({len(bm)} bytes) and mask ({len(m)} bytes) differ in size")
        if len(bm) % _WORD_BYTES:
            raise ValueError(f"bitmaps must be a whole number of 64-bit words, got {len(bm)} bytes")
        for view, what in ((bm, "bitmap"), (m, "mask")):
            if _address(view) % _WORD_BYTES:
                raise ValueError(f"{what} must be 8-byte aligned (a word array)")
        _check_disjoint(bm, "bitmap", m, "mask")
        nwords = len(bm) // _WORD_BYTES
        return int(
            lib.kt_bitmap_andnot(ffi.cast("uint64_t *", bm), ffi.cast("uint64_t *", m), nwords)
        )


def bitmap_set(bitmap: WriteableBuffer, first: int, n: int) -> None:
    """Sets bits [first, first + n) of `bitmap`.

    Raises:
        ValueError: the range exceeds the bitmap (8 bits per byte), bitmap read-only.
    """
    with _writable(bitmap, "bitmap") as bm:
        first, n = _check_range(first, n, 8 * len(bm), "bitmap", "bit")
        lib.kt_bitmap_set(bm, first, n)


def bitmap_count(bitmap: ReadableBuffer, first: int, n: int) -> int:
    """Returns how many of bits [first, first + n) of `bitmap` are set.

    Raises:
        ValueError: the range exceeds the bitmap (8 bits per byte).
    """
    with _readable(bitmap, "bitmap") as bm:
        first, n = _check_range(first, n, 8 * len(bm), "bitmap", "bit")
        return int(lib.kt_bitmap_count(bm, first, n))


# --- copies that survive SIGBUS (memory a VMM may truncate under kvmtagd) -------------------------


def guarded_copy(dst: WriteableBuffer, src: ReadableBuffer) -> bool:
    """Copy src into dst (same length); False if either raised SIGBUS (a truncated file's
    page), in which case dst holds an unspecified prefix. Both are typically slices of an mmap
    of a VMM's memfd or hugetlbfs file."""
    d, s = _writable(dst, "dst"), _readable(src, "src")
    if len(d) != len(s):
        raise ValueError(f"dst is {len(d)} bytes, src {len(s)}")
    if lib.kt_guard_install() != 0:
        raise OSError(ffi.errno, "sigaction(SIGBUS)")
    return bool(lib.kt_guarded_copy(d, s, len(d)) == 0)


# --- the tag store: a page table over a slab of packed pages -------------------------------------
#
# cdefs/tagkernel.h describes the layout and the concurrency contract. The C functions trust the
# structs they are given, so only these two classes build them: a Slab's arenas are mapped before
# its slot_limit counts them, a PageTable's entries buffer holds its capacity, and a table only
# ever works with the slab it was made for (its entries name that slab's slots).


def _anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory: zero, and costing nothing until touched."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _resident(size: int) -> int:
    """`size` bytes rounded up to whole pages of the host (what touching them costs)."""
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def _power_of_two(value: int, what: str) -> int:
    value = operator.index(value)
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{what} must be a power of two, got {value}")
    return value


class Slab:
    """Packed page slots of `slot_bytes` each, in arenas of `arena_bytes` of anonymous memory.

    Slots are handed out by the C kernel in order (a page's on its first tagging with non-zero
    tags) and never given back; an arena's untouched tail costs no memory. `add_arena` maps the
    next arena when the kernel stops for want of a slot (`full`).
    """

    def __init__(self, slot_bytes: int, arena_bytes: int) -> None:
        """Raises ValueError unless slot_bytes is an even power of two and arena_bytes a power
        of two at least as large."""
        slot_bytes = _power_of_two(slot_bytes, "slot_bytes")
        arena_bytes = _power_of_two(arena_bytes, "arena_bytes")
        if slot_bytes < 2 or arena_bytes < slot_bytes:
            raise ValueError(f"slot_bytes {slot_bytes} must be even and <= arena_bytes")
        self.slot_bytes = slot_bytes
        self.arena_bytes = arena_bytes
        self.slots_per_arena = arena_bytes // slot_bytes
        # A slot's value in a table is slot + 1, below KT_ZERO; at most 2^16 arenas (4 MiB
        # arenas: 256 GiB of packed tags, 8 TiB of memory with 4 KiB pages).
        self.max_arenas = min(1 << 16, (ZERO - 1) // self.slots_per_arena)
        self._arenas: list[Any] = []  # uint8_t[] views; each holds its mmap, exported for good
        self._pointers: Any = None  # the arenas' addresses, mapped with the first arena
        self._c = ffi.new("struct kt_slab *")
        self._c.max_arenas = self.max_arenas
        self._c.arena_shift = self.slots_per_arena.bit_length() - 1
        self._c.slot_bytes = slot_bytes

    @property
    def nslots(self) -> int:
        """Slots handed out."""
        return int(self._c.nslots)

    @property
    def slot_limit(self) -> int:
        """Slots in mapped arenas."""
        return int(self._c.slot_limit)

    @property
    def full(self) -> bool:
        return self.nslots >= self.slot_limit

    @property
    def narenas(self) -> int:
        return len(self._arenas)

    def add_arena(self) -> None:
        """Maps one more arena of fresh (zero) slots.

        Raises:
            MemoryError: the slab has max_arenas already.
        """
        if len(self._arenas) >= self.max_arenas:
            raise MemoryError(f"a slab holds at most {self.max_arenas} arenas")
        if self._pointers is None:
            # Mapped once for max_arenas, it never moves: readers without the lock may use it
            # while an arena is added. Untouched, its tail costs nothing.
            size = self.max_arenas * ffi.sizeof("uint8_t *")
            self._pointers = ffi.from_buffer("uint8_t *[]", _anonymous(size), require_writable=True)
            self._c.arenas = self._pointers
        arena = _anonymous(self.arena_bytes)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            # Transparent huge pages would make a backing's partly used arena cost 2 MiB.
            with contextlib.suppress(OSError):  # EINVAL: a kernel without them
                arena.madvise(mmap.MADV_NOHUGEPAGE)
        view = ffi.from_buffer("uint8_t[]", arena, require_writable=True)
        self._pointers[len(self._arenas)] = view  # mapped before slot_limit counts its slots
        self._arenas.append(view)
        self._c.slot_limit = len(self._arenas) * self.slots_per_arena

    def packed_slot(self, slot: int) -> bytes:
        """A copy of the packed bytes of a slot handed out (for tests and debugging)."""
        slot = _count(slot, "slot")
        if slot >= self.nslots:
            raise ValueError(f"slot {slot} not handed out: the slab has {self.nslots}")
        arena, index = divmod(slot, self.slots_per_arena)
        start = index * self.slot_bytes
        return bytes(ffi.buffer(self._arenas[arena])[start : start + self.slot_bytes])

    @property
    def nbytes(self) -> int:
        """Memory the slab holds: full arenas, the used part of the last one (in host pages),
        and the pointers' pages."""
        if not self._arenas:
            return 0
        last_used = self.nslots - (len(self._arenas) - 1) * self.slots_per_arena
        return (
            (len(self._arenas) - 1) * _resident(self.arena_bytes)
            + _resident(last_used * self.slot_bytes)
            + _resident(len(self._arenas) * ffi.sizeof("uint8_t *"))
        )


class PageTable:
    """One region's page table: 32-bit page keys to slots of `slab`, or "tagged, all zero".

    An open-addressing hash table in anonymous memory (cdefs/tagkernel.h). Its capacity never
    changes: `grown` makes a larger copy, and the caller swaps it in and drops this one. A
    reader that still holds this one keeps its memory alive (Python frees the mapping only when
    the last reference goes), and no writer touches it again: that is what makes lock-free
    readers safe across a resize.

    The writing methods stop early when the table is `full` (count reached max_count) or the
    slab is: they return what they did, and the caller grows one or the other and goes on.
    """

    LOAD_FACTOR = (3, 4)
    """max_count = capacity * 3 / 4: linear probing's probes stay short (about 2.5 on a hit,
    8.5 on a miss at the worst), and a doubled table is then at most 3/8 full."""

    MIN_CAPACITY = 2 << GROUP_BITS

    def __init__(self, slab: Slab, capacity: int) -> None:
        """Raises ValueError unless capacity is a power of two >= MIN_CAPACITY."""
        capacity = _power_of_two(capacity, "capacity")
        if capacity < self.MIN_CAPACITY:
            raise ValueError(f"capacity must be >= {self.MIN_CAPACITY}, got {capacity}")
        if not isinstance(slab, Slab):
            raise TypeError(f"slab must be a Slab, not {type(slab).__name__}")
        self.slab = slab
        self._entries = ffi.from_buffer(
            "uint64_t[]", _anonymous(capacity * ffi.sizeof("uint64_t")), require_writable=True
        )
        num, den = self.LOAD_FACTOR
        self._c = ffi.new("struct kt_table *")
        self._c.entries = self._entries
        self._c.capacity = capacity
        groups = capacity >> GROUP_BITS
        self._c.hash_shift = 64 - (groups.bit_length() - 1)
        self._c.max_count = capacity * num // den

    @property
    def capacity(self) -> int:
        return int(self._c.capacity)

    @property
    def count(self) -> int:
        """Pages in the table: every page ever tagged in this region."""
        return int(self._c.count)

    @property
    def max_count(self) -> int:
        return int(self._c.max_count)

    @property
    def full(self) -> bool:
        return self.count >= self.max_count

    @property
    def nbytes(self) -> int:
        """Memory the table may hold: all its entries (hashing spreads pages over all of them,
        so a table a few percent full has touched nearly every page of its memory)."""
        return _resident(self.capacity * ffi.sizeof("uint64_t"))

    def grown(self) -> PageTable:
        """A table of twice the capacity with the same entries (this one is left unchanged)."""
        new = PageTable(self.slab, 2 * self.capacity)
        lib.kt_table_rehash(new._c, self._c)
        return new

    def entries(self) -> bytes:
        """A copy of the raw entries (for tests and debugging): little-endian words
        key | value << 32 on little-endian hosts."""
        return bytes(ffi.buffer(self._entries))

    def value(self, key: int) -> int:
        """The value stored for a key: EMPTY (never tagged), ZERO (tagged, all zero, no slot)
        or slot + 1."""
        return int(lib.kt_table_get(self._c, _check_keys(key, 0)))

    def is_tagged(self, key: int) -> bool:
        return self.value(key) != EMPTY

    def read(self, key: int, dst: WriteableBuffer) -> None:
        """Unpacked tags (one per byte) of the pages from `key` on into `dst`, a whole number
        of pages (2 * slot_bytes each); untagged pages read as zero.

        Raises:
            ValueError: dst not a whole number of pages, read-only, or past the region's end.
        """
        with _writable(dst, "dst") as d:
            npages = self._pages(len(d), 2 * self.slab.slot_bytes, "dst")
            lib.kt_store_read(self._c, self.slab._c, _check_keys(key, npages), npages, d)

    def read_packed(self, key: int, dst: WriteableBuffer) -> None:
        """Packed tags (slot_bytes a page) of the pages from `key` on into `dst`."""
        with _writable(dst, "dst") as d:
            npages = self._pages(len(d), self.slab.slot_bytes, "dst")
            lib.kt_store_read_packed(self._c, self.slab._c, _check_keys(key, npages), npages, d)

    def write(self, key: int, src: ReadableBuffer) -> int:
        """Sets the tags of the pages from `key` on from one-per-byte `src` (a whole number of
        pages) and marks them tagged; a page without a slot whose new tags are all zero gets
        none.

        Returns:
            The number of pages written: fewer than `src` holds when the table or the slab is
            full (grow it and call again with the rest).
        """
        with _readable(src, "src") as s:
            npages = self._pages(len(s), 2 * self.slab.slot_bytes, "src")
            key = _check_keys(key, npages)
            return int(lib.kt_store_write(self._c, self.slab._c, key, npages, s))

    def clear(self, key: int, npages: int) -> int:
        """Zeroes the tags of `npages` pages from `key` on and marks them tagged.

        Returns:
            The number of pages done: fewer than npages when the table is full.
        """
        npages = _count(npages, "npages")
        key = _check_keys(key, npages)
        return int(lib.kt_store_clear(self._c, self.slab._c, key, npages))

    def fill(self, key: int, first_granule: int, ngranules: int, tag: int) -> bool:
        """Sets granules [first_granule, first_granule + ngranules) of one page to `tag` and
        marks the page tagged (its other granules keep their tags, zero if it had none).

        Returns:
            False, with nothing changed, when the table or the slab is full.
        """
        tag = _check_tag(tag)
        first, n = _check_range(
            first_granule, ngranules, 2 * self.slab.slot_bytes, "a page", "granule"
        )
        return bool(lib.kt_store_fill(self._c, self.slab._c, _check_keys(key, 1), first, n, tag))

    def find_mismatch(self, key: int, first_granule: int, ngranules: int, tag: int) -> int | None:
        """The first granule of [first_granule, first_granule + ngranules) of one page whose
        tag is not `tag`, relative to first_granule; None if all match."""
        tag = _check_tag(tag)
        first, n = _check_range(
            first_granule, ngranules, 2 * self.slab.slot_bytes, "a page", "granule"
        )
        index = int(
            lib.kt_store_find_mismatch(self._c, self.slab._c, _check_keys(key, 1), first, n, tag)
        )
        return None if index == n else index

    @staticmethod
    def _pages(size: int, page_bytes: int, what: str) -> int:
        npages, rest = divmod(size, page_bytes)
        if rest:
            raise ValueError(
                f"{what} ({size} bytes) is not a whole number of {page_bytes}-byte pages"
            )
        return npages


def _check_keys(key: int, npages: int) -> int:
    """Checks that keys [key, key + npages) are 32-bit (a key alone: npages 0 or 1)."""
    key = _count(key, "key")
    if key + max(npages, 1) > KEYS_PER_TABLE:
        raise ValueError(
            f"keys [{key}, {key + npages}) out of range: a page table's keys are 32-bit"
        )
    return key
