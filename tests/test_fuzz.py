"""The fuzzer (clients/kvmtag_fuzz.py, issue 7): each mode for a short, fixed budget, as CI
runs it; a failing input is saved and reproduces from its file; the fuzzer's first line states
its invariant. `kvmtag-fuzz MODE --time N` runs it longer by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "clients" / "kvmtag_fuzz.py"
BUDGET = 3  # seconds per mode in CI
INVARIANT = (
    "any bytes: a reply, an errno or a clean close; never a crash, never a hang, never "
    "another client's data changed"
)


def test_the_first_line_states_the_invariant() -> None:
    first = FUZZ.read_text().splitlines()[0]
    assert first.startswith(f"# {INVARIANT}.")


@pytest.mark.parametrize("mode", ["decoder", "model", "live"])
def test_each_mode_for_a_fixed_budget(mode: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(FUZZ), mode, "--time", str(BUDGET), "--artifacts", "artifacts"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    runs = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert runs, out[-2000:]
    engine = re.search(r"\(engine: (\w+)\)", out)
    print(f"\nkvmtag-fuzz {mode}: {runs.group(1)} inputs in {runs.group(2)} s "
          f"({engine.group(1) if engine else '?'}), no failure")  # fmt: skip
    assert int(runs.group(1)) > 0
    assert not list((tmp_path / "artifacts").glob("crash-*"))


def test_a_failing_input_is_saved_and_reproduces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(ROOT / "clients"))
    try:
        import kvmtag_fuzz as fuzz
    finally:
        sys.path.remove(str(ROOT / "clients"))

    def planted(data: bytes) -> None:  # a bug the random engine finds at once
        fuzz.fuzz_decoder(data)
        if len(data) > 3 and data[0] & 1:
            raise fuzz.Failure("planted")

    monkeypatch.setitem(fuzz.TARGETS, "decoder", planted)
    artifacts = tmp_path / "artifacts"
    assert fuzz.main(["decoder", "--engine", "random", "--runs", "1000",
                      "--artifacts", str(artifacts)]) == 1  # fmt: skip
    (saved,) = artifacts.glob("crash-*")
    with pytest.raises(fuzz.Failure, match="planted"):
        fuzz.main(["decoder", str(saved)])
    monkeypatch.setitem(fuzz.TARGETS, "decoder", fuzz.fuzz_decoder)
    assert fuzz.main(["decoder", str(saved)]) == 0  # the real decoder takes it


@pytest.mark.parametrize("mode", ["decoder", "model"])
def test_the_random_engine_without_atheris(mode: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(FUZZ), mode, "--engine", "random", "--runs", "300",
         "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Done 300 runs" in done.stdout
