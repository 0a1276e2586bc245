#!/usr/bin/env bash
# The relay's throughput on its two stores, side by side in one run: the embedded store (SQLite +
# local files) and PostgreSQL + an S3-compatible server (moto's), each with the same relay
# settings (tiny, defaults) and the same native CPU participants for the same time. Prints
# versions/s, accepted updates/s and the mean time of the two durable writes (an accepted
# update's commit; a version's checkpoint + object store + version row), from /metrics. A third
# row runs the PostgreSQL + S3 store with the participants on 3 edge relays (--edge), which
# forward their calls to the leader.
#
#   tools/bench/stores.sh [SECONDS] [PARTICIPANTS]     (defaults: 60 s, 3)
#
# Needs the release binaries (cargo build --release --workspace --bins), Debian's postgresql
# and moto[server] in the venv tools/test-all.sh makes (or MOTO_SERVER=path).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
hosts="${2:-3}"
. tools/bench/stores-lib.sh

metric() { awk -v m="$1" '$1 == m {print $2}' "$2"; }

# run NAME EDGES [RELAY ARGS…]: a leading relay, EDGES edge relays (0: none) and the
# participants (spread over the edges when there are any).
run() {
  local name="$1" edges="$2"; shift 2
  local port=$((pgport + 10 + RANDOM % 1000)) dir="$work/$name" first=${#pids[@]}
  start_relay "$name" "$port" --key "$work/$name/relay.key" "$@"
  local urls=()
  if [ "$edges" -eq 0 ]; then
    urls=("ws://127.0.0.1:$port/ws")
  else
    for e in $(seq "$edges"); do
      start_relay "$name-edge$e" $((port + e)) --key "$work/$name/relay.key" --edge "$@"
      urls+=("ws://127.0.0.1:$((port + e))/ws")
    done
  fi
  local hp=()
  for i in $(seq "$hosts"); do
    "$bin/tessera-host" join "${urls[$((i % ${#urls[@]}))]}" --backend cpu --key "$dir/h$i.key" \
      >"$dir/h$i.log" 2>&1 &
    hp+=($!)
    pids+=($!)
  done
  sleep 5 # start-up: corpus, first weights
  curl -sf "http://127.0.0.1:$port/metrics" >"$dir/m0"
  sleep "$secs"
  curl -sf "http://127.0.0.1:$port/metrics" >"$dir/m1"
  kill -9 "${pids[@]:$first}" 2>/dev/null || true
  python3 - "$name" "$secs" "$dir/m0" "$dir/m1" <<'EOF'
import sys
name, secs, a, b = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
def read(p):
    out = {}
    for line in open(p):
        if line.startswith("#") or not line.strip():
            continue
        k, v = line.split()[:2]
        out[k] = float(v)
    return out
m0, m1 = read(a), read(b)
d = lambda k: m1.get(k, 0) - m0.get(k, 0)
versions = d("tessera_version_writes_total")
commits = d("tessera_update_commits_total")
print(f"{name:22} {versions / secs:8.2f} versions/s {commits / secs:8.2f} updates/s "
      f"commit {d('tessera_update_commit_microseconds_total') / max(commits, 1) / 1000:7.2f} ms "
      f"version write {d('tessera_version_write_microseconds_total') / max(versions, 1) / 1000:7.2f} ms")
EOF
}

echo "tiny, defaults, $hosts native CPU participants, ${secs} s each"
run "sqlite + files" 0
run "postgres + s3 (moto)" 0 --store "postgres://tessera@127.0.0.1:$pgport/postgres" --blobs s3://tessera/bench
# One run per database: the edges' run gets its own.
psql -q -h 127.0.0.1 -p "$pgport" -U tessera -d postgres -c "CREATE DATABASE edges"
run "postgres + s3, 3 edges" 3 --store "postgres://tessera@127.0.0.1:$pgport/edges" --blobs s3://tessera/edges
