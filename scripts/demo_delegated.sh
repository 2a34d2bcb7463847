#!/bin/sh
# CoAP delegated enrollment demo on loopback: lab CA + devagent clm + one devagent serve, five stages timed.
# Usage: scripts/demo_delegated.sh [STATE_DIR]   (default demo-state/delegated; removed first)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${1:-demo-state/delegated}
rm -rf "$DIR"
exec "$PY" -m agent.clm_demo "$DIR"
