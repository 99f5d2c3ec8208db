"""tagkernel: the C kernel's pack and unpack of one-per-byte tags against a memcpy of as many
bytes. Ratio: memcpy's time / the case's time (goal >= 0.9)."""

from __future__ import annotations

import os

from kvmtag import tagkernel
from kvmtag.bench.core import Context, Figure, Settings, measure, summarise, timed


def title(settings: Settings) -> str:
    return (
        f"tagkernel: pack/unpack of {settings.tag_bytes >> 20} MiB of one-per-byte tags; "
        "ratio = memcpy time / case time"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """memcpy, pack and unpack of `settings.tag_bytes` one-per-byte tags (no daemon needed)."""
    size = settings.tag_bytes
    tags = os.urandom(size)  # random high nibbles too: pack must ignore them
    copy = memoryview(bytearray(size))
    packed = bytearray(size // 2)
    unpacked = bytearray(size)

    def memcpy() -> None:
        copy[:] = tags  # one memcpy of the contiguous buffers

    runs = measure(
        {
            "memcpy": timed(memcpy),
            "pack": timed(lambda: tagkernel.pack(packed, tags)),
            "unpack": timed(lambda: tagkernel.unpack(unpacked, packed)),
        },
        settings.repeats,
    )
    return summarise("tagkernel", runs, "memcpy", {"pack": 0.9, "unpack": 0.9}, nbytes=size)
