#!/usr/bin/env bash
# Encoder throughput side by side, in one run on one machine: streambed (candle) and
# sentence-transformers (PyTorch, fp32 and bf16 autocast) on the same model folders and the
# same KorSTS sentences. Needs a Python with sentence-transformers: PYTHON=/path/to/python.
#   bench/compare.sh [N_SENTENCES] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1024}
B=${2:-32}
PY=${PYTHON:-python3}
BIN=target/release/streambed
DATA=datasets/korsts/sts-dev.tsv
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in multilingual-e5-small klue-bert-base-random; do
  prefix=""; [[ $m == multilingual-e5-small ]] && prefix="query: "
  echo "== $m (batch $B, $N sentences)"
  for d in f32 int8; do
    $BIN bench --model "models/$m" --prefix "$prefix" --input $DATA --batch-size "$B" --limit "$N" --dtype $d 2>/dev/null | sed 's/^/streambed /'
  done
  "$PY" bench/st_bench.py --model "models/$m" --prefix "$prefix" --input $DATA --batch-size "$B" --limit "$N" --bf16 2>/dev/null
done
