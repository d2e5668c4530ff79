"""Decode and validate untrusted image bytes before anything else touches them.

Order of checks (cheapest first, nothing large allocated before the limits pass):
1. byte length (0 bytes -> invalid, over ``max_bytes`` -> too large);
2. header only (``Image.open`` is lazy): unknown -> invalid, format outside JPEG/PNG/WebP -> unsupported;
3. declared width x height against ``max_pixels`` (JPEG) or ``max_pixels_full_decode`` (PNG, WebP) -> too large (a
   20000x20000 PNG is rejected here, before decode);
4. decode with PIL's decompression-bomb guard turned into an error and truncated files refused. A JPEG is decoded
   at a reduced scale (draft mode: 1/2, 1/4 or 1/8, the smallest that keeps ``max_side``), so a 200-megapixel photo
   costs about as much memory as a 12-megapixel one;
5. downscaled to at most ``max_side`` on the longer side, EXIF orientation applied, converted to RGB uint8 (H, W, 3).

Messages carry only sizes and format names, never bytes.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})

# Never accept a truncated file as a (partly grey) image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    name: str = "image",
    max_pixels_full_decode: int | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """Untrusted bytes -> RGB uint8 array (H, W, 3), EXIF orientation applied, longer side at most ``max_side``
    (None: full size). ``max_pixels`` limits JPEGs, ``max_pixels_full_decode`` (default ``max_pixels``) PNG and WebP.

    Raises ``InvalidImageError``, ``ImageTooLargeError`` or ``UnsupportedFormatError`` (``name`` is used in the
    message, e.g. the S3 key; never the content).
    """
    n = len(data)
    if n == 0:
        raise InvalidImageError(f"{name}: empty file (0 bytes)")
    if n > max_bytes:
        raise ImageTooLargeError(f"{name}: {n} bytes exceeds the limit of {max_bytes}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # raised by open() for > 2x MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"{name}: decompression bomb refused") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidImageError(f"{name}: not a decodable image") from e
    fmt = (img.format or "").upper()
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{name}: format {fmt or 'unknown'} not accepted (JPEG, PNG, WebP only)")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{name}: invalid dimensions {w}x{h}")
    limit = max_pixels if fmt == "JPEG" or max_pixels_full_decode is None else max_pixels_full_decode
    if w * h > limit:
        what = "" if fmt == "JPEG" or max_pixels_full_decode is None else f" for {fmt}"
        raise ImageTooLargeError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit{what} of {limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if fmt == "JPEG" and max_side is not None and max(w, h) > max_side:
                f = max_side / max(w, h)
                img.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))  # decodes at 1/2, 1/4 or 1/8 scale
            img.load()
            if max_side is not None and max(img.size) > max_side:
                f = max_side / max(img.size)
                size = (max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f)))
                img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: decompression bomb refused") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise InvalidImageError(f"{name}: corrupt or truncated {fmt} data") from e
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImageError(f"{name}: unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited onto white (a black background would look like hair)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 / max(float(a.max()), 1.0)
        return Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def configure_pil(max_pixels: int) -> None:
    """Set PIL's process-wide bomb threshold to our limit (called once per worker process)."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
