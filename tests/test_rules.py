"""The rule table of shared/KVM-SEMANTICS.md, under every kernel profile and host page size:
in process, and through a real kvmtagd (one per configuration, shared by the session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmtag import PROFILES, HostConfig
from kvmtag.profiles import PAGE_SIZES

from .conftest import Daemons
from .drivers import ClientDriver, InProcessDriver
from .rules import ALL_CASES, PROFILE_ORDER, Case

assert set(PROFILE_ORDER) == set(PROFILES)
CONFIGS = [(profile, page) for profile in PROFILE_ORDER for page in PAGE_SIZES]


def _kinds(case: Case) -> set[str]:
    kinds = {s.kind for s in case.vm.slots}
    kinds.add(getattr(case.op, "kind", "anon"))
    return kinds


def _params(client: bool) -> list[object]:
    params = []
    for profile, page in CONFIGS:
        for case in ALL_CASES:
            if not case.applies(profile):
                continue  # e.g. shared memory in an MTE VM before 6.2: refused, tested as such
            if client and _kinds(case) & ClientDriver.unsupported:
                continue  # a hugetlbfs mount or device memory: in-process only
            params.append(pytest.param(profile, page, case, id=f"{profile}-{page}-{case.name}"))
    return params


@pytest.mark.parametrize(("profile", "page_size", "case"), _params(client=False))
def test_rule_in_process(profile: str, page_size: int, case: Case) -> None:
    case.run(InProcessDriver(HostConfig(page_size=page_size, profile=PROFILES[profile])))


@pytest.fixture
def client_driver(
    daemons: Daemons, file_dir: str, profile: str, page_size: int
) -> Iterator[ClientDriver]:
    driver = ClientDriver(daemons.socket(profile, page_size), file_dir)
    assert (driver.profile, driver.page_size) == (profile, page_size)  # from the handshake
    yield driver
    driver.finish()


@pytest.mark.parametrize(("profile", "page_size", "case"), _params(client=True))
def test_rule_through_kvmtagd(
    profile: str, page_size: int, case: Case, client_driver: ClientDriver
) -> None:
    case.run(client_driver)
