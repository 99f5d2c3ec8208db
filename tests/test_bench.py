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

EXPECTED = {
    ("tagkernel", "memcpy"), ("tagkernel", "pack"), ("tagkernel", "unpack"),
    ("copy_tags", "socket"), ("copy_tags", "from_guest"), ("copy_tags", "to_guest"),
    ("roundtrip", "socketpair"), ("roundtrip", "trio_echo"), ("roundtrip", "check_extension"),
}  # fmt: skip


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "out.json"
    # Its own session, so a timeout can stop kvmtagd and the children with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtag.bench", "--quick", "--json", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=50)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("python -m kvmtag.bench --quick took more than 50 s")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stderr
    return done, json.loads(out.read_text())


def test_quick_run_reports_every_figure_beside_its_baseline(tmp_path: Path) -> None:
    done, report = run_bench(tmp_path)
    assert report["mode"] == "quick"
    figures = {(f["benchmark"], f["name"]): f for f in report["figures"]}
    assert set(figures) == EXPECTED
    for key, f in figures.items():
        assert f["baseline_median"] > 0, key
        assert f["median"] > 0 and f["ratio"] > 0, key
        assert len(f["samples"]) == report["settings"]["repeats"], key
        assert f["min"] <= f["median"] <= f["max"], key
        baseline = figures[(key[0], f["baseline"])]
        assert baseline["ratio"] == pytest.approx(1.0)
    for key in [("roundtrip", "socketpair"), ("roundtrip", "trio_echo"),
                ("roundtrip", "check_extension")]:  # fmt: skip
        assert figures[key]["p99"] >= figures[key]["median"] > 0
    for key in [("tagkernel", "pack"), ("copy_tags", "from_guest"),
                ("roundtrip", "check_extension")]:  # fmt: skip
        assert figures[key]["goal"] is not None and isinstance(figures[key]["met"], bool)
    assert "check_extension" in done.stdout  # the table


def test_only_selects_benchmarks(tmp_path: Path) -> None:
    _, report = run_bench(tmp_path, "--only", "tagkernel,roundtrip")
    assert {f["benchmark"] for f in report["figures"]} == {"tagkernel", "roundtrip"}


def test_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmtag.bench", "--only", "nonsense"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "nonsense" in done.stderr
