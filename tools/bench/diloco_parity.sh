#!/usr/bin/env bash
# Learning parity: the baby config on tinyshakespeare trained by 4 native participants through
# the relay (asynchronous DiLoCo, K = 4 updates per round, H inner steps per unit), with the same
# total tokens as the 2000-iteration single-node baseline (2000 x 12 x 64). Prints the final
# validation loss (same 50 validation batches as `tessera-host train`) and the bytes the
# participants sent against DDP's f32 gradient every step.
#
#     cargo build --release --workspace --bins
#     tools/bench/diloco_parity.sh [H [relay options…]]     # default H = 25
#     HOST_ARGS=--keep-optimizer tools/bench/diloco_parity.sh 25   # participants' options
set -euo pipefail
cd "$(dirname "$0")/../.."
H="${1:-25}"
RELAY_ARGS=("${@:2}")
read -r -a HOST_ARGS <<< "${HOST_ARGS:-}"
BIN="${CARGO_TARGET_DIR:-target}/release"
DATA="../shared/data/tinyshakespeare.txt"
VERSIONS=$((2000 / (4 * H)))
WORK="$(mktemp -d)"
PORT=8791
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
"$BIN/tessera-relay" --listen 127.0.0.1:$PORT --db "$WORK/relay.db" --checkpoints "$WORK/ckpt" \
  --config baby --data "$DATA" --inner-steps "$H" --batch 12 --inner-lr 1e-3 \
  --inner-lr-decay-versions "$VERSIONS" --updates-per-round 4 --max-versions "$VERSIONS" \
  --max-staleness 4 --eval-iters 50 "${RELAY_ARGS[@]}" > "$WORK/relay.log" 2>&1 &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/status" >/dev/null && break; sleep 0.2; done
start=$(date +%s)
for i in 1 2 3 4; do
  "$BIN/tessera-host" join "ws://127.0.0.1:$PORT/ws" --backend cpu --key "$WORK/h$i.key" "${HOST_ARGS[@]}" > "$WORK/h$i.log" 2>&1 &
done
while :; do
  s=$(curl -sf "http://127.0.0.1:$PORT/api/status")
  done_v=$(echo "$s" | python3 -c "import json,sys; s=json.load(sys.stdin); h=s['val_loss_history']; print(1 if h and h[-1][0] >= $VERSIONS else 0)")
  [ "$done_v" = 1 ] && break
  sleep 2
done
end=$(date +%s)
bytes=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^tessera_update_bytes_total/ {print $2}')
echo "$s" | python3 -c "
import json, sys
s = json.load(sys.stdin)
h = s['val_loss_history']
params = 834304
steps_total = 2000
ddp_bytes = steps_total * params * 4        # f32 gradient per step, summed over the 4 workers' steps
sent = float('$bytes')
print(json.dumps({'H': $H, 'versions': h[-1][0], 'val_loss': round(h[-1][1], 4), 'accepted_updates': s['accepted_updates'],
  'tokens_folded': $VERSIONS * 4 * $H * 12 * 64, 'wall_s': $end - $start,
  'bytes_sent': int(sent), 'ddp_bytes': ddp_bytes, 'bytes_ratio_vs_ddp': round(sent / ddp_bytes, 4)}))
"
