"""The ``mmasr`` command line: one sub-command per pipeline stage, called by Snakemake rules and DVC stages.

Every stage takes its parameters either from a params file (``--params params.yaml``, as DVC runs it)
or as a JSON object of params sections (``--cfg '{...}'``, as Snakemake passes the sections a rule
declares), validated against the same schema with the same defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from . import __version__
from . import config as params_mod
from .io import write_json, write_parquet

log = logging.getLogger("mmasr")


def _params(args) -> dict:
    return params_mod.load(args.params, args.cfg)


def cmd_make_demo(args) -> None:
    from .demo import generate_demo_corpus

    p = _params(args)
    manifest = generate_demo_corpus(args.out, p["demo"], p["seed"], progress=not args.quiet)
    log.info("demo corpus written: %s", manifest)


def cmd_ingest(args) -> None:
    from .ingest import ingest

    p = _params(args)
    ingested, rejects = ingest(p["data"], demo_dir=args.demo_dir)
    write_parquet(args.out, ingested)
    write_parquet(args.rejects, rejects)
    log.info("ingested %d utterances (%d rejected) from source=%s", len(ingested), len(rejects), p["data"]["source"])


def cmd_preprocess(args) -> None:
    from .preprocess import preprocess

    p = _params(args)
    ingested = pd.read_parquet(args.ingested)
    ingest_rejects = pd.read_parquet(args.ingest_rejects)
    utts, images, rejects, metrics = preprocess(
        ingested, ingest_rejects, args.audio_dir, args.image_dir, p["preprocess"],
        require_image=p["data"]["require_image"], workers=args.threads, progress=not args.quiet)
    write_parquet(args.out, utts)
    write_parquet(args.images, images)
    write_parquet(args.rejects, rejects)
    write_json(args.metrics, metrics)
    log.info("kept %d of %d utterances (%.3f h); rejected: %s", metrics["n_kept"], metrics["n_input"],
             metrics["audio_hours"], metrics["rejected_by_reason"] or "none")


def cmd_split(args) -> None:
    from .split import assign_splits, split_summary

    p = _params(args)
    manifest = assign_splits(pd.read_parquet(args.utterances), p["split"], p["seed"])
    write_parquet(args.out, manifest)
    summary = split_summary(manifest)
    write_json(args.summary, summary)
    for name in ("train", "dev", "test"):
        log.info("%-5s %3d utterances, speakers: %s", name, summary[f"{name}_n_utts"], " ".join(summary[f"{name}_speakers"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmasr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mmasr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, func, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--params", type=Path, default=None, help="params.yaml to read (validated, defaults filled in)")
        sp.add_argument("--cfg", default=None, help="JSON object of params sections, merged over --params")
        sp.add_argument("--threads", type=int, default=int(os.environ.get("MMASR_THREADS", "1")), help="worker processes")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.set_defaults(func=func)
        return sp

    sp = stage("make-demo", cmd_make_demo, "Generate the embedded synthetic picture-description corpus.")
    sp.add_argument("--out", type=Path, default=Path("data/raw/demo"))

    sp = stage("ingest", cmd_ingest, "Read the corpus named by data.source into one table, with rejects.")
    sp.add_argument("--demo-dir", type=Path, default=Path("data/raw/demo"))
    sp.add_argument("--out", type=Path, default=Path("data/processed/ingested.parquet"))
    sp.add_argument("--rejects", type=Path, default=Path("data/processed/ingest_rejects.parquet"))

    sp = stage("preprocess", cmd_preprocess, "Decode, mono, resample, normalise and trim audio; clean pictures.")
    sp.add_argument("--ingested", type=Path, default=Path("data/processed/ingested.parquet"))
    sp.add_argument("--ingest-rejects", type=Path, default=Path("data/processed/ingest_rejects.parquet"))
    sp.add_argument("--audio-dir", type=Path, default=Path("data/processed/audio"))
    sp.add_argument("--image-dir", type=Path, default=Path("data/processed/images"))
    sp.add_argument("--out", type=Path, default=Path("data/processed/utterances.parquet"))
    sp.add_argument("--images", type=Path, default=Path("data/processed/images.parquet"))
    sp.add_argument("--rejects", type=Path, default=Path("data/processed/rejects.parquet"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/preprocess.json"))

    sp = stage("split", cmd_split, "Assign speaker-disjoint train/dev/test splits; write the manifest.")
    sp.add_argument("--utterances", type=Path, default=Path("data/processed/utterances.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--summary", type=Path, default=Path("results/metrics/split.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (params_mod.ParamsError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
