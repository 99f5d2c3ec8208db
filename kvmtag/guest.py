"""The emulated guest: a deterministic, seeded "tagged heap" that crashes when tags are lost.

A VMM boots it like a kernel image: it writes a descriptor (`GuestDescriptor`) into guest RAM,
sets x0 to its address and x1 to the vCPU's index, and pc to GUEST_ENTRY. Each vCPU then owns
every nvcpus-th object of the heap described there and, step after step:

- picks one of its objects and checks it with tag-checked loads: an allocated object's granules
  must carry the tag derived from (seed, index, generation), its header and payload must match
  that generation; a free object's granules must carry tag 0;
- then allocates, retags (a new generation: new payload, new tag) or frees it, each a guest store
  of data and tags;
- every scan_interval steps, scans all its objects' headers and compares the number of
  allocated objects and a hash of their (index, generation) with x4/x5.

The whole state lives in guest RAM (objects) and registers (x2 random state, x3 steps, x4
allocated count, x5 hash of allocated generations), so a guest copied correctly carries on, and
one whose tags or data were lost, stale or mixed up crashes, naming the faulting address.

Object layout (obj_size bytes, a power of two from 32 to 4096): header u32 state, u32 index, u64
generation; then payload bytes derived from (seed, index, generation). All granules of an
allocated object carry its tag (1..15, consecutive generations always differ); free objects 0.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

GUEST_ENTRY = 0x4008_0000  # pc at boot: where "the image" is entered
GUEST_LOOP = GUEST_ENTRY + 0x100  # pc while running
GUEST_CRASHED = GUEST_ENTRY + 0x200  # pc after a crash (further runs report it again)
HEARTBEAT_GPA = 0x0900_0000  # MMIO address of the heartbeat the guest writes after each slice
PACING_NAP = 0.001  # seconds: the longest sleep between two looks at should_stop
DESC_MAGIC = b"KVMTAGG1"
ALLOCATED, FREE = 0x4F424A21, 0x46524545  # header states ("OBJ!", "FREE"); 0: never used

_DESC = struct.Struct("<8sQQIIQIIII")
_HEADER = struct.Struct("<IIQ")
_MASK64 = 2**64 - 1


@dataclass(frozen=True)
class GuestDescriptor:
    """What the VMM writes into guest RAM at x0."""

    heap_gpa: int
    heap_size: int
    obj_size: int = 64
    nvcpus: int = 1
    seed: int = 1
    steps_per_run: int = 1000  # guest steps in one KVM_RUN slice, then a heartbeat MMIO exit
    store_rate: int = 0  # stores per second per vCPU; 0: as fast as it goes
    scan_interval: int = 2000  # steps between full scans of the vCPU's objects

    SIZE = _DESC.size

    def pack(self) -> bytes:
        return _DESC.pack(
            DESC_MAGIC, self.heap_gpa, self.heap_size, self.obj_size, self.nvcpus, self.seed,
            self.steps_per_run, self.store_rate, self.scan_interval, 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> GuestDescriptor | None:
        if len(data) != _DESC.size:
            return None
        magic, heap, size, osz, nv, seed, steps, rate, scan, _ = _DESC.unpack(data)
        if magic != DESC_MAGIC or not _valid_obj_size(osz) or nv < 1 or size < osz:
            return None
        return cls(heap, size, osz, nv, seed, max(steps, 1), rate, max(scan, 1))


def _valid_obj_size(n: int) -> bool:
    return 32 <= n <= 4096 and n & (n - 1) == 0


class Memory(Protocol):
    """What the guest can do to its RAM (kvmtag.guestmem.GuestMemory)."""

    def read(self, gpa: int, n: int) -> bytes: ...
    def check_tags(self, gpa: int, n: int, tag: int) -> int | None: ...
    def store(
        self, gpa: int, data: bytes, tag: int | None = None, tag_bytes: int | None = None
    ) -> None: ...


class Crash(Exception):
    """The guest detected corruption (a tag-check fault or a broken object) at `gpa`."""

    def __init__(self, gpa: int, why: str) -> None:
        super().__init__(f"guest crash at {gpa:#x}: {why}")
        self.gpa = gpa


@dataclass
class Slice:
    """What one KVM_RUN slice did."""

    steps: int
    stores: int


def _h64(*values: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(struct.pack(f"<{len(values)}Q", *values), digest_size=8).digest(), "little"
    )


class TaggedHeap:
    """One vCPU's guest. `regs` is the vCPU's register file (ONE_REG names: x0.., pc)."""

    def __init__(self, regs: dict[str, int], memory: Memory) -> None:
        self.regs = regs
        self.mem = memory

    def run(self, should_stop: Callable[[], bool], max_seconds: float = 0.05) -> Slice:
        """Run one slice: steps_per_run steps, less if should_stop() or time runs out.
        Raises Crash, or a kvmtag.guestmem.GuestExit for an access that leaves the guest."""
        r = self.regs
        if r["pc"] == GUEST_CRASHED:
            raise Crash(r["x6"], "the guest had crashed")
        desc = self._descriptor()
        if r["pc"] == GUEST_ENTRY:
            seed = (desc.seed ^ (r["x1"] * 0x9E3779B97F4A7C15)) & _MASK64
            r.update(x2=seed or 1, x3=0, x4=0, x5=0)
            r["pc"] = GUEST_LOOP
        elif r["pc"] != GUEST_LOOP:
            raise Crash(r["pc"], "pc is not in the guest image")
        start = time.monotonic()
        deadline = start + max_seconds
        steps = stores = 0
        while steps < desc.steps_per_run and not should_stop():
            if steps % 64 == 0 and time.monotonic() > deadline:
                break
            if desc.store_rate:  # pace the stores: wait until the next one is due
                behind = stores / desc.store_rate - (time.monotonic() - start)
                if behind > 0:
                    if time.monotonic() + behind > deadline:
                        break
                    # In short naps, so a VMM that asks the vCPU out is not kept waiting.
                    time.sleep(min(behind, PACING_NAP))
                    continue
            stores += self._step(desc)
            steps += 1
            if r["x3"] % desc.scan_interval == 0:
                self._scan(desc)
        return Slice(steps, stores)

    # --- one step ------------------------------------------------------------------------------

    def _objects(self, desc: GuestDescriptor) -> int:
        total = desc.heap_size // desc.obj_size
        return max(0, (total - self.regs["x1"] + desc.nvcpus - 1) // desc.nvcpus)

    def _address(self, desc: GuestDescriptor, j: int) -> tuple[int, int]:
        index = self.regs["x1"] + j * desc.nvcpus
        return index, desc.heap_gpa + index * desc.obj_size

    def _next_random(self) -> int:
        x = self.regs["x2"]
        x ^= (x << 13) & _MASK64
        x ^= x >> 7
        x ^= (x << 17) & _MASK64
        self.regs["x2"] = x
        return x

    def _step(self, desc: GuestDescriptor) -> int:
        r = self.regs
        count = self._objects(desc)
        if not count:
            raise Crash(desc.heap_gpa, "the heap holds no object for this vCPU")
        rnd = self._next_random()
        index, gpa = self._address(desc, rnd % count)
        r["x3"] = (r["x3"] + 1) & _MASK64
        state, generation = self._check(desc, index, gpa)
        choice = (rnd >> 32) & 3
        if state == ALLOCATED:
            if choice == 0:
                return 0  # a load only
            if choice == 1:  # free: keep the generation, drop the tag
                header = _HEADER.pack(FREE, index, generation)
                self.mem.store(gpa, header, tag=0, tag_bytes=desc.obj_size)
                r["x4"] -= 1
                r["x5"] ^= _h64(index, generation)
                return 1
            new = generation + 1  # retag
            self._write_object(desc, index, gpa, new)
            r["x5"] ^= _h64(index, generation) ^ _h64(index, new)
            return 1
        new = generation + 1  # allocate
        self._write_object(desc, index, gpa, new)
        r["x4"] += 1
        r["x5"] ^= _h64(index, new)
        return 1

    def _check(self, desc: GuestDescriptor, index: int, gpa: int) -> tuple[int, int]:
        """Tag-checked loads of one object; its (state, generation)."""
        raw = self.mem.read(gpa, desc.obj_size)
        state, idx, generation = _HEADER.unpack_from(raw)
        if state == ALLOCATED:
            tag = _tag(desc.seed, index, generation)
            bad = self.mem.check_tags(gpa, desc.obj_size, tag)
            if bad is not None:
                raise self._crash(bad, f"tag check fault: object {index} expects tag {tag:#x}")
            if idx != index or raw[_HEADER.size :] != _payload(desc, index, generation):
                raise self._crash(gpa, f"object {index} (generation {generation}) is corrupt")
        elif state in (FREE, 0):
            if state == 0 and (idx or generation):
                raise self._crash(gpa, f"object {index} has a broken header")
            if state == FREE and idx != index:
                raise self._crash(gpa, f"free object {index} has a broken header")
            bad = self.mem.check_tags(gpa, desc.obj_size, 0)
            if bad is not None:
                raise self._crash(bad, f"tag check fault: free object {index} expects tag 0")
        else:
            raise self._crash(gpa, f"object {index} has an unknown state {state:#x}")
        return state, generation

    def _write_object(self, desc: GuestDescriptor, index: int, gpa: int, generation: int) -> None:
        data = _HEADER.pack(ALLOCATED, index, generation) + _payload(desc, index, generation)
        self.mem.store(gpa, data, _tag(desc.seed, index, generation))

    def _scan(self, desc: GuestDescriptor) -> None:
        """Every allocated object is where the registers say: count and generation hash."""
        count = hashed = 0
        for j in range(self._objects(desc)):
            index, gpa = self._address(desc, j)
            state, _, generation = _HEADER.unpack(self.mem.read(gpa, _HEADER.size))
            if state == ALLOCATED:
                count += 1
                hashed ^= _h64(index, generation)
        r = self.regs
        if (count, hashed) != (r["x4"], r["x5"]):
            raise self._crash(desc.heap_gpa, f"{count} objects allocated, registers say {r['x4']}")

    def _descriptor(self) -> GuestDescriptor:
        desc = GuestDescriptor.unpack(self.mem.read(self.regs["x0"], GuestDescriptor.SIZE))
        if desc is None:
            raise self._crash(self.regs["x0"], "no valid descriptor at x0")
        return desc

    def _crash(self, gpa: int, why: str) -> Crash:
        self.regs["pc"] = GUEST_CRASHED
        self.regs["x6"] = gpa
        return Crash(gpa, why)


def _tag(seed: int, index: int, generation: int) -> int:
    """1..15, never the same for consecutive generations of one object."""
    return 1 + (_h64(seed, index) + generation) % 15


def _payload(desc: GuestDescriptor, index: int, generation: int) -> bytes:
    n = desc.obj_size - _HEADER.size
    block = hashlib.blake2b(struct.pack("<3Q", desc.seed, index, generation), digest_size=64)
    out = block.digest()
    while len(out) < n:
        out += hashlib.blake2b(out[-64:], digest_size=64).digest()
    return out[:n]
