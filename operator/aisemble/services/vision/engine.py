"""The vision engine: the one module that touches Pillow, torch and transformers.

They are imported inside the methods that need them, so importing the API
(for the gateway's schemas, or for tests of routing) stays cheap. The engine
returns plain Python values; routes never see a PIL image or a tensor.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from aisemble.services.common.models import pick_device, prepare_transformers
from aisemble.services.vision.settings import VisionSettings

# Colours are counted on a copy no larger than this: the fractions barely move
# and quantizing a 60-megapixel photo would take seconds.
_COLOUR_SAMPLE = (256, 256)
# EXIF values longer than this (maker notes, thumbnails) are summarised, not dumped.
_MAX_EXIF_BYTES = 256


class BadImage(ValueError):
    """The bytes are not an image the service will analyse; the message says why."""


@dataclass(frozen=True)
class Analysis:
    format: str | None
    width: int
    height: int
    mode: str
    frames: int
    exif: dict[str, Any]
    colours: list[tuple[tuple[int, int, int], float]]
    labels: list[tuple[str, float]] | None
    inference_seconds: float | None


class VisionEngine:
    def __init__(self, settings: VisionSettings) -> None:
        self.settings = settings
        self._load_lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None
        self._device: Any = None

    @property
    def configured(self) -> bool:
        """Whether a classification model is configured at all."""
        return self.settings.model_path is not None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the classification model, if configured. Blocking; safe to call twice."""
        if not self.configured:
            return
        with self._load_lock:
            if self._model is not None:
                return
            path = self.settings.model_path
            assert path is not None
            if not os.path.isdir(path):
                raise FileNotFoundError(f"VISION_MODEL_PATH {path!r} is not a directory")
            import torch
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            prepare_transformers()
            device = torch.device(pick_device(self.settings.device))
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
            model.eval().to(device)
            self._processor, self._device = processor, device
            self._model = model

    def analyze(self, data: bytes, colours: int, top_k: int, classify: bool) -> Analysis:
        """Describe the image and, when asked and a model is loaded, classify it."""
        image = self._open(data)
        frames = getattr(image, "n_frames", 1)
        labels = seconds = None
        if classify and self._model is not None:
            started = time.perf_counter()
            labels = self._classify(image, top_k)
            seconds = time.perf_counter() - started
        return Analysis(
            format=image.format,
            width=image.width,
            height=image.height,
            mode=image.mode,
            frames=frames,
            exif=_exif(image),
            colours=_dominant_colours(image, colours),
            labels=labels,
            inference_seconds=seconds,
        )

    def _open(self, data: bytes) -> Any:
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise BadImage("the image is empty")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise BadImage(f"the image has too many pixels to decode safely: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage("the data is not an image in a format Pillow can read") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"the image header is corrupt: {exc}") from None
        # Checked from the header alone, before any pixel is decoded.
        pixels = image.width * image.height
        if pixels > self.settings.max_pixels:
            raise BadImage(
                f"the image is {image.width}x{image.height} = {pixels} pixels, more than the "
                f"limit of {self.settings.max_pixels} (a possible decompression bomb)"
            )
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise BadImage(f"the image has too many pixels to decode safely: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"the image data is truncated or corrupt: {exc}") from None
        return image

    def _classify(self, image: Any, top_k: int) -> list[tuple[str, float]]:
        import torch

        rgb, _ = _rgb_and_mask(image)
        inputs = self._processor(images=rgb, return_tensors="pt")
        inputs = {name: tensor.to(self._device) for name, tensor in inputs.items()}
        with torch.inference_mode():
            logits = self._model(**inputs).logits[0].float()
        config = self._model.config
        # Multi-label models score each label on its own; the rest share one distribution.
        if getattr(config, "problem_type", None) == "multi_label_classification":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(-1)
        best = scores.topk(min(top_k, scores.numel()))
        names = config.id2label or {}
        return [
            (str(names.get(index, f"LABEL_{index}")), float(score))
            for score, index in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]


def _dominant_colours(image: Any, count: int) -> list[tuple[tuple[int, int, int], float]]:
    """The `count` most common colours by median-cut quantization, with their shares.

    Fully transparent pixels are left out: their colour is invisible.
    """
    from PIL import Image

    sample = image.copy()
    # Nearest-neighbour keeps the colours that exist; smoothing would invent blends.
    sample.thumbnail(_COLOUR_SAMPLE, Image.Resampling.NEAREST)
    rgb, mask = _rgb_and_mask(sample)
    quantized = rgb.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
    counts = quantized.histogram(mask=mask)
    total = sum(counts)
    if total == 0:
        return []
    palette = quantized.getpalette() or []
    found = []
    for index, pixels in enumerate(counts):
        if pixels and 3 * index + 2 < len(palette):
            r, g, b = palette[3 * index : 3 * index + 3]
            found.append(((r, g, b), pixels / total))
    found.sort(key=lambda item: item[1], reverse=True)
    return found[:count]


def _rgb_and_mask(image: Any) -> tuple[Any, Any]:
    """The image as it looks in 8-bit RGB, and a mask of its visible pixels (None: all are)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A").point(lambda a: 255 if a else 0)
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v / 257).convert("L")
    elif image.mode in ("I", "F"):
        # Pillow would clip these to 0..255; they have no fixed range, so stretch what is there.
        low, high = image.getextrema()
        if low < 0 or high > 255:
            scale = 255 / (high - low) if high > low else 0
            image = image.point(lambda v: (v - low) * scale)
        elif image.mode == "F" and high <= 1:  # floats in 0..1, the usual convention
            image = image.point(lambda v: v * 255)
        image = image.convert("L")
    return image.convert("RGB"), None


def _exif(image: Any) -> dict[str, Any]:
    """EXIF by tag name with JSON-safe values: the main IFD and Exif IFD flat, GPS nested."""
    from PIL import ExifTags

    try:
        exif = image.getexif()
    except Exception:  # a broken EXIF block must not sink the whole analysis
        return {}
    tags: dict[str, Any] = {}
    pointers = {ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, ExifTags.IFD.Interop}
    for tag, value in exif.items():
        if tag not in pointers:
            tags[_tag_name(ExifTags.TAGS, tag)] = _json_safe(value)
    for ifd, names, nested in (
        (ExifTags.IFD.Exif, ExifTags.TAGS, None),
        (ExifTags.IFD.GPSInfo, ExifTags.GPSTAGS, "GPSInfo"),
    ):
        try:
            values = exif.get_ifd(ifd)
        except Exception:  # a bad sub-IFD loses only itself
            continue
        if not values:
            continue
        decoded = {
            _tag_name(names, tag): _json_safe(value)
            for tag, value in values.items()
            if tag not in pointers
        }
        if nested:
            tags[nested] = decoded
        else:
            tags.update(decoded)
    return tags


def _tag_name(names: dict[int, str], tag: int) -> str:
    return names.get(tag) or f"0x{tag:04X}"


def _json_safe(value: Any) -> Any:
    """EXIF values as JSON: rationals as floats, text without padding, binary summarised."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return value.rstrip("\x00")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, numbers.Real):  # Pillow's IFDRational; 0/0 becomes NaN
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, bytes):
        text = value.rstrip(b"\x00")
        if len(text) <= _MAX_EXIF_BYTES:
            try:
                decoded = text.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                if decoded.isprintable():
                    return decoded
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple | list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return str(value)
