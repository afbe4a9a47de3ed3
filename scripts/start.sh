#!/usr/bin/env bash
# Quick start: install everything, then serve the API and web page with one worker
# per GPU (or one on CPU) on the built-in defaults. Ctrl-C stops server and workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
exec .venv/bin/python -m backend.server "$@"
