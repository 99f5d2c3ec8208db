"""Page bitmaps as Python integers: bit i is page i of a window (Linux bitmap order when
converted with `from_bytes` / `to_bytes`, as the dirty log and the stream format use them).

Integers keep set operations (present & ~zero, coverage |= …) in C, and `runs` walks a bitmap
one run of set bits at a time, never one page at a time: bulk paths loop per run.
"""

from __future__ import annotations

from collections.abc import Iterator


def words_bytes(nbits: int) -> int:
    """Bytes of a bitmap of nbits bits in whole 64-bit words: ALIGN(nbits, 64) / 8."""
    return -(-nbits // 64) * 8


def mask(nbits: int) -> int:
    """The first nbits bits set."""
    return (1 << nbits) - 1


def from_bytes(data: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(data, "little")


def to_bytes(bits: int, nbits: int) -> bytes:
    """`bits` as a bitmap of ALIGN(nbits, 64) / 8 bytes (bits >= nbits must be clear)."""
    return bits.to_bytes(words_bytes(nbits), "little")


def runs(bits: int) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of set bits, in ascending order."""
    at = 0
    while bits:
        low = (bits & -bits).bit_length() - 1  # trailing zeros
        bits >>= low
        at += low
        count = (bits ^ (bits + 1)).bit_length() - 1  # trailing ones
        yield at, count
        bits >>= count
        at += count


def spans(bits: int, max_gap: int, max_len: int) -> Iterator[tuple[int, int]]:
    """(first, count) of ranges covering every set bit: runs closer than max_gap clear bits are
    merged, and no range is longer than max_len (a longer run is split). Used to fetch tags in
    large batches: a few clean pages' tags cost less than another ioctl."""
    start = end = -1
    for first, count in runs(bits):
        if start >= 0 and first - end <= max_gap and first + count - start <= max_len:
            end = first + count
            continue
        if start >= 0:
            yield from _split(start, end - start, max_len)
        start, end = first, first + count
    if start >= 0:
        yield from _split(start, end - start, max_len)


def _split(first: int, count: int, max_len: int) -> Iterator[tuple[int, int]]:
    for at in range(first, first + count, max_len):
        yield at, min(max_len, first + count - at)


def popcount(bits: int) -> int:
    return bits.bit_count()
