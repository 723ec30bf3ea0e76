"""DC-AE wrapper and the text-to-image pipeline (tiny DiT + zoo Gemma + zoo DC-AE), checked against diffusers."""
from __future__ import annotations

import pytest
import torch

from sana_core.autoencoder import Autoencoder
from sana_core.dit import DIT_CONFIGS, LinearDiT, to_diffusers_state_dict
from sana_core.errors import SanaError
from sana_core.pipeline import SanaPipeline
from sana_core.text_encoder import TextEncoder


@pytest.fixture(scope="module")
def parts(zoo):
    return LinearDiT(DIT_CONFIGS["tiny"]).eval(), TextEncoder.from_pretrained(zoo.gemma), \
        Autoencoder.from_pretrained(zoo.dcae)


def test_autoencoder_scaling_and_shapes(parts):
    ae = parts[2]
    assert (ae.spatial_compression, ae.latent_channels, ae.scaling_factor) == (32, 32, pytest.approx(0.41407))
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    z = ae.encode(images)
    assert z.shape == (2, 32, 2, 3)
    assert torch.allclose(z, ae.vae.encode(images).latent * 0.41407)
    out = ae.decode(z)
    assert out.shape == images.shape
    assert torch.allclose(out, ae.vae.decode(z / 0.41407).sample)
    with pytest.raises(SanaError, match="multiples of 32"):
        ae.encode(torch.rand(1, 3, 40, 64))
    with pytest.raises(SanaError, match="no-such-dcae"):
        Autoencoder.from_pretrained("/nonexistent/no-such-dcae")


def test_autoencoder_loads_from_a_diffusers_sana_repo_layout(parts, tmp_path):
    ae = parts[2]
    ae.vae.save_pretrained(tmp_path / "vae")
    again = Autoencoder.from_pretrained(str(tmp_path))
    z = torch.randn(1, 32, 1, 2)
    assert torch.allclose(again.decode(z), ae.decode(z), atol=1e-6)


def test_pipeline_images_are_sized_and_seeded(parts):
    pipe = SanaPipeline(*parts)
    prompts = ["a red car parked near a wooden table", "A cat"]
    a = pipe(prompts, height=64, width=96, steps=4, seed=7)
    b = pipe(prompts, height=64, width=96, steps=4, seed=7)
    c = pipe(prompts, height=64, width=96, steps=4, seed=8)
    assert len(a) == 2 and all(im.size == (96, 64) and im.mode == "RGB" for im in a)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert any(x.tobytes() != y.tobytes() for x, y in zip(a, c))
    with pytest.raises(SanaError, match="multiples of 32"):
        pipe(prompts, height=50, width=96)


def test_pipeline_matches_diffusers_sana_pipeline(parts):
    from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
    from diffusers import SanaPipeline as DiffusersSanaPipeline

    _, te, ae = parts
    torch.manual_seed(0)  # the weights and the noise below
    dit = LinearDiT(DIT_CONFIGS["tiny"]).eval()
    with torch.no_grad():  # random weights (the default init zeroes nothing, but is small)
        for p in dit.parameters():
            p.normal_(0, 0.1)
    ref_dit = SanaTransformer2DModel(**dit.cfg.to_diffusers_config()).eval()
    ref_dit.load_state_dict(to_diffusers_state_dict(dit), strict=True)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        algorithm_type="dpmsolver++", solver_order=2)
    ref = DiffusersSanaPipeline(tokenizer=te.tokenizer, text_encoder=te.model, vae=ae.vae, transformer=ref_dit,
                                scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    prompts = ["A busy city street at dusk", "a blue square on a white background"]
    noise = torch.randn(2, 32, 2, 3)
    kw = {"height": 64, "width": 96, "guidance_scale": 4.5}
    expected = ref(prompts, num_inference_steps=14, latents=noise.clone(), use_resolution_binning=False,
                   output_type="latent", **kw).images
    ours = SanaPipeline(dit, te, ae, shift=3.0).latents(prompts, steps=14, solver="flow_dpm", noise=noise, **kw)
    err = ((ours - expected).norm() / expected.norm()).item()
    print(f"pipeline latents vs diffusers SanaPipeline (14 steps, CFG 4.5): relative error {err:.2e}")
    assert err <= 1e-5
    # and the decoded images too
    ref_images = ref(prompts, num_inference_steps=14, latents=noise.clone(), use_resolution_binning=False,
                     output_type="pt", **kw).images
    ours_images = ae.decode(ours) / 2 + 0.5
    assert torch.allclose(ours_images.clamp(0, 1), ref_images, atol=1e-4)
