//! The failover round trip against real etcd: a primary A mirrored into a
//! standby B, the replicator killed, writes on A that never reach B, B
//! promoted and written to, then `failback` makes A equal B through the
//! dirty set, saves A's lost writes, and reverse replication B → A resumes
//! on the fast path.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::*;

const CONVERGE: Duration = Duration::from_secs(60);
const KEYS: usize = 2000;

struct Diverged {
    a: EtcdCluster,
    b: EtcdCluster,
    /// The 50 keys A changed that B never saw.
    changed_on_a: BTreeSet<String>,
}

/// A mirrored into B, the replicator killed, 50 changes on A (20 new keys,
/// 20 updates, 10 deletes), B promoted, then 7 writes on B to other keys.
async fn diverged() -> Result<Diverged> {
    let a = EtcdCluster::start_source().await?;
    let b = EtcdCluster::start_dest().await?;
    let mut a_client = a.client().await?;
    put_many(&mut a_client, "/app/", KEYS, 100, "v1").await?;
    let mut syncer = Syncer::start("forward", &mirror_args(&a, &b, "/app/")).await?;
    wait_job_state(&syncer, "app", "watching").await?;
    converge(&a, "/app/", &b, "/app/", CONVERGE).await?;
    syncer.kill9()?;

    let mut changed_on_a = BTreeSet::new();
    for i in 0..20 {
        let key = format!("/app/new-{i:02}");
        a_client.put(key.as_str(), "from-a", None).await?;
        changed_on_a.insert(key);
    }
    for i in 0..20 {
        let key = format!("/app/key-{i:06}");
        a_client.put(key.as_str(), "updated-on-a", None).await?;
        changed_on_a.insert(key);
    }
    for i in 100..110 {
        let key = format!("/app/key-{i:06}");
        a_client.delete(key.as_str(), None).await?;
        changed_on_a.insert(key);
    }

    let (code, output) = run_cli(&args(&[
        "promote",
        "--dst-endpoints",
        &b.endpoints_arg(),
        "--job-name",
        "app",
    ]))
    .await?;
    ensure!(code == 0, "promote failed: {output}");
    let mut b_client = b.client().await?;
    for i in 0..5 {
        b_client
            .put(format!("/app/key-{:06}", 500 + i), "from-b", None)
            .await?;
    }
    b_client.put("/app/b-only", "from-b", None).await?;
    b_client.delete("/app/key-000600", None).await?;
    Ok(Diverged { a, b, changed_on_a })
}

fn failback_args(a: &EtcdCluster, b: &EtcdCluster, lost: &std::path::Path) -> Vec<String> {
    let mut argv = mirror_args(a, b, "/app/");
    argv[0] = "failback".into();
    argv.extend(["--lost-writes-file".into(), lost.display().to_string()]);
    argv
}

fn lost_write_keys(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).context("lost-writes file")?;
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)?;
            Ok((
                value["key"].as_str().context("key")?.to_string(),
                value["loss"].as_str().context("loss")?.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_writes_only_the_dirty_keys_and_reverse_replication_takes_the_fast_path(
) -> Result<()> {
    let world = diverged().await?;
    let (a, b) = (&world.a, &world.b);
    let dir = tempfile::tempdir()?;
    let lost = dir.path().join("lost.jsonl");

    // A dry run first: it changes nothing and names the same losses.
    let before_dry = a.revision().await?;
    let mut dry = failback_args(a, b, &lost);
    dry.retain(|arg| arg != "--lost-writes-file" && arg != &lost.display().to_string());
    dry.push("--dry-run".into());
    let (code, output) = run_cli(&dry).await?;
    ensure!(code == 0, "dry run failed: {output}");
    ensure!(
        a.revision().await? == before_dry,
        "the dry run wrote: {output}"
    );
    ensure!(output.contains("50 lost writes"), "{output}");

    let before = a.revision().await?;
    let started = std::time::Instant::now();
    let (code, output) = run_cli(&failback_args(a, b, &lost)).await?;
    let took = started.elapsed();
    ensure!(code == 0, "failback failed: {output}");
    println!("failback of {KEYS} keys took {took:?}:\n{output}");
    ensure!(output.contains("from both histories"), "{output}");
    let comparison = compare(b, "/app/", a, "/app/").await?;
    ensure!(comparison.is_equal(), "A differs from B: {comparison:?}");
    // The fence, one txn of 57 writes, the handover: O(changed keys), not O(prefix).
    let grown = a.revision().await? - before;
    ensure!(grown <= 4, "A's revision grew by {grown}");

    let lost_keys = lost_write_keys(&lost)?;
    let named: BTreeSet<String> = lost_keys.iter().map(|(k, _)| k.clone()).collect();
    ensure!(named == world.changed_on_a, "lost writes {named:?}");
    ensure!(lost_keys.len() == 50 && lost_keys.iter().all(|(_, l)| l == "certain"));

    // Reverse replication resumes from failback's checkpoint: no full sync.
    let reverse = Syncer::start("reverse", &mirror_args(b, a, "/app/")).await?;
    wait_job_state(&reverse, "app", "watching").await?;
    b.client().await?.put("/app/after", "reverse", None).await?;
    converge(b, "/app/", a, "/app/", CONVERGE).await?;
    let slow = reverse
        .metric("etcd_syncer_slow_path_total", &[("job", "app")])
        .await?;
    ensure!(slow == 0.0, "reverse replication ran {slow} full syncs");
    reverse.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_with_the_old_primary_compacted_uses_the_diff_and_stays_exact() -> Result<()> {
    let world = diverged().await?;
    let (a, b) = (&world.a, &world.b);
    a.compact().await?;
    let dir = tempfile::tempdir()?;
    let lost = dir.path().join("lost.jsonl");
    let (code, output) = run_cli(&failback_args(a, b, &lost)).await?;
    ensure!(code == 0, "failback failed: {output}");
    println!("{output}");
    ensure!(output.contains("full diff"), "{output}");
    let comparison = compare(b, "/app/", a, "/app/").await?;
    ensure!(comparison.is_equal(), "A differs from B: {comparison:?}");
    // The standby's history still shows which keys it never touched, so
    // even A's deletes are certain losses.
    let lost_keys = lost_write_keys(&lost)?;
    let named: BTreeSet<String> = lost_keys.iter().map(|(k, _)| k.clone()).collect();
    ensure!(named == world.changed_on_a, "lost writes {named:?}");
    ensure!(
        lost_keys.iter().all(|(_, l)| l == "certain"),
        "{lost_keys:?}"
    );
    Ok(())
}
