"""The rule table of shared/KVM-SEMANTICS.md, run through each driver."""

from __future__ import annotations

import pytest

from .drivers import InProcessDriver
from .rules import ALL_CASES, Case


@pytest.fixture(params=["in-process"])
def driver(request: pytest.FixtureRequest) -> InProcessDriver:
    return InProcessDriver()


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_rule(case: Case, driver: InProcessDriver) -> None:
    case.run(driver)
