#!/usr/bin/env bash
# Set up the project's environment on first use, then run a command inside it.
#
#   ./run.sh snakemake --cores 8      # the whole pipeline on the embedded demo corpus
#   ./run.sh pytest                   # the test suite
#
# Needs only Python 3.11 (or 3.12) on PATH. Creates .venv/ and installs the pinned dependencies
# (pyproject.toml, with every transitive version fixed by requirements.lock) once; later calls
# reinstall only when either file changes. Set MMASR_VENV to put the environment elsewhere (an absolute
# path, or one relative to the project folder) and PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

venv=${MMASR_VENV:-.venv}
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # relative to the project, absolute as given
python=${PYTHON:-python3}
if [ $# -eq 0 ]; then
    echo "usage: ./run.sh COMMAND [ARGS...]   e.g. ./run.sh snakemake --cores 8  or  ./run.sh pytest" >&2
    exit 2
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" - <<'PY' || { echo "mmasr needs Python 3.11 or 3.12 (found: $("$python" --version 2>&1))" >&2; exit 1; }
import sys
sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)
PY
    echo "mmasr: creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi

want=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
stamp="$venv/.mmasr-installed"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "mmasr: installing pinned dependencies into $venv (first run: a few minutes, ~5 GB with torch)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet --constraint requirements.lock --editable '.[test]'
    echo "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
