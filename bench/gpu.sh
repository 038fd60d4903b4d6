#!/usr/bin/env bash
# GPU figures (issue #5): streambed (candle, CUDA) against sentence-transformers on the same
# GPU, in one run, on the same seeded random weights and 50k KorSTS sentences.
#
#   here:  scripts/build-cuda.sh && bench/gpu.sh prepare      (.tools/gpu: ~25 MB to carry)
#   GPU:   bench/gpu.sh run [OUT_DIR]                          (needs PyTorch +
#          sentence-transformers, the NVIDIA driver, and CUDA 13 libraries, e.g. PyTorch's)
#          bench/gpu.sh profile                               (per-kernel GPU time, Nsight
#          Compute; BERT-base shape, f16, batch 512, warm-up + 3 batches; ~40 s)
#
# Real weights do not travel (the GPU machine takes at most 64 MiB), so both models are
# random-weight copies with the real configuration and tokenizer: klue/bert-base's shape
# (WordPiece vocab.txt) and multilingual-e5-small's (its real tokenizer.json). The same
# folders serve both engines. The run also checks GPU against CPU vectors on those weights.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.tools/gpu

case "${1:-}" in
prepare)
  test -f $GPU/streambed.gz || { echo "run scripts/build-cuda.sh first" >&2; exit 1; }
  src=${STREAMBED_MODELS:-models}/multilingual-e5-small
  rm -rf $GPU/e5-small-like && cp -r "$src" $GPU/e5-small-like
  find $GPU/e5-small-like \( -name '*.safetensors' -o -name '*.bin' \) -delete
  gzip -f $GPU/e5-small-like/tokenizer.json
  du -sh $GPU
  ;;
run)
  OUT=${2:-/tmp/gpu-out}; mkdir -p "$OUT"
  W=$(mktemp -d)
  gunzip -c $GPU/streambed.gz >"$W/streambed" && chmod +x "$W/streambed"
  cu13=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null || true)
  [[ -d "$cu13" ]] || cu13=$(find / -path '*nvidia/cu13/lib' -type d 2>/dev/null | head -n1)
  export LD_LIBRARY_PATH="$cu13:${LD_LIBRARY_PATH:-}"
  SB="$W/streambed"
  if ldd "$SB" | grep 'not found'; then echo "missing libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2; exit 1; fi
  set +e  # one failing measurement must not hide the others
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, sentence_transformers as s; print("torch", torch.__version__, "sentence-transformers", s.__version__)'
  cp -r $GPU/e5-small-like "$W/e5-tok" && gunzip "$W/e5-tok/tokenizer.json.gz"
  "$SB" model random-klue --out "$W/klue" --seed 7
  "$SB" model random-like --like "$W/e5-tok" --out "$W/e5" --seed 7
  DATA=datasets/korsts/sts-train.tsv

  # GPU against CPU on the same weights: Korean, long unspaced text past 512 tokens, emoji,
  # mixed scripts.
  python3 - "$W/check.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open("datasets/korsts/sts-dev.tsv", encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
lines = [r[5] for r in rows[:200]]
lines += ["가나다라마바사아자차카타파하" * 150, "서울 Seoul 東京 🚀🔥 mixed 텍스트 123", "😀" * 40, "한국어 문장입니다. " * 120]
open(sys.argv[1], "w", encoding="utf-8").write("\n".join(lines) + "\n")
PY
  for m in klue e5; do
    prefix=""; [[ $m == e5 ]] && prefix="query: "
    "$SB" embed --model "$W/$m" --prefix "$prefix" --batch-size 64 <"$W/check.txt" >"$W/$m-cpu.jsonl"
    dts="f32 f16"; [[ -n "${QUICK:-}" ]] && dts="f16"
    for dt in $dts; do
      "$SB" embed --model "$W/$m" --prefix "$prefix" --device cuda --dtype $dt --batch-size 64 <"$W/check.txt" >"$W/$m-cuda-$dt.jsonl"
      python3 - "$W/$m-cpu.jsonl" "$W/$m-cuda-$dt.jsonl" "$m cuda $dt vs cpu f32" <<'PY'
import json, sys, numpy as np
a = [json.loads(l)["vector"] for l in open(sys.argv[1])]
b = [json.loads(l)["vector"] for l in open(sys.argv[2])]
a, b = np.array(a), np.array(b)
cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
print(f"check {sys.argv[3]}: n={len(cos)} min_cosine={cos.min():.6f} mean_cosine={cos.mean():.6f} nan={int(np.isnan(b).any())}")
PY
    done
  done

  for m in klue e5; do
    prefix=""; [[ $m == e5 ]] && prefix="query: "
    echo "== $m: 50000 KorSTS sentences"
    run() { # dtype batch streams
      "$SB" bench --model "$W/$m" --prefix "$prefix" --device cuda --dtype "$1" --batch-size "$2" \
        --streams "$3" --input $DATA --repeat-to 50000 --orders pipelined --tokenizer-threads 8 \
        2>/dev/null | sed "s/^/streambed /"
    }
    if [[ -n "${QUICK:-}" ]]; then  # QUICK=1: the headline figures only (~2 minutes)
      run f16 512 1
      python3 bench/st_bench.py --model "$W/$m" --prefix "$prefix" --device cuda --batch-size 512 \
        --input $DATA --repeat-to 50000 --dtypes fp32,fp16 2>/dev/null
      continue
    fi
    for streams in 1 2 3; do run f16 512 "$streams"; done
    run f16 1024 2
    run f16 128 2
    run f32 512 1
    run f32 512 2
    python3 bench/st_bench.py --model "$W/$m" --prefix "$prefix" --device cuda --batch-size 512 \
      --input $DATA --repeat-to 50000 --dtypes fp32,fp16,bf16 2>/dev/null
  done
  ;;
profile)
  W=$(mktemp -d)
  gunzip -c $GPU/streambed.gz >"$W/streambed" && chmod +x "$W/streambed"
  cu13=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))')
  export LD_LIBRARY_PATH="$cu13:${LD_LIBRARY_PATH:-}"
  "$W/streambed" model random-klue --out "$W/klue" --seed 7
  ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
    "$W/streambed" bench --model "$W/klue" --device cuda --dtype f16 --batch-size 512 \
    --input datasets/korsts/sts-train.tsv --repeat-to 1536 --orders pipelined --tokenizer-threads 4
  ;;
*)
  echo "usage: bench/gpu.sh prepare | run [OUT_DIR] | profile" >&2; exit 2 ;;
esac
