"""Connecting to Redis: the client for a parsed URL, with bounded pools and
connections that reconnect when a health check finds them closed."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .url import RedisURL

log = logging.getLogger(__name__)


@functools.cache
def reconnecting(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` whose health check (a ``PING`` after ``health_check_interval`` idle seconds)
    reconnects once when it finds the connection closed, instead of failing the call.

    Nothing of the caller's command has been sent at that point, so this never repeats a
    write; a timeout is not retried (Redis may be hung, and waiting twice helps nobody).

    Its commands are packed by hiredis's C packer when it is there, as redis-py's sync
    connections do (its asyncio ones pack in Python: a script call with a group of
    stream entries took 3-4x longer to pack).
    """

    class Reconnecting(cls):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            packer = _packer()
            encoder = self.encoder
            if (packer is None or encoder.encoding.lower() not in ("utf-8", "utf8")
                    or encoder.encoding_errors != "strict"):
                return super().pack_command(*args)
            return packer.pack(*args)

        async def check_health(self) -> None:
            if (not self.health_check_interval
                    or asyncio.get_running_loop().time() <= self.next_health_check):
                return
            try:
                await self._send_ping()
            except (redis.exceptions.TimeoutError, TimeoutError):
                await self.disconnect()
                raise
            except (redis.exceptions.ConnectionError, OSError):
                log.info("reconnecting a stale Redis connection")
                await self.disconnect()
                # a fresh connection needs no check (and connecting must not recurse here)
                loop = asyncio.get_running_loop()
                self.next_health_check = loop.time() + self.health_check_interval
                await self.connect()

    Reconnecting.__name__ = Reconnecting.__qualname__ = f"Reconnecting{cls.__name__}"
    return Reconnecting


@functools.cache
def _packer() -> Any:
    """redis-py's hiredis command packer, or ``None`` without hiredis."""
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return None
    from redis.connection import HiredisRespSerializer

    return HiredisRespSerializer()


def connect(url: RedisURL, *, max_connections: int, pool_timeout: float,
            socket_timeout: float, connect_timeout: float,
            health_check_interval: float) -> tuple[Any, Any]:
    """The client for ``url``, and its ``Sentinel`` (``None`` unless a Sentinel URL).

    One server: a bounded blocking pool (a call waits up to ``pool_timeout`` for a free
    connection, then fails). Cluster: up to ``max_connections`` per node, with redis-py's
    own retries (they follow moved slots and failovers). Sentinel: the master's pool
    follows failovers and holds up to ``max_connections``; a call beyond fails at once.
    """
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    checked = {"health_check_interval": health_check_interval}
    if url.kind == "single":
        pool = BlockingConnectionPool.from_url(
            url.url, max_connections=max_connections, timeout=pool_timeout,
            retry=Retry(NoBackoff(), 0), **timeouts, **checked)
        pool.connection_class = reconnecting(pool.connection_class)
        return Redis.from_pool(pool), None
    auth = {"username": url.username, "password": url.password, "ssl": url.ssl}
    if url.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url.hosts],
                            max_connections=max_connections, **auth, **timeouts), None
    from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

    sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), 0)}
    if url.sentinel_password:
        sentinel_kwargs["password"] = url.sentinel_password
    sentinel = Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs,
                        retry=Retry(NoBackoff(), 0), **timeouts)
    client = sentinel.master_for(
        url.service, db=url.db, max_connections=max_connections, **auth, **checked,
        connection_class=reconnecting(SentinelManagedConnection))
    return client, sentinel
