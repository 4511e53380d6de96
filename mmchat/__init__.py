"""mmchat: a plugin-based multimodal chatbot backend.

Every public name is importable from here. The ones that pull in more modules
(the engine, the stores, the config) load on first use, so ``mmchat --help`` stays fast;
the ``TYPE_CHECKING`` block gives type checkers their real types.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .budget import DecodeAllowance
from .errors import (
    Cancelled,
    CheckpointError,
    ConfigError,
    CorruptMedia,
    DatasetError,
    DuplicateMessage,
    EmptyMessage,
    EngineClosed,
    InputError,
    MediaBusy,
    MediaTooLarge,
    MessageTooLong,
    MMChatError,
    PluginError,
    ReplyTimeout,
    SessionBusy,
    SessionExpired,
    SessionForbidden,
    StateError,
    StoreUnavailable,
    UnsupportedMedia,
)
from .hookspecs import hookimpl
from .modality import Attachment, Modality
from .settings import GenerationSettings
from .subjects import Erased

if TYPE_CHECKING:
    from .config import Config
    from .engine import Engine
    from .paths import bundled_model_path
    from .plugins import PluginHost
    from .replies import Delta, Reply, ReplyStream
    from .sessions import SessionStore, SessionTurn
    from .stores.memory import MemoryStore
    from .stores.redis import RedisStore
    from .sync import SyncEngine, SyncReplyStream

__version__ = "0.1.0"

#: Names loaded on first use, and the module each comes from.
_LAZY = {
    "Config": ".config",
    "Engine": ".engine",
    "bundled_model_path": ".paths",
    "PluginHost": ".plugins",
    "Delta": ".replies",
    "Reply": ".replies",
    "ReplyStream": ".replies",
    "MemoryStore": ".stores.memory",
    "SessionStore": ".sessions",
    "SessionTurn": ".sessions",
    "RedisStore": ".stores.redis",
    "SyncEngine": ".sync",
    "SyncReplyStream": ".sync",
}

__all__ = [
    "Attachment", "Cancelled", "CheckpointError", "Config", "ConfigError", "CorruptMedia",
    "DatasetError", "DecodeAllowance", "Delta", "DuplicateMessage", "EmptyMessage", "Engine",
    "EngineClosed", "Erased", "GenerationSettings", "InputError", "MMChatError", "MediaBusy",
    "MediaTooLarge", "MemoryStore", "MessageTooLong", "Modality", "PluginError", "PluginHost",
    "RedisStore", "Reply", "ReplyStream", "ReplyTimeout", "SessionBusy", "SessionExpired",
    "SessionForbidden", "SessionStore", "SessionTurn", "StateError", "StoreUnavailable",
    "SyncEngine", "SyncReplyStream", "UnsupportedMedia", "__version__", "bundled_model_path",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmchat' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
