"""Untrusted image decoding: every bad-input class gets its own error, good images come out RGB (H, W, 3)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError
from worker.service.images import decode_image

MAX_BYTES = 20_000_000
MAX_PIXELS = 40_000_000


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(a)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height (all black), a few tens of kB: the classic decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    arr = decode_image(_encode(_gradient(), fmt), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8
    assert arr[0, -1, 0] > 200 and arr[0, 0, 0] < 50  # left-to-right red ramp survived


def test_rgba_grey_and_palette_become_rgb() -> None:
    for mode in ("RGBA", "L", "P", "LA"):
        arr = decode_image(_encode(_gradient().convert(mode), "PNG"), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
        assert arr.shape == (48, 64, 3), mode


def test_exif_orientation_applied() -> None:
    img = _gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    arr = decode_image(_encode(img, "JPEG", exif=exif), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert arr.shape == (64, 48, 3)


def test_zero_bytes() -> None:
    with pytest.raises(InvalidImageError, match="0 bytes"):
        decode_image(b"", max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_not_an_image() -> None:
    with pytest.raises(InvalidImageError):
        decode_image(b"hello, this is plain text, not a picture\n" * 10, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_truncated_jpeg() -> None:
    data = _encode(_gradient(256, 256), "JPEG", quality=95)
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2], max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_corrupt_jpeg() -> None:
    data = bytearray(_encode(_gradient(256, 256), "JPEG", quality=95))
    # keep SOI + the first header bytes, garble the rest (markers included)
    rng = np.random.default_rng(0)
    data[200:] = rng.integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_unsupported_format() -> None:
    with pytest.raises(UnsupportedFormatError, match="GIF"):
        decode_image(_encode(_gradient(), "GIF"), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    with pytest.raises(UnsupportedFormatError, match="BMP"):
        decode_image(_encode(_gradient(), "BMP"), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_byte_limit() -> None:
    data = _encode(_gradient(), "PNG")
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=MAX_PIXELS)


def test_pixel_bomb_refused_from_header() -> None:
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 200_000  # small on the wire, 400 Mpx decoded
    with pytest.raises(ImageTooLargeError, match="20000x20000|bomb"):
        decode_image(bomb, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_pixel_limit_is_the_setting_not_pils_default() -> None:
    data = _encode(_gradient(64, 48), "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_bytes=MAX_BYTES, max_pixels=64 * 48 - 1)
    assert decode_image(data, max_bytes=MAX_BYTES, max_pixels=64 * 48).shape == (48, 64, 3)


def test_large_jpeg_is_decoded_at_reduced_scale_and_downscaled():
    """A JPEG over ``max_side`` comes out with its longer side at ``max_side``, aspect kept, EXIF applied; PIL's
    draft mode is used (the decoder is asked for a reduced scale before it decodes)."""
    big = _gradient(1600, 1200).resize((1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(big, "JPEG", quality=90, exif=exif)
    from PIL import JpegImagePlugin

    calls = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = orig(self, mode, size)
        calls.append((size, self.size))
        return out

    JpegImagePlugin.JpegImageFile.draft = spy  # type: ignore[method-assign]
    try:
        arr = decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_side=300)
    finally:
        JpegImagePlugin.JpegImageFile.draft = orig  # type: ignore[method-assign]
    assert arr.shape == (300, 225, 3)  # 1600x1200 -> 300x225, then rotated to portrait
    assert calls == [((300, 225), (400, 300))]  # decoded at 1/4 scale, the smallest that keeps 300x225
    assert decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS).shape == (1600, 1200, 3)


def test_png_has_its_own_pixel_limit():
    data = _encode(_gradient(), "PNG")
    with pytest.raises(ImageTooLargeError, match="for PNG"):
        decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_pixels_full_decode=64 * 48 - 1)
    jpeg = _encode(_gradient(), "JPEG")
    assert decode_image(jpeg, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_pixels_full_decode=10).shape[2] == 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_header_dimensions_without_decoding(fmt):
    from producers.imagesize import image_size

    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a large APP1 segment before the frame header
    kw = {"exif": exif} if fmt == "JPEG" else {}
    for lossless in (False, True) if fmt == "WEBP" else (False,):
        data = _encode(_gradient(333, 211), fmt, **kw, **({"lossless": True} if lossless else {}))
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        assert image_size(data, ext) == (333, 211)
    assert image_size(b"\xff\xd8\xff\xe0garbage", "jpg") is None
