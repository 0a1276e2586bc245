#!/usr/bin/env bash
# Builds the browser participant into web/pkg (never committed): crates/web for wasm32, then
# wasm-bindgen (the CLI pinned to the wasm-bindgen version in Cargo.lock, installed with cargo
# if missing), then wasm-opt from npm's binaryen when npm is available (TESSERA_WASM_OPT=0 skips
# it), then a gzipped copy that the relay serves to browsers that accept gzip; the same for the
# threaded CPU bundle in web/pkg/threads when a nightly toolchain is there (below).
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

# The threaded CPU bundle (web/pkg/threads): flex's kernels on a pool of Web Workers. Shared
# memory needs a std built with atomics, so nightly with rust-src (-Z build-std), in its own
# target folder. Without them (or with TESSERA_WEB_THREADS=0) it is skipped and tabs train the
# CPU on one thread, as before.
threads_wasm=""
if [ "${TESSERA_WEB_THREADS:-1}" != 0 ]; then
  if rustup run nightly rustc -V >/dev/null 2>&1 \
    && { rustup component list --toolchain nightly --installed | grep -qx rust-src \
      || rustup component add --toolchain nightly rust-src; } \
    && { rustup target list --toolchain nightly --installed | grep -qx wasm32-unknown-unknown \
      || rustup target add --toolchain nightly wasm32-unknown-unknown; }; then
    # Shared, imported memory (up to 4 GiB) and the thread-local exports wasm-bindgen's thread
    # support needs: spelled out, since this nightly's rustc no longer adds them for +atomics.
    link="--shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls"
    link="$link --export=__tls_size --export=__tls_align --export=__tls_base"
    RUSTFLAGS="-C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals $(printf -- ' -C link-arg=%s' $link)" \
      CARGO_PROFILE_RELEASE_DEBUG=false rustup run nightly cargo build -Z build-std=panic_abort,std \
      --release --target wasm32-unknown-unknown -p tessera-web --no-default-features --features threads \
      --target-dir "$target_dir/threads"
    threads_wasm="$target_dir/threads/wasm32-unknown-unknown/release/tessera_web.wasm"
  else
    echo "warning: no nightly toolchain with rust-src and wasm32: the threaded CPU bundle is not built" >&2
  fi
fi

if [ -f "$out/tessera_web_bg.wasm" ] && [ -f "$out/.built" ] && ! [ "$wasm" -nt "$out/.built" ] \
  && { [ -z "$threads_wasm" ] || { [ -f "$out/threads/tessera_web_bg.wasm" ] && ! [ "$threads_wasm" -nt "$out/.built" ]; }; }; then
  echo "web bundle up to date: $out"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# bindgen DIR WASM [wasm-opt flags]: the JS glue and the optimised, gzipped module into DIR.
bindgen() {
  local dir="$1" wasm="$2"
  shift 2
  "$bindgen" --target web --no-typescript --out-dir "$dir" "$wasm"
  if [ "${TESSERA_WASM_OPT:-1}" != 0 ] && command -v npm >/dev/null; then
    local opt="$tools/node_modules/.bin/wasm-opt"
    if ! [ -x "$opt" ]; then
      echo "installing binaryen (wasm-opt) from npm into $tools" >&2
      npm install --silent --prefix "$tools" binaryen@132 >/dev/null
    fi
    "$opt" -O2 --enable-simd --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
      --enable-mutable-globals --enable-reference-types --enable-multivalue "$@" \
      "$dir/tessera_web_bg.wasm" -o "$dir/opt.wasm"
    mv "$dir/opt.wasm" "$dir/tessera_web_bg.wasm"
  fi
  gzip -9 -k "$dir/tessera_web_bg.wasm"
}
bindgen "$tmp" "$wasm"
[ -z "$threads_wasm" ] || bindgen "$tmp/threads" "$threads_wasm" --enable-threads
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
trap - EXIT
chmod 755 "$out"
touch "$out/.built"
find "$out" -name '*.wasm*' -printf '  %-36P %10s bytes\n'
