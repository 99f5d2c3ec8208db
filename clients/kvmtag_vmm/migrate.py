"""Live migration and snapshots of a running MTE guest, the source's side (the destination's
is kvmtag_vmm.incoming).

As QEMU does it, but with tags (`Migration`):

1. Dirty logging on for every memslot (with the tag log, KVMTAG_CAP_TAG_LOG, enabled first so
   switching logging on saves every page's tags; in manual-protect mode with INITIALLY_SET the
   first GET reports every page).
2. A full first pass while the guest runs, then passes over the pages the dirty log reports,
   until what is left fits the downtime target at the bandwidth the last pass measured.
3. Stop-and-copy: every vCPU paused, one more dirty-log sync, the last pages, then the registers
   (and optionally a CHECK digest of all RAM and tags), then END; over a socket, the
   destination's reply that it has resumed the guest.

Each pass re-protects first (KVM_GET_DIRTY_LOG in get-and-clear mode, or GET then
KVM_CLEAR_DIRTY_LOG in manual mode) and only then reads data and tags, so a store racing with
the copy shows up in the next pass. Tags are fetched in large batches over spans of dirty pages
(a few clean pages' tags cost less than another ioctl): KVM_ARM_MTE_COPY_TAGS FROM_GUEST, or the
tag log (KVMTAG_GET_TAG_LOG, whose pages not valid any more fall back to COPY_TAGS). They travel
packed, PAGE_SIZE/32 bytes a page, and all-zero pages and all-zero tag pages are elided. The
next span's tags are fetched, this span's pages read, and earlier records encoded and sent, on
three threads at once.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from clients.kvmtag_vmm import _bits, stream
from clients.kvmtag_vmm.progress import Progress
from clients.kvmtag_vmm.stream import Header
from clients.kvmtag_vmm.transport import Sink
from clients.kvmtag_vmm.vm import TAG_BATCH_BYTES, Machine, VmmError
from kvmtag import tagkernel, uapi

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Buffer

log = logging.getLogger("kvmtag.vmm")

TAG_MODES = ("copy-tags", "tag-log")
DIRTY_LOG_MODES = ("get-and-clear", "manual")
TAMPER = ("drop-tags", "corrupt-tags")
SPAN_GAP = 256  # clean pages a tag fetch may straddle to join two runs of dirty pages

ACK_TIMEOUT = 120.0
TAG_IOCTLS = ("KVM_ARM_MTE_COPY_TAGS", "KVMTAG_GET_TAG_LOG")


@dataclass(frozen=True)
class Options:
    tags: str = "copy-tags"
    dirty_log: str = "get-and-clear"
    downtime: float = 0.3  # seconds: the target for stop-and-copy
    max_passes: int = 30  # live passes before stop-and-copy regardless
    precopy: bool = True  # False: pause first and write everything once (a snapshot)
    verify: bool = False  # send a CHECK digest of all RAM and tags
    tamper: str | None = None  # negative control: "drop-tags" or "corrupt-tags"


@dataclass
class PassStats:
    number: int
    final: bool
    pages: int = 0  # pages carried
    data_pages: int = 0  # of which with data (not all zero)
    tag_pages: int = 0  # of which with tags (not all zero)
    data_bytes: int = 0  # page data on the wire
    tag_bytes: int = 0  # packed tags on the wire
    stream_bytes: int = 0  # everything on the wire in this pass
    tag_log_fallback_pages: int = 0
    tag_fetch_seconds: float = 0.0  # in COPY_TAGS / GET_TAG_LOG
    seconds: float = 0.0
    dirty_after: int = 0  # pages the dirty log reported when the pass ended


@dataclass
class Summary:
    """The JSON summary (--summary) of one migration or snapshot, source side."""

    role: str = "source"
    uri: str = ""
    mte: bool = True
    tags_mode: str = "copy-tags"
    dirty_log_mode: str = "get-and-clear"
    page_size: int = 4096
    ram_bytes: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    downtime_target_seconds: float = 0.0
    passes: int = 0
    stream_bytes: int = 0
    data_bytes: int = 0
    tag_bytes: int = 0
    overhead_bytes: int = 0
    pages_sent: int = 0
    zero_pages_elided: int = 0
    zero_tag_pages_elided: int = 0
    tag_ioctls: int = 0
    tag_ioctls_per_gib: float = 0.0
    tag_fetch_seconds: float = 0.0
    send_wait_seconds: float = 0.0  # the reading thread waiting for the sending one
    ioctls: dict[str, int] = field(default_factory=dict)
    pass_details: list[dict[str, Any]] = field(default_factory=list)
    tamper: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Migration:
    """One outgoing migration (or snapshot) of a running `Machine` into a `Sink`."""

    def __init__(
        self, machine: Machine, sink: Sink, options: Options, uri: str = "",
        progress: Progress | None = None,
    ) -> None:  # fmt: skip
        if options.tags not in TAG_MODES or options.dirty_log not in DIRTY_LOG_MODES:
            raise ValueError(f"bad options {options}")
        if options.tamper not in (None, *TAMPER):
            raise ValueError(f"bad tamper {options.tamper}")
        self.m = machine
        self.sink = sink
        self.o = options
        self.progress = progress or Progress(False)
        self.writer = stream.Writer()
        ps = machine.page_size
        self.ppp = machine.packed_per_page
        self.max_window = stream.MAX_WINDOW_BYTES // ps
        # Tags fetched per ioctl: 4 MiB one-per-byte with COPY_TAGS (16,384 pages at 4 KiB); half
        # that packed from the tag log (its limit is 4 MiB), its first page rounded down to 64.
        self.span = TAG_BATCH_BYTES // (ps // 16)
        self.summary = Summary(uri=uri, mte=machine.mte, tags_mode=options.tags,
                               dirty_log_mode=options.dirty_log, page_size=ps,
                               ram_bytes=machine.ram.size, downtime_target_seconds=options.downtime,
                               tamper=options.tamper)  # fmt: skip
        self.paused_at: float | None = None
        self._logging_started = False
        self.out = _Sender(sink)
        self._passes: list[PassStats] = []

    # --- the whole migration ---------------------------------------------------------------------

    def run(self) -> Summary:
        """Migrate. On return the destination has the guest (and, over a socket, has resumed
        it); the source's vCPUs are left paused. On failure the sink is aborted and the
        exception propagates; the caller resumes the source guest."""
        m, o = self.m, self.o
        start = time.monotonic()
        before = Counter(m.ioctls)
        try:
            pending = self._begin()
            number = 0
            if o.precopy:
                while True:
                    st = self._send_pass(pending, number, final=False)
                    pending = self._sync_dirty()
                    st.dirty_after = sum(b.bit_count() for b in pending)
                    rate = st.stream_bytes / max(st.seconds, 1e-6)
                    estimate = st.dirty_after * (m.page_size + self.ppp) / max(rate, 1.0)
                    log.info("pass %d: %d pages in %.3f s (%.1f MiB/s); %d dirty, %.3f s to send",
                             number, st.pages, st.seconds, rate / 2**20, st.dirty_after,
                             estimate)  # fmt: skip
                    number += 1
                    if estimate <= o.downtime or number >= o.max_passes:
                        break
                self.paused_at = time.monotonic()
                m.pause()
                self._mark("vCPUs paused")
                pending = [a | b for a, b in zip(pending, self._sync_dirty(), strict=True)]
            self._send_pass(pending, number, final=True)
            self._mark("final pass sent")
            for i, regs in enumerate(m.all_registers()):
                self.out.submit(functools.partial(self.writer.registers, i, regs))
            self._mark("registers read")
            if o.verify:
                digest = m.content_digest()
                self.out.submit(lambda: self.writer.check(digest))
                self._mark("content digest computed")
            self.out.submit(self.writer.end)
            self.out.flush()
            self.sink.finish(ACK_TIMEOUT)
            self._mark("the destination resumed the guest")
        except BaseException:
            self.sink.abort()  # first: it unblocks a sender stuck in send()
            self.out.close()
            raise
        finally:
            self.out.close()
            if self._logging_started:
                m.set_logging(False)
        end = time.monotonic()
        s = self.summary
        s.total_seconds = end - start
        s.downtime_seconds = end - (self.paused_at if self.paused_at is not None else start)
        s.stream_bytes = self.writer.nbytes
        s.overhead_bytes = s.stream_bytes - s.data_bytes - s.tag_bytes
        s.ioctls = dict(sorted((m.ioctls - before).items()))
        s.tag_ioctls = sum(s.ioctls.get(n, 0) for n in TAG_IOCTLS)
        s.tag_ioctls_per_gib = s.tag_ioctls / (m.ram.size / 2**30)
        s.pass_details = [asdict(p) for p in self._passes]
        s.send_wait_seconds = self.out.wait_seconds
        self.progress.done(
            f"migration: done in {s.total_seconds:.2f} s, downtime {s.downtime_seconds * 1e3:.0f}"
            f" ms, {s.passes} passes, {s.stream_bytes / 2**20:.1f} MiB sent"
        )
        return s

    def _mark(self, what: str) -> None:
        if self.paused_at is not None:
            ms = (time.monotonic() - self.paused_at) * 1e3
            log.debug("switchover: %s after %.1f ms", what, ms)

    def _begin(self) -> list[int]:
        """Logging on, the stream's header out; returns the pages of the first pass."""
        m, o = self.m, self.o
        if o.tags == "tag-log" and m.mte:
            if not m.tag_log_supported:
                raise VmmError("--tags tag-log: this kvmtagd has no tag log extension")
            m.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)
        if o.dirty_log == "manual":
            caps = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | uapi.KVM_DIRTY_LOG_INITIALLY_SET
            m.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, caps)
        if not o.precopy:
            self.paused_at = time.monotonic()
            m.pause()
        if o.precopy or (o.tags == "tag-log" and m.mte):
            m.set_logging(True)
            self._logging_started = True
        header = Header(m.page_size, m.mte, len(m.vcpus), m.profile, m.layout)
        self.out.submit(lambda: self.writer.start(header))
        if self._logging_started and o.dirty_log == "manual":
            return self._sync_dirty()  # INITIALLY_SET: every page, now re-protected
        return [_bits.mask(s.npages) for s in m.slots]

    def _sync_dirty(self) -> list[int]:
        """The dirty pages of every slot, re-protected (and their tags saved by the tag log)."""
        out = []
        for k in range(len(self.m.slots)):
            bits = self.m.get_dirty_log(k)
            if self.o.dirty_log == "manual" and bits:
                self.m.clear_dirty_log(k, bits)
            out.append(bits)
        return out

    # --- one pass --------------------------------------------------------------------------------

    def _send_pass(self, pending: list[int], number: int, final: bool) -> PassStats:
        st = PassStats(number, final)
        start = time.monotonic()
        self.out.flush()
        bytes_before = self.writer.nbytes
        total = sum(b.bit_count() for b in pending)
        spans = [(k, first, n, (bits >> first) & _bits.mask(n))
                 for k, bits in enumerate(pending) if bits
                 for first, n in _bits.spans(bits, SPAN_GAP, self.span)]  # fmt: skip
        extents: dict[int, list[tuple[int, int]]] = {}
        # The next span's tags are fetched (one ioctl, the daemon doing the work) while this
        # span's pages are read and queued: the wait for kvmtagd overlaps with the rest.
        with concurrent.futures.ThreadPoolExecutor(1, "tag-prefetch") as pool:
            fetches = [pool.submit(self._fetch_tags, *span) for span in spans[:1]]
            for index, (k, first, n, need) in enumerate(spans):
                if index + 1 < len(spans):
                    fetches.append(pool.submit(self._fetch_tags, *spans[index + 1]))
                packed, fallback, seconds = fetches[index].result()
                fetches[index] = concurrent.futures.Future()  # drop the tags once used
                st.tag_log_fallback_pages += fallback
                st.tag_fetch_seconds += seconds
                if k not in extents:  # one SEEK_DATA walk per slot and pass
                    slot = self.m.slots[k]
                    extents[k] = self.m.ram.data_extents(slot.offset,
                                                         slot.offset + slot.layout.size)
                for w in range(0, n, self.max_window):
                    wbits = (need >> w) & _bits.mask(min(self.max_window, n - w))
                    if not wbits:
                        continue
                    lo = (wbits & -wbits).bit_length() - 1
                    npages = wbits.bit_length() - lo
                    self._send_window(k, first + w + lo, npages, wbits >> lo, packed,
                                      w + lo, extents[k], st)  # fmt: skip
                    elapsed = time.monotonic() - start
                    rate = (st.data_bytes + st.tag_bytes) / max(elapsed, 1e-6)
                    left = total - st.pages
                    eta = left * (self.m.page_size + self.ppp) / max(rate, 1.0)
                    self.progress.update(number, left, rate, eta, final=final)
        self.out.submit(lambda: self.writer.pass_end(number, final))
        self.out.flush()
        st.seconds = time.monotonic() - start
        st.stream_bytes = self.writer.nbytes - bytes_before
        self.progress.update(number, 0, st.stream_bytes / max(st.seconds, 1e-6), 0.0,
                             force=True, final=final)  # fmt: skip
        s = self.summary
        s.passes += 1
        s.data_bytes += st.data_bytes
        s.tag_bytes += st.tag_bytes
        s.tag_fetch_seconds += st.tag_fetch_seconds
        s.pages_sent += st.pages
        s.zero_pages_elided += st.pages - st.data_pages
        s.zero_tag_pages_elided += st.pages - st.tag_pages if self.m.mte else 0
        self._passes.append(st)
        return st

    def _fetch_tags(
        self, k: int, first: int, n: int, need: int
    ) -> tuple[bytearray | None, int, float]:
        """Packed tags of pages [first, first+n) of slot k (valid at least for `need`), the
        number of pages the tag log did not have, and the seconds it took."""
        m = self.m
        start = time.monotonic()
        if not m.mte:
            return None, 0, 0.0
        if self.o.tags == "copy-tags":
            return m.read_tags(k, first, n), 0, time.monotonic() - start
        aligned = first & ~63
        saved, valid = m.get_tag_log(k, aligned, first + n - aligned)
        skip = (first - aligned) * self.ppp
        packed = bytearray(saved[skip : skip + n * self.ppp])
        missing = need & ~(valid >> (first - aligned))
        # Pages stored to since they were re-protected: their saved tags are gone. They are
        # dirty again and will be sent again in the next pass; for this one, copy their tags.
        for f, c in _bits.spans(missing, SPAN_GAP, self.span):
            packed[f * self.ppp : (f + c) * self.ppp] = m.read_tags(k, first + f, c)
        return packed, missing.bit_count(), time.monotonic() - start

    def _send_window(
        self, k: int, page: int, npages: int, present: int, packed: bytearray | None,
        at: int, extents: list[tuple[int, int]], st: PassStats,
    ) -> None:  # fmt: skip
        """One PAGES record: pages [page, page+npages) of slot k, those of `present`; their
        packed tags start at page `at` of `packed`."""
        m = self.m
        ps, ppp = m.page_size, self.ppp
        slot = m.slots[k]
        offset = slot.offset + page * ps
        data, zero_data = m.ram.read_pages(offset, npages, ps, present, extents)
        with_data = present & ~zero_data
        if packed is None:
            zero_tags, tags = present, bytearray()
        else:
            window = memoryview(packed)[at * ppp : (at + npages) * ppp]
            bitmap = bytearray(_bits.words_bytes(npages))
            tagkernel.zero_pages(bitmap, window, ppp)
            zero_tags = present & _bits.from_bytes(bitmap)
            if self.o.tamper == "drop-tags":
                zero_tags = present
            elif self.o.tamper == "corrupt-tags":
                zero_tags = 0
            with_tags = present & ~zero_tags
            tags = bytearray(with_tags.bit_count() * ppp)
            pos = 0
            for f, c in _bits.runs(with_tags):
                tags[pos : pos + c * ppp] = window[f * ppp : (f + c) * ppp]
                pos += c * ppp
            if self.o.tamper == "corrupt-tags":
                tags = bytearray(b ^ 0x11 for b in tags)  # every granule's tag, off by one bit
        gpa = slot.layout.gpa + page * ps
        self.out.submit(
            lambda: self.writer.pages(gpa, npages, present, zero_data, zero_tags, data, tags)
        )
        st.pages += present.bit_count()
        st.data_pages += with_data.bit_count()
        st.tag_pages += (present & ~zero_tags).bit_count()
        st.data_bytes += len(data)
        st.tag_bytes += len(tags)


class _Sender:
    """Encodes and sends records on a thread of its own, in the order submitted, while the
    migration reads the next pages: CRC, SHA-256 and the socket run without the GIL, so the
    two overlap. A failure is raised by the next submit() or flush(). At most `depth` records
    (8 MiB each at most) wait."""

    def __init__(self, sink: Sink, depth: int = 3) -> None:
        self.sink = sink
        self.queue: queue.Queue[Callable[[], Sequence[Buffer]] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.wait_seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="migration-sender", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.sink.send(job())
            except BaseException as e:
                self.error = e
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: Callable[[], Sequence[Buffer]]) -> None:
        self._check()
        start = time.monotonic()
        self.queue.put(job)
        self.wait_seconds += time.monotonic() - start

    def flush(self) -> None:
        """Until everything submitted is sent."""
        self.queue.join()
        self._check()

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
