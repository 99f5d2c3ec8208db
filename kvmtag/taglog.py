"""The tag log: kvmtag's extension implementing Marc Zyngier's LKML proposal (December 2020).

"If the page is clean, the tags are valid": when the dirty log marks pages clean (re-protects
them: KVM_GET_DIRTY_LOG in get-and-clear mode, KVM_CLEAR_DIRTY_LOG, or logging switched on
without KVM_DIRTY_LOG_INITIALLY_SET), their current tags are saved, packed; a guest store to a
page discards its saved tags. The VMM reads saved tags and a validity bitmap for a range of a
logging slot with KVMTAG_GET_TAG_LOG, instead of pausing the guest or copying tags it may have
to copy again. Invariant: a page reported valid has saved tags equal to its current tags.

Cost: PAGE_SIZE/32 bytes per logged page (1/32 of logged RAM) plus a bit per page. Callers hold
the VM's dirty lock (guest stores take it too), so saving and discarding are atomic with stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmtag import tagkernel

if TYPE_CHECKING:
    from kvmtag.memslots import Memslot


class SlotTagLog:
    """Saved tags and their validity for one logging memslot."""

    def __init__(self, npages: int, packed_per_page: int) -> None:
        self.ppp = packed_per_page
        self.saved = bytearray(npages * packed_per_page)
        self.valid = bytearray(-(-npages // 64) * 8)

    def save(self, slot: Memslot, pages_mask: bytes | bytearray, first_page: int = 0) -> None:
        """Save the current tags of the pages whose bits are set in pages_mask (a bitmap from
        first_page, a multiple of 64), and mark them valid. Runs of set bits are saved whole."""
        bits = int.from_bytes(pages_mask, "little")
        while bits:
            low = (bits & -bits).bit_length() - 1
            shifted = bits >> low
            run = (shifted ^ (shifted + 1)).bit_length() - 1  # trailing ones
            self._save_run(slot, first_page + low, run)
            bits &= ~(((1 << run) - 1) << low)

    def save_all(self, slot: Memslot) -> None:
        self._save_run(slot, 0, slot.npages)

    def _save_run(self, slot: Memslot, first: int, npages: int) -> None:
        ppp = self.ppp
        view = memoryview(self.saved)
        page = first
        end = first + npages
        for seg in slot.segments:
            lo, hi = max(page, seg.first), min(end, seg.first + seg.npages)
            if lo >= hi:
                continue
            dst = view[lo * ppp : hi * ppp]
            seg.backing.read_packed(seg.index + lo - seg.first, hi - lo, dst)
            tagkernel.bitmap_set(self.valid, lo, hi - lo)
        # Pages in holes of the VMM's mappings have no tags to save: they stay invalid.

    def discard(self, page: int) -> None:
        self.valid[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def read(self, first: int, npages: int) -> tuple[bytes, bytes]:
        """Saved packed tags and the validity bitmap (ALIGN(npages, 64)/8 bytes) of a range."""
        tags = bytes(self.saved[first * self.ppp : (first + npages) * self.ppp])
        valid = int.from_bytes(self.valid, "little") >> first & ((1 << npages) - 1)
        return tags, valid.to_bytes(-(-npages // 64) * 8, "little")
