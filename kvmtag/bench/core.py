"""What every benchmark shares: settings, figures, repeats, child processes and a kvmtagd.

A figure is one case of one benchmark, summarised over repeats (median, min, max, spread) and
standing beside its baseline measured in the same run, as a ratio. Within each repeat the cases
take turns, so a machine getting busier or quieter affects them alike; every case runs once
unmeasured first.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvmtag import client, procmem, uapi
from kvmtag.uapi import LAYOUT

log = logging.getLogger("kvmtag.bench")

SPREAD_WARNING = 0.20
"""A figure whose (max - min) / median over repeats exceeds this was measured on a noisy machine."""


@dataclass(frozen=True)
class Settings:
    quick: bool  # small sizes and counts for CI smoke runs: too noisy to compare with the budget
    tag_bytes: int  # tagkernel: one-per-byte tags per call
    guest_bytes: int  # copy_tags: guest RAM copied per ioctl (its tags are 1/16 of it)
    iterations: int  # roundtrip: calls per repeat
    repeats: int
    # scaling: concurrent client processes, and the calls all of them make together per repeat
    # (split evenly); each client's VM has one memslot of `client_guest_bytes`
    clients: tuple[int, ...] = (1, 8, 64)
    small_calls: int = 4096
    bulk_calls: int = 128
    client_guest_bytes: int = 64 << 20
    memslots: int = 30000  # scaling: the many-memslots VM's (the few: 10)
    # migration: the guest (MiB of RAM, of it populated), migrations per configuration
    migration_ram: int = 1024
    migration_populate: int = 768
    migration_repeats: int = 9


FULL = Settings(quick=False, tag_bytes=64 << 20, guest_bytes=1 << 30, iterations=5000, repeats=7)
QUICK = Settings(
    quick=True, tag_bytes=16 << 20, guest_bytes=64 << 20, iterations=500, repeats=3,
    small_calls=512, bulk_calls=64, client_guest_bytes=16 << 20, memslots=2000,
    migration_ram=64, migration_populate=32, migration_repeats=1,
)  # fmt: skip


@dataclass(frozen=True)
class Figure:
    """One case of one benchmark, summarised over repeats, beside its baseline."""

    benchmark: str
    name: str
    baseline: str  # the case of the same benchmark this one is compared with
    unit: str  # of the samples: "s" (seconds) or "B" (bytes)
    samples: list[float]  # one per repeat (roundtrip: the run's median call)
    median: float
    min: float
    max: float
    spread: float  # (max - min) / median
    p99: float | None  # latency: the median over repeats of each run's 99th percentile
    baseline_median: float
    ratio: float  # throughput: baseline / case; latency and memory: case / baseline
    goal: str | None  # the budget for the ratio, e.g. ">= 0.9"
    met: bool | None
    gib_per_s: float | None  # throughput benchmarks: bytes moved per second
    extra: dict[str, float] = field(default_factory=dict)  # further medians worth a column


Case = Callable[[], list[float]]
"""One run of a case: the value (seconds, bytes) of each operation it measured."""


def measure(cases: Mapping[str, Case], repeats: int) -> dict[str, list[list[float]]]:
    """Runs each case `repeats` times, round-robin, after one unmeasured warm-up run each."""
    for run in cases.values():
        run()
    runs: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            runs[name].append(run())
    return runs


def timed(operation: Callable[[], object]) -> Case:
    """A case that times one call of `operation`."""

    def run() -> list[float]:
        start = time.perf_counter()
        operation()
        return [time.perf_counter() - start]

    return run


def summarise(
    benchmark: str,
    runs: Mapping[str, list[list[float]]],
    baseline: str,
    goals: Mapping[str, float],
    *,
    lower_is_better: bool = False,
    nbytes: int | None = None,
    unit: str = "s",
    p99: bool = False,
) -> list[Figure]:
    """Figures from the runs of `measure`. Throughput ratios are baseline / case (a goal is a
    minimum); with `lower_is_better` (latency, memory) case / baseline (a goal is a maximum)."""
    samples = {name: [statistics.median(run) for run in rs] for name, rs in runs.items()}
    base = statistics.median(samples[baseline])
    figures = []
    for name, values in samples.items():
        median = statistics.median(values)
        ratio = median / base if lower_is_better else base / median
        bound = goals.get(name)
        figures.append(Figure(
            benchmark=benchmark, name=name, baseline=baseline, unit=unit, samples=values,
            median=median, min=min(values), max=max(values),
            spread=(max(values) - min(values)) / median if median else 0.0,
            p99=statistics.median(_p99(run) for run in runs[name]) if p99 else None,
            baseline_median=base, ratio=ratio,
            goal=None if bound is None else f"{'<=' if lower_is_better else '>='} {bound}",
            met=None if bound is None else (ratio <= bound if lower_is_better else ratio >= bound),
            gib_per_s=nbytes / median / (1 << 30) if nbytes else None,
        ))  # fmt: skip
    return figures


def _p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


# --- processes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def child(target: Callable[..., None], *args: object) -> Iterator[None]:
    """Runs target(*args) in a forked child process for the block; stops it after."""
    # fork, not spawn: the children need the sockets made here and nothing else, and start in
    # milliseconds. They are forked before any kvmtag client connection exists in this process.
    context = multiprocessing.get_context("fork")
    proc = context.Process(target=in_child, args=(target, *args), daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def in_child(target: Callable[..., None], *args: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main's handler is not the child's
    target(*args)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like an exception, so kvmtagd and the children are stopped."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def kvmtagd(directory: Path) -> Iterator[tuple[str, int]]:
    """Runs `python -m kvmtag` on a socket in `directory` for the block (its log beside it);
    yields the socket's path once it exists (kvmtagd renames it into place when listening), and
    the daemon's pid."""
    path = directory / "kvm.sock"
    with (directory / "kvmtagd.log").open("w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmtag", "--socket-path", str(path)],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not path.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    output.flush()
                    raise RuntimeError(
                        f"kvmtagd did not start: {(directory / 'kvmtagd.log').read_text()}"
                    )
                time.sleep(0.01)
            yield str(path), proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("kvmtagd ignored SIGTERM: killing it")
                proc.kill()
                proc.wait()


def mte_vm(stack: contextlib.ExitStack, kvm_socket: str, guest: int) -> int:
    """A VM with MTE enabled and one memslot of `guest` bytes at IPA 0: a memfd mapped shared.
    Everything is closed when `stack` is."""
    kvm = client.open("/dev/kvm", socket=kvm_socket)
    stack.callback(client.close, kvm)
    vm = new_mte_vm(stack, kvm)
    region = LAYOUT["kvm_userspace_memory_region"].pack(0, 0, 0, guest, shared_ram(stack, guest))
    client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region)
    return vm


def new_mte_vm(stack: contextlib.ExitStack, kvm: int) -> int:
    """KVM_CREATE_VM on `kvm`, then KVM_ENABLE_CAP(KVM_CAP_ARM_MTE); closed with `stack`."""
    vm = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    stack.callback(client.close, vm)
    enable = LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))
    client.ioctl(vm, uapi.KVM_ENABLE_CAP, enable)
    return vm


def shared_ram(stack: contextlib.ExitStack, size: int) -> int:
    """The address of `size` bytes of a memfd mapped shared here (guest RAM whose fd the
    client can find); unmapped and closed with `stack`."""
    memfd = os.memfd_create("kvmtag-bench-guest", os.MFD_CLOEXEC)
    stack.callback(os.close, memfd)
    os.ftruncate(memfd, size)
    ram = stack.enter_context(mmap.mmap(memfd, size, mmap.MAP_SHARED))
    return procmem.buffer_address(ram).address


def receive_exactly(sock: socket.socket, into: memoryview) -> None:
    """Fill `into` from a blocking socket; ConnectionError if the peer leaves first."""
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if not n:
            raise ConnectionError("the peer child is gone")
        got += n


class Context:
    """What a benchmark may need beside its settings: a scratch directory, and one kvmtagd shared
    by the benchmarks of the run, started by the first that asks for it and stopped at the end."""

    def __init__(self, stack: contextlib.ExitStack, directory: Path) -> None:
        self._stack = stack
        self.directory = directory
        self._socket: str | None = None
        self.kvmtagd_pid: int | None = None

    def kvm_socket(self) -> str:
        if self._socket is None:
            daemon = self.directory / "kvmtagd"
            daemon.mkdir()
            self._socket, self.kvmtagd_pid = self._stack.enter_context(kvmtagd(daemon))
        return self._socket


@contextlib.contextmanager
def on_one_cpu(pids: list[int]) -> Iterator[int]:
    """This process, what it forks, and every thread of `pids`, on one CPU for the block.

    Why: a wake-up across CPUs costs far more on a virtual machine (an interrupt to an idle
    virtual CPU, here 30-45 µs against 9 µs on one CPU) and whether two processes share a CPU
    is the scheduler's choice, so a ping-pong and an ioctl would otherwise be compared under
    different placements, differently in each run."""
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    tasks = [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
    before = {t: os.sched_getaffinity(t) for t in tasks}
    try:
        os.sched_setaffinity(0, {cpu})
        for task in tasks:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(task, {cpu})
        yield cpu
    finally:
        os.sched_setaffinity(0, allowed)
        for task, cpus in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(task, cpus)
