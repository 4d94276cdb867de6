#!/usr/bin/env bash
# One bounded GPU benchmark run (at most ~8 minutes): bash bench/gpu/run.sh [--out DIR] [--check]
# Prints a short table last; writes gpu.json into --out (default bench/results).
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
exec timeout --signal=INT --kill-after=20 470 "$PY" -m bench.gpu "$@"
