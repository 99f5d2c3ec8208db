"""The LD_PRELOAD shim (clients/preload, issue 8): unmodified C programs against a real kvmtagd.

The library and the C programs are built once per session with the system `cc` (`make -C
clients/preload tests`, into a temporary directory). Each program does what a VMM does, written
against the arm64 uapi headers and knowing nothing of kvmtag; run under the shim it must get what
an arm64 MTE host would give it, print one line per check and exit 0. Around them:

- the shared protocol vectors: frames made by kvmtag.wire are decoded and re-encoded by the
  shim's own C codec (tests/wire_vectors.c over wire.c), frames the C codec makes are decoded
  and re-encoded by kvmtag.wire, and malformed frames get the same verdict from both;
- the C mapping classification (procmem.c) against kvmtag.procmem on the same mappings of this
  very process, loaded with ctypes;
- a fake kvmtagd that breaks the protocol in each way a daemon can (the shared window's
  handshake and callbacks included): the program sees EIO on that fd and carries on;
- one run under valgrind with no errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmtag import procmem, uapi, wire
from kvmtag.usermem import Vma, VmaKind

from .conftest import running_kvmtagd

PRELOAD = Path(__file__).resolve().parent.parent / "clients" / "preload"
ARM64_INCLUDE = Path("/usr/aarch64-linux-gnu/include")
VALGRIND = "/usr/bin/valgrind"
TIMEOUT = 300  # seconds for one program (valgrind's run is the slowest)
PROGRAMS = ["vmm_basic", "vmm_fds", "vmm_threads", "vmm_fork", "vmm_vcpu", "vmm_run", "vmm_signals"]
EXPORTED = {
    "open", "open64", "openat", "openat64", "__open_2", "__open64_2", "__openat_2",
    "__openat64_2", "close", "dup", "dup2", "dup3", "fcntl", "fcntl64", "ioctl", "mmap", "mmap64",
}  # fmt: skip


# --- building and running -----------------------------------------------------------------------


class Build:
    """A build of clients/preload: the library (with kvmtag-run beside it) and the programs."""

    def __init__(self, out: Path, log: str) -> None:
        self.out = out
        self.log = log
        self.library = out / "libkvmtag-preload.so"
        self.run_wrapper = out / "kvmtag-run"
        self.bin = out / "build"

    def program(self, name: str) -> str:
        return str(self.bin / name)


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.fail("no system cc or make: run `make deps`")
    if not (ARM64_INCLUDE / "asm" / "kvm.h").exists():
        pytest.fail(f"{ARM64_INCLUDE} is missing: run `make deps` (linux-libc-dev-arm64-cross)")
    out = tmp_path_factory.mktemp("preload")
    done = subprocess.run(
        ["make", "-C", str(PRELOAD), "tests", f"OUT={out}", f"BUILD={out / 'build'}"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"make failed:\n{log}"
    # kvmtag-run preloads the library beside it: a copy beside this build's library.
    shutil.copy2(PRELOAD / "kvmtag-run", out / "kvmtag-run")
    return Build(out, log)


def shim_env(build: Build, socket_path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMTAG_", "LD_PRELOAD"))}
    env.update(LD_PRELOAD=str(build.library), KVMTAG_SOCKET=socket_path, KVMTAG_DEBUG="1")
    env.update(extra)
    return env


def run(
    build: Build, socket_path: str, *argv: str, prefix: tuple[str, ...] = (), **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *argv], env=shim_env(build, socket_path, **extra), capture_output=True,
        text=True, timeout=TIMEOUT,
    )  # fmt: skip


def assert_passed(done: subprocess.CompletedProcess[str], name: str) -> None:
    output = done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert done.returncode == 0 and not failed, f"{name} exited {done.returncode}:\n{output}"
    assert f"PASS {name}" in done.stdout, output
    assert sum(line.startswith("ok ") for line in done.stdout.splitlines()) > 0, output


# --- the library ---------------------------------------------------------------------------------


def test_the_library_and_programs_build_without_warnings(build: Build) -> None:
    assert "warning" not in build.log.lower(), build.log
    for flag in ("-O2", "-Wall", "-Wextra", "-fPIC", "-shared", "-pthread"):
        assert flag in build.log, f"{flag} missing from the build:\n{build.log}"


def test_it_exports_exactly_the_interposed_functions(build: Build) -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils)")
    listing = subprocess.run(
        [nm, "-D", "--defined-only", str(build.library)], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    symbols = {line.split()[-1] for line in listing.splitlines() if " T " in line}
    assert symbols == EXPORTED


def test_ioctl_table_matches_uapi(build: Build) -> None:
    """The shim's explicit table (ioctls.h) says what uapi.IOCTLS says, line for line."""
    out = harness(build, ["ioctls"])[0]
    table = {}
    for line in out:
        _, number, arg, size, creates, name = line.split()
        table[int(number)] = (name, arg, int(size), creates == "1")
    expected = {
        spec.number: (
            spec.name,
            spec.arg.value,
            uapi.LAYOUT[spec.struct].size if spec.struct else 0,
            spec.name in ("KVM_CREATE_VM", "KVM_CREATE_VCPU"),
        )
        for spec in uapi.IOCTLS.values()
    }
    assert table == expected


# --- the VMM-like programs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_under_the_shim(build: Build, kvmtagd: str, file_dir: str, name: str) -> None:
    args = [file_dir] if name == "vmm_basic" else []
    assert_passed(run(build, kvmtagd, build.program(name), *args), name)


def test_kvmtag_run_wrapper(build: Build, kvmtagd: str) -> None:
    env = shim_env(build, kvmtagd)
    del env["LD_PRELOAD"]
    done = subprocess.run(
        [str(build.run_wrapper), build.program("vmm_vcpu")], env=env, capture_output=True,
        text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert_passed(done, "vmm_vcpu")
    usage = subprocess.run([str(build.run_wrapper)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: kvmtag-run" in usage.stderr


def test_kvmtag_run_without_its_library_says_how_to_build_it(tmp_path: Path) -> None:
    shutil.copy2(PRELOAD / "kvmtag-run", tmp_path / "kvmtag-run")
    done = subprocess.run([str(tmp_path / "kvmtag-run"), "true"], capture_output=True, text=True)
    assert done.returncode == 127 and "make -C" in done.stderr


def test_an_unmodified_interpreter(build: Build, kvmtagd: str) -> None:
    """Python itself (os.open, fcntl.ioctl, os.dup: libc's open64/openat, ioctl, dup), and
    KVMTAG_DEVICE: the named path is the device, /dev/kvm goes back to the real libc."""
    script = (
        "import fcntl, os, stat, sys\n"
        "dev = sys.argv[1]\n"
        "fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)\n"
        "assert stat.S_ISSOCK(os.fstat(fd).st_mode)\n"
        "assert fcntl.ioctl(fd, 0xAE03, 205) == 1\n"
        "d = os.dup(fd)\n"
        "assert fcntl.ioctl(d, 0xAE00, 0) == 12\n"
        "vm = fcntl.ioctl(fd, 0xAE01, 0)\n"
        "assert stat.S_ISSOCK(os.fstat(vm).st_mode) and not os.get_inheritable(vm)\n"
        "if os.access('/dev/kvm', os.R_OK | os.W_OK) and dev != '/dev/kvm':\n"
        "    real = os.open('/dev/kvm', os.O_RDWR)\n"
        "    assert stat.S_ISCHR(os.fstat(real).st_mode)\n"
        "print('PASS interpreter')\n"
    )
    for device in ("/dev/kvm", "/dev/kvmtag-test-device"):
        done = run(build, kvmtagd, sys.executable, "-c", script, device, KVMTAG_DEVICE=device)
        assert done.returncode == 0 and "PASS interpreter" in done.stdout, done.stdout + done.stderr


def test_other_programs_are_untouched(build: Build, kvmtagd: str) -> None:
    """A shell pipeline opening, duplicating and mapping files behaves as without the shim,
    and nothing is printed on its behalf."""
    command = ["sh", "-c", "ls -la /dev/null | cut -c1-10; ls /proc/self/fd | wc -l; echo done"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    shimmed = run(build, kvmtagd, *command)
    assert shimmed.returncode == plain.returncode == 0
    assert (shimmed.stdout, shimmed.stderr) == (plain.stdout, plain.stderr)


# --- failures of the daemon ----------------------------------------------------------------------


def test_open_without_a_daemon_is_enoent(build: Build, tmp_path: Path) -> None:
    done = run(build, str(tmp_path / "nobody.sock"), build.program("vmm_errors"), "unreachable",
               "ENOENT")  # fmt: skip
    assert_passed(done, "vmm_errors unreachable")


def test_open_of_a_stale_socket_is_econnrefused(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: connect() is refused
    done = run(build, str(path), build.program("vmm_errors"), "unreachable", "ECONNREFUSED")
    assert_passed(done, "vmm_errors unreachable")


def test_the_default_socket_is_under_xdg_runtime_dir(build: Build, kvmtagd: str,
                                                     tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "kvmtag").mkdir()
    (tmp_path / "kvmtag" / "kvm.sock").symlink_to(kvmtagd)
    env = shim_env(build, kvmtagd, XDG_RUNTIME_DIR=str(tmp_path))
    del env["KVMTAG_SOCKET"]
    done = subprocess.run([build.program("vmm_vcpu")], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert_passed(done, "vmm_vcpu")


def test_an_ioctl_after_the_daemon_is_gone_is_eio(build: Build, tmp_path: Path) -> None:
    with running_kvmtagd(tmp_path) as (path, daemon):
        child = subprocess.Popen(
            [build.program("vmm_errors"), "gone"], env=shim_env(build, path),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert child.stdout is not None and child.stdin is not None
            for line in child.stdout:
                if line.startswith(("READY", "FAIL")):
                    break
            daemon.terminate()
            daemon.wait(timeout=TIMEOUT)
            child.stdin.write("go\n")
            child.stdin.close()
            output = child.stdout.read()
            assert child.wait(timeout=TIMEOUT) == 0, output
            assert "PASS vmm_errors gone" in output
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _frame(mtype: int, body: bytes = b"", nfds: int = 0, req_id: int = 1,
           length: int | None = None) -> bytes:  # fmt: skip
    size = wire.HEADER_SIZE + len(body) if length is None else length
    return struct.pack("<IHHII", size, mtype, nfds, req_id, 0) + body


def _null_fd() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


MT = wire.MessageType


# How a fake daemon answers the first IOCTL of its first connection: (raw bytes, fds to pass
# with them, close the connection after?), or None to close it at once. It then says nothing more
# on that connection; later connections are served properly.
Misbehaviour = Callable[[int], "tuple[bytes, int, bool] | None"]
MISBEHAVIOURS: dict[str, Misbehaviour] = {
    "unknown message type": lambda i: (_frame(99, req_id=i), 0, False),
    "a reply for another request": lambda i: (_frame(MT.REPLY, bytes(16), req_id=i + 1), 0, False),
    "a client's message": lambda i: (_frame(MT.IOCTL, bytes(16), req_id=i), 0, False),
    "an ERROR frame": lambda i: (_frame(MT.ERROR, b"\x47\0\0\0bad", req_id=i), 0, False),
    "a frame longer than max_message": lambda i: (
        _frame(MT.REPLY, bytes(16), req_id=i, length=wire.MAX_MESSAGE + 1), 0, False
    ),
    "a short REPLY body": lambda i: (_frame(MT.REPLY, bytes(8), req_id=i), 0, False),
    "descriptors on a READ": lambda i: (_frame(MT.READ, bytes(16), nfds=1, req_id=i), 1, False),
    "a REPLY declaring descriptors that never come": lambda i: (
        _frame(MT.REPLY, bytes(16), nfds=2, req_id=i), 1, False
    ),
    "a stray descriptor with a REPLY": lambda i: (_frame(MT.REPLY, bytes(16), req_id=i), 1, False),
    "a READ larger than a frame": lambda i: (
        _frame(MT.READ, struct.pack("<QQ", 0x1000, 1 << 40), req_id=i), 0, False
    ),
    "the connection closed mid-request": lambda i: None,
    "half a frame, then closed": lambda i: (_frame(MT.REPLY, bytes(16), req_id=i)[:10], 0, True),
    "a READ_WINDOW without a window": lambda i: (
        _frame(MT.READ_WINDOW, struct.pack("<QQ", 0x1000, 16), req_id=i), 0, False
    ),
    "a WRITE_WINDOW without a window": lambda i: (
        _frame(MT.WRITE_WINDOW, struct.pack("<QQ", 0x1000, 0), req_id=i), 0, False
    ),
}  # fmt: skip
# The same, on connections that have a shared window (the fake gives one to every HELLO that
# asks).
WINDOW_MISBEHAVIOURS: dict[str, Misbehaviour] = {
    "a READ_WINDOW larger than the window": lambda i: (
        _frame(MT.READ_WINDOW, struct.pack("<QQ", 0x1000, wire.WINDOW + 1), req_id=i), 0, False
    ),
    "a WRITE_WINDOW larger than the window": lambda i: (
        _frame(MT.WRITE_WINDOW, struct.pack("<QQ", 0x1000, 2**64 - 1), req_id=i), 0, False
    ),
    "a WINDOW_DONE (a client's message)": lambda i: (
        _frame(MT.WINDOW_DONE, bytes(8), req_id=i), 0, False
    ),
    "descriptors on a READ_WINDOW": lambda i: (
        _frame(MT.READ_WINDOW, struct.pack("<QQ", 0x1000, 16), nfds=1, req_id=i), 1, False
    ),
}  # fmt: skip


def _window_memfd(size: int = wire.WINDOW, mode: int = os.O_RDWR) -> int:
    """A window as kvmtagd makes one: a memfd of size bytes, sealed at that size (reopened
    with another mode if asked)."""
    fd = os.memfd_create("kvmtag-window", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    if mode != os.O_RDWR:
        other = os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
        os.close(fd)
        fd = other
    return fd


# How a fake daemon answers the HELLO of its first connection: the HELLO_REPLY and the
# descriptors to pass with it (closed after sending). Later connections are served properly.
BadHello = Callable[[wire.Hello], "tuple[wire.HelloReply, list[int]]"]


def _hello_with(*fds: int, **fields: int) -> BadHello:
    def answer(hello: wire.Hello) -> tuple[wire.HelloReply, list[int]]:
        reply = wire.HelloReply(hello.id, wire.FdKind.SYSTEM, 4096, "latest", fds=list(fds),
                                **fields)  # fmt: skip
        return reply, list(fds)

    return answer


BAD_HELLOS: dict[str, Callable[[], BadHello]] = {
    "two descriptors with HELLO_REPLY": lambda: _hello_with(_window_memfd(), _window_memfd()),
    "a window with a refusal": lambda: _hello_with(_window_memfd(), errno=errno.EMFILE),
    "a window smaller than announced": lambda: _hello_with(_window_memfd(wire.WINDOW - 4096)),
    "a window that is not a file": lambda: _hello_with(_null_fd()),
    "a read-only window": lambda: _hello_with(_window_memfd(mode=os.O_RDONLY)),
    "a window of no size": lambda: _hello_with(_window_memfd(4096), window=0),
    "a window beyond the shim's limit": lambda: _hello_with(_window_memfd(), window=2**32 - 1),
}  # fmt: skip


def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """data with fds alongside its first byte; the fds are closed once sent."""
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = conn.sendmsg([data], anc if fds else [])
        conn.sendall(data[sent:])
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def fake_kvmtagd(
    path: Path,
    misbehave: Misbehaviour | None,
    *,
    window: bool = False,
    bad_hello: BadHello | None = None,
) -> Iterator[list[wire.Hello]]:
    """A daemon (kvmtag.wire's codec) whose first connection breaks the protocol: in its
    handshake (bad_hello), or in answer to its first IOCTL (misbehave). window: HELLOs that ask
    for a shared window get one. Yields the HELLOs received."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    stop = threading.Event()
    errors: list[BaseException] = []
    hellos: list[wire.Hello] = []

    def events(conn: socket.socket, codec: wire.Codec) -> Iterator[wire.Event]:
        while True:
            event = codec.next_event()
            if event is wire.NEED_DATA:
                data = conn.recv(65536)
                if not data:
                    return
                codec.receive_data(data)
                continue
            yield event  # type: ignore[misc]

    def serve(conn: socket.socket, first: bool) -> None:
        codec = wire.Codec(daemon=True)
        with conn:
            for event in events(conn, codec):
                fds: list[int] = []
                reply: wire.Event
                if isinstance(event, wire.Hello):
                    hellos.append(event)
                    if first and bad_hello is not None:
                        reply, fds = bad_hello(event)
                        _send(conn, codec.send(reply)[0], fds)
                        continue
                    if window and event.flags & wire.HELLO_SHARED_WINDOW:
                        fds = [_window_memfd()]
                    reply = wire.HelloReply(event.id, wire.FdKind.SYSTEM, 4096, "latest", fds=fds)
                elif isinstance(event, wire.Ioctl) and first and misbehave is not None:
                    bad = misbehave(event.id)
                    if bad is None:
                        return
                    data, nfds, close = bad
                    _send(conn, data, [_null_fd() for _ in range(nfds)])
                    if close:
                        return
                    continue  # and say nothing more: the client must not wait for us
                elif isinstance(event, wire.Ioctl) and event.request == uapi.KVM_GET_API_VERSION:
                    reply = wire.Reply(event.id, 12)
                else:
                    reply = wire.Reply(event.id, -1, errno.EINVAL)
                _send(conn, codec.send(reply)[0], fds)

    def accept() -> None:
        first = True
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                errors.append(e)
                return
            threading.Thread(target=lambda c=conn, f=first: _guard(serve, c, f, errors),
                             daemon=True).start()  # fmt: skip
            first = False

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield hellos
    finally:
        stop.set()
        thread.join(TIMEOUT)
        listener.close()
    assert not errors, errors


def _guard(target: Callable[..., None], conn: socket.socket, first: bool,
           errors: list[BaseException]) -> None:  # fmt: skip
    try:
        target(conn, first)
    except (ConnectionError, wire.ProtocolError):
        pass  # the client shut the broken connection down
    except BaseException as e:  # reported by the fixture, which asserts there were none
        errors.append(e)


@pytest.mark.parametrize("how", list(MISBEHAVIOURS))
def test_a_protocol_error_is_eio_not_a_crash(build: Build, tmp_path: Path, how: str) -> None:
    path = tmp_path / "fake.sock"
    with fake_kvmtagd(path, MISBEHAVIOURS[how]):
        done = run(build, str(path), build.program("vmm_errors"), "broken")
    assert_passed(done, "vmm_errors broken")


@pytest.mark.parametrize("how", list(WINDOW_MISBEHAVIOURS))
def test_a_window_violation_is_eio(build: Build, tmp_path: Path, how: str) -> None:
    """On connections that have a shared window: every HELLO asked for one (1.1)."""
    path = tmp_path / "fake.sock"
    with fake_kvmtagd(path, WINDOW_MISBEHAVIOURS[how], window=True) as hellos:
        done = run(build, str(path), build.program("vmm_errors"), "broken")
    assert_passed(done, "vmm_errors broken")
    assert len(hellos) == 2
    assert all((h.major, h.minor, h.flags) == (1, 1, wire.HELLO_SHARED_WINDOW) for h in hellos)


@pytest.mark.parametrize("how", list(BAD_HELLOS))
def test_a_bad_window_in_the_handshake_is_eio(build: Build, tmp_path: Path, how: str) -> None:
    """open fails with EIO, leaves no descriptor behind (the window's are closed), and the
    next open works."""
    path = tmp_path / "fake.sock"
    with fake_kvmtagd(path, None, window=True, bad_hello=BAD_HELLOS[how]()):
        done = run(build, str(path), build.program("vmm_errors"), "handshake")
    assert_passed(done, "vmm_errors handshake")


# --- valgrind ------------------------------------------------------------------------------------


def test_valgrind_finds_no_errors(build: Build, kvmtagd: str, file_dir: str) -> None:
    _require_valgrind()
    # No suppressions: memcheck does not model process_vm_writev into the calling process, so
    # the programs fill their output buffers before the shim writes them (check.h, SENTINEL).
    prefix = (VALGRIND, "--error-exitcode=99", "--leak-check=full", "--show-leak-kinds=definite",
              "--errors-for-leak-kinds=definite,possible", "--track-fds=no")  # fmt: skip
    programs = [("vmm_basic", [file_dir]), ("vmm_threads", []), ("vmm_fds", []), ("vmm_vcpu", [])]
    for name, args in programs:
        done = run(build, kvmtagd, build.program(name), *args, prefix=prefix)
        assert done.returncode == 0, f"valgrind {name} exited {done.returncode}:\n{done.stderr}"
        assert_passed(done, name)
        assert "ERROR SUMMARY: 0 errors" in done.stderr, done.stderr


def _require_valgrind() -> None:
    if not os.access(VALGRIND, os.X_OK):
        pytest.fail(
            f"{VALGRIND} is missing: add `valgrind` to APT_PACKAGES in the top Makefile and run "
            "`make deps`"
        )


def test_other_fds_cost_no_allocation_and_no_output(build: Build, kvmtagd: str) -> None:
    """open, ioctl, dup, dup2, dup3, fcntl, mmap and close on fds that are not kvmtag's: the
    same heap allocations for 10 rounds as for 1000 (none per call), and nothing printed."""
    _require_valgrind()
    allocations = []
    for rounds in (10, 1000):
        done = run(build, kvmtagd, build.program("passthrough"), str(rounds),
                   prefix=(VALGRIND, "--error-exitcode=99"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        assert all(line.startswith("==") for line in done.stderr.splitlines()), done.stderr
        heap = [line for line in done.stderr.splitlines() if "total heap usage" in line]
        allocations.append(heap[0].split("usage:")[1].split("allocs")[0].strip())
    assert allocations[0] == allocations[1]


# --- shared protocol vectors ---------------------------------------------------------------------


def harness(build: Build, commands: list[str]) -> list[list[str]]:
    """Run wire_vectors with one command per line; its answer lines for each."""
    done = subprocess.run(
        [build.program("wire_vectors")], input="".join(c + "\n" for c in commands),
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    answers: list[list[str]] = [[]]
    for line in done.stdout.splitlines():
        if line == "end":
            answers.append([])
        else:
            answers[-1].append(line)
    assert answers.pop() == []
    assert len(answers) == len(commands)
    return answers


def parse_fields(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def fields_of(event: wire.Event) -> dict[str, str]:
    """kvmtag.wire's event in the harness's key=value rendering."""
    name = {
        wire.Hello: "HELLO", wire.HelloReply: "HELLO_REPLY", wire.Ioctl: "IOCTL",
        wire.Reply: "REPLY", wire.Read: "READ", wire.ReadData: "READ_DATA", wire.Write: "WRITE",
        wire.WriteDone: "WRITE_DONE", wire.Vmas: "VMAS", wire.VmasData: "VMAS_DATA",
        wire.Error: "ERROR", wire.ReadWindow: "READ_WINDOW", wire.WriteWindow: "WRITE_WINDOW",
        wire.WindowDone: "WINDOW_DONE",
    }[type(event)]  # fmt: skip
    f: dict[str, object] = {"type": name, "id": event.id, "nfds": 0}
    if isinstance(event, wire.Hello):
        f |= {"major": event.major, "minor": event.minor, "flags": event.flags}
    elif isinstance(event, wire.HelloReply):
        f |= {
            "nfds": len(event.fds), "major": event.major, "minor": event.minor,
            "fd_kind": int(event.fd_kind),
            "page_size": event.page_size, "max_message": event.max_message,
            "max_fds": event.max_fds, "window": event.window, "errno": event.errno,
            "extensions": event.extensions,
            "profile": event.profile.encode("ascii").ljust(16, b"\0").hex(),
        }  # fmt: skip
    elif isinstance(event, wire.Ioctl):
        flags = 0
        if event.inline is not None:
            flags = wire.IOCTL_INLINE | (wire.IOCTL_INLINE_WRITABLE if event.inline_writable else 0)
        f |= {"request": event.request & 0xFFFFFFFF, "flags": flags,
              "arg": event.arg & (2**64 - 1), "data": (event.inline or b"").hex()}  # fmt: skip
    elif isinstance(event, wire.Reply):
        f |= {"nfds": len(event.fds), "result": event.result, "errno": event.errno,
              "flags": wire.REPLY_WRITTEN_BACK if event.written_back is not None else 0,
              "data": (event.written_back or b"").hex()}  # fmt: skip
    elif isinstance(event, wire.Read):
        f |= {"addr": event.addr, "size": event.size}
    elif isinstance(event, wire.ReadData):
        f |= {"data": bytes(event.data).hex()}
    elif isinstance(event, wire.Write):
        f |= {"addr": event.addr, "data": bytes(event.data).hex()}
    elif isinstance(event, wire.WriteDone):
        f |= {"written": event.written}
    elif isinstance(event, wire.Vmas):
        f |= {"start": event.start, "end": event.end}
    elif isinstance(event, wire.VmasData):
        f |= {"nfds": sum(v.fd is not None for v in event.vmas), "count": len(event.vmas)}
        for i, v in enumerate(event.vmas):
            flags = (wire.VMA_SHARED if v.shared else 0) | (wire.VMA_WRITABLE if v.writable else 0)
            flags |= wire.VMA_HAS_FD if v.fd is not None else 0
            flags |= wire.VMA_READABLE if v.readable else 0
            f[f"vma{i}"] = ",".join(map(str, (v.start, v.end, v.pgoff, v.dev, v.ino,
                                              wire.VMA_KINDS.index(v.kind), flags)))  # fmt: skip
    elif isinstance(event, wire.ReadWindow | wire.WriteWindow):
        f |= {"addr": event.addr, "size": event.size}
    elif isinstance(event, wire.WindowDone):
        f |= {"count": event.count}
    else:
        assert isinstance(event, wire.Error)
        f |= {"code": event.code, "data": event.message.encode().hex()}
    return {k: str(v) for k, v in f.items()}


def _vmas_with_fds(n: int) -> list[Vma]:
    base = 0x7F00_0000_0000
    return [
        Vma(
            base + i * 0x10000,
            base + (i + 1) * 0x10000,
            VmaKind.SHMEM,
            True,
            i % 2 == 0,
            0x1A + i,
            1000 + i,
            i * 4096,
            _null_fd(),
            True,
        )
        for i in range(n)
    ]


def vector_events() -> list[tuple[bool, wire.Event]]:
    """(sent by the daemon?, event): every message type, edge values included."""
    return [
        (False, wire.Hello(1)),
        (False, wire.Hello(0xFFFFFFFF, 1, 7, 3)),
        (True, wire.HelloReply(1, wire.FdKind.SYSTEM, 4096, "latest")),
        (
            True,
            wire.HelloReply(
                9, wire.FdKind.VCPU, 65536, "5.14", errno.EPROTONOSUPPORT, 2**64 - 1, 17, 3, 5, 2, 9
            ),
        ),
        (True, wire.HelloReply(2, wire.FdKind.VM, 16384, "x" * 16)),
        (False, wire.Ioctl(2, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_ARM_MTE)),
        (False, wire.Ioctl(3, uapi.KVM_ARM_MTE_COPY_TAGS, 0, bytes(range(48)))),
        (False, wire.Ioctl(4, uapi.KVM_ARM_PREFERRED_TARGET, 0, bytes(32), True)),
        (False, wire.Ioctl(5, uapi.KVM_SET_USER_MEMORY_REGION, 2**64 - 1)),
        (False, wire.Ioctl(6, 0xFFFFFFFF, 0, b"")),
        (True, wire.Reply(2, 1)),
        (True, wire.Reply(3, -1, errno.EFAULT)),
        (True, wire.Reply(4, -(2**63), 4095, b"\x7f" * 32)),
        (True, wire.Reply(5, 2**63 - 1, 0, b"")),
        (True, wire.Reply(6, 0, 0, None, [_null_fd(), _null_fd()])),
        (True, wire.Reply(7, 0, 0, None, [_null_fd() for _ in range(wire.MAX_FDS)])),
        (True, wire.Read(8, 0x7FFC_0000_1000, wire.WINDOW)),
        (True, wire.Read(8, 2**64 - 1, 0)),
        (False, wire.ReadData(8, bytes(i & 15 for i in range(wire.WINDOW)))),
        (False, wire.ReadData(8, b"")),
        (True, wire.Write(9, 2**64 - 4096, b"\x0f" * 4096)),
        (True, wire.Write(9, 0, b"")),
        (False, wire.WriteDone(9, 2**64 - 1)),
        (True, wire.Vmas(10, 0x1000, 0xFFFF_FFFF_F000)),
        (False, wire.VmasData(10, [])),
        (
            False,
            wire.VmasData(
                10,
                [
                    Vma(0x1000, 0x5000, VmaKind.ANON, False, True),
                    Vma(0x5000, 0x6000, VmaKind.OTHER, False, False, readable=False),
                    Vma(
                        0x7000,
                        0x9000,
                        VmaKind.FILE,
                        True,
                        True,
                        os.makedev(259, 3),
                        2**63,
                        2**40,
                        None,
                    ),
                ],
            ),
        ),
        (False, wire.VmasData(11, _vmas_with_fds(3))),
        (
            False,
            wire.VmasData(
                12,
                [
                    *_vmas_with_fds(wire.MAX_FDS),
                    Vma(0x1000, 0x2000, VmaKind.HUGETLBFS, True, True, 0x30, 5, 0, None),
                ],
            ),
        ),
        (True, wire.Error(0, errno.EPROTO, "bad frame: ünïcode")),
        (True, wire.Error(4, 0, "")),
        # 1.1: the shared window (after the 1.0 frames, whose indices _stream_cases uses).
        (False, wire.Hello(13, flags=wire.HELLO_SHARED_WINDOW)),
        (
            True,
            wire.HelloReply(13, wire.FdKind.VM, 4096, "latest", extensions=1, fds=[_null_fd()]),
        ),
        (True, wire.HelloReply(14, wire.FdKind.SYSTEM, 16384, "6.1", fds=[_null_fd(), _null_fd()])),
        (True, wire.ReadWindow(15, 0x7FFC_0000_1000, wire.WINDOW)),
        (True, wire.ReadWindow(15, 2**64 - 1, 0)),
        (True, wire.WriteWindow(16, 0, 2**64 - 1)),
        (True, wire.WriteWindow(0xFFFFFFFF, 0x1000, 4096)),
        (False, wire.WindowDone(15, 0)),
        (False, wire.WindowDone(16, 2**64 - 1)),
    ]


def _close_event_fds(event: wire.Event) -> None:
    if isinstance(event, wire.Reply | wire.HelloReply):
        fds = event.fds
    elif isinstance(event, wire.VmasData):
        fds = [v.fd for v in event.vmas if v.fd is not None]
    else:
        fds = []
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


Chunk = tuple[bytes, int]  # the bytes of one receive, and how many descriptors came with them


def c_feed(build: Build, cases: list[tuple[str, list[Chunk]]]) -> list[list[str]]:
    """The C reader's account of each (role, receives): its lines, a violation's reason cut."""
    commands = [
        f"feed {role} " + ",".join(f"{data.hex()}:{nfds}" for data, nfds in chunks)
        for role, chunks in cases
    ]
    answers = harness(build, commands)
    return [[line.split()[0] if line.startswith("violation") else line for line in answer]
            for answer in answers]  # fmt: skip


def python_feed(role: str, chunks: list[Chunk]) -> list[str]:
    """kvmtag.wire.Codec's account of the same receives, in the harness's format."""
    codec = wire.Codec(daemon=role == "daemon")
    lines: list[str] = []
    opened: list[int] = []
    try:
        for data, nfds in chunks:
            fds = [_null_fd() for _ in range(nfds)]
            opened += fds
            codec.receive_data(data, fds)
            while True:
                try:
                    event = codec.next_event()
                except wire.RemoteProtocolError:
                    return [*lines, "violation"]
                if event is wire.NEED_DATA:
                    break
                again, _ = wire.Codec(daemon=role != "daemon").send(event)  # type: ignore[arg-type]
                fields = " ".join(f"{k}={v}" for k, v in fields_of(event).items())  # type: ignore[arg-type]
                lines.append(f"ok {fields} reencoded={again.hex()}")
        return [*lines, f"need_data buffered={codec.buffered} pending_fds={codec.pending_fds}"]
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


def _frames(events: list[tuple[bool, wire.Event]]) -> list[tuple[str, bytes, int]]:
    """(receiving role, frame, descriptors) of each event."""
    out = []
    for from_daemon, event in events:
        data, fds = wire.Codec(daemon=from_daemon).send(event)
        out.append(("client" if from_daemon else "daemon", data, len(fds)))
        _close_event_fds(event)
    return out


def test_c_decodes_and_reencodes_pythons_frames(build: Build) -> None:
    events = vector_events()
    frames = _frames(events)
    answers = c_feed(build, [(role, [(data, nfds)]) for role, data, nfds in frames])
    for (_, event), (_, data, _), answer in zip(events, frames, answers, strict=True):
        assert len(answer) == 2 and answer[0].startswith("ok "), f"{event!r:.100}: {answer}"
        assert answer[1] == "need_data buffered=0 pending_fds=0"
        got = parse_fields(answer[0][3:])
        assert got.pop("reencoded") == data.hex(), f"{type(event).__name__} re-encoded"
        assert got == fields_of(event), type(event).__name__


def test_python_decodes_and_reencodes_cs_frames(build: Build) -> None:
    (lines,) = harness(build, ["samples"])
    assert len(lines) >= 15
    kinds = set()
    for line in lines:
        assert line.startswith("sample ")
        fields = parse_fields(line[len("sample ") :])
        frame = bytes.fromhex(fields.pop("frame"))
        kind = wire.MessageType[fields["type"]]
        kinds.add(kind)
        from_daemon = kind in wire.FROM_DAEMON
        receiver = wire.Codec(daemon=not from_daemon)
        fds = [_null_fd() for _ in range(int(fields["nfds"]))]
        receiver.receive_data(frame, fds)
        event = receiver.next_event()
        try:
            assert event is not wire.NEED_DATA and receiver.buffered == 0
            assert fields_of(event) == fields, line[:200]  # type: ignore[arg-type]
            again, sent = wire.Codec(daemon=from_daemon).send(event)  # type: ignore[arg-type]
            assert again == frame and len(sent) == len(fds)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    assert kinds == set(wire.MessageType)


def _record(start: int, end: int, kind: int = 0, flags: int = 0) -> bytes:
    return struct.pack("<5QII", start, end, 0, 0, 0, kind, flags)


def _vmas_data(*records: bytes, count: int | None = None, nfds: int = 0, pad: int = 0) -> bytes:
    head = struct.pack("<II", len(records) if count is None else count, pad)
    return _frame(MT.VMAS_DATA, head + b"".join(records), nfds=nfds)


def _hello_reply(body: bytes) -> bytes:
    return _frame(MT.HELLO_REPLY, body)


HELLO = wire.MAGIC + struct.pack("<HHI", 1, 0, 0)
HELLO_REPLY = wire.MAGIC + struct.pack("<HHIIIIIIQ", 1, 0, 0, 4096, 1 << 20, 32, 1 << 20, 0, 0)
KIND_3 = HELLO_REPLY[:8] + struct.pack("<I", 3)  # the fields before fd_kind, then fd_kind 3
REPLY = _frame(MT.REPLY, bytes(16))
REPLY_2FDS = _frame(MT.REPLY, bytes(16), nfds=2)
VERDICT_CASES: list[tuple[str, str, bytes, int]] = [  # (what, role, frame, fds arrived)
    ("too long", "client", _frame(MT.REPLY, length=wire.MAX_MESSAGE + 1), 0),
    ("longest, body still to come", "daemon", _frame(MT.READ_DATA, length=wire.MAX_MESSAGE), 0),
    ("shorter than a header", "client", _frame(MT.REPLY, length=15), 0),
    ("unknown type 0", "client", _frame(0, bytes(16)), 0),
    ("unknown type 15", "daemon", _frame(15), 0),
    ("unknown type 15 to a client", "client", _frame(15, bytes(16)), 0),
    ("READ_WINDOW to the daemon", "daemon", _frame(MT.READ_WINDOW, bytes(16)), 0),
    ("WINDOW_DONE to a client", "client", _frame(MT.WINDOW_DONE, bytes(8)), 0),
    ("a client's frame to a client", "client", _frame(MT.IOCTL, bytes(16)), 0),
    ("a daemon's frame to the daemon", "daemon", _frame(MT.REPLY, bytes(16)), 0),
    ("reserved", "client", struct.pack("<IHHII", 32, MT.REPLY, 0, 1, 1) + bytes(16), 0),
    ("descriptors on a READ", "client", _frame(MT.READ, bytes(16), nfds=1), 1),
    ("33 descriptors", "client", _frame(MT.REPLY, bytes(16), nfds=33), 33),
    ("32 descriptors", "client", _frame(MT.REPLY, bytes(16), nfds=32), 32),
    ("descriptors that did not come", "client", REPLY_2FDS, 1),
    ("descriptors that did not come, body incomplete", "client", REPLY_2FDS[:20], 1),
    ("descriptors that came, body incomplete", "client", REPLY_2FDS[:20], 2),
    ("a descriptor with a frame that declares none", "client", REPLY, 1),
    ("HELLO_REPLY bad magic", "client", _hello_reply(b"XXXX" + HELLO_REPLY[4:] + bytes(16)), 0),
    ("HELLO_REPLY fd kind 3", "client", _hello_reply(KIND_3 + HELLO_REPLY[12:] + bytes(16)), 0),
    ("HELLO_REPLY non-ASCII profile", "client", _hello_reply(HELLO_REPLY + b"\xff" + bytes(15)), 0),
    ("HELLO_REPLY short", "client", _hello_reply(HELLO_REPLY + bytes(15)), 0),
    ("HELLO_REPLY long", "client", _hello_reply(HELLO_REPLY + bytes(17)), 0),
    ("REPLY short", "client", _frame(MT.REPLY, bytes(15)), 0),
    ("REPLY trailing bytes without WRITTEN_BACK", "client", _frame(MT.REPLY, bytes(20)), 0),
    ("READ short", "client", _frame(MT.READ, bytes(15)), 0),
    ("READ long", "client", _frame(MT.READ, bytes(17)), 0),
    ("WRITE short", "client", _frame(MT.WRITE, bytes(7)), 0),
    ("VMAS long", "client", _frame(MT.VMAS, bytes(17)), 0),
    ("ERROR short", "client", _frame(MT.ERROR, bytes(3)), 0),
    ("ERROR not UTF-8", "client", _frame(MT.ERROR, bytes(4) + b"\xff\xfe"), 0),
    ("HELLO bad magic", "daemon", _frame(MT.HELLO, b"KVMX" + HELLO[4:]), 0),
    ("HELLO long", "daemon", _frame(MT.HELLO, HELLO + b"\0"), 0),
    ("IOCTL inline bytes without the flag", "daemon", _frame(MT.IOCTL, bytes(17)), 0),
    ("IOCTL short", "daemon", _frame(MT.IOCTL, bytes(15)), 0),
    ("WRITE_DONE long", "daemon", _frame(MT.WRITE_DONE, bytes(9)), 0),
    ("VMAS_DATA count too high", "daemon", _vmas_data(_record(0, 1), count=2), 0),
    ("VMAS_DATA unknown kind", "daemon", _vmas_data(_record(0, 1, 5)), 0),
    ("VMAS_DATA empty range", "daemon", _vmas_data(_record(5, 5)), 0),
    ("VMAS_DATA record with fd, none came", "daemon", _vmas_data(_record(0, 1, 1, 4)), 0),
    ("VMAS_DATA fd with no record", "daemon", _vmas_data(_record(0, 1), nfds=1), 1),
    ("VMAS_DATA fds match, pad not 0", "daemon", _vmas_data(_record(0, 1, 1, 4), nfds=1, pad=9), 1),
    ("descriptors on an IOCTL", "daemon", _frame(MT.IOCTL, bytes(16), nfds=1), 1),
    ("HELLO_REPLY with the window", "client", _frame(MT.HELLO_REPLY, HELLO_REPLY + bytes(16),
                                                      nfds=1), 1),
    ("HELLO_REPLY declaring the window, none came", "client",
     _frame(MT.HELLO_REPLY, HELLO_REPLY + bytes(16), nfds=1), 0),
    ("HELLO_REPLY with a window that was not declared", "client", _hello_reply(
        HELLO_REPLY + bytes(16)), 1),
    ("HELLO with the window flag", "daemon", _frame(MT.HELLO, HELLO[:8] + struct.pack("<I", 1)), 0),
    ("descriptors on a HELLO", "daemon", _frame(MT.HELLO, HELLO, nfds=1), 1),
    ("READ_WINDOW short", "client", _frame(MT.READ_WINDOW, bytes(15)), 0),
    ("READ_WINDOW long", "client", _frame(MT.READ_WINDOW, bytes(17)), 0),
    ("WRITE_WINDOW short", "client", _frame(MT.WRITE_WINDOW, bytes(8)), 0),
    ("WRITE_WINDOW long", "client", _frame(MT.WRITE_WINDOW, bytes(24)), 0),
    ("descriptors on a WRITE_WINDOW", "client", _frame(MT.WRITE_WINDOW, bytes(16), nfds=1), 1),
    ("WINDOW_DONE short", "daemon", _frame(MT.WINDOW_DONE, bytes(7)), 0),
    ("WINDOW_DONE long", "daemon", _frame(MT.WINDOW_DONE, bytes(16)), 0),
    ("descriptors on a WINDOW_DONE", "daemon", _frame(MT.WINDOW_DONE, bytes(8), nfds=1), 1),
]  # fmt: skip


# Frames wire.py accepts but does not re-encode byte for byte (it decodes an ERROR message with
# replacement characters and drops VMAS_DATA's pad); the C codec keeps the bytes it got.
NOT_CANONICAL = {"ERROR not UTF-8", "VMAS_DATA fds match, pad not 0"}


def _stream_cases() -> list[tuple[str, str, list[Chunk]]]:
    """Frames split across receives, several frames in one, and descriptors in odd places."""
    frames = _frames(vector_events())
    cases = [(what, role, [(data, nfds)]) for what, role, data, nfds in VERDICT_CASES]
    for i in (0, 2, 6, 10, 14, 16, 20, 26):  # byte at a time, the descriptors with the first
        role, data, nfds = frames[i]
        one_by_one = [(data[j : j + 1], 0) for j in range(1, len(data))]
        cases.append((f"frame {i} a byte at a time", role, [(data[:1], nfds), *one_by_one]))
    for i in (2, 10, 23):  # split at 7 and 31 bytes, and a frame with trailing bytes
        role, data, nfds = frames[i]
        cases.append((f"frame {i} in three receives", role, [(data[:7], nfds), (data[7:31], 0),
                                                              (data[31:], 0)]))  # fmt: skip
        cases.append((f"frame {i} and the start of another", role, [(data + data[:20], nfds)]))
    for i in range(len(frames) - 9, len(frames)):  # 1.1's frames: byte at a time, and joined
        role, data, nfds = frames[i]
        one_by_one = [(data[j : j + 1], 0) for j in range(1, len(data))]
        cases.append((f"frame {i} a byte at a time", role, [(data[:1], nfds), *one_by_one]))
        cases.append((f"frame {i} and the start of another", role, [(data + data[:20], nfds)]))
    role, with_fds, nfds = frames[14]  # REPLY with two descriptors
    cases += [
        (
            "two frames in one receive",
            "client",
            [(REPLY + _frame(MT.REPLY, bytes(16), req_id=2), 0)],
        ),
        ("descriptors for the second frame of a receive", "client", [(REPLY + REPLY_2FDS, 2)]),
        ("descriptors inside a frame", "client", [(with_fds[:20], nfds), (with_fds[20:], 1)]),
        ("descriptors with no bytes, then their frame", "client", [(b"", nfds), (with_fds, 0)]),
        ("a frame, then one with descriptors", "client", [(REPLY, 0), (with_fds, nfds)]),
        ("stray descriptors after a frame", "client", [(REPLY, 0), (b"", 1)]),
    ]
    return cases


def test_the_c_reader_and_wire_codec_agree_on_every_stream(build: Build) -> None:
    """Valid or not, split or joined: the same events, then the same verdict (need data with
    the same bytes and descriptors left, or a violation)."""
    cases = _stream_cases()
    answers = c_feed(build, [(role, chunks) for _, role, chunks in cases])
    mismatches = []
    for (what, role, chunks), c_lines in zip(cases, answers, strict=True):
        py_lines = python_feed(role, chunks)
        if what in NOT_CANONICAL:  # wire.py normalises these on decoding: the verdicts agree
            c_lines = [line.split()[0] for line in c_lines]
            py_lines = [line.split()[0] for line in py_lines]
        if c_lines != py_lines:
            short_c, short_py = [x[:150] for x in c_lines], [x[:150] for x in py_lines]
            mismatches.append(f"{what}:\n  C      {short_c}\n  Python {short_py}")
    assert not mismatches, "\n".join(mismatches)


# --- /proc/self/maps: the C classification against kvmtag.procmem --------------------------------


class KtVma(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("pgoff", ctypes.c_uint64),
                ("dev", ctypes.c_uint64), ("ino", ctypes.c_uint64), ("kind", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]  # fmt: skip


class KtFoundVma(ctypes.Structure):
    _fields_ = [("vma", KtVma), ("fd", ctypes.c_int)]


@pytest.fixture(scope="session")
def c_procmem(build: Build) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build.bin / "libkvmtag-procmem.so"), use_errno=True)
    lib.kt_find_vmas.argtypes = [ctypes.c_uint64, ctypes.c_uint64,
                                 ctypes.POINTER(ctypes.POINTER(KtFoundVma)),
                                 ctypes.POINTER(ctypes.c_size_t)]  # fmt: skip
    lib.kt_find_vmas.restype = ctypes.c_int
    lib.kt_free_vmas.argtypes = [ctypes.POINTER(KtFoundVma), ctypes.c_size_t]
    lib.kt_read_memory.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    lib.kt_read_memory.restype = ctypes.c_size_t
    lib.kt_write_memory.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    lib.kt_write_memory.restype = ctypes.c_size_t
    return lib


def _c_vmas(lib: ctypes.CDLL, start: int, end: int) -> list[tuple[object, ...]]:
    out = ctypes.POINTER(KtFoundVma)()
    count = ctypes.c_size_t()
    assert lib.kt_find_vmas(start, end, ctypes.byref(out), ctypes.byref(count)) == 0
    found: list[tuple[object, ...]] = []
    try:
        for i in range(count.value):
            v, fd = out[i].vma, out[i].fd
            if fd >= 0:
                st = os.fstat(fd)
                assert (st.st_dev, st.st_ino) == (v.dev, v.ino), "the fd is the mapping's file"
            found.append((v.start, v.end, wire.VMA_KINDS[v.kind], bool(v.flags & 1),
                          bool(v.flags & 2), bool(v.flags & 8), v.dev, v.ino, v.pgoff,
                          fd >= 0, bool(v.flags & 4)))  # fmt: skip
    finally:
        lib.kt_free_vmas(out, count)
    return found


def _py_vmas(start: int, end: int) -> list[tuple[object, ...]]:
    found: list[tuple[object, ...]] = []
    for v in procmem.find_vmas(start, end):
        found.append((v.start, v.end, v.kind, v.shared, v.writable, v.readable, v.dev, v.ino,
                      v.pgoff, v.fd is not None, v.fd is not None))  # fmt: skip
        if v.fd is not None:
            os.close(v.fd)
    return found


def test_c_finds_the_mappings_procmem_finds(c_procmem: ctypes.CDLL, file_dir: str,
                                            tmp_path: Path) -> None:  # fmt: skip
    size = 8 * mmap.PAGESIZE
    keep: list[object] = []

    def mapped(fd: int, flags: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE,
               offset: int = 0) -> int:  # fmt: skip
        m = mmap.mmap(fd, size, flags, prot, offset=offset)
        keep.append(m)
        return procmem.buffer_address(m).address

    def memfd() -> int:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4 * size)
        keep.append(fd)
        return fd

    def file_in(directory: str, mode: int = os.O_RDWR) -> int:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
        os.ftruncate(fd, 4 * size)
        if mode != os.O_RDWR:  # reopen with another mode; the O_RDWR one is closed
            other = os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
            os.close(fd)
            fd = other
        keep.append(fd)
        return fd

    shared, private = mmap.MAP_SHARED, mmap.MAP_PRIVATE
    anon = mmap.MAP_ANONYMOUS
    cases: dict[str, Callable[[], int]] = {
        "memfd shared": lambda: mapped(memfd(), shared),
        "memfd shared, offset": lambda: mapped(memfd(), shared, offset=2 * size),
        "memfd private": lambda: mapped(memfd(), private),
        "memfd shared read-only": lambda: mapped(memfd(), shared, mmap.PROT_READ),
        "anonymous private": lambda: mapped(-1, private | anon),
        "anonymous shared": lambda: mapped(-1, shared | anon),
        "anonymous PROT_NONE": lambda: mapped(-1, private | anon, 0),
        "tmpfs shared": lambda: mapped(file_in("/dev/shm"), shared),
        "disk file shared": lambda: mapped(file_in(file_dir), shared),
        "disk file private": lambda: mapped(file_in(file_dir), private),
        "disk file opened O_RDONLY, shared read-only": lambda: mapped(
            file_in(file_dir, os.O_RDONLY), shared, mmap.PROT_READ
        ),
        "/dev/zero private": lambda: mapped(os.open("/dev/zero", os.O_RDWR), private),
    }
    try:
        for what, make in cases.items():
            address = make()
            assert _c_vmas(c_procmem, address, address + size) == _py_vmas(
                address, address + size
            ), what
        # A wide range: everything this process maps, stack and vdso included. Python may map
        # an arena between the two calls: a difference must persist to count.
        for _ in range(5):
            if _c_vmas(c_procmem, 0, 2**47) == _py_vmas(0, 2**47):
                break
        else:
            assert _c_vmas(c_procmem, 0, 2**47) == _py_vmas(0, 2**47)
    finally:
        for item in keep:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()  # type: ignore[attr-defined]


def test_c_copies_stop_at_the_first_fault_as_procmem_does(c_procmem: ctypes.CDLL) -> None:
    page = mmap.PAGESIZE
    area = mmap.mmap(-1, 4 * page)
    try:
        base = procmem.buffer_address(area).address
        area[:] = bytes(i % 251 for i in range(4 * page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(base + 2 * page, page, mmap.PROT_READ) == 0
        assert libc.mprotect(base + 3 * page, page, 0) == 0
        buf = ctypes.create_string_buffer(4 * page)
        for start in (base, base + 100, base + 2 * page + 7, base + 3 * page, 0, 2**64 - page):
            size = 4 * page
            expected = procmem.read_memory(start, size)
            assert c_procmem.kt_read_memory(start, buf, size) == len(expected)
            assert buf.raw[: len(expected)] == expected
            data = bytes(range(256)) * (size // 256)
            assert c_procmem.kt_write_memory(start, data, size) == procmem.write_memory(start, data)
    finally:
        area.close()


# --- the benchmark, as a smoke test ---------------------------------------------------------------


def test_bench_runs(build: Build, kvmtagd: str) -> None:
    done = run(build, kvmtagd, build.program("bench"), "16", "500", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines() if not line.startswith("ok ")}
    assert names == {
        "socketpair_pingpong_64B",
        "check_extension",
        "check_extension_client_cpu",
        "passthrough_ioctl_shim",
        "passthrough_ioctl_libc",
        "copy_tags_from_guest",
        "copy_tags_to_guest",
    }
