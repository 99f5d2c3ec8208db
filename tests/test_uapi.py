"""uapi.py against the real kernel headers: every number, size and offset it declares.

A C program generated from uapi.py's own contents is compiled with the system `cc` against the
uapi headers and prints what they say; each value is compared with uapi.py's. Adding a constant
or a struct to uapi.py adds it to the check: nothing here lists them by hand, except the names the
uapi headers do not define (NOT_IN_UAPI_HEADERS).

The headers are linux-libc-dev-arm64-cross's: `-I/usr/aarch64-linux-gnu/include` comes first, so
linux/kvm.h and, above all, asm/kvm.h are arm64's (the host's x86 asm/kvm.h has no
kvm_vcpu_init or kvm_arm_copy_mte_tags). The program is still built for the host (x86_64): every
field of these structs is a __u32, a __u64 or a pointer, naturally aligned and the same width on
both LP64 ABIs, so the layouts agree.

What is compared, all in one pass so a failure lists every mismatch at once:
- every module-level int named KVMIO, KVM_* or _IOC_* with the header macro of that name;
- for every struct in uapi.STRUCTS: sizeof against construct's sizeof() and uapi.LAYOUT's size;
  each field's offset against the sum of the construct sizes before it (uapi declares packed
  structs, so C padding shows up as a wrong offset); each field's size, and an array's element
  size; a flexible array member's offset (FLEXIBLE_TAILS).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import construct as cs
import pytest

from kvmtag import uapi

ARM64_INCLUDE = Path("/usr/aarch64-linux-gnu/include")
# The headers the program really reads (`cc -H`): all of them from the arm64 cross tree.
REQUIRED_HEADERS = (ARM64_INCLUDE / "linux" / "kvm.h", ARM64_INCLUDE / "asm" / "kvm.h")
DEPS_HINT = (
    "run `make deps` (it installs gcc, libc6-dev, linux-libc-dev and linux-libc-dev-arm64-cross)"
)

# uapi.py names the uapi headers do not define, each with its reason and, where the kernel has
# one, the C expression it stands for, checked against the headers in its place (None: kvmtag's
# own, nothing to check it against). The headers must not define a name listed here: once they
# do, drop it from this table so the header's own value is checked.
NOT_IN_UAPI_HEADERS: dict[str, str | None] = {
    # Kernel-internal (include/linux/kvm_host.h): the flags KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    # reports, spelled with the two uapi flags it is made of.
    "KVM_DIRTY_LOG_MANUAL_CAPS": (
        "(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)"
    ),
    # Layout facts of struct kvm_run that have no macro of their own.
    "KVM_RUN_EXIT_OFFSET": "offsetof(struct kvm_run, mmio)",
    "KVM_RUN_SIZE": "sizeof(struct kvm_run)",
}

# uapi.PARTIAL_STRUCTS: declarations of a C struct's leading members or of a union member,
# name -> (C struct, member path prefix). Only offsets and sizes of declared members are checked.
PARTIAL_STRUCTS: dict[str, tuple[str, str]] = {
    "kvm_run": ("struct kvm_run", ""),
    "kvm_run_mmio": ("struct kvm_run", "mmio"),
    "kvm_run_system_event": ("struct kvm_run", "system_event"),
}

# Flexible array members after a struct's fixed part, which is all construct declares:
# struct name -> (member, element size).
FLEXIBLE_TAILS: dict[str, tuple[str, int]] = {
    "kvm_reg_list": ("reg", 8),  # __u64 reg[]: n register ids follow `n`
}

_IOC_SIZE_SHIFT, _IOC_SIZE_MASK = 16, (1 << 14) - 1  # asm-generic/ioctl.h
_IOC_TYPE_SHIFT, _IOC_TYPE_MASK = 8, 0xFF


@dataclass(frozen=True)
class Check:
    """One integer C expression and what uapi.py says it is.

    `python` None means the expression must be an undefined macro (see NOT_IN_UAPI_HEADERS).
    With a `guard` macro, the program prints the expression only where the macro is defined, and
    "undefined" elsewhere, so a missing name is one more mismatch rather than a compile error.
    """

    expr: str
    python: int | None
    source: str  # where the Python value comes from, for the failure message
    guard: str | None = None


# --- what uapi.py declares -----------------------------------------------------------------------


def uapi_constants() -> dict[str, int]:
    """Every module-level integer in uapi.py that is named after a kernel macro."""
    return {
        name: value
        for name, value in vars(uapi).items()
        if (name == "KVMIO" or name.startswith(("KVM_", "_IOC_")))
        and isinstance(value, int)
        and not isinstance(value, bool)
    }


def constant_checks(
    constants: Mapping[str, int], not_in_headers: Mapping[str, str | None] = NOT_IN_UAPI_HEADERS
) -> list[Check]:
    checks = []
    for name, value in constants.items():
        if name not in not_in_headers:
            checks.append(Check(name, value, f"uapi.{name}", guard=name))
            continue
        checks.append(Check(name, None, "NOT_IN_UAPI_HEADERS", guard=name))
        kernel_expr = not_in_headers[name]
        if kernel_expr is not None:
            checks.append(Check(kernel_expr, value, f"uapi.{name}"))
    return checks


def _element_size(field: cs.Construct) -> int | None:
    """The element size of an array field (construct Array, or Bytes for a __u8 array)."""
    if isinstance(field, cs.Array):
        return int(field.subcon.sizeof())
    if isinstance(field, cs.Bytes):
        return 1
    return None


def layout_checks(
    structs: Mapping[str, cs.Struct],
    layout: Mapping[str, struct.Struct],
    tails: Mapping[str, tuple[str, int]] = FLEXIBLE_TAILS,
) -> list[Check]:
    checks = []
    for name, declaration in structs.items():
        c_struct = f"struct {name}"
        checks.append(Check(f"sizeof({c_struct})", declaration.sizeof(), f"uapi.{name}.sizeof()"))
        checks.append(
            Check(f"sizeof({c_struct})", layout[name].size, f"uapi.LAYOUT[{name!r}].size")
        )
        offset = 0
        for sub in declaration.subcons:
            size = sub.sizeof()
            if sub.name is None:  # unnamed padding: no C member to compare with
                offset += size
                continue
            member = f"(({c_struct} *)0)->{sub.name}"
            element = _element_size(sub.subcon)
            designator = sub.name if element is None else f"{sub.name}[0]"
            where = f"uapi.{name}.{sub.name}"
            checks.append(
                Check(f"offsetof({c_struct}, {designator})", offset, f"{where}: sizes before it")
            )
            checks.append(Check(f"sizeof({member})", size, f"{where}.sizeof()"))
            if element is not None:
                checks.append(Check(f"sizeof({member}[0])", element, f"{where} element size"))
            offset += size
        if name in tails:
            tail, element = tails[name]
            checks.append(
                Check(f"offsetof({c_struct}, {tail})", offset, f"uapi.{name}.sizeof() (the tail)")
            )
            checks.append(Check(f"sizeof((({c_struct} *)0)->{tail}[0])", element, "FLEXIBLE_TAILS"))
    return checks


def partial_checks() -> list[Check]:
    checks = []
    for name, declaration in uapi.PARTIAL_STRUCTS.items():
        c_struct, path = PARTIAL_STRUCTS[name]
        base = f"offsetof({c_struct}, {path})" if path else "0"
        prefix = f"{path}." if path else ""
        offset = 0
        for sub in declaration.subcons:
            member = f"(({c_struct} *)0)->{prefix}{sub.name}"
            where = f"uapi.{name}.{sub.name}"
            checks.append(Check(
                f"(offsetof({c_struct}, {prefix}{sub.name}) - {base})", offset, where
            ))  # fmt: skip
            checks.append(Check(f"sizeof({member})", sub.sizeof(), f"{where}.sizeof()"))
            offset += sub.sizeof()
        assert uapi.LAYOUT[name].size == declaration.sizeof()
    return checks


def core_reg_checks() -> list[Check]:
    ids = "(KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({}))"
    fields = {f"x{n}": f"regs.regs[{n}]" for n in range(31)} | {
        "sp": "regs.sp", "pc": "regs.pc", "pstate": "regs.pstate",
    }  # fmt: skip
    return [Check(ids.format(fields[name]), value, f"uapi.CORE_REGS[{name!r}]")
            for name, value in uapi.CORE_REGS.items()]  # fmt: skip


def uapi_checks() -> list[Check]:
    return (
        constant_checks(uapi_constants()) + layout_checks(uapi.STRUCTS, uapi.LAYOUT)
        + partial_checks() + core_reg_checks()
    )  # fmt: skip


# --- what the headers say ------------------------------------------------------------------------


def c_program(checks: Sequence[Check]) -> str:
    """A C program printing `expr<TAB>value` (or `expr<TAB>undefined`) for every check."""
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "",
        "#ifndef KVM_ARM_VCPU_POWER_OFF",
        '#error "asm/kvm.h is not arm64\'s: /usr/aarch64-linux-gnu/include must come first"',
        "#endif",
        "",
        "static void show(const char *expr, unsigned long long value)",
        '{ printf("%s\\t%llu\\n", expr, value); }',
        "",
        "int main(void)",
        "{",
    ]
    exprs = {check.expr: check.guard for check in checks}  # ordered, without duplicates
    for expr, guard in exprs.items():
        assert not set(expr) & set('"\\\t\n'), f"cannot quote {expr!r} in C"
        show = f'    show("{expr}", (unsigned long long)({expr}));'
        if guard is None:
            lines.append(show)
        else:
            undefined = f'    printf("%s\\tundefined\\n", "{expr}");'
            lines += [f"#ifdef {guard}", show, "#else", undefined, "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _require_toolchain() -> str:
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail(f"no C compiler (`cc`) on PATH: {DEPS_HINT}", pytrace=False)
    missing = [str(path) for path in REQUIRED_HEADERS if not path.is_file()]
    if missing:
        pytest.fail(f"missing kernel headers {', '.join(missing)}: {DEPS_HINT}", pytrace=False)
    return cc


def read_headers(tmp_path: Path, checks: Sequence[Check]) -> dict[str, int | None]:
    """Compile and run c_program(checks); map each expression to its value (None: undefined)."""
    cc = _require_toolchain()
    source, binary = tmp_path / "uapi_check.c", tmp_path / "uapi_check"
    source.write_text(c_program(checks))
    command = [cc, "-std=gnu11", "-Wall", f"-I{ARM64_INCLUDE}", "-o", str(binary), str(source)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.fail(
            f"compiling against the kernel headers failed: {' '.join(command)}\n"
            f"(a missing header or compiler means: {DEPS_HINT}; an unknown struct or member "
            f"means uapi.py declares something the headers do not have)\n{built.stderr}",
            pytrace=False,
        )
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30, check=True)
    values: dict[str, int | None] = {}
    for line in ran.stdout.splitlines():
        expr, value = line.split("\t")
        values[expr] = None if value == "undefined" else int(value)
    return values


# --- the comparison ------------------------------------------------------------------------------


def _shown(value: int | None) -> str:
    return "undefined" if value is None else f"{value} ({value:#x})"


def mismatches(checks: Sequence[Check], header: Mapping[str, int | None]) -> list[str]:
    """One line per check whose Python value is not the header's: expression, both values."""
    out = []
    for check in checks:
        if check.expr not in header:
            out.append(f"{check.expr}: not printed by the C program ({check.source})")
        elif header[check.expr] != check.python:
            out.append(
                f"{check.expr}: header {_shown(header[check.expr])}, "
                f"python {_shown(check.python)} ({check.source})"
            )
    return out


def assert_no_mismatches(checks: Sequence[Check], header: Mapping[str, int | None]) -> None:
    found = mismatches(checks, header)
    if found:
        pytest.fail(
            f"uapi.py disagrees with the kernel headers ({len(found)} mismatches):\n  "
            + "\n  ".join(found),
            pytrace=False,
        )


# --- tests ---------------------------------------------------------------------------------------


def test_uapi_matches_the_kernel_headers(tmp_path: Path) -> None:
    checks = uapi_checks()
    # Not vacuous: every constant and every struct of uapi.py is among the checks.
    checked = {check.expr for check in checks}
    assert set(uapi_constants()) <= checked
    assert {"KVMIO", "KVM_API_VERSION", "KVM_ARM_MTE_COPY_TAGS", "KVM_CAP_ARM_MTE"} <= checked
    assert {f"sizeof(struct {name})" for name in uapi.STRUCTS} <= checked
    assert_no_mismatches(checks, read_headers(tmp_path, checks))


def test_spot_values_from_the_kernel_docs(tmp_path: Path) -> None:
    """Documentation/virt/kvm/api.rst, independent of both uapi.py and the comparison."""
    assert uapi.KVM_ARM_MTE_COPY_TAGS == 0x8030AEB4
    assert uapi.kvm_arm_copy_mte_tags.sizeof() == 48
    assert uapi.LAYOUT["kvm_arm_copy_mte_tags"].size == 48
    header = read_headers(tmp_path, uapi_checks())
    assert header["KVM_ARM_MTE_COPY_TAGS"] == 0x8030AEB4
    assert header["sizeof(struct kvm_arm_copy_mte_tags)"] == 48
    assert header["KVM_API_VERSION"] == 12
    assert header["KVMIO"] == 0xAE


def test_not_in_uapi_headers_lists_only_uapi_names() -> None:
    stale = set(NOT_IN_UAPI_HEADERS) - set(uapi_constants())
    assert not stale, f"NOT_IN_UAPI_HEADERS names what uapi.py no longer declares: {stale}"


def test_ioctl_table_agrees_with_the_constants() -> None:
    problems = []
    for number, spec in uapi.IOCTLS.items():
        if number != spec.number:
            problems.append(f"{spec.name}: keyed {number:#x}, number {spec.number:#x}")
        constant = getattr(uapi, spec.name, None)
        if constant != spec.number:
            problems.append(f"{spec.name}: number {spec.number:#x}, uapi.{spec.name} {constant}")
        # kvmtag's own ioctls use type 'k', which upstream KVM never does, and own structs.
        own = spec.name.startswith("KVMTAG_")
        ioc_type, structs = (0x6B, uapi.EXTENSION_STRUCTS) if own else (uapi.KVMIO, uapi.STRUCTS)
        if (number >> _IOC_TYPE_SHIFT) & _IOC_TYPE_MASK != ioc_type:
            problems.append(f"{spec.name}: {number:#x} is not of ioctl type {ioc_type:#x}")
        encoded_size = (number >> _IOC_SIZE_SHIFT) & _IOC_SIZE_MASK
        if spec.struct is None:
            if encoded_size != 0:
                problems.append(f"{spec.name}: no struct, yet the number encodes {encoded_size}")
        elif spec.struct not in structs:
            problems.append(f"{spec.name}: struct {spec.struct} is not declared")
        elif encoded_size != uapi.LAYOUT[spec.struct].size:
            problems.append(
                f"{spec.name}: number encodes size {encoded_size}, "
                f"struct {spec.struct} is {uapi.LAYOUT[spec.struct].size}"
            )
        if (spec.struct is None) != (spec.arg in (uapi.Arg.NONE, uapi.Arg.INT)):
            problems.append(f"{spec.name}: argument {spec.arg} with struct {spec.struct}")
        if spec.capability is not None and spec.capability not in uapi.CAPABILITIES.values():
            problems.append(f"{spec.name}: capability {spec.capability} is not declared")
    assert not set(uapi.CAPABILITIES.values()) & set(range(1024)) - {
        v for k, v in uapi.CAPABILITIES.items() if k.startswith("KVM_CAP_")
    }, "an extension capability must not be numbered where upstream ones are"
    assert not problems, "\n".join(problems)


# The check proven able to fail: wrong tables must produce exactly the expected mismatches.


def test_mismatches_lists_every_wrong_value() -> None:
    checks = [
        Check("KVM_A", 1, "uapi.KVM_A", guard="KVM_A"),
        Check("KVM_B", 2, "uapi.KVM_B", guard="KVM_B"),
        Check("KVM_C", 3, "uapi.KVM_C", guard="KVM_C"),
        Check("KVM_OWN", None, "NOT_IN_UAPI_HEADERS", guard="KVM_OWN"),
        Check("sizeof(struct s)", 8, "uapi.s.sizeof()"),
    ]
    header = {"KVM_A": 1, "KVM_B": 20, "KVM_C": None, "KVM_OWN": 4, "sizeof(struct s)": 8}
    assert mismatches(checks, header) == [
        "KVM_B: header 20 (0x14), python 2 (0x2) (uapi.KVM_B)",
        "KVM_C: header undefined, python 3 (0x3) (uapi.KVM_C)",
        "KVM_OWN: header 4 (0x4), python undefined (NOT_IN_UAPI_HEADERS)",
    ]
    assert mismatches(checks[:1], {}) == ["KVM_A: not printed by the C program (uapi.KVM_A)"]
    with pytest.raises(pytest.fail.Exception, match=r"2 mismatches"):
        assert_no_mismatches(checks[:3], header)


def test_wrong_declarations_fail_against_the_headers(tmp_path: Path) -> None:
    """The whole pipeline, C compiler included, on deliberately wrong declarations."""
    constants = {
        "KVM_API_VERSION": 12,  # right
        "KVM_ARM_MTE_COPY_TAGS": 0x4030AEB4,  # _IOW instead of the kernel's _IOR
        "KVM_NO_SUCH_MACRO": 1,  # not in the headers, not allowlisted
        "KVM_ARM_TAGS_FROM_GUEST": 1,  # allowlisted below, yet the headers define it
    }
    structs = {"kvm_one_reg": cs.Struct("id" / cs.Int32ul, "addr" / cs.Int64ul)}  # id is __u64
    layout = {"kvm_one_reg": struct.Struct("<IQ")}
    checks = constant_checks(constants, {"KVM_ARM_TAGS_FROM_GUEST": None}) + layout_checks(
        structs, layout, {}
    )
    found = mismatches(checks, read_headers(tmp_path, checks))
    assert {line.split(":")[0] for line in found} == {
        "KVM_ARM_MTE_COPY_TAGS",
        "KVM_NO_SUCH_MACRO",
        "KVM_ARM_TAGS_FROM_GUEST",
        "sizeof(struct kvm_one_reg)",  # twice: construct and LAYOUT
        "offsetof(struct kvm_one_reg, addr)",
        "sizeof(((struct kvm_one_reg *)0)->id)",
    }
    assert len(found) == 7
    assert (
        "KVM_ARM_MTE_COPY_TAGS: header 2150674100 (0x8030aeb4), "
        "python 1076932276 (0x4030aeb4) (uapi.KVM_ARM_MTE_COPY_TAGS)"
    ) in found
