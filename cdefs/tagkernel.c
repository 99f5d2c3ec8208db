/*
 * tagkernel.c - see tagkernel.h for the packed nibble order and the contract.
 *
 * Pure C99: no allocation, no intrinsics, no compiler builtins. The hot loops
 * are plain byte loops written so that gcc -O3 vectorises them (SSE2 on
 * x86-64, NEON on arm64): measured on 64 MiB, they run as fast as hand-written
 * SSE2 and ~2.5x faster than 64-bit SWAR word tricks, which gcc cannot
 * vectorise (kvmtag/bench.py measures them against memcpy).
 */
#include "tagkernel.h"

#include <string.h>

/* Bytes scanned between early-exit checks by the "any difference?" loops: big
 * enough for the OR-reduction to vectorise and amortise its final horizontal
 * step, small enough that a difference near the start is found at once. */
#define KT_BLOCK 256

/* Low-nibble mask and the byte holding one tag in both nibbles. */
#define KT_NIBBLE 0x0Fu
#define KT_BOTH(t) ((uint8_t)((t) * 0x11u))

void kt_pack(uint8_t *restrict dst, const uint8_t *restrict src, size_t ngranules)
{
    const size_t nbytes = ngranules / 2;

    for (size_t k = 0; k < nbytes; k++)
        dst[k] = (uint8_t)((src[2 * k] & KT_NIBBLE) | (src[2 * k + 1] << 4));
}

void kt_unpack(uint8_t *restrict dst, const uint8_t *restrict src, size_t ngranules)
{
    const size_t nbytes = ngranules / 2;

    for (size_t k = 0; k < nbytes; k++) {
        dst[2 * k] = (uint8_t)(src[k] & KT_NIBBLE);
        dst[2 * k + 1] = (uint8_t)(src[k] >> 4);
    }
}

/* 1 if the KT_BLOCK bytes at buf are all equal to byte (a vectorised
 * OR-reduction of XORs with no early exit inside the block). */
static int kt_block_equals(const uint8_t *buf, uint8_t byte)
{
    uint8_t acc = 0;

    for (size_t j = 0; j < KT_BLOCK; j++)
        acc |= (uint8_t)(buf[j] ^ byte);
    return acc == 0;
}

int kt_is_zero(const uint8_t *buf, size_t len)
{
    size_t i = 0;
    uint8_t acc = 0;

    for (; i + KT_BLOCK <= len; i += KT_BLOCK)
        if (!kt_block_equals(buf + i, 0))
            return 0;
    for (; i < len; i++)
        acc |= buf[i];
    return acc == 0;
}

void kt_fill(uint8_t *packed, size_t first_granule, size_t ngranules, unsigned tag)
{
    const uint8_t t = (uint8_t)(tag & KT_NIBBLE);

    if (ngranules == 0)
        return;
    if (first_granule % 2) { /* odd start: the high nibble of a shared byte */
        uint8_t *p = packed + first_granule / 2;
        *p = (uint8_t)((*p & KT_NIBBLE) | (t << 4));
        first_granule++;
        ngranules--;
    }
    memset(packed + first_granule / 2, KT_BOTH(t), ngranules / 2);
    if (ngranules % 2) { /* odd end: the low nibble of a shared byte */
        uint8_t *p = packed + first_granule / 2 + ngranules / 2;
        *p = (uint8_t)((*p & ~KT_NIBBLE) | t);
    }
}

size_t kt_find_mismatch(const uint8_t *packed, size_t first_granule, size_t ngranules,
                        unsigned tag)
{
    const uint8_t t = (uint8_t)(tag & KT_NIBBLE);
    const uint8_t both = KT_BOTH(t);
    const uint8_t *p;
    size_t done = 0; /* granules checked so far, relative to first_granule */
    size_t nbytes, b = 0;

    if (ngranules == 0)
        return 0;
    if (first_granule % 2) { /* odd start: the high nibble of a shared byte */
        if ((packed[first_granule / 2] >> 4) != t)
            return 0;
        done = 1;
    }
    /* Whole bytes: skip matching blocks fast, then find the byte that differs. */
    p = packed + (first_granule + done) / 2;
    nbytes = (ngranules - done) / 2;
    for (; b + KT_BLOCK <= nbytes; b += KT_BLOCK)
        if (!kt_block_equals(p + b, both))
            break;
    for (; b < nbytes; b++) {
        const uint8_t diff = (uint8_t)(p[b] ^ both);
        if (diff)
            return done + 2 * b + ((diff & KT_NIBBLE) ? 0 : 1);
    }
    done += 2 * nbytes;
    if (done < ngranules && (p[nbytes] & KT_NIBBLE) != t) /* odd end: a low nibble */
        return done;
    return ngranules;
}

void kt_zero_pages(uint8_t *restrict bitmap, const uint8_t *restrict buf, size_t npages,
                   size_t page_bytes)
{
    for (size_t i = 0; i < npages; i++) {
        const uint8_t bit = (uint8_t)(1u << (i % 8));

        if (kt_is_zero(buf + i * page_bytes, page_bytes))
            bitmap[i / 8] |= bit;
        else
            bitmap[i / 8] &= (uint8_t)~bit;
    }
}

/* Population count of a 64-bit word (the classic SWAR sum; gcc turns it into
 * a popcnt instruction where the target has one). */
static size_t kt_popcount64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555u);
    x = (x & 0x3333333333333333u) + ((x >> 2) & 0x3333333333333333u);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Fu;
    return (size_t)((x * 0x0101010101010101u) >> 56);
}

size_t kt_bitmap_andnot(uint64_t *restrict bitmap, uint64_t *restrict mask, size_t nwords)
{
    size_t count = 0;

    for (size_t i = 0; i < nwords; i++) {
        const uint64_t cleared = mask[i] & bitmap[i];

        bitmap[i] &= ~mask[i];
        mask[i] = cleared;
        count += kt_popcount64(cleared);
    }
    return count;
}

/* Bits [lo, hi] (inclusive, both < 8) of one byte. */
static uint8_t kt_bits(unsigned lo, unsigned hi)
{
    return (uint8_t)((0xFFu << lo) & (0xFFu >> (7 - hi)));
}

void kt_bitmap_set(uint8_t *bitmap, size_t first, size_t n)
{
    size_t last, first_byte, last_byte;

    if (n == 0)
        return;
    last = first + n - 1;
    first_byte = first / 8;
    last_byte = last / 8;
    if (first_byte == last_byte) {
        bitmap[first_byte] |= kt_bits(first % 8, last % 8);
        return;
    }
    bitmap[first_byte] |= kt_bits(first % 8, 7);
    memset(bitmap + first_byte + 1, 0xFF, last_byte - first_byte - 1);
    bitmap[last_byte] |= kt_bits(0, last % 8);
}

size_t kt_bitmap_count(const uint8_t *bitmap, size_t first, size_t n)
{
    size_t last, first_byte, last_byte, i, count;

    if (n == 0)
        return 0;
    last = first + n - 1;
    first_byte = first / 8;
    last_byte = last / 8;
    if (first_byte == last_byte)
        return kt_popcount64(bitmap[first_byte] & kt_bits(first % 8, last % 8));
    count = kt_popcount64(bitmap[first_byte] & kt_bits(first % 8, 7));
    count += kt_popcount64(bitmap[last_byte] & kt_bits(0, last % 8));
    /* Whole bytes in between, 8 at a time (memcpy: no alignment assumed). */
    for (i = first_byte + 1; i + 8 <= last_byte; i += 8) {
        uint64_t word;
        memcpy(&word, bitmap + i, sizeof word);
        count += kt_popcount64(word);
    }
    for (; i < last_byte; i++)
        count += kt_popcount64(bitmap[i]);
    return count;
}

/* --- the tag store: a page table over a slab of packed pages --------------
 *
 * Loads and stores of table entries go through volatile pointers: one 64-bit
 * access each, which the compiler may neither split nor repeat, since readers
 * run without a lock while a writer inserts (see tagkernel.h). */

#define KT_GROUP_MASK ((1u << KT_GROUP_BITS) - 1)

/* 2^64 / golden ratio, odd: Fibonacci hashing's multiplier. */
#define KT_FIBONACCI 0x9E3779B97F4A7C15u

/* The home entry of key: its group of 2^KT_GROUP_BITS consecutive keys hashed
 * to a group of as many entries, the key's low bits kept within it. */
static size_t kt_home(const struct kt_table *t, uint32_t key)
{
    const uint64_t group = key >> KT_GROUP_BITS;
    const size_t hashed = (size_t)((group * KT_FIBONACCI) >> t->hash_shift);

    return (hashed << KT_GROUP_BITS) | (key & KT_GROUP_MASK);
}

static uint32_t kt_value(uint64_t entry)
{
    return (uint32_t)(entry >> 32);
}

/* The index of key's entry, or of the free entry that ends its probe (where it
 * would be inserted); the entry itself in *entry. The table always has a free
 * entry (count <= max_count < capacity), so the probe ends. */
static size_t kt_find(const struct kt_table *t, uint32_t key, uint64_t *entry)
{
    const volatile uint64_t *entries = t->entries;
    const size_t mask = t->capacity - 1;
    size_t i = kt_home(t, key);

    for (;; i = (i + 1) & mask) {
        const uint64_t e = entries[i];

        if (kt_value(e) == KT_EMPTY || (uint32_t)e == key) {
            *entry = e;
            return i;
        }
    }
}

static void kt_put(struct kt_table *t, size_t i, uint32_t key, uint32_t value)
{
    volatile uint64_t *entries = t->entries;

    entries[i] = (uint64_t)key | (uint64_t)value << 32;
}

/* The packed bytes of the slot a value names (value is neither KT_EMPTY nor
 * KT_ZERO), or NULL if its arena is not mapped: never the case, since Python
 * maps an arena before any entry can name its slots, but a reader checks. */
static uint8_t *kt_slot(const struct kt_slab *s, uint32_t value)
{
    const size_t slot = (size_t)value - 1;
    uint8_t *arena = s->arenas[slot >> s->arena_shift];

    if (arena == NULL)
        return NULL;
    return arena + (slot & (((size_t)1 << s->arena_shift) - 1)) * s->slot_bytes;
}

/* The packed bytes of key's page, or NULL if it has none (never tagged, or
 * tagged with all tags zero). */
static const uint8_t *kt_lookup(const struct kt_table *t, const struct kt_slab *s, uint32_t key)
{
    uint64_t e;
    uint32_t v;

    kt_find(t, key, &e);
    v = kt_value(e);
    if (v == KT_EMPTY || v == KT_ZERO)
        return NULL;
    return kt_slot(s, v);
}

/* 1 if the low nibbles of the n one-per-byte tags at tags are all zero. */
static int kt_tags_zero(const uint8_t *tags, size_t n)
{
    uint8_t acc = 0;

    for (size_t j = 0; j < n; j++)
        acc |= tags[j];
    return (acc & KT_NIBBLE) == 0;
}

/* Hands out the next slot (fresh, so all zero): its value (slot + 1). The
 * caller checked that s->nslots < s->slot_limit. */
static uint32_t kt_new_slot(struct kt_slab *s)
{
    return (uint32_t)(++s->nslots);
}

uint32_t kt_table_get(const struct kt_table *t, uint32_t key)
{
    uint64_t e;

    kt_find(t, key, &e);
    return kt_value(e);
}

void kt_table_rehash(struct kt_table *restrict dst, const struct kt_table *restrict src)
{
    const size_t mask = dst->capacity - 1;

    for (size_t j = 0; j < src->capacity; j++) {
        const uint64_t e = src->entries[j];
        size_t i;

        if (kt_value(e) == KT_EMPTY)
            continue;
        for (i = kt_home(dst, (uint32_t)e); dst->entries[i]; i = (i + 1) & mask)
            ;
        dst->entries[i] = e;
        dst->count++;
    }
}

/* A run of pages whose tags are consecutive bytes: those of consecutive slots
 * of one arena (pages tagged in order), or none (zero). Copies go a run at a
 * time rather than a page at a time. */
struct kt_run {
    size_t first;          /* its first page, relative to the call's */
    size_t npages;
    const uint8_t *packed; /* its first page's packed tags, or NULL: all zero */
};

/* Extend run by page i, whose packed tags are at packed (NULL: zero), if it
 * continues the run; 0 if the run must be flushed and a new one started. */
static int kt_run_extend(struct kt_run *run, size_t i, const uint8_t *packed, size_t ppp)
{
    if (run->npages == 0 || run->first + run->npages != i)
        return 0;
    if (packed == NULL ? run->packed != NULL
                       : run->packed == NULL || packed != run->packed + run->npages * ppp)
        return 0;
    run->npages++;
    return 1;
}

/* The value of key's page when key - 1's entry was at *at: pages tagged in
 * order have their entries side by side (a group of a key shares its home
 * line), so the next entry is tried first. *at becomes key's entry, or the
 * free entry that ends its probe. */
static uint32_t kt_next_value(const struct kt_table *t, uint32_t key, size_t *at)
{
    const volatile uint64_t *entries = t->entries;
    const size_t next = (*at + 1) & (t->capacity - 1);
    const uint64_t e = entries[next];
    uint64_t found;

    if ((uint32_t)e == key && kt_value(e) != KT_EMPTY) {
        *at = next;
        return kt_value(e);
    }
    *at = kt_find(t, key, &found);
    return kt_value(found);
}

static void kt_flush_unpack(const struct kt_run *run, uint8_t *dst, size_t tpp)
{
    if (run->packed)
        kt_unpack(dst + run->first * tpp, run->packed, run->npages * tpp);
    else
        memset(dst + run->first * tpp, 0, run->npages * tpp);
}

static void kt_flush_copy(const struct kt_run *run, uint8_t *dst, size_t ppp)
{
    if (run->packed)
        memcpy(dst + run->first * ppp, run->packed, run->npages * ppp);
    else
        memset(dst + run->first * ppp, 0, run->npages * ppp);
}

/* The packed tags of a page whose value is v, or NULL if it has none. */
static const uint8_t *kt_packed_of(const struct kt_slab *s, uint32_t v)
{
    return v == KT_EMPTY || v == KT_ZERO ? NULL : kt_slot(s, v);
}

void kt_store_read(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                   size_t npages, uint8_t *restrict dst)
{
    const size_t ppp = s->slot_bytes;
    struct kt_run run = {0, 0, NULL};
    size_t at = kt_home(t, key) - 1; /* no previous entry: kt_next_value finds key */

    for (size_t i = 0; i < npages; i++) {
        const uint8_t *packed = kt_packed_of(s, kt_next_value(t, (uint32_t)(key + i), &at));

        if (!kt_run_extend(&run, i, packed, ppp)) {
            if (run.npages)
                kt_flush_unpack(&run, dst, 2 * ppp);
            run.first = i;
            run.npages = 1;
            run.packed = packed;
        }
    }
    if (run.npages)
        kt_flush_unpack(&run, dst, 2 * ppp);
}

void kt_store_read_packed(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                          size_t npages, uint8_t *restrict dst)
{
    const size_t ppp = s->slot_bytes;
    struct kt_run run = {0, 0, NULL};
    size_t at = kt_home(t, key) - 1;

    for (size_t i = 0; i < npages; i++) {
        const uint8_t *packed = kt_packed_of(s, kt_next_value(t, (uint32_t)(key + i), &at));

        if (!kt_run_extend(&run, i, packed, ppp)) {
            if (run.npages)
                kt_flush_copy(&run, dst, ppp);
            run.first = i;
            run.npages = 1;
            run.packed = packed;
        }
    }
    if (run.npages)
        kt_flush_copy(&run, dst, ppp);
}

/* Pack the one-per-byte tags of a run's pages into its slots (a run of
 * pages with slots only). */
static void kt_flush_pack(const struct kt_run *run, const uint8_t *src, size_t tpp)
{
    kt_pack((uint8_t *)run->packed, src + run->first * tpp, run->npages * tpp);
}

size_t kt_store_write(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages,
                      const uint8_t *restrict src)
{
    const size_t ppp = s->slot_bytes;
    const size_t tpp = 2 * ppp;
    struct kt_run run = {0, 0, NULL}; /* pages with slots, packed a run at a time */
    size_t at = kt_home(t, key) - 1;
    size_t i;

    for (i = 0; i < npages; i++) {
        const uint32_t k = (uint32_t)(key + i);
        const uint32_t v = kt_next_value(t, k, &at);
        const uint8_t *packed;
        uint32_t value;

        if (v == KT_EMPTY || v == KT_ZERO) { /* no slot yet */
            if (v == KT_EMPTY && t->count >= t->max_count)
                break;
            if (kt_tags_zero(src + i * tpp, tpp)) {
                if (v == KT_EMPTY) {
                    t->count++;
                    kt_put(t, at, k, KT_ZERO);
                }
                continue;
            }
            if (s->nslots >= s->slot_limit)
                break;
            /* A reader may see the entry before the tags are packed: it then reads
             * the fresh slot's zeros, the page's tags before this write. */
            value = kt_new_slot(s);
            if (v == KT_EMPTY)
                t->count++;
            kt_put(t, at, k, value);
        } else {
            value = v;
        }
        packed = kt_slot(s, value);
        if (!kt_run_extend(&run, i, packed, ppp)) {
            if (run.npages)
                kt_flush_pack(&run, src, tpp);
            run.first = i;
            run.npages = 1;
            run.packed = packed;
        }
    }
    if (run.npages)
        kt_flush_pack(&run, src, tpp);
    return i;
}

size_t kt_store_clear(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages)
{
    for (size_t i = 0; i < npages; i++) {
        const uint32_t k = (uint32_t)(key + i);
        uint64_t e;
        const size_t at = kt_find(t, k, &e);
        const uint32_t v = kt_value(e);

        if (v == KT_ZERO)
            continue;
        if (v != KT_EMPTY) {
            memset(kt_slot(s, v), 0, s->slot_bytes);
            continue;
        }
        if (t->count >= t->max_count)
            return i;
        t->count++;
        kt_put(t, at, k, KT_ZERO);
    }
    return npages;
}

int kt_store_fill(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t first_granule,
                  size_t ngranules, unsigned tag)
{
    uint64_t e;
    const size_t at = kt_find(t, key, &e);
    const uint32_t v = kt_value(e);
    uint32_t value;

    if (v != KT_EMPTY && v != KT_ZERO) {
        kt_fill(kt_slot(s, v), first_granule, ngranules, tag);
        return 1;
    }
    if (v == KT_EMPTY && t->count >= t->max_count)
        return 0;
    if ((tag & KT_NIBBLE) == 0 || ngranules == 0) { /* all its tags stay zero */
        if (v == KT_ZERO)
            return 1;
        value = KT_ZERO;
    } else {
        if (s->nslots >= s->slot_limit)
            return 0;
        value = kt_new_slot(s);
        kt_fill(kt_slot(s, value), first_granule, ngranules, tag);
    }
    if (v == KT_EMPTY)
        t->count++;
    kt_put(t, at, key, value);
    return 1;
}

size_t kt_store_find_mismatch(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                              size_t first_granule, size_t ngranules, unsigned tag)
{
    const uint8_t *packed = kt_lookup(t, s, key);

    if (packed)
        return kt_find_mismatch(packed, first_granule, ngranules, tag);
    return (tag & KT_NIBBLE) == 0 ? ngranules : 0;
}
