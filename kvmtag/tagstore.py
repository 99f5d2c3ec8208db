"""The tag store: MTE allocation tags of backing memory, packed two tags per byte.

Tags belong to memory, not to guest addresses. A `Backing` is one piece of memory identified
like the kernel's physical pages would be: a shared mapping by (device, inode) with pages
indexed by file offset, private and anonymous memory by (owning process) with pages indexed by
virtual address. So aliased memslots, a deleted and re-added slot, and two VMs mapping one memfd
all reach the same tags.

Layout: memory-tight, because tagged pages may be scattered anywhere in a 64 GiB guest, or in
a 2^52-page address space. The bytes live in large Python-owned buffers that the C kernel
indexes (cdefs/tagkernel.h, kvmtag.tagkernel.Slab and PageTable); Python holds no object per
page, and never loops per page or per tag:

- a *slab* per backing: packed page slots (PAGE_SIZE/32 bytes), handed out in the order pages
  are first tagged, in arenas of ARENA_BYTES of anonymous memory whose untouched tail costs
  nothing. A slot is never given back (nothing untags a page short of releasing the backing),
  so the slab needs no free list and a fresh slot is all zero;
- per region of 2^32 pages (page >> 32, in a small dict; a guest's memory is one or two
  regions), an open-addressing hash table from the page's 32-bit key to its slot: 8 bytes an
  entry, at most 3/4 full and at least 3/8 (it doubles), so 11-22 bytes a tagged page beside its
  128 bytes of tags at 4 KiB pages: the store holds 1.08-1.17x the packed bytes however the
  tagged pages are scattered (kvmtag.bench.memory: 1.16x at 10% of 64 GiB), where the previous
  layout of 64 KiB chunks and bitmaps held ~10x. A key's home entry keeps its
  low 6 bits, so 64 consecutive pages have theirs side by side and a bulk copy of a range takes
  one cache miss per 64 pages in the table; pages first tagged in order have consecutive slots,
  which the C kernel copies as one run;
- a page tagged with all tags zero (TO_GUEST of zeros, a faulting TO_GUEST's clear, a guest's
  STG of tag 0 on a fresh page) takes no slot: its entry says "tagged, all zero" (KT_ZERO). A
  VMM that restores a whole guest's tags, zeros included, then pays 11-22 bytes for such a
  page, not 128. The page gets a slot when a tag of it becomes non-zero; a slot, once given, stays.

Every bulk operation is one C call per region (a run of pages never crosses more than one
region boundary in practice); a single-page guest access (set_granules, find_mismatch) is one C
call. A writing call stops when the table or the slab is full; the writer grows that one and
calls again with the rest.

Threads: writers serialise per backing with a lock (the C kernel runs without the GIL, and two
VMs may copy into one shared memfd at once). Readers take no lock, and need none to be safe:
they fetch the region's table once and use that object for the whole call. A writer never
writes to a table after replacing it with a grown copy, and Python unmaps a replaced table only
when its last reference goes, which a reader still inside the C code holds; the slab's arenas
and its array of arena pointers never move or shrink while the backing lives. A table entry is
one 64-bit store, naming a mapped slot. So a reader racing a writer sees each page's tags from
before or after the write (or partly written: hardware gives no atomicity between a tag read
and a concurrent tag write either), never freed memory. Taking the lock in readers
instead would make every guest tag check wait behind a 4 MiB TO_GUEST window, and serialise
concurrent FROM_GUEST copies of one memfd.

`nbytes` is the memory held (the tables whole, the arenas up to their last slot handed out, in
host pages), used by the tag-storage quota.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator

from kvmtag import tagkernel

BackingKey = tuple[Hashable, ...]

ARENA_BYTES = 4 << 20
"""Packed tag bytes per arena of a backing's slab (32,768 pages at 4 KiB): large enough that
a 64 GiB guest fully tagged needs 512 mappings, and costing only what is touched."""

FIRST_TABLE_ENTRIES = 128
"""Entries of a region's first page table (1 KiB; 96 pages before it first doubles): the fixed
cost of a tagged region stays small for the many backings a VMM may tag a page or two of."""

REGION_BITS = 32
"""A page's region is page >> REGION_BITS; its key in the region's table the low bits."""

_KEY_MASK = (1 << REGION_BITS) - 1


def shared_key(dev: int, ino: int) -> BackingKey:
    """Memory of a shared mapping: its file (memfd, tmpfs, hugetlbfs, shared anonymous)."""
    return ("inode", dev, ino)


def private_key(process: Hashable) -> BackingKey:
    """Private and anonymous memory of one process, indexed by virtual page number."""
    return ("process", process)


class Backing:
    """The tags of one piece of memory, by page index."""

    def __init__(self, key: BackingKey, page_size: int) -> None:
        self.key = key
        self.page_size = page_size
        self.tags_per_page = page_size // 16
        self.packed_per_page = page_size // 32
        self._slab = tagkernel.Slab(self.packed_per_page, ARENA_BYTES)
        self._tables: dict[int, tagkernel.PageTable] = {}  # by region
        # Writers only (see the module docstring for why readers need none).
        self._lock = threading.Lock()

    # --- readers: no lock ----------------------------------------------------------------------

    def read(self, first: int, npages: int, out: memoryview) -> None:
        """Unpacked tags (one per byte) of pages [first, first+npages) into `out`."""
        tpp = self.tags_per_page
        for region, key, n, before in _runs(first, npages):
            dst = out[before * tpp : (before + n) * tpp]
            table = self._tables.get(region)  # this object for the whole call
            if table is None:
                tagkernel.fill_zero(dst)
            else:
                table.read(key, dst)

    def read_packed(self, first: int, npages: int, out: memoryview) -> None:
        """Packed tags (PAGE_SIZE/32 bytes a page) of pages [first, first+npages) into out."""
        ppp = self.packed_per_page
        for region, key, n, before in _runs(first, npages):
            dst = out[before * ppp : (before + n) * ppp]
            table = self._tables.get(region)
            if table is None:
                tagkernel.fill_zero(dst)
            else:
                table.read_packed(key, dst)

    def find_mismatch(self, page: int, first: int, n: int, tag: int) -> int | None:
        """A guest's tag-checked access: the first granule of [first, first+n) of a page whose
        tag is not `tag` (relative to first), or None."""
        table = self._tables.get(_region(page))
        if table is None:
            return None if tag == 0 or n == 0 else 0
        return table.find_mismatch(page & _KEY_MASK, first, n, tag)

    def is_tagged(self, page: int) -> bool:
        table = self._tables.get(_region(page))
        return table is not None and table.is_tagged(page & _KEY_MASK)

    def tagged_pages(self) -> int:
        return sum(table.count for table in list(self._tables.values()))

    @property
    def nbytes(self) -> int:
        """Memory held for this backing's tags (its slab and its page tables)."""
        return self._slab.nbytes + sum(table.nbytes for table in list(self._tables.values()))

    # --- writers: under the lock ---------------------------------------------------------------

    def write(self, first: int, npages: int, src: memoryview) -> None:
        """Set the tags of whole pages from one-per-byte `src` and mark them tagged."""
        with self._lock:
            self._write(first, npages, src)

    def clear(self, first: int, npages: int) -> None:
        """Zero the tags of pages and mark them tagged (a faulting TO_GUEST since 6.2)."""
        with self._lock:
            for region, key, n, _ in _runs(first, npages):
                table = self._table(region)
                done = table.clear(key, n)
                while done < n:
                    table = self._make_room(region, table)
                    done += table.clear(key + done, n - done)

    def write_prefix(self, page: int, src: memoryview) -> None:
        """Overwrite the first len(src) tags of a page, only if it is already tagged.

        A faulting TO_GUEST before 6.2 left what it had copied and did not mark the page; an
        untagged page's tags are then invisible (reads give zeros, the guest's first touch
        clears them), so only an already tagged page shows the mix.
        """
        with self._lock:
            if not self.is_tagged(page):
                return
            # Rewrite the whole page: the prefix may end on an odd granule (a rare path: a
            # faulting copy on an old kernel profile).
            page_tags = bytearray(self.tags_per_page)
            self.read(page, 1, memoryview(page_tags))
            page_tags[: len(src)] = src
            self._write(page, 1, memoryview(page_tags))

    def set_granules(self, page: int, first: int, n: int, tag: int) -> None:
        """A guest's tag store (STG and friends): granules [first, first+n) of one page. The
        page becomes tagged; its other tags are zero if it was not (the first touch clears)."""
        region, key = _region(page), page & _KEY_MASK
        with self._lock:
            table = self._table(region)
            while not table.fill(key, first, n, tag):
                table = self._make_room(region, table)

    def _write(self, first: int, npages: int, src: memoryview) -> None:
        tpp = self.tags_per_page
        for region, key, n, before in _runs(first, npages):
            table = self._table(region)
            done = table.write(key, src[before * tpp : (before + n) * tpp])
            while done < n:
                table = self._make_room(region, table)
                done += table.write(key + done, src[(before + done) * tpp : (before + n) * tpp])

    def _table(self, region: int) -> tagkernel.PageTable:
        table = self._tables.get(region)
        if table is None:
            table = self._tables[region] = tagkernel.PageTable(self._slab, FIRST_TABLE_ENTRIES)
        return table

    def _make_room(self, region: int, table: tagkernel.PageTable) -> tagkernel.PageTable:
        """The kernel stopped for want of a table entry or a slot: add what is missing (the
        table first: if the slot was wanted too, the next call stops again for it; an arena is
        mapped only for a page that needs a slot, so zero tags never map one)."""
        if table.full:
            # Readers holding the old table keep it alive and consistent: it is never written
            # again, and it is unmapped when the last of them lets go.
            table = self._tables[region] = table.grown()
        elif self._slab.full:
            self._slab.add_arena()
        else:
            raise RuntimeError("the tag kernel stopped with room in the table and the slab")
        return table


def _region(page: int) -> int:
    if page < 0:
        raise ValueError(f"page index must be >= 0, got {page}")
    return page >> REGION_BITS


def _runs(first: int, npages: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a page range by region: (region, key of its first page, pages, pages before)."""
    if npages < 0:
        raise ValueError(f"number of pages must be >= 0, got {npages}")
    done = 0
    while done < npages:
        page = first + done
        region, key = _region(page), page & _KEY_MASK
        n = min(npages - done, _KEY_MASK + 1 - key)
        yield region, key, n, done
        done += n


class TagStore:
    """All backings of one host, with their lifetimes.

    A backing lives while some process that registered it is still there: `attach` records
    that a process reaches the memory (it created a memslot over it), `release_process` drops
    everything a process held, and a backing no process holds is forgotten with its tags.
    """

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._backings: dict[BackingKey, Backing] = {}
        self._holders: dict[BackingKey, set[Hashable]] = {}
        self._lock = threading.Lock()

    def attach(self, key: BackingKey, process: Hashable) -> Backing:
        with self._lock:
            backing = self._backings.get(key)
            if backing is None:
                backing = self._backings[key] = Backing(key, self.page_size)
                self._holders[key] = set()
            self._holders[key].add(process)
            return backing

    def release_process(self, process: Hashable) -> None:
        with self._lock:
            for key, holders in list(self._holders.items()):
                holders.discard(process)
                if not holders:
                    del self._holders[key], self._backings[key]

    def get(self, key: BackingKey) -> Backing | None:
        return self._backings.get(key)

    def __len__(self) -> int:
        return len(self._backings)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in list(self._backings.values()))
