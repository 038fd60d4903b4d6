"""sentence-transformers (PyTorch) reference figures for the same model folders and data
that `streambed bench` uses. Prints one line per precision in streambed's format.

    python3 bench/st_bench.py --model models/multilingual-e5-small --input datasets/korsts/sts-dev.tsv \
        --batch-size 32 --limit 1024 [--prefix "query: "] [--bf16]
    python3 bench/st_bench.py --model DIR --input FILE --device cuda --batch-size 512 \
        --repeat-to 50000 --dtypes fp32,fp16,bf16
"""
import argparse
import csv
import json
import os
import resource
import sys
import time


def sentences(path, limit):
    if path.endswith(".json"):
        rows = json.load(open(path, encoding="utf-8"))
        pairs = [(r["sentence1"], r["sentence2"]) for r in rows]
    elif path.endswith(".tsv"):
        with open(path, encoding="utf-8") as f:
            r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(r)
            pairs = [(row[5], row[6]) for row in r]
    else:
        return [l.rstrip("\n") for l in open(path, encoding="utf-8") if l.strip()][:limit]
    seen, out = set(), []
    for a, b in pairs:
        for s in (a, b):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out[:limit] if limit else out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--prefix", default="")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ST_THREADS", "0")) or None)
    ap.add_argument("--bf16", action="store_true", help="also run under CPU bf16 autocast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat-to", type=int, default=0, help="cycle the sentences up to N")
    ap.add_argument("--dtypes", default="", help="comma-separated: fp32,fp16,bf16")
    ap.add_argument("--matmul-precision", default="highest",
                    help="torch.set_float32_matmul_precision: highest, high (tf32: no effect on CPU), "
                         "medium (fp32 matmuls in bf16: AMX on Intel Xeon)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    model = SentenceTransformer(args.model, device=args.device)
    texts = [args.prefix + s for s in sentences(args.input, args.limit)]
    if args.repeat_to:
        texts = [texts[i % len(texts)] for i in range(args.repeat_to)]
    tok = model.tokenizer(texts, add_special_tokens=True)["input_ids"]
    tokens = sum(min(len(t), model.max_seq_length) for t in tok)
    names = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if args.bf16 else [])
    kinds = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    runs = [(n, kinds[n]) for n in names]
    for name, dtype in runs:
        def go():
            if dtype is None:
                return model.encode(texts, batch_size=args.batch_size)
            if args.device == "cpu":
                with torch.autocast("cpu", dtype=dtype):
                    return model.encode(texts, batch_size=args.batch_size)
            return model.encode(texts, batch_size=args.batch_size)
        if dtype is not None and args.device != "cpu":
            model.to(dtype)
        model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        go()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"engine=sentence-transformers dtype={name} matmul_precision={args.matmul_precision} sent_per_s={len(texts)/dt:.1f} "
            f"tok_per_s={tokens/dt:.0f} peak_rss_mb={rss:.0f} sentences={len(texts)} "
            f"batch_size={args.batch_size} device={args.device} threads={torch.get_num_threads()}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
