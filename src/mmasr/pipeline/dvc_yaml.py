"""dvc.yaml, generated from the Snakemake workflow for the active configuration (``mmasr dvc-yaml``).

Snakemake is the one DAG definition. A forced dry run (``snakemake -n -p -F``, with the same
``--configfile`` files a run would merge over params.yaml) prints every job's inputs, outputs and shell
command; each rule whose command is an ``mmasr`` sub-command becomes a DVC stage of the same name:

- cmd: the same sub-command and options, ``--cfg JSON`` replaced by ``--params params.yaml`` (and one
  ``--params FILE`` per merged config file, merged in the same order); the job's thread count is passed as
  ``--threads`` where the rule sets MMASR_THREADS={threads} or --threads {threads} (Snakemake with
  ``--cores DVC_CORES``), so torch sums in the same order and the floats are the same; a training rule
  run on several processes (``torchrun ... -m mmasr.cli <sub-command>``, training.nproc > 1) keeps its launcher;
- params: exactly the keys the rule passes in --cfg, in each params file that sets them (a whole
  section or file where the rule passes all of it);
- deps: the source files the sub-command runs (its ``cmd_*`` function in cli.py and the cli helpers it
  calls, then the closure of their ``mmasr`` imports, read from the AST; cli.py itself is not one), the
  rule's file, and the job's inputs - a local model folder is an input, a hub id is not (common.smk
  ``model_input``);
- outs: the job's outputs; metrics JSON (results/metrics/) and CSV plot data are ``cache: false``.

The n-best runs as its one shard (0-of-1): the dry run is asked with nbest.shards = 1.
Everything is emitted in a fixed order (stages in dependency order, ties by where the rule is defined;
params sorted), so the same workflow and params give the same bytes and CI can compare.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Options that carry the parameters (Snakemake: the rule's sections as JSON; DVC: the params file) or a
# worker count (Snakemake: the job's threads, which follow --cores; DVC: a fixed number) - the only parts of
# a command the two tools may spell differently.
TRANSPORT_OPTIONS = {"--cfg", "--params", "--threads"}
CODE_PREFIXES = ("src/", "workflow/")
PARAMS_FILE = "params.yaml"
DVC_CORES = 4  # the generated stages run with the thread counts of `snakemake --cores 4`
PLOTS_FILE = "workflow/dvc_plots.yaml"  # the top-level `plots:` of dvc.yaml
COMMAND = "mmasr dvc-yaml"


# ------------------------------------------------------------------------------------------ commands and jobs

@dataclass
class Command:
    sub: str  # the mmasr sub-command
    options: dict[str, str | None] = field(default_factory=dict)  # --name -> value (None: a flag)
    positional: list[str] = field(default_factory=list)
    cfg: dict | None = None  # the --cfg JSON (Snakemake)
    env: dict[str, str] = field(default_factory=dict)  # NAME=value before the command
    params_files: list[str] = field(default_factory=list)  # every --params, in order (DVC may give several)
    launcher: list[str] = field(default_factory=list)  # `torchrun ... -m mmasr.cli` in place of `mmasr` (else empty)


LAUNCHED = ["-m", "mmasr.cli"]  # torchrun runs the mmasr command line as this module


def split_launcher(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``torchrun [options] -m mmasr.cli SUB ...`` as (``torchrun [options] -m mmasr.cli``, ``mmasr SUB ...``);
    any other command as ``([], tokens)``."""
    if tokens[:1] == ["torchrun"]:
        for i in range(1, len(tokens) - 1):
            if tokens[i:i + 2] == LAUNCHED:
                return tokens[:i + 2], ["mmasr", *tokens[i + 2:]]
    return [], tokens


def command_parts(shell: str) -> tuple[dict[str, str], list[str], list[str]]:
    """An `mmasr` command line as (environment assignments before it, its launcher - ``torchrun ... -m
    mmasr.cli`` or nothing -, its tokens from `mmasr` on); redirections after it are dropped."""
    tokens = shlex.split(shell)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    for stop in (">", "2>&1", "&>", ">>"):
        if stop in tokens:
            tokens = tokens[: tokens.index(stop)]
    launcher, tokens = split_launcher(tokens)
    assert tokens[:1] == ["mmasr"] and len(tokens) > 1, f"not an mmasr command: {shell}"
    return env, launcher, tokens


def command_tokens(shell: str) -> tuple[dict[str, str], list[str]]:
    """An `mmasr` command line as (environment assignments before it, its tokens from `mmasr` on, a
    torchrun launcher dropped); redirections after it are dropped."""
    env, _, tokens = command_parts(shell)
    return env, tokens


def parse_command(shell: str) -> Command:
    """An `mmasr` command line as sub-command, options and positionals, with the environment assignments
    before it (MMASR_THREADS=2); redirections after it are dropped. Only --params may be repeated."""
    env, launcher, tokens = command_parts(shell)
    cmd = Command(tokens[1], env=env, launcher=launcher)
    rest = tokens[2:]
    while rest:
        token = rest.pop(0)
        if token.startswith("--"):
            value = rest.pop(0) if rest and not rest[0].startswith("--") else None
            if token == "--params" and value is not None:
                cmd.params_files.append(value)
                cmd.options.setdefault(token, value)
                continue
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
    input_list: list[str] = field(default_factory=list)  # the inputs in the rule's order
    output_list: list[str] = field(default_factory=list)
    threads: int = 1


def dry_run_jobs(text: str) -> list[Job]:
    """The jobs of a dry run's printout (`snakemake -n -p`)."""
    jobs = []
    for block in re.split(r"\n\s*\n", text):
        head = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        if not head:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        inputs, outputs = split_paths(fields.get("input")), split_paths(fields.get("output"))
        jobs.append(Job(head.group(1), set(inputs), set(outputs),
                        None if not shell or shell.group(1) == "None" else shell.group(1),
                        inputs, outputs, int(fields.get("threads", "1"))))
    return jobs


def snakemake_jobs(work: Path, *extra: str, cores: int = 2) -> list[Job]:
    """Every job of a forced dry run (`snakemake -n -p -F`) in ``work``, as Snakemake prints it."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--dry-run", "--printshellcmds", "--forceall", *extra]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    jobs = dry_run_jobs(proc.stdout + "\n" + proc.stderr)
    if not jobs:
        raise RuntimeError(f"no job in the dry run's output:\n{proc.stdout[-3000:]}")
    return jobs


def split_paths(text: str | None) -> list[str]:
    return [p for p in (text or "").split(", ") if p]


def mmasr_rules(jobs: list[Job]) -> dict[str, list[Job]]:
    """Rule -> its jobs, for the rules whose shell command runs `mmasr`."""
    by_rule: dict[str, list[Job]] = {}
    for job in jobs:
        if job.shell and re.search(r"(^|\s)(mmasr|-m mmasr\.cli)\s", job.shell):
            by_rule.setdefault(job.rule, []).append(job)
    return by_rule


def rule_files(root: Path) -> dict[str, str]:
    """Rule name -> the workflow/rules/*.smk file that defines it, in the Snakefile's include order and the
    files' own order."""
    files = re.findall(r'^include:\s*"([^"]+)"', (root / "Snakefile").read_text(), re.M)
    files += [p.relative_to(root).as_posix() for p in sorted((root / "workflow/rules").glob("*.smk"))]
    found: dict[str, str] = {}
    for rel in dict.fromkeys(files):
        for name in re.findall(r"^rule (\w+):", (root / rel).read_text(), re.M):
            found.setdefault(name, rel)
    return found


# ------------------------------------------------------------------------------------------ dvc.yaml entries

def dvc_stages(root: Path) -> dict[str, dict]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert "foreach" not in stage and "matrix" not in stage, f"dvc.yaml stage {name}: expand foreach/matrix here"
    return stages


def stage_entries(stage: dict, key: str) -> list[tuple[str, dict]]:
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
    return {path: opts for key in ("outs", "metrics", "plots") for path, opts in stage_entries(stage, key)}


def leaves(tree, prefix: str = "") -> set[str]:
    """Dotted paths of a nested mapping's non-mapping values (an empty mapping is a leaf too)."""
    if isinstance(tree, dict) and tree:
        return set().union(*(leaves(v, f"{prefix}{k}.") for k, v in tree.items()))
    return {prefix[:-1]}


def dvc_param_leaves(stage: dict, params_file: Path, configfiles: Sequence[str] = ()) -> set[str]:
    """The params keys (leaves) a DVC stage declares: sections, single keys, or whole files - from
    ``params_file`` (params.yaml) or one of ``configfiles`` (paths relative to its folder)."""
    files = {PARAMS_FILE: params_file, **{name: params_file.parent / name for name in configfiles}}
    covered: set[str] = set()
    for item in stage.get("params", []) or []:
        if isinstance(item, dict):
            ((path, keys),) = item.items()
            assert path in files, f"params from {path}: only {', '.join(files)} are read by `mmasr --params`"
        else:
            path, keys = PARAMS_FILE, [item]
        raw = yaml.safe_load(files[path].read_text()) or {}
        for name in keys or list(raw):
            node = raw
            for part in name.split("."):
                assert isinstance(node, dict) and part in node, f"DVC param {name!r} is not in {path}"
                node = node[part]
            covered |= leaves(node, f"{name}.")
    return covered


def agreement_problems(jobs: list[Job], stages: dict[str, dict], params_file: Path, root: Path,
                       configfiles: Sequence[str] = ()) -> list[str]:
    """Every way dvc.yaml's stages and the Snakemake jobs disagree, one line each (empty: they agree).
    ``root``: the project folder (rule files, code deps)."""
    problems = []
    rules = mmasr_rules(jobs)
    for name in sorted(set(rules) - set(stages)):
        problems.append(f"rule {name}: no DVC stage of that name in dvc.yaml")
    for name in sorted(set(stages) - set(rules)):
        problems.append(f"DVC stage {name}: no Snakemake rule of that name runs an mmasr command")
    defined_in = rule_files(root)
    for name in sorted(set(rules) & set(stages)):
        if len(rules[name]) != 1:
            problems.append(f"rule {name}: {len(rules[name])} jobs; compare with one job per rule (nbest.shards: 1)")
            continue
        job, stage = rules[name][0], stages[name]
        snake, dvc = parse_command(job.shell), parse_command(stage["cmd"])
        if snake.sub != dvc.sub:
            problems.append(f"{name}: mmasr {snake.sub} (Snakemake) vs mmasr {dvc.sub} (DVC)")
        if snake.launcher != dvc.launcher:
            problems.append(f"{name}: launched by {shlex.join(snake.launcher) or 'mmasr'} (Snakemake) vs "
                            f"{shlex.join(dvc.launcher) or 'mmasr'} (DVC)")
        s_opts = {k: v for k, v in snake.options.items() if k not in TRANSPORT_OPTIONS}
        d_opts = {k: v for k, v in dvc.options.items() if k not in TRANSPORT_OPTIONS}
        for opt in sorted(s_opts.keys() | d_opts.keys()):
            if s_opts.get(opt, "<absent>") != d_opts.get(opt, "<absent>"):
                problems.append(f"{name}: option {opt} is {s_opts.get(opt, '<absent>')!r} (Snakemake) vs "
                                f"{d_opts.get(opt, '<absent>')!r} (DVC)")
        if sorted(snake.positional) != sorted(dvc.positional):
            problems.append(f"{name}: arguments {snake.positional} (Snakemake) vs {dvc.positional} (DVC)")
        # Torch threads change floats in the last bits: where the rule sets them (MMASR_THREADS={threads}: the
        # job's count), the DVC stage passes the same --threads (default 1).
        threads = snake.env.get("MMASR_THREADS")
        if threads is not None and dvc.options.get("--threads", "1") != threads:
            problems.append(f"{name}: MMASR_THREADS={threads} (Snakemake --cores 2) vs --threads "
                            f"{dvc.options.get('--threads', '1')} (DVC)")
        if "--params" not in dvc.options and snake.cfg is not None:
            problems.append(f"{name}: the DVC command does not read --params params.yaml")
        deps = [path for path, _ in stage_entries(stage, "deps")]
        data_deps = {p for p in deps if not p.startswith(CODE_PREFIXES)}
        for path in sorted(job.inputs - data_deps):
            problems.append(f"{name}: input {path} (Snakemake) is not a DVC dep")
        for path in sorted(data_deps - job.inputs):
            problems.append(f"{name}: DVC dep {path} is not a Snakemake input")
        if defined_in.get(name) not in deps:
            problems.append(f"{name}: DVC deps lack the rule file {defined_in.get(name)}")
        for path in deps:
            if path.startswith(CODE_PREFIXES) and not (root / path).exists():
                problems.append(f"{name}: DVC dep {path} does not exist")
        outs = set(stage_outputs(stage))
        for path in sorted(job.outputs - outs):
            problems.append(f"{name}: output {path} (Snakemake) is not a DVC out/metric/plot")
        for path in sorted(outs - job.outputs):
            problems.append(f"{name}: DVC out {path} is not a Snakemake output")
        wanted = leaves(snake.cfg) if snake.cfg else set()
        declared = dvc_param_leaves(stage, params_file, configfiles)
        for key in sorted(wanted - declared):
            problems.append(f"{name}: the rule passes {key} (--cfg) but the DVC stage does not declare it")
        for key in sorted(declared - wanted):
            problems.append(f"{name}: the DVC stage declares {key} but the rule does not pass it (--cfg)")
    return problems


# ------------------------------------------------------------------------------------------ the code a command runs

class SourceTree:
    """The ``mmasr`` package under ``src_dir`` (a project's src/), read as ASTs, never imported."""

    def __init__(self, src_dir: Path, package: str = "mmasr"):
        self.src_dir = src_dir
        self.package = package

    def module_file(self, module: str) -> Path | None:
        base = self.src_dir.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def module_name(self, path: Path) -> str:
        parts = list(path.relative_to(self.src_dir).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def is_package(self, module: str) -> bool:
        return (self.src_dir.joinpath(*module.split(".")) / "__init__.py").is_file()

    def imported(self, node: ast.AST, module: str) -> dict[str, str]:
        """Name bound -> module, for every import of this package under ``node`` (``module``: the
        importing module, for relative imports). ``from pkg import sub`` is the module pkg.sub."""
        bound: dict[str, str] = {}
        own = self.package
        for item in ast.walk(node):
            if isinstance(item, ast.Import):
                for alias in item.names:
                    if alias.name == own or alias.name.startswith(own + "."):
                        bound[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(item, ast.ImportFrom):
                base = item.module or ""
                if item.level:
                    parent = module.split(".")
                    if not self.is_package(module):
                        parent = parent[:-1]
                    parent = parent[: len(parent) - item.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if not (base == own or base.startswith(own + ".")):
                    continue
                for alias in item.names:
                    sub = f"{base}.{alias.name}"
                    bound[alias.asname or alias.name] = sub if self.module_file(sub) else base
        return bound

    def closure(self, modules: set[str]) -> set[str]:
        """The modules and, transitively, the package modules they import (anywhere in the file)."""
        seen: set[str] = set()
        todo = sorted(modules)
        while todo:
            module = todo.pop()
            path = self.module_file(module)
            if module in seen or path is None:
                continue
            seen.add(module)
            todo += sorted(set(self.imported(ast.parse(path.read_text()), module).values()) - seen)
        return seen

    def command_modules(self, function: str, cli_module: str) -> set[str]:
        """The package modules a cli function uses: its own imports, the module-level imports whose names
        it reads, and the same for the module-level functions of cli it calls, transitively."""
        tree = ast.parse(self.module_file(cli_module).read_text())
        functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        top_level = {}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top_level.update(self.imported(node, cli_module))
        modules: set[str] = set()
        seen: set[str] = set()
        todo = [function]
        while todo:
            name = todo.pop()
            if name in seen or name not in functions:
                continue
            seen.add(name)
            modules |= set(self.imported(functions[name], cli_module).values())
            for item in ast.walk(functions[name]):
                if isinstance(item, ast.Name):
                    if item.id in functions:
                        todo.append(item.id)
                    elif item.id in top_level:
                        modules.add(top_level[item.id])
        return modules

    def command_files(self, function: str, cli_module: str) -> list[str]:
        """The source files (paths relative to src_dir's parent) that the cli function runs, cli excluded."""
        modules = self.closure(self.command_modules(function, cli_module)) - {cli_module}
        return sorted(self.module_file(m).relative_to(self.src_dir.parent).as_posix() for m in modules)


def command_function(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The name of the cli function that runs ``mmasr <argv>``, as ``parser`` (the ``mmasr`` command line's,
    handed in by its caller: this module never imports mmasr.cli) dispatches it."""
    return parser.parse_args(argv).func.__name__


# ------------------------------------------------------------------------------------------ generation

@dataclass
class Stage:
    name: str
    cmd: str
    deps: list[str]
    params: list  # str (a params.yaml key) or {file: None (all of it) or [keys]}
    outs: list[tuple[str, dict]]
    metrics: list[tuple[str, dict]]


def load_params_files(root: Path, configfiles: Sequence[str]) -> dict[str, dict]:
    files = {}
    for name in (PARAMS_FILE, *configfiles):
        data = yaml.safe_load((root / name).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{name}: the top level must be a mapping of sections")
        files[name] = data
    return files


def declared_params(wanted: set[str], files: dict[str, dict]) -> list:
    """The DVC ``params:`` entries that cover exactly ``wanted``: each key in every file that sets it, as
    a whole section (or file) where the rule reads all of that file's section."""

    def names(node, prefix: str, keys: set[str]) -> list[str]:
        if isinstance(node, dict) and node:
            if leaves(node, f"{prefix}.") <= keys:
                return [prefix]
            return [n for k in sorted(node, key=str) for n in names(node[k], f"{prefix}.{k}", keys)]
        return [prefix] if prefix in keys else []

    entries: list = []
    found: set[str] = set()
    for path, raw in files.items():
        keys = {k for k in leaves(raw) if k in wanted}
        found |= keys
        if not keys:
            continue
        if raw and leaves(raw) <= keys:
            entries.append({path: None})
            continue
        listed = [n for k in sorted(raw, key=str) for n in names(raw[k], str(k), keys)]
        entries += listed if path == PARAMS_FILE else [{path: listed}]
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"{', '.join(missing)}: read by a rule but set in none of {', '.join(files)}; "
                         f"DVC can only track keys a params file sets (add them to {PARAMS_FILE})")
    return entries


def dvc_command(shell: str, threads: int, params_files: Sequence[str]) -> str:
    """The DVC stage's command for a Snakemake job's: --cfg becomes --params (each file), the thread count
    an explicit --threads where the rule passes it (MMASR_THREADS or --threads)."""
    env, launcher, tokens = command_parts(shell)
    rest, passes_threads = [], "MMASR_THREADS" in env
    it = iter(tokens[2:])
    has_cfg = False
    for token in it:
        if token in ("--cfg", "--threads"):
            value = next(it)
            has_cfg |= token == "--cfg"
            passes_threads |= token == "--threads"
            if token == "--threads" and value != str(threads):
                raise ValueError(f"--threads {value} but the job has {threads} threads: {shell}")
            continue
        rest.append(token)
    head = [*launcher, tokens[1]] if launcher else tokens[:2]
    if has_cfg:
        head += [t for f in params_files for t in ("--params", f)]
    if passes_threads:
        head += ["--threads", env.get("MMASR_THREADS", str(threads))]
    return shlex.join(head + rest)


def is_metrics(path: str) -> bool:
    return path.startswith("results/metrics/") and path.endswith(".json")


def build_stage(job: Job, rule_file: str, tree: SourceTree | None, files: dict[str, dict],
                parser: argparse.ArgumentParser) -> Stage:
    cmd = dvc_command(job.shell, job.threads, list(files))
    parsed = parse_command(job.shell)
    code = []
    if tree is not None:
        _, tokens = command_tokens(job.shell)
        code = tree.command_files(command_function(parser, tokens[1:]), f"{tree.package}.cli")
    deps = list(dict.fromkeys([*code, rule_file, *job.input_list]))
    params = declared_params(leaves(parsed.cfg), files) if parsed.cfg else []
    outs, metrics = [], []
    for path in job.output_list:
        if is_metrics(path):
            metrics.append((path, {"cache": False}))
        else:
            outs.append((path, {"cache": False} if path.endswith(".csv") else {}))
    return Stage(job.rule, cmd, deps, params, outs, metrics)


def stage_order(jobs: dict[str, Job], defined: list[str]) -> list[str]:
    """Rules in dependency order (a rule after those whose outputs it reads), ties by definition order."""
    rank = {name: i for i, name in enumerate(defined)}
    producer = {out: name for name, job in jobs.items() for out in job.outputs}
    needs = {name: {producer[i] for i in job.inputs if i in producer} - {name} for name, job in jobs.items()}
    order: list[str] = []
    while needs:
        ready = [n for n, before in needs.items() if not before - set(order)]
        if not ready:
            raise ValueError(f"a cycle among {sorted(needs)}")
        first = min(ready, key=lambda n: (rank.get(n, len(rank)), n))
        order.append(first)
        del needs[first]
    return order


def generate_stages(root: Path, configfiles: Sequence[str] = (), cores: int = DVC_CORES, *,
                    parser: argparse.ArgumentParser) -> list[Stage]:
    """The DVC stages of the Snakemake workflow in ``root`` for params.yaml with ``configfiles`` merged over it;
    ``parser``: the ``mmasr`` command line's (``mmasr.cli.build_parser()``), which names each command's function."""
    root = Path(root)
    files = load_params_files(root, configfiles)
    with tempfile.TemporaryDirectory() as tmp:
        one_shard = Path(tmp) / "one_shard.yaml"
        one_shard.write_text("nbest:\n  shards: 1\n")
        jobs = snakemake_jobs(root, "--configfile", *configfiles, str(one_shard), cores=cores)
    rules = mmasr_rules(jobs)
    for name, found in rules.items():
        if len(found) != 1:
            raise ValueError(f"rule {name}: {len(found)} jobs, a DVC stage runs one (expand it in the workflow)")
    defined = rule_files(root)
    src = root / "src"
    tree = SourceTree(src) if (src / "mmasr" / "cli.py").is_file() else None
    by_rule = {name: found[0] for name, found in rules.items()}
    return [build_stage(by_rule[name], defined[name], tree, files, parser)
            for name in stage_order(by_rule, list(defined))]


# ------------------------------------------------------------------------------------------ writing dvc.yaml

def yaml_scalar(value: str, key: bool = False) -> str:
    """``value`` as a plain YAML scalar (a mapping key with ``key``) where it reads back the same, else quoted."""
    doc = f"{value}: 1" if key else f"k: {value}"
    try:
        plain = yaml.safe_load(doc) == ({value: 1} if key else {"k": value})
    except yaml.YAMLError:
        plain = False
    if value and plain and not value.startswith(("'", '"', "*", "&", "!", "-", "?", "[", "{")):
        return value
    return json.dumps(value)


def yaml_value(value) -> str:
    """A plot option's value: a scalar, or a list of scalars in flow style."""
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return yaml_scalar(value) if "," not in value and "[" not in value else json.dumps(value)
    return json.dumps(value)


def wrap_command(cmd: str, width: int = 104) -> list[str]:
    """The command's words in lines of at most ``width`` characters, an option kept with its value."""
    units: list[str] = []
    for word in cmd.split(" "):
        if units and units[-1].startswith("--") and " " not in units[-1] and not word.startswith("--"):
            units[-1] += f" {word}"
        else:
            units.append(word)
    lines, line = [], ""
    for unit in units:
        if line and len(line) + 1 + len(unit) > width:
            lines.append(line)
            line = unit
        else:
            line = f"{line} {unit}" if line else unit
    return lines + [line]


def header(configfiles: Sequence[str]) -> str:
    command = shlex.join([*COMMAND.split(), *(["--configfile", *configfiles] if configfiles else [])])
    merged = f"{PARAMS_FILE} with {', '.join(configfiles)} merged over it" if configfiles else PARAMS_FILE
    return f"""\
# GENERATED by `{command}` from the Snakemake workflow (Snakefile, workflow/rules/*.smk) for
# {merged}. Do not edit: change the rules or the params and run it again (tests/test_dvc.py
# fails when the committed file is not what `mmasr dvc-yaml` writes for params.yaml). After switching
# models.* or merging a config file (--configfile), run it again, then `dvc repro`.
#
# One stage per rule that runs `mmasr`, of the same name, with the same sub-command and options; --cfg
# (the keys the rule passes, as JSON) becomes --params (DVC reads the params files) and params = exactly
# those keys. Where the rule sets MMASR_THREADS={{threads}} (or --threads {{threads}}), the stage passes the
# job's count under `snakemake --cores {DVC_CORES}` as --threads, so torch computes the same floats.
# deps = the source files the sub-command runs (cli.py aside: its cmd_* function's imports, closed over
# src/mmasr), the rule file, and the rule's inputs: a local model folder is one, a hub id is not.
# The n-best runs as its one shard (0-of-1); Snakemake may scatter it (nbest.shards) - same merged table.
#
# Metrics JSON and plot data CSV are `cache: false`: git versions them with dvc.lock (see .gitignore),
# DVC's cache and remote hold everything else.
"""


def render(stages: list[Stage], configfiles: Sequence[str], plots: list) -> str:
    out = [header(configfiles), "stages:"]
    for i, stage in enumerate(stages):
        if i:
            out.append("")
        out.append(f"  {stage.name}:")
        lines = wrap_command(stage.cmd)
        if len(lines) == 1:
            out.append(f"    cmd: {yaml_scalar(stage.cmd)}")
        else:
            out.append("    cmd: >-")
            out += [f"      {line}" for line in lines]
        if stage.deps:
            out.append("    deps:")
            out += [f"      - {yaml_scalar(d)}" for d in stage.deps]
        if stage.params:
            out.append("    params:")
            for item in stage.params:
                if isinstance(item, str):
                    out.append(f"      - {yaml_scalar(item)}")
                else:
                    ((path, keys),) = item.items()
                    out.append(f"      - {yaml_scalar(path)}:")
                    out += [f"          - {yaml_scalar(k)}" for k in keys or []]
        for key, entries in (("outs", stage.outs), ("metrics", stage.metrics)):
            if entries:
                out.append(f"    {key}:")
                for path, opts in entries:
                    if opts:
                        out.append(f"      - {yaml_scalar(path)}:")
                        out += [f"          {k}: {json.dumps(v)}" for k, v in opts.items()]
                    else:
                        out.append(f"      - {yaml_scalar(path)}")
    if plots:
        out += ["", f"# Plots, from {PLOTS_FILE} (those whose data the stages write): `dvc plots show` draws them",
                "# for the workspace, `dvc plots diff main` against another commit or experiment.", "plots:"]
        for plot in plots:
            ((title, opts),) = plot.items()
            out.append(f"  - {yaml_scalar(title, key=True)}:")
            for name, value in opts.items():
                if isinstance(value, dict):
                    out.append(f"      {yaml_scalar(name, key=True)}:")
                    out += [f"        {yaml_scalar(k, key=True)}: {yaml_value(v)}" for k, v in value.items()]
                else:
                    out.append(f"      {yaml_scalar(name, key=True)}: {yaml_value(value)}")
    text = "\n".join(out) + "\n"
    expected = {"stages": {s.name: stage_dict(s) for s in stages}, **({"plots": plots} if plots else {})}
    if yaml.safe_load(text) != expected:  # a quoting bug would otherwise write a dvc.yaml that means something else
        raise RuntimeError("the rendered dvc.yaml does not read back as the stages it was made from")
    return text


def stage_dict(stage: Stage) -> dict:
    """A stage as DVC reads it (for the read-back check)."""
    d: dict = {"cmd": stage.cmd}
    if stage.deps:
        d["deps"] = list(stage.deps)
    if stage.params:
        d["params"] = [p if isinstance(p, str) else {k: (list(v) if v else None) for k, v in p.items()}
                       for p in stage.params]
    for key, entries in (("outs", stage.outs), ("metrics", stage.metrics)):
        if entries:
            d[key] = [{p: dict(o)} if o else p for p, o in entries]
    return d


def plot_definitions(root: Path, outputs: set[str]) -> list:
    """The plots of PLOTS_FILE, each y restricted to the files the stages write (a plot with none is left out)."""
    path = root / PLOTS_FILE
    if not path.is_file():
        return []
    kept = []
    for plot in yaml.safe_load(path.read_text()) or []:
        ((title, opts),) = plot.items()
        ys = opts.get("y")
        if isinstance(ys, dict):
            ys = {f: cols for f, cols in ys.items() if f in outputs}
            if not ys:
                continue
            opts = {**opts, "y": ys}
        elif title not in outputs:
            continue
        kept.append({title: opts})
    return kept


def generate(root: Path, configfiles: Sequence[str] = (), *, parser: argparse.ArgumentParser) -> str:
    """dvc.yaml's text for the workflow in ``root`` and params.yaml with ``configfiles`` merged over it
    (``parser``: the ``mmasr`` command line's, see generate_stages)."""
    stages = generate_stages(root, configfiles, parser=parser)
    outputs = {p for s in stages for p, _ in (*s.outs, *s.metrics)}
    return render(stages, configfiles, plot_definitions(Path(root), outputs))


def check(root: Path, text: str, out: str = "dvc.yaml") -> list[str]:
    """The unified diff between ``root/out`` and ``text`` (empty: the file is current)."""
    path = Path(root) / out
    current = path.read_text() if path.is_file() else ""
    return list(difflib.unified_diff(current.splitlines(), text.splitlines(), f"{out} (committed)",
                                     f"{out} (generated)", lineterm=""))
