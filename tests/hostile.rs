//! Hostile input through the whole worker: each message of a corpus of bad records must be
//! embedded (after truncation) or dead-lettered with the expected reason; the worker never
//! panics or stalls, and every offset is committed.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use streambed::ids;
use support::*;

const DIM: usize = 384;

enum Expect {
    Embedded,
    Dead(&'static str),
}

fn raw(s: &str) -> Option<Vec<u8>> {
    Some(s.as_bytes().to_vec())
}

fn json(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// (key, value, what must happen).
fn corpus() -> Vec<(&'static str, Option<Vec<u8>>, Expect)> {
    use Expect::*;
    let hangul_unspaced: String = "가나다라마바사아자차카타파하"
        .chars()
        .cycle()
        .take(100_000)
        .collect();
    let ten_mb = {
        let mut v = br#"{"id": "ten-mb", "text": ""#.to_vec();
        v.extend("한".repeat(10 * 1024 * 1024 / 3).into_bytes());
        v.extend(br#""}"#);
        v
    };
    let deep = {
        let mut s = String::from(r#"{"id": "deep", "text": "깊은 중첩", "x": "#);
        s.push_str(&"[".repeat(100_000));
        s.push_str(&"]".repeat(100_000));
        s.push('}');
        s.into_bytes()
    };
    let wide = {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), "wide".into());
        m.insert("text".into(), "필드가 아주 많은 JSON 문서".into());
        for i in 0..40_000 {
            m.insert(format!("f{i}"), i.into());
        }
        serde_json::Value::Object(m).to_string().into_bytes()
    };
    vec![
        (
            "good",
            Some(json(
                serde_json::json!({"id": "good", "text": "평범한 한국어 문장입니다."}),
            )),
            Embedded,
        ),
        (
            "unspaced-100k",
            Some(json(
                serde_json::json!({"id": "unspaced-100k", "text": hangul_unspaced}),
            )),
            Embedded,
        ),
        ("ten-mb", Some(ten_mb), Dead("too_large")),
        ("deep", Some(deep), Dead("invalid_json")),
        ("wide", Some(wide), Embedded),
        (
            "invalid-utf8",
            Some(b"\xed\xa0\x80 \xc3\x28 \xff".to_vec()),
            Dead("invalid_utf8"),
        ),
        ("nul-only", Some(vec![0u8; 64]), Dead("empty_text")),
        (
            "nul-inside",
            Some(json(
                serde_json::json!({"id": "nul-inside", "text": "널\u{0}문자"}),
            )),
            Embedded,
        ),
        (
            "whitespace",
            Some(json(
                serde_json::json!({"id": "whitespace", "text": " \t\n\u{3000}\u{a0} "}),
            )),
            Dead("empty_text"),
        ),
        (
            "control",
            Some(json(
                serde_json::json!({"id": "control", "text": "\u{1}\u{2}\u{7f}\u{1b}"}),
            )),
            Dead("empty_text"),
        ),
        ("empty-value", Some(Vec::new()), Dead("empty_text")),
        (
            "text-number",
            raw(r#"{"id": "text-number", "text": 12345}"#),
            Dead("text_not_string"),
        ),
        (
            "text-array",
            raw(r#"{"id": "text-array", "text": ["a", "b"]}"#),
            Dead("text_not_string"),
        ),
        (
            "text-null",
            raw(r#"{"id": "text-null", "text": null}"#),
            Dead("text_not_string"),
        ),
        (
            "no-text",
            raw(r#"{"id": "no-text", "body": "다른 필드"}"#),
            Dead("missing_text_field"),
        ),
        (
            "id-object",
            raw(r#"{"id": {"a": 1}, "text": "아이디가 객체"}"#),
            Dead("invalid_id"),
        ),
        (
            "lone-surrogate",
            raw(r#"{"id": "lone-surrogate", "text": "\ud800 외톨이"}"#),
            Dead("invalid_json"),
        ),
        (
            "surrogate-pair",
            raw(r#"{"id": "surrogate-pair", "text": "\ud83d\ude00 이모지"}"#),
            Embedded,
        ),
        (
            "combining",
            Some(json(
                serde_json::json!({"id": "combining", "text": "\u{301}\u{308}\u{302}"}),
            )),
            Embedded,
        ),
        ("json-array", raw(r#"[1, 2, 3]"#), Embedded),
        (
            "invisible-only",
            Some(json(
                serde_json::json!({"id": "invisible-only", "text": "\u{200b}\u{3164}\u{feff}\u{200d}"}),
            )),
            Dead("empty_text"),
        ),
        // One SentencePiece piece after the e5 prefix: valid, never "empty".
        (
            "one-word-ko",
            raw(r#"{"id": "one-word-ko", "text": "서울"}"#),
            Embedded,
        ),
        (
            "one-word-latin",
            raw(r#"{"id": "one-word-latin", "text": "Kafka"}"#),
            Embedded,
        ),
        (
            "one-word-number",
            raw(r#"{"id": "one-word-number", "text": "2024"}"#),
            Embedded,
        ),
        ("one-syllable", Some("가".as_bytes().to_vec()), Embedded),
        (
            "truncated-json",
            raw(r#"{"id": "truncated-json", "text": "끝나지"#),
            Dead("invalid_json"),
        ),
    ]
}

#[test]
fn every_hostile_message_is_embedded_or_dead_lettered_with_its_reason() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(3);
    let corpus = corpus();
    let msgs: Vec<Msg> = corpus
        .iter()
        .map(|(k, v, _)| (Some(k.as_bytes().to_vec()), v.clone()))
        .collect();
    let ends = produce_with(
        &broker.addr,
        &topic,
        &msgs,
        &[("message.max.bytes", "20000000")],
    );
    let env = worker_env(&broker, &topic, &group, dir.path());
    let mut worker = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(180));
    worker.stop();
    let log = worker.log_text();
    assert!(!log.contains("panicked"), "no panic; log:\n{log}");

    let dead = broker.read(
        &format!("{topic}-dlq"),
        corpus
            .iter()
            .filter(|c| matches!(c.2, Expect::Dead(_)))
            .count(),
        Duration::from_secs(60),
    );
    let reasons: HashMap<String, String> = dead
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
                r.headers
                    .get("streambed.reason")
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    let points = read_store(dir.path(), DIM);
    let mut wrong = Vec::new();
    for (key, _, expect) in &corpus {
        let point = ids::from_entity(key.as_bytes()).to_string();
        match expect {
            Expect::Embedded => {
                if !points.contains_key(&point) || reasons.contains_key(*key) {
                    wrong.push(format!("{key}: expected embedded"));
                }
            }
            Expect::Dead(reason) => {
                if reasons.get(*key).map(String::as_str) != Some(*reason) {
                    wrong.push(format!(
                        "{key}: expected dead letter {reason}, got {:?}",
                        reasons.get(*key)
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\nlog:\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
    let big = dead
        .iter()
        .find(|r| r.key.as_deref() == Some(b"ten-mb".as_slice()))
        .expect("the 10 MB record's dead letter");
    assert!(
        big.headers.contains_key("streambed.original_bytes"),
        "a cut dead letter says how long the original was"
    );
}
