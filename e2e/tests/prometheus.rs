//! A real Prometheus scrapes a running syncer and loads the chart's alert
//! rules; every Grafana panel query and every alert expression is then
//! evaluated through Prometheus' HTTP API. Each must parse and return data,
//! so a renamed metric breaks the build.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn chart_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/etcd-syncer")
        .join(path)
}

struct Prometheus {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let marker = format!("e2e-{:016x}", rand::random::<u64>());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels:\n    run: {marker}\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: etcd-syncer\n    honor_labels: true\n    static_configs:\n      - targets: ['{target}']\n",
                rules = chart_file("files/alerts.yaml").display()
            ),
        )?;
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().context(
            "spawn prometheus (Debian package `prometheus`; `make chart-tools` installs it)",
        )?;
        let prometheus = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        // The server answering must be ours: its config carries our marker.
        eventually(WAIT, "prometheus to serve our config", || async {
            let response = prometheus
                .http
                .get(format!("{}/api/v1/status/config", prometheus.base))
                .send()
                .await?;
            Ok(response.text().await?.contains(&marker))
        })
        .await?;
        Ok(prometheus)
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        let body: Value = serde_json::from_str(&response.text().await?)?;
        if body["status"] != "success" {
            bail!("{path} {query:?} failed: {body}");
        }
        Ok(body["data"].clone())
    }

    /// Series an instant query returns.
    async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Grafana's variables, as the dashboard would fill them.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$job", ".*")
}

/// An alert expression without its threshold, so it returns data while nothing fires.
fn without_threshold(expr: &str) -> Option<String> {
    let comparisons = [" > ", " < ", " == ", " >= ", " <= ", " != "];
    let (at, op) = comparisons
        .iter()
        .filter_map(|op| expr.rfind(op).map(|at| (at, *op)))
        .max_by_key(|(at, _)| *at)?;
    let rest = expr[at + op.len()..].trim();
    rest.parse::<f64>().ok().map(|_| expr[..at].to_string())
}

/// Every metric selector an expression names.
fn selectors(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("etcd_syncer_")
            || expr[i..].starts_with("process_")
            || expr[i..].starts_with("up{")
        {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let name = &expr[start..i];
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_works_against_a_real_prometheus() -> Result<()> {
    // TLS and two endpoint groups on the destination, so the certificate
    // and endpoint-group series exist for their alerts.
    let clusters = Clusters::start(MirrorOptions {
        dest: EtcdOptions {
            tls: Some(e2e::tls::TlsMaterial::generate()?),
            ..EtcdOptions::default()
        },
        extra_args: e2e::args(&["--check-interval", "1s"]),
        // Prometheus scrapes from the start; the test waits for its samples.
        wait_watching: false,
        ..MirrorOptions::loaded(200, 50)
    })
    .await?;
    let url = clusters.dest.endpoints()[0].clone();
    let args = with_endpoint_groups(
        clusters.args()?,
        "dst",
        &[("preferred", &url), ("fallback", &url)],
    );
    let mirror = clusters.mirror_with(args).await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);
    let prometheus = Prometheus::start(syncer.metrics_addr()?).await?;

    // Keep txns flowing so rate() and histogram panels have samples.
    let writer_source = source.client().await?;
    let writer = tokio::spawn(async move {
        let mut client = writer_source;
        for i in 0u32.. {
            let _ = client
                .put(format!("/app/tick-{}", i % 50), i.to_string(), None)
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eventually(WAIT, "samples for rate windows", || async {
        let up = prometheus
            .query("count_over_time(up{job=\"etcd-syncer\"}[1m])")
            .await?;
        Ok(up
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            >= 12.0
            && !prometheus
                .query("etcd_syncer_check_last_success_timestamp_seconds > 0")
                .await?
                .is_empty())
    })
    .await?;

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(chart_file(
        "dashboards/etcd-syncer.json",
    ))?)?;
    // Every query variable (label_values(metric, label) is Grafana's): the
    // series behind it must exist. Found by type, not by position, and at
    // least the job variable must be there, so a moved layout fails here.
    let mut variables = 0;
    for variable in dashboard["templating"]["list"]
        .as_array()
        .context("templating.list")?
        .iter()
        .filter(|v| v["type"] == "query")
    {
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .with_context(|| format!("variable {:?} has no query", variable["name"]))?;
        let metric = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.split(',').next())
            .with_context(|| {
                format!(
                    "variable {:?}: not label_values(…): {query}",
                    variable["name"]
                )
            })?;
        ensure!(
            !prometheus.query(metric).await?.is_empty(),
            "variable {:?}: {metric} has no series",
            variable["name"]
        );
        variables += 1;
    }
    ensure!(
        dashboard["templating"]["list"]
            .as_array()
            .is_some_and(|list| list
                .iter()
                .any(|v| v["name"] == "job" && v["type"] == "query")),
        "the dashboard has no query variable named job"
    );
    println!("{variables} dashboard variables have series");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = expand(target["expr"].as_str().context("expr")?);
            let result = prometheus
                .query(&expr)
                .await
                .with_context(|| format!("panel {:?}", panel["title"]))?;
            ensure!(
                !result.is_empty(),
                "panel {:?}: no data for {expr}",
                panel["title"]
            );
            checked += 1;
        }
    }

    let alert_count = std::fs::read_to_string(chart_file("files/alerts.yaml"))?
        .lines()
        .filter(|line| line.trim_start().starts_with("- alert:"))
        .count();
    eventually(WAIT, "every rule evaluated", || async {
        let rules = prometheus.api("/api/v1/rules", &[]).await?;
        let rules: Vec<Value> = rules["groups"]
            .as_array()
            .context("groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        Ok(rules.len() == alert_count && rules.iter().all(|r| r["health"] == "ok"))
    })
    .await?;
    let rules = prometheus.api("/api/v1/rules", &[]).await?;
    for group in rules["groups"].as_array().context("groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            let name = rule["name"].as_str().unwrap_or("?");
            let expr = rule["query"].as_str().context("query")?;
            ensure!(
                rule["health"] == "ok",
                "alert {name} does not evaluate: {}",
                rule["lastError"]
            );
            prometheus
                .query(expr)
                .await
                .with_context(|| format!("alert {name}"))?;
            if let Some(body) = without_threshold(expr) {
                ensure!(
                    !prometheus.query(&body).await?.is_empty(),
                    "alert {name}: no data for {body}"
                );
            }
            for selector in selectors(expr) {
                ensure!(
                    !prometheus.query(&selector).await?.is_empty(),
                    "alert {name}: {selector} has no series"
                );
            }
            ensure!(
                rule["state"] != "firing",
                "alert {name} fires on a healthy syncer"
            );
            checked += 1;
        }
    }
    println!("{checked} dashboard queries and alert expressions evaluated");
    writer.abort();
    mirror.finish().await
}

#[test]
fn threshold_stripping() {
    assert_eq!(
        without_threshold("sum by (job) (x) == 0").as_deref(),
        Some("sum by (job) (x)")
    );
    assert_eq!(
        without_threshold("max(a > 1) > 60").as_deref(),
        Some("max(a > 1)")
    );
    assert_eq!(without_threshold("up == 0 or absent(up)"), None);
    assert_eq!(
        selectors("rate(etcd_syncer_txn_ops_bucket{a=\"b\"}[1m]) + up{job=~\"x\"}"),
        vec!["etcd_syncer_txn_ops_bucket", "up"]
    );
}
