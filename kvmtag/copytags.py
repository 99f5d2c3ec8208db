"""KVM_ARM_MTE_COPY_TAGS: tags between guest memory and a VMM buffer (arch/arm64/kvm/guest.c).

The kernel copies one host page at a time, in ascending order, and stops at the first page it
cannot do; the result is `length` on success, the guest bytes covered when some pages were done
(the errno is lost), else the negative errno. Here the same walk happens a window of pages at a
time: the window's reachable pages are resolved into backing runs, and their tags move through
one copy_from_user / copy_to_user per window, so user memory is touched in ascending order in
bounded pieces and no Python loop runs per page or per tag.
"""

from __future__ import annotations

import errno

from kvmtag.memslots import Memslots, Run
from kvmtag.profiles import HostConfig
from kvmtag.uapi import KVM_ARM_TAGS_FROM_GUEST
from kvmtag.usermem import UserMemory

INT_MAX = 2**31 - 1
WINDOW_TAG_BYTES = 4 << 20  # tag bytes moved per window: 256 MiB of guest at 4 KiB pages


class CopyTagsArgs:
    """The fields of struct kvm_arm_copy_mte_tags."""

    __slots__ = ("addr", "flags", "guest_ipa", "length", "reserved")

    def __init__(
        self, guest_ipa: int, length: int, addr: int, flags: int, reserved: tuple[int, int]
    ) -> None:
        self.guest_ipa, self.length, self.addr = guest_ipa, length, addr
        self.flags, self.reserved = flags, reserved


def check(args: CopyTagsArgs, mte_enabled: bool, config: HostConfig) -> int:
    """The checks made before the slots lock is taken: 0 or a negative errno."""
    if not mte_enabled:
        return -errno.EINVAL
    if args.reserved[0] or args.reserved[1]:
        return -errno.EINVAL
    if args.flags & ~KVM_ARM_TAGS_FROM_GUEST:
        return -errno.EINVAL
    mask = config.page_size - 1
    if args.length & mask or args.guest_ipa & mask:
        return -errno.EINVAL
    if config.profile.copy_tags_int_max and args.length > INT_MAX:
        return -errno.EINVAL
    return 0


def copy(slots: Memslots, mm: UserMemory, args: CopyTagsArgs, config: HostConfig) -> int:
    """The page walk, with the VM's slots lock held. Returns the kernel's result."""
    page, tpp = config.page_size, config.tags_per_page
    to_guest = not args.flags & KVM_ARM_TAGS_FROM_GUEST
    total = args.length // page
    gfn = args.guest_ipa // page
    window = max(WINDOW_TAG_BYTES // tpp, 1)
    done = 0
    while done < total:
        want = min(window, total - done)
        runs, reachable = slots.resolve(gfn + done, want, write=to_guest)
        addr = args.addr + done * tpp
        if to_guest:
            got = _to_guest(mm, addr, runs, reachable, tpp, config)
        else:
            got = _from_guest(mm, addr, runs, reachable, tpp)
        done += got
        if got < want:
            break
    if done == total:
        return args.length
    return done * page if done else -errno.EFAULT


def _from_guest(mm: UserMemory, addr: int, runs: list[Run], reachable: int, tpp: int) -> int:
    buf = view = mm.bounce_buffer(reachable * tpp)
    at = 0
    for run in runs:
        run.backing.read(run.index, run.npages, view[at : at + run.npages * tpp])
        at += run.npages * tpp
    # A page counts only if all its tags reached the user buffer.
    return mm.copy_to_user(addr, buf) // tpp


def _to_guest(
    mm: UserMemory, addr: int, runs: list[Run], reachable: int, tpp: int, config: HostConfig
) -> int:
    data = memoryview(mm.copy_from_user(addr, reachable * tpp))
    full = len(data) // tpp
    at = 0
    for run in runs:
        n = min(run.npages, full - at)
        if n > 0:
            run.backing.write(run.index, n, data[at * tpp : (at + n) * tpp])
        if n < run.npages:
            # The buffer faulted inside page `at`: never leave it half-written (since 6.2),
            # or leave what was copied without marking it tagged (before).
            faulted = run.index + max(n, 0)
            if config.profile.copy_tags_fault_clears:
                run.backing.clear(faulted, 1)
            else:
                run.backing.write_prefix(faulted, data[full * tpp :])
            break
        at += n
    return full
