"""``tq+sentinel://``: the reliable Redis transport (:mod:`celery_tq.transport.redis`) on the
primary that Redis Sentinel names, with kombu's ``sentinel://`` URL and options::

    broker_url = "tq+sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379/0"
    broker_transport_options = {"master_name": "mymaster", "sentinel_kwargs": {"password": "s3cret"}}

Each ``;``-separated entry names a sentinel (``sentinel://`` or ``tq+sentinel://``, port 26379 by
default); the database is the path the entries give (``/0`` if none), user and password (of the
Redis servers) those of the first entry. ``sentinel_kwargs`` (connection options of the sentinels
themselves; by default the socket options) and ``min_other_sentinels`` go to
:class:`redis.sentinel.Sentinel`; TLS to the servers is kombu's ``ssl`` option (``broker_use_ssl``).

Every connection is made by :meth:`redis.sentinel.Sentinel.master_for`'s pool, which asks the
sentinels for the current primary; a ``READONLY`` reply (a primary demoted to replica) drops the
connection as a connection error, so the worker reconnects to the new primary, where the scripts
are loaded again on the first ``NOSCRIPT``. kombu's failover between ``;`` alternates is turned
off: the entries are the sentinels of one primary, asked in turn by redis-py. As with kombu's
``sentinel://``, what the old primary accepted after the replica's last sync or until Sentinel
demoted it (``SENTINEL FAILOVER`` does not stop it first) is lost: acks (those tasks run again)
and messages published there.

Members of kombu's ``kombu.transport.redis.Channel`` used here (kombu 5.7.0, checked by
``tests/unit/test_seam.py``): ``_connparams`` and ``_get_pool`` (overridden),
``_prepare_virtual_host`` (called).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from celery_tq.celery_seam import kombu_parse_url
from celery_tq.errors import ConfigurationError
from celery_tq.transport import redis as tq_redis

__all__ = ["SentinelChannel", "SentinelTransport", "Transport"]

DEFAULT_PORT = 26379
_SCHEMES = ("sentinel", "tq+sentinel")


class SentinelChannel(tq_redis.Channel):
    """:class:`celery_tq.transport.redis.Channel` whose pools follow the Sentinel-named primary."""

    master_name = ""
    min_other_sentinels = 0
    sentinel_kwargs: dict[str, Any] | None = None
    keyprefix_fanout: str
    connection_class = SentinelManagedConnection
    connection_class_ssl = SentinelManagedSSLConnection

    from_transport_options = (
        *tq_redis.Channel.from_transport_options,
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
    )

    def _tq_check_options(self, conninfo: Any) -> None:
        if not conninfo.transport_options.get("master_name"):
            raise ConfigurationError(
                "tq+sentinel:// needs the name of the primary the sentinels monitor: set "
                'broker_transport_options = {"master_name": "mymaster"} (the <name> of the '
                "sentinels' 'sentinel monitor <name> <host> <port> <quorum>' line)"
            )
        urls = [kombu_parse_url(url) for url in (conninfo.alt or [conninfo.hostname])]
        for url in urls:
            if url.scheme not in _SCHEMES:
                raise ConfigurationError(
                    f"every ';'-separated entry of a tq+sentinel:// URL names a sentinel "
                    f"(sentinel://host:26379), not a {url.scheme}:// server"
                )
        dbs = {url.path for url in urls if url.path}
        if len(dbs) > 1:
            raise ConfigurationError(f"the tq+sentinel:// URL names several databases: {sorted(dbs)}")
        self._tq_db = dbs.pop() if dbs else None
        self._tq_nodes = [(url.hostname or "127.0.0.1", url.port or DEFAULT_PORT) for url in urls]

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous=asynchronous)
        del params["host"], params["port"]  # the sentinels name the server
        if self._tq_db is not None:
            params["db"] = self._prepare_virtual_host(self._tq_db)
        return params

    def _tq_sentinel_pool(self, asynchronous: bool = False) -> Any:
        """A :class:`redis.sentinel.SentinelConnectionPool` on a :class:`Sentinel` of its own."""
        params = self._connparams(asynchronous=asynchronous)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        options = self.sentinel_kwargs
        if options is None:  # redis-py's default
            options = {k: v for k, v in params.items() if k.startswith("socket_")}
        # Ask each sentinel once: the next one is the retry (redis-py retries a refused
        # connection for seconds, at each new connection while the first sentinel is down).
        options = {"retry": Retry(NoBackoff(), 0), **options}
        sentinel = Sentinel(
            self._tq_nodes, min_other_sentinels=self.min_other_sentinels, sentinel_kwargs=options, **params
        )
        return sentinel.master_for(self.master_name, redis.Redis).connection_pool

    def _get_pool(self, asynchronous: bool = False) -> Any:
        pool = self._tq_sentinel_pool(asynchronous)
        # kombu's _disconnect_pools closes the connections to the sentinels through these.
        if asynchronous:
            self._async_sentinel_manager = pool.sentinel_manager
        else:
            self._sentinel_manager = pool.sentinel_manager
        return pool

    def _tq_server(self) -> str:
        host, port = self.pool.get_master_address()
        return f"{host}:{port}"

    def _tq_new_pool(self) -> Any:
        return self._tq_sentinel_pool()

    def _tq_drop_pool(self, pool: Any) -> None:
        pool.disconnect()
        for client in pool.sentinel_manager.sentinels:
            client.close()


class SentinelTransport(tq_redis.Transport):
    """``tq+sentinel://``: :class:`SentinelChannel`, sentinels on port 26379 by default."""

    Channel = SentinelChannel
    default_port = DEFAULT_PORT

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        # kombu would switch the connection to the next ';' entry after an error: to a bare
        # 'sentinel://' one, i.e. to kombu's own transport. The entries are not alternatives.
        client.cycle = None


Transport = SentinelTransport
