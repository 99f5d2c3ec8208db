"""roundtrip: KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) through the blocking client, N calls per
repeat, each timed; and the same call from a C program under the LD_PRELOAD shim
(clients/preload, built here with make and the system cc; one run of the program per repeat,
which times its calls itself). Baseline: a 64-byte ping-pong over a socketpair with a child
Python process echoing on a blocking socket; for reference, a trio echo server (a child process
too) pinged the same way. A repeat's figure is its median call; p99 is reported beside it.
Ratio: the case's median / the baseline's median (goal <= 2.5 for the Python client's ioctl:
the budget is the Python client's; the shim's is reported beside it without one).

Every process of the benchmark (this one, the echo children, kvmtagd's threads, the C program)
runs on one CPU: see core.on_one_cpu."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import trio

from kvmtag import client, uapi
from kvmtag.bench.core import (
    Case,
    Context,
    Figure,
    Settings,
    child,
    measure,
    on_one_cpu,
    receive_exactly,
    summarise,
)

MESSAGE = 64
"""Bytes of one ping of the round-trip baselines."""

PRELOAD = Path(__file__).resolve().parent.parent.parent / "clients" / "preload"
"""The shim's sources (a checkout's clients/preload: not part of the installed package)."""
BUILD_TIMEOUT = 300


def title(settings: Settings) -> str:
    return (
        f"roundtrip: {settings.iterations} calls per repeat, the median call, all on one CPU; "
        "ratio = case / socketpair ping-pong of 64 bytes"
    )


def run(settings: Settings, context: Context) -> list[Figure]:
    """KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) on a system fd, and pings of 64 bytes echoed by a
    blocking child process (socketpair) and by a trio server in a child process (Unix socket)."""
    n = settings.iterations
    kvm_socket, directory = context.kvm_socket(), context.directory
    shim_run = shim_program(directory / "preload", kvm_socket, n)
    with contextlib.ExitStack() as stack:
        assert context.kvmtagd_pid is not None
        stack.enter_context(on_one_cpu([context.kvmtagd_pid]))  # before the children fork
        pair, theirs = (stack.enter_context(s) for s in socket.socketpair())
        stack.enter_context(child(_echo, theirs))
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(str(directory / "echo.sock"))
        listener.listen()
        stack.enter_context(child(_trio_echo, listener))
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
                "check_extension_shim": shim_run,
            },
            settings.repeats,
        )
    goals = {"check_extension": 2.5}
    return summarise("roundtrip", runs, "socketpair", goals, lower_is_better=True, p99=True)


def shim_program(out: Path, kvm_socket: str, n: int) -> Case:
    """Builds the shim and its benchmark program into `out`; returns the case that runs the
    program under kvmtag-run for `n` timed calls.

    Raises:
        RuntimeError: no clients/preload beside this package, no make or cc, or a failed build
            (with make's output).
    """
    if not (PRELOAD / "Makefile").exists():
        raise RuntimeError(
            f"the C shim case needs the shim's sources in {PRELOAD} (run from a checkout)"
        )
    compiler = (shlex.split(os.environ.get("CC", "")) or ["cc"])[0]  # make's $(CC)
    for tool in ("make", compiler):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the C shim case needs {tool!r} to build clients/preload")
    target = ["make", "-C", str(PRELOAD), "bench-roundtrip", f"OUT={out}", f"BUILD={out / 'build'}"]
    try:
        done = subprocess.run(target, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(target)} took more than {BUILD_TIMEOUT} s") from e
    if done.returncode != 0:
        raise RuntimeError(
            f"building the C shim case failed ({' '.join(target)}):\n{done.stdout}{done.stderr}"
        )
    wrapper = out / "kvmtag-run"  # it preloads the library beside it: this build's
    shutil.copy2(PRELOAD / "kvmtag-run", wrapper)
    argv = [str(wrapper), str(out / "build" / "bench_roundtrip"), str(n)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMTAG_", "LD_PRELOAD"))}
    env["KVMTAG_SOCKET"] = kvm_socket

    def run() -> list[float]:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        times = done.stdout.split()
        if done.returncode != 0 or len(times) != n:
            raise RuntimeError(
                f"{' '.join(argv)} exited {done.returncode} with {len(times)} of {n} times: "
                f"{done.stderr.strip()}"
            )
        return [int(t) / 1e9 for t in times]

    return run


def _ping(sock: socket.socket, n: int) -> list[float]:
    """`n` round trips of a MESSAGE-byte ping, each timed."""
    ping = bytes(MESSAGE)
    pong = memoryview(bytearray(MESSAGE))
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        sock.sendall(ping)
        receive_exactly(sock, pong)
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
