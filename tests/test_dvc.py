"""DVC: dvc.yaml against the Snakemake rules, `dvc repro` against `snakemake`, experiments, and sharing
through a remote (push, a fresh clone, pull: nothing left to do for either tool).

Both tools run the same `mmasr` commands (dvc.yaml's header): dvc.yaml is generated (`mmasr dvc-yaml`,
mmasr.pipeline.dvc_yaml) from the concrete jobs of a forced Snakemake dry run, which prints every job's
inputs, outputs and shell command. The tests check that the committed file is the generator's output for
params.yaml, and (independently of how it was written) that its stages agree with the jobs, so a rule or
stage added later (CLAP, probe, ...) is covered without editing this file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmasr.cli import build_parser
from mmasr.config import load
from mmasr.io import read_json
from mmasr.pipeline.dvc_yaml import (TRANSPORT_OPTIONS, Job, SourceTree, agreement_problems, declared_params,
                                     dvc_command, dvc_param_leaves, dvc_stages, generate, leaves, mmasr_rules,
                                     parse_command, snakemake_jobs, stage_outputs, wrap_command, yaml_scalar)
from tests.conftest import REPO, file_digest, job_counts, project_copy, run, tiny_params
from tests.test_workflow import without_timing

# The two graphs (Snakemake's jobs, dvc.yaml's stages) and the agreement check live in mmasr.pipeline.dvc_yaml,
# which generates dvc.yaml from the same jobs (`mmasr dvc-yaml`).

# ------------------------------------------------------------------------------------------ fast checks

def test_command_parser_reads_options_flags_and_environment():
    cmd = parse_command("MMASR_THREADS=2 mmasr nbest --cfg '{\"a\":{\"b\":1}}' --manifest m.parquet --quiet"
                        " --out o.parquet > log 2>&1")
    assert (cmd.sub, cmd.cfg, cmd.positional, cmd.env) == ("nbest", {"a": {"b": 1}}, [], {"MMASR_THREADS": "2"})
    assert cmd.options == {"--cfg": '{"a":{"b":1}}', "--manifest": "m.parquet", "--quiet": None, "--out": "o.parquet"}
    merge = parse_command("mmasr nbest-merge s/0-of-2.parquet s/1-of-2.parquet --out x.parquet > log 2>&1")
    assert merge.positional == ["s/0-of-2.parquet", "s/1-of-2.parquet"] and merge.options == {"--out": "x.parquet"}
    with pytest.raises(AssertionError, match="not an mmasr command"):
        parse_command("python -m something")


def test_param_leaves_cover_sections_keys_and_the_whole_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\nfusion: {tau: 2, alpha_step: 0.1}\nsplit: {speakers: {train: [], dev: []}}\nempty: {}\n")
    assert leaves({"fusion": {"tau": 2}, "seed": 1}) == {"fusion.tau", "seed"}
    assert dvc_param_leaves({"params": ["seed", "fusion.tau"]}, params) == {"seed", "fusion.tau"}
    assert dvc_param_leaves({"params": ["split"]}, params) == {"split.speakers.train", "split.speakers.dev"}
    assert dvc_param_leaves({"params": [{"params.yaml": None}]}, params) == {
        "seed", "fusion.tau", "fusion.alpha_step", "split.speakers.train", "split.speakers.dev", "empty"}
    with pytest.raises(AssertionError, match="fusion.beta"):
        dvc_param_leaves({"params": ["fusion.beta"]}, params)


def test_the_agreement_check_reports_each_kind_of_disagreement(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\nfusion: {tau: 2, alpha_step: 0.1}\n")
    job = Job("fuse", {"in.parquet"}, {"out.json"},
              "MMASR_THREADS=2 mmasr fuse --cfg '{\"fusion\":{\"tau\":2,\"alpha_step\":0.1}}' --nbest in.parquet --metrics out.json"
              " > results/logs/fuse.log 2>&1")
    good = {"cmd": "mmasr fuse --params params.yaml --threads 2 --nbest in.parquet --metrics out.json",
            "deps": ["workflow/rules/fusion.smk", "in.parquet"], "params": ["fusion"],
            "metrics": [{"out.json": {"cache": False}}]}
    assert agreement_problems([job], {"fuse": good}, params, REPO) == []
    bad = {**good, "cmd": "mmasr fuse --params params.yaml --nbest other.parquet --metrics out.json --quiet",
           "deps": ["in.parquet", "src/mmasr/nope.py"], "params": ["fusion.tau", "seed"], "metrics": [], "outs": ["x"]}
    problems = "\n".join(agreement_problems([job], {"fuse": bad, "extra": good}, params, REPO))
    for expected in ("DVC stage extra: no Snakemake rule", "option --nbest is 'in.parquet' (Snakemake) vs 'other.parquet'",
                     "option --quiet", "MMASR_THREADS=2 (Snakemake --cores 2) vs --threads 1 (DVC)", "lack the rule file workflow/rules/fusion.smk", "src/mmasr/nope.py does not exist",
                     "output out.json (Snakemake) is not a DVC out", "DVC out x is not a Snakemake output",
                     "passes fusion.alpha_step (--cfg) but the DVC stage does not declare it",
                     "declares seed but the rule does not pass it"):
        assert expected in problems, expected


def test_gitignore_keeps_uncached_outputs_in_git_and_ignores_the_rest():
    """Metrics and plot data (cache: false) are versioned by git, so a fresh clone has them and `dvc status`
    is clean after `dvc pull`; everything DVC caches, and the workflow's own state, is ignored by git."""
    cached, uncached = [], []
    for stage in dvc_stages(REPO).values():
        for path, opts in stage_outputs(stage).items():
            (uncached if opts.get("cache") is False else cached).append(path)
    probes = [*cached, *(f"{p}/x" for p in cached), "results/logs/fuse.log", "results/benchmarks/fuse.tsv",
              "results/checkpoints/demo/state/whisper/step_10/model.safetensors", ".snakemake/metadata/x",
              "results/checkpoints/projector/state/x"]
    ignored = set(subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(probes + uncached),
                                 capture_output=True, text=True).stdout.split())
    assert uncached and not set(uncached) & ignored, sorted(set(uncached) & ignored)
    assert set(probes) <= ignored, sorted(set(probes) - ignored)


def test_dvcignore_hides_snakemake_state_from_dvc(tmp_path):
    """Snakemake writes .snakemake_timestamp into directory outputs (and `snakemake --touch` after a pull
    does too): DVC must not hash it, or `dvc status` would differ between the tools."""
    work = project_copy(tmp_path / "ign")
    run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], work)
    for path in ("data/processed/audio/.snakemake_timestamp", ".snakemake/metadata/x"):
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).touch()
    proc = run([sys.executable, "-m", "dvc", "check-ignore", "data/processed/audio/.snakemake_timestamp",
                ".snakemake/metadata/x", "data/processed/audio/u1.wav"], work, check=False)
    assert proc.stdout.split() == ["data/processed/audio/.snakemake_timestamp", ".snakemake/metadata/x"], proc.stdout


def test_top_level_plots_read_stage_outputs():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outputs = {p for stage in spec["stages"].values() for p in stage_outputs(stage)}
    files = set()
    for plot in spec.get("plots", []):
        ((title, opts),) = plot.items()
        ys = opts["y"]
        files |= set(ys) if isinstance(ys, dict) else {title}
        template = opts.get("template", "linear")
        assert not template.endswith(".json") or (REPO / template).is_file(), f"{title}: no template {template}"
    assert files and files <= outputs, sorted(files - outputs)
    assert {"results/fusion/grid.csv", "results/projector/train_log.csv", "results/pretrain/whisper_loss.csv",
            "results/clap/recall_at_k.csv", "results/probe/reliability.csv"} <= files


# ------------------------------------------------------------------------------------------ the agreement

@pytest.fixture(scope="module")
def dry_project(tmp_path_factory) -> Path:
    work = project_copy(tmp_path_factory.mktemp("dry"))
    (work / "config" / "shards.yaml").write_text("nbest:\n  shards: 3\n")
    return work


def test_dvc_stages_and_snakemake_rules_agree(dry_project):
    """Same names, same `mmasr` sub-command and options, same inputs and outputs, and the DVC params cover
    exactly the keys the rule passes with --cfg. With the default params, every rule is one job."""
    assert load(dry_project / "params.yaml")["nbest"]["shards"] == 1
    problems = agreement_problems(snakemake_jobs(dry_project), dvc_stages(REPO), REPO / "params.yaml", REPO)
    assert not problems, "dvc.yaml and the Snakemake rules disagree:\n  " + "\n  ".join(problems)


def test_sharded_nbest_differs_from_the_dvc_stage_only_in_the_shard(dry_project):
    """Snakemake scatters the n-best over nbest.shards jobs; DVC runs it as its one shard (0-of-1). Every
    shard job is the DVC command with its own --shard/--num-shards/--out, and the merge gathers them all."""
    jobs = snakemake_jobs(dry_project, "--configfile", "config/shards.yaml")
    rules = mmasr_rules(jobs)
    stage = parse_command(dvc_stages(REPO)["nbest"]["cmd"])
    shard_outputs = set()
    for job in rules["nbest"]:
        cmd = parse_command(job.shell)
        (out,) = job.outputs
        shard = cmd.options["--shard"]
        assert out == f"data/nbest/shards/{shard}-of-3.parquet" and cmd.options["--num-shards"] == "3"
        assert cmd.sub == stage.sub
        assert {k: v for k, v in cmd.options.items() if k not in TRANSPORT_OPTIONS | {"--shard", "--num-shards", "--out"}} \
            == {k: v for k, v in stage.options.items() if k not in TRANSPORT_OPTIONS | {"--shard", "--num-shards", "--out"}}
        shard_outputs.add(out)
    assert len(shard_outputs) == 3
    (merge,) = rules["nbest_merge"]
    assert merge.inputs == shard_outputs == set(parse_command(merge.shell).positional)
    assert merge.outputs == set(stage_outputs(dvc_stages(REPO)["nbest_merge"]))



# ------------------------------------------------------------------------------------------ dvc.yaml is generated

def test_committed_dvc_yaml_is_what_the_generator_writes(dry_project):
    """CI's check: dvc.yaml is `mmasr dvc-yaml`'s output for params.yaml, byte for byte."""
    generated = generate(dry_project, parser=build_parser())
    assert generated == (REPO / "dvc.yaml").read_text(), (
        "dvc.yaml is not what the generator writes for params.yaml and the Snakemake rules: "
        "run `mmasr dvc-yaml` and commit dvc.yaml")
    assert generated.startswith("# GENERATED by `mmasr dvc-yaml`")
    stages = yaml.safe_load(generated)["stages"]
    nbest = stages["nbest"]
    assert "--shard 0 --num-shards 1 --out data/nbest/shards/0-of-1.parquet" in nbest["cmd"]
    assert nbest["cmd"].startswith("mmasr nbest --params params.yaml --threads 2 ")
    assert nbest["deps"][-4:] == ["data/processed/manifest.parquet", "data/processed/audio",
                                  "results/checkpoints/demo/whisper", "data/cache/encoder_states"]  # encode_audio's pass
    assert stages["preprocess"]["cmd"].startswith("mmasr preprocess --params params.yaml --threads 4 ")
    assert stages["report"]["params"] == [{"params.yaml": None}]
    assert stages["split"]["params"][:2] == ["seed", "split"] and "text.lowercase" in stages["split"]["params"]
    assert stages["fuse"]["metrics"] == [{"results/metrics/fusion.json": {"cache": False}}]
    assert {"results/fusion/grid.csv": {"cache": False}} in stages["fuse"]["outs"]
    assert "convert_whisper" not in stages  # nothing asks for the real Whisper with the default params
    # the code: the implementation modules and what they import, never cli.py
    assert {"src/mmasr/rescoring/fusion.py", "src/mmasr/rescoring/clip.py", "src/mmasr/data/text.py",
            "src/mmasr/io.py", "src/mmasr/config.py"} <= set(stages["fuse"]["deps"])
    assert not any(d.endswith("cli.py") for s in stages.values() for d in s["deps"])


def test_the_check_command_fails_on_a_stale_dvc_yaml(dry_project, tmp_path):
    work = project_copy(tmp_path / "stale")
    proc = run([sys.executable, "-m", "mmasr.cli", "dvc-yaml", "--check"], work, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dvc.yaml is current" in proc.stderr
    (work / "dvc.yaml").write_text((work / "dvc.yaml").read_text().replace("--threads 2", "--threads 3", 1))
    proc = run([sys.executable, "-m", "mmasr.cli", "dvc-yaml", "--check"], work, check=False)
    assert proc.returncode == 1
    assert "run `mmasr dvc-yaml`" in proc.stderr and "-      mmasr pretrain-whisper --params params.yaml --threads 3" in proc.stderr
    proc = run([sys.executable, "-m", "mmasr.cli", "dvc-yaml"], work)
    assert (work / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()


def test_a_hub_id_is_no_dep_and_a_local_model_folder_is_one(tmp_path):
    """Switch models.whisper to a hub id and models.clip to a local folder (a merged config file): the
    generated stages lose the Whisper dep, gain the folder, read both params files, and still agree with
    the Snakemake jobs of that configuration."""
    work = project_copy(tmp_path / "models")
    (work / "models" / "my-clip").mkdir(parents=True)
    (work / "models" / "my-clip" / "config.json").write_text("{}")
    (work / "config" / "models.yaml").write_text(
        "models:\n  whisper: openai/whisper-tiny.en\n  clip: models/my-clip\n")
    text = generate(work, ["config/models.yaml"], parser=build_parser())
    stages = yaml.safe_load(text)["stages"]
    assert text.startswith("# GENERATED by `mmasr dvc-yaml --configfile config/models.yaml`")
    all_deps = {d for s in stages.values() for d in s["deps"]}
    assert "openai/whisper-tiny.en" not in all_deps
    assert stages["nbest"]["deps"][-3:] == ["data/processed/manifest.parquet", "data/processed/audio",
                                            "data/cache/encoder_states"]  # encode_audio's pass, no model folder
    assert stages["cache_image_embeddings"]["deps"][-1] == "models/my-clip"
    assert stages["clip_text_scores"]["deps"][-1] == "models/my-clip"
    assert stages["nbest"]["cmd"].startswith("mmasr nbest --params params.yaml --params config/models.yaml --threads 2 ")
    assert {"config/models.yaml": ["models.whisper"]} in stages["nbest"]["params"]
    assert "models.whisper" in stages["nbest"]["params"]  # params.yaml's value is tracked too
    # the demo CLIP is no longer asked for; the demo Whisper still is (models.audio_encoder names it)
    assert "pretrain_demo_clip" not in stages and "pretrain_demo_whisper" in stages
    jobs = snakemake_jobs(work, "--configfile", "config/models.yaml")
    problems = agreement_problems(jobs, stages, work / "params.yaml", work, ["config/models.yaml"])
    assert not problems, "\n  ".join(problems)
    # the command reads the two files merged, as Snakemake does
    assert load([work / "params.yaml", work / "config/models.yaml"])["models"]["whisper"] == "openai/whisper-tiny.en"


def test_the_real_whisper_config_gets_the_convert_whisper_stage(tmp_path):
    """config/real_whisper.yaml names the converted tiny.en folder: its rule (convert_whisper) becomes a stage,
    and the stages that load it depend on its output."""
    work = project_copy(tmp_path / "real")
    stages = yaml.safe_load(generate(work, ["config/real_whisper.yaml"], parser=build_parser()))["stages"]
    convert = stages["convert_whisper"]
    assert convert["cmd"] == "mmasr convert-whisper --out results/checkpoints/whisper-tiny.en"
    assert convert["outs"] == ["results/checkpoints/whisper-tiny.en"] and "params" not in convert
    assert "src/mmasr/models/whisper_convert.py" in convert["deps"] and "workflow/rules/convert.smk" in convert["deps"]
    for name in ("nbest", "encode_audio"):
        assert "results/checkpoints/whisper-tiny.en" in stages[name]["deps"], name
    # one encoder pass (models.whisper is models.audio_encoder): the probe and CLAP read encode_audio's pooled states
    assert "data/cache/encoder_pooled.safetensors" in stages["encode_audio"]["outs"]
    for name in ("clap_embeddings", "layer_embeddings"):
        assert "data/cache/encoder_pooled.safetensors" in stages[name]["deps"], name
        assert "results/checkpoints/whisper-tiny.en" not in stages[name]["deps"], name
    assert "pretrain_demo_whisper" not in stages
    assert list(stages).index("convert_whisper") < list(stages).index("nbest")


def test_training_on_several_processes_launches_the_trainers_under_torchrun(tmp_path):
    """training.nproc: 2 (a merged config file): train_projector and train_clap run `torchrun ... -m mmasr.cli`
    with twice their threads and GPUs, the DVC stages keep that launcher, and both graphs still agree."""
    work = project_copy(tmp_path / "nproc")
    (work / "config" / "nproc.yaml").write_text("training:\n  nproc: 2\n")
    stages = yaml.safe_load(generate(work, ["config/nproc.yaml"], parser=build_parser()))["stages"]
    launcher = "torchrun --standalone --nproc_per_node 2 -m mmasr.cli"
    assert stages["train_projector"]["cmd"].startswith(
        f"{launcher} train-projector --params params.yaml --params config/nproc.yaml --threads 4 --features ")
    assert stages["train_clap"]["cmd"].startswith(f"{launcher} train-clap --params params.yaml --params config/nproc.yaml "
                                                  "--threads 2 --cache ")
    assert "src/mmasr/training/distributed.py" in stages["train_clap"]["deps"]
    assert all(s["cmd"].startswith("mmasr ") for name, s in stages.items() if name not in ("train_projector", "train_clap"))
    jobs = snakemake_jobs(work, "--configfile", "config/nproc.yaml", cores=4)
    assert not agreement_problems(jobs, stages, work / "params.yaml", work, ["config/nproc.yaml"])
    # a DVC stage launched otherwise than the rule is a disagreement
    plain = {**stages, "train_clap": {**stages["train_clap"], "cmd": stages["train_clap"]["cmd"].replace(f"{launcher} ", "mmasr ")}}
    assert agreement_problems(jobs, plain, work / "params.yaml", work, ["config/nproc.yaml"]) == [
        f"train_clap: launched by {launcher} (Snakemake) vs mmasr (DVC)"]


def test_declared_params_are_exactly_the_keys_in_each_file():
    files = {"params.yaml": {"seed": 1, "text": {"a": 1, "b": 2}, "pretrain": {"x": {"lr": 1}, "y": {"lr": 2}}},
             "config/o.yaml": {"text": {"a": 5}}}
    assert declared_params({"seed", "text.a", "pretrain.x.lr"}, files) == [
        "pretrain.x", "seed", "text.a", {"config/o.yaml": None}]
    assert declared_params({"text.a", "text.b"}, files) == ["text", {"config/o.yaml": None}]
    assert declared_params({"text.b"}, files) == ["text.b"]
    assert declared_params({"seed", "text.a", "text.b", "pretrain.x.lr", "pretrain.y.lr"}, {"params.yaml": files["params.yaml"]}) \
        == [{"params.yaml": None}]
    with pytest.raises(ValueError, match="text.c: read by a rule but set in none of params.yaml, config/o.yaml"):
        declared_params({"text.c"}, files)


def test_the_command_reads_params_files_and_keeps_the_job_threads():
    shell = "MMASR_THREADS=2 mmasr nbest --cfg '{\"a\":1}' --manifest m.parquet --quiet > log 2>&1"
    assert dvc_command(shell, 2, ["params.yaml", "config/o.yaml"]) == \
        "mmasr nbest --params params.yaml --params config/o.yaml --threads 2 --manifest m.parquet --quiet"
    assert dvc_command("mmasr preprocess --cfg '{}' --threads 4 --out x > log", 4, ["params.yaml"]) == \
        "mmasr preprocess --params params.yaml --threads 4 --out x"
    assert dvc_command("mmasr nbest-merge a b --out c > log 2>&1", 1, ["params.yaml"]) == "mmasr nbest-merge a b --out c"
    parsed = parse_command("mmasr nbest --params params.yaml --params config/o.yaml --threads 2")
    assert parsed.params_files == ["params.yaml", "config/o.yaml"] and parsed.options["--params"] == "params.yaml"
    # several processes: torchrun runs the same command line as a module, and DVC's command keeps the launcher
    shell = "MMASR_THREADS=4 torchrun --standalone --nproc_per_node 2 -m mmasr.cli train-clap --cfg '{}' --quiet > log"
    assert dvc_command(shell, 4, ["params.yaml"]) == \
        "torchrun --standalone --nproc_per_node 2 -m mmasr.cli train-clap --params params.yaml --threads 4 --quiet"
    parsed = parse_command(shell)
    assert parsed.sub == "train-clap" and parsed.launcher == shell.split()[1:7] and parsed.env == {"MMASR_THREADS": "4"}
    assert parse_command("mmasr train-clap --quiet").launcher == []
    assert list(mmasr_rules([Job("train_clap", set(), set(), shell), Job("x", set(), set(), "torchrun other.py")])) \
        == ["train_clap"]
    assert wrap_command("mmasr x --aa 1 --bb 22 --flag --cc 3", width=16) == ["mmasr x --aa 1", "--bb 22 --flag", "--cc 3"]
    assert [yaml_scalar(v) for v in ("data/x.parquet", "a: b", "null", "#x", "/m/my model")] == [
        "data/x.parquet", '"a: b"', '"null"', '"#x"', "/m/my model"]


def test_code_deps_are_the_import_closure_of_the_command(tmp_path):
    pkg = tmp_path / "src" / "mmasr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "io.py").write_text("import json\n")
    (pkg / "sub" / "impl.py").write_text("from mmasr.io import x\nfrom . import helper\n")
    (pkg / "sub" / "helper.py").write_text("def f():\n    from mmasr.sub import deep\n")
    (pkg / "sub" / "deep.py").write_text("")
    (pkg / "unused.py").write_text("")
    (pkg / "cli.py").write_text("from mmasr import __version__\nfrom mmasr.io import x\n"
                                "def _helper():\n    return __version__\n"
                                "def cmd_a(args):\n    from mmasr.sub.impl import run\n    _helper()\n"
                                "def cmd_b(args):\n    x()\n")
    tree = SourceTree(tmp_path / "src")
    assert tree.command_files("cmd_a", "mmasr.cli") == [
        "src/mmasr/__init__.py", "src/mmasr/io.py", "src/mmasr/sub/deep.py", "src/mmasr/sub/helper.py",
        "src/mmasr/sub/impl.py"]
    assert tree.command_files("cmd_b", "mmasr.cli") == ["src/mmasr/io.py"]

# ------------------------------------------------------------------------------------------ DVC runs (slow)

def dvc(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], work, check)


def git(work: Path, *args: str) -> str:
    return run(["git", *args], work).stdout


def dvc_project(dest: Path) -> Path:
    """A user's clone of the project (git + DVC, with .gitignore and .dvc/config) on the tiny params."""
    work = project_copy(dest)
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    (work / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, work / ".dvc" / name)
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(work), sort_keys=False))
    git(work, "init", "-q")
    git(work, "config", "user.name", "mmasr tests")
    git(work, "config", "user.email", "tests@mmasr.invalid")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "the project on the tiny params")
    return work


def ran_stages(output: str) -> list[str]:
    return re.findall(r"^Running stage '(\w+)'", output, re.M)


def uncached_outputs() -> set[str]:
    return {path for stage in dvc_stages(REPO).values() for path, opts in stage_outputs(stage).items()
            if opts.get("cache") is False}


@dataclass
class ReproRun:
    work: Path
    output: str  # what `dvc repro` printed
    untracked: set[str]  # what git saw as new after it


@pytest.fixture(scope="module")
def dvc_repro(tmp_path_factory) -> ReproRun:
    """`dvc repro` of the tiny config from scratch, then committed (dvc.lock, metrics, plot data) as a user would."""
    work = dvc_project(tmp_path_factory.mktemp("dvc") / "repo")
    proc = dvc(work, "repro")
    untracked = {line[3:] for line in git(work, "status", "--porcelain", "--untracked-files=all").splitlines()}
    git(work, "add", "-A")
    git(work, "commit", "-qm", "dvc repro")
    return ReproRun(work, proc.stdout + proc.stderr, untracked)


def clone_of(run_: ReproRun, dest: Path) -> Path:
    shutil.copytree(run_.work, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_git_gets_the_metrics(dvc_repro):
    assert sorted(ran_stages(dvc_repro.output)) == sorted(dvc_stages(REPO)), dvc_repro.output[-3000:]
    # git sees exactly dvc.lock and the uncached outputs; everything DVC caches is ignored (no stray .gitignore)
    assert dvc_repro.untracked == {"dvc.lock"} | uncached_outputs()
    assert "Data and pipelines are up to date." in dvc(dvc_repro.work, "status").stdout


@pytest.mark.slow
def test_dvc_repro_writes_the_same_metrics_as_snakemake(dvc_repro, tiny_run):
    names = sorted(p.name for p in (tiny_run / "results/metrics").glob("*.json"))
    assert names == sorted(p.name for p in (dvc_repro.work / "results/metrics").glob("*.json"))
    assert {"preprocess.json", "split.json", "fusion.json", "projector.json", "pretrain_whisper.json"} <= set(names)
    for name in names:
        snake, dvc_ = (without_timing(read_json(d / "results/metrics" / name)) for d in (tiny_run, dvc_repro.work))
        diff = {k: (snake.get(k), dvc_.get(k)) for k in sorted(snake.keys() | dvc_.keys()) if snake.get(k) != dvc_.get(k)}
        assert not diff, f"results/metrics/{name}: snakemake vs dvc repro differ: {diff}"
    whisper = read_json(tiny_run / "results/metrics/pretrain_whisper.json")
    assert set(whisper) - set(without_timing(whisper)) == {"whisper_train_seconds"}  # only timings are left out
    # the project's same-seed-same-bytes check (tests/test_workflow.py::test_another_seed_makes_another_corpus)
    for rel in ("data/processed/manifest.parquet", "data/processed/rejects.parquet", "data/nbest/nbest.parquet",
                "results/fusion/grid.csv", "results/fusion/per_speaker.csv", "results/projector/train_log.csv",
                "results/metrics/preprocess.json"):
        assert file_digest(tiny_run / rel) == file_digest(dvc_repro.work / rel), rel


@pytest.mark.slow
def test_exp_run_with_another_tau_reruns_only_fusion_and_what_reads_it(dvc_repro, tmp_path):
    work = clone_of(dvc_repro, tmp_path / "exp")
    before = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    proc = dvc(work, "exp", "run", "-S", "fusion.tau=50")
    # the systems table, the report, the scoring formats and the error browser read fusion.json
    assert sorted(ran_stages(proc.stdout + proc.stderr)) == ["browser", "fuse", "report", "scoring", "systems_table"], \
        proc.stdout[-3000:]
    after = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert {name for name in before if before[name] != after[name]} == {"browser", "fuse", "report", "scoring",
                                                                        "systems_table"}
    assert read_json(work / "results/metrics/fusion.json")["tau"] == 50.0
    diff = json.loads(dvc(work, "metrics", "diff", "--json").stdout)
    assert diff["results/metrics/fusion.json"]["tau"] == {"old": 100.0, "new": 50.0, "diff": -50.0}


@pytest.mark.slow
def test_push_clone_pull_leaves_nothing_to_do(dvc_repro, tmp_path):
    """Share through a (local) remote; a fresh clone pulls it and neither tool has anything to do. DVC does
    not keep modification times, so after `dvc pull` Snakemake sees inputs newer than outputs:
    `snakemake --touch --forceall` (docs/dvc.md) marks the pulled outputs up to date and records Snakemake's
    metadata, so a later params change still re-runs exactly the jobs that read it."""
    work = clone_of(dvc_repro, tmp_path / "origin")
    dvc(work, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(work, "commit", "-qam", "DVC remote")
    assert "files pushed" in dvc(work, "push").stdout
    run(["git", "clone", "-q", str(work), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    assert not (clone / "data").exists() and (clone / "results/metrics/fusion.json").is_file()  # git has the metrics
    dvc(clone, "pull")
    assert "Data and pipelines are up to date." in dvc(clone, "status").stdout
    for rel in ("data/processed/manifest.parquet", "results/report.html", "results/metrics/fusion.json"):
        assert file_digest(clone / rel) == file_digest(dvc_repro.work / rel), rel
    run([sys.executable, "-m", "snakemake", "--touch", "--forceall"], clone)
    proc = run([sys.executable, "-m", "snakemake", "--cores", "2", "-n"], clone)
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out and "missing provenance" not in out, out[-2000:]
    assert "Data and pipelines are up to date." in dvc(clone, "status").stdout  # .snakemake_timestamp is dvcignored
    assert git(clone, "status", "--porcelain") == ""
    (clone / "config" / "tau.yaml").write_text("fusion:\n  tau: 50.0\n")
    proc = run([sys.executable, "-m", "snakemake", "--cores", "2", "-n", "--configfile", "config/tau.yaml"], clone)
    assert job_counts(proc.stdout + proc.stderr) == {"fuse": 1, "scoring": 1, "browser": 1, "systems_table": 1,
                                                      "report": 1, "all": 1}
