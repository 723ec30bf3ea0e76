"""Decode and validate one input: every way an input can be bad ends in a reason, never a crash.

Reasons (the fixed set in docs/data_contract.md): empty_file, too_large, unreadable, not_an_image, truncated,
decompression_bomb, too_small, unsupported_mode (only under input.special_modes=reject), and
`error:<ExceptionType>` for anything unexpected while reading, decoding or converting one input (the guard:
one input's failure never fails the task).

Conversion to 8-bit sRGB RGB (`to_rgb`, the default `special_modes: convert`), done as browsers and img2dataset do:
- palette, colour-key transparency, RGBA/LA (also premultiplied): alpha composited over `input.background`;
- 16-bit (I;16*) modes scaled to 8 bits, 32-bit integer (I) likewise from its range (16-bit values, else
  0..2^31-1, or the signed range when negative); float (F) from [0, 1] or [0, 255];
- an embedded ICC profile (CMYK, RGB such as Display P3 / Adobe RGB, grey) converted to sRGB with Pillow's
  ImageCms (LittleCMS); LAB through ImageCms' Lab profile; CMYK without a profile by Pillow's plain formula;
- animated images: the first frame; EXIF orientation applied.
`Decoded.mode` records what the input was, for the manifest's `mode` column: PIL's mode of the input, plus
`+transparency` (palette/colour-key transparency composited), `+icc` (converted through its profile),
`+icc_invalid` (a profile LittleCMS cannot use: converted plainly), `+animated` (first frame of several).
"""
from __future__ import annotations

import functools
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from curation.read import InputTooLarge, read_bytes
from curation.stage import Batch, Stage, error_reason
from sana_core.secrets import redact_text

# Modes a plain .convert("RGB") handles without losing meaning (special_modes=reject keeps only these).
PLAIN_MODES = {"RGB", "L", "1", "YCbCr"}
HIGH_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS", "I", "F"}
ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "RGB", "RGBa": "RGB", "La": "L"}  # -> the colour part's mode
WHITE = (255, 255, 255)


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


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth single-channel image as 8-bit L."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are stored either normalised to [0, 1] (HDR/linear tools) or in 0..255.
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        a = a * scale
    elif img.mode == "I" and a.size and a.min() < 0:
        a = (a.astype(np.float64) + 2.0**31) * (255.0 / (2.0**32 - 1))  # signed 32-bit: full range -> 0..255
    elif img.mode == "I" and a.size and a.max() > 65535:
        a = a.astype(np.float64) * (255.0 / (2.0**31 - 1))  # non-negative 32-bit: PIL's I tops out at 2^31 - 1
    else:
        # I;16 variants, and I holding 16-bit data (PIL opens some 16-bit PNG/TIFF as I).
        a = a.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))


@functools.lru_cache(maxsize=32)
def _transform(icc: bytes | None, in_mode: str) -> ImageCms.ImageCmsTransform:
    """A transform from the embedded profile (None: ImageCms' Lab) to sRGB; building one costs milliseconds."""
    src = _LAB if icc is None else ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(src, _SRGB, in_mode, "RGB", renderingIntent=ImageCms.getDefaultIntent(src))


def _is_srgb(icc: bytes) -> bool:
    # Most camera and web JPEGs embed an sRGB profile: transforming through it is an identity up to rounding.
    try:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (ImageCms.PyCMSError, OSError, TypeError, ValueError):
        return False
    return desc.strip().lower().startswith("srgb")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> tuple[Image.Image, list[str]]:
    """Any PIL image (first frame, orientation applied) -> (8-bit sRGB RGB image, flags for the `mode` record)."""
    flags: list[str] = []
    icc = img.info.get("icc_profile") or None
    alpha = None
    transparency = img.info.get("transparency")
    if transparency is not None and img.mode in HIGH_BIT and isinstance(transparency, int):
        alpha = Image.fromarray(np.where(np.asarray(img) == transparency, 0, 255).astype(np.uint8), "L")
        flags.append("transparency")
    elif transparency is not None and img.mode in ("P", "L", "RGB", "1"):
        img = img.convert("LA" if img.mode in ("L", "1") else "RGBA")  # PIL applies the palette / colour key
        flags.append("transparency")
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ALPHA_MODES:
        colour = ALPHA_MODES[img.mode]
        img = img.convert("LA" if colour == "L" else "RGBA")  # un-premultiplies RGBa / La, expands PA
        alpha = img.getchannel("A")
        img = img.convert(colour)
    if img.mode in HIGH_BIT:
        img = _to_8bit(img)
    if img.mode == "LAB":
        # PIL holds a*/b* offset by 128 (as np.asarray and TIFF show) but hands the bytes to LittleCMS, which
        # reads them as signed: neutral grey came out cyan. Flip the offset so that LittleCMS sees what it expects.
        lab = np.array(img)
        lab[..., 1:] ^= 0x80
        img = Image.fromarray(lab, "LAB")
    if icc and img.mode in ("RGB", "L", "CMYK", "LAB") and not _is_srgb(icc):
        try:
            img = ImageCms.applyTransform(img, _transform(icc, img.mode))
            flags.append("icc")
        except (ImageCms.PyCMSError, OSError, TypeError, ValueError):
            flags.append("icc_invalid")  # a broken profile, or one of another colour space than the pixels
    if img.mode == "LAB":  # no (usable) profile: CIELAB D50, as TIFF and PIL define the mode
        img = ImageCms.applyTransform(img, _transform(None, "LAB"))
    rgb = img.convert("RGB")
    if alpha is not None:
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, tuple(background)), alpha)
    return rgb, flags


@dataclass
class Decoded:
    image: Image.Image  # 8-bit sRGB RGB, EXIF orientation applied
    width: int
    height: int
    mode: str = "RGB"  # the input's mode and conversion flags, e.g. "P+transparency+animated", "CMYK+icc"


def decode(data: bytes, *, max_pixels: int, min_size: int, special_modes: str = "convert",
           background: tuple[int, int, int] | list[int] = WHITE) -> Decoded:
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
            # is_animated peeks at the second frame and seeks back; load() then decodes the first.
            animated = bool(getattr(img, "is_animated", False))
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
    mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block is not worth the image; keep the stored orientation
        del e
    rgb, flags = to_rgb(img, tuple(background))
    if animated:
        flags.append("animated")
    return Decoded(rgb, rgb.width, rgb.height, "+".join([mode, *flags]))


class DecodeStage(Stage):
    """source -> bytes -> validated RGB image at its original size (columns: sha256, width, height, mode, image).

    Each input is guarded on its own: any exception while reading, decoding or converting it rejects that input
    (reason `error:<Type>`, detail naming the stage and the message) and the rest of the batch goes on."""

    name = "decode"
    stateful = False

    def __init__(self, max_pixels: int, min_size: int, special_modes: str = "convert",
                 background: tuple[int, int, int] | list[int] = WHITE, max_bytes: int = 0):
        self.kw = dict(max_pixels=max_pixels, min_size=min_size, special_modes=special_modes,
                       background=tuple(background))
        self.max_bytes = max_bytes

    def _read(self, locator: str) -> bytes:
        try:
            return read_bytes(locator, max_bytes=self.max_bytes)
        except InputTooLarge as e:
            raise Rejected("too_large", f"{e.size} bytes > input.max_bytes={self.max_bytes}") from None
        except OSError as e:
            raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["source"])
        sha = np.empty(n, dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        modes = np.empty(n, dtype=object)
        images = np.empty(n, dtype=object)
        reject = np.asarray(batch["reject"], dtype=object).copy()
        detail = np.asarray(batch["detail"], dtype=object).copy()
        for i in range(n):
            sha[i], modes[i], images[i] = "", "", None
            if reject[i]:
                continue
            try:
                data = self._read(str(batch["locator"][i]))
                sha[i] = hashlib.sha256(data).hexdigest()
                d = decode(data, **self.kw)
            except Rejected as r:
                reject[i], detail[i] = r.reason, r.detail
                continue
            except Exception as e:  # noqa: BLE001 - the guard: one input's failure must not fail the task
                reject[i], detail[i] = error_reason(self.name, e)
                continue
            width[i], height[i], modes[i], images[i] = d.width, d.height, d.mode, d.image
        # Messages may quote a locator: signed URLs and user:pass@ never reach rejected.parquet.
        detail = np.array([redact_text(str(x)) for x in detail], dtype=object)
        return dict(batch, sha256=sha, width=width, height=height, mode=modes, image=images, reject=reject,
                    detail=detail)
