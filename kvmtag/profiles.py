"""Kernel behaviour profiles and host settings: where kernels and hosts differ, in one place.

Each switch is a documented historical difference of arm64 KVM (shared/KVM-SEMANTICS.md,
"Kernel history"); the model asks the profile instead of hard-coding one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelProfile:
    name: str
    # 6.2: MTE memslots accept any VM_MTE_ALLOWED mapping (anonymous, shmem, incl. MAP_SHARED);
    # before, any MAP_SHARED mapping in an MTE memslot was EINVAL.
    mte_allowed_vma_rule: bool = True
    # 6.2: a faulting TO_GUEST clears the page's tags and marks it tagged; before, it left the
    # tags it had written and did not mark the page.
    copy_tags_fault_clears: bool = True
    # 6.4: KVM_ARM_MTE_COPY_TAGS with length > INT_MAX is EINVAL.
    copy_tags_int_max: bool = True
    # 6.12: TO_GUEST while any memslot logs dirty pages is EBUSY.
    copy_tags_busy_while_logging: bool = True
    # 6.13: hugetlbfs mappings are allowed in MTE memslots.
    mte_hugetlbfs: bool = True


PROFILES: dict[str, KernelProfile] = {
    p.name: p
    for p in (
        KernelProfile(
            "5.14",
            mte_allowed_vma_rule=False,
            copy_tags_fault_clears=False,
            copy_tags_int_max=False,
            copy_tags_busy_while_logging=False,
            mte_hugetlbfs=False,
        ),
        KernelProfile(
            "6.2", copy_tags_int_max=False, copy_tags_busy_while_logging=False, mte_hugetlbfs=False
        ),
        KernelProfile("6.4", copy_tags_busy_while_logging=False, mte_hugetlbfs=False),
        KernelProfile("6.12", mte_hugetlbfs=False),
        KernelProfile("latest"),
    )
}

PAGE_SIZES = (4096, 16384, 65536)


@dataclass(frozen=True)
class HostConfig:
    """The emulated host: page size, kernel profile and the arm64 limits KVM reports."""

    page_size: int = 4096
    profile: KernelProfile = PROFILES["latest"]
    ipa_limit: int = 48  # KVM_CAP_ARM_VM_IPA_SIZE
    max_vcpus: int = 512  # KVM_MAX_VCPUS on arm64 (GICv3)
    user_mem_slots: int = 32767  # KVM_USER_MEM_SLOTS on arm64 (SHRT_MAX)
    task_size_bits: int = 48  # user address space (VA_BITS); access_ok() limit

    def __post_init__(self) -> None:
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"page size must be one of {PAGE_SIZES}, not {self.page_size}")

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def tags_per_page(self) -> int:
        """PAGE_SIZE/16: one 4-bit tag per 16-byte granule (one byte each in the ioctl format)."""
        return self.page_size // 16

    @property
    def packed_per_page(self) -> int:
        """PAGE_SIZE/32: two tags per byte in packed storage."""
        return self.page_size // 32

    @property
    def vcpu_mmap_size(self) -> int:
        return 2 * self.page_size  # the kvm_run page plus the coalesced-MMIO ring page
