"""kvmtag-vmm (clients/kvmtag_vmm): a running MTE guest migrated live and through snapshots.

Each test runs real VMM processes (`python -m clients.kvmtag_vmm`) against real kvmtagd
processes: a source boots the tagged-heap guest (MTE on, 256 MiB, an active workload), migrates
it, and the destination resumes it and keeps running its checks (the guest re-checks tags on
every step and scans its objects against registers), for many KVM_RUN slices, without crashing.
The negative control drops or corrupts the tags in the stream: the destination guest crashes.
Every process has a timeout; every summary is the VMM's own JSON (--summary).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clients.kvmtag_vmm import _bits, incoming, stream
from clients.kvmtag_vmm.transport import ACK_REFUSED
from clients.kvmtag_vmm.vm import GPA_BASE, GuestConfig, Machine, plan_layout
from kvmtag import uapi

from .conftest import Daemons, running_kvmtagd

ROOT = Path(__file__).resolve().parent.parent
VMM = [sys.executable, "-m", "clients.kvmtag_vmm"]
TIMEOUT = 90.0
MiB = 1 << 20
# The guest: 256 MiB of RAM, a 2 MiB heap of 64-byte objects, stores paced at 1,500 a second per
# vCPU (the daemon's emulated CPU is Python: unpaced it would starve everything else), short
# slices so that a few seconds are many KVM_RUN round trips.
GUEST = ["--ram", "256", "--working-set", "2", "--store-rate", "1500", "--steps-per-run", "200"]
MIN_SLICES = 20  # KVM_RUN slices the destination must run after resuming


@dataclass
class Run:
    rc: int
    summary: dict[str, Any]
    log: str


class Vmm:
    """One kvmtag-vmm process, its log and its JSON summary."""

    def __init__(self, tmp: Path, name: str, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        self.summary_path = tmp / f"{name}.json"
        self.log_path = tmp / f"{name}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*prefix, *VMM, *args, "--summary", str(self.summary_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def wait(self, timeout: float = TIMEOUT) -> Run:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} hung:\n{self.log_path.read_text()}") from None
        summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        return Run(rc, summary, self.log_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def vmms() -> Iterator[list[Vmm]]:
    """VMMs started in the block are killed if it fails."""
    started: list[Vmm] = []
    try:
        yield started
    finally:
        for v in started:
            v.kill()


def start(group: list[Vmm], tmp: Path, name: str, *args: str, prefix: tuple[str, ...] = ()
          ) -> Vmm:  # fmt: skip
    group.append(Vmm(tmp, name, *args, prefix=prefix))
    return group[-1]


def assert_carried_on(src: Run, dst: Run, *, live: bool = True) -> None:
    """The destination resumed the guest where the source paused it and ran many slices of
    checks without a crash; the migration's figures make sense."""
    assert src.rc == 0, src.log
    assert dst.rc == 0, dst.log
    g = dst.summary["guest"]
    assert not g["crashed"] and g["failure"] is None, dst.log
    assert g["slices"] >= MIN_SLICES, (g, dst.log)
    sent, restored = src.summary["guest_steps_sent"], dst.summary["guest_steps_restored"]
    assert restored == sent, (sent, restored)  # x3, the guest's step counter, carried over
    assert all(end > start for end, start in zip(g["x3_per_vcpu"], restored, strict=True)), g
    s = src.summary
    for key in ("total_seconds", "downtime_seconds", "passes", "data_bytes", "tag_bytes",
                "stream_bytes", "ioctls"):  # fmt: skip
        assert key in s, key
    assert 0 < s["downtime_seconds"] <= s["total_seconds"]
    assert s["passes"] >= (2 if live else 1)
    if s["mte"] and s["tamper"] is None:
        # Packed: 1/32 of the page data at most (zero tag pages elided); batched ioctls.
        assert 0 < s["tag_bytes"] <= s["data_bytes"] / 32, s
        assert s["tag_ioctls"] <= 16 * s["passes"] + 16, s["ioctls"]
    assert dst.summary["incoming"]["stream_bytes"] == s["stream_bytes"]


# --- live migration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "dirty_log"), [("copy-tags", "get-and-clear"), ("tag-log", "manual")],
    ids=["copy-tags", "tag-log-manual-protect"],
)  # fmt: skip
def test_live_migration_between_two_vmms_on_one_daemon(
    kvmtagd: str, tmp_path: Path, tags: str, dirty_log: str
) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    # One destination takes its machine from the stream; the other is started with it, as
    # QEMU's is, and builds and preallocates it before the source connects.
    shape = ["--ram", "256", "--vcpus", "2", "--prealloc"] if tags == "tag-log" else []
    with vmms() as group:
        dst = start(group, tmp_path, "dst", "--socket", kvmtagd, "--incoming", uri,
                    "--run-seconds", "2", *shape)  # fmt: skip
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to", uri,
                    "--tags", tags, "--dirty-log", dirty_log, "--verify", "--progress")
        s, d = src.wait(), dst.wait()
    assert_carried_on(s, d)
    assert s.summary["tags_mode"] == tags and s.summary["dirty_log_mode"] == dirty_log
    assert d.summary["incoming"]["checked_content"]  # CHECK: all RAM and tags equal
    assert "migration: pass 0:" in s.log and "dirty pages left" in s.log and "ETA" in s.log
    ioctls = s.summary["ioctls"]
    if tags == "tag-log":
        assert ioctls["KVMTAG_GET_TAG_LOG"] >= 2
    if dirty_log == "manual":
        assert ioctls["KVM_CLEAR_DIRTY_LOG"] >= 1


def test_live_migration_between_two_daemons_and_on(
    kvmtagd: str, daemons: Daemons, tmp_path: Path
) -> None:
    """A (daemon 1) -> B (daemon 2) -> C (daemon 1): three memslots with holes, three vCPUs,
    populated and tagged RAM outside the heaps. B restores the tags, resumes the guest, then
    switches dirty logging on to migrate it on: the order a real VMM must keep (TO_GUEST is
    EBUSY while logging)."""
    other = daemons.socket("latest", 4096)
    assert other != kvmtagd
    b_uri, c_uri = f"unix:{tmp_path}/b.sock", f"unix:{tmp_path}/c.sock"
    machine = ["--slots", "3", "--hole", "16", "--vcpus", "3", "--populate", "48"]
    with vmms() as group:
        c = start(group, tmp_path, "c", "--socket", kvmtagd, "--incoming", c_uri,
                  "--run-seconds", "2")  # fmt: skip
        b = start(group, tmp_path, "b", "--socket", other, "--incoming", b_uri, "--migrate-to",
                  c_uri, "--migrate-after", "1", "--verify", "--tags", "tag-log")  # fmt: skip
        a = start(group, tmp_path, "a", "--socket", kvmtagd, *GUEST, *machine, "--migrate-to",
                  b_uri, "--verify")  # fmt: skip
        ra, rb, rc = a.wait(), b.wait(), c.wait()
    assert ra.rc == 0 and rb.rc == 0 and rc.rc == 0, (ra.log, rb.log, rc.log)
    assert rb.summary["guest_steps_restored"] == ra.summary["guest_steps_sent"]
    assert rb.summary["guest"]["slices"] > 0  # B ran the guest between the migrations
    assert_carried_on(rb, rc)
    assert rc.summary["machine"]["vcpus"] == 3 and len(rc.summary["machine"]["slots"]) == 3
    slots = rc.summary["machine"]["slots"]
    assert slots[1]["gpa"] == slots[0]["gpa"] + slots[0]["size"] + 16 * MiB  # the hole
    assert rb.summary["incoming"]["checked_content"] and rc.summary["incoming"]["checked_content"]
    # The populated RAM: 48 MiB of data, about half of it tagged, went through both.
    assert ra.summary["data_bytes"] > 48 * MiB and ra.summary["tag_bytes"] > 0.3 * MiB * 48 / 32


# --- snapshots -----------------------------------------------------------------------------------


def test_snapshot_restored_into_a_fresh_daemon(kvmtagd: str, tmp_path: Path) -> None:
    snap = tmp_path / "guest.snap"
    with vmms() as group:
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--populate", "16",
                    "--snapshot", str(snap), "--run-seconds", "2", "--verify")  # fmt: skip
        s = src.wait()
    assert s.rc == 0, s.log
    assert s.summary["role"] == "snapshot" and s.summary["passes"] == 1
    assert not s.summary["guest"]["crashed"]
    assert s.summary["guest"]["x3_per_vcpu"] > s.summary["guest_steps_sent"]  # resumed after
    assert snap.exists() and not Path(f"{snap}.partial").exists()
    data = snap.read_bytes()

    # Damaged copies are refused before any VM exists (the whole file is checked first).
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x04
    damaged = {"flipped": bytes(flipped), "truncated": data[: len(data) - 100],
               "longer": data + b"\0"}  # fmt: skip
    (tmp_path / "fresh").mkdir()
    with running_kvmtagd(tmp_path / "fresh") as (fresh, _), vmms() as group:
        for name, bad in damaged.items():
            path = tmp_path / f"{name}.snap"
            path.write_bytes(bad)
            r = start(group, tmp_path, name, "--socket", fresh, "--restore", str(path)).wait()
            assert r.rc == 1 and "refused the stream" in r.log, (name, r.log)
            assert "machine" not in r.summary, name  # nothing was created, let alone loaded
        dst = start(group, tmp_path, "dst", "--socket", fresh, "--restore", str(snap),
                    "--run-seconds", "2")  # fmt: skip
        d = dst.wait()
    assert_carried_on(s, d, live=False)
    assert d.summary["incoming"]["verified_first"] and d.summary["incoming"]["checked_content"]


# --- the negative control ----------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["--drop-tags", "--corrupt-tags"])
def test_negative_control_lost_tags_crash_the_destination(
    kvmtagd: str, tmp_path: Path, tamper: str
) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with vmms() as group:
        dst = start(group, tmp_path, "dst", "--socket", kvmtagd, "--incoming", uri,
                    "--run-seconds", "5")  # fmt: skip
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to", uri,
                    tamper)  # fmt: skip
        s, d = src.wait(), dst.wait()
    assert s.rc == 0, s.log  # the stream itself is well formed: the source cannot tell
    assert d.rc == 3, d.log
    g = d.summary["guest"]
    assert g["crashed"] and "the guest crashed" in d.log
    assert GPA_BASE <= g["crash_gpa"] < GPA_BASE + 256 * MiB
    if tamper == "--drop-tags":
        assert s.summary["tag_bytes"] == 0


# --- TCP between two network namespaces ----------------------------------------------------------


@contextlib.contextmanager
def network_namespaces() -> Iterator[tuple[str, str, str]]:
    """Two fresh network namespaces joined by a veth pair: (ns A, ns B, B's address)."""
    tag = f"kvt{os.getpid() % 100000}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    commands = [
        ["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
        ["ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb"],
        ["ip", "link", "set", f"{tag}va", "netns", ns_a],
        ["ip", "link", "set", f"{tag}vb", "netns", ns_b],
        ["ip", "-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", f"{tag}va"],
        ["ip", "-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", f"{tag}vb"],
        *[["ip", "-n", ns, "link", "set", dev, "up"]
          for ns, dev in ((ns_a, f"{tag}va"), (ns_b, f"{tag}vb"), (ns_a, "lo"), (ns_b, "lo"))],
    ]  # fmt: skip
    try:
        for cmd in commands:
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        yield ns_a, ns_b, "10.77.0.2"
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root (CI is)")
def test_tcp_migration_between_two_network_namespaces(kvmtagd: str, tmp_path: Path) -> None:
    """Each VMM in its own network namespace: the stream crosses a veth pair over TCP, while
    each VMM reaches kvmtagd through its Unix socket on the shared filesystem."""
    assert shutil.which("ip"), "iproute2 is needed"
    with network_namespaces() as (ns_a, ns_b, address):
        uri = f"tcp:{address}:4444"
        with vmms() as group:
            dst = start(group, tmp_path, "dst", "--socket", kvmtagd, "--incoming", uri,
                        "--run-seconds", "2", prefix=("ip", "netns", "exec", ns_b))
            src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to",
                        uri, "--verify", prefix=("ip", "netns", "exec", ns_a))
            s, d = src.wait(), dst.wait()
    assert_carried_on(s, d)
    assert "source connected from ('10.77.0.1'" in d.log  # over the veth pair, from ns A


# --- refusals ------------------------------------------------------------------------------------


def test_kernel_before_6_2_refuses_an_mte_guest(daemons: Daemons, tmp_path: Path) -> None:
    old = daemons.socket("5.14", 4096)
    with vmms() as group:
        r = start(group, tmp_path, "mte", "--socket", old, "--run-seconds", "0.5").wait()
        assert r.rc == 1
        assert "kernels before 6.2 refuse shared memory" in r.log and "--no-mte" in r.log
        ok = start(group, tmp_path, "no-mte", "--socket", old, "--no-mte", *GUEST,
                   "--run-seconds", "0.5").wait()  # fmt: skip
        assert ok.rc == 0, ok.log


def test_a_refused_live_stream_tears_down_the_destination(kvmtagd: str, tmp_path: Path) -> None:
    """A corrupt stream over a socket: the destination says no, destroys what it had loaded
    and never starts the guest."""
    path = tmp_path / "mig.sock"
    m = _tiny_stream()
    bad = bytearray(m)
    bad[-200] ^= 1  # in the registers: after the whole RAM was loaded
    with vmms() as group:
        dst = start(group, tmp_path, "dst", "--socket", kvmtagd, "--incoming", f"unix:{path}")
        reply = _send_stream(path, bytes(bad))
        d = dst.wait()
    assert reply[:8] == ACK_REFUSED
    assert d.rc == 1 and "refused the stream" in d.log and "checksum mismatch" in d.log
    assert "guest" not in d.summary  # never ran


def test_a_destination_started_for_another_machine_refuses_it(
    kvmtagd: str, tmp_path: Path
) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with vmms() as group:
        dst = start(group, tmp_path, "dst", "--socket", kvmtagd, "--incoming", uri,
                    "--ram", "128")  # fmt: skip
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to", uri,
                    "--migrate-after", "0.5", "--run-seconds", "2")  # fmt: skip
        s, d = src.wait(), dst.wait()
    assert d.rc == 1 and "does not match the stream" in d.log and "--ram 128" in d.log
    assert s.rc == 1 and "refused the stream" in s.log and "the guest carries on here" in s.log
    assert not s.summary["guest"]["crashed"] and s.summary["guest"]["slices"] > 0


def test_a_failed_migration_leaves_the_source_guest_running(
    kvmtagd: str, tmp_path: Path
) -> None:
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    with vmms() as group, listener:
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to",
                    f"unix:{path}", "--migrate-after", "0.5", "--run-seconds", "3")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            got = conn.recv(1 << 16)
            assert got[:8] == stream.MAGIC
            conn.sendall(_refusal())  # a destination that does not want it
            time.sleep(0.2)
        s = src.wait()
    assert s.rc == 1, s.log
    assert "failed" in s.log and "the guest carries on here" in s.log
    g = s.summary["guest"]
    assert not g["crashed"] and g["slices"] >= MIN_SLICES


def test_no_answer_after_the_whole_stream_leaves_the_source_paused(
    kvmtagd: str, tmp_path: Path
) -> None:
    """A destination that reads the whole stream and vanishes may be running the guest: the
    source must not resume its copy (two guests would run), and says so."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    with vmms() as group, listener:
        src = start(group, tmp_path, "src", "--socket", kvmtagd, *GUEST, "--migrate-to",
                    f"unix:{path}", "--migrate-after", "0.5", "--run-seconds", "30")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            reader = stream.Reader()
            while not reader.done:  # a well-behaved reader, to the last record
                n = conn.recv_into(reader.buffer())
                assert n, "the source closed early"
                reader.received(n)
                while reader.next_event() is not stream.NEED_DATA:
                    pass
        s = src.wait()  # long before --run-seconds: it does not resume
    assert s.rc == 1, s.log
    assert "did not answer" in s.log and "stays paused here" in s.log
    assert "carries on" not in s.log
    assert not s.summary["guest"]["crashed"]


def _refusal() -> bytes:
    head = struct.pack("<8sI", ACK_REFUSED, 1)
    return head + struct.pack("<I", zlib.crc32(head))


def _tiny_stream() -> bytes:
    """A valid stream of a 1-slot, 1-vCPU, 64-page guest (from the codec, no VMM)."""
    w = stream.Writer()
    layout = (stream.SlotLayout(0, GPA_BASE, 64 * 4096),)
    parts = w.start(stream.Header(4096, True, 1, "latest", layout))
    data = bytes(range(256)) * 16
    parts += w.pages(GPA_BASE, 64, _bits.mask(64), _bits.mask(64) & ~1, _bits.mask(64) & ~1,
                     data, bytes(range(128)))  # fmt: skip
    parts += w.pass_end(0, True)
    parts += w.registers(0, [(reg, 0) for reg in uapi.CORE_REGS.values()])
    parts += w.end()
    return b"".join(bytes(p) for p in parts)


def _send_stream(path: Path, data: bytes) -> bytes:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, "the destination never listened"
        time.sleep(0.02)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(path))
        with contextlib.suppress(OSError):
            s.sendall(data)
        reply = b""
        while len(reply) < 16 and (more := s.recv(16)):
            reply += more
        return reply


# --- other page sizes ----------------------------------------------------------------------------


def test_64k_pages_and_a_page_size_mismatch(daemons: Daemons, tmp_path: Path) -> None:
    big = daemons.socket("latest", 65536)
    uri = f"unix:{tmp_path}/mig.sock"
    snap = tmp_path / "64k.snap"
    with vmms() as group:
        dst = start(group, tmp_path, "dst", "--socket", big, "--incoming", uri,
                    "--run-seconds", "2")  # fmt: skip
        src = start(group, tmp_path, "src", "--socket", big, *GUEST, "--slots", "2",
                    "--object-size", "4096", "--working-set", "8", "--migrate-to", uri,
                    "--verify")  # fmt: skip
        s, d = src.wait(), dst.wait()
        assert_carried_on(s, d)
        assert d.summary["machine"]["page_size"] == 65536
        snap_run = start(group, tmp_path, "snap", "--socket", big, "--ram", "64",
                         "--snapshot", str(snap), "--migrate-after", "0.2",
                         "--run-seconds", "0.3").wait()  # fmt: skip
        assert snap_run.rc == 0, snap_run.log
        small = daemons.socket("latest", 4096)
        r = start(group, tmp_path, "mismatch", "--socket", small, "--restore", str(snap)).wait()
    assert r.rc == 1 and "65536-byte pages, this kvmtagd emulates a host with 4096" in r.log


# --- in process: the pieces the processes rely on -----------------------------------------------


def test_content_digest_against_an_oracle(kvmtagd: str) -> None:
    """CHECK's digest, computed the slow way from docs/MIGRATION.md: page by page, data with
    pread, tags with one COPY_TAGS per page packed by hand."""
    layout = plan_layout(8 * MiB, 2, MiB, 4096)
    with Machine(kvmtagd, layout, 2, True) as m:
        m.boot(GuestConfig(working_set=MiB, populate=2 * MiB, store_rate=2000))
        m.start()
        m.run_for(0.3)
        m.pause()
        outer = hashlib.sha256()
        for slot in m.slots:
            s, n = slot.layout, slot.npages
            data_pages, tag_pages = [], []
            for p in range(n):
                page = os.pread(m.ram.fd, 4096, slot.offset + p * 4096)
                if any(page):
                    data_pages.append((p, page))
                tags = bytearray(256)
                assert m.vm.mte_copy_tags(s.gpa + p * 4096, 4096, tags,
                                          uapi.KVM_ARM_TAGS_FROM_GUEST) == 4096  # fmt: skip
                packed = bytes((tags[2 * i] & 15) | (tags[2 * i + 1] & 15) << 4
                               for i in range(128))  # fmt: skip
                if any(packed):
                    tag_pages.append((p, packed))
            outer.update(struct.pack("<IIQQ", s.slot, 0, s.gpa, s.size))
            for pages in (data_pages, tag_pages):
                outer.update(_bits.to_bytes(sum(1 << p for p, _ in pages), n))
                outer.update(hashlib.sha256(b"".join(b for _, b in pages)).digest())
        assert any(slot.npages for slot in m.slots)
        assert m.content_digest() == outer.digest()
        m.stop()
        assert m.healthy


def test_to_guest_is_ebusy_while_logging_so_the_destination_restores_first(kvmtagd: str) -> None:
    """Why MachineTarget restores every tag before any memslot logs: since 6.12 the kernel
    refuses TO_GUEST while dirty logging is on."""
    with Machine(kvmtagd, plan_layout(4 * MiB, 1, 0, 4096), 1, True) as m:
        tags = bytes(range(16)) * 16
        m.write_tags(GPA_BASE, tags)
        m.set_logging(True)
        with pytest.raises(OSError) as info:
            m.write_tags(GPA_BASE, tags)
        assert info.value.errno == errno.EBUSY
        target = incoming.MachineTarget(m)
        packed = bytes(range(256))[1::2][:128]  # any non-zero tags
        page = stream.Pages(GPA_BASE, 1, 1, 0, 0, memoryview(bytes(4096)), memoryview(packed))
        target.load_pages(page)
        with pytest.raises(Exception, match="dirty logging is on"):
            target.commit()
        m.set_logging(False)
        target.commit()
        assert m.read_tags(0, 0, 1) == packed
