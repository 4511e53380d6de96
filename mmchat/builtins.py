"""mmchat's own plugin, registered exactly like a third-party one."""

from __future__ import annotations

import logging

from .hookspecs import hookimpl

logger = logging.getLogger(__name__)


@hookimpl(trylast=True)
def startup(engine):
    names = ", ".join(sorted(engine.modalities)) or "none"
    logger.info("engine ready: model %s, modalities: %s", engine.model_description, names)
