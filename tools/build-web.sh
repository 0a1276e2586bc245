#!/usr/bin/env bash
# Builds the browser participant into web/pkg (never committed): crates/web for wasm32, then
# wasm-bindgen (the CLI pinned to the wasm-bindgen version in Cargo.lock, installed with cargo
# if missing), then wasm-opt from npm's binaryen when npm is available (TESSERA_WASM_OPT=0 skips
# it), then a gzipped copy that the relay serves to browsers that accept gzip.
# Cheap when nothing changed: cargo is incremental and the later steps run only on a new .wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
out=web/pkg
tools="${TESSERA_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-tools}"

rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || rustup target add wasm32-unknown-unknown
version=$(awk '$0 == "name = \"wasm-bindgen\"" {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
[ -n "$version" ] || { echo "no wasm-bindgen in Cargo.lock" >&2; exit 1; }
bindgen="$tools/bin/wasm-bindgen"
if ! [ -x "$bindgen" ] || [ "$("$bindgen" --version | awk '{print $2}')" != "$version" ]; then
  echo "installing wasm-bindgen-cli $version into $tools" >&2
  cargo install --quiet --root "$tools" wasm-bindgen-cli --version "$version"
fi

# No debug info in the bundle: it only adds megabytes to download.
CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --target wasm32-unknown-unknown -p tessera-web
wasm="$target_dir/wasm32-unknown-unknown/release/tessera_web.wasm"
if [ -f "$out/tessera_web_bg.wasm" ] && [ -f "$out/.built" ] && ! [ "$wasm" -nt "$out/.built" ]; then
  echo "web bundle up to date: $out"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$bindgen" --target web --no-typescript --out-dir "$tmp" "$wasm"
if [ "${TESSERA_WASM_OPT:-1}" != 0 ] && command -v npm >/dev/null; then
  opt="$tools/node_modules/.bin/wasm-opt"
  if ! [ -x "$opt" ]; then
    echo "installing binaryen (wasm-opt) from npm into $tools" >&2
    npm install --silent --prefix "$tools" binaryen@132 >/dev/null
  fi
  "$opt" -O2 --enable-simd --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    "$tmp/tessera_web_bg.wasm" -o "$tmp/opt.wasm"
  mv "$tmp/opt.wasm" "$tmp/tessera_web_bg.wasm"
fi
gzip -9 -k "$tmp/tessera_web_bg.wasm"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
trap - EXIT
chmod 755 "$out"
touch "$out/.built"
ls -l "$out" | awk 'NR > 1 {printf "  %-26s %10d bytes\n", $9, $5}'
