"""Image bytes from clients to PIL images, safely: size limits before decoding, a whitelist of
formats, pixel-count checks from the header before any pixel is decoded (decompression bombs)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from app.errors import bad_request, too_large, unsupported_media

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def decode_base64(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):  # data URL: data:image/png;base64,....
        _, _, data = data.partition(",")
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise too_large(f"image exceeds {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request("image is not valid base64") from exc


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) > max_bytes:
        raise too_large(f"image exceeds {max_bytes} bytes")
    if not data:
        raise bad_request("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise too_large(f"image has {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, Image.DecompressionBombWarning):
            raise too_large("image has too many pixels") from exc
        raise unsupported_media(f"not a supported image; accepted formats: {', '.join(FORMATS)}") from exc
    except Image.DecompressionBombError as exc:
        raise too_large("image has too many pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"image data is corrupt: {exc}") from exc
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise unsupported_media(f"cannot use this image's pixel format ({image.mode}): {exc}") from exc


def header_pixels(data: bytes) -> int:
    """Pixel count announced by the image header (0 when unreadable; open_image reports why)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - any failure is reported properly by open_image
        return 0
