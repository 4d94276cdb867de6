#!/usr/bin/env bash
# Install everything the tests need, then run lint, types and every test tier.
#   bash scripts/test.sh               # the whole suite (what CI runs)
#   bash scripts/test.sh -m unit       # extra arguments go to pytest
# GPUFLEET_SKIP_CLUSTER_BUILD=1 skips building the test control plane (e2e tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
step() { printf '\n[%s] == %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "python environment (.venv)"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# torch is a few GB: pip's cache makes every install after the first one on a machine fast.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]'

if [[ "${GPUFLEET_SKIP_CLUSTER_BUILD:-0}" != 1 ]]; then
  step "test control plane binaries (cached outside the repo; first build ~20 min)"
  GPUFLEET_K8S_BIN=$(bash hack/build-test-cluster.sh | tail -n1)
  export GPUFLEET_K8S_BIN
fi

step "router alone: a fresh virtualenv with only the router extra has a working router and no torch"
solo=$(mktemp -d)
trap 'rm -rf "$solo"' EXIT
"$PY" -m venv "$solo/venv"
# pip's cache (and no torch to fetch) keeps this to seconds after the first run on a machine.
"$solo/venv/bin/python" -m pip install --quiet --progress-bar off --disable-pip-version-check --no-compile '.[router]'
"$solo/venv/bin/gpufleet" router --help >/dev/null
if "$solo/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch is importable after pip install '.[router]'" >&2
  exit 1
fi
rm -rf "$solo"

step "ruff"
.venv/bin/ruff check gpufleet tests bench
step "import contracts (lint-imports; the layers are in pyproject.toml)"
.venv/bin/lint-imports --no-cache
step "mypy (strict on the whole package)"
.venv/bin/mypy
step "pytest"
# Warnings are errors (pyproject); -p no:cacheprovider keeps the clone clean.
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
