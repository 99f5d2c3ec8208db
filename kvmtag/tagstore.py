"""The tag store: MTE allocation tags of backing memory, packed two tags per byte.

Tags belong to memory, not to guest addresses. A `Backing` is one piece of memory identified
like the kernel's physical pages would be: a shared mapping by (device, inode) with pages
indexed by file offset, private and anonymous memory by (owning process) with pages indexed by
virtual address. So aliased memslots, a deleted and re-added slot, and two VMs mapping one memfd
all reach the same tags.

Layout (kept simple behind this facade; the memory-tight layout comes with the benchmark work):
each backing holds chunks of CHUNK_BYTES of packed tags, allocated on the first tagging of any
of their pages, plus a "tagged" bit per page (the kernel's PG_mte_tagged). Pages never tagged
read as zero and cost nothing. Invariant: an untagged page's packed bytes are zero.

Bulk operations take page ranges and loop per chunk (512 pages at 4 KiB), never per page or tag.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator

from kvmtag import tagkernel

BackingKey = tuple[Hashable, ...]
CHUNK_BYTES = 64 * 1024  # packed tag bytes per chunk


def shared_key(dev: int, ino: int) -> BackingKey:
    """Memory of a shared mapping: its file (memfd, tmpfs, hugetlbfs, shared anonymous)."""
    return ("inode", dev, ino)


def private_key(process: Hashable) -> BackingKey:
    """Private and anonymous memory of one process, indexed by virtual page number."""
    return ("process", process)


class _Chunk:
    __slots__ = ("packed", "tagged")

    def __init__(self, pages: int) -> None:
        self.packed = bytearray(CHUNK_BYTES)
        self.tagged = bytearray(-(-pages // 8))


class Backing:
    """The tags of one piece of memory, by page index."""

    def __init__(self, key: BackingKey, page_size: int) -> None:
        self.key = key
        self.page_size = page_size
        self.tags_per_page = page_size // 16
        self.packed_per_page = page_size // 32
        self.chunk_pages = CHUNK_BYTES // self.packed_per_page
        self._chunks: dict[int, _Chunk] = {}
        # Writers serialise per backing: the C kernel runs without the GIL, and two VMs may
        # copy into one shared memfd at once. Readers need no lock (hardware gives no
        # atomicity between a tag read and a concurrent tag write either).
        self._lock = threading.Lock()

    def _pieces(self, first: int, npages: int) -> Iterator[tuple[int, int, int, int]]:
        """Split a page range by chunk: (chunk index, page in chunk, pages, pages before)."""
        done = 0
        while done < npages:
            page = first + done
            index, offset = divmod(page, self.chunk_pages)
            n = min(self.chunk_pages - offset, npages - done)
            yield index, offset, n, done
            done += n

    def read(self, first: int, npages: int, out: memoryview) -> None:
        """Unpacked tags (one per byte) of pages [first, first+npages) into `out`."""
        tpp, ppp = self.tags_per_page, self.packed_per_page
        for index, offset, n, before in self._pieces(first, npages):
            dst = out[before * tpp : (before + n) * tpp]
            chunk = self._chunks.get(index)
            if chunk is None:
                tagkernel.fill_zero(dst)
            else:
                tagkernel.unpack(dst, memoryview(chunk.packed)[offset * ppp : (offset + n) * ppp])

    def write(self, first: int, npages: int, src: memoryview) -> None:
        """Set the tags of whole pages from one-per-byte `src` and mark them tagged."""
        tpp, ppp = self.tags_per_page, self.packed_per_page
        with self._lock:
            for index, offset, n, before in self._pieces(first, npages):
                chunk = self._chunk(index)
                dst = memoryview(chunk.packed)[offset * ppp : (offset + n) * ppp]
                tagkernel.pack(dst, src[before * tpp : (before + n) * tpp])
                tagkernel.bitmap_set(chunk.tagged, offset, n)

    def clear(self, first: int, npages: int) -> None:
        """Zero the tags of pages and mark them tagged (a faulting TO_GUEST since 6.2)."""
        ppp = self.packed_per_page
        with self._lock:
            for index, offset, n, _ in self._pieces(first, npages):
                chunk = self._chunk(index)
                tagkernel.fill_zero(memoryview(chunk.packed)[offset * ppp : (offset + n) * ppp])
                tagkernel.bitmap_set(chunk.tagged, offset, n)

    def write_prefix(self, page: int, src: memoryview) -> None:
        """Overwrite the first len(src) tags of a page, only if it is already tagged.

        A faulting TO_GUEST before 6.2 left what it had copied and did not mark the page; an
        untagged page's tags are then invisible (reads give zeros, the guest's first touch
        clears them), so only an already tagged page shows the mix.
        """
        if not self.is_tagged(page):
            return
        index, offset = divmod(page, self.chunk_pages)
        with self._lock:
            chunk = self._chunks[index]
            start = offset * self.packed_per_page
            packed = memoryview(chunk.packed)[start : start + self.packed_per_page]
            # Repack the whole page: the prefix may end on an odd granule.
            page_tags = tagkernel.unpacked(packed)
            page_tags[: len(src)] = src
            tagkernel.pack(packed, page_tags)

    def set_granules(self, page: int, first: int, n: int, tag: int) -> None:
        """A guest's tag store (STG and friends): granules [first, first+n) of one page. The
        page becomes tagged; its other tags are zero if it was not (the first touch clears)."""
        index, offset = divmod(page, self.chunk_pages)
        with self._lock:
            chunk = self._chunk(index)
            granule = offset * self.tags_per_page + first
            tagkernel.fill(chunk.packed, granule, n, tag)
            tagkernel.bitmap_set(chunk.tagged, offset, 1)

    def find_mismatch(self, page: int, first: int, n: int, tag: int) -> int | None:
        """A guest's tag-checked access: the first granule of [first, first+n) of a page whose
        tag is not `tag` (relative to first), or None."""
        index, offset = divmod(page, self.chunk_pages)
        chunk = self._chunks.get(index)
        if chunk is None:
            return None if tag == 0 else 0
        granule = offset * self.tags_per_page + first
        return tagkernel.find_mismatch(chunk.packed, granule, n, tag)

    def read_packed(self, first: int, npages: int, out: memoryview) -> None:
        """Packed tags (PAGE_SIZE/32 bytes a page) of pages [first, first+npages) into out."""
        ppp = self.packed_per_page
        for index, offset, n, before in self._pieces(first, npages):
            dst = out[before * ppp : (before + n) * ppp]
            chunk = self._chunks.get(index)
            if chunk is None:
                tagkernel.fill_zero(dst)
            else:
                dst[:] = memoryview(chunk.packed)[offset * ppp : (offset + n) * ppp]

    def is_tagged(self, page: int) -> bool:
        index, offset = divmod(page, self.chunk_pages)
        chunk = self._chunks.get(index)
        return chunk is not None and tagkernel.bitmap_count(chunk.tagged, offset, 1) == 1

    def tagged_pages(self) -> int:
        return sum(
            tagkernel.bitmap_count(c.tagged, 0, self.chunk_pages) for c in self._chunks.values()
        )

    @property
    def nbytes(self) -> int:
        """Memory held for this backing's tags."""
        return len(self._chunks) * (CHUNK_BYTES + -(-self.chunk_pages // 8))

    def _chunk(self, index: int) -> _Chunk:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = _Chunk(self.chunk_pages)
        return chunk


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
