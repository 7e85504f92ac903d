//! `zk2etcd`: ZooKeeper prefixes mirrored into etcd, by leader-locked replicas.

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::error::AppError;
use crate::config::{default_instance_id, Zk2EtcdArgs};
use crate::etcd::client::Cluster;
use crate::ha::zk_replica::run_zk_replica;
use crate::model::keys::MetaKeys;
use crate::telemetry::metrics::Metrics;

/// `etcd-syncer zk2etcd`: runs until cancelled (SIGTERM, SIGINT).
pub async fn run_zk2etcd(args: Zk2EtcdArgs, cancel: CancellationToken) -> Result<(), AppError> {
    let job = args.to_job()?;
    let dest_settings = args.dest.flags().into_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let instance = args.instance_id.clone().unwrap_or_else(default_instance_id);
    let metrics = Metrics::new().job(&job.name);
    info!(job = %job.name, servers = %job.servers, prefixes = ?job.prefixes.iter().map(|p| p.zk.as_str()).collect::<Vec<_>>(), %instance, "Starting zk2etcd.");
    run_zk_replica(
        dest,
        MetaKeys::new(&args.meta_prefix, &job.name),
        instance,
        job,
        args.lock_ttl,
        metrics,
        cancel,
    )
    .await;
    Ok(())
}
