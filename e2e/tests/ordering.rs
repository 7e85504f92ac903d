//! The pipelined, chained apply path is equivalent to applying source
//! revisions one by one: every destination state that carries a checkpoint
//! equals the source at that checkpoint revision, and the checkpoint never
//! goes backwards. Checked against the destination's own MVCC history while
//! etcd reorders pipelined txns behind a 30 ms round trip.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::load::Load;
use e2e::proxy::LinkProxy;
use e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_only_passes_through_source_states() -> Result<()> {
    let source = EtcdCluster::start().await?;
    let dest = EtcdCluster::start().await?;
    let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
    proxy.set_delay(Duration::from_millis(15));
    let mut args = mirror_args(&source, &dest, "/app/");
    let at = args
        .iter()
        .position(|a| a == "--dst-endpoints")
        .context("flag")?
        + 1;
    args[at] = proxied;
    let syncer = Syncer::start("syncer", &args).await?;
    eventually(Duration::from_secs(60), "watching", || async {
        Ok(syncer
            .metric(
                "etcd_syncer_job_state",
                &[("job", "app"), ("state", "watching")],
            )
            .await?
            == 1.0)
    })
    .await?;

    let mut load = Load::new("/app/", 16, 120);
    load.keys_per_txn = 3;
    load.delete_every = Some(7);
    load.range_delete_every = Some(11);
    let clients = vec![source.client().await?, source.client().await?];
    load.run(&clients).await?;
    converge(&source, "/app/", &dest, "/app/", Duration::from_secs(60)).await?;
    let txns = syncer
        .metric("etcd_syncer_txns_total", &[("job", "app")])
        .await?;
    let reorders = syncer
        .metric("etcd_syncer_txn_reorders_total", &[("job", "app")])
        .await?;
    println!("{txns} txns, {reorders} reorder re-sends");
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
