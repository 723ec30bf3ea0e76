"""Gemma-2 as Sana's text encoder: a decoder-only LM whose last hidden state conditions the DiT.

What Sana (and diffusers' SanaPipeline, which this reproduces token for token) does to a prompt:
  1. lower-case and strip it;
  2. prepend the "complex human instruction" (CHI) below, so that the causal LM reads the prompt in the
     context of "describe this image in detail" -- the prompt tokens' hidden states then carry that intent;
  3. tokenize with BOS, right padding and truncation to len(CHI tokens) + max_length - 2;
  4. run the decoder with the padding mask and take the last hidden state (after the final norm);
  5. keep BOS plus the last max_length - 1 positions, which drops the CHI tokens (the sequence is padded to
     a fixed length, so those positions are the prompt and its padding).
Unconditional / negative prompts are encoded without the CHI, padded straight to max_length (step 2, 3 and 5
skipped), as diffusers and NVlabs/Sana do; `encode(prompts, instruction=False)` gives that.

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
        """prompts -> (emb (B, max_length, hidden_size), mask (B, max_length) bool, True = real token)."""
        emb, mask, _ = self.encode_lengths(prompts, instruction)
        return emb, mask

    def encode_lengths(self, prompts: list[str],
                       instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """As encode, and how many leading positions each prompt uses (1 + its last real token's index), read
        from the tokenizer's mask on the host: what trim_padding needs, without waiting for the device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p.lower().strip() for p in prompts]
        use_chi = instruction and bool(self.instruction)
        if use_chi:
            prompts = [self.instruction + p for p in prompts]
            length = self.num_instruction_tokens + self.max_length - 2
        else:
            length = self.max_length
        tok = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        host_mask = tok.attention_mask
        ids, mask = tok.input_ids.to(self.device), host_mask.to(self.device)
        emb = self.model(ids, attention_mask=mask).last_hidden_state
        if use_chi:
            keep = [0] + list(range(length - self.max_length + 1, length))  # BOS + the last max_length - 1
            emb, mask, host_mask = emb[:, keep], mask[:, keep], host_mask[:, keep]
        positions = torch.arange(1, host_mask.shape[1] + 1)
        used = (host_mask.bool() * positions).amax(1).clamp_min(1).tolist()
        return emb, mask.bool(), used


def trim_padding(emb: torch.Tensor, mask: torch.Tensor, used: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that no prompt of the batch uses (`used`: the most any uses), keeping a
    multiple of `multiple` of them (0: keep all). The DiT's cross-attention gives padding keys weight 0 (an
    additive -10000, exp of which is 0 in float32), so the output is the same up to rounding, while the
    cross-attention, its key/value projections and the caption projection shrink with the caption: Sana pads every
    caption to 300 tokens. The multiple bounds how many shapes a run sees (one CUDA graph each, with
    model.cuda_graphs)."""
    if multiple <= 0:
        return emb, mask
    keep = min(emb.shape[1], -(-max(used, 1) // multiple) * multiple)
    return emb[:, :keep], mask[:, :keep]
