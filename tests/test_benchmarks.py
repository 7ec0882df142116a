"""benchmarks/run.py: stage tables from Snakemake benchmark files, throughput, the fusion.tau edit, the
printed table and the report's rendering of its JSON; on the tiny run (slow), --skip-pipeline end to end
and the incremental re-run after changing only fusion.tau."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import shutil
import sys

import pandas as pd
import pytest

from mmasr import config

from mmasr.report import build as report
from mmasr.io import read_json
from tests.conftest import REPO, run

TSV = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t{cpu}\n"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mmasr_benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tsvs(bench_dir, jobs):
    for rel, s, rss in jobs:
        path = bench_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TSV.format(s=s, rss=rss, cpu=s * 2))


def test_stage_table_sums_shards_and_keeps_the_peak(bench, tmp_path):
    write_tsvs(tmp_path, [("preprocess.tsv", 4.0, 1600.5), ("fuse.tsv", 0.5, 120.0), ("nbest/0-of-2.tsv", 7.0, 900.0),
                          ("nbest/1-of-2.tsv", 5.0, 950.0)])
    stages = bench.stage_table(tmp_path)
    assert stages["nbest"] == {"jobs": 2, "wall_s": 12.0, "cpu_s": 24.0, "max_rss_mb": 950.0}
    assert stages["preprocess"] == {"jobs": 1, "wall_s": 4.0, "cpu_s": 8.0, "max_rss_mb": 1600.5}
    assert set(stages) == {"nbest", "preprocess", "fuse"} and bench.stage_table(tmp_path / "absent") == {}
    rows = bench.stage_rows(stages)
    assert [r[0] for r in rows] == ["nbest", "preprocess", "fuse"] and rows[0][1:] == [2, "12.0", "24.0", "950"]


def test_rules_that_rewrote_their_benchmark_file(bench, tmp_path):
    write_tsvs(tmp_path, [("fuse.tsv", 0.5, 1), ("split.tsv", 1, 1), ("nbest/0-of-2.tsv", 1, 1)])
    before = bench.tsv_state(tmp_path)
    os.utime(tmp_path / "fuse.tsv", ns=(1, before["fuse.tsv"] + 10**9))
    write_tsvs(tmp_path, [("report.tsv", 1, 1)])
    assert bench.rerun_rules(before, bench.tsv_state(tmp_path)) == ["fuse", "report"]
    os.utime(tmp_path / "nbest/0-of-2.tsv", ns=(1, 1))
    assert "nbest" in bench.rerun_rules(before, bench.tsv_state(tmp_path))


def test_set_param_edits_one_line_as_a_user_would(bench, tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    original = params.read_text()
    old = bench.set_param(params, "fusion", "tau", 50.0)
    assert old == config.load(REPO / "params.yaml")["fusion"]["tau"]
    changed = [(a, b) for a, b in zip(original.splitlines(), params.read_text().splitlines()) if a != b]
    assert len(changed) == 1 and "50.0" in changed[0][1] and "# CLIP logit scale" in changed[0][1]
    assert config.load(params)["fusion"]["tau"] == 50.0
    params.write_text("seed: 1\nfusion:\n  alpha_step: 0.1   # coarse\nsplit:\n  dev_fraction: 0.2\n")
    assert bench.set_param(params, "fusion", "tau", 20.0) == 100.0  # the schema default
    assert config.load(params)["fusion"] == {**config.load(params)["fusion"], "tau": 20.0, "alpha_step": 0.1}
    params.write_text("seed: 1\n")
    bench.set_param(params, "fusion", "tau", 30.0)
    assert config.load(params)["fusion"]["tau"] == 30.0


def test_threads_span_and_throughput_from_snakemake_metadata(bench, tmp_path):
    records = [{"rule": "preprocess", "shellcmd": "mmasr preprocess --cfg '{}' --threads 2 --ingested x",
                "starttime": 100.0, "endtime": 110.0},
               {"rule": "nbest", "shellcmd": "MMASR_THREADS=2 mmasr nbest --shard 0", "starttime": 110.5, "endtime": 160.0},
               {"rule": "split", "shellcmd": None, "starttime": None, "endtime": None}]
    assert bench.rule_threads(records, "preprocess") == 2 and bench.rule_threads(records, "nbest") == 2
    assert bench.rule_threads(records, "split") is None and bench.metadata_span_s(records) == 60.0
    assert bench.metadata_span_s([]) is None
    assert bench.throughput(120.0, 10.0, 4) == 3.0 and bench.throughput(10.0, 5.0, 0) == 2.0
    (tmp_path / ".snakemake/metadata").mkdir(parents=True)
    for i, r in enumerate(records):
        (tmp_path / ".snakemake/metadata" / f"r{i}").write_text(json.dumps(r))
    (tmp_path / ".snakemake/metadata/broken").write_text("{")
    assert bench.snakemake_records(tmp_path) == records


def sample_result(bench) -> dict:
    return {"nbest_batched_speedup": 6.4, "grid_vectorised_speedup": 125.4, "projector_cache_speedup": 3.6,
         "clap_cache_speedup": 38.0, "pipeline_wall_s": 612.0, "nbest_batching_speedup": 1.62,
         "nbest_ct2_fp32_speedup": 1.05, "nbest_ct2_int8_speedup": None, "nbest_ct2_top1_agreement": 0.979, "incremental_tau_wall_s": 7.9,
         "incremental_tau_fraction": 7.9 / 612, "incremental_tau_jobs": ["fuse", "report"],
         "preprocess_audio_s_per_wall_s_per_core": None, "peak_rss_mb": 1663.5, "peak_rss_rule": "preprocess",
         "device": "cpu (2 torch threads)", "devices": {"pipeline_wall_s": "cpu (snakemake --cores 2)",
                                                        "nbest_batched_speedup": "cpu (2 threads)"},
         "stages": {"fuse": {"jobs": 1, "wall_s": 0.7, "cpu_s": 1.2, "max_rss_mb": 119.2},
                    "preprocess": {"jobs": 1, "wall_s": 5.3, "cpu_s": 8.3, "max_rss_mb": 1663.5}},
         "details": {"rescoring": {"nbest_loop_s": 1.56, "grid_identical_wer": True}},
         "targets": {k: v[2] for k, v in bench.TARGETS.items()}}


def test_summary_table(bench):
    text = bench.format_table(["measure", "value", "target", "device"], bench.summary_rows(sample_result(bench)))
    lines = text.splitlines()
    assert lines[0].split() == ["measure", "value", "target", "device"] and set(lines[1]) == {"-", " "}
    rows = {line[:42].strip(): line for line in lines[2:]}
    assert "6.4x" in rows["n-best: batched vs seed loop"] and "(met)" in rows["n-best: batched vs seed loop"]
    assert "cpu (2 threads)" in rows["n-best: batched vs seed loop"]
    demo = next(line for line in lines if line.startswith("projector: feature cache vs live encoder (demo config)"))
    assert "3.6x" in demo and "MISSED" not in demo and "met" not in demo
    assert "612 s (0:10:12)" in rows["full pipeline from scratch"]
    assert "1.3% (7.9 s: fuse, report)" in rows["re-run after changing fusion.tau"]
    assert "< 10% (met)" in rows["re-run after changing fusion.tau"]
    assert "not measured" in rows["preprocessing (audio s / wall s / core)"]
    assert "1664 MB (preprocess)" in rows["peak memory (max RSS)"]
    assert bench.target_met("incremental_tau_fraction", 0.2) is False and bench.target_met("other", 1.0) is None
    assert "1.62x" in rows["n-best, real tiny.en: batched vs batch 1"] and ">= 1.5x (met)" in rows["n-best, real tiny.en: batched vs batch 1"]
    assert "1.05x" in rows["n-best, real tiny.en: ctranslate2 float32"] and ">= 1.3x (MISSED)" in rows["n-best, real tiny.en: ctranslate2 float32"]
    assert "not measured" in rows["n-best, real tiny.en: ctranslate2 int8"]
    assert "98%" in rows["n-best, real tiny.en: ct2 top-1 agreement"] and ">= 95% (met)" in rows["n-best, real tiny.en: ct2 top-1 agreement"]


def test_real_nbest_is_skipped_or_reported_not_measured(bench, monkeypatch, tmp_path, capsys):
    args = bench.parse_args(["--nbest-real-utts", "0"])
    keys = {"nbest_batching_speedup", "nbest_ct2_fp32_speedup", "nbest_ct2_int8_speedup", "nbest_ct2_top1_agreement"}
    details, devices = {}, {}
    assert bench.real_nbest(args, tmp_path, details, devices) == dict.fromkeys(keys) and not details and not devices

    def missing(*_a, **_k):
        raise ImportError("No module named 'ctranslate2'")

    monkeypatch.setattr(bench.nbest_real, "measure", missing)
    args = bench.parse_args([])
    assert bench.real_nbest(args, tmp_path, details, devices) == dict.fromkeys(keys)
    assert "not measured: No module named 'ctranslate2'" in capsys.readouterr().err

    def fake(utts, batch_size, threads, rounds, work):
        assert (utts, batch_size, threads, rounds) == (48, 16, args.threads, 2) and work == tmp_path / "data/cache/nbest_real"
        return {**sample_real(), "device": "cpu"}

    monkeypatch.setattr(bench.nbest_real, "measure", fake)
    got = bench.real_nbest(args, tmp_path, details, devices)
    assert got == {k: sample_real()[k] for k in keys} and details["nbest_real"]["nbest_real_utts"] == 48
    assert devices["nbest_ct2_int8_speedup"] == f"cpu ({args.threads} threads)"


def sample_real() -> dict:
    configs = {name: {"wall_s": w, "cpu_s": w, "utts_per_s": 48 / w, "audio_s_per_s": 55 / w, "wer": 0.3,
                      "top1_agreement": a}
               for name, w, a in (("seed_loop", 180.0, 0.9), ("transformers_b1", 30.0, 1.0),
                                  ("transformers_batched", 20.0, 1.0), ("ctranslate2_float32", 19.0, 0.979),
                                  ("ctranslate2_int8", 15.0, 0.875))}
    return {"nbest_real_utts": 48, "nbest_real_audio_s": 55.0, "nbest_real_batch_size": 16, "nbest_real_rounds": 2,
            "threads": 2, "device": "cpu", "nbest_real_configs": configs,
            "nbest_real_fastest_transformers": "transformers_batched", "nbest_batching_speedup": 1.5,
            "nbest_ct2_fp32_speedup": 20 / 19, "nbest_ct2_int8_speedup": 20 / 15, "nbest_ct2_top1_agreement": 0.979,
            "nbest_real_profile": {"utts": 16, "features_s": 0.1, "transformers_encoder_s": 4.0,
                                   "transformers_beam_search_s": 2.0, "ct2_float32_encoder_s": 4.1,
                                   "ct2_float32_beam_search_s": 1.0, "ct2_float32_rescoring_s": 0.8,
                                   "ct2_int8_encoder_s": 3.5, "ct2_int8_beam_search_s": 0.6, "ct2_int8_rescoring_s": 0.8}}


def test_real_nbest_report_lists_every_configuration_and_target(bench):
    text = bench.nbest_real.report(sample_real())
    lines = {line.split()[0]: line for line in text.splitlines() if line}
    assert lines["transformers_b1"].split()[1:4] == ["30.00", "30.00", "1.60"]
    assert lines["ctranslate2_int8"].split()[-1] == "88%" and lines["seed_loop"].split()[-2] == "0.300"
    assert "batching alone (transformers batch 1 / batched)" in text and "1.50x  target >= 1.5x: met" in text
    assert "1.33x  target >= 2x: NOT met" in text and "98%  target >= 95%: met" in text
    assert "ctranslate2 int8 encoder 3.50, beam search 0.60, re-scoring 0.80" in text


def test_report_shows_targets_devices_stages_and_details(bench):
    html = report.benchmark_tables(sample_result(bench))
    assert "<th>target</th><th>device</th>" in html
    assert "<td>nbest_batched_speedup</td><td class=\"num\">6.400</td><td>&gt;= 3x</td><td>cpu (2 threads)</td>" in html
    assert "<td>incremental_tau_jobs</td><td>fuse, report</td>" in html  # a list, joined
    stages = html[html.index("Per stage"):]
    assert stages.index("<td>preprocess</td>") < stages.index("<td>fuse</td>")  # slowest first
    assert "<th>rule</th><th>jobs</th><th>wall_s</th><th>cpu_s</th><th>max_rss_mb</th>" in stages and "1663.500" in stages
    assert "<summary>details: rescoring</summary>" in html and "<td>nbest_loop_s</td>" in html
    plain = report.benchmark_tables({"nbest_batched_speedup": 6.4, "device": "cpu"})
    assert "<th>device</th>" not in plain and "Per stage" not in plain and "<td>cpu</td>" in plain


@pytest.mark.slow
def test_skip_pipeline_on_the_tiny_run(bench, tiny_run, tmp_path):
    out = tmp_path / "results" / "benchmarks.json"
    proc = run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--skip-pipeline", "--project", str(tiny_run),
                "--configfile", str(tiny_run / "config" / "tiny.yaml"), "--cores", "2", "--out", str(out),
                "--nbest-utts", "4", "--projector-steps", "2", "--clap-repeats", "1", "--skip-real-shape",
                "--skip-scaling", "--nbest-real-utts", "0"], tmp_path)  # each has its own tests; minutes each at full size
    b = read_json(out)
    assert set(bench.CONTRACT_KEYS) <= set(b), proc.stdout
    for key in ("nbest_batched_speedup", "grid_vectorised_speedup", "projector_cache_speedup", "clap_cache_speedup",
                "pipeline_wall_s", "peak_rss_mb", "preprocess_audio_s_per_wall_s_per_core"):
        assert b[key] > 0 and b["devices"][key], key
    assert b["incremental_tau_fraction"] is None and b["pipeline_wall_source"].startswith("Snakemake metadata")
    assert b["projector_cache_speedup_real_shape"] is None and b["scaling_per_utt_ratio_20k"] is None  # skipped
    assert b["ratio_results_identical"] is True and b["preprocess_threads"] == 2
    assert {"preprocess", "nbest", "fuse", "train_projector", "report"} <= set(b["stages"])
    assert b["peak_rss_mb"] == max(s["max_rss_mb"] for s in b["stages"].values())
    assert set(b["details"]) == {"rescoring", "projector_cache", "clap_cache", "encoder_passes"} and b["details"]["rescoring"]["nbest_utts"] == 4
    assert b["nbest_batching_speedup"] is None and re.search(r"n-best, real tiny.en: batched vs batch 1 +not measured", proc.stdout)
    assert "n-best: batched vs seed loop" in proc.stdout and "stage (rule)" in proc.stdout
    assert not (tiny_run / "results" / "benchmarks.json").exists()  # the run read is left as it was


@pytest.mark.slow
def test_changing_only_tau_reruns_fusion_and_what_reads_it(bench, tiny_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    result = bench.incremental_tau(work, 2, "config/tiny.yaml", tmp_path / "tau.log")
    assert result["incremental_tau_jobs"] == ["browser", "fuse", "report", "scoring", "systems_table"], (tmp_path / "tau.log").read_text()[-3000:]
    assert result["incremental_tau_wall_s"] > 0 and result["incremental_tau_change"] == "fusion.tau 100.0 -> 50.0"
    assert read_json(work / "results/metrics/fusion.json")["tau"] == 50.0


# --------------------------------------------------------------------------- issue 18 items 4 and 6


@pytest.fixture(scope="module")
def scaling_bench():
    spec = importlib.util.spec_from_file_location("mmasr_benchmarks_scaling", REPO / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scaling_benchmark_reads_the_workers_line_preprocess_writes(scaling_bench):
    # the line's format is asserted where preprocess writes it (test_preprocess.py)
    log = "ingest ...\n2026 INFO mmasr.data.preprocess: preprocess: 2 worker processes, peak RSS up to 77.2 MB each\nkept 40"
    assert scaling_bench.workers_reported(log) == {"n_workers_seen": 2, "peak_rss_worker_max_mb": 77.2}
    assert scaling_bench.workers_reported("kept 40 of 40 utterances") == {}


def test_scaling_ratios_from_per_size_results(scaling_bench):
    def size(total, **stages):
        return {"total_s": total, "stages": {st: {"ms_per_utt": stages.get(st, 1.0)} for st in scaling_bench.STAGES}}
    sizes = {1000: {**size(10.0), "ms_per_utt": 10.0}, 5000: {**size(30.0), "ms_per_utt": 6.0},
             20000: {**size(150.0, fuse=3.0), "ms_per_utt": 7.5}}
    assert scaling_bench.per_utt_ratio(sizes) == 0.75
    assert scaling_bench.marginal_ratio(sizes) == pytest.approx((120 / 15000) / (20 / 4000))  # 1.6: super-linear
    assert scaling_bench.marginal_ratio({1: sizes[1000], 2: sizes[5000]}) is None
    assert scaling_bench.stage_ratios(sizes)["fuse"] == 3.0 and scaling_bench.stage_ratios(sizes)["ingest"] == 1.0


def test_synthetic_nbest_has_the_pipeline_contract(scaling_bench):
    from mmasr.rescoring.nbest import NBEST_COLUMNS

    man = pd.DataFrame({"utt_id": ["a", "b", "c"], "split": ["train", "dev", "test"], "text": ["x y z"] * 3,
                        "image_id": ["p1", "p2", None]})
    nb, (ids, img), (texts, txt) = scaling_bench.synthetic_nbest(man, config.load(REPO / "params.yaml")["text"], n_hyps=3)
    assert list(nb.columns) == NBEST_COLUMNS + ["clip_text", "clip_cos"] and set(nb["utt_id"]) == {"b", "c"}
    assert nb.groupby("utt_id")["rank"].apply(list).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert nb.loc[nb["utt_id"] == "c", "clip_cos"].isna().all()  # no picture, no cosine
    b = nb[nb["utt_id"] == "b"].iloc[0]
    assert b["text"] == "x y z" and b["clip_cos"] == pytest.approx(float(txt[texts.index(b["clip_text"])] @ img[ids.index("p2")]))


def test_scaling_smoke_at_tiny_sizes(bench, scaling_bench):
    """run.py's scaling part at 40 and 80 utterances (~30 s on 2 cores): every stage runs on a generated manifest,
    the keys are there, the report's size stays bounded (it samples examples, never a row per utterance)."""
    import argparse

    args = argparse.Namespace(skip_real_shape=True, skip_scaling=False, scaling_sizes=[40, 80], scaling_workers=2,
                              scaling_warmup=0, cores=2, threads=2)
    flat, details, devices = bench.measure_extras(args, config.load(REPO / "params.yaml"))
    result = details["scaling"]
    per_size = flat["scaling_per_size"]
    assert set(per_size) == {"40", "80"} and all(not isinstance(v, dict) for row in per_size.values() for v in row.values())
    assert per_size["80"]["fuse_ms_per_utt"] > 0 and per_size["40"]["report_bytes"] > 10_000
    html = report.benchmark_tables({"scaling_per_size": per_size})
    assert "<summary>scaling_per_size: 80</summary>" in html and "<td>fuse_ms_per_utt</td>" in html
    assert flat["projector_cache_speedup_real_shape"] is None and flat["scaling_per_utt_ratio_20k"] > 0
    assert devices["scaling_per_utt_ratio_20k"] == "cpu (2 preprocess workers)"
    assert result["scaling_sizes"] == [40, 80] == flat["scaling_sizes"] and "scaling" not in result
    for n in ("40", "80"):
        assert per_size[n]["n_kept"] == int(n) and per_size[n]["n_nbest_rows"] > 0
        # the pool's own account: which of the 2 workers got a chunk is the scheduler's choice
        assert per_size[n]["preprocess_workers_seen"] in (1, 2) and per_size[n]["preprocess_peak_rss_per_worker_mb"] > 10
        assert all(per_size[n][f"{st}_ms_per_utt"] > 0 and per_size[n][f"{st}_peak_rss_mb"] > 0
                   for st in scaling_bench.STAGES)
    assert 0 < flat["preprocess_peak_rss_per_worker_mb"] < 300  # no torch in the workers for 16 kHz audio
    small, large = (per_size[n]["report_bytes"] for n in ("40", "80"))
    assert large < 1.2 * small and flat["scaling_report_bytes_max"] == max(small, large)


def test_real_shape_utterances(tmp_path):
    spec = importlib.util.spec_from_file_location("mmasr_benchmarks_projector", REPO / "benchmarks" / "projector_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import soundfile as sf

    man = module.synthetic_utterances(tmp_path, 3, seed=1)
    assert len(man) == 3 and (man["split"] == "train").all() and man["text"].str.split().map(len).eq(8).all()
    for path, seconds in zip(man["audio_path"], man["duration_s"]):
        info = sf.info(path)
        assert info.samplerate == 16000 and 2.0 <= seconds <= 4.0 and abs(info.frames - int(seconds * 16000)) <= 1


def test_summary_rows_show_the_real_shape_and_scaling(bench):
    r = {**sample_result(bench), "projector_cache_speedup_real_shape": 7.5, "real_shape_live_step_seconds": 30.0,
         "real_shape_cached_step_seconds": 4.0, "scaling_per_utt_ratio_20k": 0.8, "scaling_sizes": [1000, 5000, 20000],
         "scaling_report_bytes_max": 90 * 1024, "preprocess_peak_rss_per_worker_mb": 77.0}
    rows = {row[0]: row for row in bench.summary_rows(r)}
    real = rows["projector: feature cache vs live encoder (real shape)"]
    assert real[1] == "7.5x (30.0 s vs 4.00 s a step)" and real[2] == ">= 10x (MISSED)"
    assert rows["scaling: s/utterance, largest / smallest corpus"][1:3] == ["0.80 (1k/5k/20k utts; report 90 kB max)",
                                                                         "<= 1.3 (met)"]
    assert rows["preprocess: peak RSS per worker"][1] == "77 MB"
    assert rows["projector: feature cache vs live encoder (demo config)"][2] == ""  # no longer a target
    assert bench.target_met("scaling_per_utt_ratio_20k", 1.3) is True and bench.target_met("scaling_per_utt_ratio_20k", 1.31) is False
    assert {"projector_cache_speedup_real_shape", "scaling_per_utt_ratio_20k"} <= set(bench.CONTRACT_KEYS)


def test_encoder_passes_row_prints_before_after_and_the_ratio(bench):
    r = {**sample_result(bench), "encoder_passes_per_utt_real_whisper": {"before": 3.5, "after": 1.5},
         "encoder_passes_ratio_real_whisper": 3.5 / 1.5}
    rows = {row[0]: row for row in bench.summary_rows(r)}
    assert rows["audio-encoder passes/utt, real_whisper layout"][1] == "3.50 before, 1.50 after: 2.33x fewer"
    assert rows["audio-encoder passes/utt, real_whisper layout"][2] == ""  # no target: a count
    rows = {row[0]: row for row in bench.summary_rows(sample_result(bench))}
    assert rows["audio-encoder passes/utt, real_whisper layout"][1] == "not measured"


def fake_run(root, starts_ends, tsvs, finished=True):
    """A Snakemake run's traces: metadata records (start, end) and benchmark files (rule, seconds)."""
    (root / ".snakemake/metadata").mkdir(parents=True)
    for i, (start, end) in enumerate(starts_ends):
        (root / ".snakemake/metadata" / f"r{i}").write_text(json.dumps({"rule": "x", "starttime": start, "endtime": end}))
    write_tsvs(root / "results" / "benchmarks", [(f"{rule}.tsv", s, 100.0) for rule, s in tsvs])
    if finished:
        (root / "results" / "report.html").write_text("<html></html>")
    return root


def test_real_whisper_pipeline_runs_are_read_and_compared_per_rule(bench, tmp_path):
    before = fake_run(tmp_path / "before", [(0.0, 1000.0), (1000.0, 3600.0)], [("nbest", 1500.0), ("fuse", 2.0),
                                                                                ("layer_embeddings", 600.0)])
    after = fake_run(tmp_path / "after", [(50.0, 1850.0)], [("encode_audio", 700.0), ("nbest", 900.0), ("fuse", 2.0)])
    args = bench.parse_args(["--real-whisper-run", str(after), "--real-whisper-baseline", str(before)])
    details, devices = {}, {}
    r = bench.real_whisper_pipeline(args, details, devices)
    assert r == {"real_whisper_pipeline_seconds": {"before": 3600.0, "after": 1800.0}, "real_whisper_pipeline_speedup": 2.0}
    assert details["real_whisper_pipeline"]["after"]["stages"]["encode_audio"]["wall_s"] == 700.0
    assert details["real_whisper_pipeline"]["before"]["finished"] and "did not finish" not in devices["real_whisper_pipeline_seconds"]
    assert bench.pipeline_comparison_rows(details["real_whisper_pipeline"]) == [
        ["nbest", "1500", "900"], ["encode_audio", "", "700"], ["layer_embeddings", "600", ""], ["fuse", "2", "2"],
        ["whole run (first job start to last job end)", "3600 (1:00:00)", "1800 (0:30:00)"]]
    rows = {row[0]: row for row in bench.summary_rows({**sample_result(bench), **r})}
    assert rows["full real_whisper.yaml pipeline, 2-core runs"][1:3] == ["3600 s before, 1800 s after", "< 45 min (after) (met)"]
    assert bench.target_met("real_whisper_pipeline_seconds", {"before": None, "after": 2800.0}) is False

    stopped = fake_run(tmp_path / "stopped", [(0.0, 4000.0)], [("nbest", 1500.0)], finished=False)
    args = bench.parse_args(["--real-whisper-run", str(after), "--real-whisper-baseline", str(stopped)])
    details = {}
    r = bench.real_whisper_pipeline(args, details, devices)
    assert r["real_whisper_pipeline_speedup"] is None and "did not finish" in devices["real_whisper_pipeline_seconds"]
    assert bench.pipeline_comparison_rows(details["real_whisper_pipeline"])[-1][1] == "4000 (1:06:40), did not finish"
    assert bench.real_whisper_pipeline(bench.parse_args([]), {}, {})["real_whisper_pipeline_seconds"] is None
    with pytest.raises(FileNotFoundError, match="no Snakemake run there"):
        bench.real_whisper_pipeline(bench.parse_args(["--real-whisper-run", str(tmp_path)]), {}, {})


def test_encoder_passes_are_counted_by_the_stages_both_ways(bench, demo_model_dirs, tmp_path):
    """benchmarks/encode_once.py on 8 utterances (6 taken: 2 per split, 4 in the n-best splits) with the tiny
    random Whisper: before, three passes of the 6 (projector cache, probe, CLAP) + 4 (n-best); after, the 6 of the
    shared pass, which the probe, CLAP and the n-best read."""
    import encode_once

    from tests.test_clap import save_tiny_bert
    from tests.test_encode_once import corpus

    p = config.validate({"models": {"whisper": str(demo_model_dirs["whisper"]), "device": "cpu",
                                    "text_encoder": str(save_tiny_bert(tmp_path / "bert"))},
                         "nbest": {"num_beams": 2, "num_return_sequences": 2, "keep": 2}})
    r = encode_once.measure(p, corpus(tmp_path / "audio"), str(demo_model_dirs["whisper"]), tmp_path / "work", utts=8,
                            threads=1)
    assert r["encoder_passes_utts"] == 6 and r["encoder_passes_nbest_utts"] == 4
    assert r["encoder_passes_per_stage"] == {
        "separate": {"encode_audio": 6, "layer_embeddings": 6, "clap_embeddings": 6, "nbest": 4},
        "shared": {"encode_audio": 6, "layer_embeddings": 0, "clap_embeddings": 0, "nbest": 0}}
    assert r["encoder_passes_per_utt_real_whisper"] == {"before": 22 / 6, "after": 1.0}
    assert r["encoder_passes_ratio_real_whisper"] == pytest.approx(22 / 6)
    assert "before (a pass per stage): 3.67   after (one shared pass): 1.00   ratio 3.67x" in encode_once.report(r)
