"""kvmtag-vmm: a QEMU-like VMM on kvmtagd that migrates MTE guests live and snapshots them.

Modules, one concern each:

- `stream`: the migration stream format (docs/MIGRATION.md), a pure codec with no I/O;
- `vm`: the machine: memslots, vCPU threads, pause/resume, the guest's boot, tags, registers;
  `ram`: its memfd RAM (preadv/pwrite, zero pages found with SEEK_DATA and in C);
- `migrate`: the source's pre-copy with the dirty log and packed tags;
- `incoming`: the destination's all-or-nothing loading;
- `transport`: unix:, tcp: and file: URIs; `progress`: the terminal display;
- `cli`: the command line (`kvmtag-vmm`, or `python -m clients.kvmtag_vmm`); `bench`: figures.
"""

from clients.kvmtag_vmm.incoming import MachineTarget, receive
from clients.kvmtag_vmm.migrate import Migration, Options
from clients.kvmtag_vmm.stream import Reader, StreamError, Writer
from clients.kvmtag_vmm.vm import GuestConfig, Machine, VmmError

__all__ = [
    "GuestConfig",
    "Machine",
    "MachineTarget",
    "Migration",
    "Options",
    "Reader",
    "StreamError",
    "VmmError",
    "Writer",
    "receive",
]
