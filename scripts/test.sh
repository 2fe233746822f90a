#!/usr/bin/env bash
# Install the project with its dev tools into .venv, then run every check CI runs:
# ruff (lint and format), mypy --strict, and the whole pytest suite.
# A pytest run that collects no test exits 5, which fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
