"""End-to-end: the Snakemake workflow on the tiny config, in a scratch copy of the project."""

from __future__ import annotations

import re
import sys

import pandas as pd
import pytest
import soundfile as sf

from mmasr.io import read_json
from mmasr.report.build import form_weights
from tests.conftest import ReportPage, file_digest, job_counts, project_copy, run, snakemake, tiny_params

pytestmark = pytest.mark.slow

CONTRACT_COLUMNS = ["utt_id", "speaker", "group", "audio_path", "duration_s", "text", "image_id", "split", "source"]
DEFECT_REASONS = {"empty_file": "empty_audio", "corrupt_header": "unreadable_audio", "silent": "silent_audio",
                  "nonfinite": "nonfinite_audio", "too_short": "too_short", "empty_transcript": "empty_transcript",
                  "missing_image": "missing_image", "duplicate_id": "duplicate_id"}


def test_manifest_contract_and_audio(tiny_run):
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet")
    assert list(manifest.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert manifest["utt_id"].is_unique and len(manifest) == 6 * 6 + 1  # + the row whose picture is missing
    assert set(manifest["group"]) == {"impaired", "control"}
    assert (manifest.groupby("speaker")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "dev", "test"}
    for path in manifest["audio_path"]:
        info = sf.info(str(tiny_run / path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert set(manifest["image_id"].dropna()) <= {p.stem for p in (tiny_run / "data/processed/images").iterdir()}


def test_every_demo_defect_is_rejected_with_its_reason(tiny_run):
    defects = pd.read_csv(tiny_run / "data/raw/demo/defects.csv")
    rejects = pd.read_parquet(tiny_run / "data/processed/rejects.parquet")
    assert sorted(defects["defect"]) == sorted(DEFECT_REASONS)
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet")
    for rec in defects.to_dict("records"):
        reason = DEFECT_REASONS[rec["defect"]]
        hits = rejects[rejects["reason"] == reason]
        assert len(hits) >= 1, f"{rec['defect']} not rejected as {reason}"
        if rec["defect"] == "missing_image":  # the utterance stays (ASR-only), the picture is a reject
            assert pd.isna(manifest.set_index("utt_id").loc[rec["utt_id"], "image_id"])
        else:
            assert rec["utt_id"] not in set(manifest["utt_id"]) or rec["defect"] == "duplicate_id"
    metrics = read_json(tiny_run / "results/metrics/preprocess.json")
    assert metrics["n_input"] == metrics["n_kept"] + metrics["n_rejected"] == 6 * 6 + len(defects)  # every manifest row
    assert sum(metrics["rejected_by_reason"].values()) == metrics["n_rejected"]
    for key in ("n_input", "n_kept", "n_rejected", "rejected_by_reason", "audio_hours"):
        assert key in metrics


def test_every_rule_left_a_log_and_a_benchmark(tiny_run):
    for rule in ("make_demo", "ingest", "preprocess", "split", "fuse", "scoring", "encode_audio", "train_projector",
                 "eval_projector", "clap_embeddings", "train_clap", "eval_retrieval", "layer_embeddings", "train_probe",
                 "report", "browser"):
        assert (tiny_run / "results/logs" / f"{rule}.log").is_file()
        assert (tiny_run / "results/benchmarks" / f"{rule}.tsv").is_file()


def test_long_jobs_report_progress_in_their_logs(tiny_run):
    """Jobs under Snakemake have no terminal: each long loop ends its log with a progress line."""
    logs = tiny_run / "results/logs"
    steps = tiny_params(tiny_run)["pretrain"]["whisper"]["steps"]
    whisper = (logs / "pretrain_demo_whisper.log").read_text()
    assert re.search(rf"pretrain whisper: {steps}/{steps} steps \(100%\) \| loss [0-9.e-]+ lr [0-9.e-]+ \| "
                     r"[0-9.e+]+ items/s \| \d+:\d\d:\d\d elapsed, ETA 0:00:00", whisper), whisper[-2000:]
    assert re.search(r"train projector: \d+/\d+ steps \(100%\)", (logs / "train_projector.log").read_text())
    assert re.search(r"n-best shard 1/1: \d+/\d+ batches \(100%\) \| [0-9.e+]+ utts/s",
                     (logs / "nbest/0-of-1.log").read_text())
    assert re.search(r"encode audio: \d+/\d+ utts \(100%\)", (logs / "encode_audio.log").read_text())


def test_the_report_is_the_last_job_and_reports_what_ran(tiny_run):
    page = (tiny_run / "results/report.html").read_text()
    fusion = read_json(tiny_run / "results/metrics/fusion.json")
    projector = read_json(tiny_run / "results/metrics/projector.json")
    assert "<h2>Rescoring with the picture</h2>" in page and "<h2>Projector" in page
    # each WER in its place: the key-results box that names it, and its row and column of the section's table
    report = ReportPage(page)
    for name, value in (("fusion.test_wer_asr", fusion["test_wer_asr"]), ("fusion.test_wer_fused", fusion["test_wer_fused"]),
                        ("fusion.test_wer_oracle", fusion["test_wer_oracle"]), ("projector.test_wer", projector["test_wer"])):
        assert float(report.metrics[name]) == pytest.approx(value, abs=5e-4), name
    assert float(report.cell("rescoring", "ASR only (Whisper 1-best)", "test WER")) == pytest.approx(fusion["test_wer_asr"], abs=5e-4)
    assert float(report.cell("rescoring", "ASR only (Whisper 1-best)", "dev WER")) == pytest.approx(fusion["dev_wer_asr"], abs=5e-4)
    form = fusion["fusion_form"]  # the fused row names the headline form and its dev-chosen weights
    weights = f"α = {fusion['best_alpha']:.2f}" if form == "seed" else form_weights(fusion, form)
    assert float(report.cell("rescoring", f"fused, {form.replace('_', '-')} ({weights})", "test WER")) == \
        pytest.approx(fusion["test_wer_fused"], abs=5e-4)
    assert float(report.cell("projector", "projector + LM", "test WER")) == pytest.approx(projector["test_wer"], abs=5e-4)
    assert "missing <code>results/metrics/" not in page  # every stage ran (benchmarks.json comes from benchmarks/)
    assert "<td>fuse</td>" in page  # run time per rule, from the Snakemake benchmarks
    assert 'src="http' not in page and "data:image/png;base64," in page
    report_mtime = (tiny_run / "results/report.html").stat().st_mtime
    assert all(p.stat().st_mtime <= report_mtime for p in (tiny_run / "results/metrics").glob("*.json"))


def test_second_run_has_nothing_to_do(tiny_run):
    proc = snakemake(tiny_run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


# Metrics that measure time (or are derived from it) differ between identical runs; no other metric may.
TIMING_KEY = re.compile(r"(seconds|secs|_wall_s|_time_s|elapsed|timestamp|speedup|per_second|_per_s|throughput)$"
                        r"|^(time|date|host)")


def without_timing(metrics):
    """A metrics JSON object without its timing fields (at any depth)."""
    if isinstance(metrics, dict):
        return {k: without_timing(v) for k, v in metrics.items() if not TIMING_KEY.search(k)}
    return metrics


def test_another_seed_makes_another_corpus(tiny_run, tmp_path):
    """The same seed gives the same bytes: tests/test_dvc.py compares `dvc repro` from scratch (a second,
    independent run of the same commands and params) with this tiny run, every metrics file and the manifest,
    rejects, n-best lists and fusion grid byte for byte; tests/test_slurm.py does the same for the SLURM run.
    A third full run here only repeated that (about 2 minutes of CI); another seed is checked here."""
    other = project_copy(tmp_path / "other")
    snakemake(other, "--config", "seed=14", "--until", "make_demo")
    assert file_digest(tiny_run / "data/raw/demo/manifest.csv") != file_digest(other / "data/raw/demo/manifest.csv")


def test_only_timing_fields_are_left_out_of_the_comparison(tiny_run):
    pretrain = read_json(tiny_run / "results/metrics/pretrain_whisper.json")
    dropped = set(pretrain) - set(without_timing(pretrain))
    assert "whisper_train_seconds" in dropped and "whisper_final_loss" not in dropped and len(dropped) < len(pretrain) / 3
    for name in ("fusion.json", "preprocess.json", "split.json"):
        metrics = read_json(tiny_run / "results/metrics" / name)
        assert without_timing(metrics) == metrics, name  # nothing there is a timing


def test_misspelt_key_fails_before_any_job(tmp_path):
    work = project_copy(tmp_path / "bad")
    (work / "config" / "bad.yaml").write_text("demo:\n  utts_per_speakr: 3\n")
    proc = run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "config/bad.yaml"], work, check=False)
    assert proc.returncode != 0
    assert "demo.utts_per_speakr" in proc.stdout + proc.stderr
    assert not (work / "data").exists()


def test_lint_is_clean(tmp_path):
    work = project_copy(tmp_path / "lint")
    proc = run([sys.executable, "-m", "snakemake", "--lint"], work)
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


FUSION_KEYS = ("best_alpha", "tau", "dev_wer_asr", "dev_wer_fused", "test_wer_asr", "test_wer_fused", "test_wer_oracle",
               "test_wer_diff_ci_low", "test_wer_diff_ci_high", "test_gap_closed", "n_test_utts", "n_no_image",
               "test_wer_asr_impaired", "test_wer_fused_impaired", "test_wer_asr_control", "test_wer_fused_control",
               "test_wer_alpha1", "test_wer_fused_swapped", "test_wer_fused_swapped_ci_low",
               "test_wer_fused_swapped_ci_high", "test_wer_diff_ci_low_utt", "test_wer_diff_ci_high_utt",
               "test_wer_diff_ci_level", "test_cer_asr", "test_cer_fused", "test_wer_asr_raw", "test_wer_fused_raw",
               "fusion_form", "test_wer_fused_seed_form", "test_wer_fused_log_linear_form", "weights_fused_seed_form",
               "weights_fused_log_linear_form", "test_n_speakers", "test_wer_fused_vs_swapped_ci_low",
               "test_wer_fused_vs_swapped_ci_high", "picture_verdict")


def test_rescoring_outputs_follow_the_contracts(tiny_run):
    import pyarrow.parquet as pq

    metrics = read_json(tiny_run / "results/metrics/fusion.json")
    assert set(FUSION_KEYS) <= set(metrics)
    assert metrics["test_wer_oracle"] <= min(metrics["test_wer_asr"], metrics["test_wer_fused"])
    grid = pd.read_csv(tiny_run / "results/fusion/grid.csv")
    assert list(grid.columns[:6]) == ["alpha", "split", "wer", "S", "D", "I"] and len(grid) == 2 * 21
    nbest = pd.read_parquet(tiny_run / "data/nbest/nbest.parquet")
    for col in ("utt_id", "rank", "text", "n_tokens", "sum_logprob", "asr_score", "clip_cos"):
        assert col in nbest.columns
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet").set_index("utt_id")
    assert set(manifest.loc[nbest["utt_id"].unique(), "split"]) == {"dev", "test"}
    meta = pq.read_schema(tiny_run / "data/nbest/nbest.parquet").metadata
    assert b"mmasr.model" in meta and b"mmasr.decoding" in meta
    emb_meta = read_json(tiny_run / "data/cache/clip_image_embeddings.npz.json")
    assert emb_meta["count"] == manifest["image_id"].nunique() and emb_meta["dimension"] > 0
    # the picture-swap control ran: the hypothesis-text cache covers every text scored against a picture
    from mmasr.rescoring.clip import load_text_embeddings

    texts = load_text_embeddings(tiny_run / "data/cache/clip_text_embeddings.npz")
    assert set(nbest.loc[nbest["clip_cos"].notna(), "clip_text"]) == set(texts)
    assert metrics["test_wer_diff_ci_level"] in ("speaker", "utterance")
    assert metrics["test_wer_fused_swapped"] is not None and metrics["test_swap_permutations"] == 5
    assert metrics["test_wer_fused_swapped_ci_low"] <= metrics["test_wer_fused_swapped_ci_high"]
    assert metrics["test_wer_fused_vs_swapped_ci_low"] <= metrics["test_wer_fused_vs_swapped_ci_high"]


def test_projector_outputs_follow_the_contracts(tiny_run):
    metrics = read_json(tiny_run / "results/metrics/projector.json")
    for key in ("test_wer", "best_dev_loss", "n_trainable_params", "steps", "test_substitutions", "test_deletions",
                "test_insertions", "whisper_test_wer_asr", "model_lm", "model_encoder", "params_hash"):
        assert key in metrics, key
    assert metrics["steps"] == 10 and metrics["test_wer"] >= 0
    assert metrics["n_trainable_params"] == (128 * 5 * 32 + 32) + (32 * 128 + 128)  # demo Whisper 128-d, k=5, hidden 32
    log = pd.read_csv(tiny_run / "results/projector/train_log.csv")
    assert list(log.columns) == ["step", "lr", "train_loss", "dev_loss", "tokens"] and log["step"].tolist() == list(range(1, 11))
    assert metrics["best_dev_loss"] == pytest.approx(log["dev_loss"].min())
    hyps = pd.read_parquet(tiny_run / "results/projector/hyps.parquet")
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet")
    assert list(hyps.columns) == ["utt_id", "speaker", "group", "ref", "hyp"]
    assert sorted(hyps["utt_id"]) == sorted(manifest.loc[manifest["split"] == "test", "utt_id"])
    for part in ("best/model.safetensors", "best/state.pt", "last/model.safetensors", "config.json"):
        assert (tiny_run / "results/checkpoints/projector/model" / part).is_file(), part
    index = pd.read_parquet(tiny_run / "data/cache/encoder_features/index.parquet")
    assert sorted(index["utt_id"]) == sorted(manifest["utt_id"]) and (index["dim"] == 128).all()


def test_the_demo_whisper_runs_once_per_utterance_for_the_projector_probe_and_clap(tiny_run):
    """The demo names one Whisper as models.whisper and models.audio_encoder: encode_audio's pass serves all three
    (issue 29), by the stages' own counts."""
    from mmasr.clap.cache import load_cache
    from mmasr.io import read_metadata

    n = len(pd.read_parquet(tiny_run / "data/processed/manifest.parquet"))
    index = read_metadata(tiny_run / "data/cache/encoder_features/index.parquet")
    assert (index["mmasr.encoder_pass"], index["mmasr.encoder_passes"], index["mmasr.encoder_passes_per_utt"]) == (
        "shared", str(n), "1.0")
    assert (tiny_run / "data/cache/encoder_pooled.safetensors").is_file()
    assert read_json(tiny_run / "data/cache/layer_embeddings.npz.json")["encoder_passes"] == 0
    assert load_cache(tiny_run / "data/cache/clap_embeddings").meta["audio_encoder_passes"] == 0


def test_changing_tau_or_the_alpha_grid_reruns_only_fusion(tiny_run):
    (tiny_run / "config" / "tau.yaml").write_text("fusion:\n  tau: 50.0\n  alpha_step: 0.1\n")
    proc = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", "config/tiny.yaml",
                "config/tau.yaml"], tiny_run)
    out = proc.stdout + proc.stderr
    assert job_counts(out) == {"fuse": 1, "scoring": 1, "browser": 1, "systems_table": 1, "report": 1, "all": 1}, \
        out[-2000:]


RETRIEVAL_KEYS = [f"{prefix}{d}_{m}" for prefix in ("", "zeroshot_") for d in ("a2t", "t2a")
                  for m in ("r1", "r5", "r10", "map10", "mean_rank", "median_rank")] + ["chance_r1", "n_candidates"]
PROBE_KEYS = ("accuracy", "auc", "brier", "ece_uncalibrated", "ece_calibrated", "calibration_method")


def test_clap_and_probe_outputs_follow_the_contracts(tiny_run):
    from mmasr.probe.train import ProbeModel

    metrics = read_json(tiny_run / "results/metrics/retrieval.json")
    assert set(RETRIEVAL_KEYS) <= set(metrics)
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    from mmasr.config import validate
    from mmasr.data.text import normaliser

    assert metrics["n_candidates"] == test["text"].map(normaliser(validate({})["text"])).nunique()
    assert metrics["n_candidate_audios"] == len(test)
    assert metrics["chance_r1"] == pytest.approx(1 / metrics["n_candidates"])
    curve = pd.read_csv(tiny_run / "results/clap/recall_at_k.csv")
    assert list(curve.columns) == ["direction", "model", "k", "recall"]
    assert set(curve["direction"]) == {"a2t", "t2a"} and set(curve["model"]) == {"zeroshot", "trained"}
    assert curve["k"].max() == 5 and curve["recall"].between(0, 1).all()
    trained_a2t = curve[(curve["direction"] == "a2t") & (curve["model"] == "trained")].set_index("k")["recall"]
    assert trained_a2t[1] == pytest.approx(metrics["a2t_r1"], abs=1e-6)
    assert trained_a2t[5] == pytest.approx(metrics["a2t_r5"], abs=1e-6)
    log = pd.read_csv(tiny_run / "results/clap/train_log.csv")
    assert list(log.columns[:5]) == ["step", "lr", "train_loss", "logit_scale", "dev_loss"] and len(log) > 0
    for name in ("model.safetensors", "init.safetensors", "config.json"):
        assert (tiny_run / "results/checkpoints/clap" / name).is_file()
    assert any((tiny_run / "results/checkpoints/clap/state/phase1").glob("step-*"))

    probe = read_json(tiny_run / "results/metrics/probe.json")
    assert set(PROBE_KEYS) <= set(probe) and 0 <= probe["auc"] <= 1
    reliability = pd.read_csv(tiny_run / "results/probe/reliability.csv")
    assert list(reliability.columns) == ["calibration", "bin", "mean_predicted", "fraction_positive", "count"]
    assert set(reliability["calibration"]) <= {"uncalibrated", "calibrated"}
    for _, part in reliability.groupby("calibration"):
        assert part["count"].sum() == probe["n_eval_utts"]
    model = ProbeModel(read_json(tiny_run / "results/checkpoints/probe/probe.json"))
    assert model.spec["calibration_method"] == probe["calibration_method"]


def test_changing_evaluation_params_reruns_only_evaluation(tiny_run):
    (tiny_run / "config" / "eval.yaml").write_text("clap:\n  plot_max_k: 3\nprobe:\n  n_bins: 5\n")
    proc = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", "config/tiny.yaml",
                "config/eval.yaml"], tiny_run)
    out = proc.stdout + proc.stderr
    assert job_counts(out) == {"eval_retrieval": 1, "train_probe": 1, "report": 1, "all": 1}, out[-2000:]


def test_small_config_shows_the_effect_the_picture_fixes_impaired_speech(tmp_path):
    """The rescoring chain on models that learn: a regression anywhere (image ids, normalisation,
    softmax, alpha selection, splits) that removes the benefit of the picture fails here. And the
    structural checks any realistic picture-description task passes: the picture helps without
    dictating (alone, alpha = 1, it is clearly worse than speech and than the fusion), and it cannot
    recover what the speaker got wrong or the picture cannot show (fused above the oracle). Only the
    jobs fusion.json needs run (the projector, CLAP, probe and report have their tiny-run tests)."""
    work = project_copy(tmp_path / "small")
    run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/small.yaml", "--",
         "results/metrics/fusion.json"], work)
    m = read_json(work / "results/metrics/fusion.json")
    summary = {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}
    assert m["test_wer_asr_impaired"] > 0, summary  # impaired speech is confused without the picture
    assert m["test_wer_fused_impaired"] < m["test_wer_asr_impaired"], summary
    assert m["test_wer_oracle"] < m["test_wer_asr"], summary
    assert m["best_alpha"] > 0, summary
    assert m["test_wer_alpha1"] > m["test_wer_asr"] + 0.05, summary
    assert m["test_wer_alpha1"] > m["test_wer_fused"] + 0.05, summary
    assert m["test_wer_fused_impaired"] > m["test_wer_oracle_impaired"], summary
    split = read_json(work / "results/metrics/split.json")
    assert split["disjoint_text"] and split["test_n_text_in_train"] == split["test_n_image_in_train"] == 0
    manifest = pd.read_parquet(work / "data/processed/manifest.parquet")
    trained_on = pd.read_csv(work / "results/pretrain/whisper_loss.csv")  # the run finished and logged
    assert len(trained_on) == 1600
    assert (manifest.groupby("speaker")["split"].nunique() == 1).all()


def test_the_real_model_config_resolves_without_demo_models(tmp_path):
    """config/real.yaml names hub models at the seeds' sizes: its DAG builds and trains no demo model, the
    merged params validate, and the sizes are the seeds' (Whisper small, CLIP ViT-B/32, SmolLM3, HuBERT, BERT)."""
    from mmasr.config import load

    work = project_copy(tmp_path / "work")
    proc = run([sys.executable, "-m", "snakemake", "-n", "--cores", "8", "--configfile", "config/real.yaml"], work)
    out = proc.stdout + proc.stderr
    jobs = job_counts(out)
    assert jobs["nbest"] == 1 and jobs["train_projector"] == 1 and jobs["train_clap"] == 1, out[-2000:]
    assert not {j for j in jobs if j.startswith(("build_demo_models", "pretrain_demo", "convert_whisper"))}, jobs
    p = load([work / "params.yaml", work / "config/real.yaml"])
    want = {"whisper": "openai/whisper-small", "clip": "openai/clip-vit-base-patch32", "lm": "HuggingFaceTB/SmolLM3-3B",
            "audio_encoder": "facebook/hubert-base-ls960", "text_encoder": "bert-base-uncased", "trust_remote_code": False}
    assert {k: p["models"][k] for k in want} == want
    assert (p["nbest"]["num_beams"], p["nbest"]["keep"], p["nbest"]["language"]) == (10, 5, "en")  # beams >= 2 keep
    assert (p["projector"]["k"], p["projector"]["hidden"]) == (5, 2048)
    assert (p["clap"]["hidden_dim"], p["clap"]["embed_dim"], p["clap"]["layers"]) == (256, 256, "last")
    assert p["clap"]["phase2_epochs"] > 0 and p["clap"]["phase2_encoder_lr"] < p["clap"]["lr"]


def test_the_adapted_whisper_runs_beside_the_zero_shot_one(tiny_run, tiny_adapt_run):
    """adapt.enabled on a finished tiny run: only the adapted stages, the systems table and the report run; the
    adapted fusion has the zero-shot keys plus its ASR-only against the zero-shot one; table and report show both."""
    work, output = tiny_adapt_run
    ran = job_counts(output)
    assert {"adapt_whisper", "nbest_adapted", "fuse_adapted", "systems_table", "report"} <= set(ran)
    assert not {"nbest", "fuse", "pretrain_demo_whisper", "train_projector"} & set(ran), ran
    zero, adapted = (read_json(work / "results/metrics" / n) for n in ("fusion.json", "fusion_adapted.json"))
    assert set(zero) <= set(adapted)
    assert adapted["test_wer_asr_reference"] == zero["test_wer_asr"]
    assert adapted["test_wer_asr_vs_reference"] == pytest.approx(adapted["test_wer_asr"] - zero["test_wer_asr"])
    assert adapted["test_wer_asr_vs_reference_ci_low"] <= adapted["test_wer_asr_vs_reference_ci_high"]
    summary = read_json(work / "results/metrics/adapt.json")
    assert summary["steps"] == 6 and 0 < summary["n_adapter_params"] < summary["n_base_params"]
    log = pd.read_csv(work / "results/adapt/train_log.csv")
    assert len(log) == 6 and log["dev_loss"].notna().sum() == 2
    md = (work / "results/tables/systems.md").read_text()
    tex = (work / "results/tables/systems.tex").read_text()
    assert f"params_hash {zero['params_hash']}+{adapted['params_hash']}" in md.splitlines()[0]
    # ASR-only, then ASR+LM, ASR+CLIP, ASR+CLIP+LM in both fusion forms, for each model
    assert md.count("| zero-shot |") == 7 and md.count("| adapted |") == 7
    assert f"| adapted | ASR-only | — | {100 * adapted['test_wer_asr']:.1f} [" in md  # ASR-only has no form
    assert r"\toprule" in tex and "adapted & ASR-only" in tex
    report = (work / "results/report.html").read_text()
    systems = re.search(r'<section id="systems">(.*?)</section>', report, re.S).group(1)
    assert "<td>adapted</td><td>ASR-only</td>" in systems and "<h3>Adaptation loss</h3>" in systems
    # the tiny run without it: the report says adaptation is off, the table has the zero-shot rows only
    assert "Adaptation is off" in (tiny_run / "results/report.html").read_text()
    assert "| adapted |" not in (tiny_run / "results/tables/systems.md").read_text()
    assert not (tiny_run / "results/metrics/fusion_adapted.json").exists()
