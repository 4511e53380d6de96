"""mmchat-voice: the ``voice`` modality (WAV, FLAC, Ogg Vorbis/Opus, MP3 speech clips).

Loaded through the ``mmchat`` entry point group like any third-party plugin.
Importing this package does not import soundfile, librosa or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mmchat import Modality, hookimpl

from .modality import VoiceModality

__version__ = "0.1.0"

__all__ = ["VoiceModality", "__version__", "register_modalities"]


@hookimpl
def register_modalities(register: Callable[[Modality], None],
                        settings: Mapping[str, Mapping[str, Any]]) -> None:
    register(VoiceModality(settings.get(VoiceModality.name, {})))
