//! The jobs of a running `mirror-plus`, and live reloads of its
//! configuration.
//!
//! A reload (SIGHUP, or the config file's content changed: Kubernetes
//! updates a mounted ConfigMap in place) reads the flags given at start and
//! the file again, validates them exactly as at start, and applies
//! [`crate::config::reload::plan`]: jobs added start, jobs removed stop
//! (their lock key deleted, their checkpoint kept), changed jobs restart
//! (and resume from their checkpoints), changed connections are rebuilt
//! under the running jobs. A configuration that does not validate, or a
//! cluster that does not connect with it, changes nothing: an ERROR names
//! the field and the fix, and `etcd_syncer_config_reloads_total{result="error"}`
//! counts it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::reload::{keep_fixed, plan};
use crate::config::settings::FILE_CHECK_INTERVAL;
use crate::config::{JobSettings, MirrorArgs, Settings};
use crate::etcd::client::Cluster;
use crate::etcd::routes::{connect_preferred, file_fingerprint, Routes};
use crate::ha::election::leave;
use crate::ha::replica::{run_replica, Instance};
use crate::mirror::fenced::FencedWriter;
use crate::mirror::meta::Fence;
use crate::mirror::rate::WriteRate;
use crate::mirror::writer::DestWriter;
use crate::mirror::{JobContext, JobError};
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::model::versions::Quirks;
use crate::model::Side;
use crate::ops::http::StatusView;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{JobMetrics, Metrics};

/// How long a removed job may take to stop before its lock is deleted
/// anyway (its writes are fenced on that lock).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What every job of the process shares.
pub struct Shared {
    pub source: Cluster,
    pub dest: Cluster,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub status: Arc<StatusView>,
    pub instance: Arc<Instance>,
    pub quirks: Quirks,
}

/// Where a reload reads the configuration: the flags given at start (their
/// values stay), and the file they name (read again).
pub struct ReloadSource {
    pub args: MirrorArgs,
}

/// A job that stopped the process.
#[derive(Debug)]
pub struct JobFailure {
    pub job: String,
    pub source: JobError,
}

struct Running {
    /// Where its lock and checkpoint are: under the meta prefix it started
    /// with (a reload may have changed the prefix since).
    keys: MetaKeys,
    /// Its series (`Metrics::job` again would reset its state to starting).
    metrics: JobMetrics,
    cancel: CancellationToken,
}

pub struct Supervisor {
    shared: Shared,
    settings: Settings,
    reload: Option<ReloadSource>,
    jobs: JoinSet<JobEnd>,
    running: HashMap<String, Running>,
    /// Jobs asked to stop, and what starts in their place once they have.
    stopping: HashMap<String, Option<JobSettings>>,
    routes: HashMap<Side, (CancellationToken, tokio::task::JoinHandle<()>)>,
    cancel: CancellationToken,
}

/// A replica task's end: its job's name and result.
type JobEnd = (String, Result<(), JobError>);

enum Event {
    Cancelled,
    Joined(Option<Result<JobEnd, tokio::task::JoinError>>),
    Reload(&'static str),
}

impl Supervisor {
    pub fn new(
        shared: Shared,
        settings: Settings,
        reload: Option<ReloadSource>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            shared,
            settings,
            reload,
            jobs: JoinSet::new(),
            running: HashMap::new(),
            stopping: HashMap::new(),
            routes: HashMap::new(),
            cancel,
        }
    }

    /// Endpoint-group failover and file watching for `side`, replacing
    /// the task that ran for it.
    pub fn start_routes(&mut self, side: Side, active_group: usize) {
        if let Some((token, _)) = self.routes.remove(&side) {
            token.cancel();
        }
        let (cluster, settings, probe) = match side {
            Side::Source => (
                self.shared.source.clone(),
                self.settings.source.clone(),
                self.settings.jobs[0].prefix.clone(),
            ),
            Side::Destination => (
                self.shared.dest.clone(),
                self.settings.destination.clone(),
                self.settings.meta_prefix.clone(),
            ),
        };
        let token = self.cancel.child_token();
        let task = tokio::spawn(
            Routes::new(
                cluster,
                settings,
                self.settings.failover,
                probe.into_bytes(),
                self.shared.metrics.routes(),
            )
            .run(active_group, token.clone()),
        );
        self.routes.insert(side, (token, task));
    }

    /// Starts one job's replica.
    pub fn start_job(&mut self, job: &JobSettings) {
        let settings = &self.settings;
        let metrics = self.shared.metrics.job(&job.name);
        self.shared.health.heartbeat(&job.name);
        let keys = MetaKeys::new(&settings.meta_prefix, &job.name);
        let cancel = self.cancel.child_token();
        // Writes need the job lock; the replica adds it to the fence once elected.
        let writer = Arc::new(DestWriter::over(
            Arc::new(
                FencedWriter::new(
                    self.shared.dest.clone(),
                    keys.clone(),
                    Fence::new(&keys, None),
                    metrics.clone(),
                )
                .with_rate(WriteRate::new(job.write_rate).map(Arc::new), cancel.clone()),
            ),
            None,
        ));
        let template = JobContext {
            job: job.clone(),
            rewrite: KeyRewrite::new(job.prefix.as_bytes(), job.dest_prefix.as_bytes())
                .excluding(&job.exclude_prefixes),
            keys,
            meta_prefix: settings.meta_prefix.as_bytes().to_vec(),
            source: self.shared.source.clone(),
            dest: self.shared.dest.clone(),
            writer,
            limits: settings.limits,
            tuning: settings.tuning,
            max_prune_ratio: settings.max_prune_ratio,
            metrics: metrics.clone(),
            instance_id: settings.instance_id.clone(),
            health: self.shared.health.clone(),
            checks: settings.checks,
            quirks: self.shared.quirks,
            lease_settings: settings.leases,
            lag_origin: Default::default(),
            ids: Default::default(),
        };
        let name = job.name.clone();
        let instance = self.shared.instance.clone();
        let replica_cancel = cancel.clone();
        if settings.revision_exact {
            // Its own lease-only lock: a lock key would move the standby's revision.
            let options = crate::mirror::exact::ExactOptions {
                lock_ttl: settings.lock_ttl,
                gap: settings.exact_gap,
            };
            self.jobs.spawn(async move {
                (
                    name,
                    crate::mirror::exact::run(template, options, replica_cancel).await,
                )
            });
        } else {
            self.jobs.spawn(async move {
                (name, run_replica(template, instance, replica_cancel).await)
            });
        }
        self.running.insert(
            job.name.clone(),
            Running {
                keys: MetaKeys::new(&settings.meta_prefix, &job.name),
                metrics: metrics.clone(),
                cancel,
            },
        );
        self.publish_jobs();
    }

    fn publish_jobs(&self) {
        let mut running: Vec<(&String, &Running)> = self.running.iter().collect();
        running.sort_by_key(|(name, _)| *name);
        let jobs = running
            .into_iter()
            .map(|(_, job)| job.metrics.clone())
            .collect();
        *self
            .shared
            .status
            .jobs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = jobs;
        self.shared
            .instance
            .total_jobs
            .store(self.running.len(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Asks a job to stop; `then` starts in its place once it has.
    fn stop_job(&mut self, name: &str, then: Option<JobSettings>) {
        if let Some(running) = self.running.get(name) {
            running.cancel.cancel();
            self.stopping.insert(name.to_string(), then);
        }
    }

    /// A stopped job leaves the lock queue (leader or standby), so another
    /// instance can take it at once, or (removed) nobody waits on it.
    async fn after_stop(&mut self, name: &str) {
        let Some(running) = self.running.remove(name) else {
            return;
        };
        if let Some(session) = self.shared.instance.sessions.existing().await {
            let left = tokio::time::timeout(
                STOP_GRACE,
                leave(&self.shared.dest, &running.keys, &session),
            );
            match left.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    warn!(job = %name, %error, "Could not delete the job's lock key; it goes with this instance's lease.")
                }
                Err(_) => {
                    warn!(job = %name, "Deleting the job's lock key timed out; it goes with this instance's lease.")
                }
            }
        }
        match self.stopping.remove(name).flatten() {
            Some(next) => {
                info!(job = %name, "Job restarted with its new settings; it resumes from its checkpoint.");
                self.start_job(&next);
            }
            None => {
                self.shared.metrics.forget_job(name);
                self.shared.health.remove(name);
                info!(job = %name, "Job removed by the reload; its checkpoint stays on the destination.");
                self.publish_jobs();
            }
        }
    }

    /// Runs until cancelled or a job fails; returns the first failure.
    ///
    /// # Cancel-Safety
    /// On cancellation every job is cancelled and awaited before it returns.
    pub async fn run(mut self) -> Option<JobFailure> {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        if hangup.is_none() {
            warn!("Cannot install the SIGHUP handler; the config file is still watched.");
        }
        let config_path = self.reload.as_ref().and_then(|r| r.args.config.clone());
        let mut loaded = config_path.as_deref().and_then(file_fingerprint);
        let mut file_checks = tokio::time::interval(FILE_CHECK_INTERVAL);
        file_checks.tick().await;
        let mut failure = None;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Event::Cancelled,
                // Never empty while running (a configuration has a job),
                // but an empty set must not read as "every job ended".
                joined = self.jobs.join_next(), if !self.jobs.is_empty() => Event::Joined(joined),
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } }, if self.reload.is_some() => Event::Reload("SIGHUP"),
                _ = file_checks.tick(), if config_path.is_some() => {
                    let now = config_path.as_deref().and_then(file_fingerprint);
                    if now != loaded && now.is_some() {
                        loaded = now;
                        Event::Reload("the config file changed")
                    } else {
                        continue;
                    }
                }
            };
            match event {
                Event::Cancelled => break,
                Event::Joined(None) => break,
                Event::Joined(Some(Ok((job, Ok(()))))) if self.stopping.contains_key(&job) => {
                    self.after_stop(&job).await;
                }
                Event::Joined(Some(Ok((_, Ok(()))))) => {}
                Event::Joined(Some(Ok((job, Err(source))))) => {
                    error!(%job, error = %source, "Job failed; stopping.");
                    self.cancel.cancel();
                    failure.get_or_insert(JobFailure { job, source });
                    break;
                }
                Event::Joined(Some(Err(join_error))) => {
                    error!(error = %join_error, "Job task panicked; stopping.");
                    self.cancel.cancel();
                    failure.get_or_insert(JobFailure {
                        job: "<unknown>".into(),
                        source: JobError::Internal(join_error.to_string()),
                    });
                    break;
                }
                Event::Reload(trigger) => self.reload(trigger).await,
            }
        }
        self.cancel.cancel();
        while let Some(joined) = self.jobs.join_next().await {
            if let Ok((job, Err(source))) = joined {
                if !matches!(source, JobError::Cancelled) {
                    error!(%job, error = %source, "Job failed while stopping.");
                    failure.get_or_insert(JobFailure { job, source });
                }
            }
        }
        for (_, (_, task)) in self.routes.drain() {
            let _ = task.await;
        }
        failure
    }

    /// Whether `new` reaches the cluster the destination is now: moving
    /// to another one would leave this process's sessions, locks and
    /// leases behind (their keepalives and fences name the old one).
    async fn same_destination(&self, new: &Cluster, probe: &str) -> Result<(), String> {
        let new_id = new
            .head_hedged(probe.as_bytes())
            .await
            .map_err(|error| format!("the new destination does not answer: {error}"))?
            .cluster_id;
        let old_id = match self.shared.dest.expected_cluster_id() {
            Some(id) => id,
            None => self
                .shared
                .dest
                .head_hedged(probe.as_bytes())
                .await
                .map_err(|error| {
                    format!("the destination in use does not answer, so it cannot be told apart from the new one: {error}")
                })?
                .cluster_id,
        };
        if new_id != old_id && new_id != 0 && old_id != 0 {
            return Err(format!(
                "the new [destination] is another cluster (id {new_id:x}; the one in use is {old_id:x})"
            ));
        }
        Ok(())
    }

    /// Reads and applies the configuration again; on any error the running
    /// configuration stays as it is.
    async fn reload(&mut self, trigger: &'static str) {
        let Some(source) = &self.reload else {
            return;
        };
        info!(trigger, "Reloading the configuration.");
        let new = match source.args.clone().into_settings() {
            Ok(new) => new,
            Err(error) => {
                error!(%error, "Configuration reload refused: the running configuration stays. Fix the config and reload again (`--validate-config` checks it first).");
                self.shared.metrics.config_reloaded("error");
                return;
            }
        };
        let first = plan(&self.settings, &new);
        if !first.needs_restart.is_empty() {
            warn!(fields = ?first.needs_restart, "These settings take effect only after a restart; their running values stay.");
        }
        let new = keep_fixed(&self.settings, new);
        let plan = plan(&self.settings, &new);
        // Connect first: a cluster that does not answer with the new
        // settings changes nothing.
        let mut reconnected = Vec::new();
        for side in &plan.reconnect {
            let cluster_settings = match side {
                Side::Source => &new.source,
                Side::Destination => &new.destination,
            };
            match connect_preferred(cluster_settings, new.tuning.request_timeout).await {
                Ok((cluster, group)) => reconnected.push((*side, cluster, group)),
                Err(error) => {
                    self.shared.metrics.config_reloaded("error");
                    error!(%side, %error, "Configuration reload refused: the cluster does not connect with the new settings; the running configuration stays.");
                    return;
                }
            }
        }
        if let Some((_, cluster, _)) = reconnected
            .iter()
            .find(|(side, _, _)| *side == Side::Destination)
        {
            if let Err(reason) = self.same_destination(cluster, &new.meta_prefix).await {
                self.shared.metrics.config_reloaded("error");
                error!(%reason, "Configuration reload refused: [destination] must stay the same cluster while running (the jobs' locks, sessions, leases and checkpoints live there); the running configuration stays. Restart the process to mirror to another destination.");
                return;
            }
        }
        let old = std::mem::replace(&mut self.settings, new);
        for (side, cluster, group) in reconnected {
            let shared = match side {
                Side::Source => &self.shared.source,
                Side::Destination => &self.shared.dest,
            };
            shared.switch_like(&cluster);
            self.start_routes(side, group);
        }
        for name in &plan.stop {
            self.stop_job(name, None);
        }
        for job in &plan.restart {
            self.stop_job(&job.name, Some(job.clone()));
        }
        for job in &plan.start {
            if self.running.contains_key(&job.name) {
                // Still stopping from an earlier reload: start it after.
                self.stopping.insert(job.name.clone(), Some(job.clone()));
            } else {
                self.start_job(job);
            }
        }
        drop(old);
        self.shared.metrics.config_reloaded("ok");
        let names = |jobs: &[JobSettings]| jobs.iter().map(|j| j.name.clone()).collect::<Vec<_>>();
        info!(
            trigger,
            started = ?names(&plan.start),
            stopped = ?plan.stop,
            restarted = ?names(&plan.restart),
            reconnected = ?plan.reconnect.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "Configuration reloaded."
        );
    }
}
