#!/usr/bin/env bash
# Failure scenarios against the top-level docker-compose.yml, with real containers:
#
#   1. hidden   the agent on a network only the relay shares (no port, no swarm) answers
#               a caller on another network, by address, through the relay
#   2. partition  `docker network disconnect` cuts the hidden agent off: a call fails with
#               a clear error; after `docker network connect` it answers again
#   3. relay-restart  the relay restarts: the nodes re-announce and are callable again
#   4. node-loss  one agent is killed: calling it is a clear "offline" error, the others
#               keep serving (through the relay and through the swarm); restarted, it is
#               back under the same address
#
#   testnet/scenarios.sh [--debug] [--no-build]
#     --debug     package the debug build (what `cargo test` built) instead of --release
#     --no-build  use the image oonode:local as it is
#
# Bounded (every docker call has a time limit, every wait a deadline), and it always
# removes what it started (`docker compose down -v`), also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
build_args=()
for arg in "$@"; do
  case "$arg" in
    --debug) build_args+=(--debug) ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "scenarios.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

project="${OONODE_SCENARIO_PROJECT:-oonode-scenarios}"
export OONODE_IMAGE="${OONODE_IMAGE:-oonode:local}"
relay=ws://relay:8765
bootstrap=/ip4/${OONODE_NET:-10.213}.0.10/tcp/4001/p2p/12D3KooWSmMf3nidUSNMCeEWSF7yWu7c2J4qjjQyNWKLv22nW9JR

if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  echo "scenarios.sh: neither \`docker compose\` nor \`docker-compose\` is installed" >&2
  exit 1
fi
compose() { timeout 180 "${compose_cmd[@]}" -p "$project" "$@"; }

passed=()
failed=""
started_at=$(date +%s)
log() { echo "[$(( $(date +%s) - started_at ))s] $*"; }
pass() { passed+=("$1"); log "PASS $1"; }
fail() {
  failed="$1"
  log "FAIL $1"
  exit 1
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && [ -n "${up:-}" ]; then
    echo "== the last log lines of each container"
    compose logs --no-color --tail 25 2>&1 | grep -v '│' || true
  fi
  if [ -n "${up:-}" ]; then
    echo "== docker compose down -v"
    compose down -v --remove-orphans -t 3 >/dev/null 2>&1 || echo "warning: compose down failed"
  fi
  rm -rf "${tmp:-}"
  echo
  echo "== scenarios"
  for p in "${passed[@]}"; do echo "  passed  $p"; done
  [ -n "$failed" ] && echo "  FAILED  $failed"
  if [ "$rc" -eq 0 ]; then
    echo "scenarios: ${#passed[@]} passed, 0 failed"
  else
    echo "scenarios: ${#passed[@]} passed, 1 failed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'failed="interrupted"; exit 130' INT TERM

tmp=$(mktemp -d)

if [ "$build" = 1 ]; then
  log "building the image (no registry)"
  testnet/docker-build.sh "${build_args[@]}"
fi
docker image inspect "$OONODE_IMAGE" >/dev/null 2>&1 \
  || { echo "no image $OONODE_IMAGE: run testnet/docker-build.sh" >&2; exit 1; }

# Leftovers of an interrupted run.
compose down -v --remove-orphans -t 1 >/dev/null 2>&1 || true
log "docker compose up -d"
up=1
compose up -d --no-build

container() { compose ps -q "$1"; }

# The address in a service's `--ready-json` line (waits for the line).
address_of() {
  local service=$1 deadline=$(( $(date +%s) + 30 )) addr
  while [ "$(date +%s)" -lt "$deadline" ]; do
    addr=$(compose logs --no-color "$service" 2>/dev/null \
      | grep -o '"event":"ready".*"address":"0x[0-9a-f]\{64\}"' | head -1 \
      | grep -o '0x[0-9a-f]\{64\}' || true)
    if [ -n "$addr" ]; then echo "$addr"; return 0; fi
    sleep 0.5
  done
  fail "$service printed no ready line within 30 s"
}

# call CLIENT ADDRESS PROMPT [ARGS…]: one `oonode call` from a fresh client container;
# sets OUT (the result), ERR (its last stderr line) and RC.
call() {
  local client=$1 address=$2 prompt=$3
  shift 3
  set +e
  OUT=$(compose run --rm -T "$client" call "$address" "$prompt" --timeout 5 "$@" 2>"$tmp/err")
  RC=$?
  set -e
  # Its last line of its own: not compose's progress lines, nor the exit status that
  # docker-compose 1.x prints after a failed `run`.
  ERR=$(tr -d '\r' <"$tmp/err" | grep -v -e '^Creating ' -e '^Starting ' -e '^[0-9]*$' \
    | grep -v '^\s*$' | tail -1 || true)
}

# expect_answer WHAT SECONDS EXPECTED CLIENT ADDRESS PROMPT [ARGS…]: retries until the
# call returns EXPECTED, or fails the scenario after SECONDS.
expect_answer() {
  local what=$1 seconds=$2 expected=$3
  shift 3
  local t0 deadline
  t0=$(date +%s)
  deadline=$(( t0 + seconds ))
  while :; do
    call "$@"
    if [ "$RC" -eq 0 ] && [ "$OUT" = "$expected" ]; then
      log "  $what: \"$OUT\" (after $(( $(date +%s) - t0 )) s)"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "$what: no \"$expected\" within $seconds s (last: exit $RC, stdout \"$OUT\", stderr \"$ERR\")"
    fi
    sleep 1
  done
}

# expect_error WHAT CODES… -- CLIENT ADDRESS PROMPT [ARGS…]: the call fails with one of
# the exit codes, and says why in one line.
expect_error() {
  local what=$1
  shift
  local codes=()
  while [ "$1" != "--" ]; do codes+=("$1"); shift; done
  shift
  call "$@"
  if [ "$RC" -eq 0 ]; then fail "$what: the call succeeded (\"$OUT\")"; fi
  local ok=0 c
  for c in "${codes[@]}"; do [ "$RC" -eq "$c" ] && ok=1; done
  [ "$ok" = 1 ] || fail "$what: exit $RC, not one of ${codes[*]} ($ERR)"
  case "$ERR" in
    error:*) log "  $what: exit $RC, $ERR" ;;
    *) fail "$what: no clear error line (exit $RC: $ERR)" ;;
  esac
}

hidden=$(address_of agent-hidden)
echo_addr=$(address_of agent-echo)
translator=$(address_of agent-translator)
log "agent-hidden $hidden"
log "agent-echo $echo_addr"
log "agent-translator $translator"

# --- 1. hidden ---------------------------------------------------------------------------
log "1. the hidden agent, called by address from the edge network, through the relay"
hidden_c=$(container agent-hidden)
nets=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$hidden_c")
[ "$nets" = "${project}_hidden " ] || fail "hidden: agent-hidden is on networks: $nets"
ports=$(docker inspect -f '{{json .HostConfig.PortBindings}}' "$hidden_c")
case "$ports" in {}|null) ;; *) fail "hidden: agent-hidden publishes ports: $ports" ;; esac
relay_nets=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(container relay)")
log "  agent-hidden is on: $nets(no published port); the relay is on: $relay_nets"
for net in backbone edge; do
  if docker network inspect -f '{{range .Containers}}{{.Name}} {{end}}' "${project}_$net" | grep -q agent-hidden; then
    fail "hidden: agent-hidden is on the $net network"
  fi
done
expect_answer "edge client → agent-hidden via the relay" 30 "Hola" \
  client "$hidden" "Translate hello to Spanish" --relay "$relay"
pass "hidden: a node only the relay can reach answers by address through the relay"

# --- 2. partition ------------------------------------------------------------------------
log "2. partition: agent-hidden cut off from its network"
hidden_ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"${project}_hidden\").IPAddress}}" "$hidden_c")
docker network disconnect "${project}_hidden" "$hidden_c"
# The relay still counts the agent as online (it has not missed it yet), so the call
# waits for an answer that cannot come: a timeout (5); once the relay drops the agent,
# "offline" (3).
expect_error "call during the partition" 5 3 -- \
  client "$hidden" "Translate hello to Spanish" --relay "$relay"
# Reconnect with the address it had: a partition heals; the host does not move.
docker network connect --ip "$hidden_ip" "${project}_hidden" "$hidden_c"
log "  reconnected at $hidden_ip"
expect_answer "call after the partition healed" 120 "Hola" \
  client "$hidden" "Translate hello to Spanish" --relay "$relay"
pass "partition: a clear error while cut off, answers again after reconnect"

# --- 3. relay restart --------------------------------------------------------------------
log "3. relay restart"
compose restart -t 2 relay >/dev/null 2>&1
log "  relay restarted"
expect_answer "agent-hidden after the restart" 30 "Hola" \
  client "$hidden" "Translate hello to Spanish" --relay "$relay"
expect_answer "agent-echo after the restart" 30 "back again" \
  client "$echo_addr" "back again" --relay "$relay"
expect_answer "agent-translator after the restart" 30 "Hola" \
  client "$translator" "Translate hello to Spanish" --relay "$relay"
pass "relay-restart: the nodes re-announced and are callable again"

# --- 4. node loss ------------------------------------------------------------------------
log "4. node loss: agent-echo killed (SIGKILL)"
compose kill agent-echo >/dev/null 2>&1
expect_error "calling the killed agent" 3 -- \
  client "$echo_addr" "anyone there?" --relay "$relay"
expect_answer "agent-hidden still serves" 30 "Hola" \
  client "$hidden" "Translate hello to Spanish" --relay "$relay"
expect_answer "agent-translator still serves (relay)" 30 "Hola" \
  client "$translator" "Translate hello to Spanish" --relay "$relay"
expect_answer "agent-translator still serves (swarm)" 30 "Hola" \
  swarm-client "$translator" "Translate hello to Spanish" --via p2p --bootstrap "$bootstrap"
compose start agent-echo >/dev/null 2>&1
expect_answer "agent-echo restarted, same address" 30 "hello again" \
  client "$echo_addr" "hello again" --relay "$relay"
pass "node-loss: the others kept serving; the lost node came back under its address"
