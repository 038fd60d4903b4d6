"""ONNX Runtime reference figures for the same model folders and data that `streambed bench`
uses: the engine behind fastembed and text-embeddings-inference's CPU backend.

The folder's BertModel is exported to ONNX once (opset 17, dynamic batch and length), then
optimised with ORT's BERT fusions (Attention, SkipLayerNormalization, Gelu) and quantised
to int8 with `quantize_dynamic` (per-channel weights). The files go to `<folder>/onnx/` and
are reused while they are newer than the weights.

Timed like sentence-transformers' `encode`, text in -> vectors out: the model's fast
tokenizer (transformers), sentences sorted by length and cut into batches (so padding is
as small as ST's), the session, mean pooling over the attention mask, L2 normalisation.
One line per graph in streambed's `key=value` format.

    python3 bench/ort_bench.py --model models/multilingual-e5-small --input datasets/korsts/sts-dev.tsv \
        --batch-size 32 --limit 1024 --prefix "query: " --threads 2 [--graphs fp32,int8]
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_bench import sentences  # noqa: E402


def newer(path, than):
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def export(folder):
    """Returns {"fp32": path, "int8": path}, building what is missing or stale."""
    import json

    weights = os.path.join(folder, "model.safetensors")
    out = os.path.join(folder, "onnx")
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, "model.onnx")
    opt = os.path.join(out, "model-bert-fused.onnx")
    int8 = os.path.join(out, "model-bert-fused-int8.onnx")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    if not newer(raw, weights):
        import torch
        from transformers import AutoModel

        # Eager attention: the SDPA graph of transformers 5 defeats ORT's Attention fusion.
        model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

        class Wrapped(torch.nn.Module):
            # Keyword arguments: transformers 5 reorders BertModel's positional ones.
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).last_hidden_state

        ids = torch.ones((2, 8), dtype=torch.long)
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(
            Wrapped(model),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            raw,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "last_hidden_state": axes,
            },
            opset_version=17,
            dynamo=False,
        )
    if not newer(opt, raw):
        from onnxruntime.transformers.optimizer import optimize_model

        m = optimize_model(
            raw,
            model_type="bert",
            num_heads=cfg["num_attention_heads"],
            hidden_size=cfg["hidden_size"],
        )
        print(f"ort fusions: {m.get_fused_operator_statistics()}", file=sys.stderr)
        m.save_model_to_file(opt)
    if not newer(int8, opt):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            opt,
            int8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Without it quantize_dynamic fails on the fused graph's untyped tensors.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"fp32": opt, "int8": int8}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--prefix", default="")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--graphs", default="fp32,int8")
    ap.add_argument("--export-only", action="store_true")
    args = ap.parse_args()

    graphs = export(args.model)
    if args.export_only:
        return 0
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    max_len = min(getattr(tok, "model_max_length", 512) or 512, 512)
    texts = [args.prefix + s for s in sentences(args.input, args.limit)]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for name in args.graphs.split(","):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(graphs[name], so, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}

        def encode(batch):
            enc = tok(batch, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            feed = {
                "input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64),
            }
            if "token_type_ids" in wanted:
                # XLM-R tokenizers (e5) return none: zeros, as BertModel assumes.
                tt = enc.get("token_type_ids")
                feed["token_type_ids"] = (
                    tt.astype(np.int64) if tt is not None else np.zeros_like(feed["input_ids"])
                )
            hidden = sess.run(None, feed)[0]
            mask = feed["attention_mask"][:, :, None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            return pooled / np.linalg.norm(pooled, axis=1, keepdims=True).clip(1e-12)

        encode([texts[i] for i in order[: args.batch_size]])  # warm-up
        tokens = 0
        times = []
        out = [None] * len(texts)
        t = time.perf_counter()
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            b = time.perf_counter()
            vecs = encode([texts[i] for i in idx])
            times.append((time.perf_counter() - b) * 1000)
            for i, v in zip(idx, vecs):
                out[i] = v
        dt = time.perf_counter() - t
        for s in texts:
            tokens += min(len(tok(s)["input_ids"]), max_len)
        times.sort()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"engine=onnxruntime-{ort.__version__} graph={name} sent_per_s={len(texts)/dt:.1f} "
            f"tok_per_s={tokens/dt:.0f} p50_batch_ms={times[len(times)//2]:.1f} "
            f"p99_batch_ms={times[min(len(times)-1, len(times)*99//100)]:.1f} "
            f"peak_rss_mb={rss:.0f} sentences={len(texts)} batch_size={args.batch_size} "
            f"threads={args.threads}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
