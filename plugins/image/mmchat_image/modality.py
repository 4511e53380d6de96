"""The ``image`` modality: bytes in, a normalised ``(3, S, S)`` float32 tensor out.

Pillow and torch are imported inside the methods that use them, so importing this
module (and loading the plugin) stays cheap.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mmchat import Modality
from mmchat.errors import CorruptMedia, MediaTooLarge
from mmchat.modality import read_settings

from .header import image_size

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage
    from torch import nn

logger = logging.getLogger(__name__)

#: Pillow format names this modality decodes. Pillow's JPEG opener also returns
#: camera JPEGs with extra preview frames, which report themselves as "MPO".
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP or GIF"
_MIME_FORMATS: dict[str, tuple[str, ...]] = {
    "image/png": ("PNG",),
    "image/jpeg": ("JPEG", "MPO"),
    "image/webp": ("WEBP",),
    "image/bmp": ("BMP",),
    "image/gif": ("GIF",),
}

#: Pillow's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``); above it
#: Pillow warns or refuses before this plugin can check, so ``max_pixels`` stops here.
PILLOW_MAX_PIXELS = 89_478_485

#: Pixel values are scaled to [0, 1], then shifted and scaled by these.
MEAN = 0.5
STD = 0.25

# (default, type, minimum, maximum) for every setting in [plugins.image].
SETTINGS: dict[str, tuple[int, type, int, int | None]] = {
    "size": (64, int, 16, 1024),
    "max_bytes": (10 * 1024 * 1024, int, 1, None),
    "max_pixels": (40_000_000, int, 1, PILLOW_MAX_PIXELS),
    "costly_pixels": (4_000_000, int, 1, None),
}

# What Pillow raises on damaged data, besides its decompression-bomb errors.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


class ImageModality(Modality):
    """Still images (the first frame of a GIF), letterboxed to ``size`` x ``size`` RGB.

    Settings (``[plugins.image]``): ``size`` (default 64), ``max_bytes`` (10 MiB),
    ``max_pixels`` (40,000,000; checked from the header before any pixel is
    decoded) and ``costly_pixels`` (4,000,000: bigger pictures are costly to decode,
    see :meth:`is_costly`).
    """

    name = "image"
    mime_types = tuple(_MIME_FORMATS)
    version = "1"
    limits = ("max_bytes", "max_pixels", "costly_pixels")

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        values = read_settings(self.name, self.settings, SETTINGS)
        self.settings = values  # every key, defaults filled in: checkpoints record it all
        self.size: int = values["size"]
        self.max_bytes: int = values["max_bytes"]
        self.max_pixels: int = values["max_pixels"]
        self.costly_pixels: int = values["costly_pixels"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_pixels": self.max_pixels, "size": self.size}

    def example(self) -> tuple[bytes, str]:
        """An 8x8 PNG, for the engine's warm-up at start."""
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(out, format="PNG")
        return out.getvalue(), "image/png"

    def decode(self, data: bytes, mime_type: str) -> torch.Tensor:
        """Decode ``data`` to a float32 tensor ``(3, size, size)``, normalised by MEAN/STD.

        Raises CorruptMedia for empty, damaged or unsupported data and MediaTooLarge
        when the payload or its pixel count is over the limit.
        """
        if not data:
            raise CorruptMedia("image is empty (0 bytes)")
        if len(data) > self.max_bytes:
            raise MediaTooLarge(
                f"image is {len(data):,} bytes; the limit is {self.max_bytes:,} "
                "(plugins.image.max_bytes)")
        from PIL import Image

        img = self._open(data, mime_type)
        with img:
            try:
                rgb = self._to_rgb(img)
            except Image.DecompressionBombError as exc:
                raise MediaTooLarge(f"image is too large to decode safely: {exc}") from exc
            except _DECODE_ERRORS as exc:
                raise CorruptMedia(f"could not decode {img.format} image: {exc}") from exc
        return _to_tensor(rgb)

    def is_costly(self, data: bytes, mime_type: str) -> bool:
        """More than ``costly_pixels``, read from the file's first bytes (no Pillow: this
        runs on the event loop). A picture whose size cannot be read there counts as
        costly."""
        size = image_size(data)
        return size is None or size[0] * size[1] > self.costly_pixels

    def build_encoder(self, d_model: int) -> nn.Module:
        from .encoder import ImageEncoder

        return ImageEncoder(d_model)

    def inference_encoder(self, encoder: nn.Module) -> nn.Module:
        """:meth:`ImageEncoder.for_inference`: batch norms folded, channels-last weights."""
        from .encoder import ImageEncoder

        return encoder.for_inference() if isinstance(encoder, ImageEncoder) else encoder

    def augment(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A small random affine of one image ``(3, S, S)``, for training only.

        Rotation by up to 6 degrees, scale by 0.92-1.08 and a shift of up to 5% of the
        side, with the border pixels (the background) filling the edges. Small enough
        that no shape leaves the picture or changes side; enough that a handwritten
        digit is never seen twice at the same pixels.
        """
        import math

        import torch
        import torch.nn.functional as F

        u = torch.rand(4, generator=generator) * 2 - 1  # (4,) in [-1, 1)
        angle, scale = math.radians(6.0) * float(u[0]), 1.0 + 0.08 * float(u[1])
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, 0.1 * float(u[2])],
                              [sin, cos, 0.1 * float(u[3])]], dtype=features.dtype)
        grid = F.affine_grid(theta[None], [1, *features.shape], align_corners=False)
        return F.grid_sample(features[None], grid, padding_mode="border",
                             align_corners=False)[0]  # (3, S, S)

    def _open(self, data: bytes, mime_type: str) -> PILImage.Image:
        """Open lazily (header only) and enforce the pixel limit before decoding."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.UnidentifiedImageError:
            raise CorruptMedia(
                f"data is not a {_FORMAT_NAMES} image (sent as {mime_type})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise MediaTooLarge(f"image is too large to decode safely: {exc}") from exc
        except _DECODE_ERRORS as exc:
            raise CorruptMedia(f"unreadable image header: {exc}") from exc
        width, height = img.size
        pixels = width * height
        if pixels > self.max_pixels:
            img.close()
            raise MediaTooLarge(
                f"image is {width}x{height} = {pixels:,} pixels; the limit is "
                f"{self.max_pixels:,} (plugins.image.max_pixels)")
        if pixels == 0:
            img.close()
            raise CorruptMedia(f"image has no pixels ({width}x{height})")
        if img.format not in _MIME_FORMATS.get(mime_type.lower(), ()):
            logger.debug("attachment sent as %s is %s; decoding it anyway", mime_type, img.format)
        return img

    def _to_rgb(self, img: PILImage.Image) -> PILImage.Image:
        """Shrink, orient, flatten to RGB on white and letterbox to ``size`` x ``size``.

        No full-size copy is made after decoding: JPEG decodes at 1/2 to 1/8 scale
        (``draft``), every format is box-reduced right after decoding (converted a band
        of rows at a time where its pixels cannot be averaged as they are), and the
        EXIF orientation is applied to the reduced picture."""
        from PIL import Image

        if img.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, still at least size x size.
            img.draft("RGB", (self.size, self.size))
        transpose = _ORIENTATIONS.get(img.getexif().get(_EXIF_ORIENTATION, 1))
        deep = img.mode if img.mode in ("I", "F") or img.mode.startswith("I;") else None
        img = _shrink(img, self.size)
        if deep is not None:
            img = _deep_to_l(img, deep)
        if transpose is not None:
            img = img.transpose(transpose)
        if img.has_transparency_data:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            background.alpha_composite(rgba)
            img = background.convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        return letterbox(img, self.size)


def letterbox(img: PILImage.Image, size: int) -> PILImage.Image:
    """Scale an RGB image to fit ``size`` x ``size`` without changing its aspect ratio,
    and pad the rest with the colour of its border (the median of its outermost pixels),
    so a wide or tall picture keeps its shapes' proportions and the padding looks like
    more background rather than a shape."""
    import numpy as np
    from PIL import Image

    width, height = img.size
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = img.resize(inner, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if inner == (size, size):
        return img
    pixels = np.asarray(img)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (N, 3)
    fill = tuple(int(v) for v in np.median(ring, axis=0))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas


def _deep_to_l(img: PILImage.Image, mode: str) -> PILImage.Image:
    """8-bit greyscale from 16-bit, 32-bit integer or float greyscale (``mode``, the
    picture's mode as decoded: a reduced one may be ``I`` where it was ``I;16``).

    ``I;16`` images span 0-65535. Other integer images are read as 16-bit when a
    value is above 255, else as 8-bit; float images up to 1.0 as [0, 1].
    """
    img = img.convert("F")
    _, high = img.getextrema()
    if mode.startswith("I;16") or (mode == "I" and high > 255):
        scale = 255.0 / 65535.0
    elif mode == "F" and high <= 1.0:
        scale = 255.0
    else:
        scale = 1.0
    if scale != 1.0:
        img = img.point(lambda v: v * scale)
    return img.convert("L")


def _to_tensor(img: PILImage.Image) -> torch.Tensor:
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32))  # (S, S, 3)
    x = pixels.permute(2, 0, 1)  # (3, S, S)
    return (x * (1.0 / (255.0 * STD)) - MEAN / STD).contiguous()  # (3, S, S)


#: Modes whose pixels :meth:`PIL.Image.Image.reduce` may average (not palette indices).
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")

#: Pixels converted at once when a picture must change mode before it is reduced.
BAND_PIXELS = 1 << 22

_EXIF_ORIENTATION = 0x0112

#: EXIF orientation -> the transpose that makes the picture upright (as
#: :func:`PIL.ImageOps.exif_transpose`).
_ORIENTATIONS = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # Image.Transpose values


def _shrink(img: PILImage.Image, size: int) -> PILImage.Image:
    """Box-reduce a big picture by a whole factor right after decoding, while its shorter
    side stays at least ``2 * size``, so the conversions that follow (flattening on
    white, RGB) and the final resize work on the pixels the encoder needs, not on up to
    ``max_pixels`` of them (what JPEG's ``draft`` does while decoding, for any format).
    A picture whose pixels cannot be averaged as they are (palette, bilevel, 16-bit) is
    converted and reduced a band of rows at a time, never as a whole."""
    factor = min(img.size) // (2 * size)
    if factor < 2:
        return img
    if img.mode in _REDUCIBLE:
        return img.reduce(factor)
    if img.mode.startswith("I;"):
        mode = "I"
    elif img.mode == "1":
        mode = "L"
    else:
        mode = "RGBA" if img.has_transparency_data else "RGB"
    return _reduce_in_bands(img, factor, mode)


def _reduce_in_bands(img: PILImage.Image, factor: int, mode: str) -> PILImage.Image:
    """``img.convert(mode).reduce(factor)``, converting a band of whole boxes' rows at a
    time, so the converted copy never holds more than about :data:`BAND_PIXELS`."""
    from PIL import Image

    width, height = img.size
    rows = factor * max(1, BAND_PIXELS // (width * factor))
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        band = img.crop((0, top, width, min(height, top + rows)))
        out.paste(band.convert(mode).reduce(factor), (0, top // factor))
    return out
