"""systemd's service protocols, without libsystemd: readiness notification and socket
activation.

- sd_notify(3): datagrams of newline-separated `KEY=value` lines to `$NOTIFY_SOCKET`, a
  filesystem path or, with a leading "@", an abstract socket name. kvmtagd sends READY=1 once
  it accepts connections, STATUS= lines, WATCHDOG=1 and STOPPING=1.
- sd_watchdog_enabled(3): `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, when set, must be ours) is the
  watchdog timeout; a service pings at half of it.
- sd_listen_fds(3): when `$LISTEN_PID` is this process, `$LISTEN_FDS` descriptors from 3 on are
  listening sockets passed by the service manager, named by `$LISTEN_FDNAMES` (colon separated).
  The three variables are removed from the environment once read, so nothing this process
  starts can mistake them for its own, and the descriptors are made close-on-exec.

Nothing here raises when systemd is absent: every function is a no-op then.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger("kvmtag.daemon")

SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(*lines: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=serving") to the service manager. Returns whether
    a datagram was sent; never blocks (a full queue drops the message, as sd_notify may)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r: only Unix socket addresses are supported", address)
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", env.get("NOTIFY_SOCKET"), e)
        return False
    return True


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None if there is no
    watchdog for this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2e6


@dataclass(frozen=True)
class ListenFd:
    fd: int
    name: str


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """The sockets systemd passed to this process (socket activation), named; [] when none.
    LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment in any case."""
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in _LISTEN_VARIABLES}
    try:
        pid = int(values["LISTEN_PID"] or "0")
        count = int(values["LISTEN_FDS"] or "0")
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID/LISTEN_FDS: %s", values)
        return []
    if pid != os.getpid() or count <= 0:
        return []
    names = (values["LISTEN_FDNAMES"] or "").split(":") if values["LISTEN_FDNAMES"] else []
    names += ["unknown"] * (count - len(names))  # systemd's name for an unnamed descriptor
    passed = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            log.warning("LISTEN_FDS names fd %d, which is not open: %s", fd, e)
            continue
        passed.append(ListenFd(fd, names[i]))
    return passed
