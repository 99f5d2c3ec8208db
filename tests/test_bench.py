"""A smoke run of the benchmark suite: `python -m kvmtag.bench --quick --json PATH` completes
and reports every figure beside a baseline. No timing thresholds: machines are noisy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvmtag.bench import migration, roundtrip
from kvmtag.bench.__main__ import format_table
from kvmtag.bench.core import QUICK, summarise

TIMEOUT = 50  # seconds for a quick run; it takes about 15 here
MEMSLOTS = QUICK.memslots  # the many-memslots VM of a quick run
EXPECTED = {
    ("tagkernel", "memcpy"), ("tagkernel", "pack"), ("tagkernel", "unpack"),
    ("tagkernel", "numpy_pack"), ("tagkernel", "c_pack"),
    ("tagkernel", "numpy_unpack"), ("tagkernel", "c_unpack"),
    ("copy_tags", "socket"), ("copy_tags", "from_guest"), ("copy_tags", "to_guest"),
    ("roundtrip", "socketpair"), ("roundtrip", "trio_echo"), ("roundtrip", "check_extension"),
    ("roundtrip", "check_extension_shim"),
    ("memory", "packed"), ("memory", "rss"), ("memory", "nbytes"),
    *(("scaling", f"{kind}_n{n}") for kind in ("check_extension", "copy_tags")
      for n in (1, 8, 64)),
    ("scaling", "daemon_lookup_10"), ("scaling", f"daemon_lookup_{MEMSLOTS}"),
    ("scaling", "model_lookup_10"), ("scaling", f"model_lookup_{MEMSLOTS}"),
    *(("migration", f"{metric}_{config}") for metric in ("total", "downtime", "stream")
      for config in ("mte_off", "copy_tags", "tag_log")),
}  # fmt: skip
LATENCIES = {
    ("roundtrip", "socketpair"), ("roundtrip", "trio_echo"), ("roundtrip", "check_extension"),
    ("roundtrip", "check_extension_shim"), ("scaling", "daemon_lookup_10"),
    ("scaling", f"daemon_lookup_{MEMSLOTS}"), ("scaling", "model_lookup_10"),
    ("scaling", f"model_lookup_{MEMSLOTS}"),
}  # fmt: skip
WITH_GOALS = {
    ("tagkernel", "pack"), ("tagkernel", "unpack"), ("tagkernel", "c_pack"),
    ("tagkernel", "c_unpack"), ("copy_tags", "from_guest"), ("copy_tags", "to_guest"),
    ("roundtrip", "check_extension"), ("memory", "rss"),
    ("scaling", f"daemon_lookup_{MEMSLOTS}"), ("migration", "total_copy_tags"),
    ("migration", "total_tag_log"),
}  # fmt: skip


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "out.json"
    # Its own session, so a timeout can stop kvmtagd and the children with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtag.bench", "--quick", "--json", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"python -m kvmtag.bench --quick took more than {TIMEOUT} s")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stderr
    return done, json.loads(out.read_text())


def test_quick_run_reports_every_figure_beside_its_baseline(tmp_path: Path) -> None:
    done, report = run_bench(tmp_path)
    assert report["mode"] == "quick"
    settings = report["settings"]
    assert settings["memslots"] == MEMSLOTS
    figures = {(f["benchmark"], f["name"]): f for f in report["figures"]}
    assert len(figures) == len(report["figures"])  # names are unique within a benchmark
    assert set(figures) == EXPECTED
    for key, f in figures.items():
        assert f["baseline_median"] > 0, key
        assert f["median"] > 0 and f["ratio"] > 0, key
        repeats = settings["migration_repeats" if key[0] == "migration" else "repeats"]
        assert len(f["samples"]) == repeats, key
        assert f["min"] <= f["median"] <= f["max"], key
        baseline = figures[(key[0], f["baseline"])]
        assert baseline["baseline"] == baseline["name"], key  # a baseline is its own
        assert baseline["ratio"] == pytest.approx(1.0)
        assert (f["p99"] is not None) == (key in LATENCIES), key
        if key in LATENCIES:
            assert f["p99"] >= f["median"] > 0, key
        assert (f["goal"] is not None) == (key in WITH_GOALS), key
        assert isinstance(f["met"], bool) == (f["goal"] is not None), key
    # The C kernel against numpy: the same measurements as against memcpy.
    assert figures[("tagkernel", "c_pack")]["samples"] == figures[("tagkernel", "pack")]["samples"]
    assert figures[("tagkernel", "c_pack")]["baseline"] == "numpy_pack"
    assert figures[("tagkernel", "c_pack")]["goal"] == ">= 4.0"
    for n in (1, 8, 64):
        assert figures[("scaling", f"copy_tags_n{n}")]["gib_per_s"] > 0
        assert figures[("scaling", f"check_extension_n{n}")]["extra"]["calls/s"] > 0
    assert figures[("migration", "total_copy_tags")]["goal"] == "<= 1.15"
    assert figures[("migration", "stream_copy_tags")]["unit"] == "B"
    assert figures[("migration", "stream_copy_tags")]["extra"]["tag_ioctls"] > 0
    assert figures[("migration", "stream_mte_off")]["extra"]["tag_ioctls"] == 0
    for benchmark in report["titles"]:
        assert report["titles"][benchmark] in done.stdout  # the table, a section each
    assert "check_extension_shim" in done.stdout and "c_pack" in done.stdout


def test_only_selects_benchmarks(tmp_path: Path) -> None:
    _, report = run_bench(tmp_path, "--only", "tagkernel,roundtrip")
    assert {f["benchmark"] for f in report["figures"]} == {"tagkernel", "roundtrip"}


def test_the_table_has_a_block_per_baseline() -> None:
    runs = {"base": [[1.0], [1.0]], "case": [[0.5], [0.5]], "other": [[2.0], [2.0]]}
    figures = summarise("tagkernel", {k: runs[k] for k in ("base", "case")}, "base", {"case": 1})
    figures += summarise("tagkernel", {"other": runs["other"]}, "other", {})
    lines = format_table(figures, QUICK).splitlines()
    assert [line.split()[0] for line in lines[3:]] == ["case", "base", "case", "case", "other"]
    assert lines[5].endswith(">= 1: ok")


def test_missing_checkout_parts_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C shim case and the migrations need the repository, not just the package."""
    monkeypatch.setattr(roundtrip, "PRELOAD", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="run from a checkout"):
        roundtrip.shim_program(tmp_path / "out", "unused", 1)
    monkeypatch.setattr(migration, "SCRIPT", tmp_path / "nowhere" / "bench.py")
    with pytest.raises(RuntimeError, match="run from a checkout"):
        migration.migrate(QUICK, tmp_path / "migration")


def test_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmtag.bench", "--only", "nonsense"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "nonsense" in done.stderr
