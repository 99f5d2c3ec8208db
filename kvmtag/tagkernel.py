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

The GIL: cffi releases it around every call into `lib` (the generated kvmtag/_tagkernel.c wraps
each call in Py_BEGIN_ALLOW_THREADS / Py_END_ALLOW_THREADS), so a pack of 64 MiB never blocks
other Python threads. The buffers stay exported for the whole call (the `with` blocks below):
nobody can resize a bytearray or close an mmap under the C code, and the export is released
as soon as the call returns, even when it raises.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

# The cffi extension ships no type information: `ffi` and `lib` are Any to mypy.
from kvmtag._tagkernel import ffi, lib  # type: ignore[import-not-found]

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "MAX_TAG",
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
