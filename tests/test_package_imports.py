"""The package's import graph: no module imports one that imports it back (at module level or inside a
function: a lazy import is still a knot), and the loading code (mmasr.models) knows no pipeline phase."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The phases and the code above them; mmasr.models (loading, layers, conversion) serves them all.
PHASES = ("adapt", "clap", "cli", "demo", "pipeline", "probe", "projector", "report", "rescoring", "training")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(src: Path = SRC, package: str = "mmasr") -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (``from a.b import c`` is a.b.c where c
    is a module, else a.b; relative imports resolved)."""
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}

    def existing(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name == package or a.name.startswith(package + ".")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    parent = parent[: len(parent) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base == package or base.startswith(package + "."):
                    found |= {f"{base}.{a.name}" for a in node.names}
        graph[module] = {existing(name) for name in found} - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the graph once, as the modules along it (first module repeated at the end)."""
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))
                key = tuple(cycle[start:] + cycle[:start])
                if key not in done:
                    done.add(key)
                    cycles.append([*key, key[0]])
            elif nxt not in finished:
                visit(nxt, [*path, nxt])
        finished.add(module)

    finished: set[str] = set()
    for module in sorted(graph):
        if module not in finished:
            visit(module, [module])
    return cycles


def test_the_cycle_finder_finds_a_knot(tmp_path):
    pkg = tmp_path / "mmasr"
    (pkg / "pipeline").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def f():\n    from mmasr.pipeline.dvc_yaml import generate\n")
    (pkg / "pipeline" / "dvc_yaml.py").write_text("def g():\n    from ..cli import build_parser\n")
    (pkg / "io.py").write_text("import mmasr.cli\n")
    graph = package_imports(tmp_path)
    assert graph["mmasr.pipeline.dvc_yaml"] == {"mmasr.cli"} and graph["mmasr.io"] == {"mmasr.cli"}
    assert import_cycles(graph) == [["mmasr.cli", "mmasr.pipeline.dvc_yaml", "mmasr.cli"]]


def test_the_package_has_no_import_cycle():
    cycles = import_cycles(package_imports())
    assert not cycles, "modules that import each other (directly or round a loop):\n  " + "\n  ".join(
        " -> ".join(c) for c in cycles)


def test_dvc_yaml_does_not_import_the_command_line():
    """The DVC generator is handed the parser by `mmasr dvc-yaml` (cli.cmd_dvc_yaml); it never imports cli."""
    graph = package_imports()
    assert "mmasr.pipeline.dvc_yaml" in graph["mmasr.cli"]
    assert "mmasr.cli" not in graph["mmasr.pipeline.dvc_yaml"]


def test_the_models_layer_imports_no_phase():
    graph = package_imports()
    models = {m: deps for m, deps in graph.items() if m == "mmasr.models" or m.startswith("mmasr.models.")}
    assert {"mmasr.models.layers", "mmasr.models.loading"} <= set(models)
    bad = {m: sorted(d for d in deps if (d.split(".") + [""])[1] in PHASES) for m, deps in models.items()}
    assert not any(bad.values()), f"mmasr.models imports a phase: { {m: d for m, d in bad.items() if d} }"
    # the encoder cache (a phase) takes the frame count from the models layer, where it is defined
    assert "mmasr.models.layers" in graph["mmasr.projector.encoder_cache"]


@pytest.mark.parametrize("order", ["cli first", "dvc_yaml and layers first"])
def test_each_pair_imports_in_a_fresh_interpreter_in_either_order(order):
    first, second = (["mmasr.cli", "mmasr.projector.encoder_cache"], ["mmasr.pipeline.dvc_yaml", "mmasr.models.layers"])
    if order != "cli first":
        first, second = second, first
    code = "\n".join([
        "import importlib, sys",
        *[f"importlib.import_module({m!r})" for m in first],
        # dvc_yaml and the models layer alone pull in neither the command line nor a phase
        "loaded = sorted(m for m in sys.modules if m == 'mmasr.cli' or m.split('.')[:2] in "
        f"[['mmasr', p] for p in {list(PHASES)!r} if p != 'pipeline'])",
        "print('LOADED', ' '.join(loaded))",
        *[f"importlib.import_module({m!r})" for m in second],
        "print('OK')",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    loaded = proc.stdout.split("LOADED", 1)[1].split("\n", 1)[0].split()
    if order != "cli first":
        assert loaded == [], f"importing dvc_yaml and models.layers loaded {loaded}"
    else:
        assert "mmasr.cli" in loaded and "mmasr.projector.encoder_cache" in loaded
