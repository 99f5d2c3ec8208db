"""The rule table of shared/KVM-SEMANTICS.md, run in process and through kvmtagd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .drivers import ClientDriver, InProcessDriver
from .rules import ALL_CASES, Case


def _kinds(case: Case) -> set[str]:
    kinds = {s.kind for s in case.vm.slots}
    kinds.add(getattr(case.op, "kind", "memfd"))
    return kinds


# Memory the client driver cannot have on this machine (a hugetlbfs mount, device memory):
# those rules run in process only, where the simulated process provides them.
CLIENT_CASES = [c for c in ALL_CASES if not _kinds(c) & ClientDriver.unsupported]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_rule_in_process(case: Case) -> None:
    case.run(InProcessDriver())


@pytest.fixture
def client_driver(kvmtagd: str, file_dir: str) -> Iterator[ClientDriver]:
    driver = ClientDriver(kvmtagd, file_dir)
    yield driver
    driver.finish()


@pytest.mark.parametrize("case", CLIENT_CASES, ids=lambda c: c.name)
def test_rule_through_kvmtagd(case: Case, client_driver: ClientDriver) -> None:
    case.run(client_driver)
