"""The training loader on real WebDataset shards written to the data contract."""
from collections import Counter

import pytest

from sana_core.errors import SanaError
from training.caption_sampler import CaptionSamplerConfig
from training.config import DataConfig
from training.data import build_loader, check_latent_channels, find_shards
from training.testdata import write_shards


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
