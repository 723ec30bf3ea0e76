import math
import random

from sana_core.buckets import make_buckets, nearest_bucket


def test_buckets_are_multiples_and_near_base_area():
    for base, mult in [(1024, 32), (512, 32), (128, 32), (256, 64)]:
        buckets = make_buckets(base, mult)
        assert len(buckets) == len(set(buckets)) >= 5
        for h, w in buckets:
            assert h % mult == 0 and w % mult == 0
        square = [b for b in buckets if b[0] == b[1]]
        assert square == [(base, base)]
        if base >= 512:
            for h, w in buckets:
                assert 0.7 < h * w / base**2 < 1.3


def test_nearest_bucket_minimises_log_aspect_error():
    buckets = make_buckets(512)
    rng = random.Random()
    for _ in range(200):
        h, w = rng.randint(32, 4000), rng.randint(32, 4000)
        got = nearest_bucket(h, w, buckets)
        err = abs(math.log(got[0] / got[1]) - math.log(h / w))
        assert all(err <= abs(math.log(b[0] / b[1]) - math.log(h / w)) + 1e-12 for b in buckets)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(4000, 1000, buckets)[0] > nearest_bucket(4000, 1000, buckets)[1]
