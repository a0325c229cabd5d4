from __future__ import annotations

import os
from collections.abc import Generator

import pytest

# A real etcd member for the tests of the cluster layer (fixture ``etcd``).
pytest_plugins = ["tests.unit.etcd_support"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Fixtures look at this to keep the logs of a failed test.
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (namespaces, bridges, taps)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
