#!/usr/bin/env bash
# Quick start: install everything, then serve the API and web page with one worker
# per GPU (or one on CPU) on the built-in defaults. Ctrl-C stops server and workers.
# The install prints one "[setup] step i/n" line per step and pip's progress; a first
# install downloads torch and takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[start] installing the requirements into .venv (scripts/setup.sh)"
bash scripts/setup.sh requirements.txt
echo "[start] starting the server and its workers (Ctrl-C stops them)"
exec .venv/bin/python -m backend.server "$@"
