# Sourced by the store benchmarks: starts a PostgreSQL (as nobody when root) and moto's S3
# server in a temporary folder, both killed on exit. Sets: bin, work, pgport, s3port, pids,
# the AWS_* environment; `start_relay NAME PORT ARGS…` starts a relay whose log and files are
# in $work/NAME and waits until it serves /api/status.
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
  -c unix_socket_directories= -c max_connections=200 >"$work/pg.log" 2>&1 &
pids+=($!)
s3port=$((pgport + 1))
"$moto" -H 127.0.0.1 -p "$s3port" >"$work/s3.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -X PUT "http://127.0.0.1:$s3port/tessera" >/dev/null && break
  sleep 0.2
done
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3port" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1

start_relay() {
  local name="$1" port="$2"; shift 2
  mkdir -p "$work/$name"
  "$bin/tessera-relay" --listen "127.0.0.1:$port" --db "$work/$name/relay.db" \
    --checkpoints "$work/$name/ck" "$@" >"$work/$name/relay.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/api/status" >/dev/null && return; sleep 0.2; done
  echo "relay $name did not start: $(tail -5 "$work/$name/relay.log")" >&2
  return 1
}
