"""memory: the memory the tag store holds for a 64 GiB guest (quick: 1 GiB) of 4 KiB pages with
10% of its pages tagged, at random pages in a random order, with non-zero tags (one shared
backing, one TO_GUEST-like Backing.write per page). Each repeat runs in a fresh Python process,
so its RSS is the store's alone. Baseline: the packed tag bytes of the tagged pages (PAGE_SIZE/32
each). Cases: "rss", the growth of the process's resident memory over the tagging; "nbytes", what
the store says it holds (the tag-storage quota's measure). Ratio: case / baseline (goal: rss
<= 1.2).

The fixed base left out of "rss" is everything the process holds before the tagging starts: the
interpreter, kvmtag, the list of pages to tag and the source tags, an empty TagStore with its
backing; and the Python allocations of the tagging loop itself, which an identical loop calling
a no-op instead of Backing.write makes first (so the measured loop reuses them).
"""

from __future__ import annotations

import array
import gc
import json
import mmap
import random
import subprocess
import sys

from kvmtag.bench.core import Context, Figure, Settings, summarise

PAGE_SIZE = 4096
TAGGED = 10
"""Percent of the guest's pages tagged."""

FULL_GUEST = 64 << 30
QUICK_GUEST = 1 << 30
CHILD_TIMEOUT = 300


def title(settings: Settings) -> str:
    guest = QUICK_GUEST if settings.quick else FULL_GUEST
    return (
        f"memory: tag store of a {guest >> 30} GiB guest, {TAGGED}% of its 4 KiB pages tagged "
        "at random; ratio = case / packed tag bytes"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """One fresh child process per repeat (no warm-up run: a child starts from nothing)."""
    guest = QUICK_GUEST if settings.quick else FULL_GUEST
    runs: dict[str, list[list[float]]] = {"packed": [], "rss": [], "nbytes": []}
    for repeat in range(settings.repeats):
        held = measure_in_child(guest, seed=repeat)
        for name, values in runs.items():
            values.append([float(held[name])])
    return summarise("memory", runs, "packed", {"rss": 1.2}, lower_is_better=True, unit="B")


def measure_in_child(guest_bytes: int, seed: int) -> dict[str, int]:
    """`held(guest_bytes, seed)` in a fresh Python process."""
    code = f"import json, {__name__} as m; print(json.dumps(m.held({guest_bytes}, {seed})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )
    if out.returncode:
        raise RuntimeError(f"the memory benchmark's child failed:\n{out.stderr}")
    result: dict[str, int] = json.loads(out.stdout)
    return result


def held(guest_bytes: int, seed: int) -> dict[str, int]:
    """Tags 10% of a guest's pages at random in this process; returns the packed bytes of the
    tagged pages, the RSS the tagging added and the store's nbytes. Meant for a fresh process:
    see the module docstring for what the RSS leaves out."""
    from kvmtag.tagstore import TagStore, shared_key

    npages = guest_bytes // PAGE_SIZE
    ntagged = npages * TAGGED // 100
    tpp = PAGE_SIZE // 16
    rng = random.Random(seed)
    pages = _distinct_pages(rng, npages, ntagged)
    # 64 pages of random non-zero tags, taken in turn: no page is all zero (no page is elided).
    sources = [memoryview(bytes(rng.randrange(1, 16) for _ in range(tpp))) for _ in range(64)]
    store = TagStore(PAGE_SIZE)
    backing = store.attach(shared_key(0, 0), "bench")

    def nothing(page: int, n: int, src: memoryview) -> None:
        pass

    for write in (nothing, backing.write):  # the first run only allocates what the loop needs
        gc.collect()
        before = _rss()
        for i, page in enumerate(pages):
            write(page, 1, sources[i & 63])
        gc.collect()
        grown = _rss() - before
    return {"packed": ntagged * PAGE_SIZE // 32, "rss": grown, "nbytes": store.nbytes}


def _distinct_pages(rng: random.Random, npages: int, count: int) -> array.array[int]:
    """`count` distinct pages of [0, npages) in a random order (random.sample would build a list
    of all npages first)."""
    taken = bytearray(npages)
    pages = array.array("Q")
    while len(pages) < count:
        page = rng.randrange(npages)
        if not taken[page]:
            taken[page] = 1
            pages.append(page)
    return pages


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE
