//! [`JobContext`]: everything one job needs, shared by its phases.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{CheckSettings, JobSettings, LeaseMode, LeaseSettings, Tuning, TxnLimits};
use crate::etcd::client::Cluster;
use crate::mirror::fenced::FencedWriter;
use crate::mirror::leases::LeaseBook;
use crate::mirror::meta::{CheckpointOf, Fence};
use crate::mirror::writer::DestWriter;
use crate::model::ids::Ids;
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::JobMetrics;

/// The oldest source head the destination did not reflect yet, and when it
/// was seen; shared by a job's attempts (so the lag keeps growing across
/// retries).
pub type LagOrigin = std::sync::Arc<std::sync::Mutex<Option<(i64, tokio::time::Instant)>>>;

/// Everything one job needs, shared by its phases.
#[derive(Clone)]
pub struct JobContext {
    pub job: JobSettings,
    pub keys: MetaKeys,
    pub rewrite: KeyRewrite,
    pub meta_prefix: Vec<u8>,
    pub source: Cluster,
    pub dest: Cluster,
    pub writer: Arc<DestWriter>,
    pub limits: TxnLimits,
    pub tuning: Tuning,
    pub max_prune_ratio: f64,
    pub metrics: JobMetrics,
    pub instance_id: String,
    pub health: Arc<Health>,
    pub checks: CheckSettings,
    /// The workarounds the source's etcd version needs.
    pub quirks: crate::model::versions::Quirks,
    pub lease_settings: LeaseSettings,
    /// The oldest source head not yet reflected, kept across attempts.
    pub lag_origin: LagOrigin,
    /// Random identifiers of the data path (seeded in the simulator).
    pub ids: Ids,
}

impl JobContext {
    pub fn heartbeat(&self) {
        self.health.heartbeat(&self.job.name);
    }

    /// Sleeps `delay` (a backoff step) while still telling /healthz the job
    /// loop is alive. Returns false if cancelled first.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: it only sleeps.
    pub async fn pause(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        let alive = || {
            self.heartbeat();
            self.publish_lag_while_stopped();
        };
        crate::etcd::retry::sleep_alive(delay, &alive, cancel).await
    }

    /// Between attempts nothing applies: the lag keeps growing from the
    /// oldest head the destination does not reflect, so lag alerts fire
    /// on a job that retries for ever.
    fn publish_lag_while_stopped(&self) {
        let origin = self.lag_origin.lock().ok().and_then(|o| *o);
        if let Some((revision, seen)) = origin {
            if revision > self.metrics.last_synced_revision.get() {
                self.metrics.lag_seconds.set(seen.elapsed().as_secs_f64());
            }
        }
    }

    /// The same job writing under `fence` (the lock this instance now
    /// holds), with a lease book of its own unless `--leases strip`; a wait
    /// for the write-rate limit ends when `cancel` (the job's token) fires.
    pub fn fenced(&self, fence: Fence, cancel: &CancellationToken) -> JobContext {
        let mut ctx = self.clone();
        let fenced = Arc::new(
            FencedWriter::new(
                self.dest.clone(),
                self.keys.clone(),
                fence,
                self.metrics.clone(),
            )
            .with_rate(self.writer.rate().cloned(), cancel.clone()),
        );
        let book = (self.lease_settings.mode == LeaseMode::Faithful).then(|| {
            LeaseBook::new(
                &self.job.name,
                self.rewrite.source_prefix().to_vec(),
                self.source.clone(),
                fenced.clone(),
                self.lease_settings.grace,
                self.ids.clone(),
                cancel,
            )
        });
        ctx.writer = Arc::new(DestWriter::over(fenced, book));
        ctx
    }

    /// The lease book of this leadership (`None` with `--leases strip`).
    pub fn leases(&self) -> Option<&Arc<LeaseBook>> {
        self.writer.leases()
    }

    /// What this job's checkpoints say about it.
    pub fn checkpoint_of(&self) -> CheckpointOf {
        CheckpointOf {
            instance: self.instance_id.clone(),
            source_prefix: String::from_utf8_lossy(self.rewrite.source_prefix()).into_owned(),
            dest_prefix: String::from_utf8_lossy(self.rewrite.dest_prefix()).into_owned(),
            excluded: self.rewrite.excluded_source_strings(),
            leases_mirrored: self.leases().is_some(),
        }
    }
}
