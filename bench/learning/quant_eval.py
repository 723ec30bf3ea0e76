"""W8A8 quality on the learning benchmark: the quantised model's samples against the float model's.

Each quantised sample starts from the same noise and prompt as a float sample, so the two differ only by the
quantisation. Two measures (issue #13's quality goal):
- attribute accuracy (bench/learning/scorer.py) of the quantised samples, in points against the float model;
- latent-space PSNR of each quantised sample against its float twin, PSNR_DEFINITION below.
"""
from __future__ import annotations

import numpy as np

PSNR_PEAK = "max_abs_float"
PSNR_DEFINITION = ("per sample: 10 log10(peak^2 / MSE) over the whole (C, g, g) latent, MSE = mean((q - f)^2), "
                   "peak = max |f| of that float sample (f: the float model's latent from the same prompt and "
                   "noise, q: the quantised model's); identical samples give inf")
# The goals of issue #13, on the headline condition (text with guidance).
GOAL_CONDITION = "with_guidance"
GOAL_MAX_LOSS_POINTS = 1.0
GOAL_MIN_PSNR_DB = 30.0
GOAL_DEFINITION = (f"on {GOAL_CONDITION}: quant_accuracy_loss_le_1pt = float minus quantised mean attribute "
                   f"accuracy <= {GOAL_MAX_LOSS_POINTS:g} point; quant_latent_psnr_ge_30db = mean latent PSNR over "
                   f"the samples >= {GOAL_MIN_PSNR_DB:g} dB (the minimum is reported beside it)")
ATTRS = ("colour", "position", "size", "joint")


def latent_psnr(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """PSNR_DEFINITION for each sample of (B, C, g, g) batches, float64; inf where a sample is identical."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape or ref.ndim < 2:
        raise ValueError(f"latent_psnr needs two batches of one shape, got {ref.shape} and {got.shape}")
    axes = tuple(range(1, ref.ndim))
    mse = ((got - ref) ** 2).mean(axis=axes)
    peak = np.abs(ref).max(axis=axes)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / mse)


def psnr_stats(psnr: np.ndarray) -> dict:
    """Mean / min / max over the samples. JSON has no inf: a mean or max over identical samples is None,
    and `identical` counts them (a quantised model giving identical latents is not quantised)."""
    psnr = np.asarray(psnr, dtype=np.float64)

    def num(x: float) -> float | None:
        return round(float(x), 3) if np.isfinite(x) else None

    return {"mean_db": num(psnr.mean()), "min_db": num(psnr.min()), "max_db": num(psnr.max()),
            "n": int(psnr.size), "identical": int(np.isinf(psnr).sum()),
            "share_ge_30db": round(float((psnr >= GOAL_MIN_PSNR_DB).mean()), 4)}


def unrelated_psnr(ref: np.ndarray) -> dict:
    """What a latent unrelated to its reference scores: each float sample against the next one (another
    prompt and another noise). The floor that a working quantised model must be far above."""
    ref = np.asarray(ref)
    return psnr_stats(latent_psnr(ref, np.roll(ref, 1, axis=0)))


def compare(float_res: dict, float_lat: np.ndarray, q_res: dict, q_lat: np.ndarray, prompts: list[str],
            worst: int = 3) -> dict:
    """One condition: the quantised accuracies, their difference to the float model in points, the PSNR, and
    the `worst` samples by PSNR (which prompts a low minimum comes from)."""
    psnr = latent_psnr(float_lat, q_lat)
    delta = {a: round(100 * (q_res["accuracy"][a] - float_res["accuracy"][a]), 3) for a in ATTRS}
    delta["mean_attribute"] = round(100 * (q_res["mean_attribute_accuracy"] - float_res["mean_attribute_accuracy"]),
                                    3)
    return {"n": q_res["n"], "accuracy": q_res["accuracy"], "mean_attribute_accuracy": q_res["mean_attribute_accuracy"],
            "delta_points": delta, "latent_psnr": psnr_stats(psnr),
            "worst_samples": [{"index": int(i), "prompt": prompts[i], "psnr_db": round(float(psnr[i]), 3)}
                              for i in np.argsort(psnr)[:worst]],
            "sampling_s": q_res.get("sampling_s")}


def goals(mode_result: dict) -> dict:
    c = mode_result["conditions"][GOAL_CONDITION]
    mean = c["latent_psnr"]["mean_db"]
    return {"quant_accuracy_loss_le_1pt": bool(-c["delta_points"]["mean_attribute"] <= GOAL_MAX_LOSS_POINTS + 1e-9),
            "quant_latent_psnr_ge_30db": bool(mean is not None and mean >= GOAL_MIN_PSNR_DB)}
