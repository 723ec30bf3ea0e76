"""CLIP scoring: every caption against its image, 100 x cosine similarity of the open_clip embeddings.

Captions longer than CLIP's text context (77 tokens for OpenAI CLIP, SOT/EOT included) are never
silently truncated: the caption is split at word boundaries into consecutive chunks that each fit,
every chunk is scored against the image, and the caption's score is the mean of its chunk scores
(a single word too long for the context is split by characters). A caption that fits is one chunk.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from curation.stage import Batch, Stage, caption_column, clip_column


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the text occupies in the context, start/end tokens included."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer: BPE ids without SOT/EOT
        return len(tokenizer.encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if hf is not None:
        return len(hf(text)["input_ids"])
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}")


def _split_word(tokenizer, word: str, limit: int) -> list[str]:
    if count_tokens(tokenizer, word) <= limit or len(word) <= 1:
        return [word]
    mid = len(word) // 2
    return _split_word(tokenizer, word[:mid], limit) + _split_word(tokenizer, word[mid:], limit)


def chunk_caption(tokenizer, text: str, context_length: int) -> list[str]:
    """Consecutive word chunks of `text`, each fitting `context_length` tokens; [] for an empty text."""
    words = [p for w in text.split() for p in _split_word(tokenizer, w, context_length)]
    chunks: list[str] = []
    cur: list[str] = []
    for w in words:
        if cur and count_tokens(tokenizer, " ".join(cur + [w])) > context_length:
            chunks.append(" ".join(cur))
            cur = [w]
        else:
            cur.append(w)
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ClipScorer:
    """Loads one open_clip model through sana_core.clip.load_clip and scores (image, caption) pairs."""

    def __init__(self, model: str, pretrained: str, device: str = "auto"):
        from sana_core.clip import load_clip

        self.device = pick_device(device)
        self.model, self.preprocess, self.tokenizer = load_clip(model, pretrained, self.device)
        self.model.eval()
        self.context_length = int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    @torch.no_grad()
    def image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.stack([self.preprocess(Image.fromarray(a)) for a in images]).to(self.device)
        f = self.model.encode_image(x).float()
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        f = self.model.encode_text(tokens).float()
        return f / f.norm(dim=-1, keepdim=True)

    def score(self, image_feats: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Mean chunk score per caption (NaN for an empty caption); image_feats aligned with captions."""
        owners, chunks = [], []
        for i, c in enumerate(captions):
            for ch in chunk_caption(self.tokenizer, c, self.context_length):
                owners.append(i)
                chunks.append(ch)
        out = np.full(len(captions), math.nan, dtype=np.float32)
        if not chunks:
            return out
        tf = self.text_features(chunks)
        owners_t = torch.tensor(owners, device=tf.device)
        sims = 100.0 * (tf * image_feats[owners_t]).sum(-1)
        total = torch.zeros(len(captions), device=tf.device).index_add_(0, owners_t, sims)
        count = torch.zeros(len(captions), device=tf.device).index_add_(0, owners_t, torch.ones_like(sims))
        has = count > 0
        out[has.cpu().numpy()] = (total[has] / count[has]).cpu().numpy().astype(np.float32)
        return out


class ClipStage(Stage):
    """caption__<vlm> columns + image -> clip__<vlm> float32 columns."""

    name = "clip"

    def __init__(self, model: str, pretrained: str, vlms: list[str], device: str = "auto"):
        self.scorer = ClipScorer(model, pretrained, device)
        self.vlms = list(vlms)

    def __call__(self, batch: Batch) -> Batch:
        images = list(batch["image"])
        if not images:
            return dict(batch, **{clip_column(v): np.zeros(0, np.float32) for v in self.vlms})
        feats = self.scorer.image_features(images)
        out = dict(batch)
        for v in self.vlms:
            out[clip_column(v)] = self.scorer.score(feats, [str(c) for c in batch[caption_column(v)]])
        return out
