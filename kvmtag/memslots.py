"""Memslots: guest physical ranges backed by VMM memory, and what backs each page.

A memslot maps guest frames [base_gfn, base_gfn+npages) onto the VMM's virtual range
[userspace_addr, …). When it is created (or moved, or its flags change) the model records the
VMM's mappings in that range as `Segment`s, each naming the tag-store backing and the page index
where it starts; holes between mappings are recorded by their absence (a page there is
unreachable, EFAULT). `Memslots.resolve` turns a guest range into runs of backing pages without
ever looping per page.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from kvmtag.taglog import SlotTagLog
from kvmtag.tagstore import Backing, BackingKey, TagStore, private_key, shared_key
from kvmtag.uapi import KVM_MEM_READONLY
from kvmtag.usermem import Vma


@dataclass(frozen=True)
class Segment:
    """Pages [first, first+npages) of a slot lie in one mapping."""

    first: int  # page offset within the slot
    npages: int
    vma: Vma
    backing: Backing
    index: int  # backing page index of the segment's first page


@dataclass(frozen=True)
class Run:
    """A run of guest pages that live in one backing, consecutively."""

    npages: int
    backing: Backing
    index: int
    slot: Memslot
    slot_page: int  # page offset of the run within its slot


@dataclass(eq=False)
class Memslot:
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int
    segments: list[Segment] = field(default_factory=list)
    dirty_bitmap: bytearray | None = None
    tag_log: SlotTagLog | None = None  # kvmtag's extension, while the slot logs

    def __post_init__(self) -> None:
        self.segment_starts = [s.first for s in self.segments]

    def segment_for(self, page: int) -> Segment | None:
        """The segment holding page (an offset in the slot), or None for a hole."""
        i = bisect.bisect_right(self.segment_starts, page) - 1
        if i >= 0 and page < self.segments[i].first + self.segments[i].npages:
            return self.segments[i]
        return None

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)


def backing_key(vma: Vma, process: Hashable) -> BackingKey:
    return shared_key(vma.dev, vma.ino) if vma.shared else private_key(process)


def segments_of(
    vmas: Sequence[Vma],
    userspace_addr: int,
    npages: int,
    page_size: int,
    store: TagStore,
    process: Hashable,
) -> list[Segment]:
    """The segments of a slot's range, from the VMM's mappings intersecting it."""
    start, end = userspace_addr, userspace_addr + npages * page_size
    segments = []
    for vma in vmas:
        lo, hi = max(vma.start, start), min(vma.end, end)
        if lo >= hi:
            continue
        # A shared mapping's pages are the file's; a private mapping's belong to the address.
        index = (vma.pgoff + lo - vma.start if vma.shared else lo) // page_size
        backing = store.attach(backing_key(vma, process), process)
        segments.append(
            Segment((lo - start) // page_size, (hi - lo) // page_size, vma, backing, index)
        )
    return segments


class Memslots:
    """The memslots of one address space of a VM, by id and by guest frame."""

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        # (sorted base_gfns, slots in that order), replaced whole on every change so that
        # lookups from running vCPUs, which take no lock, always see a consistent pair.
        self._index: tuple[list[int], list[Memslot]] = ([], [])

    def __iter__(self) -> Iterator[Memslot]:
        return iter(self._index[1])

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, slot_id: int) -> Memslot | None:
        return self.by_id.get(slot_id)

    def add(self, slot: Memslot) -> None:
        self.by_id[slot.id] = slot
        bases, ordered = list(self._index[0]), list(self._index[1])
        i = bisect.bisect_left(bases, slot.base_gfn)  # copies, not a sort: O(n) per change
        bases.insert(i, slot.base_gfn)
        ordered.insert(i, slot)
        self._index = (bases, ordered)

    def remove(self, slot: Memslot) -> None:
        del self.by_id[slot.id]
        bases, ordered = list(self._index[0]), list(self._index[1])
        i = ordered.index(slot, bisect.bisect_left(bases, slot.base_gfn))
        del bases[i], ordered[i]
        self._index = (bases, ordered)

    def find(self, gfn: int) -> Memslot | None:
        """The slot holding guest frame gfn."""
        bases, ordered = self._index
        i = bisect.bisect_right(bases, gfn) - 1
        if i >= 0 and gfn < ordered[i].end_gfn:
            return ordered[i]
        return None

    def overlaps(self, slot_id: int, base_gfn: int, end_gfn: int) -> bool:
        """Does [base_gfn, end_gfn) overlap any slot other than slot_id?"""
        bases, ordered = self._index
        i = bisect.bisect_left(bases, end_gfn)
        # Slots are disjoint, so only the one starting just before end_gfn can reach in;
        # skip the slot being moved, which may sit there.
        for s in reversed(ordered[:i]):
            if s.id == slot_id:
                continue
            return s.end_gfn > base_gfn
        return False

    def logging(self) -> int:
        """How many slots log dirty pages (the kernel's nr_memslots_dirty_logging)."""
        return sum(1 for s in self._index[1] if s.dirty_bitmap is not None)

    def resolve(self, gfn: int, npages: int, write: bool) -> tuple[list[Run], int]:
        """Runs of reachable pages from gfn, in order, stopping at the first unreachable one.

        A page is unreachable when no slot holds it, when it lies in a hole between the VMM's
        mappings or in a PROT_NONE one, or (for a write) when its slot or its mapping is
        read-only. Returns (runs, pages covered).
        """
        runs: list[Run] = []
        done = 0
        while done < npages:
            slot = self.find(gfn + done)
            if slot is None or (write and slot.readonly):
                break
            offset = gfn + done - slot.base_gfn
            want = min(npages - done, slot.npages - offset)
            got = _slot_runs(slot, offset, want, write, runs)
            done += got
            if got < want:
                break
        return runs, done


def _slot_runs(slot: Memslot, offset: int, npages: int, write: bool, runs: list[Run]) -> int:
    """Append the runs of pages [offset, offset+npages) of a slot; return the pages covered."""
    segments = slot.segments
    i = bisect.bisect_right(slot.segment_starts, offset) - 1
    done = 0
    while done < npages and 0 <= i < len(segments):
        seg = segments[i]
        page = offset + done
        if not seg.first <= page < seg.first + seg.npages:
            break  # a hole in the VMM's mappings
        if not seg.vma.readable or (write and not seg.vma.writable):
            break
        n = min(npages - done, seg.first + seg.npages - page)
        runs.append(Run(n, seg.backing, seg.index + page - seg.first, slot, page))
        done += n
        i += 1
    return done
