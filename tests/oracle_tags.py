"""A slow, obviously correct reference of every tag-kernel routine: the tests' oracle.

Written from the definitions, not from the C: one granule or one bit at a time, pure functions
on bytes that return new values (the kernel works in place). Never use it on a hot path.

Definitions:

- one-per-byte tags: granule g's tag is the low nibble of byte g;
- packed tags: granule g's tag is nibble g % 2 of byte g // 2 (0 = low, 1 = high);
- bitmaps: bit i is (1 << i % 8) of byte i // 8.
"""

from __future__ import annotations

TAG_MASK = 0xF


# --- single granules and bits --------------------------------------------------------------------


def get_tag(packed: bytes | bytearray, granule: int) -> int:
    """The tag of `granule` in packed storage."""
    byte = packed[granule // 2]
    if granule % 2 == 0:
        return byte & TAG_MASK
    return byte >> 4


def set_tag(packed: bytearray, granule: int, tag: int) -> None:
    """Sets the tag of `granule` in packed storage, keeping the other nibble of its byte."""
    index = granule // 2
    if granule % 2 == 0:
        packed[index] = (packed[index] & 0xF0) | tag
    else:
        packed[index] = (packed[index] & 0x0F) | (tag << 4)


def get_bit(bitmap: bytes | bytearray, i: int) -> bool:
    return bitmap[i // 8] & (1 << (i % 8)) != 0


def put_bit(bitmap: bytearray, i: int, value: bool) -> None:
    if value:
        bitmap[i // 8] |= 1 << (i % 8)
    else:
        bitmap[i // 8] &= ~(1 << (i % 8)) & 0xFF


# --- the routines --------------------------------------------------------------------------------


def pack(src: bytes) -> bytes:
    """One-per-byte tags (high nibbles ignored) → packed; len(src) is even."""
    assert len(src) % 2 == 0
    out = bytearray(len(src) // 2)
    for granule, byte in enumerate(src):
        set_tag(out, granule, byte & TAG_MASK)
    return bytes(out)


def unpack(packed: bytes) -> bytes:
    """Packed → one-per-byte tags, each 0x0..0xF."""
    return bytes(get_tag(packed, granule) for granule in range(2 * len(packed)))


def is_zero(buf: bytes) -> bool:
    return all(byte == 0 for byte in buf)


def fill(packed: bytes, first_granule: int, ngranules: int, tag: int) -> bytes:
    out = bytearray(packed)
    for granule in range(first_granule, first_granule + ngranules):
        set_tag(out, granule, tag)
    return bytes(out)


def find_mismatch(packed: bytes, first_granule: int, ngranules: int, tag: int) -> int | None:
    for i in range(ngranules):
        if get_tag(packed, first_granule + i) != tag:
            return i
    return None


def zero_pages(bitmap: bytes, buf: bytes, page_bytes: int) -> bytes:
    out = bytearray(bitmap)
    for page in range(len(buf) // page_bytes):
        start = page * page_bytes
        put_bit(out, page, is_zero(buf[start : start + page_bytes]))
    return bytes(out)


def bitmap_andnot(bitmap: bytes, mask: bytes) -> tuple[bytes, bytes, int]:
    """Returns (new bitmap, new mask = the bits actually cleared, how many were cleared)."""
    new_bitmap, cleared = bytearray(bitmap), bytearray(len(mask))
    count = 0
    for i in range(8 * len(bitmap)):
        if get_bit(mask, i) and get_bit(bitmap, i):
            put_bit(new_bitmap, i, False)
            put_bit(cleared, i, True)
            count += 1
    return bytes(new_bitmap), bytes(cleared), count


def bitmap_set(bitmap: bytes, first: int, n: int) -> bytes:
    out = bytearray(bitmap)
    for i in range(first, first + n):
        put_bit(out, i, True)
    return bytes(out)


def bitmap_count(bitmap: bytes, first: int, n: int) -> int:
    return sum(1 for i in range(first, first + n) if get_bit(bitmap, i))
