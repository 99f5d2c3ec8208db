"""Receiving a guest: the destination's side of a migration or a snapshot restore.

Nothing runs until the whole stream has been read and checked. A snapshot file is verified
completely (every CRC, the structure, the final digest, no trailing bytes) before the
destination VM even exists, then read again into it; a live stream is loaded into a VM that is
not started, and torn down if anything is wrong. The stream is read and checked on one thread
(each payload straight into a buffer of its own) while another loads what was decoded.

Tags are restored with TO_GUEST while no memslot logs dirty pages (TO_GUEST is EBUSY while
logging since Linux 6.12): logging, if wanted later (to migrate the guest on), comes after.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from clients.kvmtag_vmm import _bits, stream
from clients.kvmtag_vmm.stream import Header, Pages, StreamError
from clients.kvmtag_vmm.transport import ByteSource
from clients.kvmtag_vmm.vm import TAG_BATCH_BYTES, Machine, VmmError

log = logging.getLogger("kvmtag.vmm")

SPAN_GAP = 256  # clean pages one TO_GUEST may cover to join two ranges (from the tag image)


class Target(Protocol):
    """What a stream is loaded into (a Machine that is not running, or a test's stand-in)."""

    def load_pages(self, pages: Pages) -> None: ...
    def stage_registers(self, regs: stream.Registers) -> None: ...
    def content_digest(self) -> bytes: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@dataclass
class ReceiveStats:
    role: str = "destination"
    uri: str = ""
    verified_first: bool = False
    verify_seconds: float = 0.0
    load_seconds: float = 0.0
    stream_bytes: int = 0
    records: int = 0
    passes: int = 0
    pages_loaded: int = 0
    checked_content: bool = False
    wait_seconds: float = 0.0  # for the stream (the source, or the decoding thread)
    apply_seconds: float = 0.0  # loading pages: pwrite and TO_GUEST


def receive(
    source: ByteSource, factory: Callable[[Header], Target], *, verify_first: bool,
    uri: str = "",
) -> tuple[Target, ReceiveStats]:  # fmt: skip
    """Read a stream into a new target. With verify_first (files), the whole stream is checked
    before `factory` is called; otherwise the target is built from the header, loaded as
    records arrive, and aborted on any error. On success the target is committed (registers
    set) but not started. Raises StreamError (the stream is refused) or VmmError."""
    stats = ReceiveStats(uri=uri, verified_first=verify_first)
    if verify_first:
        start = time.monotonic()
        _pump(source, None, stats)
        stats.verify_seconds = time.monotonic() - start
        if not source.rewind():
            raise VmmError("cannot read the stream a second time")
        stats.passes = stats.records = stats.pages_loaded = 0
    start = time.monotonic()
    target = _pump(source, factory, stats)
    stats.load_seconds = time.monotonic() - start
    assert target is not None
    return target, stats


def _pump(
    source: ByteSource, factory: Callable[[Header], Target] | None, stats: ReceiveStats
) -> Target | None:
    """Read the stream to END; with a factory, load it into the target it builds. The stream
    is read and checked on a thread of its own while this one loads what it has decoded."""
    target: Target | None = None
    events = _Decoder(source)
    try:
        for event in events:
            now = time.monotonic()
            stats.wait_seconds += now - events.since
            stats.records += 1
            if isinstance(event, Header):
                if factory is not None:
                    target = factory(event)
            elif isinstance(event, Pages):
                stats.pages_loaded += event.present.bit_count()
                if target is not None:
                    target.load_pages(event)
                    stats.apply_seconds += time.monotonic() - now
            elif isinstance(event, stream.PassEnd):
                stats.passes += 1
                log.debug("incoming: pass %d%s received", event.number,
                          " (final)" if event.final else "")  # fmt: skip
            elif isinstance(event, stream.Registers):
                if target is not None:
                    target.stage_registers(event)
            elif isinstance(event, stream.Check):
                stats.checked_content = True
                if target is not None and target.content_digest() != event.digest:
                    raise StreamError("CHECK: the loaded RAM and tags differ from the source's "
                                      "at the switchover")  # fmt: skip
        if events.reader.trailing or not source.at_end():
            raise StreamError("data after the END record")
        stats.stream_bytes = events.reader.nbytes
        log.debug("incoming: END checked")
        if target is not None:
            target.commit()
            log.debug("incoming: committed")
        return target
    except BaseException:
        events.close()
        if target is not None:
            target.abort()
        raise


class _Decoder:
    """The stream's events, read and decoded (CRC, SHA-256, every check) on a thread while the
    caller applies the previous ones. At most `depth` records wait. Iteration ends after END
    (the thread has finished then) or raises what the thread raised."""

    def __init__(self, source: ByteSource, depth: int = 4) -> None:
        self.source = source
        self.reader = stream.Reader()
        self.queue: queue.Queue[stream.Event | BaseException] = queue.Queue(depth)
        self.stop = threading.Event()
        self.since = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="migration-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                event = self.reader.next_event()
                if isinstance(event, stream.NeedData):
                    n = self.source.read_into(self.reader.buffer())  # straight into place
                    if not n:
                        self.reader.eof()
                    self.reader.received(n)
                    continue
                self._put(event)
                if isinstance(event, stream.End):
                    return
        except BaseException as e:
            self._put(e)

    def _put(self, item: stream.Event | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[stream.Event]:
        while True:
            self.since = time.monotonic()
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, stream.End):
                self.thread.join()
                return

    def close(self) -> None:
        """Stop the thread (it may be blocked reading: the caller then closes the source)."""
        self.stop.set()


class MachineTarget:
    """Loads a stream into a fresh Machine that is not running.

    Data goes into the memfd with pwrite; an all-zero page is written only if the memfd holds
    data there. Tags: the destination keeps a packed image of its guest's tags (PAGE_SIZE/32
    bytes a page, allocated per memslot on its first tagged page; exact, since nothing else
    changes them while the guest is not running). A record updates the image, then one TO_GUEST
    covers its pages from the first to the last whose tags are non-zero now or were before
    (a fresh page's are zero already), clean pages in between included, written from the image:
    a sparse final pass costs one ioctl, not one per run of dirty pages. Neighbouring ranges
    are merged up to 4 MiB of tags per ioctl. No memslot logs dirty pages meanwhile."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.regs: dict[int, tuple[tuple[int, int], ...]] = {}
        self.tagged = [0] * len(machine.slots)  # pages with non-zero tags here (bits)
        self.image: list[bytearray | None] = [None] * len(machine.slots)
        self._starts = [s.layout.gpa for s in machine.slots]
        self._pending: tuple[int, int, int] | None = None  # (slot index, first page, end page)
        self._batch_pages = TAG_BATCH_BYTES // (machine.page_size // 16)
        self.committed = False

    def _slot_of(self, gpa: int) -> int:
        k = bisect.bisect_right(self._starts, gpa) - 1
        if k < 0:
            raise VmmError(f"no memslot at {gpa:#x}")  # the reader checked: never
        return k

    def load_pages(self, p: Pages) -> None:
        m = self.m
        ps, ppp = m.page_size, m.packed_per_page
        k = self._slot_of(p.gpa)
        slot = m.slots[k]
        page = (p.gpa - slot.layout.gpa) // ps
        offset = slot.offset + page * ps
        pos = 0
        for f, c in _bits.runs(p.present & ~p.zero_data):
            m.ram.write(offset + f * ps, p.data[pos : pos + c * ps])
            pos += c * ps
        for f, c in _bits.runs(p.zero_data):
            for lo, hi in m.ram.data_extents(offset + f * ps, offset + (f + c) * ps):
                m.ram.write(lo, bytes(hi - lo))  # was data here, now zero
        if not m.mte:
            return
        was_tagged = (self.tagged[k] >> page) & _bits.mask(p.npages)
        with_tags = p.present & ~p.zero_tags
        need = p.present & (with_tags | was_tagged)
        if not need:
            return
        self.tagged[k] = (self.tagged[k] & ~(p.present << page)) | with_tags << page
        image = self.image[k]
        if image is None:
            image = self.image[k] = bytearray(slot.npages * ppp)
        base = page * ppp
        for f, c in _bits.runs(p.present & p.zero_tags & was_tagged):
            image[base + f * ppp : base + (f + c) * ppp] = bytes(c * ppp)
        pos = 0
        for f, c in _bits.runs(with_tags):
            image[base + f * ppp : base + (f + c) * ppp] = p.tags[pos : pos + c * ppp]
            pos += c * ppp
        lo = (need & -need).bit_length() - 1
        self._add_tags(k, page + lo, page + need.bit_length())

    def _add_tags(self, k: int, first: int, end: int) -> None:
        """Pages [first, end) of slot k need TO_GUEST from the image: merge with the pending
        range if close (the gap's tags come from the image too), else flush that first."""
        if self._pending is not None:
            pk, pfirst, pend = self._pending
            if pk == k and pend <= first <= pend + SPAN_GAP and end - pfirst <= self._batch_pages:
                self._pending = (k, pfirst, end)
                return
            self._flush_tags()
        self._pending = (k, first, end)

    def _flush_tags(self) -> None:
        if self._pending is not None:
            if self.m.logging:  # never: TO_GUEST is EBUSY while any memslot logs (6.12+)
                raise VmmError("internal error: restoring tags while dirty logging is on")
            k, first, end = self._pending
            self._pending = None
            image = self.image[k]
            assert image is not None
            ppp = self.m.packed_per_page
            packed = memoryview(image)[first * ppp : end * ppp]
            self.m.write_tags(self.m.slots[k].layout.gpa + first * self.m.page_size, packed)

    def stage_registers(self, regs: stream.Registers) -> None:
        self.regs[regs.vcpu] = regs.regs

    def content_digest(self) -> bytes:
        self._flush_tags()
        return self.m.content_digest()

    def commit(self) -> None:
        self._flush_tags()
        self.image = [None] * len(self.m.slots)  # the guest runs from now on: stale soon
        self.m.set_all_registers(dict(self.regs))
        self.committed = True

    def abort(self) -> None:
        self.m.close()
