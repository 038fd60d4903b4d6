//! Secrets stay out of logs; Kafka properties reach librdkafka; the metrics server binds
//! where configured.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn secrets_never_reach_the_logs() {
    let _g = heavy();
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut env = worker_env(&broker, &topic, &unique("g"), dir.path());
    env.push((
        "STREAMBED__QDRANT__API_KEY".into(),
        "qdrant-secret-7f3a".into(),
    ));
    env.push((
        "STREAMBED__KAFKA__PROPERTIES__SASL_USERNAME".into(),
        "alice".into(),
    ));
    env.push((
        "STREAMBED__KAFKA__PROPERTIES__SASL_PASSWORD".into(),
        "kafka-secret-91bc".into(),
    ));
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until("ready", Duration::from_secs(120), || {
        w.http("/readyz").is_some_and(|r| r.0 == 200)
    });
    w.stop();
    let log = w.log_text();
    assert!(
        log.contains("starting") && log.contains("redacted"),
        "settings are logged, redacted:\n{log}"
    );
    assert!(
        !log.contains("qdrant-secret-7f3a"),
        "the Qdrant API key leaked:\n{log}"
    );
    assert!(
        !log.contains("kafka-secret-91bc"),
        "the SASL password leaked:\n{log}"
    );
}

/// Every secret librdkafka property, in its environment spelling (`ssl_key_pem` is
/// `ssl.key.pem`), stays out of the log, however far the worker gets with it.
#[test]
fn secret_properties_in_environment_spelling_never_reach_the_logs() {
    let _g = heavy();
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("SSL_KEY_PEM", "-----BEGIN PRIVATE KEY-----pem-secret-11aa"),
        ("SSL_KEY_PASSWORD", "keypass-secret-22bb"),
        ("SASL_OAUTHBEARER_CONFIG", "principal=bob oauth-secret-33cc"),
        ("SASL_OAUTHBEARER_CLIENT_SECRET", "client-secret-44dd"),
        ("SASL_JAAS_CONFIG", "jaas-secret-55ee"),
    ];
    let mut env = worker_env(&broker, &topic, &unique("g"), dir.path());
    for (k, v) in secrets {
        env.push((format!("STREAMBED__KAFKA__PROPERTIES__{k}"), v.to_string()));
    }
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    // It may start, or librdkafka may refuse a property: either way the settings are
    // logged first.
    wait_until(
        "the start-up log or an exit",
        Duration::from_secs(120),
        || w.log_text().contains("consuming") || !w.running(),
    );
    w.kill9();
    let log = w.log_text();
    assert!(log.contains("starting"), "{log}");
    for (k, v) in secrets {
        let tail = v.rsplit(' ').next().unwrap();
        assert!(!log.contains(tail), "{k} leaked:\n{log}");
    }
}

#[test]
fn kafka_properties_reach_librdkafka() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let mut env = worker_env(&broker, "t", "g", dir.path());
    env.push((
        "STREAMBED__KAFKA__PROPERTIES__SECURITY_PROTOCOL".into(),
        "bogus".into(),
    ));
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    assert_eq!(w.wait(Duration::from_secs(120)), Some(2));
    let log = w.log_text();
    assert!(
        log.contains("security.protocol") && log.contains("bogus"),
        "{log}"
    );
}

#[test]
fn bad_settings_fail_before_any_work_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, expect) in [
        ("STREAMBED__BATCH__MAX_ITEMS", "0", "batch.max_items"),
        ("STREAMBED__METRICS__ADDR", "localhost", "metrics.addr"),
        ("STREAMBED__SINK__KIND", "qdrant", "qdrant.url"),
        ("STREAMBED__BATCH__LINGER", "5", "linger"),
    ] {
        let mut w = Worker::spawn(
            &["run"],
            &[(key.to_string(), value.to_string())],
            &dir.path().join("w.log"),
        );
        assert_eq!(w.wait(Duration::from_secs(20)), Some(2), "{key}");
        let log = w.log_text();
        assert!(log.contains(expect), "{key}={value}: {log}");
        assert!(
            !log.contains("model loaded"),
            "no work before validation: {log}"
        );
    }
}

#[test]
fn metrics_server_binds_where_configured() {
    let _g = heavy();
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let env = worker_env(&broker, &topic, &unique("g"), dir.path());
    let w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until("metrics served", Duration::from_secs(120), || {
        w.http("/healthz").is_some()
    });
    let port = w.metrics_addr.rsplit(':').next().unwrap();
    assert!(w.metrics_addr.starts_with("127.0.0.1:"));
    // Bound to that address only: another loopback address does not answer.
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok());
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.2:{port}")).is_err(),
        "listening beyond {}",
        w.metrics_addr
    );
}
