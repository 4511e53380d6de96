"""Subjects: who sessions belong to, and what can be done with all of a subject's sessions
at once (list them, export their transcripts, erase every trace of them).

A *subject* is the user an access token names (the ``sub`` of
:func:`mmchat.protocol.make_token`), or any id an embedding application gives
(``engine.reply(..., subject="a@b.com")``). A session belongs to the subject that claimed
it first; the store records it as its owner ``"sub:<subject>"`` (:func:`owner_for`), the
owner the server records for an authenticated connection, so the API, the CLI and the
admin endpoint see the same sessions whichever way they were made. Sessions of
unauthenticated connections are owned by :data:`ANONYMOUS_OWNER`, which no subject
matches, and are not indexed.

The functions here work on any :class:`~mmchat.sessions.SessionStore` and load no model:
:class:`mmchat.Engine`, ``mmchat sessions`` and the admin endpoint all call them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sessions import SessionStore

__all__ = ["ANONYMOUS_OWNER", "MAX_SUBJECT_CHARS", "Erased", "erase_subject",
           "export_lines", "export_records", "owner_for", "subject_of", "subject_sessions",
           "validate_subject"]

log = logging.getLogger(__name__)

#: Owner of sessions opened without authentication. Subjects' owners are
#: ``"sub:<subject>"``, so no subject can ever match it.
ANONYMOUS_OWNER = "anonymous"
#: The longest subject id, in characters (as for tokens).
MAX_SUBJECT_CHARS = 256
_SUBJECT_OWNER = "sub:"


def validate_subject(subject: str) -> str:
    """Return ``subject`` or raise :class:`ValueError`: 1 to :data:`MAX_SUBJECT_CHARS`
    characters of any Unicode text that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
        raise ValueError(f"bad subject {subject!r}: use 1 to {MAX_SUBJECT_CHARS} characters")
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"bad subject {subject!r}: not valid UTF-8 text") from None
    return subject


def owner_for(subject: str | None) -> str:
    """The owner a session of ``subject`` (``None``: anonymous) is claimed with."""
    return ANONYMOUS_OWNER if subject is None else _SUBJECT_OWNER + subject


def subject_of(owner: str | None) -> str | None:
    """The subject an owner stands for; ``None`` for none, anonymous or another kind."""
    if owner is None or not owner.startswith(_SUBJECT_OWNER):
        return None
    return owner[len(_SUBJECT_OWNER):]


def subject_digest(owner: str) -> str:
    """32 hex digits of the owner's SHA-256: how keys and logs name a subject."""
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]


def indexed(owner: str) -> bool:
    """Whether a store keeps ``owner``'s sessions in a per-subject index (subjects only:
    the anonymous owner's sessions are never listed or erased together)."""
    return owner.startswith(_SUBJECT_OWNER)


@dataclass(frozen=True)
class Erased:
    """What erasing took away: sessions, and in them history entries (messages),
    memory-bank entries, reply-stream events and remembered client message ids."""

    sessions: int = 0
    messages: int = 0
    memory: int = 0
    stream_events: int = 0
    message_ids: int = 0

    def __add__(self, other: Erased) -> Erased:
        return Erased(*(a + b for a, b in zip(self.as_dict().values(),
                                              other.as_dict().values(), strict=True)))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def subject_sessions(store: SessionStore, subject: str) -> list[str]:
    """Ids of ``subject``'s live sessions, sorted."""
    return await store.owned_sessions(owner_for(validate_subject(subject)))


async def erase_subject(store: SessionStore, subject: str) -> Erased:
    """Erase every session of ``subject`` (waiting for a turn that holds one) and the
    subject's index; what was erased. Erasing again erases nothing more. Logged at
    INFO with the subject's digest (the one Redis keys carry), not the subject."""
    owner = owner_for(validate_subject(subject))
    erased = await store.erase_owned(owner)
    log.info("erased subject %s: %s", subject_digest(owner), erased.as_dict())
    return erased


async def export_records(store: SessionStore, session_id: str | None = None, *,
                         subject: str | None = None) -> list[dict[str, Any]]:
    """The transcript of one session, or of all of ``subject``'s sessions (sorted by
    id): one record per message, each its history entry with ``session`` and
    ``subject`` (``None`` for a session without one) first. Exactly one of
    ``session_id`` and ``subject`` must be given."""
    if (session_id is None) == (subject is None):
        raise ValueError("export one session or one subject's sessions: give exactly one")
    ids = [session_id] if session_id is not None else await subject_sessions(store, subject or "")
    records: list[dict[str, Any]] = []
    for sid in ids:
        data = await store.load(sid)
        if data is None:
            continue
        owner = subject_of(data.owner)
        if subject is not None and owner != subject:
            continue  # claimed by another subject since it was listed
        records += [{"session": sid, "subject": owner, **turn} for turn in data.history]
    return records


def export_lines(records: Iterable[Mapping[str, Any]]) -> str:
    """Records as JSON Lines: one compact JSON object per line (UTF-8, not escaped)."""
    return "".join(json.dumps(dict(r), ensure_ascii=False, separators=(",", ":")) + "\n"
                   for r in records)
