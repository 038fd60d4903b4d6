#!/usr/bin/env bash
# Fuzzes message decoding and id derivation (fuzz/fuzz_targets/decode.rs) for a bounded time:
#   scripts/fuzz.sh [SECONDS]        (default 60)
# cargo-fuzz wants a nightly compiler for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no second toolchain is installed. The target builds only
# crates/decode (not the model or store stacks), so this costs well under a minute to build.
# A crash leaves its input in fuzz/artifacts/decode/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O decode
cargo fuzz run -O decode -- -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -timeout=10
