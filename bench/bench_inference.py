"""Inference on the GPU: W8A8 GEMMs and DiT forward, quantisation error, and text-to-image latency against
diffusers' SanaPipeline, all in one process with random weights at the real sizes (built from configs, no
downloads): a Gemma-2-2B-shaped text encoder (transformers' Gemma2Config), the Sana-0.6B DiT, DC-AE f32c32
(diffusers' AutoencoderDC config of mit-han-lab/dc-ae-f32c32-sana-1.0); the tokenizer is the tiny BPE of
sana_core.zoo (any tokenizer does: only the token count matters, and prompts are padded to 300 tokens).

    python3 bench/bench_inference.py --out bench/results [--parts gemm,dit,errors,pipeline] [--preset real|tiny]

Parts:
  gemm      per block-GEMM shape at 1024 px, batch 32 (M = 32768 tokens; cross-attention KV: 32 x 300 text
            tokens): bf16 F.linear, torch._int_mm, our int8 GEMM (alone, and with the activation quantisation
            pass), fp8 torch._scaled_mm (alone, and with the pass), and a sweep of int8 launch configs.
  dit       DiT forward at 1024 px, batch 32: bf16 / w8a8-int8 / w8a8-fp8, eager and with compiled blocks
            (--no-compile skips those), velocity cosine similarity of each against bf16 (and bf16 vs float32).
  errors    per-layer error table (each block linear quantised alone on the bf16 model's activations).
  pipeline  ours (CUDA-graph replay of the DiT steps; with compiled blocks unless --no-compile, then eager
            too at the smallest size) vs diffusers' SanaPipeline (eager, as shipped) from the same weights:
            --sizes x --batches, 20 Flow-DPM-Solver steps, guidance 4.5, per-phase times (text, denoise,
            decode) and peak memory; each size is run once (1 step, batch 1) by both before it is timed. diffusers decodes the whole batch at once as its pipeline
            does; when that runs out of memory the decode is retried with diffusers' VAE tiling (its suggested
            512 px tiles) and recorded as such.
Results go to OUT/inference_h200.json (rewritten after every measurement, so a run cut short keeps what it
measured). Times: medians of CUDA-synchronised wall clock (do_bench medians for single GEMMs).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import int8_gemm  # noqa: E402
from sana_core import quant  # noqa: E402
from sana_core.dit import DIT_CONFIGS, LinearDiT, to_diffusers_state_dict  # noqa: E402

PROMPTS = ["a cat in a spacesuit floating above the earth, photorealistic",
           "a bowl of fruit on a wooden table in the morning light",
           "a busy city street at dusk with glowing lamps and a red bus",
           "a watercolor painting of a mountain lake surrounded by pine trees"]
# int8 launch configs tried by the gemm part (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SWEEP = [(128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
         (128, 256, 64, 8, 4), (64, 256, 128, 4, 4)]

GEMMA_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
GEMMA_TINY = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=256,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
_STAGES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DCAE_F32C32 = dict(in_channels=3, latent_channels=32, attention_head_dim=32, encoder_block_types=_STAGES,
                   decoder_block_types=_STAGES, encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                   decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                   encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                   encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                   decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), upsample_block_type="interpolate",
                   downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                   scaling_factor=0.41407)
DCAE_TINY = dict(DCAE_F32C32, attention_head_dim=8, encoder_block_out_channels=(8, 16, 16, 16, 32, 32),
                 decoder_block_out_channels=(8, 16, 16, 16, 32, 32), encoder_layers_per_block=(1,) * 6,
                 decoder_layers_per_block=(1,) * 6)


class Report:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta}

    def put(self, *keys_and_value) -> None:
        *keys, value = keys_and_value
        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")  # a run killed mid-write keeps the last complete file
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def do_bench(fn, dev) -> float:
    if dev.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    return timed(fn, dev, 1, 3)


def cos(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def guard(report: Report, key: tuple, fn):
    """Run one measurement; a failure is recorded (first line and the traceback's tail), not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the bench records every failure and goes on
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  FAILED {'/'.join(map(str, key))}: {msg}", flush=True)
        report.put(*key, {"error": msg, "traceback": traceback.format_exc()[-3000:]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


# ------------------------------------------------------------------------------------------------ models

def build_models(preset: str, dev, dtype):
    from diffusers import AutoencoderDC
    from transformers import Gemma2Config, Gemma2Model

    from sana_core.autoencoder import Autoencoder
    from sana_core.text_encoder import TextEncoder
    from sana_core.zoo import _gemma_tokenizer

    torch.manual_seed(0)
    real = preset == "real"
    with torch.device(dev):
        gemma = Gemma2Model(Gemma2Config(**(GEMMA_2B if real else GEMMA_TINY))).to(dtype).eval()
        dit = LinearDiT(DIT_CONFIGS["sana-0.6b" if real else "tiny"]).to(dtype).eval()
        vae = AutoencoderDC(**(DCAE_F32C32 if real else DCAE_TINY)).to(dtype).eval()
    te = TextEncoder(gemma, _gemma_tokenizer(), max_length=300)
    return dit, te, Autoencoder(vae)


def diffusers_pipeline(dit, te, ae):
    from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
    from diffusers import SanaPipeline as DiffusersSanaPipeline

    with torch.device(dit.x_embedder.weight.device):
        ref = SanaTransformer2DModel(**dit.cfg.to_diffusers_config())
    ref.load_state_dict(to_diffusers_state_dict(dit), strict=True)
    ref = ref.to(dit.x_embedder.weight.dtype).eval()
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        algorithm_type="dpmsolver++", solver_order=2)
    pipe = DiffusersSanaPipeline(tokenizer=te.tokenizer, text_encoder=te.model, vae=ae.vae, transformer=ref,
                                 scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_inputs(cfg, B, latent, L, dev, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, latent, latent, generator=g).to(dev, dtype)
    t = torch.rand(B, generator=g).to(dev)
    y = torch.randn(B, L, cfg.caption_channels, generator=g).to(dev, dtype)
    mask = torch.arange(L)[None] < torch.randint(L // 4, L + 1, (B, 1), generator=g)
    return x, t, y, mask.to(dev)


def uncompile(dit):
    for block in dit.blocks:
        block._compiled_call_impl = None


# ------------------------------------------------------------------------------------------------ parts

def part_gemm(report, dit, dev, M_img, M_txt):
    cfg = dit.cfg
    hidden, ffn = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    shapes = {"attn.qkv": (M_img, 3 * hidden, hidden), "attn.proj": (M_img, hidden, hidden),
              "cross_attn.q": (M_img, hidden, hidden), "cross_attn.kv": (M_txt, 2 * hidden, hidden),
              "mlp.inverted": (M_img, 2 * ffn, hidden), "mlp.point": (M_img, hidden, ffn)}
    print(f"{'layer':16s} {'M x N x K':>20s} {'bf16':>8s} {'_int_mm':>8s} {'int8':>8s} {'int8+q':>8s} "
          f"{'fp8':>8s} {'fp8+q':>8s} {'best cfg':>8s}  (ms)", flush=True)
    for name, (M, N, K) in shapes.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5
        b = torch.randn(N, device=dev, dtype=torch.bfloat16)
        row = {"M": M, "N": N, "K": K}
        row["bf16"] = do_bench(lambda: F.linear(x, w, b), dev)
        res = {}
        for fmt in ("int8", "fp8"):
            wq, ws = int8_gemm.quantize_weight(w, fmt)
            xq, xs = int8_gemm.quantize_rows(x, fmt)
            mm = int8_gemm.int8_matmul if fmt == "int8" else int8_gemm.fp8_matmul
            row[fmt] = do_bench(lambda: mm(xq, xs, wq, ws, b, torch.bfloat16), dev)
            row[f"{fmt}+quant"] = do_bench(lambda: int8_gemm.w8a8_linear(x, wq, ws, b, fmt), dev)
            row[f"quant_{fmt}"] = do_bench(lambda: int8_gemm.quantize_rows(x, fmt), dev)
            res[fmt] = (xq, xs, wq, ws)
        xq, xs, wq, ws = res["int8"]
        row["int_mm"] = guard(report, ("gemm", name, "int_mm"), lambda: do_bench(lambda: torch._int_mm(xq, wq.t()), dev))
        sweep = {}
        for bm, bn, bk, warps, stages in SWEEP:
            c = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
            sweep[f"{bm}x{bn}x{bk}w{warps}s{stages}"] = guard(
                report, ("gemm", name, "sweep_error"),
                lambda c=c: do_bench(lambda: int8_gemm.int8_matmul(xq, xs, wq, ws, b, torch.bfloat16, config=c), dev))
        row["int8_sweep"] = sweep
        ok = {k: v for k, v in sweep.items() if v}
        best = min(ok, key=ok.get) if ok else "-"
        flops = 2 * M * N * K
        row["tflops"] = {k: flops / row[k] / 1e12 for k in ("bf16", "int8", "fp8")}
        report.put("gemm", name, row)
        f = lambda v: f"{v * 1e3:8.3f}" if v else "       -"  # noqa: E731
        print(f"{name:16s} {f'{M}x{N}x{K}':>20s} {f(row['bf16'])} {f(row['int_mm'])} {f(row['int8'])} "
              f"{f(row['int8+quant'])} {f(row['fp8'])} {f(row['fp8+quant'])} {best:>8s}", flush=True)


def part_dit(report, dit, dev, B, latent, L, compile_too: bool):
    inputs = dit_inputs(dit.cfg, B, latent, L, dev, dit.x_embedder.weight.dtype)
    with torch.inference_mode():
        ref = dit(*inputs).float()
        d32 = copy.deepcopy(dit).float()
        ref32 = d32(*(t.float() if t.is_floating_point() and t.dim() > 1 else t for t in inputs))
        del d32
        report.put("dit", "bf16_vs_fp32_cos", cos(ref, ref32))
        models = {"bf16": dit}
        for mode in ("w8a8-int8", "w8a8-fp8"):
            models[mode] = quant.quantize_dit(copy.deepcopy(dit), mode)
        print(f"DiT forward, {B} x {latent}x{latent} latents ({B * latent * latent} tokens), text {L}:", flush=True)
        for mode, m in models.items():
            def one(m=m, mode=mode, compiled=False):
                key = ("dit", mode + ("_compiled" if compiled else ""))
                torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
                s = timed(lambda: m(*inputs), dev, warmup=3 if compiled else 2, iters=7)
                out = m(*inputs).float()
                row = {"ms": s * 1e3, "img_per_s": B / s, "cos_vs_bf16": cos(out, ref), "rel_vs_bf16": rel(out, ref),
                       "cos_vs_fp32": cos(out, ref32)}
                if dev.type == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                report.put(*key, row)
                print(f"  {key[1]:22s} {row['ms']:8.1f} ms  {row['img_per_s']:7.1f} img/s  cos vs bf16 "
                      f"{row['cos_vs_bf16']:.5f}", flush=True)
            guard(report, ("dit", mode), one)
        if compile_too:
            for mode, m in models.items():
                def comp(m=m, mode=mode):
                    t0 = time.perf_counter()
                    from sana_core.pipeline import compile_blocks
                    compile_blocks(m)
                    with torch.inference_mode():
                        m(*inputs)
                    sync(dev)
                    report.put("dit", mode + "_compile_s", time.perf_counter() - t0)
                guard(report, ("dit", mode + "_compiled"), comp)
                if report.data["dit"].get(mode + "_compiled", {}).get("error") is None:
                    guard(report, ("dit", mode + "_compiled"), lambda m=m, mode=mode: one(m, mode, True))
            uncompile(dit)
        for mode in ("bf16", "w8a8-int8", "w8a8-fp8"):
            base = report.data["dit"].get("bf16", {}).get("ms")
            for suffix in ("", "_compiled"):
                r = report.data["dit"].get(mode + suffix, {})
                if base and r.get("ms"):
                    r["speedup_vs_bf16_eager"] = base / r["ms"]
                bc = report.data["dit"].get("bf16" + suffix, {}).get("ms")
                if bc and r.get("ms"):
                    r["speedup_vs_bf16_same_mode"] = bc / r["ms"]
        report.put("dit", "shape", {"batch": B, "latent": latent, "text_tokens": L})
        del models


def part_errors(report, dit, dev, B, latent, L):
    inputs = dit_inputs(dit.cfg, B, latent, L, dev, dit.x_embedder.weight.dtype, seed=1)
    for mode in ("w8a8-int8", "w8a8-fp8"):
        with torch.inference_mode():
            errs = quant.layer_errors(dit, mode, lambda: dit(*inputs))
        table = quant.summarize_layer_errors(errs)
        report.put("layer_errors", mode, {"per_layer_type": table, "per_layer": errs})
        print(f"per-layer error, {mode} (each layer alone, on the bf16 model's activations):", flush=True)
        print(f"  {'layer':16s} {'mean rel':>9s} {'max rel':>9s} {'worst blk':>9s} {'min cos':>9s}")
        for layer, r in table.items():
            print(f"  {layer:16s} {r['mean_rel_err']:9.4f} {r['max_rel_err']:9.4f} {r['worst_block']:9d} "
                  f"{r['min_cos']:9.6f}", flush=True)


def _timed_method(obj, name, bucket, key, dev):
    orig = getattr(obj, name)

    def wrapper(*a, **k):
        sync(dev)
        t0 = time.perf_counter()
        out = orig(*a, **k)
        sync(dev)
        bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)
    return lambda: delattr(obj, name)


def run_diffusers(pipe, prompts, size, steps, dev):
    """diffusers' SanaPipeline as shipped, its phases timed: text (encode_prompt), denoise, decode (its
    vae.decode of the whole batch and postprocess, retried with diffusers' VAE tiling when out of memory)."""
    phases = {}
    restore = _timed_method(pipe, "encode_prompt", phases, "text", dev)
    g = torch.Generator().manual_seed(0)
    try:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            lat = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=4.5,
                       use_resolution_binning=False, output_type="latent", generator=g).images
        sync(dev)
        phases["denoise"] = time.perf_counter() - t0 - phases.get("text", 0.0)
    finally:
        restore()
    vae = pipe.vae
    t0 = time.perf_counter()
    tiling = False
    with torch.inference_mode():
        try:
            img = vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            tiling = True
            vae.enable_tiling()
            try:
                t0 = time.perf_counter()
                img = vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            finally:
                vae.disable_tiling()
        img = pipe.image_processor.postprocess(img, output_type="pt")
    sync(dev)
    phases["decode"] = time.perf_counter() - t0
    phases["decode_tiled_after_oom"] = tiling
    return img, phases


def part_pipeline(report, dit, te, ae, dev, sizes, batches, steps, compile_ours: bool, decode_tile: int):
    from sana_core.pipeline import SanaPipeline, compile_blocks

    ref = diffusers_pipeline(dit, te, ae)
    ours = SanaPipeline(dit, te, ae, decode_tile=decode_tile)
    small = min(sizes)
    print(f"{'impl':18s} {'size':>5s} {'B':>2s} {'total s':>8s} {'text':>7s} {'denoise':>8s} {'decode':>7s} "
          f"{'peak GiB':>9s}", flush=True)

    def one(name, p, size, B):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**30
        prompts = (PROMPTS * B)[:B]
        sync(dev)
        t0 = time.perf_counter()
        if name == "diffusers":
            img, ph = run_diffusers(p, prompts, size, steps, dev)
        else:
            img = p(prompts, height=size, width=size, steps=steps, output="pt")
            ph = dict(p.timings)
        sync(dev)
        row = {"total_s": time.perf_counter() - t0, **ph, "shape": list(img.shape)}
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["weights_gib"] = base
        report.put("pipeline", f"{size}px_b{B}", name, row)
        print(f"{name:18s} {size:5d} {B:2d} {row['total_s']:8.2f} {ph.get('text', 0):7.3f} "
              f"{ph['denoise']:8.2f} {ph['decode']:7.2f} {row.get('peak_gib', 0):9.1f}"
              + ("  (diffusers decode OOM -> tiled)" if ph.get("decode_tiled_after_oom") else ""), flush=True)

    # warm-up (kernels, cuBLAS handles), then our eager path at the smallest size, then the compile
    t0 = time.perf_counter()
    guard(report, ("pipeline", "warmup_error", "ours"),
          lambda: ours(PROMPTS[:1], height=small, width=small, steps=2, output="pt"))
    guard(report, ("pipeline", "warmup_error", "diffusers"), lambda: run_diffusers(ref, PROMPTS[:1], small, 2, dev))
    report.put("pipeline", "warmup_s", time.perf_counter() - t0)
    if compile_ours:
        for B in batches:
            guard(report, ("pipeline", f"{small}px_b{B}", "ours_eager"),
                  lambda B=B: one("ours_eager", ours, small, B))

        def comp():
            t = time.perf_counter()
            compile_blocks(dit)
            ours(PROMPTS[:1], height=small, width=small, steps=2, output="pt")
            ours(PROMPTS[:2], height=small, width=small, steps=2, output="pt")  # the dynamic-shape compile
            report.put("pipeline", "compile_s", time.perf_counter() - t)
        if guard(report, ("pipeline", "compile_error"), lambda: comp() or True) is None:
            uncompile(dit)  # a failed compile: ours is measured eager
        report.put("pipeline", "ours_compiled", compile_ours and "compile_error" not in report.data["pipeline"])
    for size in sizes:
        def warm(size=size):  # first use of a size (conv algorithms, allocator) kept out of the timings
            t = time.perf_counter()
            ours(PROMPTS[:1], height=size, width=size, steps=1, output="pt")
            run_diffusers(ref, PROMPTS[:1], size, 1, dev)
            report.put("pipeline", f"warmup_{size}px_s", time.perf_counter() - t)
        guard(report, ("pipeline", f"warmup_{size}px_error"), warm)
        for B in batches:
            for name, p in (("ours", ours), ("diffusers", ref)):
                guard(report, ("pipeline", f"{size}px_b{B}", name), lambda n=name, p=p: one(n, p, size, B))
                row = report.data["pipeline"].get(f"{size}px_b{B}", {}).get(name, {})
                if name == "ours" and "error" in row and dit.blocks[0]._compiled_call_impl is not None:
                    # the compiled blocks failed at this shape: ours from here on is measured eager
                    report.put("pipeline", f"{size}px_b{B}", "ours_compiled_error", row)
                    uncompile(dit)
                    report.put("pipeline", "ours_compiled", f"eager from {size}px_b{B} on")
                    guard(report, ("pipeline", f"{size}px_b{B}", name), lambda p=p: one("ours", p, size, B))
            r = report.data["pipeline"].get(f"{size}px_b{B}", {})
            if r.get("ours", {}).get("total_s") and r.get("diffusers", {}).get("total_s"):
                r["ours_over_diffusers"] = r["ours"]["total_s"] / r["diffusers"]["total_s"]
                print(f"  ours / diffusers = {r['ours_over_diffusers']:.3f}", flush=True)
                report.put("pipeline", f"{size}px_b{B}", r)
    uncompile(dit)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for inference_<device>.json")
    ap.add_argument("--parts", default="gemm,dit,errors,pipeline")
    ap.add_argument("--preset", choices=["real", "tiny"], default="real", help="tiny: a CPU check of the code")
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dit-batch", type=int, default=32)
    ap.add_argument("--decode-tile", type=int, default=None, help="pixels (default: sana_core.pipeline's)")
    ap.add_argument("--no-compile", action="store_true", help="ours eager in the pipeline part")
    ap.add_argument("--compile-dit", action="store_true", help="dit part: compiled blocks too (each mode)")
    ap.add_argument("--name", default=None, help="JSON file name (default inference_h200.json / _cpu)")
    args = ap.parse_args(argv)
    from sana_core.pipeline import DECODE_TILE

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = args.parts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"inference_{'h200' if dev.type == 'cuda' else 'cpu'}.json"
    meta = {"argv": sys.argv, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "preset": args.preset}
    report = Report(out / name, meta)
    t0 = time.perf_counter()
    dit, te, ae = build_models(args.preset, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    report.put("meta", "build_s", time.perf_counter() - t0)
    print(f"models built in {time.perf_counter() - t0:.1f} s: DiT {dit.num_params() / 1e6:.0f}M, text encoder "
          f"{sum(p.numel() for p in te.model.parameters()) / 1e6:.0f}M, DC-AE "
          f"{sum(p.numel() for p in ae.vae.parameters()) / 1e6:.0f}M", flush=True)
    latent = 32 if args.preset == "real" else 4
    B = args.dit_batch
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    run = {  # in the order --parts names them
        "gemm": lambda: guard(report, ("gemm", "error"),
                              lambda: part_gemm(report, dit, dev, B * latent * latent, B * 300)),
        "dit": lambda: guard(report, ("dit", "error"),
                             lambda: part_dit(report, dit, dev, B, latent, 300, args.compile_dit)),
        "errors": lambda: guard(report, ("layer_errors", "error"),
                                lambda: part_errors(report, dit, dev, 4, latent, 300)),
        "pipeline": lambda: guard(report, ("pipeline", "error"),
                                  lambda: part_pipeline(report, dit, te, ae, dev, sizes, batches, args.steps,
                                                        not args.no_compile, args.decode_tile or DECODE_TILE)),
    }
    for part in parts:
        run[part]()
    report.put("meta", "total_s", time.perf_counter() - t0)
    print(f"wrote {out / name} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
