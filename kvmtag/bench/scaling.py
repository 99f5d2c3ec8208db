"""scaling: aggregate throughput of 1, 8 and 64 client processes at once against one kvmtagd,
and the cost of a memslot lookup in a VM with 10 memslots and in one with many.

Throughput: each client is a forked Python process with its own connection to kvmtagd and its
own VM (MTE on, one memslot: a memfd mapped shared, tagged once with TO_GUEST). A case tells
its N clients to go and times until the last one is done; the N clients share the case's calls
evenly: `small_calls` KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) on the system fd, or `bulk_calls`
KVM_ARM_MTE_COPY_TAGS FROM_GUEST of the whole memslot (its tags: 1/16 of it). A figure's value
is the wall time per call over all clients (the inverse of the aggregate throughput: calls/s
and GiB/s of tags beside it). Ratio: aggregate throughput with N clients / with 1. No goal:
it documents how one daemon scales on this machine, whatever its number of CPUs.

Lookup: KVM_ARM_MTE_COPY_TAGS FROM_GUEST of one page at a random memslot per call, through
kvmtagd, in a VM with 10 memslots and in one with `memslots` (one page each, at offsets of a
single memfd mapped once, so one backing fd whatever their number); and the same lookups in
the pure model in this process (kvmtag.memslots.Memslots.resolve of one page, as many slots).
Each call is timed; a repeat's figure is its median call, p99 beside it. Ratio: many slots /
10 slots. Goal <= 1.5 through the daemon: a lookup is a bisection (O(log n)), a few µs of a
round trip of tens of µs, so a lookup that grew with the slot count (a scan, a per-call copy of
the table) shows at once, while 1.5 leaves room for the cache misses of a table of 30,000
slots. No goal in process, where the lookup is all there is: there the ratio shows what those
cache misses and the deeper bisection cost, and it is expected to be well above 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from kvmtag import client, procmem, uapi
from kvmtag.bench.core import (
    Case,
    Context,
    Figure,
    Settings,
    child,
    log,
    measure,
    mte_vm,
    new_mte_vm,
    shared_ram,
    summarise,
)
from kvmtag.memslots import Memslot, Memslots, segments_of
from kvmtag.tagstore import TagStore
from kvmtag.uapi import LAYOUT
from kvmtag.usermem import Vma, VmaKind

FEW_MEMSLOTS = 10
LOOKUP_GOAL = 1.5
"""Through the daemon, a lookup among many memslots takes at most this many times as long as
among FEW_MEMSLOTS (see the module's docstring)."""
CONTROL_TIMEOUT = 300.0
"""Seconds a client may take to get ready or to finish a case before the run is abandoned."""

REQUEST = struct.Struct("<cI")  # what to do, calls to make
SMALL, BULK = b"s", b"b"
T = TypeVar("T")
READY, DONE, FAILED = b"r", b"d", b"e"


def title(settings: Settings) -> str:
    n = ", ".join(map(str, settings.clients))
    return (
        f"scaling: {n} client processes at once against one kvmtagd "
        f"({settings.small_calls} KVM_CHECK_EXTENSION or {settings.bulk_calls} COPY_TAGS of a "
        f"{settings.client_guest_bytes >> 20} MiB memslot in all; ratio = aggregate throughput "
        f"/ 1 client's); lookup of one of {FEW_MEMSLOTS} or {settings.memslots} memslots "
        f"({settings.iterations} calls; ratio = case / {FEW_MEMSLOTS} slots)"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """Throughput with each number of clients, then memslot lookups."""
    kvm_socket = context.kvm_socket()
    return throughput(settings, kvm_socket) + lookups(settings, kvm_socket)


# --- aggregate throughput -----------------------------------------------------------------------


def throughput(settings: Settings, kvm_socket: str) -> list[Figure]:
    """One pool of max(settings.clients) client processes; a case with N clients uses the
    first N of them, so the pool is forked and set up once and never outnumbers the largest
    case."""
    guest = settings.client_guest_bytes
    with contextlib.ExitStack() as stack:
        controls: list[socket.socket] = []
        for _ in range(max(settings.clients)):
            ours, theirs = socket.socketpair()
            stack.enter_context(ours)
            with theirs:  # the child keeps its copy
                stack.enter_context(child(_client, theirs, kvm_socket, guest))
            ours.settimeout(CONTROL_TIMEOUT)
            controls.append(ours)
        for i, control in enumerate(controls):
            _expect(control, READY, i)

        def aggregate(what: bytes, n: int, total: int) -> Case:
            per_client = max(1, total // n)
            request = REQUEST.pack(what, per_client)

            def run() -> list[float]:
                start = time.perf_counter()
                for control in controls[:n]:
                    control.sendall(request)
                for i, control in enumerate(controls[:n]):
                    _expect(control, DONE, i)
                return [(time.perf_counter() - start) / (per_client * n)]

            return run

        cases = {f"check_extension_n{n}": aggregate(SMALL, n, settings.small_calls)
                 for n in settings.clients}  # fmt: skip
        cases |= {f"copy_tags_n{n}": aggregate(BULK, n, settings.bulk_calls)
                  for n in settings.clients}  # fmt: skip
        runs = measure(cases, settings.repeats)

    def group(prefix: str, nbytes: int | None) -> list[Figure]:
        chosen = {name: r for name, r in runs.items() if name.startswith(prefix)}
        figures = summarise("scaling", chosen, f"{prefix}{settings.clients[0]}", {}, nbytes=nbytes)
        return [dataclasses.replace(f, extra={"calls/s": 1 / f.median}) for f in figures]

    return group("check_extension_n", None) + group("copy_tags_n", guest // 16)


def _client(control: socket.socket, kvm_socket: str, guest: int) -> None:
    """A client process: sets up its VM, says READY, then makes the calls each request asks
    for and says DONE, until the control socket closes. Any error is reported as FAILED."""
    try:
        with contextlib.ExitStack() as stack:
            kvm = client.open("/dev/kvm", socket=kvm_socket)
            stack.callback(client.close, kvm)
            vm = mte_vm(stack, kvm_socket, guest)
            size = guest // 16
            tags = stack.enter_context(mmap.mmap(-1, size))
            tags.write(bytes(range(16)) * (size // 16))
            address = procmem.buffer_address(tags).address
            copy = LAYOUT["kvm_arm_copy_mte_tags"]
            _copy_tags(vm, copy.pack(0, guest, address, uapi.KVM_ARM_TAGS_TO_GUEST, 0, 0), guest)
            from_guest = copy.pack(0, guest, address, uapi.KVM_ARM_TAGS_FROM_GUEST, 0, 0)
            control.sendall(READY)
            while request := control.recv(REQUEST.size, socket.MSG_WAITALL):
                what, calls = REQUEST.unpack(request)
                for _ in range(calls):
                    if what == SMALL:
                        result = client.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE)
                        if result != 1:
                            raise RuntimeError(f"KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) = {result}")
                    else:
                        _copy_tags(vm, from_guest, guest)
                control.sendall(DONE)
    except Exception as e:  # reported to the parent, which raises it there
        with contextlib.suppress(OSError):
            control.sendall(FAILED + f"{type(e).__name__}: {e}".encode())


def _copy_tags(vm: int, arg: bytes, length: int) -> None:
    result = client.ioctl(vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
    if result != length:
        raise RuntimeError(f"KVM_ARM_MTE_COPY_TAGS copied {result} of {length} bytes")


def _expect(control: socket.socket, what: bytes, i: int) -> None:
    """The next byte from client i is `what`; a failure it reports is raised here."""
    try:
        got = control.recv(1)
    except TimeoutError as e:
        raise RuntimeError(f"scaling client {i} did not answer in {CONTROL_TIMEOUT:.0f} s") from e
    if got == what:
        return
    if got == FAILED:
        message = b""
        while part := control.recv(4096):
            message += part
        raise RuntimeError(f"scaling client {i} failed: {message.decode(errors='replace')}")
    raise RuntimeError(f"scaling client {i} is gone (sent {got!r})")


# --- memslot lookup -----------------------------------------------------------------------------


def lookups(settings: Settings, kvm_socket: str) -> list[Figure]:
    """COPY_TAGS of one page at random memslots through kvmtagd, and Memslots.resolve in
    process, each with FEW_MEMSLOTS and settings.memslots slots."""
    counts = (FEW_MEMSLOTS, settings.memslots)
    calls = settings.iterations
    with contextlib.ExitStack() as stack:
        kvm = client.open("/dev/kvm", socket=kvm_socket)
        stack.callback(client.close, kvm)
        page = client.info(kvm).page_size
        tags = stack.enter_context(mmap.mmap(-1, page // 16))
        address = procmem.buffer_address(tags).address
        cases: dict[str, Case] = {}
        for count in counts:
            vm = _slotted_vm(stack, kvm, count, page)
            slots = random.Random(count).choices(range(count), k=calls)
            args = [
                LAYOUT["kvm_arm_copy_mte_tags"].pack(
                    2 * s * page, page, address, uapi.KVM_ARM_TAGS_FROM_GUEST, 0, 0
                )
                for s in slots
            ]
            cases[f"daemon_lookup_{count}"] = _timed_each(
                functools.partial(_copy_tags, vm, length=page), args
            )
        for count in counts:
            model = _model_slots(count, page)
            gfns = [2 * s for s in random.Random(count).choices(range(count), k=calls)]
            cases[f"model_lookup_{count}"] = _timed_each(functools.partial(_resolve, model), gfns)
        runs = measure(cases, settings.repeats)

    def group(prefix: str, goal: float | None) -> list[Figure]:
        chosen = {name: r for name, r in runs.items() if name.startswith(prefix)}
        goals = {} if goal is None else {f"{prefix}{counts[1]}": goal}
        return summarise(
            "scaling", chosen, f"{prefix}{counts[0]}", goals, lower_is_better=True, p99=True
        )

    return group("daemon_lookup_", LOOKUP_GOAL) + group("model_lookup_", None)


def _slotted_vm(stack: contextlib.ExitStack, kvm: int, count: int, page: int) -> int:
    """A VM with MTE and `count` memslots of one page: slot i at guest page 2i (a hole after
    each), backed by page i of one memfd mapped shared. Closed with `stack`."""
    log.info("scaling: creating a VM with %d memslots", count)
    vm = new_mte_vm(stack, kvm)
    base = shared_ram(stack, count * page)
    region = LAYOUT["kvm_userspace_memory_region"]
    for i in range(count):
        arg = region.pack(i, 0, 2 * i * page, page, base + i * page)
        client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, arg)
    return vm


def _model_slots(count: int, page: int) -> Memslots:
    """The model's table for the same layout as _slotted_vm's (one shared mapping)."""
    store = TagStore(page)
    base = 1 << 32
    vma = Vma(base, base + count * page, VmaKind.SHMEM, shared=True, dev=1, ino=1)
    memslots = Memslots()
    for i in range(count):
        uaddr = base + i * page
        segments = segments_of([vma], uaddr, 1, page, store, "bench")
        memslots.add(Memslot(i, 0, 2 * i, 1, uaddr, segments))
    return memslots


def _resolve(memslots: Memslots, gfn: int) -> None:
    _, done = memslots.resolve(gfn, 1, write=False)
    if done != 1:
        raise RuntimeError(f"guest frame {gfn:#x} is in no memslot of the model")


def _timed_each(operation: Callable[[T], None], args: list[T]) -> Case:
    """A case that calls `operation` on each of `args`, each call timed."""

    def run() -> list[float]:
        times = []
        for arg in args:
            start = time.perf_counter_ns()
            operation(arg)
            times.append(time.perf_counter_ns() - start)
        return [t / 1e9 for t in times]

    return run
