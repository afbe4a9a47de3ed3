#!/usr/bin/env bash
# Install everything the tests need, then run the whole test suite.
# Extra arguments go to pytest (e.g. -k niah, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The browser tests drive Debian's Chromium (Playwright never downloads a browser here);
# the queue tests also run on a PostgreSQL server they start themselves (initdb in a
# temporary folder), so Debian's PostgreSQL binaries must be installed.
missing=""
command -v chromium >/dev/null 2>&1 || missing="chromium fonts-noto-cjk"
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  missing="$missing postgresql"
fi
# The cluster tests start a single-node Slurm of their own (munged, slurmctld and slurmd
# in a temporary folder), from Debian's packages.
command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] \
  || missing="$missing slurmctld slurmd slurm-client munge"
if [ -n "$missing" ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing >/dev/null
fi
# The MCP tests also drive the server through the official MCP Inspector CLI (npm; Node
# from Debian's package), installed into .node/ (git-ignored). 0.21.x is the line whose
# CLI runs on Debian's Node 20 (later majors want Node 22).
INSPECTOR_VERSION=0.21.1
if [ ! -x .node/node_modules/.bin/mcp-inspector ]; then
  if ! command -v npm >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq nodejs npm >/dev/null
  fi
  npm install --silent --no-audit --no-fund --prefix .node \
    "@modelcontextprotocol/inspector@${INSPECTOR_VERSION}" >/dev/null
fi
set +e
# One pytest worker per core (pytest-xdist), a test file's tests together so a module's
# server is started once; `-n 0` as an argument runs everything in one process.
.venv/bin/python -m pytest -n auto --dist loadfile "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$code"
