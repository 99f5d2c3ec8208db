"""Migration figures for a 1 GiB guest with an active workload: MTE off vs on, COPY_TAGS vs the
tag log, side by side (a benchmark, not a test).

    python -m clients.kvmtag_vmm.bench [--ram 1024] [--populate 768] [--repeats 5] [--json PATH]

Two kvmtagd daemons are started (a source host and a destination host, so the guest running on
one does not share an interpreter with the other's work); each configuration migrates the same
guest, booted the same way, from one to the other over a Unix socket, `--repeats` (7) times,
interleaved; the table shows medians (after one warm-up migration that is not counted). Goals
(issue 6): tag bytes on the wire at most 1/32 of the RAM bytes sent, and a total time at most
1.15 times the MTE-off migration's.

`--json PATH` writes every migration's summary by configuration (mte_off, copy_tags, tag_log),
with the settings: the benchmark suite (`python -m kvmtag.bench --only migration`) runs this
script with it and turns the summaries into its figures. Run it from the repository's root
(`clients` is importable from there only); it runs the VMMs there whatever the directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
VMM = [sys.executable, "-m", "clients.kvmtag_vmm"]
MiB = 1 << 20
CONFIGS = [  # key (in --json), label (in the table), the source's options
    ("mte_off", "MTE off", ["--no-mte"]),
    ("copy_tags", "MTE on, COPY_TAGS", ["--mte", "--tags", "copy-tags"]),
    ("tag_log", "MTE on, tag log", ["--mte", "--tags", "tag-log"]),
]
LABELS = {key: label for key, label, _ in CONFIGS}


@contextlib.contextmanager
def kvmtagd(directory: Path) -> Iterator[str]:
    path = directory / "kvm.sock"
    log = (directory / "kvmtagd.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kvmtag", "--socket-path", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvmtagd did not start: {_tail(directory / 'kvmtagd.log')}")
            time.sleep(0.02)
        yield str(path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def migrate_once(
    tmp: Path, src_sock: str, dst_sock: str, guest: list[str], extra: list[str], n: int,
    machine: list[str], dst_run: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """One migration from the source's kvmtagd to the destination's; the source's summary,
    with the destination's under "destination". Both VMMs are gone when it returns or raises;
    a destination that resumes the guest runs it `dst_run` seconds before it exits."""
    uri = f"unix:{tmp}/mig-{n}.sock"
    src_json, dst_json = tmp / f"src-{n}.json", tmp / f"dst-{n}.json"
    src_log, dst_log = tmp / f"src-{n}.log", tmp / f"dst-{n}.log"
    procs: list[subprocess.Popen[bytes]] = []
    with dst_log.open("w") as dlog, src_log.open("w") as slog:
        try:
            # The destination is started with its machine and --prealloc, as QEMU's would be
            # with -mem-prealloc: its RAM is allocated before the migration starts, so the
            # figures measure the migration, not this machine's first touch of memory (which
            # varies from run to run by a factor of several here).
            mte = [e for e in extra if e in ("--mte", "--no-mte")]
            dst = subprocess.Popen([*VMM, "--socket", dst_sock, "--incoming", uri, *machine,
                                    *mte, "--prealloc", "--run-seconds", str(dst_run),
                                    "--accept-timeout", "120", "--summary", str(dst_json)],
                                   cwd=ROOT, stdout=dlog, stderr=subprocess.STDOUT)  # fmt: skip
            procs.append(dst)
            if not _listening(uri, dst):
                raise RuntimeError(f"the destination did not listen on {uri}: {_tail(dst_log)}")
            src = subprocess.Popen([*VMM, "--socket", src_sock, *guest, *extra, "--migrate-to",
                                    uri, "--summary", str(src_json)], cwd=ROOT, stdout=slog,
                                   stderr=subprocess.STDOUT)  # fmt: skip
            procs.append(src)
            src_rc = src.wait(600)
            if src_rc != 0:
                dst.kill()
            dst_rc = dst.wait(600)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if src_rc != 0:
        raise RuntimeError(f"the source failed (exit {src_rc}): {_tail(src_log)}\n"
                           f"the destination's log: {_tail(dst_log)}")  # fmt: skip
    summary: dict[str, Any] = json.loads(src_json.read_text())
    summary["destination"] = json.loads(dst_json.read_text())
    summary["destination_exit"] = dst_rc
    return summary


def _tail(log: Path, lines: int = 20) -> str:
    """The end of a log, for an error message (the logs go with the temporary directory)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _listening(uri: str, dst: subprocess.Popen[bytes]) -> bool:
    """Waits until the destination listens (it builds and preallocates its machine first);
    False if it exited or took more than 120 s."""
    path = Path(uri.removeprefix("unix:"))
    deadline = time.monotonic() + 120
    while not path.exists():
        if dst.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ram", type=int, default=1024, help="guest RAM, MiB (default 1024)")
    p.add_argument("--populate", type=int, default=768,
                   help="MiB of data outside the heap, half of it tagged (default 768)")
    p.add_argument("--working-set", type=float, default=8, help="heap MiB (default 8)")
    p.add_argument("--store-rate", type=int, default=1000,
                   help="guest stores per second per vCPU (default 1000)")
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--run-before", type=float, default=2.0,
                   help="seconds the guest runs before the migration (default 2)")
    p.add_argument("--run-after", type=float, default=1.0,
                   help="seconds the destination runs the guest after it resumes (default 1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="one migration first that is not counted (default: on)")
    p.add_argument("--json", metavar="PATH", help="write every run's summary there")
    p.add_argument("--quiet", action="store_true", help="no table, no progress (with --json)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like an exception, so the VMMs and both kvmtagd are stopped too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    machine = ["--ram", str(args.ram), "--vcpus", str(args.vcpus)]
    guest = [*machine, "--populate", str(args.populate), "--working-set", str(args.working_set),
             "--store-rate", str(args.store_rate), "--migrate-after", str(args.run_before)]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmtag-bench-") as d:
        tmp = Path(d)
        (tmp / "src").mkdir()
        (tmp / "dst").mkdir()
        with kvmtagd(tmp / "src") as src_sock, kvmtagd(tmp / "dst") as dst_sock:
            # A warm-up migration, not counted: this machine's first touch of memory it has
            # not used for a while costs several times more than later ones (the hypervisor
            # backs it lazily), which would land on whichever configuration runs first.
            if args.warm_up:
                migrate_once(tmp, src_sock, dst_sock, guest, CONFIGS[1][2], 0, machine,
                             args.run_after)  # fmt: skip
            n = 0
            for _ in range(args.repeats):  # interleaved, so drift hits every configuration
                for key, label, extra in CONFIGS:
                    n += 1
                    r = migrate_once(tmp, src_sock, dst_sock, guest, extra, n, machine,
                                     args.run_after)  # fmt: skip
                    results.setdefault(key, []).append(r)
                    if not args.quiet:
                        print(f"  {label}: {r['total_seconds']:.2f} s", file=sys.stderr,
                              flush=True)  # fmt: skip
    if args.json:
        report = {"settings": vars(args), "cpus": os.cpu_count(), "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        print(table(results, args))
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    def med(name: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[name])

    base = med("mte_off", "total_seconds")
    lines = [
        f"kvmtag-vmm live migration, {args.ram} MiB guest ({args.populate} MiB populated, half "
        f"of it tagged; {args.working_set:g} MiB heap, {args.vcpus} vCPUs at "
        f"{args.store_rate} stores/s each), medians of {args.repeats}, {os.cpu_count()} CPUs",
        "",
        "| | total s | (min-max) | downtime ms | passes | RAM data MiB | tag MiB | tags/data |"
        " stream MiB | tag ioctls | tag ioctls/GiB | time vs MTE off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results:
        total = med(name, "total_seconds")
        times = [r["total_seconds"] for r in results[name]]
        data, tags = med(name, "data_bytes"), med(name, "tag_bytes")
        ratio = f"1/{data / tags:.1f}" if tags else "0"
        lines.append(
            f"| {LABELS[name]} | {total:.2f} | {min(times):.2f}-{max(times):.2f} | "
            f"{med(name, 'downtime_seconds') * 1e3:.0f} | "
            f"{med(name, 'passes'):.0f} | {data / MiB:.1f} | {tags / MiB:.2f} | {ratio} | "
            f"{med(name, 'stream_bytes') / MiB:.1f} | {med(name, 'tag_ioctls'):.0f} | "
            f"{med(name, 'tag_ioctls_per_gib'):.1f} | {total / base:.2f}x |"
        )
    lines.append("")
    for name in results:
        if name == "mte_off":
            continue
        total = med(name, "total_seconds")
        worst = max(r["tag_bytes"] / max(r["data_bytes"], 1) for r in results[name])
        few_tags = "yes" if worst <= 1 / 32 else "NO"
        lines.append(
            f"{LABELS[name]}: tag bytes <= 1/32 of RAM bytes sent: {few_tags} "
            f"(worst run 1/{1 / worst if worst else float('inf'):.1f}); total time <= 1.15x MTE "
            f"off: {'yes' if total <= 1.15 * base else 'NO'} ({total / base:.2f}x)"
        )
    crashed = {LABELS[k]: sum(r["destination_exit"] == 3 for r in rs) for k, rs in results.items()}
    lines.append(f"destination guests that crashed after resuming, per configuration: {crashed}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
