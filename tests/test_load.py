"""64 client processes at once (issue 7), each with a VM of its own, mixed small and bulk
ioctls for a bounded time (clients/kvmtag_load.py): every result right, and the daemon holds
afterwards what it held before (descriptors, tasks, connections; its RSS within a bound).
The figures are printed, not asserted (a shared machine's timing is no test). By hand, longer:
`python clients/kvmtag_load.py load --clients 64 --duration 60`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS_GROWTH = 64 << 20  # the heap the tag store and buffers grew once may stay


def test_64_clients_at_once(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "kvmtag_load.py"), "load", "--clients", "64",
         "--duration", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["failed_clients"] == 0 and r["errors"] == 0 and r["alive"]
    assert r["small_ops"] > 0 and r["bulk_ops"] > 0
    before, after = r["before"], r["after"]
    assert after["fds"] == before["fds"]
    assert after["daemon_connections"] == 0
    assert after["daemon_tasks"] == before["daemon_tasks"]
    assert after["daemon_tag_storage"] == before["daemon_tag_storage"] == 0
    assert after["rss"] - before["rss"] < RSS_GROWTH
