"""migration: live migration of an active guest by kvmtag-vmm (clients/kvmtag_vmm) from one
kvmtagd to another, with MTE off (the baseline) and with MTE on, its tags sent with COPY_TAGS
or with the tag log. Per metric (total time, downtime, bytes on the wire) one figure per
configuration, the baseline "<metric>_mte_off"; tag bytes, tag ioctls and pre-copy passes
stand beside the figures. Ratio: the case / MTE off (goal <= 1.15 for the total time).

The migrations are clients/kvmtag_vmm/bench.py's (its own kvmtagd pair, every configuration's
guest booted the same way, configurations interleaved, one uncounted warm-up migration in the
full run); it runs as a subprocess from the repository's root, where `clients` is importable,
and hands over every migration's summary as JSON. It is part of a checkout, not of the
installed package: without it this benchmark fails, saying so.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvmtag.bench.core import Context, Figure, Settings, summarise

ROOT = Path(__file__).resolve().parent.parent.parent
"""The repository's root: clients/ is importable from there only."""
SCRIPT = ROOT / "clients" / "kvmtag_vmm" / "bench.py"
CONFIGS = ("mte_off", "copy_tags", "tag_log")  # bench.py's keys; the first is the baseline
METRICS = [  # name, the summary's key, unit, goal for the ratio
    ("total", "total_seconds", "s", 1.15),
    ("downtime", "downtime_seconds", "s", None),
    ("stream", "stream_bytes", "B", None),
]
TIMEOUT = 3600
"""Seconds the whole series of migrations may take (the full run needs a few minutes)."""
STOP_GRACE = 30
"""Seconds bench.py gets to stop its VMMs and kvmtagd after SIGTERM before it is killed."""


def title(settings: Settings) -> str:
    return (
        f"migration: kvmtag-vmm live migration of a {settings.migration_ram} MiB guest "
        f"({settings.migration_populate} MiB populated, half of it tagged; 2 vCPUs storing), "
        f"{settings.migration_repeats} per configuration; ratio = case / MTE off"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """The migrations of bench.py in a subprocess, summarised per metric."""
    results = migrate(settings, context.directory / "migration")
    figures = []
    for metric, key, unit, goal in METRICS:
        runs = {f"{metric}_{c}": [[float(r[key])] for r in results[c]] for c in CONFIGS}
        goals = {} if goal is None else {f"{metric}_{c}": goal for c in CONFIGS[1:]}
        group = summarise(
            "migration", runs, f"{metric}_{CONFIGS[0]}", goals, lower_is_better=True, unit=unit
        )
        figures += [
            dataclasses.replace(f, extra=_extra(metric, results[config]))
            for f, config in zip(group, CONFIGS, strict=True)
        ]
    return figures


def _extra(metric: str, results: list[dict[str, Any]]) -> dict[str, float]:
    """Medians that explain a figure: passes beside the time, the tags beside the bytes."""

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in results)

    if metric == "total":
        return {"passes": med("passes")}
    if metric == "stream":
        return {"tag_MiB": med("tag_bytes") / (1 << 20), "tag_ioctls": med("tag_ioctls")}
    return {}


def migrate(settings: Settings, directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Runs bench.py; every migration's source summary, by configuration.

    Raises:
        RuntimeError: no clients/kvmtag_vmm beside this package, or bench.py failed (with the
            end of its output).
    """
    if not SCRIPT.exists():
        raise RuntimeError(
            f"the migration benchmark needs {SCRIPT} (kvmtag-vmm lives in the repository, "
            "not in the installed package): run from a checkout"
        )
    directory.mkdir()
    report, output = directory / "migrations.json", directory / "bench.log"
    argv = [sys.executable, "-m", "clients.kvmtag_vmm.bench", "--quiet", "--json", str(report),
            "--ram", str(settings.migration_ram), "--populate", str(settings.migration_populate),
            "--repeats", str(settings.migration_repeats)]  # fmt: skip
    if settings.quick:
        # No warm-up, a short run before and after: a smoke run of the same code paths.
        argv += ["--no-warm-up", "--run-before", "0.5", "--run-after", "0.3"]
    with output.open("w") as log:
        # In this process group: a test's timeout that kills the group stops it too.
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(TIMEOUT)
        finally:
            if proc.poll() is None:  # an error or a signal here: let it stop its children
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        tail = "\n".join(output.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv[1:4])} exited {rc}:\n{tail}")
    results: dict[str, list[dict[str, Any]]] = json.loads(report.read_text())["results"]
    return results
