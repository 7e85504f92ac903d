//! Per-job controls against real etcd: the destination write-rate limit.

use std::time::Duration;

use anyhow::Result;
use e2e::*;

/// A full sync of 6,000 keys under `--max-write-ops-per-second 1000` writes
/// no faster than the limit allows: the rate measured from destination key
/// counts over the sync stays under 1.5× the limit (the bucket's one-second
/// burst and one txn fit in that margin over a ~5 s window; unlimited, the
/// same sync runs at tens of thousands of keys a second). Only an upper
/// bound: a slow machine lowers the rate, it cannot raise it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_rate_limit_slows_a_full_sync() -> Result<()> {
    const KEYS: usize = 6000;
    const LIMIT: f64 = 1000.0;
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut src = source.client().await?;
    put_many(&mut src, "/app/", KEYS, 100, "v1").await?;

    let mut args = mirror_args(&source, &dest, "/app/");
    args.extend(e2e::args(&["--max-write-ops-per-second", "1000"]));
    let syncer = Syncer::start("syncer", &args).await?;
    let mut dst = dest.client().await?;
    // The window runs from the last poll that saw no key (before the first
    // write) to the first that saw them all, so it can only overstate the
    // sync's duration, and a sync done between two polls still measures fast.
    let mut before_first = tokio::time::Instant::now();
    let done = loop {
        let count = count_prefix(&mut dst, "/app/").await?;
        let now = tokio::time::Instant::now();
        if count == 0 {
            before_first = now;
        }
        if count >= KEYS {
            break now;
        }
        anyhow::ensure!(
            before_first.elapsed() < Duration::from_secs(120),
            "the full sync did not finish within 120 s ({count} of {KEYS} keys)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let window = (done - before_first).as_secs_f64();
    let rate = KEYS as f64 / window;
    eprintln!(
        "measured {rate:.0} keys/s over {window:.2} s ({KEYS} keys) against a limit of {LIMIT} ops/s"
    );
    assert!(
        rate <= 1.5 * LIMIT,
        "measured {rate:.0} keys/s over {window:.2} s, above 1.5 x the {LIMIT} ops/s limit"
    );
    wait_job_state(&syncer, "app", "watching").await?;
    assert_eq!(
        syncer
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "app"), ("op", "put")]
            )
            .await?,
        KEYS as f64,
        "every key came through the rate-limited full sync"
    );
    // The watch is limited too, but only slowed: a write still arrives.
    src.put("/app/after", "a", None).await?;
    converge(&source, "/app/", &dest, "/app/", Duration::from_secs(60)).await?;
    syncer.finish().await
}

async fn count_prefix(client: &mut etcd_client::Client, prefix: &str) -> Result<usize> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    Ok(client.get(prefix, Some(options)).await?.count() as usize)
}
