"""Sessions in Redis, so any number of server processes can share them.

This package is the only part of mmchat that imports ``redis``: :mod:`.url` parses
``sessions.url``, :mod:`.client` connects, :mod:`.store` is the store, :mod:`.lock` the
fair turn lock, :mod:`.turn` a held turn, :mod:`.appends` the batched stream appends,
:mod:`.owners` the index of each subject's sessions, and ``scripts/*.lua`` the Lua
scripts (read once, run by SHA1: :mod:`.lua`).

URL forms (``sessions.url``):

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) and
  ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: one server, through a bounded
  blocking pool: a call waits up to ``pool_timeout`` for a free connection, then fails.
* ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (or
  ``rediss+cluster://``): Redis Cluster, the hosts being startup nodes. Each node gets
  up to ``max_connections`` connections.
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
  (or ``rediss+sentinel://``): the master that the Sentinels (default port 26379) name
  for ``service_name``. The password is the master's; add ``?sentinel_password=...`` if
  the Sentinels want one too. The pool follows failovers and holds up to
  ``max_connections``; a call beyond that fails at once instead of waiting.

Keys of one session share the hash tag ``{<session_id>}``, so in a cluster they live in
one slot and one node serves a whole turn:

==================================  ======  ====================================
``{prefix}:s:{<id>}:state``         string  serialised RNN state (raw bytes)
``{prefix}:s:{<id>}:memory``        list    memory-bank entries (raw bytes)
``{prefix}:s:{<id>}:history``       list    turns, one JSON document each
``{prefix}:s:{<id>}:meta``          hash    ``owner``, ``fence`` (the fencing token),
                                            the parts the session has (see below)
``{prefix}:s:{<id>}:stream``        stream  reply events for resume, id ``<seq>-0``
``{prefix}:s:{<id>}:msgids``        set     client message ids already taken
``{prefix}:s:{<id>}:msgids_old``    set     the generation of ids before (own TTL)
``{prefix}:s:{<id>}:lock``          string  the turn lock's token (own lease)
``{prefix}:s:{<id>}:cancel``        set     cancels asked for (own TTL, see below)
``{prefix}:s:{<id>}:queue``         list    tokens of the turns waiting for the lock
``{prefix}:s:{<id>}:waiters``       zset    until when each waiter's place is kept
``{prefix}:s:{<id>}:wake:<token>``  list    pushed to wake that waiter
``{prefix}:o:{<hash>}:sessions``    set     ids of the sessions an owner claimed
                                            (subjects only; see :mod:`.owners`)
``{prefix}:alias:<alias>``          string  a session id, by a caller's key (the
                                            OpenAI endpoint's conversation hashes)
==================================  ======  ====================================

A session is whole or it is gone (``scripts/whole.lua``): ``meta`` has a flag for each
part the session has (``s`` state, ``y`` history, ``m`` memory, ``q`` stream, ``i``
message ids), set by the write that makes the part. The scripts behind a hello that
resumes (:meth:`RedisStore.head`), a turn's begin and its end check them; a session
missing a part (evicted under ``maxmemory``, or a restart between writes), or parts
without their ``meta``, is deleted and refused (:class:`mmchat.errors.SessionLost`), so
it is never served with parts missing and its seqs never restart under its id. The
history keeps the newest ``history_max_len`` entries and the message ids at least the
newest ``message_ids_max_len`` (``scripts/claims.lua``), so a session's size is bounded
by its settings.

A multi-command call is one ``MULTI``/``EXEC`` round trip (on Cluster one plain
pipeline to the session's node, see :meth:`RedisStore._pipeline`). A turn
(:meth:`RedisStore.begin_turn`) is two: one Lua script checks the owner, claims the
message id, takes the lock (or queues for it) and reads state, memory and the stream's
tail; one script saves the turn, appends the reply's last events and releases the lock.
In between, the turns whose reply events come out of one decode step append them in one
shared pipeline (:class:`.appends.Appends`), so streaming costs one round trip per step,
not one per reply and step; the begin and end scripts of turns that start or finish
together share one pipeline the same way (:class:`.appends.Scripts`).

The lock is fair (:mod:`.lock`): turns of a session run in the order they asked for it,
whichever process they are in. Each grant adds 1 to the session's fencing token, and
every write of a turn (its appends, its end) checks it in the same script: a turn that
stalled past its lease while another took the session is refused whole
(:class:`mmchat.errors.TurnLost`), so it can never overwrite newer state.

A cancel (:meth:`RedisStore.request_cancel`) may reach a node other than the one
generating the reply. It is recorded in the ``cancel`` set as ``m:<message id>``, or
``l:<lock token>`` for "the reply running now" (nothing if no turn holds the session),
for ``cancel_ttl`` seconds. Every batch of reply events a turn appends asks, in the same
pipeline, whether its message id or its lock token is there (``SMISMEMBER``), and so
does the script that begins a turn; ending the turn removes both. Ids of messages are
never reused in a session and tokens are random, so a cancel that comes too late
matches no other reply.

Every key but the lock, the queue and the cancel set has a sliding TTL of ``ttl_seconds``, renewed
by :meth:`load`, :meth:`save_turn`, :meth:`claim_session` and a turn's begin and end
(and by stream appends and message claims for their own key). Nothing is pickled. A
failed call is not retried (Cluster excepted: redis-py's retries follow slot moves
there), so a turn is never written twice; it raises :class:`StoreUnavailable` and the
pool reconnects on the next call. A pooled connection that sat idle for
``health_check_interval`` seconds is first checked with a ``PING``; if that finds it
closed (Redis restarted meanwhile), it reconnects before the command is sent, so a
restart does not fail one call per stale connection.
"""

from __future__ import annotations

from .client import reconnecting
from .lock import RedisLock
from .store import UNAVAILABLE_ERRORS, RedisStore
from .turn import RedisTurn
from .url import RedisURL, parse_redis_url

__all__ = ["UNAVAILABLE_ERRORS", "RedisLock", "RedisStore", "RedisTurn", "RedisURL",
           "parse_redis_url", "reconnecting"]
