"""Image bytes from clients to model-size pixel arrays, safely and within memory: size limits
before decoding, a whitelist of formats, and pixel counts read from every header of a request
before any pixel is decoded (decompression bombs, the per-image and per-request limits). The
models see 64-224 px, so large images are decoded reduced (JPEG draft mode, then an integer box
reduction) and only as many at a time as a process-wide pixel budget allows; after a burst of
large decodes the freed heap is handed back to the system."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import warnings
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import BadInput, TooLarge, UnsupportedMedia

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
INLINE_PIXELS = 1_000_000  # requests decoding up to this many pixels in total decode on the event loop
# Large images are box-reduced to at least this multiple of the model's input side; the final
# (antialiased) resize to the input size does the rest, as PIL's `reducing_gap` does.
REDUCING_GAP = 2
TRIM_AFTER_IDLE_S = 0.5  # a burst of large decodes is over when none has started for this long
_BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")  # `base64` wraps its output at 76 columns


def decode_base64(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):  # data URL: data:image/png;base64,....
        header, comma, data = data.partition(",")
        media, _, params = header[len("data:") :].partition(";")
        if not media.strip().lower().startswith("image/"):
            raise UnsupportedMedia(f"the data URL holds {media[:40] or 'text/plain'!r}, not an image/* type")
        if not comma or "base64" not in params.lower().split(";"):
            raise BadInput("a data URL must be base64-encoded: data:image/png;base64,...")
    data = data.translate(_BASE64_WHITESPACE)
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise TooLarge(f"image exceeds {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput("image is not valid base64") from exc


# ------------------------------------------------------------------ headers


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    cost: int  # pixels the decoder allocates (fewer than width * height for a JPEG in draft mode)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes) -> Image.Image:
    """Image.open with PIL's own bomb check left to our limits, which are checked first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=FORMATS)


def read_header(data: bytes, max_bytes: int, side: int) -> Header:
    """Size and decoding cost from the header; `side` is the model's input side."""
    if len(data) > max_bytes:
        raise TooLarge(f"image exceeds {max_bytes} bytes")
    if not data:
        raise BadInput("image is empty")
    try:
        with _open(data) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft(None, (side * REDUCING_GAP, side * REDUCING_GAP))
            return Header(width, height, image.width * image.height)
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"not a supported image; accepted formats: {', '.join(FORMATS)}") from exc
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"image header is corrupt: {exc}") from exc


def check_headers(raw: list[bytes], limits, side: int) -> list[Header]:
    """Every limit that headers can tell, for all images of a request, before any decoding."""
    headers = []
    for i, data in enumerate(raw):
        header = read_header(data, limits.max_upload_bytes, side)
        if header.pixels > limits.max_image_pixels:
            which = f"image {i + 1} of {len(raw)}" if len(raw) > 1 else "image"
            raise TooLarge(
                f"{which} has {header.width}x{header.height} pixels; "
                f"the limit is {limits.max_image_pixels} pixels per image"
            )
        headers.append(header)
    total = sum(h.pixels for h in headers)
    if total > limits.max_request_pixels:
        raise TooLarge(
            f"the request's {len(raw)} images have {total} pixels in total; "
            f"the limit is {limits.max_request_pixels} pixels per request"
        )
    return headers


# ------------------------------------------------------------------ decoding


def decode_reduced(data: bytes, side: int) -> Image.Image:
    """An RGB image whose sides are at least REDUCING_GAP x `side` (or the original's, when smaller):
    what the model's resize needs, without holding a full-size copy longer than the decode."""
    target = side * REDUCING_GAP
    try:
        image = _open(data)
        if image.format == "JPEG":
            image.draft(None, (target, target))  # the decoder scales by 1/2, 1/4 or 1/8
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise BadInput(f"image data is corrupt: {exc}") from exc
    try:
        factor = (max(1, image.width // target), max(1, image.height // target))
        if factor != (1, 1):
            if image.mode not in ("L", "RGB", "RGBA"):  # reduce() averages channel values
                image = image.convert("RGB")
            image = image.reduce(factor)
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UnsupportedMedia(f"cannot use this image's pixel format ({image.mode}): {exc}") from exc


@lru_cache(maxsize=1)
def _decoder() -> ThreadPoolExecutor:
    # Few threads: each is a glibc malloc arena, and decoding is bounded by the pixel budget anyway.
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Hand freed heap pages back to the system. glibc keeps the blocks of large decodes in its
    arenas (one per decoding thread) otherwise, and the resident size stays at the burst's peak."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))


class PixelBudget:
    """Pixels being decoded at once, across requests: a decode waits (first come, first served)
    until its cost fits. A decode larger than the whole budget runs alone. Once no decode has run
    for TRIM_AFTER_IDLE_S, release_memory runs (`trims` counts the times it did)."""

    def __init__(self, pixels: int):
        self.total = self.free = pixels
        self.trims = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()
        self._idle_timer: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[None]:
        cost = min(cost, self.total)
        if self._waiting or cost > self.free:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append((cost, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # granted just as we were cancelled
                    self._give_back(cost)
                else:
                    self._waiting = deque(w for w in self._waiting if w[1] is not turn)
                    self._grant()
                raise
        else:
            self.free -= cost
        if self._idle_timer is not None:  # the burst goes on
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            yield
        finally:
            self._give_back(cost)
            if self.free == self.total and self._idle_timer is None:
                loop = asyncio.get_running_loop()
                self._idle_timer = loop.call_later(TRIM_AFTER_IDLE_S, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_timer = None
        done = loop.run_in_executor(_decoder(), release_memory)
        done.add_done_callback(lambda _: setattr(self, "trims", self.trims + 1))

    def _give_back(self, cost: int) -> None:
        self.free += cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            cost, turn = self._waiting.popleft()
            if not turn.done():
                self.free -= cost
                turn.set_result(None)


async def decode_images(raw: list[bytes], limits, preprocess, budget: PixelBudget) -> np.ndarray:
    """Check every header, then decode and preprocess the images one at a time: on the event loop
    when they are small, else in a decoding thread within `budget`. `preprocess` turns PIL images
    into a (N, 3, H, W) float32 array (numpy, no torch)."""
    side = preprocess.size
    headers = check_headers(raw, limits, side)

    def one(data: bytes) -> np.ndarray:
        return preprocess.arrays([decode_reduced(data, side)])

    if sum(h.cost for h in headers) <= INLINE_PIXELS:
        return np.concatenate([one(data) for data in raw])  # faster than the hop to a thread
    loop = asyncio.get_running_loop()
    arrays = []
    for data, header in zip(raw, headers, strict=True):
        async with budget.hold(header.cost):
            arrays.append(await loop.run_in_executor(_decoder(), one, data))
    return np.concatenate(arrays)
