"""Image bytes from clients to PIL images, safely: size limits before decoding, a whitelist of
formats, pixel-count checks from the header before any pixel is decoded (decompression bombs)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import BadInput, TooLarge, UnsupportedMedia

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
INLINE_PIXELS = 1_000_000  # images up to this many pixels in total are decoded on the event loop


def decode_base64(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):  # data URL: data:image/png;base64,....
        _, _, data = data.partition(",")
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise TooLarge(f"image exceeds {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput("image is not valid base64") from exc


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) > max_bytes:
        raise TooLarge(f"image exceeds {max_bytes} bytes")
    if not data:
        raise BadInput("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"image has {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, Image.DecompressionBombWarning):
            raise TooLarge("image has too many pixels") from exc
        raise UnsupportedMedia(f"not a supported image; accepted formats: {', '.join(FORMATS)}") from exc
    except Image.DecompressionBombError as exc:
        raise TooLarge("image has too many pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"image data is corrupt: {exc}") from exc
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UnsupportedMedia(f"cannot use this image's pixel format ({image.mode}): {exc}") from exc


def header_pixels(data: bytes) -> int:
    """Pixel count announced by the image header (0 when unreadable; open_image reports why)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - any failure is reported properly by open_image
        return 0


async def decode_images(raw: list[bytes], limits, preprocess) -> np.ndarray:
    """Decode and preprocess images one at a time, off the event loop when they are large: at most
    one full-size image is in memory. The pixel budget covers the whole request. `preprocess`
    turns PIL images into a (N, 3, H, W) float32 array."""

    def work() -> np.ndarray:
        budget, arrays = limits.max_request_pixels, []
        for data in raw:
            image = open_image(data, limits.max_upload_bytes, min(limits.max_image_pixels, budget))
            budget -= image.width * image.height
            arrays.append(preprocess.arrays([image]))
            del image
        return np.concatenate(arrays)

    if sum(header_pixels(data) for data in raw) <= INLINE_PIXELS:
        return work()  # small images: decoding takes less than the hop to a thread
    return await asyncio.to_thread(work)
