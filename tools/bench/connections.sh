#!/usr/bin/env bash
# Connections: a relay on loopback and tessera-loadgen holding COUNT participant connections
# (ed25519 hello each), one heartbeat per connection every 5 s for SECS seconds; prints how many
# were held and the p50/p99 heartbeat acknowledgement latency. Loopback only, bounded. With
# EDGES > 0 the run is kept in PostgreSQL + S3 (moto), as tools/bench/stores.sh does, and the
# connections are spread over EDGES edge relays (--edge) that forward to the leader.
#
#     cargo build --release --workspace --bins
#     tools/bench/connections.sh [COUNT] [SECS] [EDGES]      # default 10000 30 0
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNT="${1:-10000}"
SECS="${2:-30}"
ulimit -n "$(ulimit -Hn)"
if [ "${3:-0}" -eq 0 ]; then
  BIN="${CARGO_TARGET_DIR:-target}/release"
  WORK="$(mktemp -d)"
  PORT=8792
  trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
  RUST_LOG=warn "$BIN/tessera-relay" --listen 127.0.0.1:$PORT --db "$WORK/relay.db" --checkpoints "$WORK/ckpt" > "$WORK/relay.log" 2>&1 &
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/status" >/dev/null && break; sleep 0.2; done
  "$BIN/tessera-loadgen" --url "ws://127.0.0.1:$PORT/ws" --count "$COUNT" --secs "$SECS" --period-ms 5000
  echo "relay RSS: $(ps -o rss= -p "$(jobs -p | head -1)" | awk '{printf "%.0f MB", $1/1024}')" >&2
  exit 0
fi
EDGES="$3"
. tools/bench/stores-lib.sh
port=$((pgport + 10))
store=(--store "postgres://tessera@127.0.0.1:$pgport/postgres" --blobs s3://tessera/run --key "$work/relay.key")
RUST_LOG=warn start_relay leader "$port" "${store[@]}"
urls=()
for e in $(seq "$EDGES"); do
  RUST_LOG=warn start_relay "edge$e" $((port + e)) "${store[@]}" --edge
  urls+=("ws://127.0.0.1:$((port + e))/ws")
done
"$bin/tessera-loadgen" --url "$(IFS=,; echo "${urls[*]}")" --count "$COUNT" --secs "$SECS" --period-ms 5000 &
load=$!
sleep $((SECS - 3))
# Read near the end of the load, while the connections are held.
for p in $(seq 0 "$EDGES"); do
  name=leader; [ "$p" -eq 0 ] || name="edge$p"
  pid=$(pgrep -f -- "--listen 127.0.0.1:$((port + p)) " | head -1)
  m=$(curl -sf "http://127.0.0.1:$((port + p))/metrics")
  echo "$name: RSS $(ps -o rss= -p "$pid" | awk '{printf "%.0f MB", $1/1024}'), $(echo "$m" | awk '$1 == "tessera_connections" {print $2}') connections, $(echo "$m" | awk '$1 == "tessera_forwarded_calls_total" {c=$2} $1 == "tessera_forwarded_call_microseconds_total" {u=$2} END {if (c) printf "%d calls forwarded, mean %.2f ms", c, u / c / 1000}')" >&2
done
wait "$load"
