"""Resize each image to its aspect-ratio bucket (sana_core.buckets): scale to cover, centre-crop.

Scaling so the image covers the bucket and cropping the overhang (as PixArt/Sana do) keeps the
aspect ratio undistorted; the nearest bucket in log aspect ratio keeps the crop small.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from curation.stage import Batch, Stage, error_reason
from sana_core.buckets import make_buckets, nearest_bucket

EMPTY = np.zeros((0, 0, 3), dtype=np.uint8)


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """RGB PIL image -> uint8 (bucket_h, bucket_w, 3)."""
    bh, bw = bucket
    w, h = img.size
    scale = max(bh / h, bw / w)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    out = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
    assert out.shape == (bh, bw, 3), out.shape
    return out


class ResizeStage(Stage):
    """image (PIL, original size) -> image (uint8 at bucket size), bucket_h, bucket_w [, jpg bytes].

    Each row is guarded: an exception while resizing or encoding one image rejects that row (`error:<Type>`)."""

    name = "resize"
    stateful = False

    def __init__(self, base: int, write_jpg: bool, jpg_quality: int):
        self.buckets = make_buckets(base)
        self.write_jpg, self.jpg_quality = write_jpg, jpg_quality

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["source"])
        images = np.empty(n, dtype=object)
        jpgs = np.empty(n, dtype=object)
        bh = np.zeros(n, dtype=np.int32)
        bw = np.zeros(n, dtype=np.int32)
        reject = np.asarray(batch["reject"], dtype=object).copy()
        detail = np.asarray(batch["detail"], dtype=object).copy() if "detail" in batch else np.full(n, "", object)
        for i in range(n):
            img = batch["image"][i]
            images[i], jpgs[i] = EMPTY, b""
            if reject[i] != "" or img is None:
                continue
            try:
                bucket = nearest_bucket(img.height, img.width, self.buckets)
                resized = resize_to_bucket(img, bucket)
                if self.write_jpg:
                    buf = io.BytesIO()
                    Image.fromarray(resized).save(buf, format="JPEG", quality=self.jpg_quality)
                    jpgs[i] = buf.getvalue()
            except Exception as e:  # noqa: BLE001 - the guard: one image's failure must not fail the task
                jpgs[i] = b""
                reject[i], detail[i] = error_reason(self.name, e)
                continue
            images[i] = resized
            bh[i], bw[i] = bucket
        out = dict(batch, image=images, bucket_h=bh, bucket_w=bw, reject=reject, detail=detail)
        if self.write_jpg:
            out["jpg"] = jpgs
        return out
