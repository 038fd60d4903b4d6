//! The query API (issue 13) with real clients: OpenAI's own Python package, curl, and raw
//! HTTP for the error cases; `streambed serve` over a store a backfill wrote, and
//! `streambed run` answering queries while it ingests.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const KEY: &str = "test-key-123";

/// One HTTP/1.1 request; (status, headers and body as text).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The server may answer (413) before reading a large body; a reset write is fine.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn post(addr: &str, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let (status, _, text) = request(addr, "POST", path, key, body.to_string().as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    streambed::embed::cosine(a, b)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `streambed embed` vectors of `texts` with `prefix`, the CLI's own path.
fn cli_vectors(texts: &[&str], prefix: &str) -> Vec<Vec<f32>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_streambed"))
        .args([
            "embed",
            "--model",
            e5_model().to_str().unwrap(),
            "--prefix",
            prefix,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for t in texts {
            writeln!(stdin, "{}", json!({ "text": t })).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| floats(&serde_json::from_str::<Value>(l).unwrap()["vector"]))
        .collect()
}

fn backfill_corpus(dir: &Path) -> Vec<String> {
    let sentences = korean_sentences(60);
    let mut lines = String::new();
    for (i, s) in sentences.iter().enumerate() {
        let lang = if i % 2 == 0 { "ko" } else { "xx" };
        lines.push_str(&json!({"id": format!("s{i}"), "text": s, "lang": lang}).to_string());
        lines.push('\n');
    }
    // One long document, so grouping by document has something to group.
    let long: String = korean_sentences(400)[100..].join(" ");
    lines.push_str(&json!({"id": "long", "text": long, "lang": "ko"}).to_string());
    lines.push('\n');
    std::fs::write(dir.join("corpus.jsonl"), lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_streambed"))
        .args(["backfill", "--input"])
        .arg(dir.join("corpus.jsonl"))
        .arg("--checkpoint")
        .arg(dir.join("cp.json"))
        .envs(serve_env(dir, ""))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    sentences
}

fn serve_env(dir: &Path, addr: &str) -> Vec<(String, String)> {
    vec![
        (
            "STREAMBED__MODEL__PATH".into(),
            e5_model().to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__EMBEDDED__PATH".into(),
            dir.join("store").to_string_lossy().into_owned(),
        ),
        ("STREAMBED__METRICS__ADDR".into(), addr.into()),
        ("STREAMBED__MESSAGE__METADATA_FIELDS".into(), "lang".into()),
        ("STREAMBED__CHUNK__MAX_TOKENS".into(), "128".into()),
        ("STREAMBED__API__API_KEY".into(), KEY.into()),
        ("STREAMBED__API__MAX_INPUTS".into(), "16".into()),
        ("STREAMBED__API__MAX_BODY_BYTES".into(), "65536".into()),
    ]
}

fn python_with_openai() -> (String, String) {
    let lib = repo().join(".tools/openai");
    assert!(
        lib.join("openai").exists(),
        "{} is missing: scripts/test.sh installs OpenAI's Python client there",
        lib.display()
    );
    ("python3".into(), lib.to_string_lossy().into_owned())
}

#[test]
fn the_query_api_answers_real_clients_and_refuses_bad_requests() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let sentences = backfill_corpus(dir.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = Worker::spawn(
        &["serve"],
        &serve_env(dir.path(), &addr),
        &dir.path().join("serve.log"),
    );
    w.metrics_addr = addr.clone();
    // The server answers before the model is loaded: 503 with Retry-After, then 200.
    let mut saw_loading = false;
    wait_until(
        "the query API to be ready",
        Duration::from_secs(120),
        || {
            let r = std::net::TcpStream::connect(&addr)
                .is_ok()
                .then(|| request(&addr, "POST", "/embed", Some(KEY), br#"{"inputs": "a"}"#));
            match r {
                Some((503, head, _)) => {
                    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
                    saw_loading = true;
                    false
                }
                Some((200, _, _)) => true,
                _ => false,
            }
        },
    );
    assert!(saw_loading, "503 while the model loads");

    // OpenAI's client, base URL changed: the same vectors as `streambed embed` with the
    // query prefix, in float and base64 (the client's default) encodings.
    let queries = [
        "서울의 날씨는 어때요?",
        "기차가 역에 도착했다",
        "😀 Kafka와 Qdrant",
    ];
    let (python, lib) = python_with_openai();
    let script = format!(
        r#"
import json, sys
from openai import OpenAI, AuthenticationError
c = OpenAI(base_url="http://{addr}/v1", api_key="{KEY}")
qs = json.loads(sys.argv[1])
f = c.embeddings.create(model="streambed", input=qs, encoding_format="float")
b = c.embeddings.create(model="streambed", input=qs)
one = c.embeddings.create(model="streambed", input=qs[0])
try:
    OpenAI(base_url="http://{addr}/v1", api_key="wrong").embeddings.create(model="m", input="x")
    auth = "accepted"
except AuthenticationError as e:
    auth = e.status_code
print(json.dumps({{"float": [d.embedding for d in f.data], "base64": [d.embedding for d in b.data],
  "one": one.data[0].embedding, "usage": f.usage.prompt_tokens, "model": f.model, "auth": auth}}))
"#
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(&script)
        .arg(json!(queries).to_string())
        .env("PYTHONPATH", &lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli = cli_vectors(&queries, "query: ");
    for (i, want) in cli.iter().enumerate() {
        for enc in ["float", "base64"] {
            let v = floats(&got[enc][i]);
            let c = cosine(&v, want);
            assert!(c >= 0.9999, "{enc} input {i}: cosine {c}");
        }
    }
    assert!(cosine(&floats(&got["one"]), &cli[0]) >= 0.9999);
    assert!(got["usage"].as_u64().unwrap() > 3);
    assert_eq!(got["model"], "streambed");
    assert_eq!(got["auth"], 401);

    // curl: TEI's /embed (unit vectors, same as the CLI's), and /search.
    let curl = |path: &str, body: &Value| -> Value {
        let out = Command::new("curl")
            .args(["-sS", "-X", "POST", "-H", "Content-Type: application/json"])
            .args(["-H", &format!("Authorization: Bearer {KEY}")])
            .args(["-d", &body.to_string(), &format!("http://{addr}{path}")])
            .output()
            .expect("curl");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let tei = curl("/embed", &json!({"inputs": queries}));
    for (i, want) in cli.iter().enumerate() {
        assert!(cosine(&floats(&tei[i]), want) >= 0.9999);
        let n: f32 = floats(&tei[i]).iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }
    let doc = curl(
        "/embed",
        &json!({"inputs": sentences[3], "prompt_name": "document"}),
    );
    let want = cli_vectors(&[&sentences[3]], "passage: ");
    assert!(
        cosine(&floats(&doc[0]), &want[0]) >= 0.9999,
        "document prefix on request"
    );
    let found = curl("/search", &json!({"query": sentences[7], "top_k": 3}));
    let hits = found["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["payload"]["text"], sentences[7].as_str(), "{found}");
    let only_ko = curl(
        "/search",
        &json!({"query": sentences[7], "top_k": 5, "filter": {"lang": "ko"}}),
    );
    for h in only_ko["hits"].as_array().unwrap() {
        assert_eq!(h["payload"]["lang"], "ko");
    }
    let grouped = curl(
        "/search",
        &json!({"query": korean_sentences(400)[200..204].join(" "), "top_k": 4, "group_by_document": true}),
    );
    let docs: Vec<&str> = grouped["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["document_id"].as_str().unwrap())
        .collect();
    assert_eq!(docs.len(), 4);
    assert_eq!(
        docs.iter().collect::<std::collections::HashSet<_>>().len(),
        4,
        "one hit per document"
    );
    let long = streambed::ids::from_entity(b"long").to_string();
    assert!(
        docs.contains(&long.as_str()),
        "the document holding the sentence is found: {grouped}"
    );
    let (status, info) = {
        let (s, _, b) = request(&addr, "GET", "/info", Some(KEY), b"");
        (s, serde_json::from_str::<Value>(&b).unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(info["dimension"], 384);
    assert_eq!(info["query_prefix"], "query: ");
    assert_eq!(info["prefix"], "passage: ");
    assert_eq!(info["max_input_length"], 512);
    assert_eq!(info["store"], "embedded");

    // Bad requests: the right status and error body, never a panic.
    let cases: Vec<(&str, Vec<u8>, Option<&str>, u16)> = vec![
        ("/embed", b"{not json".to_vec(), Some(KEY), 422),
        ("/embed", br#"{"inputs": 42}"#.to_vec(), Some(KEY), 422),
        ("/embed", br#"{"inputs": ""}"#.to_vec(), Some(KEY), 422),
        ("/embed", br#"{"inputs": []}"#.to_vec(), Some(KEY), 422),
        (
            "/embed",
            br#"{"inputs": "a", "normalize": "yes"}"#.to_vec(),
            Some(KEY),
            422,
        ),
        ("/embed", br#"[1, 2]"#.to_vec(), Some(KEY), 422),
        (
            "/embed",
            json!({"inputs": vec!["가"; 17]}).to_string().into_bytes(),
            Some(KEY),
            413,
        ),
        (
            "/embed",
            json!({"inputs": "가".repeat(30_000)})
                .to_string()
                .into_bytes(),
            Some(KEY),
            413,
        ),
        (
            "/embed",
            json!({"inputs": "나".repeat(20_000)})
                .to_string()
                .into_bytes(),
            Some(KEY),
            413,
        ),
        ("/embed", br#"{"inputs": "a"}"#.to_vec(), Some("wrong"), 401),
        ("/embed", br#"{"inputs": "a"}"#.to_vec(), None, 401),
        (
            "/v1/embeddings",
            br#"{"model": "m", "input": [1, 2, 3]}"#.to_vec(),
            Some(KEY),
            400,
        ),
        (
            "/v1/embeddings",
            br#"{"model": "m", "input": "a", "encoding_format": "hex"}"#.to_vec(),
            Some(KEY),
            400,
        ),
        ("/v1/embeddings", b"{".to_vec(), Some(KEY), 400),
        (
            "/search",
            br#"{"query": "a", "top_k": 0}"#.to_vec(),
            Some(KEY),
            422,
        ),
        (
            "/search",
            br#"{"query": "a", "filter": {"lang": [1]}}"#.to_vec(),
            Some(KEY),
            422,
        ),
        ("/search", br#"{"top_k": 3}"#.to_vec(), Some(KEY), 422),
        // This store has no sparse vectors: lexical modes are refused, naming the fix.
        (
            "/search",
            br#"{"query": "a", "mode": "hybrid"}"#.to_vec(),
            Some(KEY),
            422,
        ),
        (
            "/search",
            br#"{"query": "a", "mode": "fuzzy"}"#.to_vec(),
            Some(KEY),
            422,
        ),
    ];
    for (path, body, key, want) in cases {
        let (status, _, text) = request(&addr, "POST", path, key, &body);
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_eq!(status, want, "{path} {shown}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} {shown}: not JSON: {text}"));
        if path == "/v1/embeddings" {
            assert!(
                v["error"]["message"].is_string() && v["error"]["type"].is_string(),
                "{v}"
            );
        } else {
            assert!(v["error"].is_string() && v["error_type"].is_string(), "{v}");
        }
    }
    // An input past the model's length is truncated when asked to be.
    let (status, v) = post(
        &addr,
        "/embed",
        Some(KEY),
        &json!({"inputs": "나".repeat(5_000), "truncate": true}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(w.metric("streambed_http_requests_total") > 20.0);
    assert!(w.running(), "still serving");
    w.stop();
    assert!(!w.log_text().contains("panicked"));
    assert!(!w.log_text().contains(KEY), "the API key is never logged");
}

/// Queries while the same process ingests, into either store: every one answered, no
/// panic (qdrant-edge's flush would panic on lock contention if searches took part in the
/// write lock's work), the stream finishes.
fn queries_while_ingesting(qdrant: bool) {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(2);
    let q = qdrant.then(|| QdrantUnderTest::start(dir.path()));
    let msgs = korean_json_messages(1500, "q");
    let ends = broker.produce(&topic, &msgs);
    let mut env = worker_env(&broker, &topic, &group, dir.path());
    if let Some(q) = &q {
        env.extend(q.worker_env(&unique("api")));
    }
    let w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until("the query API", Duration::from_secs(120), || {
        w.http("/info").is_some_and(|r| r.0 == 200)
    });
    let sentences = korean_sentences(50);
    let mut answered = 0;
    let mut longest = Duration::ZERO;
    while broker.committed(&group, &topic, 2) != ends && answered < 400 {
        let q = &sentences[answered % sentences.len()];
        let t = std::time::Instant::now();
        let (s1, v1) = post(
            &w.metrics_addr,
            "/search",
            None,
            &json!({"query": q, "top_k": 3}),
        );
        let (s2, v2) = post(&w.metrics_addr, "/embed", None, &json!({"inputs": q}));
        longest = longest.max(t.elapsed());
        assert_eq!(s1, 200, "{v1}");
        assert_eq!(s2, 200, "{v2}");
        answered += 1;
    }
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(300));
    eprintln!("{answered} search+embed pairs answered during ingestion (qdrant: {qdrant}), slowest pair {longest:?}");
    assert!(answered >= 5);
    assert!(!w.log_text().contains("panicked"));
}

#[test]
fn queries_are_answered_while_the_worker_ingests() {
    queries_while_ingesting(false);
}

#[test]
fn queries_are_answered_while_the_worker_ingests_into_qdrant() {
    queries_while_ingesting(true);
}
