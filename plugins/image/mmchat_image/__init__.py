"""mmchat-image: the ``image`` modality (PNG, JPEG, WebP, BMP, GIF).

Loaded through the ``mmchat`` entry point group like any third-party plugin.
Importing this package does not import Pillow or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mmchat import Modality, hookimpl

from .modality import ImageModality

__version__ = "0.1.0"

__all__ = ["ImageModality", "__version__", "register_modalities"]


@hookimpl
def register_modalities(register: Callable[[Modality], None],
                        settings: Mapping[str, Mapping[str, Any]]) -> None:
    register(ImageModality(settings.get(ImageModality.name, {})))
