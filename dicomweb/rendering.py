"""WADO-RS /rendered (PS3.18 8.3.5.1): one frame as an 8-bit JPEG or PNG, windowed for display.

Exactly one frame is decoded, and only once decoding.check() has sized it from the header.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from dicomweb import decoding
from dicomweb.base import DicomWebError

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
JPEG_QUALITY = 90
# A grey or more-than-8-bit rendering holds each sample as a float64 (LUTs, windowing, scaling): that is what is
# sized. 8-bit colour goes to the encoder as decoded.
WORKING_BYTES = 8


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """Scale to 0-255 by the frame's own min/max (after any windowing), in place on one float64 copy."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    return np.round(values, out=values).astype(np.uint8)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function, to 0-255."""
    low = center - 0.5 - (width - 1) / 2
    span = max(width - 1, 1e-9)
    return np.round(np.clip((values - low) / span, 0.0, 1.0) * 255.0).astype(np.uint8)


def _grey(frame: np.ndarray, dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Modality LUT, then the asked window, the stored one (VOI LUT or Window Center/Width), else min/max.

    MONOCHROME1 is inverted so that what is shown is what the modality meant.
    """
    values = apply_modality_lut(frame, dataset)
    if window is not None:
        grey = _linear_window(values.astype(np.float64), *window)
    elif "WindowCenter" in dataset or "VOILUTSequence" in dataset:
        grey = _to_8bit(apply_voi_lut(values, dataset, index=0))
    else:
        grey = _to_8bit(values)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return grey


@dataclass
class RenderOptions:
    """PS3.18 8.3.5.1.3 rendering parameters we honour: window, quality and viewport size."""

    window: tuple[float, float] | None = None
    quality: int = JPEG_QUALITY
    viewport: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)


def _window(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise DicomWebError(400, "window must be center,width,function") from None
    if width < 1 or (len(parts) > 2 and parts[2].strip().lower() not in ("linear", "")):
        raise DicomWebError(400, "window width must be at least 1 and its function linear")
    return center, width


def _quality(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise DicomWebError(400, "quality must be an integer from 1 to 100")
    return int(text)


def _viewport(text: str, options: RenderOptions) -> tuple[int, int]:
    """`vw,vh[,sx,sy,sw,sh]`: the image is scaled to fit vw x vh; a source region is not supported."""
    parts = text.split(",")
    try:
        width, height = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise DicomWebError(400, "viewport must be width,height") from None
    if not (1 <= width <= 8192 and 1 <= height <= 8192):
        raise DicomWebError(400, "viewport width and height must be from 1 to 8192")
    if any(part.strip() for part in parts[2:]):
        options.warnings.append("viewport source regions are not supported: the whole image is scaled")
    return width, height


def parse_options(params: Mapping[str, str], *, default_viewport: tuple[int, int] | None = None) -> RenderOptions:
    """RenderOptions from the query; 400 for a malformed value, a Warning for what is ignored."""
    options = RenderOptions(viewport=default_viewport)
    if params.get("window"):
        options.window = _window(params["window"])
    if params.get("quality"):
        options.quality = _quality(params["quality"])
    if params.get("viewport"):
        options.viewport = _viewport(params["viewport"], options)
    if "annotation" in params:
        options.warnings.append("the annotation parameter is not supported")
    return options


def render(source: BinaryIO, frame: int, media_type: str, options: RenderOptions | None = None) -> bytes:
    """Frame `frame` (1-based) of the file, encoded as `media_type`; 406 when its pixels cannot (or may not) be decoded."""
    options = options or RenderOptions()
    dataset = dcmread(source, stop_before_pixels=True)
    if "Rows" not in dataset:
        raise DicomWebError(406, "the instance has no image to render")
    frames = decoding.frame_count(dataset)
    if not 1 <= frame <= frames:
        raise DicomWebError(404, f"the instance has {frames} frame(s)")
    what = f"rendering of {dataset.get('SOPInstanceUID', 'the instance')}"
    in_float = decoding.number(dataset, "SamplesPerPixel", 1) == 1 or decoding.number(dataset, "BitsAllocated", 8) > 8
    per_sample = WORKING_BYTES if in_float else None
    decoding.check(dataset, 1, what, "retrieve its frames as stored (Accept: */*)", per_sample=per_sample)
    try:
        pixels = pixel_array(source, index=frame - 1, as_rgb=True)  # this frame only
    except Exception as exc:  # no decoder for this transfer syntax, or a broken bitstream
        raise DicomWebError(406, f"pixel data cannot be decoded for rendering ({type(exc).__name__})") from None
    if int(dataset.get("SamplesPerPixel") or 1) == 1:
        image = Image.fromarray(_grey(pixels, dataset, options.window))
    else:
        image = Image.fromarray(pixels if pixels.dtype == np.uint8 else _to_8bit(pixels))
    if options.viewport:
        image.thumbnail(options.viewport)  # keeps the aspect ratio, never enlarges
    buffer = io.BytesIO()
    extra = {"quality": options.quality} if media_type == "image/jpeg" else {}
    image.save(buffer, format=MEDIA_TYPES[media_type], **extra)
    return buffer.getvalue()
