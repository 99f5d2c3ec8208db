"""The performance budget (shared/DESIGN.md), measured as ratios to baselines of the same run.

    python -m kvmtag.bench [--quick] [--json PATH] [--only NAME[,NAME]]

Three benchmarks, each figure beside a baseline measured in the same run on the same machine:

- ``tagkernel``: the C kernel's pack and unpack of 64 MiB of one-per-byte tags against a memcpy
  of those 64 MiB. Ratio: memcpy's time / the case's time (goal ≥ 0.9).
- ``copy_tags``: KVM_ARM_MTE_COPY_TAGS of a 1 GiB memslot (a memfd mapped shared here, MTE
  enabled, tagged once with TO_GUEST first) through a real kvmtagd, in one ioctl each way: 64 MiB
  of tags. Baseline: the same 64 MiB sent over a socketpair by a child Python process (sendall in
  1 MiB chunks) into a preallocated buffer here, timed from the request to the last byte.
  Ratio: the baseline's time / the case's time (goal ≥ 0.5 for FROM_GUEST and TO_GUEST).
- ``roundtrip``: KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) through the blocking client, N calls per
  repeat, each timed. Baseline: a 64-byte ping-pong over a socketpair with a child Python process
  echoing on a blocking socket; for reference, a trio echo server (a child process too) pinged
  the same way. A repeat's figure is its median call; p99 is reported beside it. Ratio: the
  case's median / the baseline's median (goal ≤ 2.5 for the ioctl).

Within each repeat the cases take turns, so a machine getting busier or quieter affects them
alike; every case runs once untimed first. A figure's median, min and max are over repeats; a
spread ((max - min) / median) above 20% is logged as a warning: rerun before trusting it.
Goals are reported, never enforced: the exit status is 0 whatever the ratios.

kvmtagd is started as a subprocess on a socket in a temporary directory and stopped at the end;
child processes are forked before this process connects to kvmtagd or maps guest RAM (so no
client connection is inherited, and forking stays cheap), and are stopped when their benchmark
ends, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from kvmtag import client, procmem, tagkernel, uapi, wire
from kvmtag.uapi import LAYOUT

log = logging.getLogger("kvmtag.bench")

BENCHMARKS = ("tagkernel", "copy_tags", "roundtrip")
SPREAD_WARNING = 0.20
"""A figure whose (max - min) / median over repeats exceeds this was measured on a noisy machine."""
MESSAGE = 64
"""Bytes of one ping of the round-trip baselines."""


@dataclass(frozen=True)
class Settings:
    tag_bytes: int  # tagkernel: one-per-byte tags per call
    guest_bytes: int  # copy_tags: guest RAM copied per ioctl (its tags are 1/16 of it)
    iterations: int  # roundtrip: calls per repeat
    repeats: int


FULL = Settings(tag_bytes=64 << 20, guest_bytes=1 << 30, iterations=5000, repeats=7)
QUICK = Settings(tag_bytes=16 << 20, guest_bytes=64 << 20, iterations=500, repeats=3)
"""For CI smoke runs: a few seconds; its figures are too noisy to compare with the budget."""


@dataclass(frozen=True)
class Figure:
    """One case of one benchmark, summarised over repeats, beside its baseline."""

    benchmark: str
    name: str
    baseline: str  # the case of the same benchmark this one is compared with
    samples_s: list[float]  # one per repeat: the run's time (roundtrip: its median call)
    median_s: float
    min_s: float
    max_s: float
    spread: float  # (max - min) / median
    p99_s: float | None  # roundtrip: the median over repeats of each run's 99th percentile call
    baseline_median_s: float
    ratio: float  # throughput: baseline / case; latency: case / baseline
    goal: str | None  # the budget for the ratio, e.g. ">= 0.9"
    met: bool | None
    gib_per_s: float | None  # throughput benchmarks: bytes moved per second


Case = Callable[[], list[float]]
"""One run of a case: the seconds of each operation it timed."""


def measure(cases: Mapping[str, Case], repeats: int) -> dict[str, list[list[float]]]:
    """Runs each case `repeats` times, round-robin, after one untimed warm-up run each."""
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
    latency: bool = False,
    nbytes: int | None = None,
) -> list[Figure]:
    """Figures from the runs of `measure`. Throughput ratios are baseline / case (a goal is a
    minimum); latency ratios are case / baseline (a goal is a maximum)."""
    samples = {name: [statistics.median(run) for run in rs] for name, rs in runs.items()}
    base = statistics.median(samples[baseline])
    figures = []
    for name, values in samples.items():
        median = statistics.median(values)
        ratio = median / base if latency else base / median
        bound = goals.get(name)
        figures.append(Figure(
            benchmark=benchmark, name=name, baseline=baseline, samples_s=values,
            median_s=median, min_s=min(values), max_s=max(values),
            spread=(max(values) - min(values)) / median,
            p99_s=statistics.median(_p99(run) for run in runs[name]) if latency else None,
            baseline_median_s=base, ratio=ratio,
            goal=None if bound is None else f"{'<=' if latency else '>='} {bound}",
            met=None if bound is None else (ratio <= bound if latency else ratio >= bound),
            gib_per_s=nbytes / median / (1 << 30) if nbytes else None,
        ))  # fmt: skip
    return figures


def _p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


# --- tagkernel: C pack/unpack vs memcpy ---------------------------------------------------------


def bench_tagkernel(settings: Settings) -> list[Figure]:
    """memcpy, pack and unpack of `settings.tag_bytes` one-per-byte tags."""
    size = settings.tag_bytes
    tags = os.urandom(size)  # random high nibbles too: pack must ignore them
    copy = memoryview(bytearray(size))
    packed = bytearray(size // 2)
    unpacked = bytearray(size)

    def memcpy() -> None:
        copy[:] = tags  # one memcpy of the contiguous buffers

    runs = measure(
        {
            "memcpy": timed(memcpy),
            "pack": timed(lambda: tagkernel.pack(packed, tags)),
            "unpack": timed(lambda: tagkernel.unpack(unpacked, packed)),
        },
        settings.repeats,
    )
    return summarise("tagkernel", runs, "memcpy", {"pack": 0.9, "unpack": 0.9}, nbytes=size)


# --- copy_tags: bulk KVM_ARM_MTE_COPY_TAGS vs a raw socket transfer -----------------------------


def bench_copy_tags(settings: Settings, kvm_socket: str) -> list[Figure]:
    """FROM_GUEST and TO_GUEST of a whole memslot in one ioctl, and the raw transfer of as many
    tag bytes from a child process."""
    guest = settings.guest_bytes
    size = guest // 16  # one tag byte per 16-byte granule
    with contextlib.ExitStack() as stack:
        ours, theirs = (stack.enter_context(s) for s in socket.socketpair())
        stack.enter_context(_child(_send_tags, theirs, size))
        received = memoryview(bytearray(size))

        def receive() -> list[float]:
            start = time.perf_counter()
            ours.sendall(b"g")
            got = 0
            while got < size:
                n = ours.recv_into(received[got:])
                if not n:
                    raise ConnectionError("the sender child is gone")
                got += n
            return [time.perf_counter() - start]

        vm = _mte_vm(stack, kvm_socket, guest)
        tags_in = stack.enter_context(mmap.mmap(-1, size))
        tags_in.write(bytes(range(16)) * (size // 16))
        tags_out = stack.enter_context(mmap.mmap(-1, size))

        def copy_tags(flags: int, tags: mmap.mmap) -> Callable[[], None]:
            address = procmem.buffer_address(tags).address
            arg = LAYOUT["kvm_arm_copy_mte_tags"].pack(0, guest, address, flags, 0, 0)

            def run() -> None:
                result = client.ioctl(vm, uapi.KVM_ARM_MTE_COPY_TAGS, arg)
                if result != guest:
                    raise RuntimeError(f"KVM_ARM_MTE_COPY_TAGS copied {result} of {guest} bytes")

            return run

        to_guest = copy_tags(uapi.KVM_ARM_TAGS_TO_GUEST, tags_in)
        to_guest()  # every page tagged before the first read
        runs = measure(
            {
                "socket": receive,
                "from_guest": timed(copy_tags(uapi.KVM_ARM_TAGS_FROM_GUEST, tags_out)),
                "to_guest": timed(to_guest),
            },
            settings.repeats,
        )
        if memoryview(tags_out) != memoryview(tags_in):
            raise RuntimeError("FROM_GUEST did not read back the tags TO_GUEST wrote")
    goals = {"from_guest": 0.5, "to_guest": 0.5}
    return summarise("copy_tags", runs, "socket", goals, nbytes=size)


def _send_tags(sock: socket.socket, size: int) -> None:
    """The baseline's child: `size` bytes in chunks of one window per byte received."""
    data = memoryview(bytes(range(16)) * (size // 16))
    while sock.recv(1):
        for at in range(0, size, wire.WINDOW):
            sock.sendall(data[at : at + wire.WINDOW])


def _mte_vm(stack: contextlib.ExitStack, kvm_socket: str, guest: int) -> int:
    """A VM with MTE enabled and one memslot of `guest` bytes at IPA 0: a memfd mapped shared.
    Everything is closed when `stack` is."""
    kvm = client.open("/dev/kvm", socket=kvm_socket)
    stack.callback(client.close, kvm)
    vm = client.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    stack.callback(client.close, vm)
    enable = LAYOUT["kvm_enable_cap"].pack(uapi.KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0, bytes(64))
    client.ioctl(vm, uapi.KVM_ENABLE_CAP, enable)
    memfd = os.memfd_create("kvmtag-bench-guest", os.MFD_CLOEXEC)
    stack.callback(os.close, memfd)
    os.ftruncate(memfd, guest)
    ram = stack.enter_context(mmap.mmap(memfd, guest, mmap.MAP_SHARED))
    address = procmem.buffer_address(ram).address
    region = LAYOUT["kvm_userspace_memory_region"].pack(0, 0, 0, guest, address)
    client.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region)
    return vm


# --- roundtrip: a small ioctl vs a 64-byte ping-pong ----------------------------------------------


def bench_roundtrip(settings: Settings, kvm_socket: str, directory: Path) -> list[Figure]:
    """KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) on a system fd, and pings of 64 bytes echoed by a
    blocking child process (socketpair) and by a trio server in a child process (Unix socket)."""
    n = settings.iterations
    with contextlib.ExitStack() as stack:
        pair, theirs = (stack.enter_context(s) for s in socket.socketpair())
        stack.enter_context(_child(_echo, theirs))
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(str(directory / "echo.sock"))
        listener.listen()
        stack.enter_context(_child(_trio_echo, listener))
        trio_echo = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        trio_echo.connect(str(directory / "echo.sock"))  # accepted once the child serves
        kvm = client.open("/dev/kvm", socket=kvm_socket)
        stack.callback(client.close, kvm)

        def check_extension() -> list[float]:
            times = []
            for _ in range(n):
                start = time.perf_counter_ns()
                result = client.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE)
                times.append(time.perf_counter_ns() - start)
                if result != 1:
                    raise RuntimeError(f"KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) = {result}")
            return [t / 1e9 for t in times]

        runs = measure(
            {
                "socketpair": lambda: _ping(pair, n),
                "trio_echo": lambda: _ping(trio_echo, n),
                "check_extension": check_extension,
            },
            settings.repeats,
        )
    return summarise("roundtrip", runs, "socketpair", {"check_extension": 2.5}, latency=True)


def _ping(sock: socket.socket, n: int) -> list[float]:
    """`n` round trips of a MESSAGE-byte ping, each timed."""
    ping = bytes(MESSAGE)
    pong = memoryview(bytearray(MESSAGE))
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        sock.sendall(ping)
        got = 0
        while got < MESSAGE:
            k = sock.recv_into(pong[got:])
            if not k:
                raise ConnectionError("the echo child is gone")
            got += k
        times.append(time.perf_counter_ns() - start)
    return [t / 1e9 for t in times]


def _echo(sock: socket.socket) -> None:
    """The socketpair baseline's child: echo until end of file, blocking."""
    buf = memoryview(bytearray(MESSAGE))
    while n := sock.recv_into(buf):
        sock.sendall(buf[:n])


def _trio_echo(listener: socket.socket) -> None:
    """The reference's child: a trio server echoing on every connection of `listener`."""

    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async def serve() -> None:
        sock = trio.socket.from_stdlib_socket(listener)
        await trio.serve_listeners(echo, [trio.SocketListener(sock)])

    trio.run(serve)


# --- processes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: object) -> Iterator[None]:
    """Runs target(*args) in a forked child process for the block; stops it after."""
    # fork, not spawn: the children need the sockets made here and nothing else, and start in
    # milliseconds. They are forked before any kvmtag client connection exists in this process.
    context = multiprocessing.get_context("fork")
    proc = context.Process(target=_in_child, args=(target, *args), daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _in_child(target: Callable[..., None], *args: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main's handler is not the child's
    target(*args)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like an exception, so kvmtagd and the children are stopped."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def kvmtagd(directory: Path) -> Iterator[str]:
    """Runs `python -m kvmtag` on a socket in `directory` for the block (its log beside it);
    yields the socket's path once it exists (kvmtagd renames it into place when listening)."""
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
            yield str(path)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("kvmtagd ignored SIGTERM: killing it")
                proc.kill()
                proc.wait()


# --- the run ------------------------------------------------------------------------------------


def run_benchmarks(settings: Settings, names: set[str]) -> list[Figure]:
    """The selected benchmarks, in BENCHMARKS order; one kvmtagd for those that need one."""
    figures = []
    if "tagkernel" in names:
        log.info("tagkernel: %d MiB of tags", settings.tag_bytes >> 20)
        figures += bench_tagkernel(settings)
    if names & {"copy_tags", "roundtrip"}:
        with (
            tempfile.TemporaryDirectory(prefix="kvmtag-bench-") as tmp,
            kvmtagd(Path(tmp)) as kvm_socket,
        ):
            if "copy_tags" in names:
                log.info("copy_tags: %d MiB of guest RAM", settings.guest_bytes >> 20)
                figures += bench_copy_tags(settings, kvm_socket)
            if "roundtrip" in names:
                log.info("roundtrip: %d calls per repeat", settings.iterations)
                figures += bench_roundtrip(settings, kvm_socket, Path(tmp))
    return figures


def titles(settings: Settings) -> dict[str, str]:
    return {
        "tagkernel": f"tagkernel: pack/unpack of {settings.tag_bytes >> 20} MiB of one-per-byte "
        "tags; ratio = memcpy time / case time",
        "copy_tags": f"copy_tags: KVM_ARM_MTE_COPY_TAGS of {settings.guest_bytes >> 20} MiB of "
        f"guest RAM ({settings.guest_bytes >> 24} MiB of tags) through kvmtagd; "
        "ratio = socket time / case time",
        "roundtrip": f"roundtrip: {settings.iterations} calls per repeat, the median call; "
        "ratio = case / socketpair ping-pong of 64 bytes",
    }


def format_table(figures: list[Figure], settings: Settings) -> str:
    lines = [f"{settings.repeats} repeats; median, min and max over repeats"]
    for benchmark, title in titles(settings).items():
        group = [f for f in figures if f.benchmark == benchmark]
        if not group:
            continue
        scale, unit = (1e6, "µs") if benchmark == "roundtrip" else (1e3, "ms")
        rate = "p99 " + unit if benchmark == "roundtrip" else "GiB/s"
        lines += ["", title, f"{'case':<16} {'median ' + unit:>10} {'min':>8} {'max':>8} "
                  f"{rate:>8} {'ratio':>6}  goal"]  # fmt: skip
        for f in group:
            extra = (f.p99_s or 0) * scale if benchmark == "roundtrip" else f.gib_per_s or 0
            verdict = "" if f.goal is None else f"{f.goal}: {'ok' if f.met else 'MISSED'}"
            lines.append(
                f"{f.name:<16} {f.median_s * scale:>10.2f} {f.min_s * scale:>8.2f} "
                f"{f.max_s * scale:>8.2f} {extra:>8.2f} {f.ratio:>6.2f}  {verdict}"
            )
    return "\n".join(lines)


def _names(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(BENCHMARKS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(sorted(unknown)) or '(none)'}; "
            f"choose from {', '.join(BENCHMARKS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvmtag.bench",
        description="the performance budget of shared/DESIGN.md, as ratios to baselines "
        "measured in the same run",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts (CI smoke)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", type=_names, default=set(BENCHMARKS),
        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="kvmtag.bench: %(levelname)s: %(message)s")
    settings = QUICK if args.quick else FULL

    figures = run_benchmarks(settings, args.only)
    print(format_table(figures, settings))
    noisy = [f for f in figures if f.spread > SPREAD_WARNING]
    for f in noisy:
        log.warning(
            "%s/%s: spread %.0f%% > %.0f%% (noisy machine?): rerun before trusting its ratio",
            f.benchmark, f.name, f.spread * 100, SPREAD_WARNING * 100,
        )  # fmt: skip
    if args.json:
        report = {
            "mode": "quick" if args.quick else "full",
            "settings": asdict(settings),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "titles": {name: t for name, t in titles(settings).items() if name in args.only},
            "spread_warning": SPREAD_WARNING,
            "noisy": [f"{f.benchmark}/{f.name}" for f in noisy],
            "figures": [asdict(f) for f in figures],
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
