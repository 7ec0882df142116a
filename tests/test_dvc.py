"""DVC: dvc.yaml against the Snakemake rules, `dvc repro` against `snakemake`, experiments, and sharing
through a remote (push, a fresh clone, pull: nothing left to do for either tool).

Both tools run the same `mmasr` commands (dvc.yaml's header): the agreement test reads the concrete jobs
from Snakemake itself (a forced dry run prints every job's inputs, outputs and shell command) and the
stages from dvc.yaml, so a rule or stage added later (CLAP, probe, ...) is covered without editing this file.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mmasr.config import load
from mmasr.io import read_json
from tests.conftest import REPO, file_digest, job_counts, project_copy, run, tiny_params
from tests.test_workflow import without_timing

# ------------------------------------------------------------------------------------------ the two graphs

# Options that carry the parameters (Snakemake: the rule's sections as JSON; DVC: the params file) or a
# worker count (Snakemake: the job's threads, which follow --cores; DVC: a fixed number) - the only parts of
# a command the two tools may spell differently.
TRANSPORT_OPTIONS = {"--cfg", "--params", "--threads"}
CODE_PREFIXES = ("src/", "workflow/")


@dataclass
class Command:
    sub: str  # the mmasr sub-command
    options: dict[str, str | None] = field(default_factory=dict)  # --name -> value (None: a flag)
    positional: list[str] = field(default_factory=list)
    cfg: dict | None = None  # the --cfg JSON (Snakemake)
    env: dict[str, str] = field(default_factory=dict)  # NAME=value before the command


def parse_command(shell: str) -> Command:
    """An `mmasr` command line as sub-command, options and positionals, with the environment assignments
    before it (MMASR_THREADS=2); redirections after it are dropped."""
    tokens = shlex.split(shell)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    for stop in (">", "2>&1", "&>", ">>"):
        if stop in tokens:
            tokens = tokens[: tokens.index(stop)]
    assert tokens[:1] == ["mmasr"] and len(tokens) > 1, f"not an mmasr command: {shell}"
    cmd = Command(tokens[1], env=env)
    rest = tokens[2:]
    while rest:
        token = rest.pop(0)
        if token.startswith("--"):
            value = rest.pop(0) if rest and not rest[0].startswith("--") else None
            assert token not in cmd.options, f"{token} given twice in: {shell}"
            cmd.options[token] = value
        else:
            cmd.positional.append(token)
    if "--cfg" in cmd.options:
        cmd.cfg = json.loads(cmd.options["--cfg"])
    return cmd


@dataclass
class Job:
    rule: str
    inputs: set[str]
    outputs: set[str]
    shell: str | None


def snakemake_jobs(work: Path, *extra: str) -> list[Job]:
    """Every job of a forced dry run (`snakemake -n -p -F`), as Snakemake prints it."""
    proc = run([sys.executable, "-m", "snakemake", "--cores", "2", "--dry-run", "--printshellcmds", "--forceall",
                *extra], work)
    jobs = []
    for block in re.split(r"\n\s*\n", proc.stdout + "\n" + proc.stderr):
        head = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        if not head:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append(Job(head.group(1), set(_paths(fields.get("input"))), set(_paths(fields.get("output"))),
                        None if not shell or shell.group(1) == "None" else shell.group(1)))
    assert jobs, proc.stdout[-3000:]
    return jobs


def _paths(text: str | None) -> list[str]:
    return [p for p in (text or "").split(", ") if p]


def mmasr_rules(jobs: list[Job]) -> dict[str, list[Job]]:
    by_rule: dict[str, list[Job]] = {}
    for job in jobs:
        if job.shell and re.search(r"(^|\s)mmasr\s", job.shell):
            by_rule.setdefault(job.rule, []).append(job)
    return by_rule


def dvc_stages(root: Path = REPO) -> dict[str, dict]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert "foreach" not in stage and "matrix" not in stage, f"dvc.yaml stage {name}: expand foreach/matrix here"
    return stages


def _entries(stage: dict, key: str) -> list[tuple[str, dict]]:
    """A stage's outs/metrics/plots/deps entries as (path, options)."""
    out = []
    for item in stage.get(key, []) or []:
        if isinstance(item, dict):
            ((path, opts),) = item.items()
            out.append((path, opts or {}))
        else:
            out.append((item, {}))
    return out


def stage_outputs(stage: dict) -> dict[str, dict]:
    return {path: opts for key in ("outs", "metrics", "plots") for path, opts in _entries(stage, key)}


def leaves(tree, prefix: str = "") -> set[str]:
    """Dotted paths of a nested mapping's non-mapping values (an empty mapping is a leaf too)."""
    if isinstance(tree, dict) and tree:
        return set().union(*(leaves(v, f"{prefix}{k}.") for k, v in tree.items()))
    return {prefix[:-1]}


def dvc_param_leaves(stage: dict, params_file: Path) -> set[str]:
    """The params.yaml keys (leaves) a DVC stage declares: sections, single keys, or the whole file."""
    raw = yaml.safe_load(params_file.read_text())
    covered: set[str] = set()
    for item in stage.get("params", []) or []:
        if isinstance(item, dict):
            ((path, keys),) = item.items()
            assert path == "params.yaml", f"params from {path}: only params.yaml is read by `mmasr --params`"
            names = keys or list(raw)
        else:
            names = [item]
        for name in names:
            node = raw
            for part in name.split("."):
                assert isinstance(node, dict) and part in node, f"DVC param {name!r} is not in params.yaml"
                node = node[part]
            covered |= leaves(node, f"{name}.")
    return covered


def rule_files() -> dict[str, str]:
    """Rule name -> the workflow/rules/*.smk file that defines it."""
    found = {}
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        for name in re.findall(r"^rule (\w+):", path.read_text(), re.M):
            found[name] = path.relative_to(REPO).as_posix()
    return found


def agreement_problems(jobs: list[Job], stages: dict[str, dict], params_file: Path) -> list[str]:
    """Every way dvc.yaml and the Snakemake jobs disagree, one line each (empty: they agree)."""
    problems = []
    rules = mmasr_rules(jobs)
    for name in sorted(set(rules) - set(stages)):
        problems.append(f"rule {name}: no DVC stage of that name in dvc.yaml")
    for name in sorted(set(stages) - set(rules)):
        problems.append(f"DVC stage {name}: no Snakemake rule of that name runs an mmasr command")
    defined_in = rule_files()
    for name in sorted(set(rules) & set(stages)):
        if len(rules[name]) != 1:
            problems.append(f"rule {name}: {len(rules[name])} jobs; compare with one job per rule (nbest.shards: 1)")
            continue
        job, stage = rules[name][0], stages[name]
        snake, dvc = parse_command(job.shell), parse_command(stage["cmd"])
        if snake.sub != dvc.sub:
            problems.append(f"{name}: mmasr {snake.sub} (Snakemake) vs mmasr {dvc.sub} (DVC)")
        s_opts = {k: v for k, v in snake.options.items() if k not in TRANSPORT_OPTIONS}
        d_opts = {k: v for k, v in dvc.options.items() if k not in TRANSPORT_OPTIONS}
        for opt in sorted(s_opts.keys() | d_opts.keys()):
            if s_opts.get(opt, "<absent>") != d_opts.get(opt, "<absent>"):
                problems.append(f"{name}: option {opt} is {s_opts.get(opt, '<absent>')!r} (Snakemake) vs "
                                f"{d_opts.get(opt, '<absent>')!r} (DVC)")
        if sorted(snake.positional) != sorted(dvc.positional):
            problems.append(f"{name}: arguments {snake.positional} (Snakemake) vs {dvc.positional} (DVC)")
        # Torch threads change floats in the last bits: where the rule sets them (MMASR_THREADS={threads}; with
        # --cores 2, as here, the job's count), the DVC stage passes the same --threads (default 1).
        threads = snake.env.get("MMASR_THREADS")
        if threads is not None and dvc.options.get("--threads", "1") != threads:
            problems.append(f"{name}: MMASR_THREADS={threads} (Snakemake --cores 2) vs --threads "
                            f"{dvc.options.get('--threads', '1')} (DVC)")
        if "--params" not in dvc.options and snake.cfg is not None:
            problems.append(f"{name}: the DVC command does not read --params params.yaml")
        deps = [path for path, _ in _entries(stage, "deps")]
        data_deps = {p for p in deps if not p.startswith(CODE_PREFIXES)}
        for path in sorted(job.inputs - data_deps):
            problems.append(f"{name}: input {path} (Snakemake) is not a DVC dep")
        for path in sorted(data_deps - job.inputs):
            problems.append(f"{name}: DVC dep {path} is not a Snakemake input")
        if defined_in.get(name) not in deps:
            problems.append(f"{name}: DVC deps lack the rule file {defined_in.get(name)}")
        for path in deps:
            if path.startswith(CODE_PREFIXES) and not (REPO / path).exists():
                problems.append(f"{name}: DVC dep {path} does not exist")
        outs = set(stage_outputs(stage))
        for path in sorted(job.outputs - outs):
            problems.append(f"{name}: output {path} (Snakemake) is not a DVC out/metric/plot")
        for path in sorted(outs - job.outputs):
            problems.append(f"{name}: DVC out {path} is not a Snakemake output")
        wanted = leaves(snake.cfg) if snake.cfg else set()
        declared = dvc_param_leaves(stage, params_file)
        for key in sorted(wanted - declared):
            problems.append(f"{name}: the rule passes {key} (--cfg) but the DVC stage does not declare it")
        for key in sorted(declared - wanted):
            problems.append(f"{name}: the DVC stage declares {key} but the rule does not pass it (--cfg)")
    return problems


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
    assert agreement_problems([job], {"fuse": good}, params) == []
    bad = {**good, "cmd": "mmasr fuse --params params.yaml --nbest other.parquet --metrics out.json --quiet",
           "deps": ["in.parquet", "src/mmasr/nope.py"], "params": ["fusion.tau", "seed"], "metrics": [], "outs": ["x"]}
    problems = "\n".join(agreement_problems([job], {"fuse": bad, "extra": good}, params))
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
    for stage in dvc_stages().values():
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
    problems = agreement_problems(snakemake_jobs(dry_project), dvc_stages(), REPO / "params.yaml")
    assert not problems, "dvc.yaml and the Snakemake rules disagree:\n  " + "\n  ".join(problems)


def test_sharded_nbest_differs_from_the_dvc_stage_only_in_the_shard(dry_project):
    """Snakemake scatters the n-best over nbest.shards jobs; DVC runs it as its one shard (0-of-1). Every
    shard job is the DVC command with its own --shard/--num-shards/--out, and the merge gathers them all."""
    jobs = snakemake_jobs(dry_project, "--configfile", "config/shards.yaml")
    rules = mmasr_rules(jobs)
    stage = parse_command(dvc_stages()["nbest"]["cmd"])
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
    assert merge.outputs == set(stage_outputs(dvc_stages()["nbest_merge"]))


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
    return {path for stage in dvc_stages().values() for path, opts in stage_outputs(stage).items()
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
    assert sorted(ran_stages(dvc_repro.output)) == sorted(dvc_stages()), dvc_repro.output[-3000:]
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
    for rel in ("data/processed/manifest.parquet", "data/nbest/nbest.parquet", "results/fusion/grid.csv",
                "results/fusion/per_speaker.csv", "results/projector/train_log.csv"):
        assert file_digest(tiny_run / rel) == file_digest(dvc_repro.work / rel), rel


@pytest.mark.slow
def test_exp_run_with_another_tau_reruns_only_fuse_and_report(dvc_repro, tmp_path):
    work = clone_of(dvc_repro, tmp_path / "exp")
    before = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    proc = dvc(work, "exp", "run", "-S", "fusion.tau=50")
    assert sorted(ran_stages(proc.stdout + proc.stderr)) == ["fuse", "report"], proc.stdout[-3000:]
    after = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert {name for name in before if before[name] != after[name]} == {"fuse", "report"}
    assert read_json(work / "results/metrics/fusion.json")["tau"] == 50.0
    diff = json.loads(dvc(work, "metrics", "diff", "--json").stdout)
    assert diff["results/metrics/fusion.json"]["tau"] == {"old": 100.0, "new": 50.0, "diff": -50.0}


@pytest.mark.slow
def test_push_clone_pull_leaves_nothing_to_do(dvc_repro, tmp_path):
    """Share through a (local) remote; a fresh clone pulls it and neither tool has anything to do. DVC does
    not keep modification times, so after `dvc pull` Snakemake sees inputs newer than outputs:
    `snakemake --touch --forceall` (README) marks the pulled outputs up to date and records Snakemake's
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
    assert job_counts(proc.stdout + proc.stderr) == {"fuse": 1, "report": 1, "all": 1}
