//! The built `etcd-syncer` binary as a child process: flags in, JSON logs
//! and `/metrics` out, signals to kill, stop or freeze it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::etcd::kill_with_parent;

/// Where the binary is: `ETCD_SYNCER_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("ETCD_SYNCER_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/etcd-syncer")
}

pub struct Syncer {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    metrics_addr: Option<SocketAddr>,
    allowed_errors: Vec<String>,
    name: String,
    http: reqwest::Client,
}

impl Syncer {
    /// Starts `etcd-syncer <args>` with JSON logs and a free metrics port,
    /// and waits until its HTTP endpoint is up.
    pub async fn start(name: &str, args: &[String]) -> Result<Self> {
        let mut syncer = Self::spawn(name, args, &[])?;
        syncer
            .wait_for_metrics_addr(Duration::from_secs(20))
            .await?;
        Ok(syncer)
    }

    /// Starts the binary without waiting for anything (for exit-code tests).
    pub fn spawn(name: &str, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let mut command = Command::new(binary());
        command
            .args(args)
            .arg("--log-format")
            .arg("json")
            // E2E_RUST_LOG (e.g. etcd_syncer=debug) to read a failure's trace.
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if args.first().is_some_and(|a| a == "mirror-plus")
            && !args.iter().any(|a| a == "--metrics-addr")
        {
            command.arg("--metrics-addr").arg("127.0.0.1:0");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        kill_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {} (run `cargo build` first)", binary().display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let echo = std::env::var("E2E_ECHO_LOGS").is_ok();
        let label = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if echo {
                    eprintln!("[{label}] {line}");
                }
                sink.lock().expect("log sink").push(line);
            }
        });
        Ok(Self {
            child: Some(child),
            logs,
            metrics_addr: None,
            allowed_errors: Vec::new(),
            name: name.to_string(),
            http: reqwest::Client::new(),
        })
    }

    async fn wait_for_metrics_addr(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(addr) = self.find_log_field("Metrics server listening.", "addr") {
                self.metrics_addr = Some(addr.parse()?);
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited with {status} before serving metrics:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start serving metrics:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("process already reaped")?;
        kill(pid, signal)?;
        Ok(())
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("process already reaped"),
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                // Give the log reader a moment to drain the pipe.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(20)).await
    }

    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log sink").clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().join("\n")
    }

    /// The value of `field` in the first JSON log line whose message is `message`.
    pub fn find_log_field(&self, message: &str, field: &str) -> Option<String> {
        self.logs().iter().find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            if value.get("message")?.as_str()? != message {
                return None;
            }
            match value.get(field)? {
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }
        })
    }

    pub fn count_log_messages(&self, message: &str) -> usize {
        self.logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
            .count()
    }

    /// ERROR lines containing `fragment` are expected by this test.
    pub fn allow_error(&mut self, fragment: &str) {
        self.allowed_errors.push(fragment.to_string());
    }

    pub fn unexpected_errors(&self) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| {
                        v.get("level")
                            .and_then(|l| l.as_str())
                            .map(|l| l == "ERROR")
                    })
                    .unwrap_or(false)
            })
            .filter(|line| {
                !self
                    .allowed_errors
                    .iter()
                    .any(|allowed| line.contains(allowed))
            })
            .collect()
    }

    pub fn metrics_addr(&self) -> Result<SocketAddr> {
        self.metrics_addr.context("metrics address not known yet")
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{}{}", self.metrics_addr()?, path);
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    pub async fn scrape(&self) -> Result<String> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// Sum of the samples of `name` whose labels include every pair in `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(crate::metric_value(&self.scrape().await?, name, labels))
    }

    /// Stops the process with SIGTERM and fails on any unexpected ERROR line.
    pub async fn finish(mut self) -> Result<()> {
        if self.child.is_some() && self.try_wait()?.is_none() {
            self.stop().await?;
        }
        let unexpected = self.unexpected_errors();
        if !unexpected.is_empty() {
            bail!(
                "{} logged unexpected ERROR lines:\n{}",
                self.name,
                unexpected.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
