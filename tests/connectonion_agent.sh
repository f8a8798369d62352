#!/usr/bin/env bash
# examples/connectonion_agent.py with the real connectonion package from PyPI, its LLM
# pointed at the mock OpenAI-compatible server (examples/mock_llm.rs), driven over the
# exec agents' JSON Lines protocol by tests/connectonion_agent_check.py. Makes the venv
# under target/ on first use. Needs python3 with venv and pip, and PyPI.
#
#   tests/connectonion_agent.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The version this script was last run green with; bump it deliberately.
CONNECTONION_VERSION=1.9.2
venv=target/venv-connectonion

if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("connectonion") != sys.argv[1])' "$CONNECTONION_VERSION" 2>/dev/null; then
  echo "== installing connectonion $CONNECTONION_VERSION in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "connectonion==$CONNECTONION_VERSION"
fi
cargo build --quiet --example mock_llm

# ConnectOnion reads and writes under ~/.co and ./.co: keep both in a scratch directory.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== examples/connectonion_agent.py against the mock LLM"
root=$(pwd)
(cd "$work" && HOME="$work" timeout 300 "$root/$venv/bin/python" "$root/tests/connectonion_agent_check.py" \
  --python "$root/$venv/bin/python" --mock "$root/target/debug/examples/mock_llm")
