"""The whole stack end to end with tiny random-weight models, on this machine, in a few minutes.

    python -m jobs.demo --output demo_out        (what `make demo` runs)

1. builds the tiny model zoo (four VLMs, CLIP, Gemma-2, DC-AE) if it is not cached;
2. generates a folder of images, bad ones included;
3. starts a local Ray cluster and submits the curation job to it with `ray job submit`, exactly as on a
   GPU cluster (captions from four VLMs through vLLM, CLIP scores, DC-AE latents, WebDataset shards);
4. writes the dataset report (HTML);
5. trains the tiny Linear DiT on the shards (rectified flow, CLIP-score caption sampling, wandb offline);
6. samples images from the trained checkpoint with Flow-DPM-Solver.
Every stage is the real entry point a user runs; the demo only chains them and times them.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from sana_core.errors import SanaError, cli_main
from sana_core.zoo import default_root

REPO = Path(__file__).resolve().parents[1]
AGENT_WAIT_S = 300  # how long a fresh head may take to start its job agent (seen: over 60 s on a loaded 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(title: str, cmd: list[str], timings: list, env: dict | None = None) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env)
    timings.append((title, time.time() - t0))
    if r.returncode != 0:
        raise SanaError(f"demo stage '{title}' failed with exit code {r.returncode}: {' '.join(cmd)}")


class LocalRayCluster:
    """A private `ray start --head` (own ports and temp dir) so the demo never touches another cluster."""

    def __init__(self, num_cpus: int):
        self.port, self.dash = _free_port(), _free_port()
        self.tmp = f"/tmp/ray_demo_{os.getpid()}"
        bindir = str(Path(sys.executable).parent)
        # The job's `python` is whatever is first on PATH of the process that ran `ray start`. Ray (>= 2.5x)
        # turns token authentication on for a head node once any local ray.init() has left a token in
        # ~/.ray, but `ray job submit` does not pick that token up by itself; a token of our own, given to
        # both sides, works whatever ~/.ray holds.
        self.env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        # jobs run in a copy of the working dir without .cache/: point them at this zoo
                        SANA_ZOO_DIR=str(default_root()))
        self.num_cpus = num_cpus

    def __enter__(self):
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}",
               f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        print(f"$ {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=self.env, stdout=subprocess.DEVNULL)
        try:
            self._wait_for_job_agent()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_job_agent(self) -> None:
        """Return once the head accepts jobs. `ray start` returns before the head's job agent is up, and a
        submission until then fails with "No available agent to submit job" (on a loaded 2-core machine for
        over a minute): submit a job that does nothing until one is accepted (a refused submission creates no
        job), so that the real submission never meets that error."""
        probe = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.dashboard,
                 "--no-wait", "--", "true"]
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            r = subprocess.run(probe, env=self.env, capture_output=True, text=True, timeout=AGENT_WAIT_S)
            if r.returncode == 0:
                return
            out = (r.stdout + r.stderr).strip()
            if "No available agent to submit job" not in out or time.monotonic() > deadline:
                last = out.splitlines()[-1] if out else f"exit code {r.returncode}"
                raise SanaError(f"the local Ray cluster at {self.dashboard} does not accept jobs "
                                f"(waited up to {AGENT_WAIT_S} s): {last}")
            time.sleep(2)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def __exit__(self, *exc):
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=dict(
            self.env, RAY_ADDRESS=f"127.0.0.1:{self.port}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_out", help="folder for everything the demo writes (default: demo_out)")
    p.add_argument("--images", type=int, default=24, help="good images to generate (bad ones are added)")
    p.add_argument("--train-steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--keep", action="store_true", help="keep an existing output folder (resume) instead of wiping it")
    args = p.parse_args(argv)

    from curation.testdata import make_image_folder
    from sana_core.zoo import ensure_zoo

    out = (REPO / args.output).resolve() if not Path(args.output).is_absolute() else Path(args.output)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    timings: list[tuple[str, float]] = []

    t0 = time.time()
    zoo = ensure_zoo()
    timings.append(("tiny model zoo", time.time() - t0))
    print(f"zoo: {len(zoo.vlms)} VLMs {sorted(zoo.vlms)}, CLIP {zoo.clip_model}, Gemma-2 {zoo.gemma}, DC-AE {zoo.dcae}")

    images = out / "images"
    if not images.exists():
        make_image_folder(images, n_good=args.images, seed=0)
    curated = out / "curated"
    with LocalRayCluster(num_cpus=os.cpu_count() or 2) as ray_cluster:
        _run("curate (ray job submit)", [
            str(Path(py).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
            "--working-dir", str(REPO), "--", "python", "-m", "jobs.curate",
            "--input", str(images), "--output", str(curated), "--preset", "tiny"], timings, env=ray_cluster.env)
    _run("dataset report", [py, "-m", "jobs.report", str(curated)], timings)
    run_dir = out / "run"
    _run("train", [py, "-m", "jobs.train", "--data", str(curated), "--output", str(run_dir), "--preset", "tiny",
                   "--max-steps", str(args.train_steps)] + (["--resume"] if args.keep and run_dir.exists() else []),
         timings)
    _run("sample", [py, "-m", "jobs.sample", "--checkpoint", str(run_dir), "--prompt",
                    "a photo of a red circle on a blue background", "--steps", "20",
                    "--out", str(out / "sample.png")], timings)

    print("\n=== demo summary")
    for title, secs in timings:
        print(f"  {title:<28} {secs:8.1f} s")
    print(f"  {'total':<28} {sum(s for _, s in timings):8.1f} s")
    print(f"\n  shards:  {curated / 'shards'}\n  report:  {curated / 'report.html'}\n"
          f"  run:     {run_dir} (wandb offline files under {run_dir / 'wandb'})\n  sample:  {out / 'sample.png'}")


if __name__ == "__main__":
    main()
