"""The performance budget (shared/DESIGN.md), measured as ratios to baselines of the same run.

    python -m kvmtag.bench [--quick] [--json PATH] [--only NAME[,NAME]]

Each benchmark is a module of this package (its docstring says what it measures and against
what); every figure stands beside a baseline measured in the same run on the same machine. A
figure's median, min and max are over repeats; a spread ((max - min) / median) above 20% is
logged as a warning: rerun before trusting it. Goals are reported, never enforced: the exit
status is 0 whatever the ratios.

kvmtagd is started as a subprocess on a socket in a temporary directory and stopped at the end;
child processes are forked before this process connects to kvmtagd or maps guest RAM (so no
client connection is inherited, and forking stays cheap), and are stopped when their benchmark
ends, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from kvmtag.bench.core import (
    FULL,
    QUICK,
    SPREAD_WARNING,
    Context,
    Figure,
    Settings,
    exit_on_sigterm,
    log,
)

BENCHMARKS = {
    "tagkernel": "kvmtag.bench.tagkernel",
    "copy_tags": "kvmtag.bench.copytags",
    "roundtrip": "kvmtag.bench.roundtrip",
    "memory": "kvmtag.bench.memory",
    "scaling": "kvmtag.bench.scaling",
    "migration": "kvmtag.bench.migration",
}
"""Name on the command line -> module with title(settings) and run(settings, context); they run
in this order (the slowest last)."""


def modules(names: set[str]) -> dict[str, ModuleType]:
    return {n: importlib.import_module(m) for n, m in BENCHMARKS.items() if n in names}


def run_benchmarks(settings: Settings, names: set[str]) -> list[Figure]:
    """The selected benchmarks, in BENCHMARKS order."""
    figures: list[Figure] = []
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="kvmtag-bench-") as tmp,
    ):
        context = Context(stack, Path(tmp))
        for module in modules(names).values():
            log.info("%s", module.title(settings))
            figures += module.run(settings, context)
    return figures


def _scale(group: list[Figure]) -> tuple[float, str]:
    """One unit for a group's medians: latencies in µs, others by the baseline's size."""
    if group[0].unit == "B":
        return 2**-20, "MiB"
    if group[0].p99 is not None or group[0].baseline_median < 1e-4:
        return 1e6, "µs"
    return (1.0, "s") if group[0].baseline_median >= 10 else (1e3, "ms")


def _groups(figures: list[Figure]) -> list[list[Figure]]:
    """Figures by baseline, in order of first appearance."""
    groups: dict[str, list[Figure]] = {}
    for f in figures:
        groups.setdefault(f.baseline, []).append(f)
    return list(groups.values())


def _extras(f: Figure) -> str:
    return "  ".join(
        f"{k} {v:.0f}" if abs(v) >= 100 else f"{k} {v:.3g}" for k, v in f.extra.items()
    )


def format_table(figures: list[Figure], settings: Settings) -> str:
    """One section per benchmark (its title, then its figures); within it, one block per
    baseline, headed by its columns, the baseline first."""
    repeats = f"{settings.repeats} repeats"
    if any(f.benchmark == "migration" for f in figures):
        repeats += f" (migration: {settings.migration_repeats})"
    lines = [f"{repeats}; median, min and max over repeats"]
    for benchmark, module in modules({f.benchmark for f in figures}).items():
        lines += ["", module.title(settings)]
        for group in _groups([f for f in figures if f.benchmark == benchmark]):
            scale, unit = _scale(group)
            rate = "p99" if group[0].p99 is not None else "GiB/s" if group[0].gib_per_s else ""
            lines.append(f"{'case':<28} {'median':>14} {'min':>10} {'max':>10} {rate:>8} "
                         f"{'ratio':>6}  goal")  # fmt: skip
            for f in group:
                extra = f.p99 * scale if f.p99 is not None else f.gib_per_s
                verdict = "" if f.goal is None else f"{f.goal}: {'ok' if f.met else 'MISSED'}"
                if f.spread > SPREAD_WARNING:
                    verdict += f" (noisy: spread {f.spread:.0%})"
                if f.extra:
                    verdict += f"  [{_extras(f)}]"
                lines.append(
                    f"{f.name:<28} {f.median * scale:>10.2f} {unit:<3} {f.min * scale:>10.2f} "
                    f"{f.max * scale:>10.2f} {'' if extra is None else f'{extra:.2f}':>8} "
                    f"{f.ratio:>6.2f}  {verdict.strip()}".rstrip()
                )
    return "\n".join(lines)


def _names(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(BENCHMARKS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(sorted(unknown)) or '(none)'}; "
            f"choose from {', '.join(BENCHMARKS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvmtag.bench",
        description="the performance budget of shared/DESIGN.md, as ratios to baselines "
        "measured in the same run",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts (CI smoke)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", type=_names, default=set(BENCHMARKS),
        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="kvmtag.bench: %(levelname)s: %(message)s")
    settings = QUICK if args.quick else FULL

    figures = run_benchmarks(settings, args.only)
    print(format_table(figures, settings))
    noisy = [f for f in figures if f.spread > SPREAD_WARNING]
    for f in noisy:
        log.warning(
            "%s/%s: spread %.0f%% > %.0f%% (noisy machine?): rerun before trusting its ratio",
            f.benchmark, f.name, f.spread * 100, SPREAD_WARNING * 100,
        )  # fmt: skip
    if args.json:
        report = {
            "mode": "quick" if args.quick else "full",
            "settings": asdict(settings),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "titles": {name: m.title(settings) for name, m in modules(args.only).items()},
            "spread_warning": SPREAD_WARNING,
            "noisy": [f"{f.benchmark}/{f.name}" for f in noisy],
            "figures": [asdict(f) for f in figures],
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
