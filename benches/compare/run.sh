#!/usr/bin/env bash
# oonode against connectonion's Python host(), side by side, on this machine, in one run.
#
#   benches/compare/run.sh                       # 10 s per wrk run, 1,000 WS turns (~6 min)
#   COMPARE_SECS=3 COMPARE_WS_TURNS=200 benches/compare/run.sh   # a quick smoke run
#   COMPARE_JSON=out.json benches/compare/run.sh # also keep every measurement as JSON
#   COMPARE_ONLY=ws,new64 benches/compare/run.sh  # only these figures, printed as JSON
#   COMPARE_ONLY=new64 COMPARE_HOSTS=oonode COMPARE_SECS=200 benches/compare/run.sh
#                                                # a long run of oonode alone (development)
#
# Builds nothing: it uses target/release/oonode. Makes target/venv-connectonion (the venv
# tests/connectonion_agent.sh and tests/interop.sh share) when it lacks the pinned
# package, and installs wrk from Debian's packages when it is missing (needs root).
# Everything listens on and is sent to 127.0.0.1; every process is ended by PID on exit.
# See benches/compare/README.md for what each figure means.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/benches/compare"
cd "$root"

CONNECTONION_VERSION=1.9.2
venv=target/venv-connectonion
bin="${COMPARE_BIN:-$root/target/release/oonode}"   # COMPARE_BIN: another build, for development

if [ ! -x "$bin" ]; then
  echo "compare: $bin is missing; build it first: cargo build --release --bin oonode" >&2
  exit 2
fi

if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("connectonion") != sys.argv[1])' "$CONNECTONION_VERSION" 2>/dev/null; then
  echo "== installing connectonion $CONNECTONION_VERSION in $venv" >&2
  python3 -m venv "$venv"
  timeout 600 "$venv/bin/pip" install -q --disable-pip-version-check "connectonion==$CONNECTONION_VERSION"
fi

for tool in wrk strace timeout; do
  if ! command -v "$tool" >/dev/null; then
    echo "== installing $tool (apt-get)" >&2
    timeout 600 apt-get install -y "$tool" >/dev/null || {
      timeout 300 apt-get update >/dev/null && timeout 600 apt-get install -y "$tool" >/dev/null
    }
  fi
done

scratch=$(mktemp -d /tmp/oonode-compare.XXXXXX)
driver=""
cleanup() {
  if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM "$driver" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$driver" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$driver" 2>/dev/null || true
  fi
  if [ -z "${COMPARE_KEEP:-}" ]; then rm -rf "$scratch"; else echo "compare: kept $scratch" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Keep the package off the network, as tests/interop/run.py does: HOME and the working
# directory in the scratch directory, its backend and any https:// traffic sent to a
# local port nothing listens on, and host() told a public name that resolves nowhere.
dead_port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dead="http://127.0.0.1:$dead_port"
mkdir -p "$scratch/home"
unset OPENAI_API_KEY OPENAI_BASE_URL OONODE_RELAY OPENONION_API_KEY OPENONION_API_URL \
  OPENONION_BASE_URL OPENONION_DEV ENVIRONMENT AGENT_PORT HTTP_PROXY http_proxy ALL_PROXY all_proxy
export HOME="$scratch/home" CONNECTONION_BACKEND_URL="$dead" HTTPS_PROXY="$dead" https_proxy="$dead" \
  NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost AGENT_PUBLIC_DOMAIN=interop.invalid \
  PYTHONUNBUFFERED=1 NO_COLOR=1

secs=${COMPARE_SECS:-10}
turns=${COMPARE_WS_TURNS:-1000}
# The whole run's bound: 9 steps × 2 hosts of at most (start + signing + run) each.
limit=$(( 18 * (secs + 90) + 2 * 300 + 120 ))
extra=()
[ -n "${COMPARE_JSON:-}" ] && extra+=(--json "$(realpath -m "$COMPARE_JSON")")
[ -n "${COMPARE_ONLY:-}" ] && extra+=(--only "$COMPARE_ONLY")
[ -n "${COMPARE_HOSTS:-}" ] && extra+=(--hosts "$COMPARE_HOSTS")
(cd "$scratch" && exec timeout "$limit" "$root/$venv/bin/python" "$here/compare.py" \
  --oonode "$bin" --scratch "$scratch" --secs "$secs" --ws-turns "$turns" "${extra[@]}") &
driver=$!
wait "$driver"
