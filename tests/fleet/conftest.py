"""Fleet tests need root (network namespaces) and the shared servers; see tests/fleet/netns.py."""

from __future__ import annotations

import pytest

from tests.conftest import service_missing
from tests.fleet import netns


@pytest.fixture(scope="session")
def fleet_capable(redis_host: str, rabbitmq_vhost: str) -> None:
    """Skips (fails under TQ_REQUIRE_SERVICES=1) where no fleet of namespaces can be built."""
    why = netns.can_run()
    if why is not None:
        service_missing("A fleet of network namespaces", why)
