#!/usr/bin/env bash
# Runs a Rust program built for wasm32-wasip1 in headless Chromium (V8 as a tab runs it), with
# the minimal WASI of tools/bench/wasi.html, and prints its standard output.
#
#     tools/bench/wasi-chromium.sh PROGRAM.wasm [ARGS...]
#
# Needs Debian's chromium and python3 (a static file server on a free loopback port).
set -euo pipefail
wasm=$(realpath "$1"); shift
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'kill $server 2>/dev/null; pkill -f "user-data-dir=$dir/profile" 2>/dev/null; sleep 0.5; rm -rf "$dir" 2>/dev/null || true' EXIT
cp "$here/wasi.html" "$dir/index.html"
ln -s "$wasm" "$dir/program.wasm"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$dir" >/dev/null 2>&1 &
server=$!
sleep 0.5
args=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(" ".join(sys.argv[1:])))' "$@")
chromium --headless=new --no-sandbox --disable-gpu --enable-logging=stderr --v=0 \
  --user-data-dir="$dir/profile" "http://127.0.0.1:$port/index.html?wasm=program.wasm&args=$args" \
  >/dev/null 2>"$dir/log" &
for _ in $(seq 1200); do
  grep -q '"OUT DONE"\|OUT DONE' "$dir/log" && break
  sleep 0.5
done
grep -o 'OUT .*' "$dir/log" | sed 's/^OUT //; s/", source.*//' | grep -v '^DONE$'
