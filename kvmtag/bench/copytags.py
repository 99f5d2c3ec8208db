"""copy_tags: KVM_ARM_MTE_COPY_TAGS of a whole memslot (a memfd mapped shared here, MTE enabled,
tagged once with TO_GUEST first) through a real kvmtagd, in one ioctl each way: 1/16 of the guest
RAM in tag bytes. Baseline: as many bytes sent over a socketpair by a child Python process
(sendall in windows of wire.WINDOW) into a preallocated buffer here, timed from the request to
the last byte. Ratio: the baseline's time / the case's time (goal >= 0.5 both ways)."""

from __future__ import annotations

import contextlib
import mmap
import socket
import time
from collections.abc import Callable

from kvmtag import client, procmem, uapi, wire
from kvmtag.bench.core import (
    Context,
    Figure,
    Settings,
    child,
    measure,
    mte_vm,
    receive_exactly,
    summarise,
    timed,
)
from kvmtag.uapi import LAYOUT


def title(settings: Settings) -> str:
    return (
        f"copy_tags: KVM_ARM_MTE_COPY_TAGS of {settings.guest_bytes >> 20} MiB of guest RAM "
        f"({settings.guest_bytes >> 24} MiB of tags) through kvmtagd; "
        "ratio = socket time / case time"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """FROM_GUEST and TO_GUEST of a whole memslot in one ioctl, and the raw transfer of as many
    tag bytes from a child process."""
    guest = settings.guest_bytes
    kvm_socket = context.kvm_socket()
    size = guest // 16  # one tag byte per 16-byte granule
    with contextlib.ExitStack() as stack:
        ours, theirs = (stack.enter_context(s) for s in socket.socketpair())
        stack.enter_context(child(_send_tags, theirs, size))
        received = memoryview(bytearray(size))

        def receive() -> list[float]:
            start = time.perf_counter()
            ours.sendall(b"g")
            receive_exactly(ours, received)
            return [time.perf_counter() - start]

        vm = mte_vm(stack, kvm_socket, guest)
        tags_in = stack.enter_context(mmap.mmap(-1, size))
        tags_in.write(bytes(range(16)) * (size // 16))
        tags_out = stack.enter_context(mmap.mmap(-1, size))

        def copy_tags(flags: int, tags: mmap.mmap) -> Callable[[], None]:
            address = procmem.buffer_address(tags).address
            arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(0, guest, address, flags, 0, 0)

            def run() -> None:
                result = client.ioctl(vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
                if result != guest:
                    raise RuntimeError(f"KVM_ARM_MTE_COPY_TAGS copied {result} of {guest} bytes")

            return run

        to_guest = copy_tags(uapi.KVM_ARM_TAGS_TO_GUEST, tags_in)
        to_guest()  # every page tagged before the first read
        runs = measure(
            {
                "socket": receive,
                "from_guest": timed(copy_tags(uapi.KVM_ARM_TAGS_FROM_GUEST, tags_out)),
                "to_guest": timed(to_guest),
            },
            settings.repeats,
        )
        if memoryview(tags_out) != memoryview(tags_in):
            raise RuntimeError("FROM_GUEST did not read back the tags TO_GUEST wrote")
    goals = {"from_guest": 0.5, "to_guest": 0.5}
    return summarise("copy_tags", runs, "socket", goals, nbytes=size)


def _send_tags(sock: socket.socket, size: int) -> None:
    """The baseline's child: `size` bytes in chunks of one window per byte received."""
    data = memoryview(bytes(range(16)) * (size // 16))
    while sock.recv(1):
        for at in range(0, size, wire.WINDOW):
            sock.sendall(data[at : at + wire.WINDOW])
