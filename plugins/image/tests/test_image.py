"""Tests for the image modality, with real images made by Pillow in memory."""

from __future__ import annotations

import io
import random
import struct
import zlib

import mmchat_image
import pytest
import torch
from mmchat_image import ImageModality
from PIL import Image, ImageDraw

from mmchat.errors import ConfigError, CorruptMedia, MediaTooLarge
from mmchat.plugins import PluginHost

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE_VALUE = 2.0  # (1.0 - MEAN) / STD
BLACK_VALUE = -2.0  # (0.0 - MEAN) / STD


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def halves(size: tuple[int, int], left=RED, right=BLUE, mode: str = "RGB") -> Image.Image:
    """Left half ``left``, right half ``right``."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] - size[0] // 2, 0))
    return img


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but that holds no real pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image() -> ImageModality:
    return ImageModality()


def colour_at(x: torch.Tensor, row: slice, col: slice) -> torch.Tensor:
    """Mean normalised RGB over a region of a (3, S, S) tensor."""
    return x[:, row, col].mean(dim=(1, 2))


def assert_red(rgb: torch.Tensor) -> None:
    assert rgb[0] > 1.5 and rgb[1] < -1.5 and rgb[2] < -1.5, rgb


def assert_blue(rgb: torch.Tensor) -> None:
    assert rgb[0] < -1.5 and rgb[1] < -1.5 and rgb[2] > 1.5, rgb


@pytest.mark.parametrize("fmt, mime, params", [
    ("PNG", "image/png", {}),
    ("JPEG", "image/jpeg", {"quality": 95}),
    ("WEBP", "image/webp", {"lossless": True}),
    ("BMP", "image/bmp", {}),
    ("GIF", "image/gif", {}),
])
def test_decodes_each_format(image, fmt, mime, params):
    data = encode(halves((120, 90)), fmt, **params)
    x = image.decode(data, mime)
    assert x.shape == (3, 64, 64)
    assert x.dtype == torch.float32
    # 120x90 is letterboxed to 64x48: the picture spans rows 8 to 56
    assert_red(colour_at(x, slice(12, 52), slice(0, 24)))
    assert_blue(colour_at(x, slice(12, 52), slice(40, 64)))


def test_size_setting_sets_output_size():
    x = ImageModality({"size": 32}).decode(encode(halves((50, 50)), "PNG"), "image/png")
    assert x.shape == (3, 32, 32)


def _circle(size: tuple[int, int], background=(40, 40, 40)) -> Image.Image:
    img = Image.new("RGB", size, background)
    (cx, cy), r = (size[0] // 2, size[1] // 2), min(size) // 3
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=RED)
    return img


@pytest.mark.parametrize("size", [(192, 108), (108, 192), (300, 100), (100, 300)])
def test_wide_and_tall_pictures_are_letterboxed_not_stretched(image, size):
    """A 16:9, 9:16 or 3:1 picture keeps its aspect ratio; the padding has the colour
    of the picture's border, so it reads as more background."""
    x = image.decode(encode(_circle(size), "PNG"), "image/png")  # (3, 64, 64)
    red = (x[0] > 1.5) & (x[1] < -1.5)  # (64, 64) pixels of the circle
    rows, cols = red.any(dim=1).nonzero(), red.any(dim=0).nonzero()
    height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    assert abs(height - width) <= 2, (height, width)  # still a circle, not an ellipse
    dark = (40 / 255 - 0.5) / 0.25
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (3, 4)
    assert torch.allclose(corners, torch.full_like(corners, dark), atol=0.02)


def test_square_pictures_fill_the_whole_input(image):
    x = image.decode(encode(halves((50, 50)), "PNG"), "image/png")
    assert_red(colour_at(x, slice(0, 64), slice(0, 4)))


def test_values_are_normalised(image):
    white = image.decode(encode(Image.new("RGB", (10, 10), (255, 255, 255)), "PNG"), "image/png")
    black = image.decode(encode(Image.new("RGB", (10, 10), (0, 0, 0)), "PNG"), "image/png")
    assert torch.allclose(white, torch.full_like(white, WHITE_VALUE))
    assert torch.allclose(black, torch.full_like(black, BLACK_VALUE))


@pytest.mark.parametrize("orientation, top, bottom", [(6, "red", "blue"), (8, "blue", "red")])
def test_exif_orientation_is_applied(image, orientation, top, bottom):
    # Stored sideways: red on the left, blue on the right. Orientation 6 means
    # "rotate 90 degrees clockwise to display", which puts red on top; 8 is the reverse.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves((640, 320)), "JPEG", quality=95, exif=exif.tobytes())
    x = image.decode(data, "image/jpeg")
    checks = {"red": assert_red, "blue": assert_blue}
    # displayed 320x640: letterboxed to 32x64, columns 16 to 48
    checks[top](colour_at(x, slice(0, 24), slice(20, 44)))
    checks[bottom](colour_at(x, slice(40, 64), slice(20, 44)))


def test_jpeg_without_exif_keeps_layout(image):
    x = image.decode(encode(halves((640, 480)), "JPEG", quality=95), "image/jpeg")
    assert_red(colour_at(x, slice(12, 52), slice(0, 24)))
    assert_blue(colour_at(x, slice(12, 52), slice(40, 64)))


def test_rgba_is_composited_on_white(image):
    img = halves((64, 64), left=(0, 0, 0, 0), right=(0, 0, 255, 255), mode="RGBA")
    x = image.decode(encode(img, "PNG"), "image/png")
    assert torch.allclose(colour_at(x, slice(None), slice(0, 24)), torch.full((3,), WHITE_VALUE))
    assert_blue(colour_at(x, slice(None), slice(40, 64)))


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 255, WHITE_VALUE),
    ("L", 0, BLACK_VALUE),
    ("1", 1, WHITE_VALUE),
    ("I;16", 65535, WHITE_VALUE),
    ("I;16", 255, (1 / 257 - 0.5) / 0.25),
])
def test_greyscale_becomes_equal_rgb(image, mode, value, expected):
    x = image.decode(encode(Image.new(mode, (20, 20), value), "PNG"), "image/png")
    assert torch.allclose(x, torch.full_like(x, expected), atol=0.02)


@pytest.mark.parametrize("mode, value", [("I", 255), ("I", 65535), ("F", 1.0), ("F", 255.0)])
def test_deep_greyscale_scaling(mode, value):
    # Pillow cannot save these modes as PNG/BMP, so this goes one step below decode().
    rgb = ImageModality()._to_rgb(Image.new(mode, (20, 20), value))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_greyscale_with_alpha(image):
    img = halves((64, 64), left=(0, 0), right=(0, 255), mode="LA")
    x = image.decode(encode(img, "PNG"), "image/png")
    assert torch.allclose(colour_at(x, slice(None), slice(0, 24)), torch.full((3,), WHITE_VALUE))
    assert torch.allclose(colour_at(x, slice(None), slice(40, 64)), torch.full((3,), BLACK_VALUE))


def test_palette_image(image):
    img = halves((64, 64)).quantize(colors=4)
    assert img.mode == "P"
    x = image.decode(encode(img, "PNG"), "image/png")
    assert_red(colour_at(x, slice(None), slice(0, 24)))
    assert_blue(colour_at(x, slice(None), slice(40, 64)))


def test_gif_uses_first_frame_and_transparency(image):
    first = halves((64, 64)).quantize(colors=4)
    second = Image.new("RGB", (64, 64), (0, 255, 0)).quantize(colors=4)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    x = image.decode(data, "image/gif")
    assert_red(colour_at(x, slice(None), slice(0, 24)))
    assert_blue(colour_at(x, slice(None), slice(40, 64)))

    see_through = Image.new("P", (16, 16), 0)
    see_through.putpalette([0, 0, 0, 255, 0, 0])
    x = image.decode(encode(see_through, "GIF", transparency=0), "image/gif")
    assert torch.allclose(x, torch.full_like(x, WHITE_VALUE))


def test_mime_mismatch_is_lenient_for_accepted_formats(image):
    jpeg = encode(halves((64, 64)), "JPEG")
    assert image.decode(jpeg, "image/png").shape == (3, 64, 64)


def test_unaccepted_format_is_corrupt(image):
    tiff = encode(halves((64, 64)), "TIFF")
    with pytest.raises(CorruptMedia, match="not a PNG, JPEG, WebP, BMP or GIF image"):
        image.decode(tiff, "image/png")


def test_truncated_png_is_corrupt(image):
    rng = random.Random(0)
    noisy = Image.frombytes("RGB", (128, 128), rng.randbytes(128 * 128 * 3))
    data = encode(noisy, "PNG")
    with pytest.raises(CorruptMedia, match="could not decode PNG image"):
        image.decode(data[: len(data) // 2], "image/png")


def test_truncated_jpeg_is_corrupt(image):
    data = encode(halves((640, 480)), "JPEG")
    with pytest.raises(CorruptMedia):
        image.decode(data[: len(data) // 3], "image/jpeg")


@pytest.mark.parametrize("data", [random.Random(1).randbytes(4096), b"\x89PNG\r\n\x1a\n",
                                  b"GIF89a"])
def test_garbage_is_corrupt(image, data):
    with pytest.raises(CorruptMedia):
        image.decode(data, "image/png")


def test_empty_is_corrupt(image):
    with pytest.raises(CorruptMedia, match="empty"):
        image.decode(b"", "image/png")


def test_too_many_pixels_is_rejected():
    data = encode(Image.new("1", (200, 100)), "PNG")
    with pytest.raises(MediaTooLarge, match=r"200x100 = 20,000 pixels; the limit is 10,000"):
        ImageModality({"max_pixels": 10_000}).decode(data, "image/png")


def test_pixel_limit_is_checked_before_decoding(image):
    # 48 million pixels claimed, no real pixel data: loading would fail as corrupt,
    # so MediaTooLarge proves the check ran on the header alone.
    with pytest.raises(MediaTooLarge, match="8000x6000 = 48,000,000 pixels"):
        image.decode(png_header(8000, 6000), "image/png")


def test_pillow_decompression_bomb_becomes_too_large(image):
    with pytest.raises(MediaTooLarge, match="too large to decode safely"):
        image.decode(png_header(100_000, 100_000), "image/png")


def test_payload_over_max_bytes():
    with pytest.raises(MediaTooLarge, match="the limit is 100"):
        ImageModality({"max_bytes": 100}).decode(b"x" * 101, "image/png")


@pytest.mark.parametrize("settings, message", [
    ({"colour": True}, "unknown setting plugins.image.colour; allowed: size, max_bytes"),
    ({"size": "64"}, "plugins.image.size = '64' is not allowed: expected an integer"),
    ({"size": True}, "plugins.image.size = True is not allowed: expected an integer"),
    ({"size": 8}, "plugins.image.size = 8 is not allowed: minimum is 16"),
    ({"max_pixels": 10**9}, "maximum is 89478485"),
    ({"max_bytes": 0}, "plugins.image.max_bytes = 0 is not allowed: minimum is 1"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        ImageModality(settings)


def test_describe():
    info = ImageModality({"max_bytes": 1000}).describe()
    assert info["name"] == "image"
    assert info["max_bytes"] == 1000
    assert "image/webp" in info["mime_types"]


def test_encoder_shapes_and_mask(image):
    encoder = image.build_encoder(48).eval()
    batch, lengths = image.collate([image.decode(encode(halves((80, 60)), "PNG"), "image/png"),
                                    image.decode(encode(Image.new("L", (9, 9)), "BMP"),
                                                 "image/bmp")])
    vectors, mask = encoder(batch, lengths)
    assert vectors.shape == (2, 64, 48)
    assert mask.shape == (2, 64) and mask.dtype == torch.bool and bool(mask.all())


def test_encoder_pools_other_sizes_to_the_same_grid():
    image = ImageModality({"size": 96})
    encoder = image.build_encoder(16).eval()
    vectors, mask = encoder(torch.zeros(3, 3, 96, 96))
    assert vectors.shape == (3, 64, 16)
    assert mask.shape == (3, 64)


def test_encoder_knows_positions(image):
    # A blank image gives the same CNN features everywhere away from the borders;
    # the coordinate channels must still make the region vectors differ.
    encoder = image.build_encoder(8).eval()
    with torch.no_grad():
        vectors, _ = encoder(torch.zeros(1, 3, 256, 256))
    grid = vectors.view(8, 8, 8)
    assert not torch.allclose(grid[3, 3], grid[3, 4])
    assert not torch.allclose(grid[3, 3], grid[4, 3])


def test_encoder_trains(image):
    encoder = image.build_encoder(16)
    vectors, _ = encoder(torch.randn(2, 3, 64, 64))
    vectors.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    assert "coords" not in encoder.state_dict()


def test_registered_through_entry_point():
    host = PluginHost(builtins=(), allow=["image"], settings={"image": {"size": 32}})
    modality = host.modalities["image"]
    assert isinstance(modality, ImageModality)
    assert modality.size == 32
    assert host.plugin_version("image") == mmchat_image.__version__
    assert modality.decode(encode(halves((40, 40)), "PNG"), "image/png").shape == (3, 32, 32)


def test_bad_settings_stop_start_up_naming_the_key():
    host = PluginHost(builtins=(), allow=["image"], settings={"image": {"size": 0}})
    with pytest.raises(ConfigError, match="plugins.image.size = 0"):
        _ = host.modalities


def test_augment_is_seeded_small_and_keeps_the_background(image):
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((6, 24, 22, 40), fill=RED)  # a red disc on the left
    x = image.decode(encode(img, "PNG"), "image/png")
    a = image.augment(x, torch.Generator().manual_seed(7))
    b = image.augment(x, torch.Generator().manual_seed(7))
    c = image.augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    for out in (a, c):
        red = (out[0] > 0.5) & (out[2] < -0.5)  # (S, S) red pixels
        cols = red.nonzero()[:, 1].float()
        assert red.sum() > 0.7 * 3.14 * 8 ** 2  # the disc stayed in the picture
        assert cols.mean() < 20  # and on the left
        corner = out[:, :4, 60:]  # far from the disc: still white background
        torch.testing.assert_close(corner, torch.full_like(corner, (1 - 0.5) / 0.25))


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_a_big_picture_is_shrunk_before_it_is_converted(image, mode):
    """16 MP with transparency: box-reduced right after decoding, then flattened and
    resized, it shows what the full-size path showed (white left, blue right)."""
    from mmchat_image.modality import _shrink

    img = halves((4000, 4000), left=(0, 0, 0, 0), right=(0, 0, 255, 255), mode="RGBA")
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
        img.info["transparency"] = img.getpixel((0, 0))
    small = _shrink(img, image.size)
    assert small.size == (130, 130)  # reduced by 4000 // (2 * 64) = 31, rounding up
    assert small.mode in ("RGBA", "RGB")
    x = image.decode(encode(img, "PNG"), "image/png")
    assert torch.allclose(colour_at(x, slice(None), slice(0, 24)), torch.full((3,), WHITE_VALUE))
    assert_blue(colour_at(x, slice(None), slice(40, 64)))
    assert _shrink(halves((200, 100)), image.size).size == (200, 100)  # small: as it is


@pytest.mark.parametrize("fmt, params", [
    ("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}), ("BMP", {}),
    ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
])
@pytest.mark.parametrize("size", [(1, 1), (333, 97), (97, 3001)])
def test_the_header_gives_the_size_pillow_reads(fmt, params, size):
    from mmchat_image.header import image_size

    data = encode(halves(size), fmt, **params)
    assert image_size(data) == Image.open(io.BytesIO(data)).size
    assert image_size(data[:8]) is None  # cut short


def test_the_header_size_of_a_jpeg_with_exif_and_an_extended_webp():
    from mmchat_image.header import image_size

    exif = Image.Exif()
    exif[0x0112] = 6
    assert image_size(encode(halves((640, 320)), "JPEG", exif=exif.tobytes())) == (640, 320)
    webp = encode(halves((300, 200)), "WEBP", exif=exif.tobytes())
    assert webp[12:16] == b"VP8X"
    assert image_size(webp) == (300, 200)
    assert image_size(png_header(40_000, 1_000)) == (40_000, 1_000)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8" + b"\xff\xe0\x00\x02" * 300,
                                  b"\xff\xd8\xff\xda"])
def test_an_unreadable_header_has_no_size_and_is_costly(image, data):
    from mmchat_image.header import image_size

    assert image_size(data) is None
    assert image.is_costly(data, "image/jpeg")


def test_pictures_over_costly_pixels_are_costly():
    image = ImageModality({"costly_pixels": 10_000})
    assert not image.is_costly(encode(halves((100, 100)), "PNG"), "image/png")
    assert image.is_costly(encode(halves((101, 100)), "PNG"), "image/png")
    assert image.is_costly(png_header(8000, 5000), "image/png")
    assert not ImageModality().is_costly(png_header(2000, 2000), "image/png")


@pytest.mark.parametrize("mode", ["P", "PA", "1", "I;16"])
def test_a_picture_that_must_change_mode_is_reduced_a_band_at_a_time(mode, monkeypatch):
    """The same pixels as converting the whole picture, then reducing it."""
    from mmchat_image import modality

    rng = random.Random(0)
    img = Image.new("RGB", (997, 603), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = rng.randrange(997), rng.randrange(603)
        draw.ellipse((x, y, x + 90, y + 60), fill=tuple(rng.randrange(256) for _ in range(3)))
    if mode == "I;16":
        img = img.convert("L").point(lambda v: v * 200, "I").convert("I;16")
    elif mode == "PA":
        img = img.convert("RGBA").convert("PA")
    else:
        img = img.convert(mode)
    target = {"P": "RGB", "PA": "RGBA", "1": "L", "I;16": "I"}[mode]
    monkeypatch.setattr(modality, "BAND_PIXELS", 997 * 50)  # many bands, one cut short
    small = modality._shrink(img, 64)
    assert small.mode == target
    assert small.tobytes() == img.convert(target).reduce(603 // 128).tobytes()


def trained_like(encoder: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``encoder`` in eval mode with batch-norm statistics and affines away from their
    initial values (mean 0, variance 1, identity), as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return encoder.eval()


def test_the_served_encoder_computes_what_the_trained_one_does(image):
    encoder = trained_like(image.build_encoder(32))
    pictures = [halves((80, 60)), halves((64, 64), RED, (20, 200, 90)), Image.new("L", (9, 9)),
                Image.effect_mandelbrot((96, 72), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")]
    batch, lengths = image.collate([image.decode(encode(p, "PNG"), "image/png")
                                    for p in pictures])
    served = image.inference_encoder(encoder)
    assert served is not encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())  # untouched
    with torch.inference_mode():
        want, want_mask = encoder(batch, lengths)
        got, got_mask = served(batch, lengths)
        one, _ = served(batch[1:2], lengths[1:2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one, want[1:2], rtol=1e-4, atol=1e-5)
    assert torch.equal(got_mask, want_mask)
    assert want.abs().max() > 0.1  # the statistics above reach the output


def test_the_served_encoder_needs_eval_mode(image):
    with pytest.raises(ValueError, match="eval mode"):
        image.inference_encoder(image.build_encoder(16))
