//! The end-to-end harness: real etcd servers, the real `etcd-syncer` binary,
//! and an oracle written independently of the product's own checker.

pub mod etcd;
pub mod fixture;
pub mod leases;
pub mod load;
pub mod proxy;
pub mod syncer;
pub mod tls;
pub mod zk;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, WatchOptions};

pub use etcd::{EtcdCluster, EtcdOptions, Role};
pub use fixture::{wait_frozen_mid_full_sync, Clusters, Mirror, MirrorOptions, Preload, ProxySide};
pub use syncer::Syncer;
pub use tls::TlsMaterial;

pub const META_PREFIX: &str = "/-etcd-syncer-meta-/";

/// Polls `check` until it returns true. The timeout only guards against a
/// hang; nothing asserts how fast convergence happens.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(error) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {error:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of the samples of `name` whose labels include every pair in `labels`,
/// from Prometheus text format.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let matches = labels.iter().all(|(k, v)| {
            label_text
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if matches {
            total += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Every key under `prefix` except the syncer's meta keys, by suffix, read
/// in pages so large prefixes stay under gRPC's message limit.
pub async fn read_prefix(client: &mut Client, prefix: &str) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    read_prefix_at(client, prefix, 0).await
}

/// [`read_prefix`] at a past revision (0 is the current one).
pub async fn read_prefix_at(
    client: &mut Client,
    prefix: &str,
    at_revision: i64,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let end = if prefix.is_empty() {
        vec![0]
    } else {
        prefix_end(prefix.as_bytes())
    };
    let mut start = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    };
    let mut map = BTreeMap::new();
    let mut revision = at_revision;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(5000);
        if revision > 0 {
            // Every page at the first page's revision: one consistent snapshot.
            options = options.with_revision(revision);
        }
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(256 * 1024 * 1024);
        let response = kv.get(start.clone(), Some(options)).await?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        for kv in response.kvs() {
            if !kv.key().starts_with(META_PREFIX.as_bytes()) {
                map.insert(kv.key()[prefix.len()..].to_vec(), kv.value().to_vec());
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(map),
        }
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The oracle's verdict, by suffix below the job prefix.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    pub missing_at_dest: Vec<String>,
    pub extra_at_dest: Vec<String>,
    pub value_differs: Vec<String>,
    pub source_keys: usize,
}

impl Comparison {
    pub fn is_equal(&self) -> bool {
        self.missing_at_dest.is_empty()
            && self.extra_at_dest.is_empty()
            && self.value_differs.is_empty()
    }
}

/// Compares two prefixes exactly, with plain maps: deliberately not the
/// product's merge code, so that code is checked too.
pub async fn compare(
    source: &EtcdCluster,
    source_prefix: &str,
    dest: &EtcdCluster,
    dest_prefix: &str,
) -> Result<Comparison> {
    let source_map = read_prefix(&mut source.client().await?, source_prefix).await?;
    let dest_map = read_prefix(&mut dest.client().await?, dest_prefix).await?;
    let show = |k: &Vec<u8>| String::from_utf8_lossy(k).into_owned();
    Ok(Comparison {
        missing_at_dest: source_map
            .keys()
            .filter(|k| !dest_map.contains_key(*k))
            .map(show)
            .collect(),
        extra_at_dest: dest_map
            .keys()
            .filter(|k| !source_map.contains_key(*k))
            .map(show)
            .collect(),
        value_differs: source_map
            .iter()
            .filter(|(k, v)| dest_map.get(*k).is_some_and(|d| d != *v))
            .map(|(k, _)| show(k))
            .collect(),
        source_keys: source_map.len(),
    })
}

/// Waits until the destination equals the source exactly.
pub async fn converge(
    source: &EtcdCluster,
    source_prefix: &str,
    dest: &EtcdCluster,
    dest_prefix: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = compare(source, source_prefix, dest, dest_prefix).await?;
        if last.is_equal() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not converged after {timeout:?}: {} missing at dest (e.g. {:?}), {} extra (e.g. {:?}), {} differ (e.g. {:?})",
                last.missing_at_dest.len(),
                last.missing_at_dest.first(),
                last.extra_at_dest.len(),
                last.extra_at_dest.first(),
                last.value_differs.len(),
                last.value_differs.first()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `last_synced_rev` of `job`'s checkpoint on the destination now, if
/// there is a checkpoint.
pub async fn checkpoint_rev(dest: &EtcdCluster, job: &str) -> Result<Option<i64>> {
    let mut client = dest.client().await?;
    let response = client
        .get(format!("{META_PREFIX}{job}/checkpoint"), None)
        .await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_slice(kv.value())?;
    Ok(Some(
        value["last_synced_rev"]
            .as_i64()
            .context("last_synced_rev")?,
    ))
}

/// Every version the checkpoint key ever had: (destination revision, checkpoint JSON).
pub async fn checkpoint_history(
    dest: &EtcdCluster,
    job: &str,
) -> Result<Vec<(i64, serde_json::Value)>> {
    let mut client = dest.client().await?;
    let head = dest.revision().await?;
    let key = format!("{META_PREFIX}{job}/checkpoint");
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(1)))
        .await?;
    let mut history = Vec::new();
    loop {
        // The destination is quiet now: once the replay stops, history is complete.
        let Ok(message) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await
        else {
            return Ok(history);
        };
        let response = message?.context("watch closed")?;
        for event in response.events() {
            let kv = event.kv().context("kv")?;
            if event.event_type() == EventType::Put {
                history.push((kv.mod_revision(), serde_json::from_slice(kv.value())?));
            }
            if kv.mod_revision() >= head {
                return Ok(history);
            }
        }
    }
}

/// The checkpoint's history, checked to never go backwards (a deposed or
/// reordered writer must not roll it back).
pub async fn monotonic_checkpoint_history(
    dest: &EtcdCluster,
    job: &str,
) -> Result<Vec<(i64, serde_json::Value)>> {
    let history = checkpoint_history(dest, job).await?;
    let mut previous = 0;
    for (dest_revision, checkpoint) in &history {
        let synced = checkpoint["last_synced_rev"]
            .as_i64()
            .context("last_synced_rev")?;
        if synced < previous {
            bail!("checkpoint went back from {previous} to {synced} at destination revision {dest_revision}");
        }
        previous = synced;
    }
    Ok(history)
}

/// Runs an `etcd-syncer` command to completion: (exit code, stdout + stderr).
/// `etcd-syncer <argv>`, which must exit 0; returns its output.
pub async fn cli_ok(argv: &[&str]) -> Result<String> {
    let (code, output) = run_cli(&args(argv)).await?;
    anyhow::ensure!(code == 0, "{argv:?} exited {code}: {output}");
    Ok(output)
}

pub async fn run_cli(argv: &[String]) -> Result<(i32, String)> {
    let output = tokio::process::Command::new(syncer::binary())
        .args(argv)
        .output()
        .await?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    ))
}

/// `args` with the value after `flag` replaced, e.g. an endpoint by its proxy.
/// The job ran its first full sync only, and resumed from its checkpoint
/// at least once since (after a cut, a switch, a restart of the job).
pub async fn ensure_resumed_without_full_sync(syncer: &Syncer, job: &str) -> Result<()> {
    let slow = syncer
        .metric("etcd_syncer_slow_path_total", &[("job", job)])
        .await?;
    let fast = syncer
        .metric("etcd_syncer_fast_path_total", &[("job", job)])
        .await?;
    anyhow::ensure!(
        slow == 1.0 && fast >= 1.0,
        "job {job}: {slow} full syncs (only the first expected), {fast} resumes from the checkpoint (at least one expected)"
    );
    Ok(())
}

/// `args` with `--{side}-endpoints` replaced by one `--{side}-endpoint-group
/// NAME=URL` per group, most preferred first (`side` is "src" or "dst").
pub fn with_endpoint_groups(args: Vec<String>, side: &str, groups: &[(&str, &str)]) -> Vec<String> {
    let flag = format!("--{side}-endpoints");
    let mut out = Vec::new();
    let mut skip = false;
    for arg in args {
        if skip {
            skip = false;
        } else if arg == flag {
            skip = true;
        } else {
            out.push(arg);
        }
    }
    for (name, url) in groups {
        out.push(format!("--{side}-endpoint-group"));
        out.push(format!("{name}={url}"));
    }
    out
}

pub fn replace_flag(mut args: Vec<String>, flag: &str, value: &str) -> Result<Vec<String>> {
    let at = args
        .iter()
        .position(|a| a == flag)
        .with_context(|| format!("{flag} not in the arguments"))?
        + 1;
    args[at] = value.to_string();
    Ok(args)
}

/// Waits until the syncer reports `job` in `state` (e.g. "watching").
pub async fn wait_job_state(syncer: &Syncer, job: &str, state: &str) -> Result<()> {
    eventually(
        Duration::from_secs(120),
        &format!("job {job} to be {state}"),
        || async {
            Ok(syncer
                .metric("etcd_syncer_job_state", &[("job", job), ("state", state)])
                .await?
                == 1.0)
        },
    )
    .await
}

/// Instances queued for a job's lock on the destination.
pub async fn lock_holders(dest: &EtcdCluster, job: &str) -> Result<usize> {
    Ok(count_prefix(dest, &format!("{META_PREFIX}{job}/lock/")).await? as usize)
}

/// Keys under `prefix` on `cluster` now.
pub async fn count_prefix(cluster: &EtcdCluster, prefix: &str) -> Result<i64> {
    let response = cluster
        .client()
        .await?
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(response.count())
}

/// Puts `count` keys `<prefix>key-NNNNNN` with `value_size`-byte values, in
/// txns of up to 100 puts.
pub async fn put_many(
    client: &mut Client,
    prefix: &str,
    count: usize,
    value_size: usize,
    tag: &str,
) -> Result<()> {
    let value: String = format!("{tag}:")
        .chars()
        .chain(std::iter::repeat('v'))
        .take(value_size.max(tag.len() + 1))
        .collect();
    let mut start = 0;
    while start < count {
        let end = (start + 100).min(count);
        let ops: Vec<TxnOp> = (start..end)
            .map(|i| TxnOp::put(format!("{prefix}key-{i:06}"), value.clone(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
        start = end;
    }
    Ok(())
}

/// Common flags: both clusters, one prefix.
pub fn mirror_args(source: &EtcdCluster, dest: &EtcdCluster, prefix: &str) -> Vec<String> {
    let mut args = vec![
        "mirror-plus".to_string(),
        "--src-endpoints".into(),
        source.endpoints_arg(),
        "--dst-endpoints".into(),
        dest.endpoints_arg(),
        "--prefix".into(),
        prefix.into(),
        // Short intervals keep idle-checkpoint and stall detection quick in tests.
        "--progress-interval".into(),
        "1s".into(),
        "--watch-idle-timeout".into(),
        "10s".into(),
    ];
    if let Some(tls) = source.tls() {
        args.extend(tls.syncer_args("src"));
    }
    if let Some(tls) = dest.tls() {
        args.extend(tls.syncer_args("dst"));
    }
    args
}

/// `etcd-syncer check` against both clusters, then `extra`.
pub fn check_args(source: &EtcdCluster, dest: &EtcdCluster, extra: &[&str]) -> Vec<String> {
    let mut argv = args(&[
        "check",
        "--src-endpoints",
        &source.endpoints_arg(),
        "--dst-endpoints",
        &dest.endpoints_arg(),
    ]);
    argv.extend(args(extra));
    argv
}

pub fn args(extra: &[&str]) -> Vec<String> {
    extra.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# HELP x\nfoo_total{job=\"a\",kind=\"b\"} 3\nfoo_total{job=\"a\",kind=\"c\"} 4\nfoo_total{job=\"z\"} 9\nfoo 1\n";
        assert_eq!(metric_value(text, "foo_total", &[("job", "a")]), 7.0);
        assert_eq!(
            metric_value(text, "foo_total", &[("job", "a"), ("kind", "c")]),
            4.0
        );
        assert_eq!(metric_value(text, "foo", &[]), 1.0);
    }
}
