#!/usr/bin/env bash
# Connections: a relay on loopback and tessera-loadgen holding COUNT participant connections
# (ed25519 hello each), one heartbeat per connection every 5 s for SECS seconds; prints how many
# were held and the p50/p99 heartbeat acknowledgement latency. Loopback only, bounded.
#
#     cargo build --release --workspace --bins
#     tools/bench/connections.sh [COUNT] [SECS]      # default 10000 30
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNT="${1:-10000}"
SECS="${2:-30}"
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK="$(mktemp -d)"
PORT=8792
ulimit -n "$(ulimit -Hn)"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
RUST_LOG=warn "$BIN/tessera-relay" --listen 127.0.0.1:$PORT --db "$WORK/relay.db" --checkpoints "$WORK/ckpt" > "$WORK/relay.log" 2>&1 &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/status" >/dev/null && break; sleep 0.2; done
"$BIN/tessera-loadgen" --url "ws://127.0.0.1:$PORT/ws" --count "$COUNT" --secs "$SECS" --period-ms 5000
echo "relay RSS: $(ps -o rss= -p "$(jobs -p | head -1)" | awk '{printf "%.0f MB", $1/1024}')" >&2
