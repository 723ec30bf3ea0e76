"""The Gemma-2 text encoder against diffusers' SanaPipeline.encode_prompt, on the zoo's tiny Gemma."""
from __future__ import annotations

import random

import pytest
import torch

from sana_core.errors import SanaError
from sana_core.text_encoder import COMPLEX_HUMAN_INSTRUCTION, TextEncoder, trim_padding
from sana_core.zoo import caption_corpus


@pytest.fixture(scope="module")
def te(zoo):
    return TextEncoder.from_pretrained(zoo.gemma)


def _prompts(n, seed=0):
    rng = random.Random(seed + 1000 * n)  # seeded: a test draws the same prompts every run
    return [rng.choice(caption_corpus()) for _ in range(n)]


def test_shape_mask_and_dropped_instruction(te):
    short, long = "A cat", " ".join(_prompts(3))
    emb, mask = te.encode([short, long])
    assert emb.shape == (2, 300, te.hidden_size) and mask.shape == (2, 300) and mask.dtype == torch.bool
    for b, p in enumerate([short, long]):
        # Real tokens of CHI + prompt, less the CHI tokens that were dropped (BOS and the CHI's last token stay).
        n_real = len(te.tokenizer.encode(te.instruction + p.lower().strip())) - te.num_instruction_tokens + 2
        assert mask[b].sum().item() == n_real
        assert mask[b, :n_real].all() and not mask[b, n_real:].any()  # right padding
    emb_plain, mask_plain = te.encode([short], instruction=False)
    assert emb_plain.shape == (1, 300, te.hidden_size)
    assert mask_plain.sum().item() == len(te.tokenizer.encode(short.lower()))
    assert not torch.allclose(emb[0, 1], emb_plain[0, 1])  # the instruction conditions the prompt tokens


def test_encoder_runs_on_the_longest_prompt_and_trim_drops_only_padding(te):
    prompts = ["A cat", " ".join(_prompts(2)), ""]
    full, full_mask = te.encode(prompts)  # max_length positions
    emb, mask, used = te.encode_lengths(prompts)
    T = emb.shape[1]
    assert T == max(used) < 300 and used == [int(m.nonzero().max()) + 1 for m in mask]  # 1 + last real position
    assert torch.equal(full_mask[:, :T], mask) and not full_mask[:, T:].any()
    assert torch.allclose(full[:, :T][mask], emb[mask], rtol=1e-6, atol=1e-6)
    _, plain_mask, plain_used = te.encode_lengths(prompts, instruction=False)
    assert plain_used == [int(m.nonzero().max()) + 1 for m in plain_mask]
    for multiple in (1, 8, 64, 1000):
        e, m = trim_padding(emb, mask, max(used), multiple, 300)
        keep = min(300, -(-max(used) // multiple) * multiple)
        assert e.shape[1] == m.shape[1] == keep and keep >= max(used)
        assert torch.equal(m, full_mask[:, :keep]) and torch.equal(e[:, :T], emb) and (e[:, T:] == 0).all()
    assert trim_padding(emb, mask, max(used), 0, 300)[0].shape[1] == 300  # 0: Sana's fixed length


@pytest.mark.parametrize("long", [False, True], ids=["short-batch", "with-a-truncated-prompt"])
def test_matches_diffusers_encode_prompt(te, zoo, long):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from sana_core.autoencoder import Autoencoder
    from sana_core.dit import DIT_CONFIGS

    pipe = SanaPipeline(tokenizer=te.tokenizer, text_encoder=te.model, vae=Autoencoder.from_pretrained(zoo.dcae).vae,
                        transformer=SanaTransformer2DModel(**DIT_CONFIGS["tiny"].to_diffusers_config()),
                        scheduler=DPMSolverMultistepScheduler())
    prompts = _prompts(3) + ([" ".join(_prompts(40))] if long else [])  # longer than max_length: truncated
    ref, ref_mask, ref_neg, ref_neg_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="", device=torch.device("cpu"),
        complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION)
    emb, mask = te.encode(prompts)
    neg, neg_mask = te.encode([""] * len(prompts), instruction=False)
    assert torch.equal(mask, ref_mask.bool()) and torch.equal(neg_mask, ref_neg_mask.bool())
    assert mask[:, -1].any() == long
    # the real positions equal diffusers'; past the batch's longest prompt ours are zero (padding either way)
    assert torch.allclose(emb[mask], ref[mask], rtol=1e-5, atol=1e-6)
    assert torch.allclose(neg[neg_mask], ref_neg[neg_mask], rtol=1e-5, atol=1e-6)
    assert (emb[:, mask.sum(1).max():] == 0).all() and (neg[:, 1:] == 0).all()


def test_embedding_does_not_depend_on_the_rest_of_the_batch(te):
    p, longer = _prompts(1)[0], " ".join(_prompts(4))
    alone, mask_alone = te.encode([p])
    batched, mask_batched = te.encode([longer, p])
    assert torch.equal(mask_alone[0], mask_batched[1])
    real = mask_alone[0]
    assert torch.allclose(alone[0, real], batched[1, real], rtol=1e-5, atol=1e-5)


def test_bad_path_is_one_line_naming_it(tmp_path):
    with pytest.raises(SanaError, match="no-such-gemma") as e:
        TextEncoder.from_pretrained(str(tmp_path / "no-such-gemma"))
    assert "\n" not in str(e.value)


def test_loads_from_a_diffusers_sana_repo_layout(te, tmp_path):
    te.model.save_pretrained(tmp_path / "text_encoder")
    te.tokenizer.save_pretrained(tmp_path / "tokenizer")
    again = TextEncoder.from_pretrained(str(tmp_path))
    prompts = _prompts(2)
    a, ma = te.encode(prompts)
    b, mb = again.encode(prompts)
    assert torch.equal(ma, mb) and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
