"""kvmtag-load: many clients against one kvmtagd at once, with figures; or clients killed at
random moments, with the daemon's descriptors, memory and tasks compared before and after.

  load   --clients N processes (default 64), each with a VM of its own (an MTE memslot over a
         memfd of its own), for --duration seconds: small ioctls (KVM_CHECK_EXTENSION, a
         one-page COPY_TAGS) and bulk ones (COPY_TAGS of the whole slot in, then out, checked)
         in a fixed mix. Reports throughput, p50/p99 latency of each kind, and the daemon's
         RSS, descriptors and tasks before and after.
  kill   --clients N forked clients (default 1000), --parallel at a time, each SIGKILLed after
         a random delay while it connects, holds a VM and a memslot (the daemon holds its
         memfd), is half way through sending a frame, or leaves a bulk COPY_TAGS waiting for
         its tag buffer. A well-behaved client's VM, in another process, is checked after.

The daemon is started here (its log says what it holds: SIGUSR1), unless --socket names one
(then only the figures /proc gives are reported). Exit status 1 if a client failed, a check
did not hold or the daemon kept something.

    kvmtag-load load --clients 64 --duration 60
    kvmtag-load kill --clients 10000 --parallel 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kvmtag_fuzz, beside this file
from kvmtag_fuzz import Guardian, _die_with_parent, _peer_pid

from kvmtag import client, procmem, uapi
from kvmtag.uapi import LAYOUT

P = 4096
TPP = P // 16
GPA = 0x1000_0000


# --- the daemon, seen from outside ---------------------------------------------------------


class Daemon:
    def __init__(self, socket_path: str | None, args: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="kvmtag-load-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(self.tmp.name) / "kvmtagd.log"
        if socket_path is None:
            socket_path = os.path.join(self.tmp.name, "kvm.sock")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmtag", "--socket-path", socket_path, *args],
                stderr=self.log.open("wb"), preexec_fn=_die_with_parent,
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while not os.path.exists(socket_path):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kvmtagd did not start: {self.log.read_text()}")
                time.sleep(0.01)
        self.path = socket_path
        self.pid = _peer_pid(socket_path)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib * 1024

    def stats(self) -> dict[str, int]:
        """What the daemon says it holds (SIGUSR1 makes it log a stats line): {} if it is not
        ours."""
        if self.proc is None:
            return {}
        before = self.log.read_text().count("stats:")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [ln for ln in self.log.read_text().splitlines() if "stats:" in ln]
            if len(lines) > before:
                return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])}
            time.sleep(0.02)
        raise RuntimeError("kvmtagd did not answer SIGUSR1")

    def figures(self) -> dict[str, Any]:
        return {"fds": self.fds(), "rss": self.rss(), **{f"daemon_{k}": v for k, v in
                self.stats().items()}}  # fmt: skip

    def settle(self, baseline_fds: int, timeout: float = 60) -> None:
        """Wait until the daemon holds no more descriptors than at `baseline_fds` (it closes a
        vanished client's connections as soon as it notices)."""
        deadline = time.monotonic() + timeout
        while self.fds() > baseline_fds and time.monotonic() < deadline:
            time.sleep(0.05)

    def alive(self) -> bool:
        return (self.proc is None or self.proc.poll() is None) and _peer_pid(self.path) == self.pid

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


# --- a client VMM ---------------------------------------------------------------------------


class Vmm:
    def __init__(self, path: str, npages: int) -> None:
        self.kvm = client.open(socket=path)
        self.vm = client.ioctl(self.kvm, uapi.KVM_CREATE_VM, 0)
        self.npages = npages
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, npages * P)
        self.ram = mmap.mmap(self.memfd, npages * P)
        self.tags = mmap.mmap(-1, npages * TPP)
        self.taddr = procmem.buffer_address(self.tags).address
        cap = LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))
        client.ioctl(self.vm, uapi.KVM_ENABLE_CAP, cap)
        region = LAYOUT["kvm_userspace_memory_region"].pack(
            0, 0, GPA, npages * P, procmem.buffer_address(self.ram).address
        )
        client.ioctl(self.vm, uapi.KVM_SET_USER_MEMORY_REGION, region)

    def copy(self, npages: int, flags: int) -> int:
        args = LAYOUT["kvm_arm_copy_mte_tags"].pack(GPA, npages * P, self.taddr, flags, 0, 0)
        return client.ioctl(self.vm, uapi.KVM_ARM_MTE_COPY_TAGS, args)


def load_client(path: str, seed: int, deadline: float, npages: int, out: Path) -> None:
    rng = random.Random(seed)
    vmm = Vmm(path, npages)
    lat: dict[str, list[float]] = {"small": [], "bulk": []}
    bulk_bytes = errors = 0
    nibbles = bytes(i & 15 for i in range(256))
    while time.monotonic() < deadline:
        if rng.random() < 0.85:
            t0 = time.perf_counter()
            if rng.random() < 0.5:
                assert client.ioctl(vmm.vm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE) == 1
            else:
                assert vmm.copy(1, uapi.KVM_ARM_TAGS_FROM_GUEST) == P
            lat["small"].append(time.perf_counter() - t0)
        else:
            tags = rng.randbytes(npages * TPP).translate(nibbles)
            vmm.tags[:] = tags
            t0 = time.perf_counter()
            ok = vmm.copy(npages, uapi.KVM_ARM_TAGS_TO_GUEST) == npages * P
            vmm.tags[:] = bytes(len(tags))
            ok = ok and vmm.copy(npages, uapi.KVM_ARM_TAGS_FROM_GUEST) == npages * P
            lat["bulk"].append(time.perf_counter() - t0)
            errors += not ok or vmm.tags[:] != tags
            bulk_bytes += 2 * len(tags)
    out.write_text(json.dumps({"lat": lat, "bulk_bytes": bulk_bytes, "errors": errors}))


# --- clients killed at random moments -----------------------------------------------------


def doomed_client(path: str, seed: int) -> None:
    """What a client is doing when it dies; it never finishes on its own."""
    rng = random.Random(seed)
    stage = rng.randrange(5)
    if stage == 0:  # connected, idle, or half way through its handshake
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.send(struct.pack("<IHHII", 28, 1, 0, 1, 0)[: rng.randrange(17)])
    elif stage == 1:  # holding a VM, a memslot (the daemon holds its memfd) and a vCPU
        vmm = Vmm(path, 16)
        client.ioctl(vmm.vm, uapi.KVM_CREATE_VCPU, 0)
    elif stage == 2:  # half way through an IOCTL frame
        vmm = Vmm(path, 16)
        sock = socket.socket(fileno=os.dup(vmm.vm))
        frame = struct.pack("<IHHII", 64, 3, 0, 9, 0) + struct.pack(
            "<IIQ", uapi.KVM_ARM_MTE_COPY_TAGS, 1, 0
        ) + LAYOUT["kvm_arm_copy_mte_tags"].pack(GPA, 16 * P, vmm.taddr, 0, 0, 0)
        sock.send(frame[: rng.randrange(1, len(frame))])
    elif stage == 3:  # a bulk COPY_TAGS waiting for its tag buffer, perhaps half answered
        vmm = Vmm(path, 4096)
        sock = socket.socket(fileno=os.dup(vmm.vm))
        args = LAYOUT["kvm_arm_copy_mte_tags"].pack(GPA, 4096 * P, 0x7F00_0000, 0, 0, 0)
        body = struct.pack("<IIQ", uapi.KVM_ARM_MTE_COPY_TAGS, 3, 0) + args
        sock.send(struct.pack("<IHHII", 16 + len(body), 3, 0, 9, 0) + body)
        sock.recv(64)  # the READ callback
        if rng.random() < 0.5:
            n = 4096 * TPP
            sock.send(struct.pack("<IHHII", 16 + n, 6, 0, 9, 0) + bytes(rng.randrange(n)))
    else:  # busy
        vmm = Vmm(path, 64)
        while True:
            vmm.copy(64, rng.randrange(2))
    time.sleep(60)


def run_kill(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    guardian = Guardian(daemon.path)
    rng = random.Random(args.seed)

    def wave(n: int) -> int:
        started = killed = 0
        running: dict[int, float] = {}
        while started < n or running:
            while started < n and len(running) < args.parallel:
                pid = os.fork()
                if pid == 0:
                    with contextlib.suppress(BaseException):
                        doomed_client(daemon.path, args.seed * 1_000_003 + started)
                    os._exit(0)
                running[pid] = time.monotonic() + rng.uniform(0, args.max_delay)
                started += 1
            now = time.monotonic()
            for pid, when in list(running.items()):
                if now >= when:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del running[pid]
                    killed += 1
            time.sleep(0.001)
        return killed

    try:
        wave(min(50, args.clients))  # warm up: the first clients grow the heap once
        daemon.settle(0, 5)
        time.sleep(0.5)
        before = daemon.figures()
        t0 = time.monotonic()
        killed = wave(args.clients)
        elapsed = time.monotonic() - t0
        daemon.settle(before["fds"])
        time.sleep(0.5)
        after = daemon.figures()
        guardian.check()
        return {"scenario": "kill", "killed": killed, "seconds": round(elapsed, 1),
                "before": before, "after": after, "alive": daemon.alive(),
                "guardian": "ok"}  # fmt: skip
    finally:
        guardian.close()


def run_load(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvmtag-load-out-") as out:
        time.sleep(0.5)  # (the probe that found the daemon's pid is closed by now)
        before = daemon.figures()
        start = time.monotonic() + 0.5
        deadline = start + args.duration
        pids = []
        for i in range(args.clients):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    while time.monotonic() < start:
                        time.sleep(0.001)
                    load_client(daemon.path, args.seed * 7919 + i, deadline, args.npages,
                                Path(out) / str(i))  # fmt: skip
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            pids.append(pid)
        time.sleep(max(0.0, start + args.duration / 2 - time.monotonic()))
        during = {"fds": daemon.fds(), "rss": daemon.rss()}
        failed = 0
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0
        elapsed = time.monotonic() - start
        daemon.settle(before["fds"])
        time.sleep(0.2)
        after = daemon.figures()
        results = [json.loads(p.read_text()) for p in Path(out).iterdir()]
    small = sorted(x for r in results for x in r["lat"]["small"])
    bulk = sorted(x for r in results for x in r["lat"]["bulk"])

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1e3, 3) if values else 0.0

    return {
        "scenario": "load", "clients": args.clients, "seconds": round(elapsed, 1),
        "failed_clients": failed, "errors": sum(r["errors"] for r in results),
        "small_ops": len(small), "bulk_ops": len(bulk),
        "ops_per_second": round((len(small) + len(bulk)) / elapsed),
        "bulk_mib_per_second": round(sum(r["bulk_bytes"] for r in results) / elapsed / 2**20, 1),
        "small_ms": {"p50": pct(small, 0.5), "p99": pct(small, 0.99),
                     "mean": round(statistics.fmean(small) * 1e3, 3) if small else 0.0},
        "bulk_ms": {"p50": pct(bulk, 0.5), "p99": pct(bulk, 0.99)},
        "before": before, "during": during, "after": after,
    }  # fmt: skip


def show(result: dict[str, Any]) -> None:
    b, a = result["before"], result["after"]
    if result["scenario"] == "load":
        print(f"load: {result['clients']} client processes, {result['seconds']} s: "
              f"{result['ops_per_second']} ioctls/s ({result['small_ops']} small, "
              f"{result['bulk_ops']} bulk round trips, {result['bulk_mib_per_second']} MiB/s "
              f"of tags), failed clients {result['failed_clients']}, wrong tags "
              f"{result['errors']}")  # fmt: skip
        print(f"  small ioctl latency ms: p50 {result['small_ms']['p50']}, p99 "
              f"{result['small_ms']['p99']}; bulk round trip ms: p50 "
              f"{result['bulk_ms']['p50']}, p99 {result['bulk_ms']['p99']}")  # fmt: skip
        print(f"  daemon during: {result['during']['fds']} fds, "
              f"{result['during']['rss'] >> 20} MiB RSS")  # fmt: skip
    else:
        print(f"kill: {result['killed']} clients killed in {result['seconds']} s; the "
              f"well-behaved client's VM: {result['guardian']}")  # fmt: skip
    print(f"  daemon before: {b['fds']} fds, {b['rss'] >> 20} MiB RSS, "
          f"{b.get('daemon_tasks', '?')} tasks, {b.get('daemon_connections', '?')} connections")
    print(f"  daemon after:  {a['fds']} fds, {a['rss'] >> 20} MiB RSS, "
          f"{a.get('daemon_tasks', '?')} tasks, {a.get('daemon_connections', '?')} connections")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvmtag-load", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))  # fmt: skip
    p.add_argument("scenario", choices=("load", "kill"))
    p.add_argument("--clients", type=int, default=None, help="load: 64, kill: 1000")
    p.add_argument("--duration", type=float, default=5.0, help="load: seconds")
    p.add_argument("--npages", type=int, default=1024, help="load: guest pages per client")
    p.add_argument("--parallel", type=int, default=32, help="kill: clients alive at once")
    p.add_argument("--max-delay", type=float, default=0.05, help="kill: seconds before a kill")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--socket", default=None, help="use this kvmtagd (else start one)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = 64 if args.scenario == "load" else 1000
    daemon = Daemon(args.socket, ["-v"])
    try:
        result = run_load(daemon, args) if args.scenario == "load" else run_kill(daemon, args)
        result["alive"] = daemon.alive()
    finally:
        daemon.close()
    show(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = not result["alive"] or result.get("failed_clients") or result.get("errors")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
