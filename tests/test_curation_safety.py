"""Curation's operational safety: one bad input never fails a task, oversized inputs are refused before reading,
a job the cluster can never run stops at once in one line, one job per output folder, and no secret (VLM env
entries, URL credentials) lands in any output file.

Stage-level tests run without Ray; two tests (marked slow) run `jobs.curate` in a subprocess: the production
preset on this CPU machine (must fail in under 30 s), and a whole tiny run with one VLM whose output folder is
searched byte by byte for the secrets it was given.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.read import key_of, list_inputs, read_bytes
from curation.testdata import make_image_folder
from sana_core.errors import SanaError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(max_pixels=4096 * 4096, min_size=32)


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _batch(sources: list[str], locators: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(sources)
    obj = lambda xs: np.array(xs, dtype=object)
    return {"key": obj([key_of(s) for s in sources]), "source": obj(sources), "locator": obj(locators or sources),
            "reject": obj([""] * n), "detail": obj([""] * n)}


# ---------------------------------------------------------------------------------------------- the per-input guard

def test_an_unexpected_exception_rejects_only_its_input(tmp_path, monkeypatch):
    """Exceptions in reading, converting and resizing, each for one input, through the pipeline's task function."""
    import curation.resize
    import curation.validate
    from curation.pipeline import guarded_task
    from curation.resize import ResizeStage
    from curation.validate import DecodeStage

    paths = []
    for i, (w, h) in enumerate([(64, 48), (50, 70), (77, 41), (60, 60), (90, 40)]):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(_png(w, h, i))
        paths.append(str(p))
    real_read, real_to_rgb, real_resize = (curation.validate.read_bytes, curation.validate.to_rgb,
                                           curation.resize.resize_to_bucket)

    def read(locator, max_bytes=0):
        if locator.endswith("img1.png"):
            return "x::y".rsplit("@", 1)[1]  # the IndexError a colliding locator once raised
        return real_read(locator, max_bytes)

    def to_rgb(img, background):
        if img.size == (77, 41):
            raise RuntimeError("colour conversion blew up\non two lines")
        return real_to_rgb(img, background)

    def resize(img, bucket):
        if img.size == (90, 40):
            raise MemoryError()
        return real_resize(img, bucket)

    monkeypatch.setattr(curation.validate, "read_bytes", read)
    monkeypatch.setattr(curation.validate, "to_rgb", to_rgb)
    monkeypatch.setattr(curation.resize, "resize_to_bucket", resize)
    kw = dict(max_pixels=10**6, min_size=16)
    out = guarded_task(_batch(paths), stage_cls=DecodeStage, stage_kwargs=kw, name="decode", outputs=None)
    out = guarded_task(out, stage_cls=ResizeStage, stage_kwargs=dict(base=128, write_jpg=True, jpg_quality=90),
                       name="resize", outputs=None)
    assert list(out["reject"]) == ["", "error:IndexError", "error:RuntimeError", "", "error:MemoryError"]
    assert out["detail"][1].startswith("decode: IndexError: ")
    assert out["detail"][2] == "decode: RuntimeError: colour conversion blew up"
    assert out["detail"][4] == "resize: MemoryError"
    for i in (0, 3):
        assert out["image"][i].shape == (out["bucket_h"][i], out["bucket_w"][i], 3) and out["jpg"][i]
    assert out["image"][1].size == 0 and out["jpg"][4] == b""
    assert out["sha256"][2] != "" and out["sha256"][1] == ""  # read, then failed / never read


def test_mutated_images_of_every_format_never_escape_the_decode_stage(tmp_path):
    """Seeded byte mutations (flips, cuts, splices) of six formats and several modes: every input ends accepted
    as RGB or rejected with a reason and a one-line detail, and the stage never raises."""
    from curation.validate import DecodeStage

    rng = np.random.default_rng(11)
    base = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    seeds = []
    for fmt, img, kw in [("PNG", base, {}), ("JPEG", base, {}), ("GIF", base.convert("P"), {}),
                         ("WEBP", base, {}), ("TIFF", base.convert("CMYK"), {}), ("BMP", base, {}),
                         ("PNG", base.convert("RGBA"), {}), ("PNG", base.convert("I;16"), {})]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        seeds.append(buf.getvalue())
    paths = []
    for i in range(240):
        data = bytearray(seeds[i % len(seeds)])
        op = i % 3
        if op == 0:  # flip a few bytes
            for j in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[j] ^= int(rng.integers(1, 256))
        elif op == 1:  # cut
            data = data[: int(rng.integers(1, len(data)))]
        else:  # splice a random block in
            j = int(rng.integers(0, len(data)))
            data[j:j] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        p = tmp_path / f"m{i:03d}.img"
        p.write_bytes(bytes(data))
        paths.append(str(p))
    out = DecodeStage(max_pixels=10**6, min_size=8)(_batch(paths))
    for r, d, img in zip(out["reject"], out["detail"], out["image"]):
        assert (r == "" and img.mode == "RGB") or (r and d and "\n" not in d and img is None)
    reasons = set(out["reject"])
    assert "" in reasons and len(reasons - {""}) >= 2  # both outcomes happen: the mutations are not all fatal


def test_max_bytes_rejects_before_reading(tmp_path, monkeypatch):
    import webdataset as wds

    import curation.read
    from curation.validate import DecodeStage

    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(_png(40, 40, 0))
    big.write_bytes(_png(200, 200, 1))
    cap = small.stat().st_size + 100
    assert big.stat().st_size > cap
    tar = tmp_path / "in.tar"
    with wds.TarWriter(str(tar)) as w:
        w.write({"__key__": "s0", "png": small.read_bytes()})
        w.write({"__key__": "s1", "png": big.read_bytes()})
    members, _ = list_inputs(str(tar), "auto", [".png"], "path")
    opened = []
    real_open = curation.read._open
    monkeypatch.setattr(curation.read, "_open", lambda p, mode="rb": opened.append(p) or real_open(p, mode))
    srcs = [str(small), str(big)] + [m.source for m in members]
    out = DecodeStage(max_bytes=cap, **TINY)(_batch(srcs, [str(small), str(big)] + [m.locator for m in members]))
    assert list(out["reject"]) == ["", "too_large", "", "too_large"]
    assert out["detail"][1] == f"{big.stat().st_size} bytes > input.max_bytes={cap}"
    assert str(big) not in opened and opened.count(str(tar)) == 1  # the big file and member were never opened
    assert read_bytes(str(big)) == big.read_bytes()  # 0 = no cap
    with pytest.raises(SanaError, match="input.max_bytes"):
        from curation.config import CurateConfig
        from sana_core.config import load_config

        load_config(CurateConfig, overrides=["input.max_bytes=-1"])


# ---------------------------------------------------------------------------------------------- resources

def test_pools_that_can_never_fit_are_named_in_one_line():
    from curation.config import preset
    from curation.resources import fit_problem, pools

    one_cpu_box = ({"CPU": 2.0, "memory": 1e10}, [{"CPU": 2.0}])
    assert fit_problem(pools(preset("tiny")), *one_cpu_box) is None  # 4 x 0.25 + 0.25 + 0.25 actors + a task
    prod = pools(preset("production"))
    msg = fit_problem(prod, *one_cpu_box)
    assert msg and "\n" not in msg
    for name in ["list", "decode", "resize", "write", "caption:llava", "caption:qwen2vl", "caption:idefics3", "caption:gemma3", "clip",
                 "encode"]:
        assert name in msg
    # 4 VLMs x 4 CPU + clip 2 + encode 2 + one decode task 1 = 21 CPU; GPUs 1 + 1 + 1 + 2 + 1 + 1 = 7
    assert "need 21 CPU and 7 GPU" in msg and "the cluster has 2 CPU and 0 GPU on 1 node(s)" in msg
    assert "caption:gemma3 1 x (4 CPU + 2 GPU)" in msg and "--wait-for-resources" in msg
    # enough in total, but gemma3's tensor-parallel actor needs 2 GPUs on one node
    eight_single_gpu_nodes = ({"CPU": 64.0, "GPU": 8.0}, [{"CPU": 8.0, "GPU": 1.0}] * 8)
    msg = fit_problem(prod, *eight_single_gpu_nodes)
    assert "no node is large enough for one actor of caption:gemma3" in msg and "need" not in msg
    assert fit_problem(prod, {"CPU": 64.0, "GPU": 8.0}, [{"CPU": 32.0, "GPU": 4.0}] * 2) is None


def test_local_cluster_checked_before_it_starts_and_pools_match_the_stages(monkeypatch):
    from curation.caption import VLMCaptioner
    from curation.clip_score import ClipStage
    from curation.config import preset
    from curation.encode import EncodeStage
    from curation.resources import check_local, local_problem, pools

    assert VLMCaptioner.stateful and ClipStage.stateful and EncodeStage.stateful  # what pools() assumes
    assert [(p.name, p.actors) for p in pools(preset("tiny"))] == [
        ("list", 0), ("decode", 0), ("resize", 0), ("caption:llava", 1), ("caption:qwen2vl", 1),
        ("caption:idefics3", 1), ("caption:gemma3", 1), ("clip", 1), ("encode", 1), ("write", 0)]
    cfg = preset("production")
    cfg.ray.num_cpus = 8
    msg = local_problem(cfg)
    assert "need 21 CPU and 7 GPU" in msg and "gets 8 CPU (ray.num_cpus)" in msg and "\n" not in msg
    cfg.ray.num_cpus = 21
    assert local_problem(cfg) is None  # GPUs are left to the check on the started cluster
    cfg.ray.num_cpus = 1
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_local(cfg)  # an existing cluster is checked once attached, not here
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SanaError, match="this machine can never run the job"):
        check_local(cfg)


def test_wait_for_resources_waits_for_the_cluster_to_grow():
    from curation.config import preset
    from curation.resources import check_resources

    cfg = preset("production")
    small, big = ({"CPU": 2.0}, [{"CPU": 2.0}]), ({"CPU": 64.0, "GPU": 8.0}, [{"CPU": 32.0, "GPU": 4.0}] * 2)
    states = iter([small, small, big])  # an autoscaler adding two GPU nodes
    said: list[str] = []
    cfg.ray.wait_for_resources_s = 30
    check_resources(cfg, log=said.append, cluster=lambda: next(states), poll_s=0.01)
    assert len(said) == 1 and said[0].startswith("waiting up to 30 s")
    cfg.ray.wait_for_resources_s = 0.05
    with pytest.raises(SanaError, match=r"can never run the job.*\(waited 0.05 s\)"):
        check_resources(cfg, log=said.append, cluster=lambda: small, poll_s=0.01)


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_production_preset_on_this_cluster_fails_fast_in_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(64, 64, 0))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "jobs.curate", "--input", str(tmp_path / "in"), "--output",
                        str(tmp_path / "out"), "--preset", "production"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    wall = time.time() - t0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith("error: this machine can never run the job: the actor pools need 21 CPU and 7 GPU")
    assert f"a local Ray cluster here gets {os.cpu_count()} CPU (all cores)" in errors[0]
    assert wall < 30, f"took {wall:.1f} s"
    assert not (tmp_path / "out").exists()  # refused before touching the output


@pytest.mark.slow
def test_gpus_the_cluster_lacks_are_refused_after_ray_starts(tmp_path):
    """Enough (logical) CPUs for the production pools, no GPUs: the check on the running cluster refuses it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(64, 64, 0))
    r = subprocess.run([sys.executable, "-m", "jobs.curate", "--input", str(tmp_path / "in"), "--output",
                        str(tmp_path / "out"), "--preset", "production", "--set", "ray.num_cpus=32"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith("error: this cluster can never run the job: the actor pools need 21 CPU and 7 GPU")
    assert "the cluster has 32 CPU and 0 GPU on 1 node(s)" in errors[0]
    assert not (tmp_path / "out" / ".sana.lock").exists()  # released on the way out


# ---------------------------------------------------------------------------------------------- the output lock

def test_second_job_on_a_locked_output_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from jobs.curate import main

    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()  # an input that fails fast once the lock is held: nothing is curated here
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sana_core.lock import OutputLock; "
                               "OutputLock(sys.argv[1], what='curation job').acquire(); print('held', flush=True); "
                               "time.sleep(120)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # production models need no zoo; logical CPUs let it past the local resource check to the lock
        args = ["--input", str(empty), "--output", str(out), "--preset", "production", "--set", "ray.num_cpus=64"]
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1
        assert "in use by another curation job on host" in err and f"pid {holder.pid}" in err
    finally:
        holder.kill()  # dies holding the lock: a stale lock
        holder.wait()
    assert (out / ".sana.lock").exists()
    args[1] = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as e:
        main(args)  # takes the stale lock over, then fails for its own reason (no such input), releasing it
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "missing" in errors[0] and "in use" not in errors[0]
    assert not (out / ".sana.lock").exists()


# ---------------------------------------------------------------------------------------------- secrets

class _Server:
    """A local HTTP server for a folder: URL inputs with credentials, read by real fsspec/aiohttp."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on the test's stderr
        pass


SECRETS = ["hunter2pw", "SIGsecret123", "CREDsecret456"]


def _signed_url(port: int, rel: str) -> str:
    return (f"http://alice:{SECRETS[0]}@127.0.0.1:{port}/{rel}?X-Amz-Signature={SECRETS[1]}"
            f"&X-Amz-Credential={SECRETS[2]}&size=big")


def _clean_url(port: int, rel: str) -> str:
    return f"http://127.0.0.1:{port}/{rel}?size=big"


def test_url_credentials_never_reach_sources_or_details(tmp_path):
    from curation.validate import DecodeStage

    (tmp_path / "a.png").write_bytes(_png(64, 48, 0))
    with _Server(tmp_path) as srv:
        urls = [_signed_url(srv.port, "a.png"), _signed_url(srv.port, "missing.png")]
        pq.write_table(pa.table({"path": urls}), tmp_path / "list.parquet")
        items, _ = list_inputs(str(tmp_path / "list.parquet"), "auto", [".png"], "path")
        assert [it.source for it in items] == [_clean_url(srv.port, "a.png"), _clean_url(srv.port, "missing.png")]
        assert [it.locator for it in items] == urls  # reading still needs them
        out = DecodeStage(max_bytes=10**6, **TINY)(_batch([it.source for it in items], [it.locator for it in items]))
    assert list(out["reject"]) == ["", "unreadable"] and out["mode"][0] == "RGB"
    assert out["sha256"][0] == __import__("hashlib").sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert not any(s in str(out["detail"][1]) for s in SECRETS), out["detail"][1]


DRIVER = '''
import sys

from curation import config

full = config.PRESETS["tiny"]


def one_vlm():  # one vLLM engine instead of four: what is checked here does not depend on how many
    cfg = full()
    cfg.vlms = {"llava": cfg.vlms["llava"]}
    return cfg


config.PRESETS["tiny"] = one_vlm
if __name__ == "__main__":
    from jobs.curate import main
    from jobs.report import main as report

    main(sys.argv[1:])
    report([sys.argv[sys.argv.index("--output") + 1]])
'''


@pytest.mark.slow
def test_no_secret_lands_in_any_output_file(tmp_path, zoo):
    """A token in vlms.llava.env and credentials in input URLs: not one byte of them in the output folder."""
    expected = make_image_folder(tmp_path / "images", n_good=4, seed=2)
    big = tmp_path / "images" / "big.png"
    big.write_bytes(_png(300, 300, 5))  # ~270 KB of noise, over the cap below
    (tmp_path / "images" / "remote").mkdir()
    (tmp_path / "images" / "remote" / "r.png").write_bytes(_png(96, 64, 6))  # only listed as a URL (no duplicate)
    token = "s3cr3t-vlm-env-value-7f9a2c"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    with _Server(tmp_path / "images") as srv:
        local = sorted(expected.all) + [str(big)]
        remote = [_signed_url(srv.port, "remote/r.png"), _signed_url(srv.port, "nope.png")]
        pq.write_table(pa.table({"path": local + remote}), tmp_path / "list.parquet")
        r = subprocess.run([sys.executable, str(driver), "--input", str(tmp_path / "list.parquet"), "--output",
                            str(out), "--preset", "tiny", "--set", f"vlms.llava.env.SANA_TEST_TOKEN={token}",
                            # the remote URL serves the bytes of a local input: keep both (no exact dedup)
                            "--set", "input.max_bytes=150000", "--set", "dedup.exact=false"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    rej = {x["source"]: x for x in pq.read_table(out / "rejected.parquet").to_pylist()}
    sources = {m["source"]: m for m in man}
    # special modes are accepted by default, with the input's mode in the manifest
    assert set(expected.converted) <= set(sources) and len(expected.converted) >= 8
    for path, mode in expected.converted.items():
        assert sources[path]["mode"] == mode
    assert rej[str(big)]["reason"] == "too_large"
    assert expected.accepted <= set(sources)
    assert {p: rej[p]["reason"] for p in expected.rejected} == expected.rejected
    assert _clean_url(srv.port, "remote/r.png") in sources and rej[_clean_url(srv.port, "nope.png")]["reason"] \
        == "unreadable"
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["vlms"]["llava"]["env"]["SANA_TEST_TOKEN"] == "<redacted>"
    # not one byte of any secret in any file (parquet columns are read back too: compression could hide bytes)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"report.html", "run.json", "manifest.parquet", "rejected.parquet"} <= {p.name for p in out.iterdir()}
    for p in files:
        blob = p.read_bytes()
        texts = [blob] + ([json.dumps(pq.read_table(p).to_pylist(), default=str).encode()]
                          if p.suffix == ".parquet" else [])
        for secret in SECRETS + [token]:
            assert not any(secret.encode() in t for t in texts), f"{secret} in {p}"


def test_print_config_redacts_env_entries_and_secret_keys(tmp_path, capsys):
    from jobs.curate import main

    main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--preset", "tiny", "--print-config",
          "--set", "vlms.llava.env.SANA_TEST_TOKEN=tok-abc-123", "--set", "vlms.llava.engine_kwargs.hf_token=hf-x-9"])
    printed = capsys.readouterr().out
    assert "SANA_TEST_TOKEN: <redacted>" in printed and "hf_token: <redacted>" in printed
    assert "tok-abc-123" not in printed and "hf-x-9" not in printed and "max_tokens: 24" in printed
