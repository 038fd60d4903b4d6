//! The monitoring files against a real Prometheus (Debian's `prometheus` package, which
//! `.ci/run` installs through scripts/check-deploy.sh): `promtool` unit-tests every alert,
//! and a Prometheus scraping a running worker finds the target up, evaluates every
//! recording and alert rule of deploy/prometheus without error, and gets a series for every
//! query of the Grafana dashboard.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: apt-get install prometheus (scripts/check-deploy.sh does, as CI runs it)")
    })
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0 (a plain body, no chunking); the JSON body, or None while down.
fn get_json(addr: &str, path: &str) -> Option<Value> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let body = buf.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

fn query(addr: &str, expr: &str) -> Option<Value> {
    get_json(addr, &format!("/api/v1/query?query={}", encode(expr)))
}

#[test]
fn promtool_unit_tests_every_alert() {
    let repo = repo();
    let out = Command::new(tool("promtool"))
        .args(["test", "rules"])
        .arg(repo.join("deploy/prometheus/alerts.test.yml"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // Every alert of alerts.yml has a test.
    let rules = std::fs::read_to_string(repo.join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo.join("deploy/prometheus/alerts.test.yml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "alert {name} has no promtool test"
            );
        }
    }
}

fn prometheus_config(dir: &Path, target: &str) -> PathBuf {
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: streambed\n    static_configs:\n      - targets: [\"{target}\"]\n",
        rules.display()
    );
    let p = dir.join("prometheus.yml");
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn prometheus_scrapes_the_worker_and_every_rule_and_panel_evaluates() {
    let _g = heavy();
    let prometheus = tool("prometheus");
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(2);
    let mut msgs = korean_json_messages(300, "m");
    msgs.push((Some(b"bad".to_vec()), Some(b"{not json".to_vec())));
    msgs.push((Some(b"m-0".to_vec()), None));
    let ends = broker.produce(&topic, &msgs);
    let env = worker_env(&broker, &topic, &group, dir.path());
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(180));
    // One query-API request, so the API panels have their series.
    assert_eq!(w.http("/info").map(|r| r.0), Some(200));

    let web = format!("127.0.0.1:{}", free_port());
    let config = prometheus_config(dir.path(), &w.metrics_addr);
    let mut prom = Worker::spawn_bin(
        &prometheus,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address={web}"),
        ],
        &[],
        &dir.path().join("prometheus.log"),
    );
    wait_until("the worker target up", Duration::from_secs(60), || {
        get_json(&web, "/api/v1/targets").is_some_and(|v| {
            v["data"]["activeTargets"]
                .as_array()
                .is_some_and(|t| t.len() == 1 && t[0]["health"] == "up")
        })
    });
    // Every rule of alerts.yml loaded, evaluated, and healthy (no evaluation error).
    let expected_rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml"))
        .unwrap()
        .matches("- alert: ")
        .count();
    let mut rules = Vec::new();
    wait_until("every rule evaluated", Duration::from_secs(60), || {
        let Some(v) = get_json(&web, "/api/v1/rules") else {
            return false;
        };
        rules = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.len() == expected_rules
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            })
    });
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed to evaluate: {r}",
            r["name"]
        );
        let q = r["query"].as_str().unwrap();
        let v = query(&web, q).unwrap();
        assert_eq!(v["status"], "success", "{q}: {v}");
    }
    // Every dashboard query returns a series once the worker has run.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/streambed.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for e in &exprs {
        wait_until(
            &format!("a series for {e}"),
            Duration::from_secs(60),
            || {
                let Some(v) = query(&web, e) else {
                    return false;
                };
                assert_eq!(v["status"], "success", "{e}: {v}");
                v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
            },
        );
    }
    eprintln!(
        "prometheus: target up, {} rules healthy, {} dashboard queries with series",
        rules.len(),
        exprs.len()
    );
    w.stop();
    prom.kill9();
}
