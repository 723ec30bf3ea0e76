"""The training loader on real WebDataset shards written to the data contract."""
from collections import Counter
from pathlib import Path

import pytest

from sana_core.errors import SanaError
from training.caption_sampler import CaptionSamplerConfig
from training.config import DataConfig
from training.data import DataHealth, build_loader, check_latent_channels, find_shards
from training.testdata import write_bad_shards, write_shards


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    recs = write_shards(d, n=60, per_shard=12, grids=((4, 4), (4, 8), (8, 4)))
    return d, recs


def batches(d, cfg, rank=0, world=1, start=0, epochs=1, positions=None):
    return list(build_loader(find_shards(d), cfg, CaptionSamplerConfig(), rank, world, start_batches=start,
                             epochs=epochs, positions=positions))


def test_find_shards_accepts_output_or_shards_dir(shards_dir, tmp_path):
    d, _ = shards_dir
    assert find_shards(d) == find_shards(d / "shards")
    assert len(find_shards(d)) == 5
    with pytest.raises(SanaError, match="no shard"):
        find_shards(tmp_path)


def test_every_batch_has_one_latent_shape(shards_dir):
    d, recs = shards_dir
    shapes = {r["key"]: tuple(r["latent_shape"]) for r in recs}
    out = batches(d, DataConfig(batch_size=4, num_workers=2, shuffle_buffer=16))
    assert len({tuple(b["latents"].shape[1:]) for b in out}) == 3
    for b in out:
        assert b["latents"].dim() == 4
        assert {shapes[k] for k in b["keys"]} == {tuple(b["latents"].shape[1:])}


@pytest.mark.parametrize("per_shard", [12, 60])  # 5 shards (split by shard) and 1 shard (split by sample)
def test_each_sample_exactly_once_per_epoch_across_ranks_and_workers(tmp_path, per_shard):
    recs = write_shards(tmp_path, n=60, per_shard=per_shard)
    cfg = DataConfig(batch_size=5, num_workers=2, shuffle_buffer=8, caption_dropout=0.0)
    seen = Counter()
    for rank in range(2):
        for b in batches(tmp_path, cfg, rank=rank, world=2):
            seen.update(b["keys"])
    assert seen == Counter(r["key"] for r in recs)


def test_shuffle_is_seeded_and_epochs_differ(shards_dir):
    d, _ = shards_dir
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=16)
    order = lambda c: [k for b in batches(d, c, epochs=2) for k in b["keys"]]
    a, b = order(cfg), order(cfg)
    assert a == b
    assert a[:60] != a[60:]  # a new order in the second epoch
    assert a != order(DataConfig(batch_size=4, num_workers=0, shuffle_buffer=16, seed=1))


@pytest.mark.parametrize("workers,start,jump", [(0, 7, False), (2, 7, False), (2, 8, False), (0, 21, True),
                                                (2, 23, True)])
def test_resume_position_continues_the_exact_batch_sequence(shards_dir, workers, start, jump):
    d, _ = shards_dir
    cfg = DataConfig(batch_size=4, num_workers=workers, shuffle_buffer=16)
    full = batches(d, cfg, epochs=3)
    # jump: each worker's (epoch, index) of its last consumed batch lets it start in that epoch.
    positions = {b["worker"]: (b["epoch"], b["index"]) for b in full[:start]} if jump else None
    if jump:
        assert min(e for e, _ in positions.values()) >= 1  # the resumed workers really skip an epoch
    resumed = batches(d, cfg, start=start, epochs=3, positions=positions)
    n = min(len(resumed), len(full) - start) - 2  # limited epochs: the tail's worker turns may differ
    assert n > 10
    for a, b in zip(full[start:start + n], resumed[:n]):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert (a["latents"] == b["latents"]).all()


def test_caption_choice_dropout_and_skips(tmp_path):
    write_shards(tmp_path, n=24, per_shard=24, no_caption=3)
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=4, caption_dropout=0.5)
    out = batches(tmp_path, cfg, epochs=4)
    assert sum(len(b["keys"]) for b in out) == 4 * 21  # the 3 images without a finite score are skipped
    assert out[-1]["skipped"] == 12
    dropped = [c for b in out for c, dr in zip(b["captions"], b["dropped"].tolist()) if dr]
    assert dropped and set(dropped) == {""}
    assert 0.3 < len(dropped) / (4 * 21) < 0.7
    assert {v for b in out for v in b["vlms"]} == {"vlm-a", "vlm-b", "vlm-c"}


def test_latent_channel_mismatch_fails_with_expected_and_found(tmp_path):
    write_shards(tmp_path, n=4, channels=16)
    with pytest.raises(SanaError, match=r"expects \(C=32, h, w\).*holds \(16, 4, 4\)"):
        check_latent_channels(find_shards(tmp_path), 32)


# --- bad shards and samples (data.on_error) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    recs = write_shards(d, n=36, per_shard=12, grids=((4, 4), (4, 8)))
    bad = write_bad_shards(d)
    return d, [r["key"] for r in recs] + bad["good"], bad


def _quick(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 4, "num_workers": 2, "shuffle_buffer": 8, "caption_dropout": 0.0,
                         "retry_wait": 0.0, "read_retries": 1, **kw})


def test_bad_shards_and_samples_are_skipped_once_and_reported(bad_dir, capsys):
    d, good, bad = bad_dir
    out = batches(d, _quick())
    assert Counter(k for b in out for k in b["keys"]) == Counter(good)  # every usable sample exactly once
    reported = [(Path(u).name, r) for b in out for u, r in b["bad_shards"]]
    assert sorted(n for n, _ in reported) == bad["bad_shards"]
    reasons = dict(reported)
    assert "ReadError" in reasons["shard-900000.tar"] and "after" in reasons["shard-900000.tar"]
    assert "empty file" in reasons["shard-900001.tar"] and "invalid header" in reasons["shard-900002.tar"]
    assert all("(2 attempts)" in r for r in reasons.values())  # retried once, then skipped
    samples = {k: r for b in out for k, _u, r in b["bad_samples"]}
    assert sorted(samples) == sorted(bad["bad_samples"])
    assert "not finite" in samples[bad["bad_samples"][0]] and "latent_shape" in samples[bad["bad_samples"][1]]
    assert "no KEY.latent.npy" in samples[bad["bad_samples"][2]]
    health = DataHealth()
    for b in out:
        health.update(b)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and sum(ln.startswith("warning: skipped shard ") for ln in err) == 3  # one line each
    assert len(health.shards) == 3 and health.samples == 3
    assert DataHealth.merge([health.state(), {"shards": {"x": "y"}, "samples": 2}])["samples"] == 5


def test_wrong_channels_is_a_bad_sample_not_a_crash(tmp_path):
    write_shards(tmp_path, n=8, per_shard=8)
    write_shards(tmp_path / "other", n=2, per_shard=2, channels=16, seed=5)
    (tmp_path / "other" / "shards" / "shard-000000.tar").rename(tmp_path / "shards" / "shard-000009.tar")
    out = list(build_loader(find_shards(tmp_path), _quick(num_workers=0), CaptionSamplerConfig(), epochs=1,
                            channels=32))
    assert sum(len(b["keys"]) for b in out) == 8
    assert [r for b in out for _k, _u, r in b["bad_samples"]] == ["latent has 16 channels, the model 32"] * 2


def test_transient_read_error_is_retried_and_loses_nothing(shards_dir, tmp_path):
    d, recs = shards_dir
    shard = find_shards(d)[0]
    # A real reader that fails the first time, half-way through the shard (as a dropped connection does).
    mark = tmp_path / "failed-once"
    url = f"pipe:sh -c 'if [ -e {mark} ]; then cat {shard}; else touch {mark}; head -c 20000 {shard}; fi'"
    cfg = _quick(num_workers=0)
    out = list(build_loader([url], cfg, CaptionSamplerConfig(), epochs=1))
    want = [r["key"] for r in recs[:12]]
    assert Counter(k for b in out for k in b["keys"]) == Counter(want) and mark.exists()
    assert not any(b["bad_shards"] for b in out)
    # Without retries the same failure skips the rest of the shard, keeping the samples read before it.
    mark.unlink()
    out = list(build_loader([url], _quick(num_workers=0, read_retries=0), CaptionSamplerConfig(), epochs=1))
    got = [k for b in out for k in b["keys"]]
    assert 0 < len(got) < 12 and set(got) < set(want)
    assert [r for b in out for _u, r in b["bad_shards"]][0].startswith("ReadError")


@pytest.mark.parametrize("workers", [0, 2])
def test_on_error_fail_stops_with_one_line_naming_the_shard(bad_dir, workers):
    d, _, _ = bad_dir
    with pytest.raises(SanaError) as e:
        batches(d, _quick(num_workers=workers, on_error="fail", read_retries=0))
    msg = str(e.value)
    assert "\n" not in msg and "data.on_error=fail" in msg
    assert ("shard " in msg and "shard-9000" in msg) or ("sample " in msg and "shard-900003.tar" in msg)


def test_resume_continues_exactly_when_shards_were_skipped(bad_dir):
    d, _, _ = bad_dir
    cfg = _quick()
    full = batches(d, cfg, epochs=2)
    start = 9
    resumed = batches(d, cfg, start=start, epochs=2)
    n = min(len(resumed), len(full) - start) - 2
    assert n > 5
    for a, b in zip(full[start:start + n], resumed[:n]):
        assert a["keys"] == b["keys"] and (a["latents"] == b["latents"]).all()
        assert a["bad_shards"] == b["bad_shards"] and a["bad_samples"] == b["bad_samples"]
    # The events of the batches a resumed worker discards are discarded with them: nothing counted twice.
    count = lambda bs: sum(len(b["bad_shards"]) + len(b["bad_samples"]) for b in bs)
    assert count(full[:start]) + count(resumed[:n]) == count(full[:start + n])
    assert count(full[:start]) > 0


def test_latent_check_passes_over_unreadable_first_shards(bad_dir, tmp_path):
    d, _, _ = bad_dir
    shards = sorted(find_shards(d), key=lambda p: p.name, reverse=True)  # the bad ones first
    assert check_latent_channels(shards, 32)[0] == 32
    with pytest.raises(SanaError, match=r"^shard .*shard-900003.tar: .*fail\)$|^sample .*shard-900003.tar"):
        check_latent_channels(shards, 32, on_error="fail")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(SanaError, match="no usable sample in any of the 1 shard.*empty file"):
        check_latent_channels(find_shards(tmp_path), 32)
