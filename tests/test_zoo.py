"""The tiny zoo loads through the real production loaders.

VLM engines are started once, in tests/test_caption.py: there every zoo VLM answers captioning chat
requests through real vLLM (`vllm.LLM.chat`). Here the VLM folders are checked with transformers' own
loaders (config, processor, chat template with an image), which is what vLLM reads from them.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sana_core.errors import SanaError
from sana_core.zoo import ZOO_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gemma_encodes_a_prompt(zoo):
    from transformers import AutoModel, AutoTokenizer, Gemma2Model

    tok = AutoTokenizer.from_pretrained(zoo.gemma)
    model = AutoModel.from_pretrained(zoo.gemma).eval()
    assert isinstance(model, Gemma2Model)
    enc = tok(["a red car parked near a stone wall", "a cat"], padding="max_length", max_length=24,
              truncation=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id  # Gemma prepends <bos>
    assert enc.input_ids[1, -1].item() == tok.pad_token_id == 0  # right padding with id 0
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == "a red car parked near a stone wall"
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    assert h.shape == (2, 24, model.config.hidden_size) and torch.isfinite(h).all()


def test_dcae_roundtrip_shapes(zoo):
    from diffusers import AutoencoderDC

    vae = AutoencoderDC.from_pretrained(zoo.dcae).eval()
    assert vae.config.latent_channels == 32 and vae.config.scaling_factor > 0
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent
        y = vae.decode(z).sample
    assert z.shape == (2, 32, 2, 3)  # (B, 32, H/32, W/32)
    assert y.shape == x.shape and torch.isfinite(z).all() and torch.isfinite(y).all()


def test_clip_embeds_image_and_text(zoo):
    from sana_core.clip import load_clip

    model, preprocess, tokenizer = load_clip(zoo.clip_model, zoo.clip_pretrained)
    rng = np.random.default_rng(0)
    imgs = torch.stack([preprocess(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
                        for h, w in [(40, 70), (96, 64)]])
    text = tokenizer(["a photo of a cat", "a blue square on a white background"])
    assert text.shape == (2, 77)  # the real open_clip BPE tokenizer and context
    with torch.no_grad():
        ie = model.encode_image(imgs, normalize=True)
        te = model.encode_text(text, normalize=True)
    assert ie.shape == te.shape == (2, 64)
    assert torch.isfinite(ie).all() and torch.isfinite(te).all()
    torch.testing.assert_close(ie.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(te.norm(dim=-1), torch.ones(2))
    # same weights through open_clip's own local-folder schema
    other, _, _ = load_clip("local-dir:" + os.path.dirname(zoo.clip_pretrained))
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(imgs, normalize=True), ie)


@pytest.mark.parametrize("model,pretrained,needle", [
    ("sana-tiny-clip", "/nonexistent/clip.safetensors", "/nonexistent/clip.safetensors"),
    ("no-such-clip-model", None, "no-such-clip-model"),
    ("local-dir:/nonexistent/folder", None, "/nonexistent/folder"),
])
def test_clip_bad_paths_one_line(model, pretrained, needle):
    from sana_core.clip import load_clip

    with pytest.raises(SanaError) as e:
        load_clip(model, pretrained)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_vlm_folders_load_with_transformers(zoo):
    from transformers import AutoConfig, AutoProcessor

    assert len(zoo.vlms) == 4
    types = set()
    img = Image.fromarray(np.full((60, 80, 3), 128, np.uint8))
    for name, folder in zoo.vlms.items():
        cfg = AutoConfig.from_pretrained(folder)
        types.add(cfg.model_type)
        proc = AutoProcessor.from_pretrained(folder)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(images=[img], text=[prompt], return_tensors="pt")
        assert inputs["input_ids"].shape[0] == 1 and "pixel_values" in inputs, name
        assert "Describe the image." in proc.tokenizer.decode(inputs["input_ids"][0]), name
    assert len(types) == 4, types  # four architecture families


def test_zoo_is_idempotent_and_cached(zoo):
    from sana_core.zoo import ensure_zoo

    again = ensure_zoo()
    assert again == zoo
    for p in [zoo.gemma, zoo.dcae, os.path.dirname(zoo.clip_pretrained), *zoo.vlms.values()]:
        assert os.path.isfile(os.path.join(p, ".complete")), p


def test_two_builders_at_once(tmp_path, zoo):
    """Two processes building the same (core) zoo: one builds under the lock, the other reuses it; the
    weights are bit-identical to the session zoo's (fixed seeds)."""
    code = ("import sys; from sana_core.zoo import ensure_zoo; "
            "z = ensure_zoo(sys.argv[1], vlms=False); print(z.gemma, z.dcae, z.clip_pretrained)")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    root = tmp_path / f"v{ZOO_VERSION}"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["clip", "dcae", "gemma2"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    for name, ref in [("gemma2", zoo.gemma), ("dcae", zoo.dcae), ("clip", os.path.dirname(zoo.clip_pretrained))]:
        for f in sorted(os.listdir(ref)):
            if f.endswith(".safetensors"):
                assert _sha(root / name / f) == _sha(os.path.join(ref, f)), (name, f)


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_zoo_cli_help():
    r = subprocess.run([sys.executable, "-m", "sana_core.zoo", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120, check=False)
    assert r.returncode == 0 and "--root" in r.stdout


def test_zoo_root_that_is_a_file(tmp_path):
    from sana_core.zoo import ensure_zoo

    f = tmp_path / "not-a-folder"
    f.write_text("x")
    with pytest.raises(SanaError, match=str(f)):
        ensure_zoo(f)
