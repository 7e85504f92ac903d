//! `mirror-plus`: connects both clusters, serves the HTTP endpoints, and runs
//! one task per job until cancelled.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::error::AppError;
use crate::config::{ClusterSettings, MirrorArgs, Settings, Side};
use crate::etcd::client::{ClientError, Cluster, FailureKind};
use crate::ha::election::SessionManager;
use crate::ha::replica::Instance;
use crate::mirror::{request_reset, JobError};
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::model::versions::{Quirks, Version};
use crate::ops::http::StatusView;
use crate::ops::supervisor::{JobFailure, ReloadSource, Shared, Supervisor};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{JobMetrics, Metrics};

/// `mirror-plus --validate-config`: merge and check everything, connect to
/// nothing, and print the jobs.
pub fn validate_config(args: MirrorArgs) -> Result<(), AppError> {
    let settings = args.into_settings()?;
    let jobs: Vec<&str> = settings.jobs.iter().map(|j| j.name.as_str()).collect();
    println!(
        "configuration is valid: {} job(s): {}",
        jobs.len(),
        jobs.join(", ")
    );
    Ok(())
}

const READINESS_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Runs every job until cancelled. `reload` (the flags as given) lets a
/// SIGHUP or a change of the config file apply a new configuration.
pub async fn run_mirror(
    settings: Settings,
    reload: Option<MirrorArgs>,
    cancel: CancellationToken,
) -> Result<(), AppError> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(
        settings.jobs.iter().map(|j| j.name.as_str()),
        settings.liveness_timeout,
    ));
    let job_metrics: Vec<JobMetrics> = settings.jobs.iter().map(|j| metrics.job(&j.name)).collect();
    let status_view = Arc::new(StatusView {
        dest: std::sync::OnceLock::new(),
        meta_prefix: settings.meta_prefix.clone(),
        instance_id: settings.instance_id.clone(),
        jobs: std::sync::RwLock::new(job_metrics.clone()),
    });
    let (addr, http_task) = crate::ops::http::serve(
        settings.metrics_addr,
        metrics.clone(),
        health.clone(),
        status_view.clone(),
        cancel.clone(),
    )
    .await?;
    info!(
        %addr,
        instance = %settings.instance_id,
        jobs = settings.jobs.len(),
        "Metrics server listening."
    );

    let Some((source, source_group)) =
        connect_with_retry(&settings.source, &settings, &job_metrics, &health, &cancel).await?
    else {
        return Ok(());
    };
    let Some((dest, dest_group)) = connect_with_retry(
        &settings.destination,
        &settings,
        &job_metrics,
        &health,
        &cancel,
    )
    .await?
    else {
        return Ok(());
    };
    let _ = status_view.dest.set(dest.clone());
    let quirks = detect_versions(&source, &dest).await;

    let prober = tokio::spawn(probe_readiness(
        source.clone(),
        dest.clone(),
        settings.jobs[0].prefix.as_bytes().to_vec(),
        settings.meta_prefix.as_bytes().to_vec(),
        health.clone(),
        cancel.clone(),
    ));

    let sessions = Arc::new(SessionManager::new(dest.clone(), settings.lock_ttl));
    let instance = Arc::new(Instance {
        sessions: sessions.clone(),
        leading: AtomicUsize::new(0),
        rebalancing: AtomicUsize::new(0),
        total_jobs: AtomicUsize::new(settings.jobs.len()),
        lock_ttl: settings.lock_ttl,
        rebalance_interval: settings.rebalance_interval,
    });
    let auth_sync = settings.auth.enabled.then(|| {
        tokio::spawn(start_auth_sync(
            &settings,
            dest.clone(),
            &metrics,
            &job_metrics[0],
            cancel.clone(),
        ))
    });
    if settings.reset_last_synced_rev {
        for job in &settings.jobs {
            let keys = MetaKeys::new(&settings.meta_prefix, &job.name);
            if !request_reset_with_retry(&dest, &keys, &settings.instance_id, &cancel).await {
                return Ok(());
            }
        }
    }
    let jobs = settings.jobs.clone();
    let (source_for_pin, dest_for_pin, meta_prefix) =
        (source.clone(), dest.clone(), settings.meta_prefix.clone());
    let mut supervisor = Supervisor::new(
        Shared {
            source,
            dest,
            metrics: metrics.clone(),
            health: health.clone(),
            status: status_view.clone(),
            instance,
            quirks,
        },
        settings,
        reload.map(|args| ReloadSource { args }),
        cancel.clone(),
    );
    learn_source_cluster(&source_for_pin, &dest_for_pin, &jobs, &meta_prefix).await;
    // Endpoint-group failover and rotated files, for each side.
    supervisor.start_routes(Side::Source, source_group);
    supervisor.start_routes(Side::Destination, dest_group);
    for job in &jobs {
        supervisor.start_job(job);
    }
    let failure = supervisor.run().await;
    cancel.cancel();
    // Every replica has stopped writing: hand the locks over now instead of
    // letting standbys wait out the TTL.
    sessions.resign().await;
    if let Some(auth_sync) = auth_sync {
        let _ = auth_sync.await;
    }
    let _ = prober.await;
    let _ = http_task.await;
    info!("Stopped.");
    failure.map_or(Ok(()), |JobFailure { job, source }| {
        Err(AppError::Job { job, source })
    })
}

/// How many jobs' checkpoints are read at start for the source's cluster id.
const PIN_READS: usize = 8;

/// Before any endpoint group is health-checked: the cluster id the jobs'
/// checkpoints name, so a fallback group answering as another cluster is
/// never switched to while the preferred group is down at start. One try
/// each (the jobs learn it again when they read their checkpoints); a
/// destination that does not answer yet leaves it to them.
async fn learn_source_cluster(
    source: &Cluster,
    dest: &Cluster,
    jobs: &[crate::config::JobSettings],
    meta_prefix: &str,
) {
    for job in jobs.iter().take(PIN_READS) {
        let keys = MetaKeys::new(meta_prefix, &job.name);
        match crate::etcd::meta::read_checkpoint(dest, &keys).await {
            Ok(Some(checkpoint)) => {
                source.learn_cluster_id(checkpoint.source_cluster_id);
                return;
            }
            Ok(None) => continue,
            Err(_) => return,
        }
    }
}

/// `--sync-auth`: one loop per process, working while this instance leads
/// the first job (its `is_leader` gauge is what the replica sets).
fn start_auth_sync(
    settings: &Settings,
    dest: Cluster,
    metrics: &Metrics,
    first_job: &JobMetrics,
    cancel: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let first_job_leader = first_job.is_leader.clone();
    let config = crate::ha::auth_sync::AuthSyncLoop {
        source: settings.source.clone(),
        destination: settings.destination.clone(),
        request_timeout: settings.tuning.request_timeout,
        interval: settings.auth.interval,
        dest_kv: dest,
        meta_prefix: settings.meta_prefix.clone(),
        rewrites: settings
            .jobs
            .iter()
            .map(|j| KeyRewrite::new(j.prefix.as_bytes(), j.dest_prefix.as_bytes()))
            .collect(),
        passwords: settings.auth.passwords.clone(),
        instance_id: settings.instance_id.clone(),
        metrics: metrics.auth(),
    };
    crate::ha::auth_sync::run_auth_sync(
        config,
        Arc::new(move || first_job_leader.get() == 1),
        cancel,
    )
}

/// Connecting authenticates when a user is set, so a wrong password or an
/// unreachable cluster shows here. Both are retried: the process stays up,
/// not ready, with the error counted, until the cluster answers.
async fn connect_with_retry(
    settings: &ClusterSettings,
    all: &Settings,
    job_metrics: &[JobMetrics],
    health: &Health,
    cancel: &CancellationToken,
) -> Result<Option<(Cluster, usize)>, AppError> {
    let request_timeout = all.tuning.request_timeout;
    retry_connect(
        || crate::etcd::routes::connect_preferred(settings, request_timeout),
        settings.side,
        job_metrics,
        health,
        cancel,
    )
    .await
}

/// Reads both servers' versions and logs, once, which workarounds the
/// source's version needs. A version we cannot read turns them all on.
async fn detect_versions(source: &Cluster, dest: &Cluster) -> Quirks {
    let (source_version, dest_version) =
        tokio::join!(source.server_version(), dest.server_version());
    let quirks = Quirks::of(source_version);
    let shown = |v: Option<Version>| {
        v.map_or_else(
            || "unknown (needs root with auth on)".to_string(),
            |v| v.to_string(),
        )
    };
    info!(
        source_version = %shown(source_version),
        destination_version = %shown(dest_version),
        workarounds = ?quirks.describe(),
        "etcd versions detected."
    );
    for side in [Side::Source, Side::Destination] {
        if let Some(decision) = crate::etcd::compress::decision(side) {
            let on_off = if decision.on { "on" } else { "off" };
            info!(side = %side, compression = on_off, "{side}: gzip compression {on_off} ({})", decision.why);
        }
    }
    quirks
}

/// The connect loop: retries until connected or cancelled, counting each
/// failure on every job and keeping their liveness heartbeats going (a
/// cluster that is down at start is not a wedged process).
async fn retry_connect<F, Fut, T>(
    connect: F,
    side: Side,
    job_metrics: &[JobMetrics],
    health: &Health,
    cancel: &CancellationToken,
) -> Result<Option<T>, AppError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut backoff = crate::etcd::retry::Policy::CONNECT.backoff();
    let heartbeat = || health.heartbeat_all();
    loop {
        heartbeat();
        let error = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            connected = connect() => match connected {
                Ok(cluster) => return Ok(Some(cluster)),
                Err(error) => error,
            },
        };
        if let ClientError::TlsFile { .. } = error {
            return Err(error.into());
        }
        let kind = match (error.kind(), side) {
            (FailureKind::Auth, _) => "auth",
            (_, Side::Source) => "source_unavailable",
            (_, Side::Destination) => "dest_unavailable",
        };
        for metrics in job_metrics {
            metrics.error(kind);
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        if error.kind() == FailureKind::Auth {
            error!(%error, retry_in = ?delay, "Authentication failed; operator action needed.");
        } else {
            warn!(%error, retry_in = ?delay, "Cannot connect; retrying.");
        }
        if !crate::etcd::retry::sleep_alive(delay, &heartbeat, cancel).await {
            return Ok(None);
        }
    }
}

/// Records `--reset-last-synced-rev` for one job, retrying until the
/// destination answers. Returns false when cancelled first.
async fn request_reset_with_retry(
    dest: &Cluster,
    keys: &MetaKeys,
    instance: &str,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = crate::etcd::retry::Policy::CONNECT.backoff();
    loop {
        match request_reset(dest, keys, instance).await {
            Ok(()) => {
                info!(job_meta = %keys.job_root(), "Reset requested: the next leader drops the checkpoint and runs a full sync.");
                return true;
            }
            Err(JobError::Promoted) => {
                warn!(job_meta = %keys.job_root(), "Reset not requested: the job is promoted.");
                return true;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(%error, retry_in = ?delay, "Could not record the reset request; retrying.");
                if !crate::etcd::retry::sleep_alive(delay, &|| {}, cancel).await {
                    return false;
                }
            }
        }
    }
}

/// Keeps `/readyz` honest: both clusters must answer a cheap read.
async fn probe_readiness(
    source: Cluster,
    dest: Cluster,
    source_probe: Vec<u8>,
    dest_probe: Vec<u8>,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(READINESS_PROBE_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Cancel-safe: the reads are dropped unanswered.
        let (source_ok, dest_ok) = tokio::select! {
            _ = cancel.cancelled() => return,
            both = async { tokio::join!(source.head_hedged(&source_probe), dest.head_hedged(&dest_probe)) } => both,
        };
        for (side, result) in [(Side::Source, source_ok), (Side::Destination, dest_ok)] {
            let reachable = result.is_ok();
            if health.reachable(side) && !reachable {
                if let Err(error) = result {
                    warn!(%side, %error, "Cluster became unreachable; not ready.");
                }
            }
            health.set_reachable(side, reachable);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// B3: a cluster unreachable at start (with auth, connecting is where it
    /// fails) must not turn /healthz red: the loop heartbeats while it waits.
    #[tokio::test(start_paused = true)]
    async fn connect_retries_keep_liveness() {
        let timeout = Duration::from_secs(10);
        let health = Health::new(["a", "b"], timeout);
        let metrics = crate::telemetry::metrics::Metrics::new();
        let jobs = vec![metrics.job("a"), metrics.job("b")];
        let cancel = CancellationToken::new();
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let unreachable = || {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Err::<Cluster, _>(ClientError::Timeout {
                    side: Side::Destination,
                    endpoints: "http://127.0.0.1:1".into(),
                    operation: "connect",
                    timeout: Duration::from_secs(5),
                })
            }
        };
        let watchdog = async {
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                assert!(
                    health.wedged_jobs().is_empty(),
                    "liveness failed while connecting"
                );
            }
            cancel.cancel();
        };
        let (connected, ()) = tokio::join!(
            retry_connect(unreachable, Side::Destination, &jobs, &health, &cancel),
            watchdog
        );
        assert!(matches!(connected, Ok(None)));
        assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) > 5);
    }
}
