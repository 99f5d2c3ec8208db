"""Benchmark of the C tag kernel: pack and unpack of 64 MiB of tags against memcpy.

    python -m kvmtag.bench [--json PATH]

The budget (shared/DESIGN.md, "Performance budget"): packing and unpacking 64 MiB of
one-per-byte tags runs at ≥ 0.9× the speed of a memcpy of those 64 MiB. The baseline is measured
in the same run, on the same machine, between two preallocated buffers, and the cases take
turns within each repeat, so that a machine getting busier or quieter affects them alike.
Ratios are throughputs on the same 64 MiB of tags: memcpy's time / the case's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvmtag import tagkernel

TAG_BYTES = 64 << 20
"""One-per-byte tags moved per call: those of 1 GiB of tagged memory (one tag per 16 bytes)."""
REPEATS = 7
BUDGET = 0.9
"""Minimum throughput ratio to memcpy for pack and unpack."""
SPREAD_WARNING = 0.20
"""A case whose (max - min) / median exceeds this was measured on a noisy machine."""


@dataclass(frozen=True)
class Result:
    name: str
    seconds: list[float]
    median_s: float
    min_s: float
    max_s: float
    gib_per_s: float
    ratio: float
    """memcpy's median time / this case's median time."""
    spread: float


def measure(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Times each case `repeats` times, round-robin, after one untimed warm-up call each."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def run_benchmark(tag_bytes: int = TAG_BYTES, repeats: int = REPEATS) -> list[Result]:
    """Measures memcpy, pack and unpack of `tag_bytes` one-per-byte tags; memcpy first."""
    tags = os.urandom(tag_bytes)  # random high nibbles too: pack must ignore them
    copy = bytearray(tag_bytes)
    packed = bytearray(tag_bytes // 2)
    unpacked = bytearray(tag_bytes)
    copy_view = memoryview(copy)

    def memcpy() -> None:
        copy_view[:] = tags  # one memcpy of the contiguous buffers

    times = measure(
        {
            "memcpy": memcpy,
            "pack": lambda: tagkernel.pack(packed, tags),
            "unpack": lambda: tagkernel.unpack(unpacked, packed),
        },
        repeats,
    )
    baseline = statistics.median(times["memcpy"])
    results = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        results.append(
            Result(
                name=name,
                seconds=seconds,
                median_s=median,
                min_s=min(seconds),
                max_s=max(seconds),
                gib_per_s=tag_bytes / median / (1 << 30),
                ratio=baseline / median,
                spread=(max(seconds) - min(seconds)) / median,
            )
        )
    return results


def format_table(results: list[Result], tag_bytes: int, repeats: int) -> str:
    lines = [
        f"tag kernel: {tag_bytes >> 20} MiB of one-per-byte tags, {repeats} repeats "
        f"(budget: pack and unpack ≥ {BUDGET}× memcpy)",
        f"{'case':<8} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'GiB/s':>7} {'ratio':>6}",
    ]
    for r in results:
        verdict = "" if r.name == "memcpy" else ("  ok" if r.ratio >= BUDGET else "  BELOW BUDGET")
        lines.append(
            f"{r.name:<8} {r.median_s * 1e3:>10.2f} {r.min_s * 1e3:>8.2f} {r.max_s * 1e3:>8.2f} "
            f"{r.gib_per_s:>7.2f} {r.ratio:>6.2f}{verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvmtag.bench",
        description="pack and unpack of 64 MiB of tags against memcpy",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    results = run_benchmark()
    print(format_table(results, TAG_BYTES, REPEATS))
    for r in results:
        if r.spread > SPREAD_WARNING:
            print(
                f"warning: {r.name} spread {r.spread:.0%} > {SPREAD_WARNING:.0%} "
                "(noisy machine?): rerun before trusting its ratio",
                file=sys.stderr,
            )
    if args.json:
        report = {
            "benchmark": "tagkernel",
            "tag_bytes": TAG_BYTES,
            "repeats": REPEATS,
            "baseline": "memcpy",
            "budget": BUDGET,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
