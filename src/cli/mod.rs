//! `mirror-plus`: connects both clusters, serves the HTTP endpoints, and runs
//! one task per job until cancelled.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ops::admin::{
    add_source_lag, collect_status, promote, render_text, undo_promote, wait_for_sync, AdminError,
};
use crate::check::{check, CheckOptions, CheckReport, CheckTarget, RepairQueue};
use crate::etcd::client::{ClientError, Cluster, FailureKind};
use crate::config::{
    CheckArgs, ClusterSettings, ConfigError, OutputFormat, PromoteArgs, ResetArgs, Settings, Side,
    StatusArgs,
};
use crate::ha::election::SessionManager;
use crate::telemetry::health::Health;
use crate::ops::http::StatusView;
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::telemetry::metrics::{JobMetrics, Metrics};
use crate::mirror::meta::Fence;
use crate::mirror::writer::DestWriter;
use crate::mirror::{request_reset, JobContext, JobError};
use crate::ha::replica::{run_replica, Instance};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] crate::ops::http::BindError),
    #[error("job {job}: {source}")]
    Job {
        job: String,
        #[source]
        source: JobError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
}

impl AppError {
    /// Exit code 2 for anything an operator fixes in the configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) | AppError::Bind(_) => 2,
            AppError::Job {
                source: JobError::Loop { .. },
                ..
            } => 2,
            AppError::Client(error) if error.kind() == FailureKind::Rejected => 2,
            AppError::Admin(AdminError::NoJobs { .. } | AdminError::UnknownJob { .. }) => 2,
            _ => 1,
        }
    }
}

const READINESS_PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run_mirror(settings: Settings, cancel: CancellationToken) -> Result<(), AppError> {
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
        jobs: job_metrics.clone(),
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

    let Some(source) =
        connect_with_retry(&settings.source, &settings, &job_metrics, &cancel).await?
    else {
        return Ok(());
    };
    let Some(dest) =
        connect_with_retry(&settings.destination, &settings, &job_metrics, &cancel).await?
    else {
        return Ok(());
    };
    let _ = status_view.dest.set(dest.clone());

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
        rebalancing: AtomicBool::new(false),
        total_jobs: settings.jobs.len(),
        lock_ttl: settings.lock_ttl,
        rebalance_interval: settings.rebalance_interval,
    });
    let mut jobs = JoinSet::new();
    for (job, metrics) in settings.jobs.iter().zip(job_metrics) {
        let keys = MetaKeys::new(&settings.meta_prefix, &job.name);
        if settings.reset_last_synced_rev
            && !request_reset_with_retry(&dest, &keys, &settings.instance_id, &cancel).await
        {
            return Ok(());
        }
        // Writes need the job lock; the replica adds it to the fence once elected.
        let writer = Arc::new(DestWriter::new(
            dest.clone(),
            keys.clone(),
            Fence::new(&keys, None),
            metrics.clone(),
        ));
        let template = JobContext {
            job: job.clone(),
            rewrite: KeyRewrite::new(job.prefix.as_bytes(), job.dest_prefix.as_bytes()),
            keys,
            meta_prefix: settings.meta_prefix.as_bytes().to_vec(),
            source: source.clone(),
            dest: dest.clone(),
            writer,
            limits: settings.limits,
            tuning: settings.tuning,
            max_prune_ratio: settings.max_prune_ratio,
            metrics,
            instance_id: settings.instance_id.clone(),
            health: health.clone(),
            checks: settings.checks,
            repairs: Arc::new(RepairQueue::default()),
        };
        let name = job.name.clone();
        let replica_cancel = cancel.clone();
        let instance = instance.clone();
        jobs.spawn(async move { (name, run_replica(template, instance, replica_cancel).await) });
    }

    let mut failure = None;
    while let Some(joined) = jobs.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((job, Err(source))) => {
                error!(%job, error = %source, "Job failed; stopping.");
                cancel.cancel();
                failure.get_or_insert(AppError::Job { job, source });
            }
            Err(join_error) => {
                error!(error = %join_error, "Job task panicked; stopping.");
                cancel.cancel();
                failure.get_or_insert(AppError::Job {
                    job: "<unknown>".into(),
                    source: JobError::Internal(join_error.to_string()),
                });
            }
        }
    }
    cancel.cancel();
    // Every replica has stopped writing: hand the locks over now instead of
    // letting standbys wait out the TTL.
    sessions.resign().await;
    let _ = prober.await;
    let _ = http_task.await;
    info!("Stopped.");
    failure.map_or(Ok(()), Err)
}

/// Connecting authenticates when a user is set, so a wrong password or an
/// unreachable cluster shows here. Both are retried: the process stays up,
/// not ready, with the error counted, until the cluster answers.
async fn connect_with_retry(
    settings: &ClusterSettings,
    all: &Settings,
    job_metrics: &[JobMetrics],
    cancel: &CancellationToken,
) -> Result<Option<Cluster>, AppError> {
    let mut backoff = crate::etcd::client::retry_backoff(Duration::from_secs(30));
    loop {
        let error = match Cluster::connect(settings, all.tuning.request_timeout).await {
            Ok(cluster) => return Ok(Some(cluster)),
            Err(error) => error,
        };
        if let ClientError::TlsFile { .. } = error {
            return Err(error.into());
        }
        let kind = match (error.kind(), settings.side) {
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
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
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
    let mut backoff = backon::ExponentialBuilder::default()
        .with_jitter()
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .build();
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
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
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
        let (source_ok, dest_ok) = tokio::join!(source.head(&source_probe), dest.head(&dest_probe));
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

/// `etcd-syncer status`.
pub async fn run_status(args: StatusArgs) -> Result<(), AppError> {
    args.validate()?;
    let dest_settings = args.dest.into_settings()?;
    let source_settings = args.source.into_optional_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let mut statuses = collect_status(&dest, &args.meta_prefix, args.job_name.as_deref()).await?;
    if let Some(source_settings) = source_settings {
        let source = Cluster::connect(&source_settings, args.request_timeout).await?;
        add_source_lag(&source, &mut statuses).await?;
    }
    match args.output {
        OutputFormat::Text => print!("{}", render_text(&statuses)),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&statuses).unwrap_or_default()
        ),
    }
    Ok(())
}

/// `etcd-syncer promote`.
pub async fn run_promote(args: PromoteArgs) -> Result<(), AppError> {
    args.validate()?;
    let dest_settings = args.dest.into_settings()?;
    let source_settings = args.source.into_optional_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let source = match &source_settings {
        Some(settings) => Some(Cluster::connect(settings, args.request_timeout).await?),
        None => None,
    };
    let jobs: Vec<String> = match &args.job_name {
        Some(job) => collect_status(&dest, &args.meta_prefix, Some(job))
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
        None => collect_status(&dest, &args.meta_prefix, None)
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
    };
    let by = crate::config::default_instance_id();
    let mut outcomes = Vec::new();
    for job in &jobs {
        let outcome = if args.undo {
            undo_promote(&dest, &args.meta_prefix, job).await?
        } else {
            if let (true, Some(source)) = (args.wait_for_sync, &source) {
                let reached =
                    wait_for_sync(&dest, source, &args.meta_prefix, job, args.wait_timeout).await?;
                info!(%job, checkpoint = reached, "Destination caught up with the source.");
            }
            let mut outcome = promote(&dest, &args.meta_prefix, job, &by).await?;
            if let Some(source) = &source {
                outcome.consistency =
                    promoted_consistency(source, &dest, &args.meta_prefix, job).await;
            }
            outcome
        };
        outcomes.push(outcome);
    }
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).unwrap_or_default()
        ),
        OutputFormat::Text => {
            for outcome in &outcomes {
                println!(
                    "job {}: {}; final checkpoint revision {}",
                    outcome.job,
                    outcome.action,
                    outcome
                        .final_checkpoint_revision
                        .map_or_else(|| "none".to_string(), |r| r.to_string())
                );
            }
        }
    }
    Ok(())
}

/// The exact check right after promotion: what the new primary holds
/// compared with the old one at the final checkpoint. Best effort: the
/// source may be gone, which is why one promotes.
async fn promoted_consistency(
    source: &Cluster,
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
) -> Option<CheckReport> {
    let status = collect_status(dest, meta_prefix, Some(job))
        .await
        .ok()?
        .pop()?;
    let prefix = status.source_prefix?;
    let dest_prefix = status.dest_prefix.unwrap_or_else(|| prefix.clone());
    let target = CheckTarget {
        job: job.to_string(),
        rewrite: KeyRewrite::new(prefix.as_bytes(), dest_prefix.as_bytes()),
        keys: MetaKeys::new(meta_prefix, job),
        meta_prefix: meta_prefix.as_bytes().to_vec(),
    };
    match check(
        source,
        dest,
        &target,
        CheckOptions::default(),
        &CancellationToken::new(),
    )
    .await
    {
        Ok(report) => Some(report),
        Err(error) => {
            warn!(%job, %error, "No consistency summary after promotion.");
            None
        }
    }
}

/// `etcd-syncer check`: true when the destination is consistent.
pub async fn run_check(args: CheckArgs) -> Result<bool, AppError> {
    args.validate()?;
    let source = Cluster::connect(&args.source.into_settings()?, args.request_timeout).await?;
    let dest = Cluster::connect(&args.dest.into_settings()?, args.request_timeout).await?;
    let (job, prefix, dest_prefix) = match (&args.prefix, &args.job_name) {
        (Some(prefix), job) => {
            let job = job
                .clone()
                .unwrap_or_else(|| crate::model::keys::job_name_from_prefix(prefix));
            let dest_prefix = if args.no_dest_prefix {
                String::new()
            } else {
                args.dest_prefix.clone().unwrap_or_else(|| prefix.clone())
            };
            (job, prefix.clone(), dest_prefix)
        }
        (None, Some(job)) => {
            let status = collect_status(&dest, &args.meta_prefix, Some(job))
                .await?
                .remove(0);
            let prefix = status.source_prefix.ok_or(ConfigError::Missing {
                field: "--prefix",
                fix: "the job has no checkpoint that records its prefix yet; give --prefix (and --dest-prefix if it differs)",
            })?;
            let dest_prefix = status.dest_prefix.unwrap_or_else(|| prefix.clone());
            (job.clone(), prefix, dest_prefix)
        }
        (None, None) => unreachable!("clap requires --prefix or --job-name"),
    };
    let target = CheckTarget {
        keys: MetaKeys::new(&args.meta_prefix, &job),
        job: job.clone(),
        rewrite: KeyRewrite::new(prefix.as_bytes(), dest_prefix.as_bytes()),
        meta_prefix: args.meta_prefix.as_bytes().to_vec(),
    };
    let options = CheckOptions {
        page_size: args.page_size.clamp(1, 100_000),
        sample_limit: args.sample_size,
        ..CheckOptions::default()
    };
    let report = check(&source, &dest, &target, options, &CancellationToken::new()).await?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        OutputFormat::Text => print!("{}", render_check(&report)),
    }
    Ok(report.is_consistent())
}

fn render_check(report: &CheckReport) -> String {
    let how = if report.exact {
        "exact, at the checkpoint revision"
    } else {
        "APPROXIMATE: the checkpoint revision is compacted on the source; compared with the current source and re-checked"
    };
    let mut out = format!(
        "job {}: {} at source revision {} (destination revision {}; {how})\n  source keys {}, destination keys {}, {:.2} s\n",
        report.job,
        if report.is_consistent() { "consistent" } else { "DIFFERENT" },
        report.source_revision,
        report.dest_revision,
        report.source_keys,
        report.dest_keys,
        report.duration_seconds
    );
    if !report.is_consistent() {
        out.push_str(&format!(
            "  dst miss (missing on the destination): {}\n  src miss (only on the destination):    {}\n  mismatch (values differ):              {}\n",
            report.dst_miss, report.src_miss, report.mismatch
        ));
        for (label, samples) in [
            ("dst miss", &report.samples.dst_miss),
            ("src miss", &report.samples.src_miss),
            ("mismatch", &report.samples.mismatch),
        ] {
            if !samples.is_empty() {
                out.push_str(&format!("  sample {label}: {}\n", samples.join(", ")));
            }
        }
    }
    out
}

/// `etcd-syncer reset`: leaves a reset request for each chosen job.
pub async fn run_reset(args: ResetArgs) -> Result<(), AppError> {
    let request_timeout = args.request_timeout;
    let (job_name, all) = (args.job_name.clone(), args.all);
    let (dest_settings, meta_prefix, configured) = args.resolve()?;
    let dest = Cluster::connect(&dest_settings, request_timeout).await?;
    let jobs: Vec<String> = match (job_name, all) {
        (Some(job), _) => vec![job],
        (None, _) if !configured.is_empty() => configured,
        (None, _) => collect_status(&dest, &meta_prefix, None)
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
    };
    let instance = crate::config::default_instance_id();
    for job in jobs {
        match request_reset(&dest, &MetaKeys::new(&meta_prefix, &job), &instance).await {
            Ok(()) => println!("job {job}: reset requested; the leader drops the checkpoint and runs one full sync"),
            Err(JobError::Promoted) => println!("job {job}: promoted, not reset"),
            Err(JobError::Client(error)) => return Err(error.into()),
            Err(other) => return Err(AppError::Job { job, source: other }),
        }
    }
    Ok(())
}
