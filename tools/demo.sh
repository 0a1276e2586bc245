#!/usr/bin/env bash
# The README's run command: builds the relay, the native host and the browser bundle (when
# missing or stale), then starts the relay on 127.0.0.1:8700 with the embedded corpus and one
# native participant, printing the page's URL (open it and press Join to train in the tab too)
# and the validation loss as it falls. Extra arguments go to tessera-relay (see --help).
# State lives in ./relay-data: run it again to continue the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same build as the test command (one feature set, one cache).
cargo build --release --workspace --bins
tools/build-web.sh || echo "warning: the browser bundle could not be built; tabs cannot join" >&2
exec "${CARGO_TARGET_DIR:-target}/release/tessera-relay" --demo "$@"
