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
 * The tag store's structs (below) are built only by the facade's Slab and
 * PageTable classes, which keep them consistent with the memory they name.
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

/*
 * THE TAG STORE: A PAGE TABLE OVER A SLAB OF PACKED PAGES
 * =======================================================
 * One backing's tags (kvmtag/tagstore.py) are a slab of packed page slots and,
 * per region of 2^32 pages, an open-addressing hash table from the page's
 * 32-bit key (its index within the region) to its slot.
 *
 * Slab: slot s holds slot_bytes packed bytes (PAGE_SIZE / 32) at
 *     arenas[s >> arena_shift] + (s & ((1 << arena_shift) - 1)) * slot_bytes.
 * Slots are handed out in order (nslots is the next one) and never given back,
 * so a slot not yet handed out is all zero (arenas are fresh anonymous
 * memory). Slots [0, slot_limit) are mapped; the inserting functions stop
 * before handing out slot_limit, so Python can map an arena and call again.
 *
 * Table: capacity 64-bit entries, capacity a power of two. An entry is
 *     key | (uint64_t)value << 32
 * with value KT_EMPTY (0: a free entry; the whole word is then 0, so a zeroed
 * buffer is an empty table), KT_ZERO (the page is tagged and all its tags are
 * zero: it has no slot), or s + 1 for a page whose tags are in slot s.
 * Entries are never removed. A key's home entry keeps the low KT_GROUP_BITS
 * bits of the key and hashes the rest (Fibonacci hashing), so 64 consecutive
 * pages have their home entries side by side in 512 bytes, and a copy of a
 * range of pages takes one cache miss per 64 pages, not one per page (8 per
 * group: ~2.5x slower; 256: no faster, and longer probes after a collision of
 * two groups); collisions probe linearly. The inserting
 * functions stop before count would exceed max_count (< capacity: the table
 * always keeps a free entry, which ends every probe), so Python can grow the
 * table (kt_table_rehash into a new one) and call again.
 *
 * Concurrency: one writer at a time per table and slab (the caller's lock);
 * any number of readers without a lock. A writer stores a whole entry with
 * one aligned 64-bit store, and readers load it with one load; a slot it
 * names is mapped before, and is either the page's old slot or a fresh one
 * (zero, as the page's tags were before). Tables a reader may still use are
 * never written again after Python replaces them. A reader racing a writer
 * sees each page's tags before or after the write, or partly written; never
 * memory outside the table and the slab.
 */

#define KT_GROUP_BITS 6
#define KT_EMPTY 0u
#define KT_ZERO 0xFFFFFFFFu

struct kt_slab {
    uint8_t **arenas;     /* max_arenas pointers; those of mapped arenas set */
    size_t max_arenas;
    unsigned arena_shift; /* slots per arena = 1 << arena_shift */
    size_t slot_bytes;    /* packed bytes per page: even, > 0 */
    size_t nslots;        /* slots handed out */
    size_t slot_limit;    /* slots mapped; <= max_arenas << arena_shift */
};

struct kt_table {
    uint64_t *entries;    /* capacity entries */
    size_t capacity;      /* a power of two, >= 2 << KT_GROUP_BITS */
    unsigned hash_shift;  /* 64 - log2(capacity >> KT_GROUP_BITS) */
    size_t count;         /* entries in use */
    size_t max_count;     /* < capacity */
};

/* The value stored for key: KT_EMPTY if the page was never tagged. */
uint32_t kt_table_get(const struct kt_table *t, uint32_t key);

/* Insert every entry of src into dst, which is empty and large enough
 * (src->count <= dst->max_count). */
void kt_table_rehash(struct kt_table *restrict dst, const struct kt_table *restrict src);

/* Unpacked (one per byte) tags of the npages pages from key on into dst
 * (npages * 2 * slot_bytes bytes); pages never tagged or zero read as 0.
 * key + npages <= 2^32. */
void kt_store_read(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                   size_t npages, uint8_t *restrict dst);

/* The same, packed: npages * slot_bytes bytes. */
void kt_store_read_packed(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                          size_t npages, uint8_t *restrict dst);

/* Set the tags of the npages pages from key on from one-per-byte src (high
 * nibbles ignored) and mark them tagged; a page that has no slot and whose new
 * tags are all zero gets none (KT_ZERO). Returns the pages done: fewer than
 * npages when the next page needed a table entry (count == max_count) or a
 * slot (nslots == slot_limit). */
size_t kt_store_write(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages,
                      const uint8_t *restrict src);

/* Zero the tags of the npages pages from key on and mark them tagged (a slot
 * is kept and zeroed; a page without one becomes KT_ZERO). Returns the pages
 * done: fewer than npages when the next page needed a table entry. */
size_t kt_store_clear(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages);

/* Set granules [first_granule, first_granule + ngranules) of one page to the
 * low nibble of tag and mark the page tagged (its other granules keep their
 * tags: zero if it had none). first_granule + ngranules <= 2 * slot_bytes.
 * Returns 1, or 0 with nothing changed when it needed a table entry or a
 * slot. */
int kt_store_fill(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t first_granule,
                  size_t ngranules, unsigned tag);

/* kt_find_mismatch on granules [first_granule, first_granule + ngranules) of
 * one page (all zero if it has no slot). first_granule + ngranules <=
 * 2 * slot_bytes. */
size_t kt_store_find_mismatch(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                              size_t first_granule, size_t ngranules, unsigned tag);

#endif /* KVMTAG_TAGKERNEL_H */
