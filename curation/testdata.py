"""A folder of synthetic images, good and every kind of bad, with the outcome the job must produce.

    expected = make_image_folder(dir, n_good=28, seed=0)
    expected.accepted            # set of absolute paths that must become samples
    expected.rejected            # {absolute path: reason} that must land in rejected.parquet
    expected.converted           # {absolute path: manifest `mode`} of the special-mode images among the accepted
                                 # (palette, alpha, 16-bit, CMYK with/without ICC, animated): unsupported_mode
                                 # under input.special_modes=reject

Good images are random shapes on random backgrounds at assorted aspect ratios (JPEG and PNG), so CLIP
and the DC-AE see real variety. The bad ones cover what real crawls contain.
"""
from __future__ import annotations

import io
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw

# Sizes used by the tiny preset's checks: min_size=32, max_pixels=4096*4096.
BOMB_SIDE = 4200  # 4200^2 > 4096^2 pixels, yet a tiny PNG file


@dataclass
class Expected:
    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)  # path -> reason
    converted: dict[str, str] = field(default_factory=dict)  # special-mode path -> its manifest mode (accepted)

    @property
    def all(self) -> set[str]:
        return self.accepted | set(self.rejected)


def _random_image(rng: random.Random, w: int, h: int) -> Image.Image:
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(w // 8, w // 2 + 1)), min(h, y0 + rng.randint(h // 8, h // 2 + 1))
        color = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)], fill=color)
    return img


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def cmyk_icc_profile(corner_rgb: Callable[[int, int, int, int], tuple[int, int, int]]) -> bytes:
    """A real ICC v2 input profile CMYK -> Lab (one lut8 A2B0 tag, 2-point grid) whose 16 ink corners map to the
    Lab of the sRGB colours `corner_rgb(c, m, y, k)` (each 0 or 1). LittleCMS (Pillow's ImageCms) cannot create
    CMYK profiles and no CMYK profile ships with the packages here, so tests build one: a profile that maps ink
    to *other* colours than Pillow's plain CMYK formula shows whether a converter honoured it."""
    corners = [(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)]  # first input slowest
    rgb = Image.fromarray(np.array([corner_rgb(*c) for c in corners], np.uint8).reshape(1, -1, 3), "RGB")
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = np.asarray(ImageCms.applyTransform(rgb, to_lab)).reshape(-1, 3).astype(np.int16)
    lab[:, 1:] = lab[:, 1:].astype(np.uint8).view(np.int8).astype(np.int16) + 128  # ICC lut8 Lab: a*, b* + 128
    ident = bytes(range(256))
    a2b0 = (b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
            + ident * 4 + lab.astype(np.uint8).tobytes() + ident * 3)
    text = b"sana test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    d50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"cprt", b"text" + bytes(4) + b"none\0"),
            (b"A2B0", a2b0)]
    offset, table, body = 128 + 4 + 12 * len(tags), struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        body += bytes(-(offset + len(body)) % 4)  # tags start on 4-byte boundaries
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"scnr" + b"CMYK" + b"Lab "
              + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48))
    return header + table + body


def swapped_cmyk(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    """Plain CMYK -> RGB with red and blue swapped: cyan ink shows as yellow under cmyk_icc_profile(swapped_cmyk)."""
    return tuple(int(255 * (1 - k) * (1 - ink)) for ink in (y, m, c))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_image_folder(root: str | Path, n_good: int = 28, seed: int = 0) -> Expected:
    """Write n_good good images plus one of each bad kind under root (in nested folders)."""
    root = Path(root)
    (root / "good" / "nested").mkdir(parents=True, exist_ok=True)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    exp = Expected()
    sides = [(96, 96), (128, 96), (96, 128), (160, 80), (80, 160), (200, 120), (64, 48), (300, 200), (120, 240)]
    for i in range(n_good):
        w, h = sides[i % len(sides)]
        w, h = w + rng.randint(0, 24), h + rng.randint(0, 24)
        img = _random_image(rng, w, h)
        sub = root / "good" / ("nested" if i % 3 == 0 else "")
        if i % 2 == 0:
            p = sub / f"img_{i:03d}.jpg"
            p.write_bytes(_encoded(img, "JPEG", quality=90))
        else:
            p = sub / f"img_{i:03d}.png"
            p.write_bytes(_encoded(img, "PNG"))
        exp.accepted.add(str(p.absolute()))

    bad = root / "bad"

    def rejected(name: str, data: bytes, reason: str) -> Path:
        p = bad / name
        p.write_bytes(data)
        exp.rejected[str(p.absolute())] = reason
        return p

    sample = _random_image(rng, 120, 90)
    jpg, png = _encoded(sample, "JPEG", quality=90), _encoded(sample, "PNG")
    rejected("zero_bytes.jpg", b"", "empty_file")
    rejected("truncated.jpg", jpg[: len(jpg) // 2], "truncated")
    rejected("truncated.png", png[: len(png) // 2], "truncated")
    rejected("not_an_image.png", b"this is a text file, not a picture\n" * 20, "not_an_image")
    rejected("html_page.jpg", b"<html><body>404 not found</body></html>", "not_an_image")
    rejected("bomb.png", _encoded(Image.new("1", (BOMB_SIDE, BOMB_SIDE)), "PNG", optimize=True), "decompression_bomb")
    rejected("too_small.png", _encoded(_random_image(rng, 16, 24), "PNG"), "too_small")

    # Special modes: converted to RGB by default (accepted), unsupported_mode under special_modes=reject.
    grad = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    palette_t = sample.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [_random_image(rng, 80, 60) for _ in range(3)]
    specials = {
        "sixteen_bit.png": (_encoded(Image.fromarray(grad), "PNG"), "I;16"),
        "cmyk.jpg": (_encoded(sample.convert("CMYK"), "JPEG", quality=90), "CMYK"),
        "cmyk_icc.jpg": (_encoded(sample.convert("CMYK"), "JPEG", quality=90,
                                  icc_profile=cmyk_icc_profile(swapped_cmyk)), "CMYK+icc"),
        "palette.png": (_encoded(sample.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "P"),
        "palette_transparent.png": (_encoded(palette_t, "PNG", transparency=0), "P+transparency"),
        "alpha.png": (_encoded(Image.merge("RGBA", (*sample.split(), sample.convert("L"))), "PNG"), "RGBA"),
        "grey_alpha.png": (_encoded(Image.merge("LA", (sample.convert("L"), sample.getchannel("G"))), "PNG"), "LA"),
        "animated.gif": (_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
                         "P+animated"),
    }
    special_dir = root / "special"
    special_dir.mkdir(exist_ok=True)
    for name, (data, mode) in specials.items():
        p = special_dir / name
        p.write_bytes(data)
        exp.accepted.add(str(p.absolute()))
        exp.converted[str(p.absolute())] = mode

    link = bad / "dangling.jpg"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(bad / "does_not_exist.jpg", link)
    exp.rejected[str(link.absolute())] = "unreadable"
    if os.geteuid() != 0:  # root reads anything, so a mode-000 file is only unreadable for other users
        p = rejected("no_permission.jpg", jpg, "unreadable")
        os.chmod(p, 0)
    (root / "notes.txt").write_text("not an image extension: ignored, not an input\n")
    return exp
