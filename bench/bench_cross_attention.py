"""The Linear DiT's cross-attention (softmax attention of image tokens to a padded caption): our Triton kernels
against each SDPA backend.

    python bench/bench_cross_attention.py [--shape B,N,L,heads,head_dim] [--sweep] [--out bench/results]

At Sana-0.6B's batch-16 training shape by default with captions cut as the trainer cuts them (1024 image tokens,
128 caption positions of which a seeded random number per sample are padding, 16 heads of 72; `--shape
16,1024,300,16,72` is the uncut caption), bf16. Rows `triton` (kernels.triton_cross_attention: q, kv and out in
token layout, one key tile) and `model-sdpa` (kernels.cross_attention_reference on the same token-layout tensors:
SDPA plus the transposes and the k/v gradient cat it needs, what the model ran before) time what the model
calls; the other rows time, on (B, heads, N, D) tensors, forward and forward + backward of
F.scaled_dot_product_attention with the additive key-padding bias the model passes, under each backend that
accepts it (cuDNN, memory-efficient, math; flash takes no mask), and checks each against a float32 math
reference (output and the three input gradients). Also: flash attention on packed keys (`varlen`: the caption's
real tokens gathered into one (total, heads, head_dim) tensor on the device, no host sync, the query read in token
layout), and cuDNN / flash with no mask at all (what a batch without padding would cost). An earlier Triton
kernel (online softmax over key blocks, a dq and a dk/dv kernel) was slower than cuDNN and reverted (823f372,
bench/NOTES_block_fastpath.md). `--sweep` times each Triton kernel (forward, dq, dk/dv) alone (CUDA graphs of 20 calls:
no host time) over tile configurations and prints the best of each; timings with CUDA events (median of --iters).
Always: the forward kernel alone (graphed), a head's channels as one power-of-two tile and as the two tiles it takes
by default where they mask fewer lanes (kernels.triton_cross_attention.HEAD_SPLIT: 72 as 64 + 16).
Prints a table, writes cross_attention_<gpu>[_NAME].json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.timing import graphed_ms, median_cuda_ms, write_result  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}
TOLERANCE = 2e-2


def pack_keys(mask: torch.Tensor):
    """(B, L) bool -> (index, valid, cu_seqlens): packed row p < total is key index[p] of the (B*L) flattened
    keys, real tokens of each sample in order; rows from total on are unused (valid False). Device ops only."""
    B, L = mask.shape
    cu = F.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    p = torch.arange(B * L, device=mask.device)
    row = torch.searchsorted(cu[1:].long(), p, right=True).clamp_max(B - 1)
    col = (p - cu[row]).clamp(0, L - 1)
    return row * L + order[row, col], p < cu[-1], cu


def varlen_cross_attention(q, k, v, mask):
    """q (B, N, h, d) token layout, k and v (B, L, h, d), mask (B, L) -> (B, N, h, d) through flash varlen."""
    from torch.nn.attention.varlen import varlen_attn

    B, N, h, d = q.shape
    L = k.shape[1]
    index, valid, cu_k = pack_keys(mask)
    keep = valid[:, None, None]
    kp = torch.where(keep, k.reshape(B * L, h, d)[index], 0)  # where, not *: backward's unused rows may be NaN
    vp = torch.where(keep, v.reshape(B * L, h, d)[index], 0)
    cu_q = torch.arange(0, (B + 1) * N, N, device=q.device, dtype=torch.int32)
    return varlen_attn(q.reshape(B * N, h, d), kp, vp, cu_q, cu_k, N, L).view(B, N, h, d)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,1024,128,16,72", help="B,N,L,heads,head_dim (Sana-0.6B, batch 16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also sweep the Triton kernels' tile configurations")
    p.add_argument("--compile-shard", default=None, metavar="I/N",
                   help="only compile the sweep's I-th of N shares of configurations (no timing, no result): run N "
                        "such processes at once to fill Triton's cache before a --sweep")
    p.add_argument("--name", default="", help="suffix of the result file")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_attention needs a CUDA GPU")
    B, N, L, h, d = map(int, args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for n in (N, L, L))
    real = torch.randint(L // 4, L + 1, (B,), device="cuda", generator=g)  # trailing padding, as a tokenizer pads
    mask = torch.arange(L, device="cuda")[None] < real[:, None]  # (B, L) True = real token
    bias = ((~mask).to(q.dtype) * -10000.0)[:, None, None, :]  # as LinearDiT passes it
    dout = torch.randn(B, h, N, d, device="cuda", generator=g, dtype=torch.bfloat16)
    if args.compile_shard:
        i, n = map(int, args.compile_shard.split("/"))
        _sweep(q, k, v, bias, dout, shard=(i, n))
        return

    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=bias.float())
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())

    full = [t.float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_full = F.scaled_dot_product_attention(*full)
    ref_full_grads = torch.autograd.grad(ref_full, full, dout.float())

    def sdpa(backend, masked):
        def run(qq, kk, vv):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias if masked else None)
        return run

    def varlen(qq, kk, vv):  # token layout in and out, as the model holds q and kv
        out = varlen_cross_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), mask)
        return out.transpose(1, 2)

    variants = {name: (sdpa(b, True), True) for name, b in BACKENDS.items()}
    variants["flash-varlen"] = (varlen, True)
    variants["cudnn-nomask"] = (sdpa(SDPBackend.CUDNN_ATTENTION, False), False)
    variants["flash-nomask"] = (sdpa(SDPBackend.FLASH_ATTENTION, False), False)
    gpu = torch.cuda.get_device_name()
    rows = {}
    for name, (attn, masked) in variants.items():
        # varlen reads q and dout in token layout: give it tensors that are contiguous there
        lay = (lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if name == "flash-varlen" else (lambda t: t)
        qq, kk, vv = (lay(t).detach().requires_grad_() for t in (q, k, v))
        g_out = lay(dout)
        r_out, r_grads = (ref, ref_grads) if masked else (ref_full, ref_full_grads)

        def fwd():
            return attn(qq, kk, vv)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (qq, kk, vv), g_out)

        try:
            out = fwd()
            grads = fwd_bwd()
        except (RuntimeError, ImportError) as e:  # the backend refuses this shape or mask, or is missing
            rows[name] = dict(error=str(e).splitlines()[0][:200])
            continue
        rows[name] = _row(fwd, fwd_bwd, (out, *grads), (r_out, *r_grads), args.iters)
    rows.update(_token_layout_rows(q, k, v, bias, dout, ref, ref_grads, args.iters))
    head_split = _head_split(q, k, v, bias, ref)
    sweep = _sweep(q, k, v, bias, dout) if args.sweep else None
    print(f"{gpu}: q (B={B}, heads={h}, N={N}, d={d}), {L} caption tokens, bf16")
    print(f"{'backend':<13} {'fwd ms':>8} {'fwd+bwd ms':>11}  relative error vs float32")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<13} refused: {r['error']}")
            continue
        err = " ".join(f"{k} {e:.1e}" for k, e in r["rel_err"].items())
        print(f"{name:<13} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f}  {err}{'' if r['ok'] else '  WRONG'}")
    print("triton forward kernel alone (graphed), head channels as tiles " + ", ".join(
        f"{t}: {r['ms']:.4f} ms (out rel. error {r['rel_err']:.1e})" for t, r in head_split.items()))
    result = dict(gpu=gpu, shape=dict(B=B, N=N, L=L, heads=h, head_dim=d), rows=rows, head_split=head_split)
    if sweep is not None:
        result["sweep"] = sweep
    write_result(args.out, "cross_attention" + (f"_{args.name}" if args.name else ""), result)


def _row(fwd, fwd_bwd, got, refs, iters) -> dict:
    """One table row: fwd and fwd_bwd timed, (out, dq, dk, dv) against the float32 reference's."""
    errs = {n: ((x.float() - r).norm() / r.norm()).item() for n, x, r in zip(("out", "dq", "dk", "dv"), got, refs)}
    with torch.no_grad():
        fwd_ms = median_cuda_ms(fwd, iters)
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=median_cuda_ms(fwd_bwd, iters), rel_err=errs,
                ok=all(e <= TOLERANCE for e in errs.values()))


def _token(q, k, v):
    """(B, h, N, d) q and (B, h, L, d) k, v -> the model's token layouts: q (B, N, h*d), kv (B, L, 2*h*d)."""
    B, h, N, d = q.shape
    return (q.transpose(1, 2).reshape(B, N, h * d).contiguous(),
            torch.stack((k, v), 2).permute(0, 3, 2, 1, 4).reshape(B, k.shape[2], 2 * h * d).contiguous())


def _from_token(dq, dkv, h):
    """The token-layout gradients back to (B, h, n, d) dq, dk, dv, to compare with the reference's."""
    B, N, C = dq.shape
    dk, dv = dkv.view(B, dkv.shape[1], 2, h, C // h).unbind(2)
    return dq.view(B, N, h, C // h).transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _token_layout_rows(q, k, v, bias, dout, ref, ref_grads, iters) -> dict:
    """What the model calls, on token-layout tensors: our Triton kernels, and the SDPA path it replaced."""
    from kernels.cross_attention import cross_attention_reference
    from kernels.triton_cross_attention import cross_attention_triton

    B, h, N, d = q.shape
    bias2 = bias[:, 0, 0, :].float()  # (B, L) as LinearDiT passes it
    g_out = dout.transpose(1, 2).reshape(B, N, h * d).contiguous()
    rows = {}
    for name, fn in (("triton", cross_attention_triton), ("model-sdpa", cross_attention_reference)):
        qt, kvt = (t.detach().requires_grad_() for t in _token(q, k, v))

        def fwd():
            return fn(qt, kvt, bias2, h)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (qt, kvt), g_out)

        got = (fwd().view(B, N, h, d).transpose(1, 2), *_from_token(*fwd_bwd(), h))
        rows[name] = _row(fwd, fwd_bwd, got, (ref, *ref_grads), iters)
    return rows


def _head_split(q, k, v, bias, ref) -> dict:
    """The forward kernel alone (graphed), its head channels as one power-of-two tile and as the two tiles it
    takes where they mask fewer lanes (kernels.triton_cross_attention.HEAD_SPLIT, _head_tiles), each checked
    against the float32 reference."""
    from kernels import triton_cross_attention as tca

    B, h, N, d = q.shape
    qt, kvt = _token(q, k, v)
    bias2 = bias[:, 0, 0, :].float()
    saved, out = tca.HEAD_SPLIT, {}
    try:
        for split in (False, True):
            tca.HEAD_SPLIT = split
            got = tca._cross_attention_op.fn(qt, kvt, bias2, h).view(B, N, h, d).transpose(1, 2)
            tiles = tca._head_tiles(d) if split else (tca._tile(d), 0)
            out["+".join(str(t) for t in tiles if t)] = dict(
                ms=graphed_ms(lambda: tca._cross_attention_op.fn(qt, kvt, bias2, h)),
                rel_err=((got.float() - ref).norm() / ref.norm()).item())
    finally:
        tca.HEAD_SPLIT = saved
    return out


# Tile configurations the sweep times: (BLOCK_M, num_warps, PROGRAMS_PER_SM, STAGES) forward and dq,
# (BLOCK_K, BLOCK_M, num_warps, STAGES) dk/dv. Pruned by an offline sm_90 compile at Sana-1.6B's shape: none
# of these spills registers (BLOCK_M 128 at 4 warps does, and dk/dv tiles of 64 keys by 64 queries at 4 warps).
# Where a tile has fewer rows than its warps cover (16 a warp: a dk/dv tile of 64 keys at 8 warps), Triton's
# Hopper layout repeats the product in both warp groups: hence 4-warp tiles of 64 rows and 8-warp ones of 128.
SWEEP = {
    "fwd": [(bm, w, pps, st) for bm in (64, 128) for w in (4, 8) for pps in (1, 2, 4) for st in (2, 3)
            if (bm, w) != (128, 4)],
    "bwd_dq": [(bm, w, pps, st) for bm in (32, 64) for w in (4, 8) for pps in (1, 2, 4) for st in (1, 2)]
              + [(128, 8, pps, 1) for pps in (1, 2, 4)],
    "bwd_dkv": [(16, 32, 8, 2), (16, 64, 4, 2), (16, 64, 8, 2), (16, 128, 8, 2), (32, 32, 4, 2), (32, 32, 4, 3),
                (32, 32, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2), (64, 32, 4, 2),
                (64, 32, 4, 3), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (128, 16, 8, 2), (128, 32, 8, 2),
                (128, 32, 8, 3)],
}


SWEEP_MATCH = 1e-2  # tiles change float32 summation orders only: their outputs agree to ~1e-3 in bf16


def _outputs(out) -> tuple[torch.Tensor, ...]:
    """A kernel call's outputs as a tuple of detached copies."""
    return tuple(t.detach().clone() for t in (out if isinstance(out, tuple) else (out,)))


def _sweep_config(kind: str, combo: tuple) -> dict:
    if kind == "bwd_dkv":
        bk, bm, warps, stages = combo
        return dict(BLOCK_K=bk, BLOCK_M=bm, num_warps=warps, STAGES=stages)
    bm, warps, pps, stages = combo
    return dict(BLOCK_M=bm, num_warps=warps, PROGRAMS_PER_SM=pps, STAGES=stages)


def _sweep_calls(q, k, v, bias, dout) -> dict:
    """kind -> a call of that kernel alone on the model's token-layout tensors (dk/dv on the dq kernel's
    statistics, computed once)."""
    from kernels import triton_cross_attention as tca

    B, h, N, d = q.shape
    qt, kvt = _token(q, k, v)
    bias2 = bias[:, 0, 0, :].float()
    g_out = dout.transpose(1, 2).reshape(B, N, h * d).contiguous()
    _, stat = tca._backward_dq(g_out, qt, kvt, bias2, h)
    return {"fwd": lambda: tca._cross_attention_op.fn(qt, kvt, bias2, h),
            "bwd_dq": lambda: tca._backward_dq(g_out, qt, kvt, bias2, h),
            "bwd_dkv": lambda: tca._backward_dkv(g_out, qt, kvt, bias2, stat, h)}


def _sweep(q, k, v, bias, dout, shard: tuple[int, int] | None = None) -> dict:
    """Each Triton kernel alone over SWEEP's tile configurations (graphed: kernel time, no host). Each
    configuration's outputs are checked against the committed one's (which the GPU tests hold to float64): one
    that differs by more than SWEEP_MATCH (a miscompile) is kept in the table, marked, and never ranked best.
    With shard (i, n): only compile (one call, no timing) every n-th configuration from the i-th, so that n
    processes fill Triton's cache in parallel before the timed sweep."""
    from kernels import triton_cross_attention as tca

    calls = _sweep_calls(q, k, v, bias, dout)
    saved = {kind: dict(cfg) for kind, cfg in tca.CONFIG.items()}
    result = {}
    try:
        for kind, combos in SWEEP.items():
            if shard is not None:
                combos = combos[shard[0]::shard[1]]
            entries = []
            committed = None if shard is not None else _outputs(calls[kind]())
            for combo in combos:
                tca.CONFIG[kind] = _sweep_config(kind, combo)
                try:
                    if shard is not None:
                        calls[kind]()
                        torch.cuda.synchronize()
                        continue
                    diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                               for a, b in zip(_outputs(calls[kind]()), committed))
                    ms = graphed_ms(calls[kind])
                except Exception as e:  # noqa: BLE001 - a configuration the compiler or the GPU refuses
                    entries.append(dict(tca.CONFIG[kind], error=str(e).splitlines()[0][:160]))
                    continue
                entries.append(dict(tca.CONFIG[kind], ms=ms, rel_diff=diff, ok=diff <= SWEEP_MATCH))
                print(f"sweep {kind} {tca.CONFIG[kind]}: {ms:.4f} ms, outputs within {diff:.1e} of the "
                      f"committed tiles'{'' if diff <= SWEEP_MATCH else ' WRONG'}", flush=True)
            tca.CONFIG[kind] = saved[kind]
            if shard is not None:
                continue
            entries.sort(key=lambda e: (not e.get("ok", False), e.get("ms", float("inf"))))
            result[kind] = entries
            result[f"{kind}_committed_ms"] = graphed_ms(calls[kind])
            print(f"best {kind}: {entries[0]}; committed {saved[kind]}: {result[f'{kind}_committed_ms']:.4f} ms")
    finally:
        tca.CONFIG.update(saved)
    return result


if __name__ == "__main__":
    main()
