"""The documentation holds together: every relative link in README.md and docs/ (and data/README.md) reaches
a file, and a heading there when it names one; the README fits on a few screens; and every command its
quick start quotes exists (run.sh, the programs it runs, their sub-commands and options, the files named)."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The pages whose links are checked: the README, everything in docs/, and data/README.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "data" / "README.md"]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks and HTML comments, inline code spans blanked
    (``blank_code``; a heading keeps them: they are part of its anchor)."""
    out, fence = [], None
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for number, line in enumerate(text.split("\n"), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            continue
        out.append((number, re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (markup dropped: code spans keep their content, links their
    text), lower-cased, every character but letters, digits, '_', '-' and spaces removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a markdown file defines: each heading's slug (a repeated slug gets -1, -2, ... as on
    GitHub) and explicit <a name/id> anchors."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        found |= set(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image in the file's prose, inline or as a reference definition."""
    text = path.read_text(encoding="utf-8")
    out = []
    lines = dict(prose_lines(text))
    # inline links may wrap across lines: search the prose joined, then map offsets back to line numbers
    numbers = sorted(lines)
    joined = "\n".join(lines[n] for n in numbers)
    starts = [0]
    for n in numbers[:-1]:
        starts.append(starts[-1] + len(lines[n]) + 1)
    for match in INLINE_LINK.finditer(joined):
        index = max(i for i, s in enumerate(starts) if s <= match.start())
        out.append((numbers[index], match.group(2)))
    for number in numbers:
        ref = REFERENCE_DEF.match(lines[number])
        if ref:
            out.append((number, ref.group(1)))
    return out


def link_problems(files: list[Path], root: Path = ROOT) -> list[str]:
    """Every relative link (and same-page anchor) that does not resolve: a missing file, a path out of the
    project, or an anchor that no heading of the target markdown file has."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for path in files:
        for number, target in links(path):
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not target or SCHEME.match(target) or target.startswith("//"):
                if not target:
                    problems.append(f"{where}: empty link")
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path.resolve()
            if not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}: points outside the project")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where}: an anchor into a file that is not markdown")
                elif anchor not in cache.setdefault(dest, anchors(dest)):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def section(text: str, title: str) -> str:
    """A level-2 section of a markdown page, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def fenced_commands(text: str) -> list[list[str]]:
    """The commands in a section's fenced code blocks, as shell words, comments dropped."""
    commands, inside = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            inside = not inside
            continue
        if inside and line.strip():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def environment_programs() -> set[str]:
    """What run.sh's environment puts on PATH: the project's scripts and its (and its test extra's) packages."""
    project = pyproject()["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    return names | set(project["scripts"]) | {"python"}


def command_problems(words: list[str], root: Path = ROOT) -> list[str]:
    """Why a quick-start command would not run as written (empty: it would)."""
    shown = shlex.join(words)
    if words[0] == "./run.sh":
        script = root / "run.sh"
        if not script.is_file() or not os.access(script, os.X_OK):
            return [f"{shown}: ./run.sh is not an executable file"]
        words = words[1:]
        if not words:
            return [f"{shown}: run.sh needs a command"]
    program, args = words[0], words[1:]
    if program not in environment_programs():
        return [f"{shown}: {program} is neither a script nor a dependency of the project (pyproject.toml)"]
    try:
        if program == "mmasr":
            from mmasr.cli import build_parser

            parsed = build_parser().parse_args(args)
            files = [v for v in vars(parsed).values() if isinstance(v, Path) and v.suffix in (".yaml", ".yml")]
        elif program == "snakemake":
            from snakemake.cli import get_argument_parser

            parsed = get_argument_parser().parse_args(args)
            if not (root / "Snakefile").is_file():
                return [f"{shown}: no Snakefile"]
            files = [Path(f) for f in (parsed.configfile or [])]
            files += [Path(parsed.workflow_profile)] if getattr(parsed, "workflow_profile", None) else []
        elif program == "pytest":
            import pytest as _pytest  # noqa: F401  the test extra's pytest

            markers = {m.split(":")[0].strip() for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
            files, it = [], iter(args)
            for arg in it:
                if arg == "-m":
                    names = set(re.findall(r"[A-Za-z_]\w*", next(it))) - {"not", "and", "or"}
                    if names - markers:
                        return [f"{shown}: undeclared pytest marker(s) {sorted(names - markers)}"]
                elif not arg.startswith("-"):
                    files.append(Path(arg.split("::")[0]))
        else:
            files = [Path(a) for a in args if "/" in a and not a.startswith("-")]
    except SystemExit:
        return [f"{shown}: {program} does not accept these arguments"]
    return [f"{shown}: no such file {f}" for f in files if not (root / f).exists()]


# ------------------------------------------------------------------------------------------ the checker itself

def test_the_link_check_finds_missing_files_anchors_and_escapes(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("[up](../README.md#the-demos-models)\n")
    (tmp_path / "run.sh").write_text("")
    (tmp_path / "README.md").write_text(
        "# Title\n\n## The demo's models\n\n## Real Whisper: `config/real_whisper.yaml`\n\n## Notes\n\n## Notes\n\n"
        "[ok](docs/a.md#a-b) [ok](#the-demos-models) [ok](#real-whisper-configreal_whisperyaml) [ok](#notes-1)\n"
        "[ok](run.sh) [web](https://example.org/x) ![img](docs/a.md)\n"
        "[missing](docs/nope.md) [bad anchor](docs/a.md#nope) [same page](#nope)\n"
        "[wrapped\nlink](docs/gone.md) [escape](../outside.md)\n"
        "`[in code](docs/nope.md)`\n\n```\n[in a fence](docs/nope.md)\n```\n"
        "<!-- [in a comment](docs/nope.md) -->\n[ref]: docs/also-gone.md\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## A b\n\n[back](../README.md#title) [run](../run.sh#x)\n")
    problems = link_problems(doc_files(tmp_path), tmp_path)
    assert problems == [
        "README.md:13: docs/nope.md: no such file",
        "README.md:13: docs/a.md#nope: no heading with anchor #nope in docs/a.md",
        "README.md:13: #nope: no heading with anchor #nope in README.md",
        "README.md:14: docs/gone.md: no such file",
        "README.md:15: ../outside.md: points outside the project",
        "README.md:22: docs/also-gone.md: no such file",
        "docs/a.md:5: ../run.sh#x: an anchor into a file that is not markdown",
    ], problems


def test_slugs_follow_githubs_rules():
    assert slug("The demo's models") == "the-demos-models"
    assert slug("Real Whisper on real English speech: `config/real_whisper.yaml`") == \
        "real-whisper-on-real-english-speech-configreal_whisperyaml"
    assert slug("Audio encoders (CLAP and the probe)") == "audio-encoders-clap-and-the-probe"
    assert slug("A **bold** [link](x.md) – café") == "a-bold-link--café"


def test_the_command_check_rejects_unknown_programs_subcommands_options_and_files():
    assert command_problems(["./run.sh", "snakemake", "--cores", "8"]) == []
    assert command_problems(["./run.sh", "pytest", "-m", "not slow"]) == []
    assert command_problems(["mmasr", "dvc-yaml", "--check"]) == []
    assert command_problems(["./run.sh", "snakemake", "--cores", "8", "--configfile", "config/real.yaml"]) == []
    assert command_problems(["./run.sh", "mmasr", "no-such-command"]) == [
        "./run.sh mmasr no-such-command: mmasr does not accept these arguments"]
    assert command_problems(["./run.sh", "snakemake", "--no-such-option"])[0].endswith("does not accept these arguments")
    assert command_problems(["./run.sh", "snakemake", "--configfile", "config/nope.yaml"]) == [
        "./run.sh snakemake --configfile config/nope.yaml: no such file config/nope.yaml"]
    assert command_problems(["./run.sh", "pytest", "tests/test_nope.py"])[0].endswith("no such file tests/test_nope.py")
    assert command_problems(["./run.sh", "pytest", "-m", "sloow"])[0].endswith("undeclared pytest marker(s) ['sloow']")
    assert command_problems(["./run.sh", "make", "all"])[0].endswith("make is neither a script nor a dependency "
                                                                     "of the project (pyproject.toml)")


# ------------------------------------------------------------------------------------------ the project's pages

def test_every_relative_link_in_the_readme_and_docs_resolves():
    files = doc_files()
    assert len(files) > 5 and all(f.is_file() for f in files)
    assert sum(len(links(f)) for f in files) > 30  # the parser found the links there are
    problems = link_problems(files)
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_the_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if t.startswith("docs/")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md") if "-NOTES-" not in p.name}
    assert pages - linked == set(), f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"
    assert "<!-- headline-table -->" in readme and "<!-- /headline-table -->" in readme


def test_every_command_in_the_quick_start_exists():
    quick = section((ROOT / "README.md").read_text(encoding="utf-8"), "Quick start")
    commands = fenced_commands(quick)
    assert commands and all(c[0] == "./run.sh" for c in commands), commands
    assert {c[1] for c in commands} >= {"snakemake", "pytest"}
    problems = [p for c in commands for p in command_problems(c)]
    assert not problems, "\n".join(problems)
    # the programs the quick start says run.sh's environment puts on PATH
    named = set(re.findall(r"`([a-z][\w-]*)`", quick)) & {"snakemake", "dvc", "mmasr", "pytest"}
    assert named and named <= environment_programs(), named
