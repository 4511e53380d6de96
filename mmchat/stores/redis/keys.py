"""The Redis keys of one session (see the package docstring for what each holds)."""

from __future__ import annotations

from dataclasses import dataclass

from ...sessions import validate_session_id
from ...subjects import subject_digest

_NAMES = ("state", "memory", "history", "meta", "stream", "msgids", "lock", "cancel",
          "queue", "waiters", "msgids_old")


@dataclass(frozen=True)
class Keys:
    state: str
    memory: str
    history: str
    meta: str
    stream: str
    msgids: str
    lock: str
    cancel: str
    queue: str
    waiters: str
    #: The generation of message ids before ``msgids`` (see ``scripts/claims.lua``).
    msgids_old: str

    @classmethod
    def of(cls, prefix: str, session_id: str) -> Keys:
        """The keys of ``session_id``, all with its hash tag (one Cluster slot)."""
        base = f"{prefix}:s:{{{validate_session_id(session_id)}}}"
        return cls(*(f"{base}:{name}" for name in _NAMES))

    @property
    def data(self) -> tuple[str, ...]:
        """Every key with the session's sliding TTL (not the lock, cancels or queue)."""
        return (self.state, self.memory, self.history, self.meta, self.stream, self.msgids)

    @property
    def wake_prefix(self) -> str:
        """Waiter ``<token>`` sleeps on the list ``wake_prefix + token``."""
        return self.lock.removesuffix("lock") + "wake:"

    @property
    def fair_lock(self) -> list[str]:
        """The keys of the lock's release and leave scripts."""
        return [self.lock, self.queue, self.waiters]


def owner_index(prefix: str, owner: str) -> str:
    """The set of the sessions ``owner`` claimed: ``{prefix}:o:{<hash>}:sessions``, the
    hash the first 32 hex digits of the owner's SHA-256 (UTF-8), so any owner (a
    subject like ``José`` or ``a@b.com``) makes a safe key of one Cluster slot."""
    return f"{prefix}:o:{{{subject_digest(owner)}}}:sessions"
