"""Dirty bitmaps: one bit per host page of a logging memslot, Linux bitmap order.

Bit i of a slot's bitmap lives in byte i/8 at (1 << i%8), in 64-bit words (the kernel's
BITS_PER_LONG on arm64): a slot of npages has ALIGN(npages, 64)/8 bytes, and the tail bits of
the last word are always zero. Callers hold the VM's dirty lock around these (the kernel uses
atomic bit operations; the C kernel runs without the GIL).
"""

from __future__ import annotations

from kvmtag import tagkernel


def bitmap_bytes(npages: int) -> int:
    return -(-npages // 64) * 8


def new_bitmap(npages: int, initially_set: bool) -> bytearray:
    """A slot's bitmap when logging starts: empty, or with every page's bit set
    (KVM_DIRTY_LOG_INITIALLY_SET)."""
    bitmap = bytearray(bitmap_bytes(npages))
    if initially_set:
        tagkernel.bitmap_set(bitmap, 0, npages)
    return bitmap


def mark(bitmap: bytearray, page: int) -> None:
    bitmap[page >> 3] |= 1 << (page & 7)


def fetch_and_clear(bitmap: bytearray) -> bytes:
    """Get-and-clear mode: the bits, which are then cleared (and the pages re-protected)."""
    bits = bytes(bitmap)
    tagkernel.fill_zero(bitmap)
    return bits


def clear_masked(bitmap: bytearray, first_page: int, mask: bytearray) -> int:
    """Clear the bits set both in `mask` (covering pages from first_page, a multiple of 64) and
    in the slot's bitmap. `mask` is left holding the bits actually cleared; returns their count.
    """
    start = first_page // 8
    words = memoryview(bitmap)[start : start + len(mask)]
    return tagkernel.bitmap_andnot(words, mask)
