"""W8A8 post-training quantisation (sana_core.quant) on the CPU path (PyTorch int32-accumulating torch._int_mm,
torch._scaled_mm for fp8) against the float reference, a whole tiny DiT quantised, safetensors round trips,
and `jobs.sample --quant`; on a GPU the same checks also run through the Triton kernels."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import int8_gemm
from sana_core import quant
from sana_core.dit import DiTConfig, LinearDiT
from sana_core.errors import SanaError

# Bounds on ||y_q - y|| / ||y|| for Gaussian data: int8 per-token x per-channel (~0.4% rms rounding per operand),
# fp8 e4m3 (3 mantissa bits, ~2% per operand).
REL = {"w8a8-int8": 0.012, "w8a8-fp8": 0.05}
COS = {"w8a8-int8": 0.999, "w8a8-fp8": 0.995}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def small_dit() -> LinearDiT:
    # Wide enough that per-channel scales matter, deep enough that errors compound through blocks.
    return LinearDiT(DiTConfig(hidden_size=128, depth=3, num_heads=4, cross_heads=2, caption_channels=64)).eval()


def dit_inputs(B=2, hw=(8, 6), L=12, device="cpu", dtype=torch.float32):
    x = torch.randn(B, 32, *hw, device=device, dtype=dtype)
    t = torch.rand(B, device=device)
    y = torch.randn(B, L, 64, device=device, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[0, L // 2:] = False
    return x, t, y, mask


@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_reference_quantiser(mode):
    fmt = quant.MODES[mode]
    x = torch.randn(64, 300) * torch.logspace(-4, 3, 64)[:, None]
    x[3] = 0
    q, s = int8_gemm.quantize_rows_reference(x, fmt)
    assert q.dtype == int8_gemm.FORMATS[fmt][0] and s.shape == (64,)
    assert (q[3].float() == 0).all() and torch.isfinite(s).all()
    assert torch.equal(q.float().abs().amax(1)[torch.arange(64) != 3], torch.full((63,), int8_gemm.FORMATS[fmt][1]))
    err = (q.float() * s[:, None] - x).abs()
    if fmt == "int8":
        assert (err <= s[:, None] * 0.5 * (1 + 1e-5)).all()
    else:  # e4m3: 2^-4 relative among the normals, the subnormal step (2^-9 of one scale unit) below them
        assert (err <= x.abs() * 2.0**-4 + s[:, None] * 2.0**-9 * 1.0001).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_quant_linear_against_float(kind, mode, device):
    K, N = 96, 80
    m = (nn.Linear(K, N) if kind == "linear" else nn.Conv2d(K, N, 1)).to(device)
    x = torch.randn(3, 7, 5, K, device=device) if kind == "linear" else torch.randn(3, K, 7, 5, device=device)
    q = quant.QuantLinear.from_module(m, quant.MODES[mode])
    with torch.no_grad():
        ref, got = m(x), q(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert _rel(got, ref) < REL[mode]
    # the weight held is the per-channel quantised one: dequantised, it is the float weight to within a step
    w = m.weight.detach().flatten(1)
    assert (q.dequantized_weight() - w).abs().max() <= w.abs().amax(1).max() / {"w8a8-int8": 127, "w8a8-fp8": 8}[mode]


def test_quant_linear_rejects_what_is_not_a_linear():
    with pytest.raises(SanaError, match="blocks.0.mlp.depthwise.*neither"):
        quant.QuantLinear.from_module(nn.Conv2d(8, 8, 3, groups=8), "int8", "blocks.0.mlp.depthwise")


@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_whole_dit_quantised_against_float(mode):
    dit = small_dit()
    inputs = dit_inputs()
    with torch.no_grad():
        ref = dit(*inputs)
        qdit = quant.quantize_dit(copy.deepcopy(dit), mode)
        got = qdit(*inputs)
    # every block linear quantised, everything else as it was
    names = quant.target_names(dit)
    assert len(names) == 3 * len(quant.BLOCK_LINEARS)
    assert all(isinstance(qdit.get_submodule(n), quant.QuantLinear) for n in names)
    qnames = {n for n, mod in qdit.named_modules() if isinstance(mod, quant.QuantLinear)}
    assert qnames == set(names)
    assert isinstance(qdit.final_linear, nn.Linear) and isinstance(qdit.t_block[1], nn.Linear)
    assert quant.quant_mode(qdit) == mode
    cos, rel = _cos(got, ref), _rel(got, ref)
    print(f"{mode}: velocity cosine {cos:.6f}, relative error {rel:.4f}")
    assert cos > COS[mode] and rel < 2 * REL[mode]


@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_modulate_hands_quantised_rows_to_qkv_and_mix_ffn(mode, monkeypatch):
    """QKV and Mix-FFN's first layer read the rows their modulate quantised (kernels.int8_gemm.QuantizedRows);
    the other block linears quantise their own input. Same output as when every layer quantises its input."""
    qdit = quant.quantize_dit(small_dit(), mode)
    inputs = dit_inputs()
    seen: dict[str, bool] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(
        n.split(".", 2)[2], isinstance(args[0], int8_gemm.QuantizedRows)))
        for n, m in qdit.named_modules() if isinstance(m, quant.QuantLinear)]
    with torch.no_grad():
        fused = qdit(*inputs)
    for h in hooks:
        h.remove()
    assert seen == {"attn.qkv": True, "mlp.inverted": True, "attn.proj": False, "cross_attn.q": False,
                    "cross_attn.kv": False, "cross_attn.proj": False, "mlp.point": False}
    monkeypatch.setattr(quant.QuantLinear, "input_format", property(lambda self: None))
    with torch.no_grad():
        unfused = qdit(*inputs)
    assert torch.equal(fused, unfused)  # the reference path quantises the same float32 rows either way
    with pytest.raises(ValueError, match="int8 rows of 128 features for a fp8 weight|fp8 rows of 128 features for a int8"):
        other = "fp8" if mode == "w8a8-int8" else "int8"
        rows = int8_gemm.QuantizedRows(*int8_gemm.quantize_rows_reference(torch.randn(4, 128), quant.MODES[mode]),
                                       torch.Size((4, 128)), torch.float32)
        int8_gemm.w8a8_linear(rows, *int8_gemm.quantize_weight(torch.randn(8, 128), other), None, other)


def test_int8_is_closer_than_fp8_and_the_layer_table():
    dit = small_dit()
    inputs = dit_inputs()
    tables = {}
    for mode in ("w8a8-int8", "w8a8-fp8"):
        with torch.no_grad():
            errs = quant.layer_errors(dit, mode, lambda: dit(*inputs))
        assert set(errs) == set(quant.target_names(dit))
        # 2x the Gaussian bound: Mix-FFN's point layer reads x * silu(gate), heavier-tailed than a Gaussian
        assert all(0 < e["rel_err"] < 2 * REL[mode] and e["cos"] > COS[mode] for e in errs.values()), errs
        tables[mode] = quant.summarize_layer_errors(errs)
        assert set(tables[mode]) == set(quant.BLOCK_LINEARS)
    for layer in quant.BLOCK_LINEARS:
        assert tables["w8a8-int8"][layer]["mean_rel_err"] < tables["w8a8-fp8"][layer]["mean_rel_err"]
    # the hooks are gone: the model runs as before
    assert not any(m._forward_hooks for m in dit.modules())


def test_modes_and_misuse():
    dit = small_dit()
    assert quant.quantize_dit(dit, "none") is dit and quant.quant_mode(dit) == "none"
    with pytest.raises(SanaError, match="unknown quantisation mode 'int4'"):
        quant.quantize_dit(dit, "int4")
    with pytest.raises(SanaError, match="blocks.0.mlp.nope is not a module"):
        quant.quantize_dit(dit, "w8a8-int8", layers=("mlp.nope",))
    quant.quantize_dit(dit, "w8a8-int8")
    with pytest.raises(SanaError, match="already quantised"):
        quant.quantize_dit(dit, "w8a8-fp8")


def test_to_dtype_moves_but_never_casts_the_quantised_weights():
    qdit = quant.quantize_dit(small_dit(), "w8a8-fp8").to(torch.bfloat16)
    layer = qdit.blocks[0].attn.proj
    assert layer.weight_q.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and qdit.final_linear.weight.dtype == torch.bfloat16
    x, t, y, m = dit_inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        assert qdit(x, t, y, m).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_save_load_round_trip(mode, tmp_path):
    from safetensors import safe_open

    qdit = quant.quantize_dit(small_dit(), mode)
    path = tmp_path / "dit.safetensors"
    quant.save_quantized(qdit, path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sana_quant"] == mode
        assert f.get_tensor("blocks.1.mlp.point.weight_scale").dtype == torch.float32
        assert f.get_tensor("blocks.1.attn.qkv.weight_q").dtype == int8_gemm.FORMATS[quant.MODES[mode]][0]
    again = quant.load_quantized(path)
    assert quant.quant_mode(again) == mode and again.cfg == qdit.cfg
    a, b = qdit.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    inputs = dit_inputs()
    with torch.no_grad():
        assert torch.equal(again(*inputs), qdit(*inputs))


def test_save_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(SanaError, match="not quantised"):
        quant.save_quantized(small_dit(), tmp_path / "x.safetensors")
    with pytest.raises(SanaError, match="does not exist"):
        quant.load_quantized(tmp_path / "missing.safetensors")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SanaError, match="not a quantised DiT checkpoint"):
        quant.load_quantized(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(SanaError, match="cannot read quantised checkpoint"):
        quant.load_quantized(tmp_path / "junk.safetensors")
    qdit = quant.quantize_dit(small_dit(), "w8a8-int8")
    quant.save_quantized(qdit, tmp_path / "q.safetensors")
    sd = {k: v for k, v in qdit.state_dict().items() if not k.startswith("blocks.2.")}
    from safetensors.torch import load_file  # a checkpoint missing a block: named, one line
    meta_src = tmp_path / "q.safetensors"
    assert load_file(str(meta_src)).keys() >= sd.keys()
    from safetensors import safe_open
    with safe_open(str(meta_src), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(SanaError, match="does not fit a 3-block DiT"):
        quant.load_quantized(tmp_path / "short.safetensors")


def test_custom_op_under_torch_compile():
    """Inside torch.compile the W8A8 product is one opaque op whose fake (meta) implementation gives the shape."""
    layer = quant.QuantLinear.from_module(nn.Linear(64, 48), "int8")
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(lambda x: F.gelu(layer(x)) * 2, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), F.gelu(layer(x)) * 2)


def test_quantised_block_compiles_with_rows_handed_over():
    """A block whose modulate hands QuantizedRows to QKV and Mix-FFN compiles without graph breaks (the rows are
    a frozen dataclass; the product is the opaque sana_kernels::w8a8_linear_rows op)."""
    qdit = quant.quantize_dit(small_dit(), "w8a8-int8")
    inputs = dit_inputs()
    with torch.no_grad():
        ref = qdit(*inputs)
        for block in qdit.blocks:
            block.compile(backend="aot_eager", fullgraph=True)
        got = qdit(*inputs)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels' own path)")
@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_dit_on_gpu_matches_cpu_path(mode):
    dit = small_dit()
    inputs = dit_inputs()
    with torch.no_grad():
        ref = dit(*inputs)
        cpu = quant.quantize_dit(copy.deepcopy(dit), mode)(*inputs)
        gdit = quant.quantize_dit(copy.deepcopy(dit).cuda().to(torch.bfloat16), mode)
        gpu = gdit(*(t.cuda().to(torch.bfloat16) if t.is_floating_point() and t.dim() > 1 else t.cuda()
                     for t in inputs)).float().cpu()
    assert _cos(gpu, ref) > COS[mode] and _rel(gpu, cpu) < 0.03


needs_training_stack = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("webdataset", "open_clip")),
    reason="needs webdataset and open_clip (a training run and the tiny zoo); the GPU image has neither")


@needs_training_stack
def test_jobs_sample_quantised(tmp_path, zoo, capsys):
    """jobs.sample --quant w8a8-int8 on a 1-step tiny run: same image size, close to the float image, and the
    peak memory line."""
    import numpy as np
    from PIL import Image

    from jobs import sample
    from sana_core.config import load_config
    from training.config import PRESETS, TrainConfig
    from training.testdata import write_shards
    from training.trainer import train

    write_shards(tmp_path / "data", n=8, per_shard=8)
    cfg = load_config(TrainConfig, preset=PRESETS["tiny"],
                      overrides=["max_steps=1", "data.batch_size=4", "data.num_workers=0", "track.wandb=false",
                                 "track.sample_prompts=[]", "checkpoint.every=1"])
    train(cfg, tmp_path / "data", tmp_path / "run")
    images = {}
    for mode in ("none", "w8a8-int8"):
        out = tmp_path / f"{mode}.png"
        capsys.readouterr()
        sample.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "a red square", "--steps", "3",
                     "--out", str(out), "--quant", mode, "--device", "cpu"])
        printed = capsys.readouterr().out
        assert f"quantisation {mode}; peak memory" in printed and "GiB" in printed
        images[mode] = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert images["none"].shape == images["w8a8-int8"].shape == (128, 128, 3)
    mse = ((images["none"] - images["w8a8-int8"]) ** 2).mean()
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    print(f"jobs.sample w8a8-int8 vs float: PSNR {psnr:.1f} dB")
    assert psnr > 30
