"""The arm64 KVM user API that kvmtag serves: every number, flag and struct, in one place.

Values and layouts are those of include/uapi/linux/kvm.h and arch/arm64/include/uapi/asm/kvm.h;
tests/test_uapi.py compiles a C program against the real headers and checks each of them. The
ioctl numbers are written out, not computed, so each line can be compared with the kernel's.

One `construct.Struct` per kernel struct, named and laid out exactly like it. Hot paths use the
precompiled `struct.Struct` in `LAYOUT`, derived from the same declaration (construct is far
slower per parse, and never parses untrusted bytes here).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import construct as cs

# --- ioctl number encoding (asm-generic/ioctl.h; arm64 and x86_64 agree) -------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- ioctls: number, then the fd it is meant for ------------------------------------------------
# Never derive a direction or size from these numbers: KVM_ARM_MTE_COPY_TAGS is encoded as a read
# (_IOR) yet the kernel only copies its struct in. IOCTLS below is the explicit table.

# system (/dev/kvm)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03  # also on a VM fd (KVM_CAP_CHECK_EXTENSION_VM)
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
# VM
KVM_CREATE_VCPU = 0xAE41
KVM_GET_DIRTY_LOG = 0x4010AE42
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_ENABLE_CAP = 0x4068AEA3
KVM_ARM_PREFERRED_TARGET = 0x8020AEAF
KVM_ARM_MTE_COPY_TAGS = 0x8030AEB4
KVM_CLEAR_DIRTY_LOG = 0xC018AEC0
# vCPU
KVM_RUN = 0xAE80
KVM_GET_ONE_REG = 0x4010AEAB
KVM_SET_ONE_REG = 0x4010AEAC
KVM_ARM_VCPU_INIT = 0x4020AEAE
KVM_GET_REG_LIST = 0xC008AEB0

# --- capabilities --------------------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_READONLY_MEM = 81
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_ARM_MTE = 205

# --- flags and argument values -------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
# Not uapi (include/linux/kvm_host.h): what arm64 answers for KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

KVM_VM_TYPE_ARM_IPA_SIZE_MASK = 0xFF
KVM_ARM_VCPU_POWER_OFF = 0  # feature bit numbers in kvm_vcpu_init.features[0]
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_ARM_TARGET_GENERIC_V8 = 5

# kvm_run.exit_reason values, and what goes with them
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_SYSTEM_EVENT_CRASH = 3
KVM_INTERNAL_ERROR_EMULATION = 1

# ONE_REG ids of the arm64 core registers (struct kvm_regs: user_pt_regs first)
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_CORE = 0x0010 << 16

# --- kvmtag's own extensions ---------------------------------------------------------------------
# Numbered so they cannot collide with upstream KVM: a capability far above KVM's (which count
# from 0 and are in the low hundreds), and ioctls of type 'k' (0x6B), which KVM never uses (its
# fds answer EINVAL to any type but KVMIO).
KVMTAG_CAP_TAG_LOG = 0x4B540001  # ENABLE_CAP on a VM: save tags when the dirty log cleans
KVMTAG_GET_TAG_LOG = 0x40286B01  # _IOW('k', 1, struct kvmtag_tag_log)
KVMTAG_EXT_TAG_LOG = 1 << 0  # bit in the handshake's extensions

# --- structs -------------------------------------------------------------------------------------

kvm_arm_copy_mte_tags = cs.Struct(
    "guest_ipa" / cs.Int64ul,
    "length" / cs.Int64ul,
    "addr" / cs.Int64ul,  # void __user *
    "flags" / cs.Int64ul,
    "reserved" / cs.Array(2, cs.Int64ul),
)

kvm_userspace_memory_region = cs.Struct(
    "slot" / cs.Int32ul,  # bits 15:0 slot id, bits 31:16 address-space id
    "flags" / cs.Int32ul,
    "guest_phys_addr" / cs.Int64ul,
    "memory_size" / cs.Int64ul,
    "userspace_addr" / cs.Int64ul,
)

kvm_enable_cap = cs.Struct(
    "cap" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "args" / cs.Array(4, cs.Int64ul),
    "pad" / cs.Bytes(64),
)

kvm_dirty_log = cs.Struct(
    "slot" / cs.Int32ul,
    "padding1" / cs.Int32ul,
    "dirty_bitmap" / cs.Int64ul,  # void __user *
)

kvm_clear_dirty_log = cs.Struct(
    "slot" / cs.Int32ul,
    "num_pages" / cs.Int32ul,
    "first_page" / cs.Int64ul,
    "dirty_bitmap" / cs.Int64ul,  # void __user *
)

kvm_one_reg = cs.Struct(
    "id" / cs.Int64ul,
    "addr" / cs.Int64ul,
)

kvm_vcpu_init = cs.Struct(
    "target" / cs.Int32ul,
    "features" / cs.Array(7, cs.Int32ul),
)

kvm_reg_list = cs.Struct(  # followed by n u64 register ids
    "n" / cs.Int64ul,
)

# struct kvm_run, as far as the exits kvmtag produces: the header, then the exit union at 32.
kvm_run = cs.Struct(
    "request_interrupt_window" / cs.Int8ul,
    "immediate_exit" / cs.Int8ul,
    "padding1" / cs.Bytes(6),
    "exit_reason" / cs.Int32ul,
    "ready_for_interrupt_injection" / cs.Int8ul,
    "if_flag" / cs.Int8ul,
    "flags" / cs.Int16ul,
    "cr8" / cs.Int64ul,
    "apic_base" / cs.Int64ul,
)
KVM_RUN_EXIT_OFFSET = 32  # offsetof(struct kvm_run, mmio) == system_event == internal
KVM_RUN_SIZE = 2352  # sizeof(struct kvm_run) on arm64
kvm_run_mmio = cs.Struct(  # kvm_run.mmio
    "phys_addr" / cs.Int64ul, "data" / cs.Bytes(8), "len" / cs.Int32ul, "is_write" / cs.Int8ul
)
kvm_run_system_event = cs.Struct(  # kvm_run.system_event (also .internal: suberror, ndata)
    "type" / cs.Int32ul, "ndata" / cs.Int32ul, "data" / cs.Array(16, cs.Int64ul)
)

STRUCTS: dict[str, cs.Struct] = {
    "kvm_arm_copy_mte_tags": kvm_arm_copy_mte_tags,
    "kvm_userspace_memory_region": kvm_userspace_memory_region,
    "kvm_enable_cap": kvm_enable_cap,
    "kvm_dirty_log": kvm_dirty_log,
    "kvm_clear_dirty_log": kvm_clear_dirty_log,
    "kvm_one_reg": kvm_one_reg,
    "kvm_vcpu_init": kvm_vcpu_init,
    "kvm_reg_list": kvm_reg_list,
}
kvmtag_tag_log = cs.Struct(  # kvmtag's own: KVMTAG_GET_TAG_LOG
    "slot" / cs.Int32ul,
    "flags" / cs.Int32ul,  # 0
    "first_page" / cs.Int64ul,  # a multiple of 64, in the slot
    "num_pages" / cs.Int64ul,
    "tags" / cs.Int64ul,  # void __user *: num_pages * PAGE_SIZE/32 bytes of packed tags
    "valid_bitmap" / cs.Int64ul,  # void __user *: ALIGN(num_pages, 64)/8 bytes
)
EXTENSION_STRUCTS: dict[str, cs.Struct] = {"kvmtag_tag_log": kvmtag_tag_log}

# Pieces of structs the header check knows by another C expression (unions, partial structs).
PARTIAL_STRUCTS: dict[str, cs.Struct] = {
    "kvm_run": kvm_run,
    "kvm_run_mmio": kvm_run_mmio,
    "kvm_run_system_event": kvm_run_system_event,
}


_CODES = {
    cs.Int8ul: "B", cs.Int16ul: "H", cs.Int32ul: "I", cs.Int64ul: "Q", cs.Int32sl: "i",
    cs.Int64sl: "q",
}


def compiled(declaration: cs.Struct) -> struct.Struct:
    """The precompiled `struct.Struct` of a flat construct declaration (ints, int arrays,
    fixed bytes), for hot paths: same layout, far faster than parsing with construct."""
    fmt = "<"
    for sub in declaration.subcons:
        field = sub.subcon
        if isinstance(field, cs.Array):
            fmt += f"{field.count}{_CODES[field.subcon]}"
        elif isinstance(field, cs.Bytes):
            fmt += f"{field.length}s"
        else:
            fmt += _CODES[field]
    layout = struct.Struct(fmt)
    assert layout.size == declaration.sizeof(), f"{declaration} is not flat"
    return layout


LAYOUT: dict[str, struct.Struct] = {
    name: compiled(decl) for name, decl in (STRUCTS | PARTIAL_STRUCTS | EXTENSION_STRUCTS).items()
}


def core_reg(offset_words: int) -> int:
    """The ONE_REG id of a core register at offset_words 32-bit words into struct kvm_regs."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset_words


# x0..x30, then sp, pc, pstate (user_pt_regs: regs[31], sp, pc, pstate, each 8 bytes)
CORE_REGS: dict[str, int] = {f"x{n}": core_reg(2 * n) for n in range(31)} | {
    "sp": core_reg(62), "pc": core_reg(64), "pstate": core_reg(66),
}

# --- the explicit ioctl table --------------------------------------------------------------------


class FdKind(enum.Enum):
    SYSTEM = "system"
    VM = "vm"
    VCPU = "vcpu"


class Arg(enum.Enum):
    """How an ioctl uses its argument."""

    NONE = "none"  # must be 0
    INT = "int"  # an integer value
    STRUCT_IN = "in"  # pointer to a struct the kernel reads
    STRUCT_OUT = "out"  # pointer to a struct the kernel writes
    STRUCT_INOUT = "inout"  # pointer to a struct the kernel reads and writes back


@dataclass(frozen=True)
class IoctlSpec:
    name: str
    number: int
    fd: tuple[FdKind, ...]
    arg: Arg
    struct: str | None = None
    capability: int | None = None  # the capability that announces it, where there is one


IOCTLS: dict[int, IoctlSpec] = {
    spec.number: spec
    for spec in (
        IoctlSpec("KVM_GET_API_VERSION", KVM_GET_API_VERSION, (FdKind.SYSTEM,), Arg.NONE),
        IoctlSpec("KVM_CREATE_VM", KVM_CREATE_VM, (FdKind.SYSTEM,), Arg.INT),
        IoctlSpec("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, (FdKind.SYSTEM, FdKind.VM), Arg.INT),
        IoctlSpec("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, (FdKind.SYSTEM,), Arg.NONE),
        IoctlSpec("KVM_CREATE_VCPU", KVM_CREATE_VCPU, (FdKind.VM,), Arg.INT),
        IoctlSpec(
            "KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, (FdKind.VM,), Arg.STRUCT_IN, "kvm_dirty_log"
        ),
        IoctlSpec(
            "KVM_SET_USER_MEMORY_REGION",
            KVM_SET_USER_MEMORY_REGION,
            (FdKind.VM,),
            Arg.STRUCT_IN,
            "kvm_userspace_memory_region",
            KVM_CAP_USER_MEMORY,
        ),
        IoctlSpec("KVM_ENABLE_CAP", KVM_ENABLE_CAP, (FdKind.VM,), Arg.STRUCT_IN, "kvm_enable_cap"),
        IoctlSpec(
            "KVM_ARM_PREFERRED_TARGET",
            KVM_ARM_PREFERRED_TARGET,
            (FdKind.VM,),
            Arg.STRUCT_OUT,
            "kvm_vcpu_init",
        ),
        IoctlSpec(
            "KVM_ARM_MTE_COPY_TAGS",
            KVM_ARM_MTE_COPY_TAGS,
            (FdKind.VM,),
            Arg.STRUCT_IN,
            "kvm_arm_copy_mte_tags",
            KVM_CAP_ARM_MTE,
        ),
        IoctlSpec(
            "KVM_CLEAR_DIRTY_LOG",
            KVM_CLEAR_DIRTY_LOG,
            (FdKind.VM,),
            Arg.STRUCT_IN,
            "kvm_clear_dirty_log",
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ),
        IoctlSpec("KVM_RUN", KVM_RUN, (FdKind.VCPU,), Arg.NONE),
        IoctlSpec(
            "KVM_GET_ONE_REG",
            KVM_GET_ONE_REG,
            (FdKind.VCPU,),
            Arg.STRUCT_IN,
            "kvm_one_reg",
            KVM_CAP_ONE_REG,
        ),
        IoctlSpec(
            "KVM_SET_ONE_REG",
            KVM_SET_ONE_REG,
            (FdKind.VCPU,),
            Arg.STRUCT_IN,
            "kvm_one_reg",
            KVM_CAP_ONE_REG,
        ),
        IoctlSpec(
            "KVM_ARM_VCPU_INIT", KVM_ARM_VCPU_INIT, (FdKind.VCPU,), Arg.STRUCT_IN, "kvm_vcpu_init"
        ),
        IoctlSpec(
            "KVM_GET_REG_LIST", KVM_GET_REG_LIST, (FdKind.VCPU,), Arg.STRUCT_INOUT, "kvm_reg_list"
        ),
        IoctlSpec(
            "KVMTAG_GET_TAG_LOG", KVMTAG_GET_TAG_LOG, (FdKind.VM,), Arg.STRUCT_IN,
            "kvmtag_tag_log", KVMTAG_CAP_TAG_LOG,
        ),
    )
}

CAPABILITIES: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("KVM_CAP_", "KVMTAG_CAP_"))
}
