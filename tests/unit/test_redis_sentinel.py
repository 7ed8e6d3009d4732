"""tq+sentinel:// without a server: URL parsing, options, pools as built, kombu's failover off,
the production preset (tests/integration/test_redis_sentinel.py runs it against real sentinels)."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Connection
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection, SentinelManagedSSLConnection

from celery_tq import presets
from celery_tq.errors import ConfigurationError
from celery_tq.transport import register_transports, transport_for_url
from celery_tq.transport.redis_sentinel import SentinelChannel, SentinelTransport

OPTIONS = {"master_name": "mymaster"}


def channel_for(url: str, ssl: Any = False, **options: Any) -> SentinelChannel:
    """The channel kombu would build for ``url``, minus connecting (nothing listens here)."""
    register_transports()
    conn = Connection(url, transport_options={**OPTIONS, **options}, ssl=ssl)
    channel: SentinelChannel = SentinelChannel.__new__(SentinelChannel)
    channel.connection = conn.transport
    channel._tq_check_options(conn)
    for name in channel.from_transport_options:  # what kombu's Channel.__init__ does first
        if name in conn.transport_options:
            setattr(channel, name, conn.transport_options[name])
    return channel


def test_the_sentinel_scheme_selects_the_sentinel_transport() -> None:
    assert transport_for_url("sentinel://10.0.0.1:26379") is SentinelTransport
    register_transports()
    conn = Connection("tq+sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0", transport_options=OPTIONS)
    assert isinstance(conn.transport, SentinelTransport)
    assert conn.transport.driver_type == "redis"  # celery-tq inverts priorities as on Redis


@pytest.mark.parametrize(
    ("url", "nodes", "db"),
    [
        ("tq+sentinel://10.0.0.1", [("10.0.0.1", 26379)], 0),
        ("tq+sentinel://10.0.0.1:26380/4", [("10.0.0.1", 26380)], 4),
        # kombu's form: every entry a sentinel; the database given once (at the end) or by all
        ("tq+sentinel://h1:1;sentinel://h2:2;sentinel://h3:3/5", [("h1", 1), ("h2", 2), ("h3", 3)], 5),
        ("tq+sentinel://h1:1/5;sentinel://h2:2/5", [("h1", 1), ("h2", 2)], 5),
        ("tq+sentinel://h1/2;tq+sentinel://h2/2", [("h1", 26379), ("h2", 26379)], 2),
    ],
)
def test_every_entry_is_a_sentinel_and_the_path_the_database(url: str, nodes: list[Any], db: int) -> None:
    channel = channel_for(url)
    assert channel._tq_nodes == nodes
    params = channel._connparams()
    assert params["db"] == db
    assert "host" not in params and "port" not in params
    assert params["connection_class"] is SentinelManagedConnection
    assert issubclass(channel._connparams(asynchronous=True)["connection_class"], SentinelManagedConnection)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("tq+sentinel://h1/1;sentinel://h2/2", "several databases"),
        ("tq+sentinel://h1:26379;redis://h2:6379", "names a sentinel"),
    ],
)
def test_a_url_that_is_not_all_sentinels_of_one_database_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        channel_for(url)


def test_missing_master_name_is_refused_at_connect_with_the_fix() -> None:
    register_transports()
    with (
        Connection("tq+sentinel://127.0.0.1:1/0") as conn,
        pytest.raises(ConfigurationError, match=r'"master_name": "mymaster"'),
    ):
        conn.default_channel  # noqa: B018


def test_pool_follows_master_name_with_kombus_options() -> None:
    channel = channel_for(
        "tq+sentinel://:secret@h1:1;sentinel://h2:2/3",
        sentinel_kwargs={"password": "sentinel-secret"},
        min_other_sentinels=1,
    )
    pool = channel._tq_sentinel_pool()
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "secret"  # the URL's: for the Redis servers
    manager = pool.sentinel_manager
    assert manager.min_other_sentinels == 1
    sentinels = [s.connection_pool.connection_kwargs for s in manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("h1", 1), ("h2", 2)]
    assert all(s["password"] == "sentinel-secret" for s in sentinels)
    # the next sentinel, not seconds of retries, after a refused connection
    assert all(s.get_retry().get_retries() == 0 for s in manager.sentinels)
    channel._tq_drop_pool(pool)


def test_sentinels_get_the_socket_options_when_sentinel_kwargs_is_not_set() -> None:
    pool = channel_for("tq+sentinel://:secret@h1:1", socket_timeout=7)._tq_sentinel_pool()
    kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 7
    assert kwargs.get("password") is None  # the URL's password is the Redis servers' (as in kombu)
    assert pool.connection_kwargs["password"] == "secret"


def test_tls_to_the_servers_with_kombus_ssl_option() -> None:
    channel = channel_for(
        "tq+sentinel://h1:1/0", ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    )
    params = channel._connparams(asynchronous=True)
    assert issubclass(params["connection_class"], SentinelManagedSSLConnection)
    assert params["ssl_ca_certs"] == "/ca.pem"


def test_kombus_failover_between_entries_is_off() -> None:
    """kombu would switch to the next ';' entry after an error: 'sentinel://' = its own transport."""
    register_transports()
    conn = Connection("tq+sentinel://h1:1;sentinel://h2:2/0", transport_options=OPTIONS)
    assert isinstance(conn.transport, SentinelTransport)
    conn.maybe_switch_next()
    assert conn.transport_cls == "tq"
    assert conn.hostname == "sentinel://h1:1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sentinel://s1:26379;sentinel://s2:26379/0", "tq+sentinel://s1:26379;sentinel://s2:26379/0"),
        ("redis://r:6379/0", "tq+redis://r:6379/0"),
        ("amqp://guest@rabbit//", "amqp://guest@rabbit//"),
    ],
)
def test_production_preset_uses_the_reliable_transport_for_sentinel_too(
    url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TQ_BROKER_URL", url)
    assert presets.production()["broker_url"] == expected
