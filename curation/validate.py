"""Decode and validate one input: every way an input can be bad ends in a reason, never a crash.

Reasons (the fixed set in docs/data_contract.md): empty_file, unreadable, not_an_image, truncated,
decompression_bomb, too_small, unsupported_mode. With `special_modes: convert`, 16-bit, CMYK,
palette and alpha images are converted to RGB instead (alpha composited on white, 16 bits scaled to 8).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from curation.read import read_bytes
from curation.stage import Batch, Stage

# Modes a plain .convert("RGB") handles without losing meaning.
PLAIN_MODES = {"RGB", "L", "1", "YCbCr"}
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _special_mode(img: Image.Image) -> str | None:
    """The reason an image's mode needs a policy decision, or None for an ordinary image."""
    if img.mode in PLAIN_MODES:
        return None
    if img.mode == "P":
        return "PA" if "transparency" in img.info else "P"
    return img.mode


def _to_rgb(img: Image.Image) -> Image.Image:
    """Correct conversion of any supported mode to 8-bit RGB."""
    mode = img.mode
    if mode in PLAIN_MODES:
        return img.convert("RGB")
    if mode in SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float64)
        # PIL opens 16-bit PNGs as I;16 or I (32-bit container holding 0..65535).
        a = np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode == "CMYK":
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int
    height: int


def decode(data: bytes, *, max_pixels: int, min_size: int, special_modes: str) -> Decoded:
    """Bytes -> RGB image, or raise Rejected(reason, detail)."""
    if len(data) == 0:
        raise Rejected("empty_file", "file is empty (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own guard; it raises above 2x and warns above 1x
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise Rejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > input.max_pixels={max_pixels}")
            if min(w, h) < min_size:
                raise Rejected("too_small", f"{w}x{h}: shorter side < input.min_size={min_size}")
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("decompression_bomb", str(e).splitlines()[0]) from None
    except UnidentifiedImageError:
        raise Rejected("not_an_image", "not a decodable image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports cut-off files as OSError("image file is truncated ...") or broken streams.
        raise Rejected("truncated", f"decoding failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    special = _special_mode(img)
    if special is not None and special_modes == "reject":
        raise Rejected("unsupported_mode", f"unsupported_mode:{special} (set input.special_modes=convert to convert to RGB)")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block is not worth the image; keep the stored orientation
        del e
    rgb = _to_rgb(img)
    return Decoded(rgb, rgb.width, rgb.height)


class DecodeStage(Stage):
    """source -> bytes -> validated RGB image at its original size (columns: sha256, width, height, image)."""

    name = "decode"
    stateful = False

    def __init__(self, max_pixels: int, min_size: int, special_modes: str):
        self.kw = dict(max_pixels=max_pixels, min_size=min_size, special_modes=special_modes)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["source"])
        sha = np.empty(n, dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        images = np.empty(n, dtype=object)
        reject = np.asarray(batch["reject"], dtype=object).copy()
        detail = np.asarray(batch["detail"], dtype=object).copy()
        for i in range(n):
            sha[i], images[i] = "", None
            try:
                data = read_bytes(str(batch["locator"][i]))
            except OSError as e:
                reject[i], detail[i] = "unreadable", f"{type(e).__name__}: {e.strerror or e}"
                continue
            sha[i] = hashlib.sha256(data).hexdigest()
            try:
                d = decode(data, **self.kw)
            except Rejected as r:
                reject[i], detail[i] = r.reason, r.detail
                continue
            width[i], height[i], images[i] = d.width, d.height, d.image
        return dict(batch, sha256=sha, width=width, height=height, image=images, reject=reject, detail=detail)

