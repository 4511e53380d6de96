"""mmchat: a plugin-based multimodal chatbot backend."""

from .errors import MMChatError
from .hookspecs import hookimpl
from .modality import Attachment, Modality

__version__ = "0.1.0"

__all__ = ["Attachment", "Engine", "MMChatError", "Modality", "hookimpl", "__version__"]


def __getattr__(name: str):
    # Engine pulls in torch; import it only when asked so `mmchat --help` stays fast.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'mmchat' has no attribute {name!r}")
