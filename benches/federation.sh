#!/usr/bin/env bash
# Federated relays, measured: `benches/federation.sh [NODES] [RELAYS] [CALLS]`.
#
# Starts `oonode testnet up --nodes NODES --relays RELAYS` (default 50 and 5) with the
# release binary in a temporary directory, then measures:
#
#  1. home-relay resolution: every relay asked for every node homed on another relay
#     (GET /api/agents/{address}), after its 5 s cache has expired, so that each answer
#     is a fresh DHT lookup; p50, p90, max;
#  2. call latency per path, `oonode testnet call I J --via PATH` (the time it prints: from
#     before connect() to the answer, so connecting is included and process start is
#     not), CALLS calls each (default 20), median: direct (the node's HTTP endpoint),
#     p2p (the swarm), relay with both nodes on the same relay, relay with the callee on
#     another relay (passed on through the DHT);
#  3. each relay's RSS.
#
# Loopback only; stops everything it started (testnet down) on exit. Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-50}
relays=${2:-5}
calls=${3:-20}
bin=target/release/oonode
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
dir=$(mktemp -d)/net
trap '"$bin" testnet down --dir "$dir" >/dev/null 2>&1 || true' EXIT

echo "# federation: $nodes nodes over $relays relays, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
"$bin" testnet up --nodes "$nodes" --relays "$relays" --dir "$dir" --agents echo --timeout 60 2>&1 \
  | grep -E "testnet ready|relays finding"

sleep 6  # past the relays' 5 s cache of resolved homes
python3 - "$dir/testnet.json" <<'EOF'
import json, sys, time, urllib.request
state = json.load(open(sys.argv[1]))
relays = [state["relay"]] + state.get("more_relays", [])
times = []
for r, relay in enumerate(relays):
    for node in state["nodes"]:
        if node["relay"] == r:
            continue
        t = time.perf_counter()
        with urllib.request.urlopen(f"{relay['http']}/api/agents/{node['address']}") as res:
            body = json.load(res)
        times.append((time.perf_counter() - t) * 1000)
        assert body.get("home_relay"), body
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
print(f"home-relay resolution (fresh DHT lookup through the directory): {len(times)} lookups, "
      f"p50 {q(0.5):.1f} ms, p90 {q(0.9):.1f} ms, max {times[-1]:.1f} ms")
EOF

median_call() { # FROM TO VIA
  local ms=()
  for _ in $(seq "$calls"); do
    ms+=("$("$bin" testnet call "$1" "$2" "ping" --dir "$dir" --via "$3" 2>&1 >/dev/null \
      | sed -n 's/.*: \([0-9]*\) ms$/\1/p')")
  done
  printf '%s\n' "${ms[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
# Node I is on relay I mod RELAYS: 0 and RELAYS share relay 0; 0 and 1 do not.
echo "call latency, median of $calls (connect + one turn, in the caller):"
echo "  direct (HTTP endpoint):          $(median_call 0 1 direct) ms"
echo "  p2p (swarm):                     $(median_call 0 1 p2p) ms"
echo "  relay, same relay:               $(median_call 0 "$relays" relay) ms"
echo "  relay, callee on another relay:  $(median_call 0 1 relay) ms"
python3 - "$dir/testnet.json" <<'EOF'
import json, sys
state = json.load(open(sys.argv[1]))
for r in [state["relay"]] + state.get("more_relays", []):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{r['pid']}/status") if l.startswith("VmRSS"))
    print(f"  {r['name']}: RSS {rss / 1024:.1f} MiB")
EOF
