#!/usr/bin/env bash
# Create .venv (if missing) and install the package (editable) with its extras into it,
# saying what it does:
# one "[setup] step i/n" line per step, then pip's own progress (packages collected,
# download bars, what it installs), and how long each step took.
# Versions are those of requirements.lock (exact, used as pip constraints), so every
# machine installs what was tested; bash scripts/lock.sh refreshes it on purpose.
# Usage: bash scripts/setup.sh [extras]   (default: all; the tests use dev; see the
# extras in pyproject.toml: worker, lm-eval, longbench, postgres, mcp, all, dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
case "$extras" in  # the requirements files these scripts were given before
  requirements.txt) extras=all ;;
  requirements-dev.txt) extras=dev ;;
esac
python="${PYTHON:-python3}"
started=$SECONDS
step_start=$SECONDS
step() {  # step <i> <n> <what>
  if [ "$1" -gt 1 ]; then echo "[setup]   done in $((SECONDS - step_start)) s"; fi
  step_start=$SECONDS
  echo "[setup] step $1/$2: $3"
}
stamp=".venv/.installed-$extras"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] \
    && [ ! requirements.lock -nt "$stamp" ]; then
  echo "[setup] llm-bench-shower[$extras] already installed in .venv (delete $stamp to reinstall)"
  exit 0
fi
# pip's progress bars need a terminal; in a log they would be one line per update.
if [ -t 1 ]; then progress=(--progress-bar on); else progress=(--progress-bar off); fi
# pip prints what it collects, downloads and installs (no --quiet): a first install takes
# minutes and should not look stuck.
pip=(.venv/bin/python -m pip install --disable-pip-version-check "${progress[@]}")
n=4
if [ ! -x .venv/bin/python ]; then
  step 1 $n "creating the virtual environment .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
else
  step 1 $n "using the existing virtual environment .venv"
fi
step 2 $n "upgrading pip"
"${pip[@]}" --upgrade pip
# torch first, pinned, so nothing resolves a different build with GBs of CUDA packages.
step 3 $n "installing torch 2.13.0 (the largest download: several hundred MB to GBs)"
"${pip[@]}" "torch==2.13.0" -c requirements.lock
step 4 $n "installing llm-bench-shower[$extras] (editable) at the versions of requirements.lock"
"${pip[@]}" -e ".[$extras]" -c requirements.lock
touch "$stamp"
echo "[setup]   done in $((SECONDS - step_start)) s"
echo "[setup] installed in $((SECONDS - started)) s"
