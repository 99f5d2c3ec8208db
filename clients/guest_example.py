"""A VMM that boots kvmtag's guest, keeps a copy of its tags while it runs, then feeds it stale
tags and watches it crash (issue 5's "Done means").

What it does, through kvmtagd as through /dev/kvm:

1. boots the tagged-heap guest on two vCPU threads, in memfd RAM logged by the dirty log;
2. while the guest runs, does dirty-log passes (KVM_GET_DIRTY_LOG, get-and-clear) and updates
   its copy of the guest's tags (packed, PAGE_SIZE/32 bytes a page) from KVM_ARM_MTE_COPY_TAGS
   (--mode copy-tags) or from kvmtag's tag log extension, KVMTAG_GET_TAG_LOG (--mode tag-log);
   after a final pass with the guest stopped, checks its copy against a full dump;
3. switches logging off and restores the copy taken at the first pass (stale by then) with
   TO_GUEST: the guest's next tag-checked loads fault, KVM_RUN reports a crash;
4. prints the guest's store rate (in guest steps: the guest counts steps, not stores; a step is
   a tag-checked load of one object, then, most of the time, one store of its data and tags),
   the cost of one dirty-log pass over all of guest RAM, and the tag log's overhead on the
   store rate (two fresh guests of the same seed, with and without KVMTAG_CAP_TAG_LOG, run in
   alternation).

Run (with kvmtagd running):
    .venv/bin/python clients/guest_example.py --socket SOCKET [--ram-mib 1024] [--seconds 3]
        [--mode copy-tags|tag-log]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from kvmtag import dirtylog, tagkernel, uapi
from kvmtag.guest import GUEST_ENTRY, HEARTBEAT_GPA, GuestDescriptor
from kvmtag.kvm import Kvm, RunExit, VcpuFd, VmFd, exit_of

GPA = 0x8000_0000  # guest RAM: the descriptor in its first page, the heap right after it
FROM, TO = uapi.KVM_ARM_TAGS_FROM_GUEST, uapi.KVM_ARM_TAGS_TO_GUEST
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
NVCPUS = 2
COPY_PAGES = 16384  # pages per COPY_TAGS of a whole range: 64 MiB of RAM, 4 MiB of tags
TAG_LOG_PAGES = 32768  # pages per KVMTAG_GET_TAG_LOG: 4 MiB of packed tags, kvmtagd's limit
PASS_INTERVAL = 0.05  # seconds between two dirty-log passes
TIMEOUT = 30.0
ROUNDS = 4  # alternations of the guests without and with the tag log


def runs(bitmap: bytes | int, npages: int) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of set bits: one ioctl per run, never one per page."""
    bits = bitmap if isinstance(bitmap, int) else int.from_bytes(bitmap, "little")
    bits &= (1 << npages) - 1
    while bits:
        low = (bits & -bits).bit_length() - 1
        shifted = bits >> low
        count = (shifted ^ (shifted + 1)).bit_length() - 1  # trailing ones
        yield low, count
        bits &= ~(((1 << count) - 1) << low)


class Guest:
    """An MTE VM with the guest booted: memfd RAM (slot 0, dirty-logged) and NVCPUS vCPUs."""

    def __init__(self, kvm: Kvm, ram_mib: int, heap_kib: int, *, tag_log: bool) -> None:
        self.page = kvm.page_size
        self.ppp = self.page // 32  # packed tag bytes per page
        self.npages = (ram_mib << 20) // self.page
        self.size = self.npages * self.page
        self.stack = contextlib.ExitStack()
        try:
            self.vm: VmFd = self.stack.enter_context(kvm.create_vm())
            self.vm.enable_cap(uapi.KVM_CAP_ARM_MTE)
            if tag_log:
                self.vm.enable_cap(uapi.KVMTAG_CAP_TAG_LOG)
            self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            self.stack.callback(os.close, self.memfd)
            os.ftruncate(self.memfd, self.size)
            self.ram = mmap.mmap(self.memfd, self.size)
            self.stack.callback(self.ram.close)
            self.vm.set_user_memory_region(0, GPA, self.size, self.ram, LOG)
            heap = min(heap_kib << 10, self.size - self.page)
            self.desc = GuestDescriptor(GPA + self.page, heap, 64, NVCPUS, seed=2020)
            self.ram[: self.desc.SIZE] = self.desc.pack()  # the VMM loads "the image"
            run_size = kvm.get_vcpu_mmap_size()
            self.vcpus: list[VcpuFd] = []
            self.areas: list[mmap.mmap] = []
            for i in range(NVCPUS):
                vcpu = self.stack.enter_context(self.vm.create_vcpu(i))
                vcpu.init(*self.vm.preferred_target()[:1])
                vcpu.set_one_reg(uapi.CORE_REGS["x0"], GPA)
                vcpu.set_one_reg(uapi.CORE_REGS["x1"], i)
                vcpu.set_one_reg(uapi.CORE_REGS["pc"], GUEST_ENTRY)
                self.vcpus.append(vcpu)
                self.areas.append(vcpu.mmap_run(run_size))
                self.stack.callback(self.areas[-1].close)
        except BaseException:
            self.stack.close()
            raise

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stack.close()

    def run(self, i: int) -> RunExit:
        self.vcpus[i].run()
        return exit_of(self.areas[i])

    def tags(self, first: int, npages: int) -> bytearray:
        """Current tags of a range, one per byte (COPY_TAGS FROM_GUEST in large batches)."""
        out = bytearray(npages * self.page // 16)
        view = memoryview(out)
        for at in range(0, npages, COPY_PAGES):
            n = min(COPY_PAGES, npages - at)
            part = view[at * self.page // 16 : (at + n) * self.page // 16]
            gpa = GPA + (first + at) * self.page
            if self.vm.mte_copy_tags(gpa, n * self.page, part, FROM) != n * self.page:
                raise OSError(f"COPY_TAGS stopped early at {gpa:#x}")
        return out


def is_heartbeat(ex: RunExit) -> bool:
    return ex.reason == uapi.KVM_EXIT_MMIO and ex.mmio_addr == HEARTBEAT_GPA


class VcpuThreads:
    """The guest's vCPUs, each on a thread calling KVM_RUN until stopped; counts guest steps
    from the heartbeat exits. Any other exit stops that vCPU and is reported."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.stop_event = threading.Event()
        self.slices = [0] * NVCPUS
        self.steps = [0] * NVCPUS
        self.problems: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(NVCPUS)]
        self.started = self.elapsed = 0.0
        self.mark_steps, self.mark_time = 0, 0.0

    def __enter__(self) -> VcpuThreads:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(TIMEOUT)
        self.elapsed = time.monotonic() - self.started
        if any(thread.is_alive() for thread in self.threads):
            self.problems.append("a vCPU thread did not stop")

    def _loop(self, i: int) -> None:
        try:
            while not self.stop_event.is_set():
                ex = self.guest.run(i)
                if not is_heartbeat(ex):
                    self.problems.append(f"vCPU {i}: unexpected exit {ex}")
                    return
                self.steps[i] += int.from_bytes(ex.mmio_data, "little")
                self.slices[i] += 1
        except OSError as e:
            self.problems.append(f"vCPU {i}: KVM_RUN failed: {e}")

    def wait_for_slices(self, n: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT
        while min(self.slices) < n and not self.problems:
            if time.monotonic() > deadline:
                raise TimeoutError("the vCPUs made no progress")
            time.sleep(0.005)

    def mark(self) -> None:
        """Start counting the store rate from here (after boot and the first full pass)."""
        self.mark_steps, self.mark_time = sum(self.steps), time.monotonic()

    @property
    def rate(self) -> float:
        """Steps per second since `mark()` (or the start) until the threads were joined."""
        start = self.mark_time or self.started
        seconds = self.started + self.elapsed - start
        return (sum(self.steps) - self.mark_steps) / seconds if seconds > 0 else 0.0


class TagCopy:
    """The VMM's copy of the guest's tags, kept current by dirty-log passes."""

    def __init__(self, guest: Guest, mode: str) -> None:
        self.g = guest
        self.mode = mode
        self.packed = bytearray(guest.npages * guest.ppp)
        self.bitmap = bytearray(dirtylog.bitmap_bytes(guest.npages))

    def dirty_pass(self, everything: bool = False) -> tuple[float, float, int]:
        """Re-protect (KVM_GET_DIRTY_LOG, get-and-clear), then read the tags of what it
        reported (everything, the first time). Returns (GET seconds, tag seconds, pages)."""
        g = self.g
        t0 = time.perf_counter()
        g.vm.get_dirty_log(0, self.bitmap)
        t1 = time.perf_counter()
        dirty = (1 << g.npages) - 1 if everything else int.from_bytes(self.bitmap, "little")
        if self.mode == "copy-tags":
            for first, n in runs(dirty, g.npages):
                self._copy_tags(first, n)
        else:
            self._from_tag_log(dirty)
        return t1 - t0, time.perf_counter() - t1, dirty.bit_count()

    def _copy_tags(self, first: int, npages: int) -> None:
        ppp = self.g.ppp
        for at in range(first, first + npages, COPY_PAGES):
            n = min(COPY_PAGES, first + npages - at)
            self.packed[at * ppp : (at + n) * ppp] = tagkernel.packed(self.g.tags(at, n))

    def _from_tag_log(self, dirty: int) -> None:
        """Saved tags of the dirty pages still valid. A page dirtied again since the GET is not
        valid, and its dirty bit is set again: the next pass takes it."""
        g, ppp = self.g, self.g.ppp
        chunks = 0  # 64-page chunks holding dirty pages, as a bitmap of chunks
        for c in range(-(-g.npages // 64)):
            if dirty >> (64 * c) & (2**64 - 1):
                chunks |= 1 << c
        nchunks = -(-g.npages // 64)
        for first_chunk, count in runs(chunks, nchunks):
            for at in range(first_chunk * 64, (first_chunk + count) * 64, TAG_LOG_PAGES):
                n = min(TAG_LOG_PAGES, (first_chunk + count) * 64 - at, g.npages - at)
                saved, valid = g.vm.get_tag_log(0, at, n, ppp)
                take = int.from_bytes(valid, "little") & (dirty >> at)
                for p, k in runs(take, n):
                    self.packed[(at + p) * ppp : (at + p + k) * ppp] = saved[
                        p * ppp : (p + k) * ppp
                    ]

    def matches_guest(self) -> bool:
        g = self.g
        for at in range(0, g.npages, COPY_PAGES):
            n = min(COPY_PAGES, g.npages - at)
            if tagkernel.packed(g.tags(at, n)) != self.packed[at * g.ppp : (at + n) * g.ppp]:
                return False
        return True


def store_rates(kvm: Kvm, args: argparse.Namespace) -> tuple[float, float]:
    """Steps/s without and with KVMTAG_CAP_TAG_LOG: two guests of the same seed, logging, with
    a GET_DIRTY_LOG pass every PASS_INTERVAL, run in alternation."""
    steps = {False: 0, True: 0}
    seconds = {False: 0.0, True: 0.0}
    with contextlib.ExitStack() as stack:
        guests = {
            tl: stack.enter_context(Guest(kvm, args.ram_mib, args.heap_kib, tag_log=tl))
            for tl in (False, True)
        }
        for _ in range(ROUNDS):
            for tl in (False, True):
                g = guests[tl]
                bitmap = bytearray(dirtylog.bitmap_bytes(g.npages))
                with VcpuThreads(g) as vcpus:
                    deadline = time.monotonic() + args.seconds / ROUNDS
                    while time.monotonic() < deadline and not vcpus.problems:
                        time.sleep(PASS_INTERVAL)
                        g.vm.get_dirty_log(0, bitmap)
                if vcpus.problems:
                    raise RuntimeError("; ".join(vcpus.problems))
                steps[tl] += sum(vcpus.steps)
                seconds[tl] += vcpus.elapsed
    return steps[False] / seconds[False], steps[True] / seconds[True]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", help="kvmtagd's socket (default: $KVMTAG_SOCKET, …)")
    p.add_argument("--ram-mib", type=int, default=1024, help="guest RAM (default 1024)")
    p.add_argument("--heap-kib", type=int, default=256, help="the guest's heap (default 256)")
    p.add_argument("--seconds", type=float, default=3.0, help="run time of each phase")
    p.add_argument("--mode", choices=["copy-tags", "tag-log"], default="copy-tags",
                   help="read tags with KVM_ARM_MTE_COPY_TAGS or the tag log")  # fmt: skip
    args = p.parse_args(argv)

    with Kvm(socket=args.socket) as kvm:
        if kvm.check_extension(uapi.KVM_CAP_ARM_MTE) != 1:
            print("no KVM_CAP_ARM_MTE", file=sys.stderr)
            return 1
        if args.mode == "tag-log" and kvm.check_extension(uapi.KVMTAG_CAP_TAG_LOG) != 1:
            print("no KVMTAG_CAP_TAG_LOG", file=sys.stderr)
            return 1
        with Guest(kvm, args.ram_mib, args.heap_kib, tag_log=args.mode == "tag-log") as g:
            d = g.desc
            print(f"booted the guest: {NVCPUS} vCPUs, {args.ram_mib} MiB of memfd RAM, a "
                  f"{d.heap_size >> 10} KiB heap of {d.heap_size // d.obj_size} objects; "
                  f"tags read with {args.mode}")  # fmt: skip
            copy = TagCopy(g, args.mode)
            passes: list[tuple[float, float, int]] = []
            with VcpuThreads(g) as vcpus:
                vcpus.wait_for_slices()
                first_pass = copy.dirty_pass(everything=True)
                snapshot = bytes(copy.packed)  # the tags as of the first pass: stale soon
                vcpus.mark()
                deadline = time.monotonic() + args.seconds
                while time.monotonic() < deadline and not vcpus.problems:
                    time.sleep(PASS_INTERVAL)
                    passes.append(copy.dirty_pass())
            if vcpus.problems:
                print("; ".join(vcpus.problems), file=sys.stderr)
                return 1
            final = copy.dirty_pass()  # the final pass: the guest is stopped
            matches = copy.matches_guest()
            print(f"guest store rate: {vcpus.rate:,.0f} steps/s on {NVCPUS} vCPUs "
                  f"(dirty logging on, a pass every {PASS_INTERVAL * 1000:.0f} ms)")  # fmt: skip
            if passes:
                total = statistics.median(a + b for a, b, _ in passes)
                get = statistics.median(a for a, _, _ in passes)
                tags = statistics.median(b for _, b, _ in passes)
                dirty = statistics.median(n for _, _, n in passes)
                print(f"dirty-log pass over {args.ram_mib} MiB ({args.mode}): {total * 1e3:.2f} "
                      f"ms, median of {len(passes)} passes while the guest ran (GET_DIRTY_LOG "
                      f"{get * 1e3:.2f} ms, tags of {dirty:.0f} dirty pages {tags * 1e3:.2f} "
                      f"ms); {(final[0] + final[1]) * 1e3:.2f} ms with the guest stopped "
                      f"({final[2]} dirty pages)")  # fmt: skip
            print(f"first pass over {args.ram_mib} MiB (every page's tags, {args.mode}): "
                  f"{(first_pass[0] + first_pass[1]) * 1e3:.1f} ms")  # fmt: skip
            if args.mode == "tag-log":
                print(f"tag log memory: {g.npages * g.ppp >> 10} KiB of saved tags for "
                      f"{args.ram_mib} MiB of logged RAM (1/32)")  # fmt: skip
            print(f"shadow tags equal the guest's after the final pass: {matches}")

            # Stale tags: logging off (TO_GUEST is EBUSY while logging), the first pass's copy
            # of the heap's tags written back, and the guest run until it notices.
            g.vm.set_user_memory_region(0, GPA, g.size, g.ram, 0)
            first = (d.heap_gpa - GPA) // g.page
            n = -(-d.heap_size // g.page)
            stale = tagkernel.unpacked(snapshot[first * g.ppp : (first + n) * g.ppp])
            g.vm.mte_copy_tags(d.heap_gpa, n * g.page, stale, TO)
            crash = None
            for k in range(1, 201):
                ex = g.run(k % NVCPUS)
                if not is_heartbeat(ex):
                    crash = ex
                    break
            if crash is None or crash.reason != uapi.KVM_EXIT_SYSTEM_EVENT:
                print(f"stale tags: no crash exit ({crash})", file=sys.stderr)
                return 1
            kind = (
                "KVM_SYSTEM_EVENT_CRASH"
                if crash.event == uapi.KVM_SYSTEM_EVENT_CRASH
                else (f"system event {crash.event}")
            )
            print(f"stale tags (the first pass's copy, restored with TO_GUEST, logging off): "
                  f"crash exit {kind} at {crash.data[0]:#x} after {k} slice(s)")  # fmt: skip

        without, with_log = store_rates(kvm, args)
        overhead = (1 - with_log / without) * 100
        print(f"tag log overhead on the store rate: {overhead:+.1f}% ({without:,.0f} steps/s "
              f"without KVMTAG_CAP_TAG_LOG, {with_log:,.0f} with)")  # fmt: skip
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
