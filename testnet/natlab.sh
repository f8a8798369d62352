#!/usr/bin/env bash
# The NAT lab: two private networks, each behind its own masquerading router, and a
# public segment holding two federated relays, built from network namespaces (iproute2 +
# iptables) and removed on exit. Real binaries, real NATs; traffic never leaves the
# namespaces.
#
#   10.1.0.2 (A) -- NAT 1 (10.99.0.1) --+                          +-- relay 1 10.99.0.10
#                                        +-- "internet" 10.99.0.0/24 +
#   10.2.0.2 (B) -- NAT 2 (10.99.0.2) --+                          +-- relay 2 10.99.0.11
#
# Each router masquerades its LAN and forwards from the public side only what belongs
# to a connection made from inside. Scenarios (each must pass):
#   1. B learns by AutoNAT that it is behind a NAT and reserves circuits on the relays.
#   2. A calls B by address: over the circuit first, then DCUtR punches a direct
#      connection; the call reports `hole-punched`, and the relay passes a few KB of
#      set-up while the call carries hundreds.
#   3. Hole punching blocked between the NATs: the call still succeeds, over the circuit
#      (the relay now carries the call's bytes).
#   4. Relay 1 killed mid-run: B calls through relay 2, over the swarm and over the
#      WebSocket relay (B's relay link moved to its fallback).
#   5. B's home relay changed (to relay 2): relay 1, restarted, passes a caller on to it.
#
# Needs root. Usage: testnet/natlab.sh [--bin PATH] [--bench N]
#   --bin PATH   the oonode binary (default target/debug/oonode)
#   --bench N    also time N calls on each path (direct, hole-punched, circuit, WebSocket
#                relay) and print the medians: each call is a whole `oonode call` process
#                (start, join, find, connect, punch, one turn), as a user runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$PWD/target/debug/oonode
BENCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$(realpath "$2"); shift 2 ;;
    --bench) BENCH=$2; shift 2 ;;
    *) echo "natlab.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "natlab.sh: no binary at $BIN (cargo build first)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "natlab.sh: needs root (network namespaces)" >&2; exit 1; }
for tool in ip iptables curl python3; do
  command -v "$tool" >/dev/null || { echo "natlab.sh: needs $tool" >&2; exit 1; }
done

P="onl$$-"            # namespace names: unique per run
WORK=$(mktemp -d)
NAMES=(pub rel1 rel2 r1 r2 a b)
declare -A PIDS=()
started_at=$(date +%s)
log() { echo "[$(( $(date +%s) - started_at ))s] $*"; }
passed=()

cleanup() {
  local rc=$?
  for name in "${!PIDS[@]}"; do kill -9 "${PIDS[$name]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "${NAMES[@]}"; do ip netns del "$P$n" 2>/dev/null || true; done
  if [ $rc -ne 0 ]; then
    for f in "$WORK"/*.log; do
      [ -f "$f" ] || continue
      echo "== last lines of $(basename "$f")"
      tail -n 15 "$f"
    done
  fi
  # NATLAB_LOGS=DIR keeps every process's log.
  if [ -n "${NATLAB_LOGS:-}" ]; then mkdir -p "$NATLAB_LOGS" && cp "$WORK"/*.log "$NATLAB_LOGS"/; fi
  rm -rf "$WORK"
  if [ ${#BENCH_LINES[@]} -gt 0 ]; then
    echo
    echo "| path | calls | median ms | p90 ms | max ms | paths reported |"
    echo "| --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${BENCH_LINES[@]}"
  fi
  echo
  for p in "${passed[@]}"; do echo "  passed  $p"; done
  if [ $rc -eq 0 ]; then echo "natlab: ${#passed[@]} scenarios passed"; else echo "natlab: FAILED"; fi
}
trap cleanup EXIT

in_ns() { local n=$1; shift; ip netns exec "$P$n" "$@"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

# --- the networks ---------------------------------------------------------------------
for n in "${NAMES[@]}"; do ip netns add "$P$n"; in_ns "$n" ip link set lo up; done
in_ns pub ip link add br0 type bridge
in_ns pub ip link set br0 up
# A namespace's leg on the public segment.
public_leg() {
  local n=$1 addr=$2
  ip link add "e$n" netns "$P$n" type veth peer name "p$n" netns "${P}pub"
  in_ns pub ip link set "p$n" master br0 up
  in_ns "$n" ip addr add "$addr/24" dev "e$n"
  in_ns "$n" ip link set "e$n" up
}
public_leg rel1 10.99.0.10
public_leg rel2 10.99.0.11
public_leg r1 10.99.0.1
public_leg r2 10.99.0.2
# A host on a router's LAN, the router its default route; the router masquerades.
behind_nat() {
  local router=$1 host=$2 net=$3
  ip link add "l$host" netns "$P$router" type veth peer name "e$host" netns "$P$host"
  in_ns "$router" ip addr add "$net.1/24" dev "l$host"
  in_ns "$router" ip link set "l$host" up
  in_ns "$host" ip addr add "$net.2/24" dev "e$host"
  in_ns "$host" ip link set "e$host" up
  in_ns "$host" ip route add default via "$net.1"
  in_ns "$router" sysctl -qw net.ipv4.ip_forward=1
  in_ns "$router" iptables -t nat -A POSTROUTING -o "e$router" -j MASQUERADE
  in_ns "$router" iptables -A FORWARD -i "e$router" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  in_ns "$router" iptables -A FORWARD -i "e$router" -j DROP
  # Like a home router: silence (no RST, no ICMP) to what nobody inside asked for.
  in_ns "$router" iptables -A INPUT -i "e$router" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  in_ns "$router" iptables -A INPUT -i "e$router" -j DROP
}
behind_nat r1 a 10.1.0
behind_nat r2 b 10.2.0
log "networks up: A 10.1.0.2 behind NAT 10.99.0.1, B 10.2.0.2 behind NAT 10.99.0.2"

# --- processes ------------------------------------------------------------------------
# start NAME NAMESPACE ARGS…: the binary in a namespace, stdout to NAME.out, log NAME.log.
start() {
  local name=$1 n=$2; shift 2
  ip netns exec "$P$n" env RUST_LOG="${RUST_LOG:-info}" "$BIN" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PIDS[$name]=$!
}
# ready NAME KEY [MATCH]: waits for NAME's --ready-json line, prints the key's value (of
# a list, the first item containing MATCH).
ready() {
  local name=$1 key=$2 match=${3:-}
  for _ in $(seq 1 300); do
    if grep -q '"ready"' "$WORK/$name.out" 2>/dev/null; then
      python3 -c 'import json,sys
v = json.loads([l for l in open(sys.argv[1]) if "\"ready\"" in l][0])[sys.argv[2]]
print([a for a in v if sys.argv[3] in a][0] if isinstance(v, list) else v)' \
        "$WORK/$name.out" "$key" "$match"
      return 0
    fi
    kill -0 "${PIDS[$name]}" 2>/dev/null || fail "$name exited before it was ready"
    sleep 0.1
  done
  fail "$name was not ready within 30 s"
}
relay_args() {
  local ip=$1 name=$2
  echo --listen "$ip:8765" --swarm-listen "/ip4/$ip/udp/4001/quic-v1" \
    --swarm-listen "/ip4/$ip/tcp/4001" --swarm-key "$WORK/$name.key" --forward-private --ready-json
}
# Peers join the relays over QUIC: a hole punch is surest over UDP, and DCUtR punches
# with the addresses the relays saw, so those must be QUIC ones.
# shellcheck disable=SC2046
start relay1 rel1 relay $(relay_args 10.99.0.10 relay1)
R1=$(ready relay1 swarm quic)
# shellcheck disable=SC2046
start relay2 rel2 relay $(relay_args 10.99.0.11 relay2) --bootstrap "$R1"
R2=$(ready relay2 swarm quic)
log "relay 1 $R1"
log "relay 2 $R2"
node_args() {
  local name=$1
  echo host --agent echo --co-dir "$WORK/$name" --port 8000 \
    --relay ws://10.99.0.10:8765 --relay-fallback ws://10.99.0.11:8765 \
    --bootstrap "$R1" --bootstrap "$R2" --ready-json
}
# shellcheck disable=SC2046
start b b $(node_args b)
B=$(ready b address)
# shellcheck disable=SC2046
start a a $(node_args a)
A=$(ready a address)
log "node B $B"
log "node A $A"

# info NS EXPR: a Python expression over node's /info (as `i`), printed.
info() {
  in_ns "$1" curl -sf --max-time 3 http://127.0.0.1:8000/info \
    | python3 -c "import json,sys; i=json.load(sys.stdin); print($2)"
}
# metric NAME [N]: relay N's (default 1) counter or gauge of that name.
metric() {
  local n=${2:-1}
  in_ns "rel$n" curl -sf --max-time 3 "http://10.99.0.1$(( n - 1 )):8765/metrics" \
    | awk -v m="$1" '$1 == m { print $2 }'
}
# relayed_bytes: bytes in and out of both relays' network interfaces (a caller may take
# either relay's circuit; a relay that is down counts nothing).
relayed_bytes() {
  local total=0 n
  for n in rel1 rel2; do
    total=$(( total + $(in_ns "$n" cat "/sys/class/net/e$n/statistics/rx_bytes") \
      + $(in_ns "$n" cat "/sys/class/net/e$n/statistics/tx_bytes") ))
  done
  echo "$total"
}
# call NS ADDRESS ARGS…: `oonode call --json` from a namespace; prints its JSON.
call() {
  local n=$1 to=$2; shift 2
  in_ns "$n" env RUST_LOG="${CALL_LOG:-warn}" \
    "$BIN" call "$to" "$PROMPT" --json --timeout 30 --co-dir "$WORK/caller-$n" "$@"
}
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())$1)"; }
# bench_path LABEL NS ADDRESS ARGS…: with --bench N, N calls timed; one result line.
BENCH_LINES=()
bench_path() {
  [ "$BENCH" -gt 0 ] || return 0
  local label=$1 n=$2 to=$3; shift 3
  local times=() paths=() t0 t1 out
  for _ in $(seq 1 "$BENCH"); do
    t0=$(date +%s%N)
    out=$(PROMPT=ping call "$n" "$to" "$@") || fail "bench $label: a call failed"
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
    # Each call is a process that exits without closing its connections: the node
    # holds them until they time out, and takes 16 at once from one IP (a NAT's).
    sleep 1
    paths+=("$(echo "$out" | python3 -c 'import json,sys; o=json.load(sys.stdin); print(o.get("swarm_path") or o["path"])')")
  done
  BENCH_LINES+=("$(python3 -c 'import statistics,sys
t = sorted(int(x) for x in sys.argv[3].split())
p = ", ".join(sorted(set(sys.argv[4].split())))
median, p90 = statistics.median(t), t[int(0.9 * (len(t) - 1))]
print(f"| {sys.argv[1]} | {sys.argv[2]} | {median:.0f} | {p90} | {t[-1]} | {p} |")' \
    "$label" "${#times[@]}" "${times[*]}" "${paths[*]}")")
}
# A prompt of 60 KB in one word: the echo agent sends it back as a chunk and as the
# result, so a call carries at least 180 KB (its answer also holds the session's
# history); through a relay that is well within a circuit's 1 MiB.
PROMPT=$(head -c 60000 /dev/zero | tr '\0' 'x')
CALL_BYTES=$(( 3 * ${#PROMPT} ))

# --- 1. AutoNAT and reservations -------------------------------------------------------
log "1. B finds it is behind a NAT and reserves circuits"
for _ in $(seq 1 60); do
  state=$(info b 'i["p2p"]["reachability"], any("p2p-circuit" in a for a in i["p2p"]["listen_addrs"])' || true)
  [ "$state" = "private True" ] && break
  sleep 1
done
[ "$state" = "private True" ] || fail "B: reachability and circuit: got '$state'"
info b '"  B listens on", [a for a in i["p2p"]["listen_addrs"] if "p2p-circuit" in a]'
[ "$(metric oonode_relay_circuit_reservations)" -ge 1 ] || fail "relay 1 holds no reservation"
passed+=("1. AutoNAT: B is private and holds circuit reservations")

# --- 2. a call across both NATs, hole-punched -----------------------------------------
log "2. A calls B by address across both NATs"
# punched_call PROMPT: one call from A's network; sets path, result_len and relayed (the
# bytes the relays passed meanwhile, set-up included: each call is a new process that
# joins the swarm, dials the circuit and punches).
punched_call() {
  local before after
  before=$(relayed_bytes)
  out=$(PROMPT=$1 call a "$B" --via p2p --bootstrap "$R1")
  after=$(relayed_bytes)
  path=$(echo "$out" | field '["swarm_path"]')
  result_len=$(echo "$out" | field '["result"].__len__()')
  relayed=$(( after - before ))
}
punched_call hello
small=$relayed
log "  a 5-byte call: path $path; the relays passed $small bytes"
[ "$path" = "hole-punched" ] || fail "expected a hole-punched connection, got $path"
punched_call "$PROMPT"
opened=$(( $(metric oonode_relay_circuits_opened_total 1) + $(metric oonode_relay_circuits_opened_total 2) ))
log "  a ${#PROMPT}-byte call: path $path; result $result_len bytes; the relays passed $relayed bytes; circuits opened so far: $opened"
[ "$result_len" = "${#PROMPT}" ] || fail "the echo came back with $result_len bytes, not ${#PROMPT}"
[ "$path" = "hole-punched" ] || fail "expected a hole-punched connection, got $path"
[ "${opened:-0}" -ge 2 ] || fail "the calls did not start over a circuit"
# What the relay passes does not grow with the call: the call itself went direct.
growth=$(( relayed - small ))
[ "$growth" -lt $(( CALL_BYTES / 4 )) ] \
  || fail "the relays passed $growth more bytes for the ${CALL_BYTES}-byte call: it went through the relay"
passed+=("2. A→B across two NATs: circuit, then hole-punched; the relays passed $small bytes for a 5-byte call, $relayed for a ${CALL_BYTES}-byte one")
if [ "$BENCH" -gt 0 ]; then
  # A node on the public segment (in relay 2's namespace) for the direct path.
  # shellcheck disable=SC2046
  start c rel2 host --agent echo --co-dir "$WORK/c" --port 8001 --listen /ip4/10.99.0.11/udp/4002/quic-v1 \
    --listen /ip4/10.99.0.11/tcp/4002 --nat public --no-relay --bootstrap "$R1" --ready-json
  C=$(ready c address)
  sleep 3
  log "timing $BENCH calls per path"
  bench_path "direct (a public node)" a "$C" --via p2p --bootstrap "$R1"
  bench_path "hole-punched (NAT to NAT)" a "$B" --via p2p --bootstrap "$R1"
  bench_path "WebSocket relay" a "$B" --via relay --relay ws://10.99.0.10:8765
fi

# --- 3. hole punching blocked ----------------------------------------------------------
log "3. the NATs drop each other's packets: no hole punching"
in_ns r1 iptables -I FORWARD -i er1 -s 10.99.0.2 -j DROP
in_ns r1 iptables -I INPUT -i er1 -s 10.99.0.2 -j DROP
in_ns r2 iptables -I FORWARD -i er2 -s 10.99.0.1 -j DROP
in_ns r2 iptables -I INPUT -i er2 -s 10.99.0.1 -j DROP
before=$(relayed_bytes)
out=$(call a "$B" --via p2p --bootstrap "$R1")
after=$(relayed_bytes)
path=$(echo "$out" | field '["swarm_path"]')
result_len=$(echo "$out" | field '["result"].__len__()')
log "  path: $path; the relays passed $(( after - before )) bytes"
[ "$result_len" = "${#PROMPT}" ] || fail "the echo came back with $result_len bytes"
[ "$path" = "circuit" ] || fail "expected the circuit, got $path"
[ $(( after - before )) -ge "$CALL_BYTES" ] \
  || fail "the relays passed only $(( after - before )) bytes of a $CALL_BYTES-byte call"
circuit_bytes=$(( after - before ))
bench_path "circuit (punching blocked)" a "$B" --via p2p --bootstrap "$R1"
# And over the WebSocket relay, the other way.
out=$(call b "$A" --via relay --relay ws://10.99.0.10:8765)
[ "$(echo "$out" | field '["path"]')" = "relay" ] || fail "B→A over the WebSocket relay: $out"
in_ns r1 iptables -D FORWARD -i er1 -s 10.99.0.2 -j DROP
in_ns r1 iptables -D INPUT -i er1 -s 10.99.0.2 -j DROP
in_ns r2 iptables -D FORWARD -i er2 -s 10.99.0.1 -j DROP
in_ns r2 iptables -D INPUT -i er2 -s 10.99.0.1 -j DROP
passed+=("3. punching blocked: A→B over the circuit (the relays passed $circuit_bytes bytes), B→A over the WebSocket relay")

# --- 4. relay 1 killed ------------------------------------------------------------------
log "4. relay 1 killed (SIGKILL)"
kill -9 "${PIDS[relay1]}"
wait "${PIDS[relay1]}" 2>/dev/null || true
unset 'PIDS[relay1]'
ok=
for _ in $(seq 1 30); do
  if out=$(call a "$B" --via p2p --bootstrap "$R2" 2>>"$WORK/calls.log"); then ok=1; break; fi
  sleep 1
done
[ -n "$ok" ] || fail "A could not call B through relay 2's swarm"
swarm_path=$(echo "$out" | field '["swarm_path"]')
log "  over the swarm through relay 2: $swarm_path"
ok=
for _ in $(seq 1 30); do
  if out=$(call a "$B" --via relay --relay ws://10.99.0.11:8765 2>>"$WORK/calls.log"); then ok=1; break; fi
  sleep 1
done
[ -n "$ok" ] || fail "A could not call B through relay 2's WebSocket"
passed+=("4. relay 1 killed: A→B through relay 2's swarm ($swarm_path) and its WebSocket relay")

# --- 5. B's home relay changed ----------------------------------------------------------
log "5. relay 1 back (same key); B is homed on relay 2 now"
# shellcheck disable=SC2046
start relay1 rel1 relay $(relay_args 10.99.0.10 relay1) --bootstrap "$R2"
ready relay1 url >/dev/null
ok=
for _ in $(seq 1 30); do
  if out=$(call a "$B" --via relay --relay ws://10.99.0.10:8765 2>>"$WORK/calls.log"); then ok=1; break; fi
  sleep 1
done
[ -n "$ok" ] || fail "relay 1 did not pass A on to B's new home relay"
[ "$(metric oonode_relay_forwarded_connections_total)" -ge 1 ] \
  || fail "relay 1 answered without passing the caller on"
passed+=("5. B moved to relay 2: a caller knowing only relay 1 reaches it (passed on)")
log "done"
