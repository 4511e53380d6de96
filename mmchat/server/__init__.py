"""The WebSocket service behind ``mmchat serve``.

* :mod:`.app`: :class:`ChatServer`, the socket and HTTP side (the only module that
  imports ``websockets`` server-side);
* :mod:`.connection`: one client's conversation, fed frames, with no socket;
* :mod:`.turns`: replies as tasks that persist their events for resume;
* :mod:`.auth`: tokens and session owners; :mod:`.metrics`: Prometheus metrics;
* :mod:`.worker`: one serving process until SIGTERM; :mod:`.workers`: the supervisor
  of ``mmchat serve --workers N`` (N such processes on one port).

The event protocol itself is :mod:`mmchat.protocol`.
"""

from .app import ChatServer

__all__ = ["ChatServer"]
