"""The workstation profile (profiles/default/config.yaml) is the one Snakemake reads by itself: as
workflow/profiles/default it was never loaded beside the root Snakefile, so its `gpu=1` did not keep the torch
jobs from running side by side (`--cores 8` on 2 cores: 38.8 minutes against 19 with `--cores 2`, issue 26)."""

import sys

import yaml

from tests.conftest import REPO, project_copy, run


def test_the_default_profile_limits_torch_jobs_to_one_at_a_time():
    profile = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert "gpu=1" in profile["resources"] and profile["cores"] == "all"
    rules = "".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    for rule in ("pretrain_demo_whisper", "pretrain_demo_clip", "nbest", "train_projector", "encode_audio"):
        body = rules[rules.index(f"rule {rule}:"):]
        body = body[: body.index("shell:")]
        assert "gpu=" in body, f"{rule} asks for no gpu: it could run beside the other torch jobs"


def test_snakemake_reads_the_default_profile_by_itself(tmp_path):
    work = project_copy(tmp_path / "p")
    proc = run([sys.executable, "-m", "snakemake", "--cores", "8", "--dry-run", "data/raw/demo"], work)
    assert "Using workflow specific profile profiles/default" in proc.stdout + proc.stderr
