"""The tag store: packed, lazily allocated, keyed by backing memory, released with its holders."""

from __future__ import annotations

import pytest

from kvmtag.tagstore import CHUNK_BYTES, TagStore, private_key, shared_key


def tags(pages: int, tpp: int, seed: int = 0) -> bytes:
    return bytes((i * 5 + seed) % 16 for i in range(pages * tpp))


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_write_read_across_chunks(page_size: int) -> None:
    store = TagStore(page_size)
    backing = store.attach(shared_key(1, 2), "vmm")
    tpp = page_size // 16
    first = backing.chunk_pages - 2  # straddles the first chunk boundary
    data = tags(5, tpp)
    backing.write(first, 5, memoryview(data))
    out = bytearray(9 * tpp)
    backing.read(first - 2, 9, memoryview(out))
    assert out == bytes(2 * tpp) + data + bytes(2 * tpp)
    assert backing.tagged_pages() == 5
    assert backing.is_tagged(first) and not backing.is_tagged(first - 1)
    assert backing.nbytes >= 2 * CHUNK_BYTES


def test_never_tagged_costs_nothing() -> None:
    backing = TagStore(4096).attach(private_key("p"), "p")
    out = bytearray(b"\xaa" * 256 * 3)
    backing.read(10**9, 3, memoryview(out))  # far away: no chunk, reads as zero
    assert out == bytes(len(out))
    assert backing.nbytes == 0


def test_clear_zeroes_and_marks_tagged() -> None:
    backing = TagStore(4096).attach(shared_key(1, 3), "vmm")
    backing.write(0, 2, memoryview(tags(2, 256, 1)))
    backing.clear(1, 2)
    out = bytearray(3 * 256)
    backing.read(0, 3, memoryview(out))
    assert out == tags(2, 256, 1)[:256] + bytes(512)
    assert [backing.is_tagged(p) for p in range(4)] == [True, True, True, False]


def test_write_prefix_only_touches_tagged_pages() -> None:
    backing = TagStore(4096).attach(shared_key(1, 4), "vmm")
    backing.write_prefix(0, memoryview(b"\x07" * 3))
    assert not backing.is_tagged(0)
    backing.write(1, 1, memoryview(bytes(256)))
    backing.write_prefix(1, memoryview(b"\x07" * 3))  # odd length: ends mid-byte when packed
    out = bytearray(256)
    backing.read(1, 1, memoryview(out))
    assert out == b"\x07" * 3 + bytes(253)


def test_backings_live_while_a_holder_does() -> None:
    store = TagStore(4096)
    key = shared_key(7, 8)
    a = store.attach(key, "first")
    assert store.attach(key, "second") is a
    store.release_process("first")
    assert store.get(key) is a
    store.release_process("second")
    assert store.get(key) is None and len(store) == 0
