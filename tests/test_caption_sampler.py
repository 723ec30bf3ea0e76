"""The CLIP-score caption sampler: distribution (chi-square against the softmax), Sana's weighting, exclusions."""
import math

import numpy as np
import pytest

from training.caption_sampler import CaptionSampler, CaptionSamplerConfig, sana_probs, softmax_probs

# Upper 0.1% points of the chi-square distribution (standard tables), by degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}

CAPTIONS = {"a": "cap a", "b": "cap b", "c": "cap c", "d": "cap d"}
SCORES = {"a": 31.0, "b": 30.0, "c": 28.5, "d": 27.0}


def chi_square(counts: dict[str, int], names: list[str], probs: np.ndarray) -> float:
    n = sum(counts.values())
    return float(sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in zip(names, probs)))


def draw(sampler: CaptionSampler, n: int, captions=CAPTIONS, scores=SCORES) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(n):  # different images and epochs: the sampler's randomness is per (key, epoch)
        name, _, _ = sampler.pick(f"key{i % 97}", captions, scores, epoch=i // 97)
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_softmax_distribution_chi_square(temperature):
    s = CaptionSampler(CaptionSamplerConfig(mode="softmax", temperature=temperature, seed=3))
    counts = draw(s, 20000)
    names, p = s.probabilities(CAPTIONS, SCORES)
    expected = np.exp(np.array([SCORES[k] for k in names]) / temperature)
    assert np.allclose(p, expected / expected.sum())
    assert chi_square(counts, names, p) < CHI2_999[len(names) - 1]
    # The same test rejects a wrong temperature: it has the power to fail.
    wrong = softmax_probs(np.array([SCORES[k] for k in names]), temperature * 1.5)
    assert chi_square(counts, names, wrong) > CHI2_999[len(names) - 1]


def test_temperature_near_zero_takes_best_caption():
    s = CaptionSampler(CaptionSamplerConfig(mode="softmax", temperature=1e-4))
    assert draw(s, 300) == {"a": 300}
    assert draw(CaptionSampler(CaptionSamplerConfig(mode="best")), 50) == {"a": 50}


def test_sana_weighting_threshold_and_fallback():
    # NVlabs/Sana weighted_sample_clipscore: score ** (1/T) over captions with score >= threshold.
    cfg = CaptionSamplerConfig(mode="sana", temperature=0.05, threshold=28.0, seed=1)
    s = CaptionSampler(cfg)
    names, p = s.probabilities(CAPTIONS, SCORES)
    w = np.array([31.0, 30.0, 28.5, 0.0]) ** 20
    assert np.allclose(p, w / w.sum())
    counts = draw(s, 20000)
    assert "d" not in counts
    keep = [i for i, k in enumerate(names) if p[i] > 0]
    assert chi_square(counts, [names[i] for i in keep], p[keep]) < CHI2_999[len(keep) - 1]
    # Nothing passes the threshold -> the best caption, always.
    s2 = CaptionSampler(CaptionSamplerConfig(mode="sana", temperature=1.0, threshold=99.0))
    assert draw(s2, 100) == {"a": 100}
    assert np.allclose(sana_probs(np.array([1.0, 2.0]), 1.0, 5.0), [0.0, 1.0])


def test_missing_and_nonfinite_scores_are_excluded_and_empty_images_skipped():
    s = CaptionSampler(CaptionSamplerConfig(mode="softmax", temperature=100.0))
    scores = {"a": float("nan"), "b": 30.0, "c": float("inf")}  # d has no score at all
    assert set(draw(s, 200, scores=scores)) == {"b"}
    assert s.skipped == 0
    assert s.pick("k", CAPTIONS, {"a": float("nan")}) is None
    assert s.pick("k", {"a": ""}, {"a": 30.0}) is None  # an empty caption is no caption
    assert s.pick("k", CAPTIONS, {}) is None
    assert s.skipped == 3


def test_deterministic_under_seed_and_varies_by_epoch():
    a = CaptionSampler(CaptionSamplerConfig(temperature=5.0, seed=7))
    b = CaptionSampler(CaptionSamplerConfig(temperature=5.0, seed=7))
    c = CaptionSampler(CaptionSamplerConfig(temperature=5.0, seed=8))
    picks = lambda s, e: [s.pick(f"k{i}", CAPTIONS, SCORES, epoch=e)[0] for i in range(200)]
    assert picks(a, 0) == picks(b, 0)
    assert picks(a, 0) != picks(c, 0)
    assert picks(a, 0) != picks(a, 1)
    assert math.isclose(sum(softmax_probs(np.array([1e4, -1e4, 0.0]), 0.5)), 1.0)
