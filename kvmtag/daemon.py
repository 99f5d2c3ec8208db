"""kvmtagd: the command line, the listening socket, signals. Never daemonizes.

The socket is bound and listening under a temporary name in its directory and then renamed
into place, so a socket path that exists is ready to accept. A stale socket file nobody listens
on is replaced; a live one makes kvmtagd refuse to start.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from kvmtag import uapi, wire
from kvmtag.host import Host
from kvmtag.profiles import PAGE_SIZES, PROFILES, HostConfig
from kvmtag.server import Server

log = logging.getLogger("kvmtag.daemon")


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kvmtagd",
        description="Serve arm64 KVM's MTE interface (the /dev/kvm ioctls) on a Unix socket.",
    )
    p.add_argument(
        "--socket-path", type=Path, default=None,
        help="listen here (default: $KVMTAG_SOCKET, else $XDG_RUNTIME_DIR/kvmtag/kvm.sock, "
        "else /run/kvmtag/kvm.sock)",
    )  # fmt: skip
    p.add_argument("--fd", type=int, default=None, help="serve this already-listening socket")
    p.add_argument(
        "--page-size", type=int, choices=PAGE_SIZES, default=4096,
        help="emulated host page size (default 4096)",
    )  # fmt: skip
    p.add_argument(
        "--kernel", choices=list(PROFILES), default="latest",
        help="kernel behaviour profile (default latest)",
    )  # fmt: skip
    p.add_argument(
        "--print-capabilities", action="store_true",
        help="print a JSON description of this backend and exit",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return p.parse_args(argv)


@contextlib.contextmanager
def listening_socket(path: Path) -> Iterator[socket.socket]:
    """Bind `path` atomically: listen under a temporary name, then rename into place."""
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        sock.listen(128)
        os.chmod(tmp, 0o660)
        os.rename(tmp, path)
        ino = path.stat().st_ino
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Remove the socket only if it is still ours (not replaced by a newer daemon).
        with contextlib.suppress(OSError):
            if path.stat().st_ino == ino:
                path.unlink()


async def run(listener: socket.socket, config: HostConfig) -> None:
    server = Server(Host(config))
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(server.serve, trio.socket.from_stdlib_socket(listener))
            log.info(
                "serving: page size %d, kernel profile %s", config.page_size, config.profile.name
            )
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = HostConfig(page_size=args.page_size, profile=PROFILES[args.kernel])
    if args.print_capabilities:
        json.dump(capabilities(config), sys.stdout, indent=2)
        print()
        return 0
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="kvmtagd: %(levelname)s: %(message)s",
    )
    if args.fd is not None:
        try:
            listener = socket.socket(fileno=args.fd)
        except OSError as e:
            print(f"kvmtagd: --fd {args.fd}: {e}", file=sys.stderr)
            return 1
        if listener.type != socket.SOCK_STREAM or listener.family != socket.AF_UNIX:
            print(f"kvmtagd: --fd {args.fd} is not a Unix stream socket", file=sys.stderr)
            return 1
        trio.run(run, listener, config)
        return 0
    path = args.socket_path or default_socket_path()
    try:
        with listening_socket(path) as listener:
            print(f"kvmtagd: listening on {path}", file=sys.stderr, flush=True)
            trio.run(run, listener, config)
    except OSError as e:
        print(f"kvmtagd: {path}: {e.strerror or e}", file=sys.stderr)
        return 1 if e.errno != errno.EADDRINUSE else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
