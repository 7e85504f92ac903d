//! Per-job controls against real etcd: the destination write-rate limit and
//! excluded sub-prefixes.

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
    let mirror = Mirror::start(MirrorOptions {
        extra_args: e2e::args(&["--max-write-ops-per-second", "1000"]),
        // The measurement starts while the full sync runs.
        wait_watching: false,
        ..MirrorOptions::loaded(KEYS, 100)
    })
    .await?;
    let mut dst = mirror.dest.client().await?;
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
    mirror.wait_state("watching").await?;
    assert_eq!(
        mirror
            .syncer
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "app"), ("op", "put")]
            )
            .await?,
        KEYS as f64,
        "every key came through the rate-limited full sync"
    );
    // The watch is limited too, but only slowed: a write still arrives.
    mirror
        .source
        .client()
        .await?
        .put("/app/after", "a", None)
        .await?;
    mirror.converge().await?;
    mirror.finish().await
}

/// `--exclude-prefix /app/local/`: the source's keys there are not copied
/// (by the full sync nor the watch), the destination's own keys there are
/// not pruned, and `check --exclude-prefix` finds the job consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_prefixes_are_neither_copied_nor_pruned() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions::with_args(&[
        "--exclude-prefix",
        "/app/local/",
    ]))
    .await?;
    let mut src = clusters.source.client().await?;
    let mut dst = clusters.dest.client().await?;
    src.put("/app/a", "1", None).await?;
    src.put("/app/local/from-source", "s", None).await?;
    dst.put("/app/local/destination-own", "d", None).await?;

    let mirror = clusters.mirror().await?;
    let (source, dest) = (&mirror.source, &mirror.dest);
    src.put("/app/b", "2", None).await?;
    src.put("/app/local/later", "s", None).await?;
    src.put("/app/c", "3", None).await?;
    eventually(Duration::from_secs(60), "/app/c mirrored", || async {
        let mut dst = dest.client().await?;
        Ok(!dst.get("/app/c", None).await?.kvs().is_empty())
    })
    .await?;
    // Suffixes below /app/.
    let mirrored = read_prefix(&mut dst, "/app/").await?;
    let keys: Vec<&[u8]> = mirrored.keys().map(Vec::as_slice).collect();
    assert_eq!(
        keys,
        [b"a".as_slice(), b"b", b"c", b"local/destination-own"],
        "the source's excluded keys are not copied, the destination's stay"
    );
    assert_eq!(mirrored[b"local/destination-own".as_slice()], b"d");

    let check = |excluded: bool| {
        let extra: &[&str] = if excluded {
            &["--prefix", "/app/", "--exclude-prefix", "/app/local/"]
        } else {
            &["--prefix", "/app/"]
        };
        check_args(source, dest, extra)
    };
    let (code, output) = run_cli(&check(true)).await?;
    assert_eq!(code, 0, "consistent modulo the excluded range:\n{output}");
    let (code, output) = run_cli(&check(false)).await?;
    assert_eq!(code, 1, "without the exclusion they differ:\n{output}");
    mirror.finish().await
}

async fn count_prefix(client: &mut etcd_client::Client, prefix: &str) -> Result<usize> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    Ok(client.get(prefix, Some(options)).await?.count() as usize)
}
