#!/usr/bin/env bash
# Encoder throughput side by side, in one run on one machine, text in -> vectors out for
# every engine (tokenisation included), same model folders, same KorSTS dev sentences,
# same batch size and thread count:
#   streambed f32 and int8   `streambed bench --orders pipelined` (length-sorted batches,
#                            tokenised on other threads while the model runs). f32 is the
#                            default `--f32-matmul high` (bf16x3 on AMX-BF16 processors,
#                            f32 products elsewhere: see each line's kernel=), as
#                            streambed-f32-highest f32 products everywhere, and as
#                            streambed-f32-medium one bf16 product on AMX-BF16
#   sentence-transformers    PyTorch fp32, `SentenceTransformer.encode` (sorts by length),
#                            and bf16 under CPU autocast (pytorch-bf16)
#   ONNX Runtime fp32, int8  the folder exported to ONNX, ORT's BERT fusions, int8 by
#                            quantize_dynamic per channel (bench/ort_bench.py; sorts by length)
# Engines run in interleaved rounds (the machines drift); the summary gives each figure's
# median over the rounds and the median of the same-round ratios.
#   PYTHON=$(bench/setup-reference.sh) bench/compare.sh [N_SENTENCES] [BATCH] [ROUNDS]
# MODELS="multilingual-e5-small" limits the models; STREAMBED_BIN=path times another build.
# NO_AMX=1 denies AMX to every engine (bench/noamx.c, preloaded): on an Intel Xeon with
# AMX it times what one without AMX exposed runs (AVX-512 FMA, VNNI) against the
# references on the same fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1024}
B=${2:-32}
ROUNDS=${3:-3}
THREADS=${THREADS:-$(nproc)}
PY=${PYTHON:-.tools/bench-venv/bin/python}
BIN=${STREAMBED_BIN:-target/release/streambed}
DATA=datasets/korsts/sts-dev.tsv
MODELS=${MODELS:-"multilingual-e5-small klue-bert-base-random"}
[ -x "$BIN" ] || cargo build --release --locked
if [[ ${NO_AMX:-} == 1 ]]; then
  shim=$(mktemp --suffix=.so)
  cc -O2 -shared -fPIC -o "$shim" bench/noamx.c -ldl
  export LD_PRELOAD=$shim
fi
out=$(mktemp)
trap 'rm -f "$out" ${shim:+"$shim"}' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
[[ -n ${shim:-} ]] && echo "AMX denied to every engine (NO_AMX=1, bench/noamx.c)"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_int8|amx_bf16)$' | xargs)"
for m in $MODELS; do
  prefix=""; [[ $m == multilingual-e5-small ]] && prefix="query: "
  "$PY" bench/ort_bench.py --model "models/$m" --input $DATA --export-only 2>/dev/null
done
for r in $(seq "$ROUNDS"); do
  for m in $MODELS; do
    prefix=""; [[ $m == multilingual-e5-small ]] && prefix="query: "
    common=(--model "models/$m" --prefix "$prefix" --input $DATA --batch-size "$B" --limit "$N")
    for d in f32 f32-highest f32-medium int8; do
      precision=high; [[ $d == f32-* ]] && precision=${d#f32-}
      $BIN bench "${common[@]}" --dtype "${d%%-*}" --f32-matmul "$precision" \
        --orders pipelined 2>/dev/null | sed "s/^/round=$r model=$m engine=streambed-$d /"
    done
    ST_THREADS=$THREADS "$PY" bench/st_bench.py "${common[@]}" --dtypes fp32,bf16 2>/dev/null \
      | sed -E "s/^/round=$r model=$m /; s/engine=sentence-transformers dtype=(fp32|bf16)/engine=pytorch-\1/"
    "$PY" bench/ort_bench.py "${common[@]}" --threads "$THREADS" 2>/dev/null \
      | sed -E "s/^/round=$r model=$m /; s/engine=onnxruntime-[^ ]+ graph=(fp32|int8)/engine=ort-\1/"
  done
done | tee "$out"
"$PY" - "$out" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in open(sys.argv[1])]
models = list(dict.fromkeys(r["model"] for r in rows))
engines = ["streambed-f32", "streambed-f32-highest", "pytorch-fp32", "ort-fp32", "streambed-int8", "ort-int8"]
fig = {}
for r in rows:
    fig.setdefault((r["model"], r["engine"]), {})[r["round"]] = float(r["sent_per_s"])
def ratio(m, a, b):
    xs = [fig[(m, a)][k] / fig[(m, b)][k] for k in fig.get((m, a), {}) if k in fig.get((m, b), {})]
    return statistics.median(xs) if xs else float("nan")
print("\nmedians, sentences/s (text in -> vectors out):")
kernels = {}
for r in rows:
    if "kernel" in r:
        kernels.setdefault(r["engine"], r["kernel"])
print("kernels: " + ", ".join(f"{e} = {k}" for e, k in kernels.items()))
print("f32:")
print("| model | " + " | ".join(engines) + " | f32 / best fp32 ref | f32-highest / best fp32 ref | int8 / ORT int8 |")
print("|---" * (len(engines) + 4) + "|")
for m in models:
    med = [statistics.median(fig[(m, e)].values()) if (m, e) in fig else float("nan") for e in engines]
    best = max(("pytorch-fp32", "ort-fp32"), key=lambda e: statistics.median(fig.get((m, e), {0: 0}).values()))
    print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in med)
          + f" | {ratio(m, 'streambed-f32', best):.2f}x ({best}) | {ratio(m, 'streambed-f32-highest', best):.2f}x"
          + f" | {ratio(m, 'streambed-int8', 'ort-int8'):.2f}x |")
low = ["streambed-f32-medium", "pytorch-bf16", "streambed-int8", "ort-int8"]
print("\nbelow f32 (bf16 products, int8):")
print("| model | " + " | ".join(low) + " | f32-medium / PyTorch bf16 |")
print("|---" * (len(low) + 2) + "|")
for m in models:
    med = [statistics.median(fig[(m, e)].values()) if (m, e) in fig else float("nan") for e in low]
    print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in med)
          + f" | {ratio(m, 'streambed-f32-medium', 'pytorch-bf16'):.2f}x |")
PY
