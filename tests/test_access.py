"""Who may connect to kvmtagd (issue 7): --allow-uid and --allow-gid checked on SO_PEERCRED (and
the peer's supplementary groups) before a byte is read, a refusal logged and the connection
closed; --socket-mode and --socket-group give the socket its permissions with no moment at
which it is open to others; a client reaches only its own VMs.

Clients of other users are forked children of this (root) test that drop to an unprivileged
uid. They need a socket path they can reach, so these daemons live in a directory of /tmp
that everyone may enter (pytest's own are root's, 0700).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmtag import client, uapi, wire

from .test_daemon import GPA, PAGE, TPP, Raw, Vmm, copy_tags, wait_until

TIMEOUT = 30
OTHER_UID = 54321  # a user with no account: it needs none to connect
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvmtag-access-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def group() -> Iterator[int]:
    """A group of this test's own (the machine may have no kvm group)."""
    name = f"kvmtagt{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=TIMEOUT)
    try:
        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=TIMEOUT)


@contextlib.contextmanager
def daemon(directory: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    path, log = directory / "kvm.sock", directory / "kvmtagd.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtag", "--socket-path", str(path), "-v", *args],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        yield str(path), proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def as_user(uid: int, gid: int, groups: list[int], fn: Callable[[], object]) -> str:
    """Run fn in a forked child as uid/gid with these supplementary groups: "ok", or the
    exception it raised (as "ExceptionName errno")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                fn()
                answer = "ok"
            except OSError as e:
                answer = f"{type(e).__name__} {errno.errorcode.get(e.errno or 0, e.errno)}"
            os.write(w, answer.encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            answer = f.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


def api_version(path: str) -> Callable[[], None]:
    def call() -> None:
        fd = client.open(socket=path)
        assert client.ioctl(fd, uapi.KVM_GET_API_VERSION) == 12
        client.close(fd)

    return call


# --- --allow-uid / --allow-gid ---------------------------------------------------------------


def test_allow_uid_refuses_everyone_else_and_logs_it(shared_dir: Path) -> None:
    with daemon(shared_dir, "--socket-mode", "0666", "--allow-uid", str(OTHER_UID)) as (
        path, proc, log
    ):  # fmt: skip
        assert as_user(OTHER_UID, OTHER_UID, [], api_version(path)) == "ok"
        # root is not on the list: the connection is closed before the handshake (EIO).
        with pytest.raises(OSError) as refused:
            client.open(socket=path)
        assert refused.value.errno == errno.EIO
        line = f"refused connection from pid {os.getpid()} uid 0 gid 0"
        wait_until(lambda: line in log.read_text(), "the refusal is logged")
        assert as_user(OTHER_UID + 1, OTHER_UID, [], api_version(path)) == "OSError EIO"
        assert proc.poll() is None


def test_allow_gid_admits_primary_and_supplementary_groups(shared_dir: Path, group: int) -> None:
    with daemon(shared_dir, "--socket-mode", "0666", "--allow-gid", str(group)) as (path, _, _):
        assert as_user(OTHER_UID, group, [], api_version(path)) == "ok"  # primary
        assert as_user(OTHER_UID, OTHER_UID, [group], api_version(path)) == "ok"  # supplementary
        assert as_user(OTHER_UID, OTHER_UID, [], api_version(path)) == "OSError EIO"


def test_a_refused_peer_gets_not_a_byte(shared_dir: Path) -> None:
    """Nothing is read from a refused connection: the daemon closes it at once, and what the
    peer sends (garbage, or a HELLO) is never answered."""
    with daemon(shared_dir, "--allow-uid", str(OTHER_UID)) as (path, proc, log):
        with Raw.connect(path) as raw:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                raw.send(b"\xff" * 64)
            assert raw.receive() is None
        assert proc.poll() is None
        assert "refused connection" in log.read_text()


# --- --socket-mode / --socket-group ---------------------------------------------------------


def test_socket_mode_and_group_and_no_moment_open_to_others(shared_dir: Path, group: int) -> None:
    """The directory is watched while kvmtagd starts: every name that appears in it is either
    kvmtagd's private directory (0700) or the socket with its final mode and group."""
    path = shared_dir / "kvm.sock"
    seen: dict[str, tuple[int, int]] = {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtag", "--socket-path", str(path), "--socket-group",
         str(group), "--socket-mode", "0660"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            for entry in os.scandir(shared_dir):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    seen[entry.name] = (st.st_mode, st.st_gid)
        st = path.stat()
        seen[path.name] = (st.st_mode, st.st_gid)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group
        for name, (mode, gid) in seen.items():
            if name == "kvm.sock":
                assert (stat.S_IMODE(mode), gid) == (0o660, group), name
            else:
                assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700, (name, oct(mode))
        assert sorted(os.listdir(shared_dir)) == ["kvm.sock"]  # the private directory is gone
        # The filesystem now decides: a member of the group may connect, nobody else.
        assert as_user(OTHER_UID, OTHER_UID, [group], api_version(str(path))) == "ok"
        assert as_user(OTHER_UID, OTHER_UID, [], api_version(str(path))) == (
            "PermissionError EACCES"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert not path.exists()


def test_socket_mode_defaults_to_0660(tmp_path: Path) -> None:
    with daemon(tmp_path) as (path, _, _):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_an_unknown_socket_group_is_refused_at_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmtag", "--socket-path", str(tmp_path / "k.sock"),
         "--socket-group", "no-such-group-kvmtag"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 2 and "no such group" in done.stderr
    assert os.listdir(tmp_path) == []


# --- a client reaches only its own VMs -------------------------------------------------------


def test_a_second_process_cannot_reach_another_process_vm(kvmtagd: str) -> None:
    """Process A has a VM with tags. Process B, through every connection it can make, can name
    no VM but its own: VM ioctls on its /dev/kvm fd are the kernel's EINVAL whatever their
    argument, its own VM's memslots and tags are its own, and request ids or addresses that
    are A's mean nothing on B's connections. A's tags stay as they were."""
    a = Vmm(kvmtagd)
    try:
        tags = bytes(i % 16 for i in range(a.npages * TPP))
        a.tags[:] = tags
        size = a.npages * PAGE
        to_a = copy_tags(GPA, size, a.taddr, 0)
        assert client.ioctl(a.vm, uapi.KVM_ARM_MTE_COPY_TAGS, to_a) == size

        def process_b() -> None:
            kvm = client.open(socket=kvmtagd)
            for request, arg in (
                (uapi.KVM_ARM_MTE_COPY_TAGS, copy_tags(GPA, size, a.taddr, 0)),
                (uapi.KVM_ARM_MTE_COPY_TAGS, copy_tags(GPA, size, a.taddr, 1)),
                (uapi.KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, GPA, size, 0)),
                (uapi.KVM_GET_DIRTY_LOG, struct.pack("<IIQ", 0, 0, a.taddr)),
                (uapi.KVM_CREATE_VCPU, 0),
            ):
                with pytest.raises(OSError) as e:
                    client.ioctl(kvm, request, arg)
                assert e.value.errno == errno.EINVAL, (hex(request), e.value)
            # Its own VM at the same guest address sees its own (untagged) memory, not A's.
            b = Vmm(kvmtagd, a.npages)
            b.tags[:] = bytes(len(b.tags))
            got = client.ioctl(b.vm, uapi.KVM_ARM_MTE_COPY_TAGS, copy_tags(GPA, size, b.taddr, 1))
            assert got == size and b.tags[:] == bytes(len(b.tags))
            # Raw frames with the ids and handles A uses reach nothing of A's.
            with Raw(socket.socket(fileno=os.dup(kvm))) as raw:
                for req_id in (1, 2, 3, 500):
                    raw.send_event(wire.Ioctl(req_id, uapi.KVM_ARM_MTE_COPY_TAGS, 0,
                                              copy_tags(GPA, size, a.taddr, 1), True))
                    reply = raw.receive()
                    assert isinstance(reply, wire.Reply) and reply.errno == errno.EINVAL
            b.close()
            client.close(kvm)

        assert as_user(0, 0, [], process_b) == "ok"
        a.tags[:] = bytes(len(a.tags))
        from_a = copy_tags(GPA, size, a.taddr, 1)
        assert client.ioctl(a.vm, uapi.KVM_ARM_MTE_COPY_TAGS, from_a) == size
        assert a.tags[:] == tags
    finally:
        a.close()
