"""The HTML report: every section from hand-made stage outputs, missing stages, self-containment, and a
headless-Chromium render (skipped where Debian's `chromium` is not installed; a failure under CI=true)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mmasr.report import build as report
from mmasr.cli import main
from mmasr.config import validate
from mmasr.io import write_json, write_parquet
from tests.conftest import REPO, ReportPage, chromium_flags, write_picture

SECTION_IDS = ["summary", "data", "rescoring", "systems", "projector", "clap", "probe", "pretraining", "benchmarks", "provenance"]
HEADINGS = ["Key results", "Data", "Rescoring with the picture", "Systems (zero-shot and LoRA-adapted Whisper)",
            "Projector (speech encoder → LM)",
            "CLAP retrieval (speech ↔ text)", "Probe calibration", "Demo model pre-training", "Speed benchmarks",
            "Provenance"]


def section_html(page: str, sid: str) -> str:
    """The HTML of one <section id=...> (sections are not nested)."""
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def make_data(root: Path) -> None:
    """A processed corpus: 4 speakers (2 impaired, 2 control) over train/dev/test, 2 pictures, rejects."""
    rows = []
    spk_split = {"F01": "train", "MC01": "train", "F02": "dev", "FC01": "test", "M03": "test"}
    for spk, split in spk_split.items():
        group = "control" if "C" in spk else "impaired"
        for i in range(3):
            rows.append({"utt_id": f"{spk}_{i:04d}", "speaker": spk, "group": group,
                         "audio_path": f"data/processed/audio/{spk}_{i:04d}.wav", "duration_s": 1.0 + 0.25 * i,
                         "text": "a red bear", "image_id": f"img{i % 2}", "split": split, "source": "demo"})
    write_parquet(root / "data/processed/manifest.parquet", pd.DataFrame(rows))
    write_parquet(root / "data/processed/rejects.parquet", pd.DataFrame([
        {"id": "X_9001", "path": "a.wav", "kind": "utterance", "stage": "preprocess", "reason": "empty_audio", "detail": "a.wav: file is empty"},
        {"id": "X_9002", "path": "b.wav", "kind": "utterance", "stage": "preprocess", "reason": "empty_audio", "detail": "b.wav: file is empty"},
        {"id": "X_9003", "path": "c.wav", "kind": "utterance", "stage": "ingest", "reason": "duplicate_id", "detail": "row 3"},
    ]))
    images = []
    for i in range(2):
        path = write_picture(root / f"data/processed/images/img{i}.png", size=(80, 60))
        images.append({"image_id": f"img{i}", "path": str(path.relative_to(root)), "width": 80, "height": 60})
    write_parquet(root / "data/processed/images.parquet", pd.DataFrame(images))
    write_json(root / "results/metrics/preprocess.json", {"n_input": 18, "n_kept": 15, "n_rejected": 3,
                                                          "rejected_by_reason": {"empty_audio": 2, "duplicate_id": 1},
                                                          "audio_hours": 0.0052})


def make_fusion(root: Path) -> None:
    write_json(root / "results/metrics/fusion.json", {
        "best_alpha": 0.35, "tau": 100.0, "dev_wer_asr": 0.2, "dev_wer_fused": 0.1, "dev_wer_oracle": 0.05,
        "test_wer_asr": 0.4321, "test_wer_fused": 0.2109, "test_wer_oracle": 0.1234, "test_wer_diff": -0.2212,
        "test_wer_diff_ci_low": -0.3011, "test_wer_diff_ci_high": -0.1502, "test_gap_closed": 0.7,
        "n_test_utts": 6, "n_no_image": 1, "test_ref_words": 18,
        "test_wer_asr_impaired": 0.6, "test_wer_fused_impaired": 0.3, "test_wer_asr_control": 0.2,
        "test_wer_fused_control": 0.1, "test_S_asr": 7, "test_D_asr": 1, "test_I_asr": 0, "test_S_fused": 3,
        "test_D_fused": 1, "test_I_fused": 0, "params_hash": "abc123def456", "model_whisper": "org/whisper-tiny",
        "model_clip": "org/clip"})
    grid = pd.DataFrame([{"alpha": a / 10, "split": s, "wer": 0.5 - a / 40, "S": 1, "D": 0, "I": 0, "ref_words": 18}
                         for s in ("dev", "test") for a in range(11)])
    (root / "results/fusion").mkdir(parents=True, exist_ok=True)
    grid.to_csv(root / "results/fusion/grid.csv", index=False)
    pd.DataFrame([
        {"level": "group", "name": "impaired", "n_utts": 3, "ref_words": 9, "wer_asr": 0.6, "wer_fused": 0.3, "wer_oracle": 0.2},
        {"level": "group", "name": "control", "n_utts": 3, "ref_words": 9, "wer_asr": 0.2, "wer_fused": 0.1, "wer_oracle": 0.0},
        {"level": "speaker", "name": "M03", "n_utts": 3, "ref_words": 9, "wer_asr": 0.6667, "wer_fused": 0.3, "wer_oracle": 0.2},
        {"level": "speaker", "name": "FC01", "n_utts": 3, "ref_words": 9, "wer_asr": 0.2, "wer_fused": 0.1, "wer_oracle": 0.0},
    ]).to_csv(root / "results/fusion/per_speaker.csv", index=False)
    write_parquet(root / "results/fusion/changed.parquet", pd.DataFrame([
        {"utt_id": "M03_0000", "speaker": "M03", "group": "impaired", "image_id": "img0", "reference": "a red bear",
         "before": "a red pear", "after": "a red bear", "before_errors": 1, "after_errors": 0},
        {"utt_id": "M03_0001", "speaker": "M03", "group": "impaired", "image_id": "img1", "reference": "two goats",
         "before": "two goats", "after": "two coats <script>alert(1)</script>", "before_errors": 0, "after_errors": 2},
        {"utt_id": "FC01_0002", "speaker": "FC01", "group": "control", "image_id": None, "reference": "a bee",
         "before": "a pea", "after": "a bee", "before_errors": 1, "after_errors": 0},
    ]))
    write_parquet(root / "data/nbest/nbest.parquet", pd.DataFrame({"utt_id": ["M03_0000"], "rank": [0], "text": ["a"]}),
                  metadata={"mmasr.model": "org/whisper-tiny", "mmasr.revision": "rev-nbest-42",
                            "mmasr.decoding": json.dumps({"num_beams": 5})})
    write_json(root / "data/cache/clip_image_embeddings.npz.json",
               {"model": "org/clip", "revision": "rev-emb-7", "dimension": 64, "count": 2})


def make_later_stages(root: Path) -> None:
    """projector / CLAP / probe outputs as their contracts describe them."""
    write_json(root / "results/metrics/projector.json", {
        "test_wer": 0.3456, "best_dev_loss": 0.789, "n_trainable_params": 123456, "steps": 500,
        "test_wer_impaired": 0.5, "test_wer_control": 0.19, "test_substitutions": 5, "test_deletions": 2,
        "test_insertions": 1, "whisper_test_wer_asr": 0.4321, "whisper_test_wer_fused": 0.2109,
        "test_wer_vs_whisper": 0.1234, "test_wer_vs_whisper_ci_low": 0.0451, "test_wer_vs_whisper_ci_high": 0.2,
        "test_wer_vs_whisper_ci_level": "utterance", "n_whisper_compared_utts": 2})
    (root / "results/projector").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"step": range(1, 11), "lr": 1e-3, "train_loss": [3 - 0.2 * i for i in range(10)],
                  "dev_loss": [None] * 4 + [2.2] + [None] * 4 + [1.5]}).to_csv(root / "results/projector/train_log.csv", index=False)
    write_parquet(root / "results/projector/hyps.parquet", pd.DataFrame([
        {"utt_id": "M03_0000", "speaker": "M03", "group": "impaired", "ref": "a red bear", "hyp": "a red pear"},
        {"utt_id": "FC01_0000", "speaker": "FC01", "group": "control", "ref": "a bee", "hyp": "a bee"}]))
    ret = {"chance_r1": 0.0167, "n_candidates": 60}
    for prefix, base in (("", 0.6), ("zeroshot_", 0.05)):
        for d in ("a2t", "t2a"):
            ret.update({f"{prefix}{d}_r1": base, f"{prefix}{d}_r5": base + 0.1, f"{prefix}{d}_r10": base + 0.2,
                        f"{prefix}{d}_map10": base + 0.05})
    ret["a2t_r1"] = 0.6543
    write_json(root / "results/metrics/retrieval.json", ret)
    (root / "results/clap").mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"direction": d, "model": m, "k": k, "recall": min(1.0, k / 10 + (0.5 if m == "trained" else 0))}
                  for d in ("a2t", "t2a") for m in ("zeroshot", "trained") for k in (1, 5, 10)]
                 ).to_csv(root / "results/clap/recall_at_k.csv", index=False)
    pd.DataFrame({"step": [1, 2, 3], "lr": 1e-3, "train_loss": [4.0, 3.0, 2.5], "logit_scale": 2.66,
                  "dev_loss": [None, None, 2.8]}).to_csv(root / "results/clap/train_log.csv", index=False)
    write_json(root / "results/metrics/probe.json", {"accuracy": 0.81, "auc": 0.8766, "brier": 0.1432,
                                                     "ece_uncalibrated": 0.1876, "ece_calibrated": 0.0321,
                                                     "calibration_method": "platt", "speaker_auc": 0.75,
                                                     "auc_ci_low": 0.6123, "auc_ci_high": 0.9456,
                                                     "baseline_auc": 0.9912, "baseline_accuracy": 0.93,
                                                     "baseline_speaker_auc": 1.0, "baseline_brier": 0.05,
                                                     "baseline_features": ["duration_s", "snr_db"],
                                                     "n_eval_speakers_positive": 2, "n_eval_speakers_negative": 2})
    (root / "results/probe").mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"calibration": c, "bin": b, "mean_predicted": (b + 0.5) / 5,
                   "fraction_positive": (b + 0.5) / 5 * (0.6 if c == "uncalibrated" else 1.0), "count": 10 + b}
                  for c in ("uncalibrated", "calibrated") for b in range(5)]).to_csv(root / "results/probe/reliability.csv", index=False)
    write_json(root / "results/benchmarks.json", {"nbest_batched_speedup": 6.4, "grid_vectorised_speedup": 125.4,
                                                  "device": "cpu", "pipeline_wall_s": 321.0})


def make_benchmarks(root: Path) -> None:
    tsv = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t{cpu}\n"
    for rel, s, rss in (("split.tsv", 1.5, 200.0), ("fuse.tsv", 0.5, 150.0), ("nbest/0-of-2.tsv", 7.0, 900.0),
                        ("nbest/1-of-2.tsv", 5.0, 950.0)):
        path = root / "results/benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tsv.format(s=s, rss=rss, cpu=s * 1.5))


@pytest.fixture
def full_run(tmp_path) -> Path:
    root = tmp_path / "run"
    make_data(root)
    make_fusion(root)
    make_later_stages(root)
    make_benchmarks(root)
    return root


def params() -> dict:
    return validate({"report": {"n_examples": 8, "thumbnail_px": 48}})


def test_every_section_shows_the_stage_values(full_run):
    page = report.build_report(full_run, params(), "test")
    for sid in SECTION_IDS:
        assert "not run yet" not in section_html(page, sid) or sid == "pretraining", sid
    data = section_html(page, "data")
    assert "18 input utterances: 15 kept, 3 rejected" in data
    assert re.search(r"<td>test</td><td class=\"num\">3</td><td class=\"num\">1</td><td class=\"num\">3</td>", data)
    assert "<td>empty_audio</td><td class=\"num\">2</td>" in data  # rejects grouped by reason
    resc = section_html(page, "rescoring")
    for value in ("0.432", "0.211", "0.123", "[-0.301, -0.150]", "α = <b>0.35</b>", "rescoring helps",
                  "the swap control could not run"):
        assert value in resc, value
    assert "<td>M03</td><td>impaired</td>" in resc  # per-speaker table with the group from the manifest
    assert "3 test transcripts changed: 2 better, 1 worse" in resc
    assert resc.count('class="thumb"') == 2  # FC01_0002 has no picture
    assert "no picture" in resc
    assert resc.index("M03_0001") < resc.index("M03_0000")  # the regression is shown first
    assert "&lt;script&gt;" in resc and "<script>" not in page  # data text is escaped
    proj = section_html(page, "projector")
    assert "0.346" in proj and "123,456 trainable parameters" in proj and "Whisper + picture (fused)" in proj
    assert "Projector − Whisper alone on the same 2 test utterances: 0.123 [0.045, 0.200]" in proj
    assert "1 of 2 test transcripts differ" in proj and "<mark>pear</mark>" in proj
    clap = section_html(page, "clap")
    assert "0.654" in clap and "60 candidates" in clap and "zero-shot" in clap and clap.count("<img") == 2
    probe = section_html(page, "probe")
    for value in ("0.877", "0.143", "0.188", "0.032", "platt", "[0.612, 0.946]", "0.750", "signal baseline", "0.991",
                  "duration_s, snr_db", "2 positive"):
        assert value in probe, value
    assert probe.count("<img") == 1
    assert "125.400" in section_html(page, "benchmarks")
    prov = section_html(page, "provenance")
    assert "rev-nbest-42" in prov and "rev-emb-7" in prov and "abc123def456" in prov and "org/whisper-tiny" in prov
    assert report.params_hash(params()) in prov and "thumbnail_px: 48" in prov
    manifest_sha = report.sha256_file(full_run / "data/processed/manifest.parquet")
    assert f"<td>data/processed/manifest.parquet</td>" in prov and manifest_sha in prov
    assert "<td>nbest</td><td class=\"num\">2</td><td class=\"num\">12.000</td>" in prov  # shards summed
    assert "transformers" in prov and "snakemake" in prov


def test_missing_stages_say_so_instead_of_failing(tmp_path):
    root = tmp_path / "early"
    make_data(root)
    page = report.build_report(root, params(), "test")
    for sid, path in (("rescoring", "results/metrics/fusion.json"), ("projector", "results/metrics/projector.json"),
                      ("clap", "results/metrics/retrieval.json"), ("probe", "results/metrics/probe.json")):
        assert f"not run yet (missing <code>{root / path}</code>)" in section_html(page, sid), sid
    assert "15 kept" in section_html(page, "data")
    assert "No results yet" in section_html(page, "summary")
    assert "No benchmark files found" in section_html(page, "provenance")
    # nothing at all: every section still renders, and says what is missing
    empty = report.build_report(tmp_path / "nothing", params(), "test")
    for sid in SECTION_IDS:
        section_html(empty, sid)
    assert "missing <code>" in section_html(empty, "data")


def test_skipped_picture_stages_are_listed_with_their_reasons(full_run):
    """A corpus without pictures (TORGO): the report says which picture stages were skipped and why."""
    fusion = json.loads((full_run / "results/metrics/fusion.json").read_text())
    fusion.update(n_no_image=6, test_wer_fused=fusion["test_wer_asr"], best_alpha=0.0, fusion_skipped=True,
                  fusion_skip_reason="no test utterance has a picture <x>")
    write_json(full_run / "results/metrics/fusion.json", fusion)
    write_parquet(full_run / "results/fusion/changed.parquet", pd.DataFrame(columns=["utt_id", "before", "after"]))
    write_json(full_run / "results/metrics/pretrain_clip.json", {"clip_steps": 0, "clip_skipped": True,
                                                                 "clip_skip_reason": "no train-split pairs"})
    write_json(full_run / "data/cache/clip_image_embeddings.npz.json",
               {"model": "org/clip", "revision": None, "dimension": 0, "count": 0, "skipped": True,
                "skip_reason": "the picture-embedding cache is empty"})
    write_parquet(full_run / "data/nbest/nbest.parquet", pd.DataFrame({"utt_id": ["M03_0000"], "rank": [0]}),
                  metadata={"mmasr.model": "m", "mmasr.clip_skip_reason": "clip_cos is missing for every hypothesis"})
    page = report.build_report(full_run, params(), "test")
    summary = section_html(page, "summary")
    assert "Skipped picture stages" in summary and "fused = ASR-only" in summary
    for stage, reason in (("pretrain_demo_clip", "no train-split pairs"),
                          ("cache_image_embeddings", "the picture-embedding cache is empty"),
                          ("clip_text_scores", "clip_cos is missing for every hypothesis"),
                          ("fuse (rescoring with the picture)", "no test utterance has a picture &lt;x&gt;")):
        assert f"<li><b>{stage}</b>: {reason}</li>" in summary, stage
    rescoring = section_html(page, "rescoring")
    assert "Rescoring with the picture skipped" in rescoring and "none could change" in rescoring
    assert "skipped: no train-split pairs" in section_html(page, "pretraining")
    # a run with pictures lists nothing
    make_fusion(full_run)
    (full_run / "results/metrics/pretrain_clip.json").unlink()
    (full_run / "data/nbest/nbest.parquet").unlink()
    (full_run / "data/cache/clip_image_embeddings.npz.json").unlink()
    assert "Skipped picture stages" not in report.build_report(full_run, params(), "test")


def test_unreadable_input_is_reported_in_its_section(full_run):
    (full_run / "results/metrics/probe.json").write_text("{not json")
    (full_run / "results/clap/recall_at_k.csv").unlink()
    page = report.build_report(full_run, params(), "test")
    probe = section_html(page, "probe")
    assert "Could not read <code>" in probe and "probe.json</code>: JSONDecodeError" in probe
    clap = section_html(page, "clap")
    assert "0.654" in clap and "Recall@k curves: not run yet" in clap  # the rest of the section stays


def test_the_page_is_self_contained(full_run):
    page = report.build_report(full_run, params(), "test")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "url(" not in page and "@import" not in page and "<link" not in page and "<script" not in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) >= 8
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_group_counts():
    manifest = pd.DataFrame({"speaker": ["a", "a", "b", "c"], "group": ["impaired", "impaired", "control", "control"],
                             "split": ["train", "train", "train", "test"], "duration_s": [1800.0, 1800.0, 3600.0, 360.0]})
    counts = report.split_group_counts(manifest).set_index("split")
    assert list(counts.index) == ["train", "test", "total"]
    assert counts.loc["train", "impaired_utts"] == 2 and counts.loc["train", "impaired_speakers"] == 1
    assert counts.loc["train", "all_speakers"] == 2 and counts.loc["test", "control_utts"] == 1
    assert counts.loc["total", "all_utts"] == 4 and counts.loc["train", "hours"] == pytest.approx(2.0)


def test_pick_examples_shows_regressions_first_and_takes_speakers_in_turn():
    changed = pd.DataFrame({"utt_id": [f"{s}_{i}" for s in "ab" for i in range(4)] + ["c_0"],
                            "speaker": [s for s in "ab" for _ in range(4)] + ["c"],
                            "before_errors": [1] * 8 + [0], "after_errors": [0] * 8 + [2]})
    picked = report.pick_examples(changed, 4)
    assert list(picked["utt_id"]) == ["c_0", "a_0", "b_0", "a_1"]
    assert report.pick_examples(changed, 0).empty and len(report.pick_examples(changed, 50)) == 9


def test_word_diff_marks_wrong_and_missing_words():
    assert report.word_diff("a red bear", "a red pear") == "a red <mark>pear</mark>"
    assert report.word_diff("two red bears", "two bears") == "two <del>red</del> bears"
    assert report.word_diff("a <b>", "a <i>") == "a <mark>&lt;i&gt;</mark>"


def test_benchmark_times_per_rule(tmp_path):
    make_benchmarks(tmp_path)
    (tmp_path / "results/benchmarks/broken.tsv").write_text("nothing useful\n")
    rules = report.per_rule_times(report.benchmark_table(tmp_path / "results/benchmarks"))
    assert list(rules["rule"]) == ["nbest", "split", "fuse"]
    nbest = rules.iloc[0]
    assert (nbest["jobs"], nbest["s"], nbest["max_rss_mb"], nbest["cpu_time_s"]) == (2, 12.0, 950.0, 18.0)
    assert report.benchmark_table(tmp_path / "absent").empty


def test_git_state_without_git(tmp_path):
    assert report.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_cli_writes_the_report_and_rejects_bad_inputs(full_run, tmp_path, caplog):
    out = tmp_path / "out" / "report.html"
    cfg = json.dumps({"report": {"n_examples": 1}})
    assert main(["report", "--cfg", cfg, "--root", str(full_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "1 shown" in section_html(page, "rescoring") and "n_examples: 1" in page and "--cfg" in page
    moved = tmp_path / "elsewhere.json"
    shutil.move(full_run / "results/metrics/probe.json", moved)
    assert main(["report", "--root", str(full_run), "--out", str(out), "--input", f"probe_metrics={moved}"]) == 0
    assert "0.877" in section_html(out.read_text(), "probe")
    assert main(["report", "--root", str(full_run), "--out", str(out), "--input", "probe_metrics"]) == 2
    assert "expected NAME=PATH" in caplog.text
    assert main(["report", "--root", str(full_run), "--out", str(out), "--input", "nosuch=x"]) == 2
    assert "unknown input name(s) nosuch" in caplog.text
    assert main(["report", "--cfg", json.dumps({"report": {"n_exampels": 1}}), "--out", str(tmp_path / "x.html")]) == 2
    assert "report.n_exampels" in caplog.text and not (tmp_path / "x.html").exists()


def test_key_results_and_table_cells_are_found_in_their_place(full_run):
    """The structure tests read values by (tests/conftest.py ReportPage): key results by data-metric, table
    cells by section, row and column."""
    page = ReportPage(report.build_report(full_run, params(), "test"))
    fusion = json.loads((full_run / "results/metrics/fusion.json").read_text())
    projector = json.loads((full_run / "results/metrics/projector.json").read_text())
    assert {"fusion.test_wer_asr", "fusion.test_wer_fused", "fusion.test_wer_oracle", "projector.test_wer"} <= set(page.metrics)
    for name, value in (("fusion.test_wer_asr", fusion["test_wer_asr"]), ("fusion.test_wer_fused", fusion["test_wer_fused"]),
                        ("projector.test_wer", projector["test_wer"])):
        assert page.metrics[name] == report.fmt(value), name
    assert page.cell("rescoring", "ASR only (Whisper 1-best)", "test WER") == report.fmt(fusion["test_wer_asr"])
    assert page.cell("rescoring", "ASR only (Whisper 1-best)", "dev WER") == report.fmt(fusion["dev_wer_asr"])
    assert page.cell("projector", "projector + LM", "test WER") == report.fmt(projector["test_wer"])
    with pytest.raises(AssertionError, match="0 cells in row 'no such system'"):
        page.cell("rescoring", "no such system", "test WER")


def test_report_renders_in_headless_chromium(chromium, full_run, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report.build_report(full_run, params(), "test"), encoding="utf-8")
    flags = chromium_flags(chromium, tmp_path / "chromium-profile")
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    headings = re.findall(r"<h2>(.*?)</h2>", dom.stdout)
    assert [h.replace("&amp;", "&") for h in headings] == HEADINGS
    assert dom.stdout.count('class="thumb"') == 2 and "0.432" in dom.stdout
    # A screenshot as a test artefact (not in git): results/test-artefacts/report.png in the repository.
    artefacts = REPO / "results" / "test-artefacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").resize((64, 200)).getcolors(maxcolors=100000)
    assert colours is not None and len(colours) > 20  # something was drawn, not a blank page


def test_nbest_depth_note_reads_the_stats_metadata():
    from mmasr.rescoring.nbest import summarise_stats
    from mmasr.report.build import nbest_depth_note

    meta = {"mmasr.decoding": json.dumps({"num_beams": 8, "num_return_sequences": 8, "keep": 5}),
            **summarise_stats([{"distinct": 1, "truncated_dropped": 0, "all_truncated": False},
                               {"distinct": 3, "truncated_dropped": 2, "all_truncated": False},
                               {"distinct": 3, "truncated_dropped": 0, "all_truncated": True},
                               {"distinct": 5, "truncated_dropped": 0, "all_truncated": False}])}
    text = nbest_depth_note(meta)
    assert "(beam 8, 8 returned, up to 5 kept)" in text and "1: 1, 3: 2, 5: 1" in text
    assert "mean 3.00, 75% with two or more" in text and "2 dropped; 1 utterances had only such beams (kept, flagged" in text
    assert nbest_depth_note({}) == ""


def test_swap_control_and_interval_level_are_shown_beside_the_fused_wer(full_run):
    path = full_run / "results/metrics/fusion.json"
    m = json.loads(path.read_text())
    m.update({"test_wer_diff_ci_level": "speaker", "test_wer_fused_swapped": 0.5123, "test_wer_fused_swapped_ci_low": 0.01,
              "test_wer_fused_swapped_ci_high": 0.15, "test_swap_permutations": 5, "test_wer_alpha1": 0.6789,
              "test_wer_fused_swapped_impaired": 0.7, "test_wer_fused_swapped_control": 0.25})
    write_json(path, m)
    resc = section_html(report.build_report(full_run, params(), "test"), "rescoring")
    assert "pictures swapped (control" in resc and "0.512" in resc and "[0.010, 0.150]" in resc
    assert "a wrong picture hurts" in resc and "5 seeded permutations" in resc
    assert "speaker-level bootstrap" in resc and "picture alone (α = 1)" in resc and "0.679" in resc
    m["test_wer_fused_swapped"] = None
    write_json(path, m)
    resc = section_html(report.build_report(full_run, params(), "test"), "rescoring")
    assert "Picture-swap control: not possible" in resc


def test_corrupt_pretrain_metrics_are_called_unreadable(full_run):
    (full_run / "results/metrics/pretrain_whisper.json").write_text("{not json")
    pre = section_html(report.build_report(full_run, params(), "test"), "pretraining")
    assert "Unreadable pre-training metrics" in pre and "pretrain_whisper.json" in pre
    assert "No demo model pre-trained" not in pre
    write_json(full_run / "results/metrics/pretrain_clip.json", {"clip_n_params": 660000, "clip_steps": 10})
    pre = section_html(report.build_report(full_run, params(), "test"), "pretraining")
    assert "Unreadable pre-training metrics" in pre and "660,000" in pre


def test_data_section_shows_what_disjoint_text_moved_out():
    from mmasr.data.split import EXCLUDED_COLUMNS

    excluded = pd.DataFrame([
        {"utt_id": "FC01_0001", "speaker": "FC01", "group": "control", "split": "test", "reason": "text_in_train",
         "match": "a <red> bear"},
        {"utt_id": "M03_0001", "speaker": "M03", "group": "impaired", "split": "test", "reason": "text_in_train",
         "match": "a <red> bear"},
        {"utt_id": "F02_0002", "speaker": "F02", "group": "impaired", "split": "dev", "reason": "image_in_train",
         "match": "img1"}], columns=EXCLUDED_COLUMNS)
    on = {"disjoint_text": True, "n_excluded": 3, "n_excluded_text_overlap": 2, "n_excluded_image_overlap": 1,
          "dev_n_excluded": 1, "test_n_excluded": 2}
    part = report.excluded_part(on, excluded)
    assert "3 dev/test utterances left out of the manifest: 2 whose normalised transcript and 1 whose picture" in part
    assert "<td>test</td><td>text_in_train</td><td class=\"num\">2</td><td class=\"num\">2</td>" in part
    assert "a &lt;red&gt; bear" in part and "<red>" not in part  # escaped
    assert "could not read" in report.excluded_part(on, report.Missing("x.parquet", "bad"))
    off = report.excluded_part({"disjoint_text": False, "dev_n_text_in_train": 4, "test_n_text_in_train": 9},
                               excluded.iloc[:0])
    assert "off" in off and "4 dev, 9 test utterances share a normalised transcript with train" in off
    assert report.excluded_part({"train_n_utts": 3}, excluded) == ""  # a split.json from before the key
    assert report.excluded_part(report.Missing("split.json"), excluded) == ""


def make_adapted(root: Path) -> dict:
    """The adapted Whisper's fusion metrics (with its ASR-only against the zero-shot one's), adapt.json, its log."""
    zero = json.loads((root / "results/metrics/fusion.json").read_text())
    adapted = {**zero, "test_wer_asr": 0.25, "test_wer_asr_impaired": 0.3, "test_wer_asr_control": 0.2,
               "test_wer_fused": 0.24, "test_wer_asr_lm": 0.23, "test_wer_asr_lm_ci_low": -0.05,
               "test_wer_asr_lm_ci_high": 0.01, "test_wer_asr_vs_reference": -0.1821,
               "test_wer_asr_vs_reference_ci_low": -0.2512, "test_wer_asr_vs_reference_ci_high": -0.1033,
               "test_wer_asr_vs_reference_ci_level": "speaker", "test_wer_asr_vs_reference_ci_low_impaired": -0.4,
               "test_wer_asr_vs_reference_ci_high_impaired": -0.2}
    write_json(root / "results/metrics/fusion_adapted.json", adapted)
    write_json(root / "results/metrics/adapt.json", {"n_adapter_params": 4096, "n_base_params": 400000, "steps": 10,
                                                     "n_train_utts": 9, "best_step": 8, "best_dev_loss": 1.234,
                                                     "first_dev_loss": 2.5})
    (root / "results/adapt").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"step": range(1, 11), "lr": 1e-3, "loss": [3 - 0.2 * i for i in range(10)], "tokens": 40,
                  "dev_loss": [None] * 3 + [2.5] + [None] * 3 + [1.234] + [None] * 2}
                 ).to_csv(root / "results/adapt/train_log.csv", index=False)
    return adapted


def test_systems_section_shows_the_table_rows_and_the_adaptation_curve(full_run):
    from mmasr.report.systems import format_cell, systems_markdown, systems_rows

    adapted = make_adapted(full_run)
    on = validate({"adapt": {"enabled": True}})
    page = report.build_report(full_run, on, "test")
    systems = section_html(page, "systems")
    zero = json.loads((full_run / "results/metrics/fusion.json").read_text())
    rows = systems_rows({"zero-shot": zero, "adapted": adapted})
    md = systems_markdown(rows, "h")
    # every cell of the paper table is in the report, the same text
    for r in rows:
        for g in ("all", "impaired", "control"):
            cell = format_cell(r[g], "–")
            assert f"<td>{cell}</td>" in systems, (r["model"], r["system"], g)
            if r[g][0] is not None:
                assert cell in md
    assert "<td>adapted</td><td>ASR-only</td><td>–</td><td>25.0 [-25.1, -10.3]</td><td>30.0 [-40.0, -20.0]</td>" in systems
    assert "<td>zero-shot</td><td>ASR-only</td><td>–</td><td>43.2</td>" in systems
    assert "adapted − zero-shot ASR-only test WER -0.182, 95% interval [-0.251, -0.103] (speaker-level)" in systems
    assert "adaptation helps" in systems and "kept step 8" in systems
    assert "<h3>Adaptation loss</h3>" in systems and systems.count('src="data:image/png;base64,') == 1
    # adaptation on but not run yet: says which file is missing
    (full_run / "results/metrics/fusion_adapted.json").unlink()
    assert "not run yet (missing <code>" in section_html(report.build_report(full_run, on, "test"), "systems")
    # adaptation off: one sentence, no table and no curve, even with the files there
    make_adapted(full_run)
    off = section_html(report.build_report(full_run, params(), "test"), "systems")
    assert "Adaptation is off" in off and "adapt.enabled" in off and "<table" not in off and "<img" not in off


def test_both_forms_the_picture_verdict_and_speakers_from_a_real_fusion(full_run):
    """fusion.json as run_fusion writes it (issue 27): the headline form and the other one, the paired fused − swapped
    interval with its number of speakers beside it, the verdict, and the warning for groups under 4 speakers."""
    from mmasr.metrics.verdict import VERDICTS
    from mmasr.rescoring.fusion import run_fusion
    from tests.test_fusion import _pictured_toy, _text_prior_toy

    p = validate({})
    for toy, verdict in ((_pictured_toy, "picture_helps"), (_text_prior_toy, "text_prior")):
        nb, man, emb = toy()
        _, m, _, _ = run_fusion(nb, man, p["fusion"], p["text"], seed=0, embeddings=emb)
        write_json(full_run / "results/metrics/fusion.json", m)
        page = report.build_report(full_run, params(), "test")
        resc = section_html(page, "rescoring")
        assert m["picture_verdict"] == verdict and report.esc(VERDICTS[verdict]) in resc
        assert "Headline form <code>log_linear</code>" in resc and "fused, seed form (α = 0.05" in resc
        assert (f"<b>Fused − swapped test WER: {report.fmt(m['test_wer_fused_vs_swapped'])}</b>, paired" in resc
                and f"[{report.fmt(m['test_wer_fused_vs_swapped_ci_low'])}, "
                    f"{report.fmt(m['test_wer_fused_vs_swapped_ci_high'])}] (4 test speakers)" in resc)
        assert "<h3>Intervals per group (test)</h3>" in resc and "(2 test speakers)" in resc
        assert "Fewer than 4 test speakers in control (2), impaired (2)" in resc
        assert verdict.replace("_", " ") in section_html(page, "summary")


def test_rescoring_section_links_the_error_browser(full_run):
    resc = section_html(report.build_report(full_run, params(), "test"), "rescoring")
    assert '<a href="browser.html" id="browser-link">' in resc and "results/browser.html" in resc
