#!/usr/bin/env bash
# The interop suite: oonode against the real connectonion package from PyPI, in every
# direction (tests/interop/*.py; summary in tests/interop/README.md). Builds the oonode
# binary only if it is missing and makes the connectonion venv under target/ on first
# use (the same venv and pin as tests/connectonion_agent.sh). Everything runs on
# 127.0.0.1 with the package kept off the network; the Python runner ends every process
# it started and prints one PASS/FAIL line per test.
#
#   tests/interop.sh [-k SUBSTRING]... [--keep]
#
# CONNECTONION_VENV=DIR uses an existing venv that has the pinned connectonion instead;
# OONODE_BIN=PATH tests another oonode binary.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the tree
cd "$(dirname "$0")/.."

# The version this suite was written against; bump it deliberately (with
# tests/connectonion_agent.sh).
CONNECTONION_VERSION=1.9.2
venv=${CONNECTONION_VENV:-target/venv-connectonion}

if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("connectonion") != sys.argv[1])' "$CONNECTONION_VERSION" 2>/dev/null; then
  echo "== installing connectonion $CONNECTONION_VERSION in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "connectonion==$CONNECTONION_VERSION"
fi
if [ -z "${OONODE_BIN:-}" ] && [ ! -x target/debug/oonode ]; then
  echo "== cargo build --bin oonode"
  cargo build --quiet --bin oonode
fi

echo "== interop suite (connectonion $CONNECTONION_VERSION)"
# The runner keeps its own deadline (170 s) and cleans up; this bound is the backstop.
exec timeout 200 "$venv/bin/python" tests/interop/run.py "$@"
