"""Kernel profiles and host page sizes: chosen at start, reported, refused when unknown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmtag import PROFILES, HostConfig
from kvmtag.profiles import PAGE_SIZES

from .rules import PROFILE_ORDER


def kvmtagd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmtag", *args], capture_output=True, text=True, timeout=60
    )


def test_profiles_in_history_order() -> None:
    assert list(PROFILES) == list(PROFILE_ORDER)
    # Each step of history switches on exactly what KVM-SEMANTICS.md says it did.
    switches = ["mte_allowed_vma_rule", "copy_tags_fault_clears", "copy_tags_int_max",
                "copy_tags_busy_while_logging", "mte_hugetlbfs"]  # fmt: skip
    on = {name: [getattr(p, s) for s in switches] for name, p in PROFILES.items()}
    assert on == {
        "5.14": [False, False, False, False, False],
        "6.2": [True, True, False, False, False],
        "6.4": [True, True, True, False, False],
        "6.12": [True, True, True, True, False],
        "latest": [True, True, True, True, True],
    }


def test_unknown_profile_is_refused_with_the_list() -> None:
    done = kvmtagd("--kernel", "5.10", "--print-capabilities")
    assert done.returncode != 0
    for name in PROFILES:
        assert name in done.stderr


@pytest.mark.parametrize("size", ["8192", "4095", "x"])
def test_unknown_page_size_is_refused(size: str) -> None:
    done = kvmtagd("--page-size", size, "--print-capabilities")
    assert done.returncode != 0 and "--page-size" in done.stderr


def test_bad_page_size_in_the_model() -> None:
    with pytest.raises(ValueError, match="page size"):
        HostConfig(page_size=8192)


@pytest.mark.parametrize("profile", PROFILE_ORDER)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_capabilities_report_the_configuration(profile: str, page: int) -> None:
    done = kvmtagd("--kernel", profile, "--page-size", str(page), "--print-capabilities")
    assert done.returncode == 0, done.stderr
    caps = json.loads(done.stdout)
    assert caps["kernel-profile"] == profile and caps["page-size"] == page
    assert caps["kernel-profiles"] == list(PROFILES)


@pytest.mark.parametrize("page", PAGE_SIZES)
def test_sizes_follow_the_page_size(page: int) -> None:
    config = HostConfig(page_size=page)
    assert (config.tags_per_page, config.packed_per_page) == (page // 16, page // 32)
    assert config.vcpu_mmap_size == 2 * page
