"""Writes tests/fixtures/st_reference.json: sentence-transformers' own embeddings of a few
Korean and English sentences, for the models fetched by scripts/fetch-models.sh.
The encoder test checks streambed's vectors against these (cosine >= 0.999).

Run once (needs sentence-transformers and torch):
    python3 scripts/make-st-fixture.py
"""
import json
import os
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "안전모를 가진 한 남자가 춤을 추고 있다.",
    "어린아이가 말을 타고 있다.",
    "오늘 날씨 정말 좋네요 😀🎉",
    "Kafka와 Qdrant로 벡터 검색 — 東京 café ∑ 123",
    "대한민국의수도는서울특별시이며인구는약천만명이다" * 40,
]

MODELS = {
    # folder under models/: (prefix, max_seq_length as the folder says)
    "all-minilm-l6-v2": "",
    "multilingual-e5-small": "query: ",
}


def main():
    root = os.path.join(os.path.dirname(__file__), "..")
    out = {"sentences": SENTENCES, "models": {}}
    for name, prefix in MODELS.items():
        model = SentenceTransformer(os.path.join(root, "models", name), device="cpu")
        vecs = model.encode([prefix + s for s in SENTENCES], normalize_embeddings=False)
        out["models"][name] = {
            "prefix": prefix,
            "max_seq_length": model.max_seq_length,
            "vectors": [[round(float(x), 6) for x in v] for v in vecs],
        }
    path = os.path.join(root, "tests", "fixtures", "st_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
