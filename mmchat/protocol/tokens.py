"""Access tokens: signed ``v1.<subject>.<expires_at>.<HMAC-SHA256>`` strings."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

from .events import ProtocolError

#: The longest token a ``hello`` may carry.
MAX_TOKEN_CHARS = 4096
_TOKEN_VERSION = "v1"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _signature(secret: bytes | str, payload: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return _b64url(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def make_token(secret: bytes | str, subject: str, expires_at: int) -> str:
    """A token ``v1.<subject>.<expires_at>.<HMAC-SHA256>`` (base64url, no padding) that
    :func:`verify_token` accepts until ``expires_at`` (Unix seconds)."""
    if len(secret) < 16:
        raise ValueError("the token secret must be at least 16 bytes")
    if not subject or len(subject) > 256:
        raise ValueError("the subject must be 1 to 256 characters")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at < 0:
        raise ValueError("expires_at must be a non-negative integer (Unix seconds)")
    payload = f"{_TOKEN_VERSION}.{_b64url(subject.encode('utf-8'))}.{expires_at}"
    return f"{payload}.{_signature(secret, payload)}"


def verify_token(secret: bytes | str, token: str, now: float) -> str:
    """Return the token's subject; :class:`ProtocolError` ``unauthorized`` (fatal) if the
    token is malformed, wrongly signed or expired at ``now`` (Unix seconds)."""

    def refuse(why: str) -> ProtocolError:
        return ProtocolError("unauthorized", f"token refused: {why}", "hello", fatal=True)

    if not isinstance(token, str) or not token.isascii() or len(token) > MAX_TOKEN_CHARS:
        raise refuse("malformed")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != _TOKEN_VERSION:
        raise refuse("malformed")
    _, subject_b64, expires, signature = parts
    if not (_B64URL.fullmatch(subject_b64) and expires.isdigit() and len(expires) < 16
            and _B64URL.fullmatch(signature)):
        raise refuse("malformed")
    expected = _signature(secret, f"{_TOKEN_VERSION}.{subject_b64}.{expires}")
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
        raise refuse("bad signature")
    if int(expires) <= now:
        raise refuse("expired")
    try:
        return base64.urlsafe_b64decode(subject_b64 + "=" * (-len(subject_b64) % 4)).decode()
    except (binascii.Error, ValueError):
        raise refuse("malformed") from None
