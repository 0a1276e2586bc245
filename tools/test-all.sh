#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian machine: installs what the tests need
# (lavapipe, a software Vulkan driver, so the wgpu backend has an adapter without a GPU; Debian's
# Chromium for the browser tests; Python's cryptography for the independent ledger verifier;
# PostgreSQL for the relays that share a run; a venv with the official openai client for the
# completions API and moto's S3-compatible server for the relays' object store),
# checks formatting and lints (native and wasm32), builds the binaries and the browser bundle,
# then runs the whole test suite. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mesa-vulkan-drivers libvulkan1 chromium fonts-dejavu-core python3 python3-cryptography python3-venv postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
# The end-to-end tests start the real binaries, and the browser tests load the real bundle.
cargo build --release --workspace --bins
tools/build-web.sh
CARGO_PROFILE_RELEASE_DEBUG=false cargo clippy --release --target wasm32-unknown-unknown -p tessera-web -- -D warnings
# The CPU-only build (the threaded bundle's code, without the nightly-only atomics).
CARGO_PROFILE_RELEASE_DEBUG=false cargo clippy --release --target wasm32-unknown-unknown -p tessera-web --no-default-features -- -D warnings
# The official openai client, for the completions API test, and moto's S3 server, for the
# relays' object store (in a venv beside the build).
py="$(realpath -m "${CARGO_TARGET_DIR:-target}")/py"
[ -x "$py/bin/python" ] || python3 -m venv "$py"
"$py/bin/python" -c "import openai" 2>/dev/null || "$py/bin/pip" install -q openai
[ -x "$py/bin/moto_server" ] || "$py/bin/pip" install -q 'moto[server]'
export TESSERA_PYTHON="$py/bin/python"
log="$(mktemp)"
set +e
cargo test --release --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one summary per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
exit "$status"
