#!/usr/bin/env bash
# Quick start: install everything, then serve the API and web page with one worker
# per GPU (or one on CPU) on the built-in defaults. Ctrl-C stops server and workers.
# The install prints one "[setup] step i/n" line per step and pip's progress; a first
# install downloads torch and takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[start] installing llm-bench-shower with all its extras into .venv (scripts/setup.sh)"
bash scripts/setup.sh all
echo "[start] starting the server and its workers: lbs serve (Ctrl-C stops them)"
exec .venv/bin/lbs serve "$@"
