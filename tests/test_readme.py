"""The README's example and clients/model_example.py run and say what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # our own documentation


def test_model_example_script() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "model_example.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "TO_GUEST  -> 16384" in out
    assert "across the slot's end -> 8192" in out
    assert "misaligned -> -22 EINVAL" in out


def test_client_example_against_kvmtagd(kvmtagd: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "client_example.py"), kvmtagd],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert "TO_GUEST: 67108864 bytes" in out
    assert "tags intact: True" in out
    assert "misaligned length: EINVAL" in out
