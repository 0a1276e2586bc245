#!/usr/bin/env bash
# The relay's throughput on its two stores, side by side in one run: the embedded store (SQLite +
# local files) and PostgreSQL + an S3-compatible server (moto's), each with the same relay
# settings (tiny, defaults) and the same native CPU participants for the same time. Prints
# versions/s, accepted updates/s and the mean time of the two durable writes (an accepted
# update's commit; a version's checkpoint + object store + version row), from /metrics.
#
#   tools/bench/stores.sh [SECONDS] [PARTICIPANTS]     (defaults: 60 s, 3)
#
# Needs the release binaries (cargo build --release --workspace --bins), Debian's postgresql
# and moto[server] in the venv tools/test-all.sh makes (or MOTO_SERVER=path).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
hosts="${2:-3}"
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
bin="$target/release"
moto="${MOTO_SERVER:-$target/py/bin/moto_server}"
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  chown nobody:nogroup "$work"
  as_pg=(setpriv --reuid=nobody --regid=nogroup --clear-groups --reset-env)
fi
mkdir -p "$work/pg"
[ "$(id -u)" -ne 0 ] || chown nobody:nogroup "$work/pg"
"${as_pg[@]}" "$pgbin/initdb" -U tessera -A trust -E UTF8 -D "$work/pg" >/dev/null
pgport=$((20000 + RANDOM % 20000))
"${as_pg[@]}" "$pgbin/postgres" -D "$work/pg" -p "$pgport" -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories= >"$work/pg.log" 2>&1 &
pids+=($!)
s3port=$((pgport + 1))
"$moto" -H 127.0.0.1 -p "$s3port" >"$work/s3.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -X PUT "http://127.0.0.1:$s3port/tessera" >/dev/null && break
  sleep 0.2
done
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3port" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1

metric() { awk -v m="$1" '$1 == m {print $2}' "$2"; }

run() {
  local name="$1"; shift
  local port=$((pgport + 10 + RANDOM % 1000)) dir="$work/$name"
  mkdir -p "$dir"
  "$bin/tessera-relay" --listen "127.0.0.1:$port" --db "$dir/relay.db" --checkpoints "$dir/ck" \
    --key "$dir/relay.key" "$@" >"$dir/relay.log" 2>&1 &
  local relay=$!
  pids+=("$relay")
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/api/status" >/dev/null && break; sleep 0.2; done
  local hp=()
  for i in $(seq "$hosts"); do
    "$bin/tessera-host" join "ws://127.0.0.1:$port/ws" --backend cpu --key "$dir/h$i.key" \
      >"$dir/h$i.log" 2>&1 &
    hp+=($!)
    pids+=($!)
  done
  sleep 5 # start-up: corpus, first weights
  curl -sf "http://127.0.0.1:$port/metrics" >"$dir/m0"
  sleep "$secs"
  curl -sf "http://127.0.0.1:$port/metrics" >"$dir/m1"
  kill -9 "${hp[@]}" "$relay" 2>/dev/null || true
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
run "sqlite + files"
run "postgres + s3 (moto)" --store "postgres://tessera@127.0.0.1:$pgport/postgres" --blobs s3://tessera/bench
