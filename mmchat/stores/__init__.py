"""Session store back-ends. :func:`open_store` picks one from ``[sessions]``.

``memory`` (the default) keeps sessions in this process; ``redis`` shares them between
processes. The Redis back-end, and with it the ``redis`` package, is imported only
when configured.
"""

from __future__ import annotations

from ..config import SessionsConfig
from ..errors import ConfigError
from ..sessions import SessionStore
from .memory import MemoryStore

__all__ = ["MemoryStore", "open_store"]


def open_store(config: SessionsConfig) -> SessionStore:
    """Build the store that ``config.backend`` names. Nothing connects until first use;
    call ``await store.ping()`` to fail fast at start-up."""
    if config.backend == "memory":
        optional = {name: getattr(config, setting) for name, setting in (
            ("lock_timeout", "lock_wait_seconds"),
            ("stream_max_len", "stream_max_len"),
            ("max_sessions", "max_sessions"),
            ("history_max_len", "history_max_len"),
            ("message_ids_max_len", "message_ids_max_len"),
        ) if hasattr(config, setting)}
        return MemoryStore(ttl_seconds=config.ttl_seconds, **optional)
    if config.backend == "redis":
        from .redis import RedisStore

        return RedisStore.from_config(config)
    raise ConfigError(
        f"sessions.backend = {config.backend!r} is not allowed: choose 'memory' or 'redis'")
