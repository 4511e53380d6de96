"""Who a connection is: access tokens (HMAC, see :func:`mmchat.protocol.verify_token`)
and the owner recorded on the sessions it creates."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from ..config import ServerConfig
from ..errors import ConfigError
from ..protocol import ProtocolError, verify_token
from ..subjects import ANONYMOUS_OWNER, owner_for

__all__ = ["ANONYMOUS_OWNER", "Auth", "owner_for"]


class Auth:
    """Checks ``hello`` tokens when the server has a secret; without one everybody is
    anonymous and tokens are ignored."""

    def __init__(self, secret: bytes | None) -> None:
        if secret is not None and len(secret) < 16:
            raise ConfigError("the token secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_config(cls, config: ServerConfig, env: Mapping[str, str] | None = None) -> Auth:
        """Read the secret from the variable ``server.auth_secret_env`` names; an unset
        or short secret fails start-up rather than serving without authentication."""
        name = config.auth_secret_env
        if not name:
            return cls(None)
        value = (os.environ if env is None else env).get(name)
        if not value:
            raise ConfigError(f"server.auth_secret_env names {name!r}, but that environment "
                              "variable is not set")
        if len(value.encode()) < 16:
            raise ConfigError(f"the secret in {name} must be at least 16 bytes")
        return cls(value.encode())

    @property
    def required(self) -> bool:
        return self._secret is not None

    @property
    def secret(self) -> bytes | None:
        return self._secret

    def subject(self, token: str | None, now: float | None = None) -> str | None:
        """The token's subject, ``None`` without authentication; a fatal
        ``unauthorized`` :class:`ProtocolError` for a missing or bad token."""
        if self._secret is None:
            return None
        if token is None:
            raise ProtocolError("unauthorized", "this server needs a token in hello",
                                "hello", fatal=True)
        return verify_token(self._secret, token, time.time() if now is None else now)
