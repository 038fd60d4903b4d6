//! The deployment files refer only to metrics the worker really exports.

use std::collections::HashSet;

use streambed::metrics::Metrics;

/// Every series name the worker can export (histograms with their suffixes).
fn exported() -> HashSet<String> {
    let m = Metrics::new();
    // Labelled families appear once they have a child.
    m.dead_lettered.with_label_values(&["empty_text"]).inc();
    m.stage_seconds.with_label_values(&["embed"]).observe(0.1);
    m.consumer_lag.with_label_values(&["t", "0"]).set(1);
    m.committed_offset.with_label_values(&["t", "0"]).set(1);
    m.sink_errors.with_label_values(&["rejected"]).inc();
    m.http_requests.with_label_values(&["embed", "200"]).inc();
    m.query_seconds.with_label_values(&["embed"]).observe(0.01);
    m.model_info
        .with_label_values(&["m", "384", "cpu", "f32"])
        .set(1.0);
    let mut names = HashSet::new();
    for line in m.render().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            names.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        }
    }
    names
}

/// `streambed_…` identifiers in a text.
fn referenced(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("streambed_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn dashboard_uses_only_exported_metrics() {
    let exported = exported();
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/streambed.json")).unwrap();
    let mut exprs = String::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let used = referenced(&exprs);
    assert!(
        used.len() >= 10,
        "the dashboard shows the worker's metrics: {used:?}"
    );
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "dashboard refers to metrics that are not exported: {missing:?}"
    );
    for must in [
        "streambed_consumer_lag_messages",
        "streambed_end_to_end_latency_seconds_bucket",
        "streambed_messages_dead_lettered_total",
    ] {
        assert!(used.contains(must), "dashboard lacks {must}");
    }
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    let exported = exported();
    let used = referenced(&read("deploy/prometheus/alerts.yml"));
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "alerts refer to metrics that are not exported: {missing:?}"
    );
}

#[test]
fn names_follow_prometheus_conventions() {
    for name in exported() {
        assert!(name.starts_with("streambed_"), "{name}");
        let counter_like = name.ends_with("_total");
        let unit = [
            "_seconds",
            "_bytes",
            "_messages",
            "_info",
            "_size",
            "_tokens",
            "_offset",
            "_chunks",
        ]
        .iter()
        .any(|u| {
            name.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .ends_with(u)
        });
        assert!(counter_like || unit, "{name} has no unit suffix");
    }
}

/// The images' final stage runs as a non-root user (the last `USER` after the last `FROM`
/// names neither root nor uid 0).
#[test]
fn containers_run_as_non_root() {
    for file in ["deploy/Dockerfile", "deploy/Dockerfile.cuda"] {
        let text = read(file);
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        let user = last_stage
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{file}: the final stage sets no USER"));
        let user = user.split(':').next().unwrap().trim();
        assert!(user != "root" && user != "0", "{file}: runs as {user}");
    }
}
