"""kvmtag-vmm: a small QEMU-like VMM on kvmtagd that migrates MTE guests with their tags.

    kvmtag-vmm --ram 256 --vcpus 2 --migrate-to unix:/tmp/mig.sock       # source
    kvmtag-vmm --incoming unix:/tmp/mig.sock --run-seconds 10            # destination
    kvmtag-vmm --ram 256 --snapshot /tmp/guest.snap --run-seconds 5      # save while running
    kvmtag-vmm --restore /tmp/guest.snap --run-seconds 5                 # restore it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from clients.kvmtag_vmm import incoming, migrate
from clients.kvmtag_vmm.incoming import MachineTarget
from clients.kvmtag_vmm.migrate import Migration, Options
from clients.kvmtag_vmm.progress import Progress
from clients.kvmtag_vmm.stream import Header, StreamError
from clients.kvmtag_vmm.transport import Listener, Uri, connect, parse_uri
from clients.kvmtag_vmm.vm import (
    GuestConfig,
    Machine,
    MiB,
    OutcomeUnknown,
    VmmError,
    plan_layout,
)

log = logging.getLogger("kvmtag.vmm")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3
DEFAULT_RAM, DEFAULT_SLOTS, DEFAULT_VCPUS = 256, 1, 2

EPILOG = """\
URIs: unix:PATH and tcp:HOST:PORT are live migrations (the destination listens with
--incoming and answers once it has resumed the guest); file:PATH is a snapshot file (written
under PATH.partial and renamed when complete). --snapshot and --restore take file:PATH or a
bare PATH.

Lifecycle: a source boots the guest, runs it --migrate-after seconds, migrates and exits.
A failed migration resumes the guest here, which keeps running; if the destination got the
whole stream but never answered, the guest stays paused (it may run there). --snapshot saves
the paused guest and resumes it. A destination (--incoming, --restore) takes its machine from
the stream; started with it (--ram, and --slots/--hole/--vcpus/--mte as on the source) a live
destination builds it before the source connects, and the stream must match it. It resumes
the guest only once the whole stream has been checked, and can migrate it on (--migrate-to).
A guest that is not migrated away runs --run-seconds (default: until SIGINT or SIGTERM).

Exit status: 0 the guest ran (and migrated) fine; 1 an error (kvmtagd unreachable, a refused
stream, a failed migration, a pre-6.2 kernel profile with MTE); 2 bad usage; 3 the guest
crashed (a tag-check fault or a corrupt object: what lost tags do).

Stream format: docs/MIGRATION.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmtag-vmm",
        description="A QEMU-like VMM on kvmtagd: boots the tagged-heap guest with MTE, migrates "
        "it live (pre-copy with the dirty log, tags packed) and saves/restores snapshots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("machine")
    g.add_argument("--socket", metavar="PATH",
                   help="kvmtagd's socket (default: $KVMTAG_SOCKET, then "
                        "$XDG_RUNTIME_DIR/kvmtag/kvm.sock, /run/kvmtag/kvm.sock)")
    g.add_argument("--ram", type=int, metavar="MiB", help="guest RAM (default 256)")
    g.add_argument("--slots", type=int, metavar="N", help="memslots the RAM is split into "
                   "(default 1)")
    g.add_argument("--hole", type=int, default=0, metavar="MiB",
                   help="unbacked guest-physical gap between neighbouring memslots (default 0)")
    g.add_argument("--mte", action=argparse.BooleanOptionalAction, default=None,
                   help="KVM_CAP_ARM_MTE (default on)")
    g.add_argument("--vcpus", type=int, metavar="N", help="vCPU threads (default 2)")
    g.add_argument("--prealloc", action="store_true",
                   help="allocate all guest RAM up front (QEMU's -mem-prealloc); a live "
                        "destination given --ram does it before the source connects")
    g = p.add_argument_group("guest workload (the tagged heap)")
    g.add_argument("--seed", type=int, default=1, help="the guest's seed (default 1)")
    g.add_argument("--working-set", type=float, default=4.0, metavar="MiB",
                   help="heap the guest allocates, retags, frees and checks (default 4)")
    g.add_argument("--object-size", type=int, default=64, metavar="BYTES",
                   help="heap object size, a power of two from 32 to 4096 (default 64)")
    g.add_argument("--store-rate", type=int, default=0, metavar="N",
                   help="guest stores per second per vCPU; 0 = as fast as it goes (default)")
    g.add_argument("--steps-per-run", type=int, default=500, metavar="N",
                   help="guest steps per KVM_RUN slice (default 500)")
    g.add_argument("--populate", type=int, default=0, metavar="MiB",
                   help="VMM-written data outside the heaps, like a used guest's RAM (default 0)")
    g.add_argument("--populate-tagged", type=int, default=50, metavar="PERCENT",
                   help="share of --populate that carries random tags (default 50)")
    g = p.add_argument_group("lifecycle")
    g.add_argument("--run-seconds", type=float, metavar="S",
                   help="how long a guest that is not migrated away runs (default: until a "
                        "signal)")
    g.add_argument("--migrate-after", type=float, default=1.0, metavar="S",
                   help="run this long before migrating or snapshotting (default 1)")
    g = p.add_argument_group("migration")
    g.add_argument("--migrate-to", metavar="URI", help="migrate live to unix:PATH, "
                   "tcp:HOST:PORT or file:PATH")
    g.add_argument("--incoming", metavar="URI", help="receive a guest from unix:PATH, "
                   "tcp:HOST:PORT (listen) or file:PATH")
    g.add_argument("--snapshot", metavar="[file:]PATH", help="save the paused guest to a file, "
                   "then resume it")
    g.add_argument("--restore", metavar="[file:]PATH", help="= --incoming file:PATH")
    g.add_argument("--tags", choices=migrate.TAG_MODES, default="copy-tags",
                   help="how the source reads tags: KVM_ARM_MTE_COPY_TAGS after re-protecting "
                        "(default), or kvmtag's tag log (KVMTAG_GET_TAG_LOG)")
    g.add_argument("--dirty-log", choices=migrate.DIRTY_LOG_MODES, default="get-and-clear",
                   help="KVM_GET_DIRTY_LOG get-and-clear (default), or manual protect "
                        "(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, INITIALLY_SET, KVM_CLEAR_DIRTY_LOG)")
    g.add_argument("--downtime-ms", type=float, default=300.0, metavar="MS",
                   help="stop-and-copy once the rest fits in this (default 300)")
    g.add_argument("--max-passes", type=int, default=30, metavar="N",
                   help="live passes before stop-and-copy regardless (default 30)")
    g.add_argument("--verify", action="store_true",
                   help="send (source) a SHA-256 of all RAM and tags at the switchover, which the "
                        "destination checks before resuming")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress lines on stderr (default: only when it is a terminal)")
    g.add_argument("--summary", metavar="PATH", help="write a JSON summary there at exit")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="keep retrying to reach the destination this long (default 10)")
    g.add_argument("--accept-timeout", type=float, metavar="S",
                   help="give up waiting for the source after this long (default: never)")
    neg = g.add_mutually_exclusive_group()
    neg.add_argument("--drop-tags", action="store_const", dest="tamper", const="drop-tags",
                     help="negative control: send every page with zero tags")
    neg.add_argument("--corrupt-tags", action="store_const", dest="tamper",
                     const="corrupt-tags", help="negative control: flip a bit of every tag sent")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    timed = "%(relativeCreated)d ms: " if args.verbose > 1 else ""
    logging.basicConfig(level=logging.WARNING, format=f"kvmtag-vmm: {timed}%(message)s")
    log.setLevel(level)
    for a, b in (("restore", "incoming"), ("snapshot", "migrate_to")):
        if getattr(args, a) and getattr(args, b):
            print(f"kvmtag-vmm: --{a} and --{b.replace('_', '-')} exclude each other",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
    report: dict[str, Any] = {}
    with _signals():
        try:
            if args.restore:
                args.incoming = str(parse_uri(args.restore, default_kind="file"))
            rc = _destination(args, report) if args.incoming else _source(args, report)
        except StreamError as e:
            log.error("refused the stream: %s", e)
            rc = EXIT_ERROR
        except VmmError as e:
            log.error("%s", e)
            rc = EXIT_ERROR
        except OSError as e:  # an ioctl or a system call the VMM did not expect to fail
            log.error("%s", e, exc_info=args.verbose > 0)
            rc = EXIT_ERROR
        except _Terminated:
            log.info("terminated")
            rc = EXIT_OK
    report["exit_status"] = rc
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return rc


# --- source ------------------------------------------------------------------------------------


def _guest(args: argparse.Namespace) -> GuestConfig:
    return GuestConfig(
        seed=args.seed, working_set=int(args.working_set * MiB), obj_size=args.object_size,
        store_rate=args.store_rate, steps_per_run=args.steps_per_run,
        populate=args.populate * MiB, populate_tagged=args.populate_tagged,
    )  # fmt: skip


def _source(args: argparse.Namespace, report: dict[str, Any]) -> int:
    ram = (args.ram or DEFAULT_RAM) * MiB
    nslots = args.slots or DEFAULT_SLOTS
    mte = args.mte is not False
    nvcpus = args.vcpus or DEFAULT_VCPUS
    report["role"] = "source"

    def layout(page_size: int) -> Any:
        return plan_layout(ram, nslots, args.hole * MiB, page_size)

    with Machine(args.socket, layout, nvcpus, mte) as m:
        _describe(m, report)
        if args.prealloc:
            m.ram.prealloc()
        m.boot(_guest(args))
        m.start()
        log.info("booted: %d MiB in %d memslots, %d vCPUs, MTE %s, %d-byte pages, kernel %s",
                 ram // MiB, nslots, nvcpus, "on" if mte else "off", m.page_size,
                 m.profile)  # fmt: skip
        return _lifecycle(m, args, report, started=time.monotonic())


def _lifecycle(
    m: Machine, args: argparse.Namespace, report: dict[str, Any], started: float
) -> int:
    """Run; migrate or snapshot if asked; run the rest; report the guest's health."""
    target = args.migrate_to or (
        str(parse_uri(args.snapshot, default_kind="file")) if args.snapshot else None
    )
    try:
        if target:
            m.run_for(args.migrate_after)
            if not m.healthy:
                return _finish(m, report)
            uri = parse_uri(target)
            snapshot = bool(args.snapshot)
            options = Options(
                tags=args.tags, dirty_log=args.dirty_log, downtime=args.downtime_ms / 1e3,
                max_passes=args.max_passes, precopy=not snapshot, verify=args.verify,
                tamper=args.tamper,
            )  # fmt: skip
            try:
                migrated = _migrate(m, uri, options, args, report)
            except OutcomeUnknown as e:
                log.error("%s; the guest stays paused here, never to run twice", e)
                m.stop()
                report["guest"] = _guest_report(m)
                return EXIT_ERROR
            if migrated and not snapshot:
                m.stop()
                report["guest"] = _guest_report(m, steps=report.get("guest_steps_sent"))
                log.info("the guest now runs at %s; this VMM is done", uri)
                return EXIT_OK
            m.resume()
            rc_migration = EXIT_OK if migrated else EXIT_ERROR
        else:
            rc_migration = EXIT_OK
        if args.run_seconds is None:
            m.run_for(None)
        else:
            m.run_for(max(0.0, args.run_seconds - (time.monotonic() - started)))
        rc = _finish(m, report)
        return rc if rc != EXIT_OK else rc_migration
    except _Terminated:
        _finish(m, report)
        raise


def _migrate(
    m: Machine, uri: Uri, options: Options, args: argparse.Namespace, report: dict[str, Any]
) -> bool:
    """Migrate (or snapshot); False if it failed (logged: the source guest carries on)."""
    kind = "snapshot" if not options.precopy else "migration"
    log.info("%s to %s (tags: %s, dirty log: %s)", kind, uri, options.tags, options.dirty_log)
    try:
        sink = connect(uri, args.connect_timeout)
        mig = Migration(m, sink, options, str(uri), Progress(args.progress))
        summary = mig.run()
    except OutcomeUnknown:
        report["migration"] = {"uri": str(uri), "failed": "no answer from the destination"}
        raise
    except (VmmError, OSError) as e:
        log.error("%s to %s failed: %s; the guest carries on here", kind, uri, e)
        report["migration"] = {"uri": str(uri), "failed": str(e)}
        return False
    report.update(summary.to_json())
    report["role"] = "snapshot" if not options.precopy else report.get("role", "source")
    report["guest_steps_sent"] = m.guest_steps()
    log.info("%s complete: %.2f s, downtime %.0f ms, %d passes, %.1f MiB data + %.2f MiB tags "
             "on the wire", kind, summary.total_seconds, summary.downtime_seconds * 1e3,
             summary.passes, summary.data_bytes / MiB, summary.tag_bytes / MiB)  # fmt: skip
    return True


def _finish(m: Machine, report: dict[str, Any]) -> int:
    m.stop()
    report["guest"] = _guest_report(m)
    if m.stats.crash is not None:
        vcpu, gpa = m.stats.crash
        log.error("the guest crashed on vCPU %d at %#x (lost or wrong tags, or corrupt data)",
                  vcpu, gpa)  # fmt: skip
        return EXIT_CRASH
    if m.stats.failure is not None:
        log.error("a vCPU failed: %s", m.stats.failure)
        return EXIT_ERROR
    g = report["guest"]
    log.info("the guest ran %d KVM_RUN slices, %d steps, without crashing", g["slices"],
             g["steps"])  # fmt: skip
    return EXIT_OK


def _guest_report(m: Machine, steps: list[int] | None = None) -> dict[str, Any]:
    s = m.stats
    try:
        registers = m.guest_steps() if steps is None else steps
    except OSError:
        registers = []
    return {
        "slices": sum(s.slices), "steps": sum(s.steps), "slices_per_vcpu": s.slices,
        "x3_per_vcpu": registers, "crashed": s.crash is not None,
        "crash_vcpu": s.crash[0] if s.crash else None,
        "crash_gpa": s.crash[1] if s.crash else None, "failure": s.failure,
    }  # fmt: skip


def _describe(m: Machine, report: dict[str, Any]) -> None:
    report["machine"] = {
        "page_size": m.page_size, "profile": m.profile, "mte": m.mte, "vcpus": len(m.vcpus),
        "ram_bytes": m.ram.size,
        "slots": [{"slot": s.slot, "gpa": s.gpa, "size": s.size} for s in m.layout],
    }  # fmt: skip


# --- destination -------------------------------------------------------------------------------


def _destination(args: argparse.Namespace, report: dict[str, Any]) -> int:
    uri = parse_uri(args.incoming)
    report["role"] = "destination"
    # A live destination started with its machine (--ram …), as QEMU's is, builds it before
    # the source connects (and with --prealloc allocates its RAM then). A snapshot's is only
    # built once the whole file has been checked.
    ready = _machine_from_args(args) if uri.kind != "file" and args.ram is not None else None
    try:
        return _receive(args, report, uri, ready)
    finally:
        if ready is not None:
            ready.close()  # a no-op if the guest ran in it: closed already


def _machine_from_args(args: argparse.Namespace) -> Machine:
    ram, nslots, hole = args.ram * MiB, args.slots or DEFAULT_SLOTS, args.hole * MiB
    m = Machine(args.socket, lambda ps: plan_layout(ram, nslots, hole, ps),
                args.vcpus or DEFAULT_VCPUS, args.mte is not False)  # fmt: skip
    if args.prealloc:
        m.ram.prealloc()
    return m


def _receive(
    args: argparse.Namespace, report: dict[str, Any], uri: Uri, ready: Machine | None
) -> int:
    listener = Listener(uri)
    try:
        source = listener.accept(args.accept_timeout)
    finally:
        listener.close()

    def factory(header: Header) -> MachineTarget:
        _match(args, header)
        if ready is not None:
            if (header.page_size, header.slots, header.nvcpus, header.mte) != (
                ready.page_size, ready.layout, len(ready.vcpus), ready.mte
            ):
                raise VmmError("this destination's machine (--ram, --slots, --hole, --vcpus, "
                               "--mte, page size) does not match the stream's")  # fmt: skip
            return MachineTarget(ready)
        machine = Machine(args.socket, header.slots, header.nvcpus, header.mte,
                          page_size=header.page_size)  # fmt: skip
        if args.prealloc:
            machine.ram.prealloc()
        return MachineTarget(machine)

    try:
        try:
            target, stats = incoming.receive(source, factory, verify_first=uri.kind == "file",
                                            uri=str(uri))  # fmt: skip
        except BaseException:
            source.reply(False, 1)
            raise
        m = target.m if isinstance(target, MachineTarget) else None
        assert m is not None
        with m:
            _describe(m, report)
            report["incoming"] = vars(stats) | {"ioctls": dict(sorted(m.ioctls.items()))}
            report["guest_steps_restored"] = m.guest_steps()
            m.start()
            source.reply(True)
            source.close()
            log.info("resumed the guest from %s: %.1f MiB of stream in %.2f s (%d passes)%s",
                     uri, stats.stream_bytes / MiB, stats.load_seconds + stats.verify_seconds,
                     stats.passes, ", content checked" if stats.checked_content else "")
            return _lifecycle(m, args, report, started=time.monotonic())
    finally:
        source.close()


def _match(args: argparse.Namespace, h: Header) -> None:
    """Options given on a destination must describe the stream's machine (as QEMU requires
    the same command line on both sides); options left out are taken from the stream."""
    wrong = []
    if args.ram is not None and args.ram * MiB != h.ram_bytes:
        wrong.append(f"--ram {args.ram} (the stream has {h.ram_bytes / MiB:g} MiB)")
    if args.slots is not None and args.slots != len(h.slots):
        wrong.append(f"--slots {args.slots} (the stream has {len(h.slots)})")
    if args.vcpus is not None and args.vcpus != h.nvcpus:
        wrong.append(f"--vcpus {args.vcpus} (the stream has {h.nvcpus})")
    if args.mte is not None and args.mte != h.mte:
        wrong.append(f"--{'' if args.mte else 'no-'}mte (the stream's guest has MTE "
                     f"{'on' if h.mte else 'off'})")  # fmt: skip
    if wrong:
        raise VmmError("this destination does not match the stream: " + "; ".join(wrong))


# --- signals -----------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop the VMM cleanly (vCPUs stopped, summary written)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
