//! `zk2etcd`: ZooKeeper prefixes mirrored into etcd, by leader-locked replicas.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::error::AppError;
use crate::config::{default_instance_id, Zk2EtcdArgs};
use crate::etcd::client::Cluster;
use crate::ha::zk_replica::{run_zk_replica, ZkReplica};
use crate::model::keys::MetaKeys;
use crate::ops::http::StatusView;
use crate::telemetry::health::{Health, DEFAULT_LIVENESS_TIMEOUT};
use crate::telemetry::metrics::Metrics;

/// `etcd-syncer zk2etcd`: runs until cancelled (SIGTERM, SIGINT).
pub async fn run_zk2etcd(args: Zk2EtcdArgs, cancel: CancellationToken) -> Result<(), AppError> {
    let job = args.to_job()?;
    let dest_settings = args.dest.flags().into_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let instance = args.instance_id.clone().unwrap_or_else(default_instance_id);
    let registry = Metrics::new();
    let metrics = registry.job(&job.name);
    let health = Arc::new(Health::new([job.name.as_str()], DEFAULT_LIVENESS_TIMEOUT));
    let status = Arc::new(StatusView {
        dest: std::sync::OnceLock::new(),
        meta_prefix: args.meta_prefix.clone(),
        instance_id: instance.clone(),
        jobs: std::sync::RwLock::new(vec![metrics.clone()]),
    });
    let _ = status.dest.set(dest.clone());
    health.set_reachable(crate::model::Side::Destination, true);
    let (addr, _http) = crate::ops::http::serve(
        args.metrics_addr,
        registry,
        health.clone(),
        status,
        cancel.clone(),
    )
    .await?;
    info!(%addr, job = %job.name, "Metrics server listening.");
    info!(job = %job.name, servers = %job.servers, prefixes = ?job.prefixes.iter().map(|p| p.zk.as_str()).collect::<Vec<_>>(), %instance, "Starting zk2etcd.");
    run_zk_replica(
        ZkReplica {
            dest,
            keys: MetaKeys::new(&args.meta_prefix, &job.name),
            instance,
            job,
            lock_ttl: args.lock_ttl,
            metrics,
            health,
        },
        cancel,
    )
    .await;
    Ok(())
}
