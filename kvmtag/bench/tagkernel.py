"""tagkernel: the C kernel's pack and unpack of one-per-byte tags against a memcpy of as many
bytes (ratio: memcpy's time / the case's time, goal >= 0.9), and against numpy doing the same
work (ratio: numpy's time / the C kernel's time, goal >= 4: the C kernel is worth its build).

numpy is given its best vectorised form, not a naive one: pairs of tags are read as
little-endian 16-bit words, so one pass of whole-array operations handles both granules of a
packed byte, into buffers allocated once. Its results are checked against the C kernel's once
per run."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from kvmtag import tagkernel
from kvmtag.bench.core import Context, Figure, Settings, measure, summarise, timed

NUMPY_GOAL = 4.0
"""The C kernel's pack and unpack are at least this many times as fast as numpy's."""

Bytes = npt.NDArray[np.uint8]
Words = npt.NDArray[np.uint16]


def title(settings: Settings) -> str:
    return (
        f"tagkernel: pack/unpack of {settings.tag_bytes >> 20} MiB of one-per-byte tags; "
        "ratio = baseline time / case time (c_* are pack and unpack against numpy)"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """memcpy, pack and unpack (C and numpy) of `settings.tag_bytes` one-per-byte tags (no
    daemon needed)."""
    size = settings.tag_bytes
    tags = os.urandom(size)  # random high nibbles too: pack must ignore them
    copy = memoryview(bytearray(size))
    packed = bytearray(size // 2)
    unpacked = bytearray(size)
    numpy_pack, numpy_packed = numpy_packer(tags)
    numpy_unpack, numpy_unpacked = numpy_unpacker(packed)

    def memcpy() -> None:
        copy[:] = tags  # one memcpy of the contiguous buffers

    tagkernel.pack(packed, tags)  # numpy_unpack's input, before its warm-up
    runs = measure(
        {
            "memcpy": timed(memcpy),
            "pack": timed(lambda: tagkernel.pack(packed, tags)),
            "unpack": timed(lambda: tagkernel.unpack(unpacked, packed)),
            "numpy_pack": timed(numpy_pack),
            "numpy_unpack": timed(numpy_unpack),
        },
        settings.repeats,
    )
    if numpy_packed.tobytes() != packed:
        raise RuntimeError("numpy's pack and the C kernel's disagree")
    if numpy_unpacked.tobytes() != unpacked:
        raise RuntimeError("numpy's unpack and the C kernel's disagree")

    def group(baseline: str, cases: dict[str, str], goal: float) -> list[Figure]:
        """Figures of `cases` (figure name -> measured case) against the case `baseline`."""
        chosen = {baseline: runs[baseline]} | {name: runs[case] for name, case in cases.items()}
        goals = dict.fromkeys(cases, goal)
        return summarise("tagkernel", chosen, baseline, goals, nbytes=size)

    return [
        *group("memcpy", {"pack": "pack", "unpack": "unpack"}, 0.9),
        # The same measurements of the C kernel, against numpy: one figure per comparison.
        *group("numpy_pack", {"c_pack": "pack"}, NUMPY_GOAL),
        *group("numpy_unpack", {"c_unpack": "unpack"}, NUMPY_GOAL),
    ]


def numpy_packer(tags: bytes) -> tuple[Callable[[], None], Bytes]:
    """numpy's pack of `tags` (one per byte) and the array it writes: packed[i] =
    (tags[2i] & 0xF) | (tags[2i+1] & 0xF) << 4."""
    words: Words = np.frombuffer(tags, dtype="<u2")  # tags[2i] | tags[2i+1] << 8
    low, shifted = np.empty_like(words), np.empty_like(words)
    out: Bytes = np.empty(len(words), dtype=np.uint8)

    def pack() -> None:
        np.bitwise_and(words, 0x0F0F, out=low)  # both tags' low nibbles, in bits 0-3 and 8-11
        np.right_shift(low, 4, out=shifted)  # the odd granule's into bits 4-7
        np.bitwise_or(low, shifted, out=low)
        np.copyto(out, low, casting="unsafe")  # the low byte of each word

    return pack, out


def numpy_unpacker(packed: bytearray) -> tuple[Callable[[], None], Bytes]:
    """numpy's unpack of `packed` (two tags per byte, low nibble first) and the array it
    writes: out[2i] = packed[i] & 0xF, out[2i+1] = packed[i] >> 4."""
    source: Bytes = np.frombuffer(packed, dtype=np.uint8)
    wide, shifted = np.empty(len(source), dtype=np.uint16), np.empty(len(source), dtype=np.uint16)
    out: Bytes = np.empty(2 * len(source), dtype=np.uint8)
    words = out.view("<u2")  # out[2i] | out[2i+1] << 8

    def unpack() -> None:
        np.copyto(wide, source)  # p
        np.left_shift(wide, 4, out=shifted)  # p << 4: the high nibble into bits 8-11
        np.bitwise_or(wide, shifted, out=words)
        np.bitwise_and(words, 0x0F0F, out=words)  # p & 0xF in bits 0-3, p >> 4 in bits 8-11

    return unpack, out
