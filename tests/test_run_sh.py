"""run.sh, the README's entry point: where it puts (and finds) the environment."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fake_venv(path: Path) -> Path:
    """An environment run.sh takes as installed: bin/python (this interpreter) and the install stamp
    of the current pyproject.toml + requirements.lock, so no install runs."""
    (path / "bin").mkdir(parents=True)
    os.symlink(sys.executable, path / "bin" / "python")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "requirements.lock").read_bytes())
    (path / ".mmasr-installed").write_text(digest.hexdigest()[:16] + "\n")
    return path


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_mmasr_venv_absolute_or_relative_is_the_environment_commands_run_in(tmp_path, form):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("run.sh", "pyproject.toml", "requirements.lock"):
        shutil.copy2(ROOT / name, project / name)
    venv = fake_venv(tmp_path / "elsewhere" / "env" if form == "absolute" else project / "envs" / "mine")
    given = str(venv) if form == "absolute" else "envs/mine"
    env = {**os.environ, "MMASR_VENV": given}
    proc = subprocess.run(["bash", str(project / "run.sh"), "sh", "-c", 'command -v python; echo "$VIRTUAL_ENV"'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found, virtual_env = proc.stdout.split()
    assert found == str(venv / "bin" / "python") and virtual_env == str(venv)
    assert "installing" not in proc.stderr  # the stamp matched: nothing was installed
