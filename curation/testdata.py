"""A folder of synthetic images, good and every kind of bad, with the outcome the job must produce.

    expected = make_image_folder(dir, n_good=28, seed=0)
    expected.accepted            # set of absolute paths that must become samples
    expected.rejected            # {absolute path: reason} that must land in rejected.parquet

Good images are random shapes on random backgrounds at assorted aspect ratios (JPEG and PNG), so CLIP
and the DC-AE see real variety. The bad ones cover what real crawls contain.
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

# Sizes used by the tiny preset's checks: min_size=32, max_pixels=4096*4096.
BOMB_SIDE = 4200  # 4200^2 > 4096^2 pixels, yet a tiny PNG file


@dataclass
class Expected:
    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)  # path -> reason
    converted: dict[str, str] = field(default_factory=dict)  # special-mode path -> its mode (accepted under convert)

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

    # Special modes: rejected under the default policy, correct RGB under special_modes=convert.
    import numpy as np

    grad = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    specials = {
        "sixteen_bit.png": (_encoded(Image.fromarray(grad), "PNG"), "I;16"),
        "cmyk.jpg": (_encoded(sample.convert("CMYK"), "JPEG", quality=90), "CMYK"),
        "palette.png": (_encoded(sample.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "P"),
        "alpha.png": (_encoded(Image.merge("RGBA", (*sample.split(), sample.convert("L"))), "PNG"), "RGBA"),
    }
    for name, (data, mode) in specials.items():
        p = rejected(name, data, "unsupported_mode")
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
