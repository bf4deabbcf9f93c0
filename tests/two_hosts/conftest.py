"""The ``two_hosts`` fixture: two network-namespace hosts, removed after the test whatever happens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lightning_grendel._two_hosts import TwoHosts, unavailable_reason


@pytest.fixture(scope="session")
def two_hosts_reason() -> str | None:
    return unavailable_reason()


@pytest.fixture
def two_hosts(two_hosts_reason: str | None, request: pytest.FixtureRequest) -> Iterator[TwoHosts]:
    """A fresh pair of hosts per test; skips with the reason when namespaces cannot be made here."""
    if two_hosts_reason is not None:
        pytest.skip(f"two hosts need network namespaces: {two_hosts_reason}")
    hosts = TwoHosts()
    request.addfinalizer(hosts.close)  # runs after a failure or a pytest-timeout too
    yield hosts
