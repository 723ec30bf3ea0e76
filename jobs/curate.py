"""Curate images into a training dataset: captions from several VLMs, CLIP scores, DC-AE latents.

    python -m jobs.curate --input IMAGES/ --output OUT/ --preset tiny
    ray job submit --working-dir . -- python -m jobs.curate --input /data/imgs --output /data/out --preset production

INPUT is a folder tree of images, a WebDataset .tar (or a brace/glob pattern, or a folder of tars
with --set input.format=webdataset), or a .parquet file with a `path` column (local paths or fsspec URLs).
OUTPUT gets WebDataset shards, manifest.parquet/ and rejected.parquet/ (folders of Parquet parts, each
readable as one table) and run.json (docs/data_contract.md). Listing, the resume anti-join and writing all run
on the Ray workers; the driver holds no per-image state (docs/scaling.md). Inputs with the same bytes as an
accepted sample or an earlier input are kept once, the others rejected as `duplicate` (dedup.exact=false keeps
every copy); a source listed twice is one input.

Re-running the same command resumes: finished shards and recorded rejections are kept, the rest is
done, nothing is duplicated (also after kill -9). A changed config or input is refused unless you pass
--new-output, which deletes the earlier results in OUTPUT first.

Palette, alpha, 16/32-bit, CMYK, ICC-profiled and animated images are converted to 8-bit sRGB (alpha over
input.background, default white); input.special_modes=reject rejects them instead. Bad inputs (empty, larger
than input.max_bytes, truncated, not images, decompression bombs, too small, unreadable, or any error while
reading/decoding/resizing one input, as error:<Type>) are recorded in rejected.parquet with a reason; the
job still exits 0 and prints how many were rejected.

Ray: attaches to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a private local one.
A job whose actor pools the cluster can never hold (e.g. the production preset's GPUs on a CPU machine) is
refused at once in one line; --wait-for-resources SECONDS waits for an autoscaling cluster instead.
One job at a time per OUTPUT (a lock file, OUTPUT/.sana.lock; a dead job's lock is taken over).
Secrets (token/key/password-like config values, vlms.*.env) are redacted in run.json and --print-config;
credentials in input URLs (user:pass@, signed query strings) never reach the manifests, shards or report.
"""
from __future__ import annotations

import argparse

from sana_core.config import add_config_args, load_config
from sana_core.errors import SanaError, cli_main


@cli_main
def main(argv: list[str] | None = None) -> None:
    from curation.config import PRESETS, CurateConfig, preset, resolve_models

    p = argparse.ArgumentParser(prog="python -m jobs.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image folder, WebDataset tar(s), or a .parquet listing paths")
    p.add_argument("--output", required=True, help="output folder (shards/, manifest.parquet, rejected.parquet, "
                                                   "run.json)")
    add_config_args(p, presets=sorted(PRESETS), default_preset="production")
    p.add_argument("--new-output", action="store_true",
                   help="OUTPUT was written with another config/input: delete those results and start afresh")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit "
                                                                  "(secrets redacted)")
    p.add_argument("--wait-for-resources", type=float, metavar="SECONDS", default=None,
                   help="on an autoscaling cluster: wait up to SECONDS for the CPUs/GPUs the actor pools need "
                        "(default: refuse at once, in one line, a job the cluster can never run)")
    args = p.parse_args(argv)

    cfg = load_config(CurateConfig, preset=preset(args.preset), path=args.config, overrides=args.set)
    if args.wait_for_resources is not None:
        if args.wait_for_resources < 0:
            raise SanaError(f"--wait-for-resources {args.wait_for_resources:g}: must be >= 0 seconds")
        cfg.ray.wait_for_resources_s = args.wait_for_resources
    if args.print_config:
        import yaml

        from sana_core.config import to_dict
        from sana_core.secrets import redact

        print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
        return
    from curation.resources import check_local

    check_local(cfg)  # a job a private local cluster can never run: refused before starting one
    from curation.pipeline import run
    from curation.summary import format_table
    from sana_core.lock import OutputLock

    cfg = resolve_models(cfg)
    # One job per output folder: a second one fails in one line naming the holder; a dead holder's lock is
    # taken over (sana_core.lock).
    with OutputLock(args.output, what="curation job"):
        result = run(cfg, args.input, args.output, new_output=args.new_output)
    print(format_table(result.record), flush=True)
    print(f"done: {result.accepted} accepted, {result.rejected} rejected of {result.inputs} inputs "
          f"-> {args.output}", flush=True)


if __name__ == "__main__":
    main()
