/*
 * tagkernel.h - the bulk work of kvmtag's tag store, in pure C99.
 *
 * PACKED NIBBLE ORDER
 * ===================
 * A packed tag buffer holds two MTE tags per byte. Byte k holds
 *
 *     granule 2k   in its LOW  nibble  (bits 0-3)
 *     granule 2k+1 in its HIGH nibble  (bits 4-7)
 *
 * so granule g lives in byte g / 2, at shift 4 * (g % 2).
 * Example: one-per-byte tags {0x1, 0x2} pack to {0x21}.
 *
 * The unpacked format is KVM_ARM_MTE_COPY_TAGS's: one tag per byte, one byte per
 * 16-byte granule. Readers of that format ignore the high nibble of every byte
 * (the kernel does the same); writers emit bytes 0x0..0xF.
 *
 * BITMAP ORDER
 * ============
 * Bitmaps are Linux little-endian bitmaps (the dirty log's order): bit i lives
 * in byte i / 8, as (1 << (i % 8)). kt_bitmap_andnot works on 64-bit words of
 * such a bitmap: it is bitwise, so byte order does not matter to it.
 *
 * CONTRACT
 * ========
 * Nothing here allocates, locks or fails: Python owns every buffer, and the
 * facade (kvmtag/tagkernel.py) checks every length and index against the
 * buffers' sizes before calling, so these functions trust their arguments.
 * Output buffers never overlap input buffers (restrict). uint64_t pointers are
 * 8-byte aligned.
 */
#ifndef KVMTAG_TAGKERNEL_H
#define KVMTAG_TAGKERNEL_H

#include <stddef.h>
#include <stdint.h>

/* Pack ngranules one-per-byte tags from src into ngranules / 2 bytes at dst.
 * ngranules is even. The high nibble of each source byte is ignored. */
void kt_pack(uint8_t *restrict dst, const uint8_t *restrict src, size_t ngranules);

/* Unpack ngranules / 2 packed bytes from src into ngranules one-per-byte tags
 * at dst (each 0x0..0xF). ngranules is even. */
void kt_unpack(uint8_t *restrict dst, const uint8_t *restrict src, size_t ngranules);

/* 1 if all len bytes of buf are zero (also when len is 0), else 0. */
int kt_is_zero(const uint8_t *buf, size_t len);

/* Set granules [first_granule, first_granule + ngranules) of a packed buffer to
 * the low nibble of tag. Either end may fall in the middle of a byte; the
 * other nibble of that byte is kept. */
void kt_fill(uint8_t *packed, size_t first_granule, size_t ngranules, unsigned tag);

/* Index, relative to first_granule, of the first granule in
 * [first_granule, first_granule + ngranules) of a packed buffer whose tag
 * differs from the low nibble of tag; ngranules if they all match. */
size_t kt_find_mismatch(const uint8_t *packed, size_t first_granule, size_t ngranules,
                        unsigned tag);

/* For each i < npages, set bit i of bitmap if buf[i * page_bytes ...
 * (i + 1) * page_bytes) is all zero, and clear it otherwise. Bits from npages
 * on are left alone. */
void kt_zero_pages(uint8_t *restrict bitmap, const uint8_t *restrict buf, size_t npages,
                   size_t page_bytes);

/* KVM_CLEAR_DIRTY_LOG's core. For each of nwords words:
 *     cleared = mask & bitmap;  bitmap &= ~mask;  mask = cleared;
 * so mask ends up holding the bits actually cleared. Returns how many. */
size_t kt_bitmap_andnot(uint64_t *restrict bitmap, uint64_t *restrict mask, size_t nwords);

/* Set bits [first, first + n) of bitmap. */
void kt_bitmap_set(uint8_t *bitmap, size_t first, size_t n);

/* Number of set bits among bits [first, first + n) of bitmap. */
size_t kt_bitmap_count(const uint8_t *bitmap, size_t first, size_t n);

#endif /* KVMTAG_TAGKERNEL_H */
