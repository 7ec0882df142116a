"""Shared fixtures: small audio and picture files written on the fly (tests never download), and
helpers that run the workflow in a scratch copy of the project."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def missing_prerequisite(reason: str) -> None:
    """A test's system prerequisite (a SLURM cluster, Chromium) is missing: outside CI the test skips,
    saying why; under CI=true it fails, because a green CI claims that the test ran."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}: CI must run this test (.ci/run sets the prerequisite up)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless browser (render tests); without it those tests skip (fail under CI=true)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing_prerequisite("no `chromium` on PATH: the headless render needs Debian's `chromium` package "
                             "(apt-get install chromium)")
    return found


def chromium_flags(binary: str, profile: Path) -> list[str]:
    """The headless Chromium command line the render tests share (its own profile folder, nothing fetched)."""
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def tone(seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, amp: float = 0.5,
         lead: float = 0.3, tail: float = 0.3, channels: int = 1) -> np.ndarray:
    """A harmonic tone with silent lead-in and tail, shape (frames,) or (frames, channels)."""
    t = np.arange(int(seconds * sr)) / sr
    voiced = amp * (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(2 * np.pi * 2 * freq * t)) / 1.3
    x = np.concatenate([np.zeros(int(lead * sr)), voiced, np.zeros(int(tail * sr))]).astype(np.float32)
    return x if channels == 1 else np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)


def write_wav(path: Path, audio: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, subtype=subtype)
    return path


def write_picture(path: Path, mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 120, "CMYK": (0, 200, 200, 0), "LA": (120, 200)}[mode]
    img = Image.new(mode, size, color)
    img.save(path, format="JPEG" if mode == "CMYK" else "PNG")
    return path


@pytest.fixture
def preprocess_cfg() -> dict:
    from mmasr.config import validate

    return validate({})["preprocess"]


@pytest.fixture(scope="session")
def demo_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random-init demo Whisper and CLIP in HF format (built once per test session)."""
    from mmasr.demo.models import build_demo_models

    return build_demo_models(tmp_path_factory.mktemp("demo_models") / "demo", {}, seed=0)


@pytest.fixture(scope="session")
def whisper_bundle(demo_model_dirs):
    from mmasr.models.loading import load_whisper

    return load_whisper(str(demo_model_dirs["whisper"]), device="cpu")


@pytest.fixture(scope="session")
def clip_bundle(demo_model_dirs):
    from mmasr.models.loading import load_clip

    return load_clip(str(demo_model_dirs["clip"]), device="cpu")


def processed_corpus(root: Path, n: int = 6) -> pd.DataFrame:
    """A manifest of processed-looking 16 kHz utterances split between dev and test."""
    rows = []
    for i in range(n):
        path = write_wav(root / f"u{i}.wav", tone(0.6 + 0.1 * i, freq=150 + 40 * i, lead=0.1, tail=0.1))
        rows.append({"utt_id": f"u{i}", "speaker": f"s{i % 3}", "group": "impaired" if i % 2 else "control",
                     "audio_path": str(path), "duration_s": 0.8 + 0.1 * i, "text": "a red bear",
                     "image_id": f"img{i % 2}" if i < n - 1 else None, "split": "dev" if i < n // 2 else "test",
                     "source": "test"})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the workflow in a scratch copy

def project_copy(dest: Path) -> Path:
    """The files a user's clone has that the workflow needs."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    for name in ("workflow", "profiles", "src", "config"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests" / "config", dest / "config", dirs_exist_ok=True)  # the test configs beside them
    return dest


def tiny_params(work: Path) -> dict:
    """The params a workflow run on the tiny config reads: ``params.yaml`` with ``config/tiny.yaml`` merged over."""
    from mmasr.config import deep_merge

    return deep_merge(yaml.safe_load((work / "params.yaml").read_text()),
                      yaml.safe_load((work / "config" / "tiny.yaml").read_text()))


def tool_env() -> dict[str, str]:
    """The environment for workflow runs: this interpreter's scripts (snakemake, mmasr) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def rule_logs(cwd: Path) -> str:
    return "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted((cwd / "results" / "logs").rglob("*.log")))


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                             f"{rule_logs(cwd)}")
    return proc


def kill_when(cmd: list[str], cwd: Path, output: Path, ready: Callable[[], bool], what: str, timeout_s: float = 600,
              context: Callable[[], str] = lambda: "") -> subprocess.Popen:
    """Run ``cmd`` in its own session (stdout and stderr to ``output``) and SIGKILL its whole process group
    as soon as ``ready()``; fail the test, with the output and ``context()``, if it ends first or
    ``timeout_s`` pass. Returns the reaped process (returncode ``-SIGKILL`` unless it ended on its own)."""
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd[:4])} ... ended (exit {proc.returncode}) before it could be killed "
                            f"{what}:\n{output.read_text()[-4000:]}{context()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {timeout_s} s:\n{output.read_text()[-4000:]}{context()}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return proc


def snakemake(cwd: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/tiny.yaml", *extra], cwd, check)


def job_counts(snakemake_output: str) -> dict[str, int]:
    """The "Job stats" table of a (dry) run: rule -> number of jobs."""
    lines = snakemake_output[snakemake_output.index("Job stats"):].splitlines()[3:]
    table = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        table[parts[0]] = int(parts[1])
    return table


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def litter(folder: Path) -> list[str]:
    """Temporary or hidden files an interrupted writer could leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow on the tiny config, once per test session. Tests read it (or copy it before
    changing anything)."""
    work = project_copy(tmp_path_factory.mktemp("tiny"))
    proc = snakemake(work)
    assert "pipeline finished" in proc.stdout + proc.stderr
    return work


@pytest.fixture(scope="session")
def tiny_adapt_run(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    """The tiny run with the LoRA-adapted Whisper on (config/adapt.yaml): a copy of ``tiny_run`` (mtimes and
    .snakemake kept, so only the adapted stages, the systems table and the report run), and Snakemake's output."""
    work = tmp_path_factory.mktemp("tiny_adapt") / "work"
    shutil.copytree(tiny_run, work, symlinks=True)
    proc = snakemake(work, "--configfile", "config/tiny.yaml", "config/adapt.yaml")
    assert "pipeline finished" in proc.stdout + proc.stderr
    return work, proc.stdout + proc.stderr


def save_tiny_ast(folder: Path, layers: int = 2, width: int = 32, classifier: bool = False) -> Path:
    """A random AST with the real geometry (128 mel bins, 1024 frames, 16x16 patches, strides 10: 1212
    patches + CLS + distillation) but a tiny width, beside the stock feature extractor."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * width,
                       num_labels=3)
    model = ASTForAudioClassification(config) if classifier else ASTModel(config)
    base = model.audio_spectrogram_transformer if classifier else model
    with torch.no_grad():  # transformers initialises these to zero: make the special tokens and positions distinct
        for p in (base.embeddings.cls_token, base.embeddings.distillation_token, base.embeddings.position_embeddings):
            p.normal_(std=0.2)
    model.eval().save_pretrained(folder)
    ASTFeatureExtractor().save_pretrained(folder)
    return folder


class ReportPage:
    """A report page (src/mmasr/report/build.py) read by its structure, so that a test finds a value in its
    place and not merely somewhere on the page: ``metrics`` maps each key-results box's ``data-metric``
    ("<stage>.<key>") to its value's text; :meth:`cell` reads a table of one ``<section id=...>`` by column
    header and the row's first cell."""

    def __init__(self, html: str):
        from html.parser import HTMLParser

        page = self
        self.metrics: dict[str, str] = {}
        self.tables: dict[str, list[list[list[str]]]] = {}  # section id -> tables -> rows -> cell texts

        class Parser(HTMLParser):
            section, metric, in_value, cell = None, None, False, None

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "section":
                    self.section = a.get("id")
                elif tag == "div" and "data-metric" in a:
                    self.metric = a["data-metric"]
                elif tag == "b" and self.metric is not None:
                    self.in_value, page.metrics[self.metric] = True, ""
                elif tag == "table":
                    page.tables.setdefault(self.section, []).append([])
                elif tag == "tr":
                    page.tables[self.section][-1].append([])
                elif tag in ("td", "th"):
                    self.cell = ""

            def handle_endtag(self, tag):
                if tag == "b" and self.in_value:
                    self.in_value, self.metric = False, None
                elif tag in ("td", "th") and self.cell is not None:
                    page.tables[self.section][-1][-1].append(self.cell.strip())
                    self.cell = None
                elif tag == "section":
                    self.section = None

            def handle_data(self, data):
                if self.in_value:
                    page.metrics[self.metric] += data
                if self.cell is not None:
                    self.cell += data

        Parser().feed(html)

    def cell(self, section: str, row: str, column: str) -> str:
        """The text in ``column`` of the row whose first cell is ``row``, in the one table of ``section``
        that has both; fails, saying what is there, when none or several have."""
        found = []
        for rows in self.tables.get(section, []):
            if rows and column in rows[0]:
                j = rows[0].index(column)
                found += [r[j] for r in rows[1:] if r and r[0] == row]
        assert len(found) == 1, f"section {section!r}: {len(found)} cells in row {row!r}, column {column!r}; " \
                                f"tables: {self.tables.get(section)}"
        return found[0]
