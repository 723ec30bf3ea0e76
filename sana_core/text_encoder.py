"""Gemma-2 as Sana's text encoder: a decoder-only LM whose last hidden state conditions the DiT.

What Sana (and diffusers' SanaPipeline, which this reproduces token for token) does to a prompt:
  1. lower-case and strip it;
  2. prepend the "complex human instruction" (CHI) below, so that the causal LM reads the prompt in the
     context of "describe this image in detail" -- the prompt tokens' hidden states then carry that intent;
  3. tokenize with BOS, right padding and truncation to len(CHI tokens) + max_length - 2 (padded here only to
     the batch's longest prompt: right padding and causal attention leave the real positions as they are);
  4. run the decoder with the padding mask and take the last hidden state (after the final norm);
  5. keep BOS plus the last max_length - 1 positions of the sequence padded to that fixed length, which drops
     the CHI tokens: the prompt and its padding (here: BOS and the positions from the CHI's last token on).
Unconditional / negative prompts are encoded without the CHI, padded to max_length (step 2, 3 and 5 skipped),
as diffusers and NVlabs/Sana do; `encode(prompts, instruction=False)` gives that. `encode` returns max_length
positions (zero past the batch's longest prompt); `encode_lengths` and `trim_padding` give the batch only the
positions it uses, which is what training and sampling run on.

Right padding and causal attention make each prompt's embedding independent of the rest of the batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sana_core.errors import SanaError

# diffusers.SanaPipeline.__call__'s default `complex_human_instruction` (= NVlabs/Sana's config), joined by "\n".
COMPLEX_HUMAN_INSTRUCTION = [
    ("Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:"),
    ("- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes."),
    ("- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating."),
    "Here are examples of how to transform or refine prompts:",
    ("- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers."),
    ("- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers."),
    ("Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:"),
    "User Prompt: ",
]
CHI_PROMPT = "\n".join(COMPLEX_HUMAN_INSTRUCTION)


def _subfolder(path: str, name: str) -> dict:
    """A diffusers Sana repo keeps the encoder and tokenizer in subfolders; a plain Gemma folder does not."""
    return {"subfolder": name} if (Path(path) / name).is_dir() else {}


class TextEncoder:
    def __init__(self, model, tokenizer, max_length: int = 300, instruction: str = CHI_PROMPT):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # causal LM: right padding keeps real tokens batch-independent
        self.max_length = max_length
        self.instruction = instruction
        self.num_instruction_tokens = len(tokenizer.encode(instruction)) if instruction else 0
        self.hidden_size: int = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path_or_hf_id: str, max_length: int = 300, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
        """A Gemma-2 folder or hub id (e.g. google/gemma-2-2b-it), or a diffusers Sana repo with
        text_encoder/ and tokenizer/ subfolders."""
        from transformers import AutoModel, AutoTokenizer

        path_or_hf_id = str(path_or_hf_id)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path_or_hf_id, **_subfolder(path_or_hf_id, "tokenizer"))
            # AutoModel gives the bare decoder (Gemma2Model) even from a *ForCausalLM checkpoint.
            model = AutoModel.from_pretrained(path_or_hf_id, dtype=dtype,
                                              **_subfolder(path_or_hf_id, "text_encoder"))
        except Exception as e:  # transformers raises OSError/ValueError/... with multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SanaError(f"cannot load the Gemma text encoder from {path_or_hf_id!r}: {first}") from e
        return cls(model.to(device), tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str], instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (emb (B, max_length, hidden_size), mask (B, max_length) bool, True = real token). Real
        positions equal diffusers' encode_prompt; positions past the batch's longest prompt are zero (diffusers
        fills them with the encoder's states of padding tokens: the DiT gives either weight 0)."""
        emb, mask, _ = self.encode_lengths(prompts, instruction)
        return fit_padding(emb, mask, self.max_length)

    @torch.no_grad()
    def encode_lengths(self, prompts: list[str],
                       instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """-> (emb (B, T, hidden_size), mask (B, T), used): T <= max_length positions, as many as the batch's
        longest prompt takes; used[i] = 1 + prompt i's last real position, read from the tokenizer's mask on the
        host (no device sync). The encoder runs on the batch padded to its longest prompt, not to max_length:
        right padding and causal attention leave the real positions' states as they are (and the CHI's ~200
        tokens plus a short prompt are much less than CHI + 300)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p.lower().strip() for p in prompts]
        use_chi = instruction and bool(self.instruction)
        if use_chi:
            prompts = [self.instruction + p for p in prompts]
            length = self.num_instruction_tokens + self.max_length - 2
        else:
            length = self.max_length
        tok = self.tokenizer(prompts, padding="longest", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        host_mask = tok.attention_mask
        ids, mask = tok.input_ids.to(self.device), host_mask.to(self.device)
        emb = self.model(ids, attention_mask=mask).last_hidden_state
        if use_chi:
            # BOS + everything from the CHI's last token on: what "BOS + the last max_length - 1 positions" of the
            # sequence padded to CHI + max_length - 2 (diffusers, NVlabs/Sana) selects, without that padding.
            keep = [0] + list(range(self.num_instruction_tokens - 1, ids.shape[1]))
            emb, mask, host_mask = emb[:, keep], mask[:, keep], host_mask[:, keep]
        positions = torch.arange(1, host_mask.shape[1] + 1)
        used = (host_mask.bool() * positions).amax(1).clamp_min(1).tolist()
        return emb, mask.bool(), used


# Captions are cut to a multiple of this many positions by default (training and sampling): few enough shapes,
# little padding left.
CAPTION_BUCKET = 64


def fit_padding(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """emb (B, T, C) and mask (B, T) cut or padded to `length` positions (padding: embedding 0, mask False)."""
    B, T, C = emb.shape
    if T >= length:
        return emb[:, :length], mask[:, :length]
    return (torch.cat([emb, emb.new_zeros(B, length - T, C)], 1),
            torch.cat([mask, mask.new_zeros(B, length - T)], 1))


def trim_padding(emb: torch.Tensor, mask: torch.Tensor, used: int, multiple: int,
                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """emb and mask to the positions the batch uses (`used`: the most any prompt uses), rounded up to a multiple
    of `multiple` and at most max_length (multiple 0: max_length, Sana's fixed 300), cutting or zero-padding
    (fit_padding). The DiT's cross-attention gives padding keys weight 0 (an additive -10000, exp of which is 0 in
    float32), so its output is the same up to rounding, while the cross-attention, its key/value projections and
    the caption projection shrink with the caption. The multiple bounds how many shapes a run sees (one CUDA graph
    each, where graphs are on)."""
    return fit_padding(emb, mask, kept_length(used, multiple, max_length))


def kept_length(used: int, multiple: int, max_length: int) -> int:
    """How many positions trim_padding keeps for a batch whose prompts use at most `used`."""
    return max_length if multiple <= 0 else min(max_length, -(-max(used, 1) // multiple) * multiple)
