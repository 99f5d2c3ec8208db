"""Console scripts for the programs in clients/ (kvmtag-fuzz, kvmtag-load).

Those programs live in the source tree's clients/ directory, beside the package: a checkout
installed in place (`pip install -e .`, as `make` does) runs them from there. Each script
re-executes the program with this Python, so that it starts with no kvmtag module imported
(the fuzzer instruments them as it imports them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


def _run(program: str) -> None:
    script = CLIENTS / program
    if not script.is_file():
        sys.exit(f"{program} is in kvmtag's source tree (clients/): install a checkout with "
                 "pip install -e, or run it from one")  # fmt: skip
    os.execv(sys.executable, [sys.executable, str(script), *sys.argv[1:]])


def fuzz() -> None:
    _run("kvmtag_fuzz.py")


def load() -> None:
    _run("kvmtag_load.py")


def vmm() -> None:
    """kvmtag-vmm: the migrating VMM, the package clients/kvmtag_vmm."""
    if not (CLIENTS / "kvmtag_vmm" / "cli.py").is_file():
        sys.exit("kvmtag-vmm is in kvmtag's source tree (clients/): install a checkout with "
                 "pip install -e, or run it from one")  # fmt: skip
    path = os.pathsep.join(p for p in (str(CLIENTS.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    os.execve(sys.executable, [sys.executable, "-m", "clients.kvmtag_vmm", *sys.argv[1:]], env)
