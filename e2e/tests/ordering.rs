//! The pipelined, chained apply path is equivalent to applying source
//! revisions one by one: every destination state that carries a checkpoint
//! equals the source at that checkpoint revision, and the checkpoint never
//! goes backwards. Checked against the destination's own MVCC history while
//! etcd reorders pipelined txns behind a 30 ms round trip; the test only
//! counts once the syncer has really seen a reorder
//! (`etcd_syncer_txn_reorders_total`), so it cannot pass with the pipeline
//! off (one txn in flight) or with reorders never happening.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::load::Load;
use e2e::*;

/// Load rounds tried before giving up on seeing a reorder.
const MAX_ROUNDS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_only_passes_through_source_states() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        proxy: Some(ProxySide::Dest),
        // No gap between pipelined sends: etcd runs the newest request first, so
        // txns sent back to back get applied out of order and the chain has to
        // catch it. (After a reorder the writer widens the gap to 1 ms, doubling
        // up to 25 ms, and shrinks it back on clean commits.)
        extra_args: e2e::args(&["--pipeline-spacing", "0s"]),
        ..MirrorOptions::default()
    })
    .await?;
    clusters
        .proxy
        .as_ref()
        .context("proxy")?
        .set_delay(Duration::from_millis(15));
    let mirror = clusters.mirror().await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);

    // Many writers, many small txns, no rate limit: the source produces
    // revisions far faster than one 30 ms round trip per txn could carry,
    // so several txns are in flight at once. A reorder is then near certain
    // in one round; the rounds repeat (bounded) until the syncer has counted
    // one, and the test never passes without one.
    let reorders = || async {
        syncer
            .metric("etcd_syncer_txn_reorders_total", &[("job", "app")])
            .await
    };
    let mut rounds = 0;
    while reorders().await? == 0.0 {
        ensure!(
            rounds < MAX_ROUNDS,
            "no reorder in {MAX_ROUNDS} load rounds: the pipeline never had txns applied out of order, so the history check below would prove nothing"
        );
        let mut load = Load::new("/app/", 16, 120);
        load.keys_per_txn = 3;
        load.delete_every = Some(7);
        load.range_delete_every = Some(11);
        load.tag = format!("round-{rounds}");
        let clients = vec![source.client().await?, source.client().await?];
        load.run(&clients).await?;
        mirror.converge().await?;
        rounds += 1;
    }
    let txns = syncer
        .metric("etcd_syncer_txns_total", &[("job", "app")])
        .await?;
    let reorders = reorders().await?;
    println!("{rounds} load round(s): {txns} txns, {reorders} reorder re-sends");
    ensure!(reorders >= 1.0);
    let Mirror {
        source,
        dest,
        syncer,
        ..
    } = mirror;
    syncer.finish().await?;

    let history = monotonic_checkpoint_history(&dest, "app").await?;
    ensure!(
        history.len() > 10,
        "expected many checkpoint writes, got {}",
        history.len()
    );
    let mut src = source.client().await?;
    let mut dst = dest.client().await?;
    for (dest_revision, checkpoint) in &history {
        let synced = checkpoint["last_synced_rev"]
            .as_i64()
            .context("last_synced_rev")?;
        if checkpoint.get("partial_revision").is_some() {
            continue;
        }
        let at_dest = read_prefix_at(&mut dst, "/app/", *dest_revision).await?;
        let at_source = read_prefix_at(&mut src, "/app/", synced).await?;
        ensure!(
            at_dest == at_source,
            "destination revision {dest_revision} (checkpoint {synced}) is not a source state: {} vs {} keys",
            at_dest.len(),
            at_source.len()
        );
    }
    Ok(())
}
