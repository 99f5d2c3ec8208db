"""kvmtagd: the command line, the listening socket, signals, systemd. Never daemonizes.

It follows the conventions of vhost-user backend programs: `--socket-path` or `--fd`,
`--print-capabilities`, no daemonizing, a prompt exit on SIGTERM (requests in flight get
`--stop-timeout` seconds to finish; idle connections close at once).

The listening socket comes from, in order: `--fd N`; `--socket-path`; systemd socket
activation (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES: honoured, then removed from the
environment); the default path. A socket kvmtagd creates is bound and listening inside a
private (0700) directory next to its path, given its mode and group there, and only then
renamed into place: a socket path that exists is ready to accept, and at no moment is it open
to anyone its mode and group do not admit. A stale socket file nobody listens on is replaced;
a live one makes kvmtagd refuse to start.

With $NOTIFY_SOCKET (Type=notify) it reports READY=1 once it accepts connections, STATUS= lines,
STOPPING=1, and pings the watchdog from the event loop (a stuck loop stops the pings).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from kvmtag import sdnotify, uapi, wire
from kvmtag.host import Host
from kvmtag.limits import Limits, format_size, parse_size
from kvmtag.profiles import PAGE_SIZES, PROFILES, HostConfig
from kvmtag.server import Access, Server

log = logging.getLogger("kvmtag.daemon")

ACTIVATION_FD_NAME = "kvmtag"  # FileDescriptorName= in systemd/kvmtag.socket
STOP_TIMEOUT = 2.0  # seconds requests in flight get to finish after SIGTERM
THREAD_STACK = 1 << 20  # bytes of stack reserved per thread (one thread per connection)


def default_socket_path() -> Path:
    """$KVMTAG_SOCKET, else $XDG_RUNTIME_DIR/kvmtag/kvm.sock, else /run/kvmtag/kvm.sock.
    (Never /tmp: a hardened service has a private one.)"""
    if os.environ.get("KVMTAG_SOCKET"):
        return Path(os.environ["KVMTAG_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "kvmtag" / "kvm.sock"
    return Path("/run/kvmtag/kvm.sock")


def capabilities(config: HostConfig) -> dict[str, object]:
    """The --print-capabilities document (vhost-user backend style)."""
    return {
        "type": "kvm-mte",
        "features": ["mte-copy-tags", "dirty-log", "manual-dirty-log-protect"],
        "protocol-version": "{}.{}".format(*wire.VERSION),
        "kernel-profile": config.profile.name,
        "kernel-profiles": list(PROFILES),
        "page-size": config.page_size,
        "page-sizes": list(PAGE_SIZES),
        "api-version": uapi.KVM_API_VERSION,
    }


def _uid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {text}") from None


def _gid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {text}") from None


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {text}")
    return mode


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _vcpus(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 512:
        raise argparse.ArgumentTypeError(f"must be from 1 to 512 (KVM_MAX_VCPUS): {text}")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(
        prog="kvmtagd",
        description="Serve arm64 KVM's MTE interface (the /dev/kvm ioctls) on a Unix socket.",
        epilog="Sizes take a K, M, G or T suffix. Limits answer with an errno and a log line; "
        "see README.md, \"Limits\".",
    )
    p.add_argument(
        "--socket-path", type=Path, default=None,
        help="listen here (default: systemd's socket if activated, else $KVMTAG_SOCKET, else "
        "$XDG_RUNTIME_DIR/kvmtag/kvm.sock, else /run/kvmtag/kvm.sock)",
    )  # fmt: skip
    p.add_argument("--fd", type=int, default=None, help="serve this already-listening socket")
    p.add_argument(
        "--socket-mode", type=_mode, default=0o660, metavar="MODE",
        help="permissions of the socket kvmtagd creates (octal, default 0660)",
    )  # fmt: skip
    p.add_argument(
        "--socket-group", type=_gid, default=None, metavar="GROUP",
        help="group of the socket kvmtagd creates (name or number; default: kvmtagd's)",
    )  # fmt: skip
    p.add_argument(
        "--allow-uid", type=_uid, action="append", default=[], metavar="UID",
        help="accept connections from this user (repeatable; with no --allow-uid or "
        "--allow-gid, anyone who can open the socket)",
    )  # fmt: skip
    p.add_argument(
        "--allow-gid", type=_gid, action="append", default=[], metavar="GID",
        help="accept connections from members of this group, primary or supplementary "
        "(repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--page-size", type=int, choices=PAGE_SIZES, default=4096,
        help="emulated host page size (default 4096)",
    )  # fmt: skip
    p.add_argument(
        "--kernel", choices=list(PROFILES), default="latest",
        help="kernel behaviour profile (default latest)",
    )  # fmt: skip
    p.add_argument(
        "--max-vcpus", type=_vcpus, default=512, metavar="N",
        help="vCPUs per VM, the kernel's KVM_MAX_VCPUS (1-512, default 512): beyond, EINVAL",
    )  # fmt: skip
    limits = p.add_argument_group("limits (README.md, \"Limits\")")
    for flag, kind, helptext in (
        ("--max-connections", _count, "open files (connections) of all clients; beyond: "
         "closed at once, and KVM_CREATE_VM/VCPU get ENFILE"),
        ("--max-connections-per-process", _count, "open files of one client process; beyond: "
         "open() and KVM_CREATE_VM/VCPU get EMFILE"),
        ("--max-requests-per-process", _count, "such bulk requests of one client process at "
         "once; more wait their turn"),
        ("--threads", _count, "requests doing bulk work (reaching user memory, running the "
         "guest) at once, of all connections; more wait their turn"),
        ("--max-vms", _count, "VMs of one client process; beyond: KVM_CREATE_VM gets ENOMEM"),
        ("--max-memslots", _count, "memslots of one VM; beyond: ENOSPC"),
        ("--max-guest-memory", _size, "bytes in the memslots of one client process; a larger "
         "memslot: E2BIG, in all: ENOMEM"),
        ("--max-tag-storage", _size, "bytes of packed tags the daemon holds; beyond: "
         "KVM_ARM_MTE_COPY_TAGS to the guest gets ENOSPC"),
        ("--max-backing-fds", _count, "guest-memory fds held per client process; beyond: the "
         "memory is tags-only"),
    ):  # fmt: skip
        name = flag[2:].replace("-", "_")
        default = getattr(d, name)
        shown = format_size(default) if kind is _size else default
        limits.add_argument(flag, type=kind, default=default,
                            metavar="SIZE" if kind is _size else "N",
                            help=f"{helptext} (default {shown})")  # fmt: skip
    p.add_argument(
        "--stop-timeout", type=float, default=STOP_TIMEOUT, metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish before they are "
        f"cancelled (default {STOP_TIMEOUT:g})",
    )  # fmt: skip
    p.add_argument(
        "--print-capabilities", action="store_true",
        help="print a JSON description of this backend and exit",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return p.parse_args(argv)


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_connections=args.max_connections,
        max_connections_per_process=args.max_connections_per_process,
        max_requests_per_process=args.max_requests_per_process,
        threads=args.threads,
        max_vms=args.max_vms,
        max_memslots=args.max_memslots,
        max_guest_memory=args.max_guest_memory,
        max_tag_storage=args.max_tag_storage,
        max_backing_fds=args.max_backing_fds,
    )


@contextlib.contextmanager
def listening_socket(
    path: Path, *, mode: int = 0o660, group: int | None = None
) -> Iterator[socket.socket]:
    """Bind `path` atomically: bind and listen inside a private directory beside it, give the
    socket its mode and group there, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise SystemExit(f"kvmtagd: {path} exists and is not a socket: refusing to replace it")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            log.info("replacing stale socket %s", path)
            path.unlink()
        except OSError as e:
            raise SystemExit(
                f"kvmtagd: {path} exists and is not a socket kvmtagd can use: {e}"
            ) from None
        else:
            raise SystemExit(f"kvmtagd: another server is listening on {path}")
        finally:
            probe.close()
    # mkdtemp makes the directory 0700: until the rename, only kvmtagd's user can reach the
    # socket, whatever mode it is bound with (the umask) and before its group is set.
    private = Path(tempfile.mkdtemp(prefix=".kvmtag-", dir=path.parent))
    tmp = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    ino = None
    try:
        sock.bind(str(tmp))
        if group is not None:
            os.chown(tmp, -1, group)
        os.chmod(tmp, mode)
        sock.listen(128)
        os.rename(tmp, path)
        ino = path.stat().st_ino
        private.rmdir()
        yield sock
    finally:
        sock.close()
        shutil.rmtree(private, ignore_errors=True)
        # Remove the socket only if it is still ours (not replaced by a newer daemon).
        with contextlib.suppress(OSError):
            if ino is not None and path.stat().st_ino == ino:
                path.unlink()


def adopt_listener(fd: int, what: str) -> socket.socket:
    """A listening Unix stream socket we were given (--fd, socket activation)."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as e:
        raise SystemExit(f"kvmtagd: {what}: {e}") from None
    if (
        listener.type != socket.SOCK_STREAM
        or listener.family != socket.AF_UNIX
        or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        listener.detach()
        raise SystemExit(f"kvmtagd: {what} is not a listening Unix stream socket")
    listener.set_inheritable(False)
    return listener


def activated_listener(passed: list[sdnotify.ListenFd]) -> socket.socket:
    """The socket systemd passed: the only one, or the one named ACTIVATION_FD_NAME."""
    if len(passed) == 1:
        chosen = passed[0]
    else:
        named = [p for p in passed if p.name == ACTIVATION_FD_NAME]
        if len(named) != 1:
            names = ", ".join(f"{p.fd} ({p.name})" for p in passed)
            raise SystemExit(f"kvmtagd: socket activation passed {names}: name one "
                             f"FileDescriptorName={ACTIVATION_FD_NAME}")  # fmt: skip
        chosen = named[0]
    for other in passed:
        if other is not chosen:
            os.close(other.fd)
    log.info("socket activation: serving fd %d (%s)", chosen.fd, chosen.name)
    return adopt_listener(chosen.fd, f"socket activation fd {chosen.fd} ({chosen.name})")


def raise_fd_limit(limits: Limits) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd leaves services at 1024 soft):
    each connection is an fd, each vCPU's kvm_run area another, plus held backing fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft < 2 * limits.max_connections:
        log.warning("RLIMIT_NOFILE is %d: fewer than two per connection of --max-connections "
                    "%d; accept() may fail with EMFILE first", soft,
                    limits.max_connections)  # fmt: skip


@dataclass(frozen=True)
class Options:
    limits: Limits
    access: Access
    stop_timeout: float = STOP_TIMEOUT


def status_line(server: Server) -> str:
    s = server.stats()
    return (f"serving {s['connections']} connections of {s['processes']} processes, "
            f"{s['vms']} VMs, {format_size(s['tag_storage'])} of tags")  # fmt: skip


async def supervise(server: Server, watchdog: float | None) -> None:
    """Ping the watchdog (from the event loop, so a stuck loop stops the pings) and keep
    STATUS= current."""
    last = ""
    period = min(watchdog, 5.0) if watchdog else 5.0
    while True:
        lines = ["WATCHDOG=1"] if watchdog else []
        status = status_line(server)
        if status != last:
            lines.append(f"STATUS={status}")
            last = status
        if lines:
            sdnotify.notify(*lines)
        await trio.sleep(period)


async def stop(server: Server, cancel: trio.CancelScope, timeout: float) -> None:
    """Drain the server for at most `timeout` seconds, then cancel whatever is left."""
    with trio.move_on_after(timeout) as waited:
        await server.drain()
    if waited.cancelled_caught:
        log.warning("stopping: %d requests still in flight after %g s: cancelled",
                    server.stats()["in_flight"], timeout)  # fmt: skip
    cancel.cancel()


async def run(listener: socket.socket, config: HostConfig, options: Options | None = None) -> None:
    options = options or Options(Limits(), Access())
    server = Server(Host(config), limits=options.limits, access=options.access)
    watchdog = sdnotify.watchdog_interval()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            await nursery.start(server.serve, trio.socket.from_stdlib_socket(listener))
            log.info(
                "serving: page size %d, kernel profile %s", config.page_size, config.profile.name
            )
            sdnotify.notify("READY=1", f"STATUS={status_line(server)}")
            if os.environ.get("NOTIFY_SOCKET"):
                nursery.start_soon(supervise, server, watchdog)
            stopping = False
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    # Always shown, whatever -v says: it was asked for.
                    log.log(max(logging.WARNING, log.getEffectiveLevel()), "stats: %s",
                            " ".join(f"{k}={v}" for k, v in server.stats().items()))  # fmt: skip
                    continue
                name = signal.Signals(signum).name
                if stopping:
                    log.info("%s again: stopping now", name)
                    break
                stopping = True
                log.info("%s: stopping (requests in flight get %g s)", name,
                         options.stop_timeout)  # fmt: skip
                sdnotify.notify("STOPPING=1", f"STATUS=stopping on {name}")
                nursery.start_soon(stop, server, nursery.cancel_scope, options.stop_timeout)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = HostConfig(
        page_size=args.page_size, profile=PROFILES[args.kernel], max_vcpus=args.max_vcpus
    )
    if args.print_capabilities:
        json.dump(capabilities(config), sys.stdout, indent=2)
        print()
        return 0
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="kvmtagd: %(levelname)s: %(message)s",
    )
    options = Options(
        limits_of(args), Access(frozenset(args.allow_uid), frozenset(args.allow_gid)),
        args.stop_timeout,
    )  # fmt: skip
    raise_fd_limit(options.limits)
    # Every connection has a thread (kvmtag.server): reserve each a bounded stack, not the
    # default 8 MiB of address space; the model never recurses deeply.
    threading.stack_size(THREAD_STACK)
    activated = sdnotify.listen_fds()  # read, and removed from the environment, in any case
    if args.fd is not None or (activated and args.socket_path is None):
        try:
            if args.fd is not None:
                listener = adopt_listener(args.fd, f"--fd {args.fd}")
            else:
                listener = activated_listener(activated)
        except SystemExit as e:
            print(e, file=sys.stderr)
            sdnotify.notify(f"STATUS={e}", f"ERRNO={errno.EINVAL}")
            return 1
        trio.run(run, listener, config, options)
        return 0
    path = args.socket_path or default_socket_path()
    try:
        with listening_socket(path, mode=args.socket_mode, group=args.socket_group) as listener:
            print(f"kvmtagd: listening on {path}", file=sys.stderr, flush=True)
            trio.run(run, listener, config, options)
    except OSError as e:
        print(f"kvmtagd: {path}: {e.strerror or e}", file=sys.stderr)
        return 1 if e.errno != errno.EADDRINUSE else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
