"""Any ioctl on any object gets an answer, and concurrent callers keep the model consistent."""

from __future__ import annotations

import errno
import threading

from hypothesis import given
from hypothesis import strategies as st

from kvmtag import Host, SimulatedFile, SimulatedProcess, Vcpu, Vm, uapi

PAGE = 4096
GPA = 0x4000_0000
REQUESTS = [*sorted(uapi.IOCTLS), 0, 0xAEFF, 0xC008AEFF, 0xFFFFFFFF]


def world() -> tuple[SimulatedProcess, object, Vm, Vcpu]:
    proc = SimulatedProcess()
    kvm = Host().open()
    vm = kvm.ioctl(proc, uapi.KVM_CREATE_VM, 0)
    assert isinstance(vm, Vm)
    vm.enable_cap(uapi.KVM_CAP_ARM_MTE, 0, 0)
    ram = proc.mmap(16 * PAGE, file=SimulatedFile(16 * PAGE), shared=True)
    assert vm.set_user_memory_region(proc, 0, 0, GPA, 16 * PAGE, ram) == 0
    vcpu = vm.ioctl(proc, uapi.KVM_CREATE_VCPU, 1)
    assert isinstance(vcpu, Vcpu)
    return proc, kvm, vm, vcpu


@given(
    target=st.sampled_from(["kvm", "vm", "vcpu"]),
    request=st.sampled_from(REQUESTS) | st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=128) | st.integers(-(2**63), 2**64 - 1),
)
def test_any_ioctl_gets_an_answer(target: str, request: int, payload: bytes | int) -> None:
    """Any request and argument: a result, a negative errno or a new object; never a raise."""
    proc, kvm, vm, vcpu = world()
    arg = proc.alloc(payload) if isinstance(payload, bytes) else payload
    assert isinstance(arg, int)
    result = {"kvm": kvm, "vm": vm, "vcpu": vcpu}[target].ioctl(proc, request, arg)  # type: ignore[attr-defined]
    assert isinstance(result, int | Vm | Vcpu)
    if isinstance(result, int) and result < 0:
        assert -result in errno.errorcode


def test_concurrent_copies_and_memslot_changes() -> None:
    proc, _, vm, _ = world()
    ram = vm.memslots.get(0).userspace_addr  # type: ignore[union-attr]
    tags = bytes(i % 16 for i in range(16 * PAGE // 16))
    src = proc.alloc(tags)
    results: list[int] = []
    errors: list[BaseException] = []

    def copier(flags: int) -> None:
        try:
            dst = proc.alloc(len(tags))
            for _ in range(200):
                results.append(
                    vm.mte_copy_tags(proc, GPA, 16 * PAGE, src if not flags else dst, flags)
                )
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def slot_flipper() -> None:
        try:
            for _ in range(200):
                vm.set_user_memory_region(proc, 0, 0, GPA, 0, ram)
                vm.set_user_memory_region(proc, 0, 0, GPA, 16 * PAGE, ram)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=copier, args=(f,)) for f in (0, 1, 0, 1)]
    threads.append(threading.Thread(target=slot_flipper))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    # The slots lock serialises each copy against slot changes: all or nothing, never partial.
    assert set(results) <= {16 * PAGE, -errno.EFAULT}
    assert vm.set_user_memory_region(proc, 0, 0, GPA, 16 * PAGE, ram) == 0  # no-op: present
    out = proc.alloc(len(tags))
    assert vm.mte_copy_tags(proc, GPA, 16 * PAGE, out, 1) == 16 * PAGE
    assert proc.read(out, len(tags)) == tags
