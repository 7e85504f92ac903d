//! Replication of one job (one prefix): an explicit state machine.
//!
//! ```text
//!            ┌──────────────── error: back off, re-read the checkpoint ───────────────┐
//!            ▼                                                                        │
//!   Resolve ─┬─ checkpoint usable ──────────────────────────────▶ Watch (fast path) ──┤
//!            └─ none / reset / interrupted / replaced / behind ─▶ FullSync ─▶ Watch ──┤
//!                                      ▲                                              │
//!                                      └──────────── watch reports compaction ────────┘
//! ```
//!
//! Every destination txn carries the checkpoint it completes, so whatever
//! point this loop is interrupted at, the next Resolve finds the destination
//! equal to the source at the checkpoint revision.

pub mod full_sync;
pub mod history_window;
pub mod incremental;
pub mod leases;
pub mod meta;
pub mod periodic_check;
pub mod rate;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{
    CheckSettings, JobSettings, LeaseMode, LeaseSettings, Side, Tuning, TxnLimits,
};
use crate::etcd::api::{Op, RangeRequest, TxnRequest};
use crate::etcd::client::{ClientError, Cluster, ClusterHead, FailureKind};
use crate::mirror::meta::{now_rfc3339, read_job_meta, Checkpoint, Fence, JobMeta, KeyGuard};
use crate::mirror::writer::DestWriter;
use crate::model::keys::{prefixes_overlap, KeyRewrite, MetaKeys};
use crate::model::schema::EventStamp;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{JobMetrics, JobState};

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
    pub lag_origin: incremental::LagOrigin,
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
        let book = (self.lease_settings.mode == LeaseMode::Faithful).then(|| {
            Arc::new(leases::LeaseBook::new(
                &self.job.name,
                self.keys.clone(),
                self.source.clone(),
                self.dest.clone(),
                self.lease_settings.grace,
                self.metrics.clone(),
            ))
        });
        ctx.writer = Arc::new(
            DestWriter::new(
                self.dest.clone(),
                self.keys.clone(),
                fence,
                self.metrics.clone(),
            )
            .with_leases(book)
            .with_rate(self.writer.rate().cloned(), cancel.clone()),
        );
        ctx
    }

    /// The lease book of this leadership (`None` with `--leases strip`).
    pub fn leases(&self) -> Option<&Arc<leases::LeaseBook>> {
        self.writer.leases()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("source history is compacted up to revision {compact_revision}, past the checkpoint; a full sync is needed")]
    Compacted { compact_revision: i64 },
    #[error("source watch failed: {source}")]
    Watch { source: etcd_client::Error },
    #[error("source closed the watch stream")]
    WatchClosed,
    #[error("source canceled the watch: {reason}")]
    WatchCanceled { reason: String },
    #[error("source watch delivered nothing for {idle:?}, not even a progress answer")]
    WatchStalled { idle: Duration },
    #[error("write fenced: {reason}")]
    Fenced { reason: &'static str },
    #[error("the job is promoted (a promoted marker exists on the destination); replication stays stopped until `promote --undo`")]
    Promoted,
    #[error("the {what} changed underneath this instance")]
    GuardMoved { what: &'static str },
    #[error("the source's history at revision {pinned_rev} changed: {what}; starting over")]
    SourceChanged { pinned_rev: i64, what: &'static str },
    #[error(
        "mass-delete guard: this full sync would delete {would_delete} of {dest_keys} destination keys, \
         more than --max-prune-ratio {max_prune_ratio} allows; nothing was deleted. If the source really \
         lost these keys, rerun with a higher --max-prune-ratio (1 allows all)"
    )]
    PruneGuard {
        would_delete: u64,
        dest_keys: u64,
        max_prune_ratio: f64,
    },
    #[error("source and destination are the same cluster (id {cluster_id:x}) and the job's prefixes overlap: mirroring would copy the mirror into itself")]
    Loop { cluster_id: u64 },
    #[error("a reset was requested (--reset-last-synced-rev)")]
    ResetRequested,
    #[error("{0}")]
    HistoryDiffers(SlowPathReason),
    #[error("{leases} mirrored destination lease(s) expired while their source leases live; a full sync restores their keys")]
    DestLeaseLost { leases: usize },
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::etcd::pager::PageError> for JobError {
    fn from(error: crate::etcd::pager::PageError) -> Self {
        match error {
            crate::etcd::pager::PageError::Client(error) => JobError::Client(error),
            crate::etcd::pager::PageError::Cancelled => JobError::Cancelled,
            other @ crate::etcd::pager::PageError::StoppedEarly => {
                JobError::Internal(other.to_string())
            }
        }
    }
}

/// What to do about an error: the one decision every loop follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: back off (capped, jittered) and resume from the checkpoint.
    Retry,
    /// An operator must act (credentials, quota, the prune guard, a bug):
    /// keep retrying slowly, log at ERROR.
    NeedsOperator,
    /// The checkpoint's history is gone or a reset was asked for: full sync now.
    Resync,
    /// The job is promoted: write nothing, poll for `promote --undo`.
    Promoted,
    /// Another instance leads: stop writing, campaign again.
    StepDown,
    /// Cannot go on (configuration): stop the process with `exit_code`.
    Exit,
    /// Cancelled: stop quietly.
    Stop,
}

/// How an error is handled, counted, logged and reported at exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub action: Action,
    /// `etcd_syncer_errors_total{kind}`.
    pub label: &'static str,
    pub level: tracing::Level,
    /// The process exit code if this error ends the process.
    pub exit_code: u8,
}

impl Policy {
    const fn new(action: Action, label: &'static str, level: tracing::Level) -> Self {
        let exit_code = match action {
            Action::Exit => 2,
            _ => 1,
        };
        Self {
            action,
            label,
            level,
            exit_code,
        }
    }
}

impl JobError {
    /// The one place that decides, per error, what happens next.
    pub fn policy(&self) -> Policy {
        use tracing::Level;
        match self {
            JobError::Client(error) => client_policy(error),
            JobError::Compacted { .. } => Policy::new(Action::Resync, "compacted", Level::INFO),
            JobError::Watch { source } => match crate::etcd::client::classify(source) {
                FailureKind::Auth => Policy::new(Action::NeedsOperator, "auth", Level::ERROR),
                FailureKind::Compacted => Policy::new(Action::Resync, "compacted", Level::INFO),
                _ => Policy::new(Action::Retry, "source_unavailable", Level::WARN),
            },
            JobError::WatchClosed | JobError::WatchCanceled { .. } => {
                Policy::new(Action::Retry, "source_unavailable", Level::WARN)
            }
            JobError::WatchStalled { .. } => {
                Policy::new(Action::Retry, "watch_stalled", Level::WARN)
            }
            JobError::Fenced { .. } => Policy::new(Action::StepDown, "fenced", Level::WARN),
            JobError::Promoted => Policy::new(Action::Promoted, "promoted", Level::WARN),
            JobError::GuardMoved { .. } => {
                Policy::new(Action::Retry, "checkpoint_moved", Level::WARN)
            }
            JobError::SourceChanged { .. } => {
                Policy::new(Action::Retry, "source_changed", Level::WARN)
            }
            JobError::PruneGuard { .. } => {
                Policy::new(Action::NeedsOperator, "prune_guard", Level::ERROR)
            }
            JobError::Loop { .. } => Policy::new(Action::Exit, "loop", Level::ERROR),
            JobError::ResetRequested => Policy::new(Action::Resync, "reset", Level::INFO),
            JobError::HistoryDiffers(_) => {
                Policy::new(Action::Resync, "history_differs", Level::WARN)
            }
            JobError::DestLeaseLost { .. } => {
                Policy::new(Action::Resync, "dest_lease_expired", Level::WARN)
            }
            JobError::Cancelled => Policy::new(Action::Stop, "cancelled", Level::DEBUG),
            JobError::Internal(_) => Policy::new(Action::NeedsOperator, "internal", Level::ERROR),
        }
    }

    /// The destination refused a write for lack of space (NOSPACE alarm).
    pub fn is_dest_out_of_space(&self) -> bool {
        matches!(self, JobError::Client(error) if error.kind() == FailureKind::QuotaExceeded)
    }

    /// Low-cardinality label for `etcd_syncer_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        self.policy().label
    }
}

fn client_policy(error: &ClientError) -> Policy {
    use tracing::Level;
    let label = client_error_kind(error);
    match error.kind() {
        FailureKind::Unavailable => Policy::new(Action::Retry, label, Level::WARN),
        FailureKind::Compacted => Policy::new(Action::Resync, label, Level::INFO),
        FailureKind::Auth | FailureKind::QuotaExceeded | FailureKind::Rejected => {
            Policy::new(Action::NeedsOperator, label, Level::ERROR)
        }
    }
}

/// The `errors_total{kind}` label of a client error.
pub fn client_error_kind(error: &ClientError) -> &'static str {
    match (error.kind(), error.side()) {
        (FailureKind::Auth, _) => "auth",
        (FailureKind::Compacted, _) => "compacted",
        (FailureKind::QuotaExceeded, _) => "dest_quota_exceeded",
        (FailureKind::Rejected, _) => "rejected",
        (FailureKind::Unavailable, Some(Side::Destination)) => "dest_unavailable",
        (FailureKind::Unavailable, _) => "source_unavailable",
    }
}

/// Why a full sync is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlowPathReason {
    NoCheckpoint,
    UnreadableCheckpoint,
    Reset,
    Interrupted {
        pinned_rev: Option<i64>,
    },
    SourceReplaced {
        checkpoint_cluster_id: u64,
        source_cluster_id: u64,
    },
    SourceBehind {
        checkpoint_rev: i64,
        source_rev: i64,
    },
    Compacted,
    /// The source's history at the checkpoint is not the destination's.
    HistoryDiffers {
        detail: String,
    },
    /// Destination leases expired on their own: the destination lost keys.
    DestLeasesExpired {
        leases: usize,
    },
    /// `--leases` changed since the checkpoint was written.
    LeaseModeChanged {
        leases_mirrored: bool,
    },
}

impl SlowPathReason {
    /// Whether the source's history made this full sync necessary: what a
    /// resync loop is made of (an interrupted full sync too: compaction
    /// retention shorter than a full sync takes restarts it for ever).
    pub fn forced_by_source(&self) -> bool {
        matches!(
            self,
            SlowPathReason::Compacted
                | SlowPathReason::SourceReplaced { .. }
                | SlowPathReason::SourceBehind { .. }
                | SlowPathReason::HistoryDiffers { .. }
                | SlowPathReason::Interrupted { .. }
        )
    }
}

impl std::fmt::Display for SlowPathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlowPathReason::NoCheckpoint => write!(f, "no checkpoint on the destination"),
            SlowPathReason::UnreadableCheckpoint => write!(f, "the checkpoint is unreadable"),
            SlowPathReason::Reset => write!(f, "--reset-last-synced-rev was requested"),
            SlowPathReason::Interrupted { pinned_rev: Some(rev) } => {
                write!(f, "a full sync at revision {rev} was interrupted")
            }
            SlowPathReason::Interrupted { pinned_rev: None } => write!(f, "a full sync was interrupted"),
            SlowPathReason::SourceReplaced {
                checkpoint_cluster_id,
                source_cluster_id,
            } => write!(
                f,
                "the source cluster changed (checkpoint from cluster {checkpoint_cluster_id:x}, source is {source_cluster_id:x})"
            ),
            SlowPathReason::SourceBehind { checkpoint_rev, source_rev } => write!(
                f,
                "the source revision {source_rev} is behind the checkpoint {checkpoint_rev} (restored from a backup?)"
            ),
            SlowPathReason::Compacted => write!(f, "the source compacted the history at or after the checkpoint (a watch from there could miss a delete: etcd-io/etcd#18089)"),
            SlowPathReason::LeaseModeChanged { leases_mirrored: true } => write!(
                f,
                "--leases faithful: the destination's keys were written without their leases (by --leases strip, or a version that did not mirror leases)"
            ),
            SlowPathReason::LeaseModeChanged { leases_mirrored: false } => write!(
                f,
                "--leases strip: the destination's keys sit on mirrored leases that nothing renews any more"
            ),
            SlowPathReason::DestLeasesExpired { leases } => write!(
                f,
                "{leases} mirrored lease(s) expired on the destination while their source leases live (no replica ran for longer than TTL + --lease-grace?)"
            ),
            SlowPathReason::HistoryDiffers { detail } => write!(
                f,
                "the source's history differs from what the destination reflects ({detail}); was the source rebuilt or restored with the same cluster id?"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Watch from the checkpoint; copy nothing.
    Resume(Checkpoint),
    FullSync(SlowPathReason),
}

/// Chooses the fast or the slow path from what the destination and source say.
pub fn decide(meta: &JobMeta, source: ClusterHead, forced: Option<SlowPathReason>) -> Decision {
    if let Some(reason) = forced {
        return Decision::FullSync(reason);
    }
    if meta.reset_request.is_some() {
        return Decision::FullSync(SlowPathReason::Reset);
    }
    if meta.full_sync_raw.is_some() {
        return Decision::FullSync(SlowPathReason::Interrupted {
            pinned_rev: meta.full_sync.as_ref().map(|m| m.pinned_rev),
        });
    }
    match &meta.checkpoint {
        None if meta.checkpoint_raw.is_some() => {
            Decision::FullSync(SlowPathReason::UnreadableCheckpoint)
        }
        None => Decision::FullSync(SlowPathReason::NoCheckpoint),
        Some(checkpoint) if checkpoint.source_cluster_id != source.cluster_id => {
            Decision::FullSync(SlowPathReason::SourceReplaced {
                checkpoint_cluster_id: checkpoint.source_cluster_id,
                source_cluster_id: source.cluster_id,
            })
        }
        Some(checkpoint) if source.revision < checkpoint.last_synced_rev => {
            Decision::FullSync(SlowPathReason::SourceBehind {
                checkpoint_rev: checkpoint.last_synced_rev,
                source_rev: source.revision,
            })
        }
        Some(checkpoint) => Decision::Resume(checkpoint.clone()),
    }
}

/// A checkpoint written under the other `--leases` mode: the destination's
/// keys sit on leases they should not (or not on those they should), which
/// only a full sync's diff can put right.
pub fn lease_mode_changed(meta: &JobMeta, leases_mirrored: bool) -> Option<SlowPathReason> {
    let checkpoint = meta.checkpoint.as_ref()?;
    (checkpoint.leases_mirrored != leases_mirrored)
        .then_some(SlowPathReason::LeaseModeChanged { leases_mirrored })
}

/// Capped at 10 s: after a long outage replication resumes within seconds
/// of the link coming back, while a dead cluster still sees only a few
/// requests a minute from each job.
fn job_backoff() -> impl Iterator<Item = Duration> {
    crate::etcd::retry::backoff(Duration::from_secs(10))
}

/// An attempt that ran this long before failing made progress: start the
/// backoff again from its minimum.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
const PROMOTED_POLL: Duration = Duration::from_secs(10);
/// A job the mass-delete guard stopped waits for an operator; it looks for
/// a reset request or a new leader this often, without scanning anything.
pub const PRUNE_GUARD_POLL: Duration = Duration::from_secs(60);
/// A destination out of space is tried again this often.
pub const NO_SPACE_POLL: Duration = Duration::from_secs(15);

/// Runs one job until cancelled, retrying every transient fault with capped,
/// jittered backoff and resuming from the checkpoint each time.
///
/// # Cancel-Safety
/// Returns promptly once `cancel` fires; an in-flight txn either commits with
/// its checkpoint or not at all.
pub async fn run_job(ctx: JobContext, cancel: CancellationToken) -> Result<(), JobError> {
    // Whatever this leadership starts (the lease keepalives) ends with it.
    let leadership = cancel.child_token();
    let _end_leadership = leadership.clone().drop_guard();
    let mut forced: Option<SlowPathReason> = None;
    let mut backoff = job_backoff();
    let mut promoted_logged = false;
    let mut consecutive_resyncs = 0u32;
    let mut resync_loop = ResyncLoop {
        full_syncs: 0,
        seen: ctx.metrics.forced_full_syncs(),
    };
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let attempt_started = Instant::now();
        // Cancelled early when a mirrored lease is found lost on the
        // destination: the attempt gives way to a full sync.
        let attempt = leadership.child_token();
        if let Some(book) = ctx.leases() {
            book.watch_attempt(attempt.clone());
        }
        let once = run_once(&ctx, forced.take(), &attempt, &leadership);
        let result = watch_stability(&ctx, once, &cancel, &mut resync_loop).await;
        if let Some(book) = ctx.leases().filter(|_| !cancel.is_cancelled()) {
            let lost = book.take_lost();
            if !lost.is_empty() {
                ctx.metrics.error("dest_lease_expired");
                forced = Some(SlowPathReason::DestLeasesExpired { leases: lost.len() });
                consecutive_resyncs += 1;
                if consecutive_resyncs > 2 {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    if !ctx.pause(delay, &cancel).await {
                        return Ok(());
                    }
                }
                continue;
            }
        }
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        ctx.heartbeat();
        let policy = error.policy();
        if attempt_started.elapsed() >= BACKOFF_RESET_AFTER {
            backoff = job_backoff();
            consecutive_resyncs = 0;
        }
        let delay = match policy.action {
            Action::Stop => return Ok(()),
            Action::StepDown | Action::Exit => {
                ctx.metrics.error(policy.label);
                ctx.metrics.set_state(JobState::Error);
                return Err(error);
            }
            Action::Resync => {
                // A full sync that keeps failing the same way right away
                // must not spin: from the third in a row, back off.
                consecutive_resyncs += 1;
                if consecutive_resyncs > 2 {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    warn!(job = %ctx.job.name, %error, retry_in = ?delay, "Full syncs keep being interrupted; backing off.");
                    if !ctx.pause(delay, &cancel).await {
                        return Ok(());
                    }
                }
                if let JobError::ResetRequested = error {
                    info!(job = %ctx.job.name, "Reset requested while replicating; taking the slow path.");
                } else if let JobError::HistoryDiffers(reason) = error {
                    ctx.metrics.error(policy.label);
                    forced = Some(reason);
                } else if let JobError::DestLeaseLost { leases } = error {
                    ctx.metrics.error(policy.label);
                    forced = Some(SlowPathReason::DestLeasesExpired { leases });
                } else {
                    ctx.metrics.error(policy.label);
                    info!(job = %ctx.job.name, %error, "Source history is compacted past the checkpoint; starting a full sync.");
                    forced = Some(SlowPathReason::Compacted);
                }
                continue;
            }
            Action::Promoted => {
                ctx.metrics.error(policy.label);
                ctx.metrics.set_state(JobState::Promoted);
                // Nothing renews a promoted job's leases: mirrored keys
                // expire after TTL + grace, as they would have on the primary.
                if let Some(book) = ctx.leases() {
                    book.stop_keeper();
                    book.clear();
                }
                if !promoted_logged {
                    warn!(job = %ctx.job.name, "Job is promoted; replication is stopped until the marker is removed with `promote --undo`.");
                    promoted_logged = true;
                }
                PROMOTED_POLL
            }
            Action::Retry | Action::NeedsOperator => {
                ctx.metrics.error(policy.label);
                promoted_logged = false;
                let delay = if matches!(error, JobError::PruneGuard { .. }) {
                    ctx.metrics.set_state(JobState::PruneGuard);
                    PRUNE_GUARD_POLL
                } else if error.is_dest_out_of_space() {
                    // Nothing will apply until an operator compacts,
                    // defragments and disarms the alarm: park, and look
                    // again now and then.
                    ctx.metrics.set_state(JobState::NoSpace);
                    NO_SPACE_POLL
                } else {
                    ctx.metrics.set_state(JobState::Error);
                    backoff.next().unwrap_or(Duration::from_secs(30))
                };
                if policy.level == tracing::Level::ERROR {
                    error!(job = %ctx.job.name, %error, retry_in = ?delay, "Replication failed; operator action needed.");
                } else {
                    warn!(job = %ctx.job.name, %error, retry_in = ?delay, "Replication interrupted; retrying from the checkpoint.");
                }
                delay
            }
        };
        if !ctx.pause(delay, &cancel).await {
            return Ok(());
        }
    }
}

/// How often a running attempt counts new full syncs and looks whether its
/// watch has become stable: a sixtieth of the stable period (10 s for the
/// default 10m), within 1 s to 1 min, so a loop is flagged and cleared a
/// little late rather than every job waking each second.
fn stability_poll(stable_period: Duration) -> Duration {
    (stable_period / 60).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Full syncs in a row without a stable watch (`--resync-loop-full-syncs`,
/// `--resync-loop-stable-period`): a source compacting faster than the job
/// resumes, or a source that keeps being replaced, makes every attempt a
/// full sync; correct, but the standby is never caught up for long.
#[derive(Debug)]
struct ResyncLoop {
    full_syncs: u64,
    /// Source-forced full syncs as far as already counted (a first sync, a
    /// reset, a lease-mode change or lost destination leases are not the
    /// source's doing and start no loop).
    seen: u64,
}

impl ResyncLoop {
    /// A watch stayed up for the stable period: the loop (if any) is over.
    fn stable(&mut self, ctx: &JobContext) {
        self.full_syncs = 0;
        self.seen = ctx.metrics.forced_full_syncs();
        if ctx.metrics.in_resync_loop() {
            ctx.metrics.set_resync_loop(false);
            info!(job = %ctx.job.name, stable_for = ?ctx.tuning.resync_loop_stable_period, "The watch stayed up; the resync loop is over.");
        }
    }

    /// Counts the full syncs started since the last look; enough of them in
    /// a row start the loop.
    fn observe(&mut self, ctx: &JobContext) {
        let started = ctx.metrics.forced_full_syncs();
        if started <= self.seen {
            return;
        }
        self.full_syncs += started - self.seen;
        self.seen = started;
        if self.full_syncs >= u64::from(ctx.tuning.resync_loop_full_syncs)
            && !ctx.metrics.in_resync_loop()
        {
            ctx.metrics.set_resync_loop(true);
            ctx.metrics.resync_loops_total.inc();
            error!(
                job = %ctx.job.name,
                full_syncs = self.full_syncs,
                stable_period = ?ctx.tuning.resync_loop_stable_period,
                "Resync loop: full sync after full sync without the watch staying up in between. Usually the source compacts its history before the job resumes: raise the source's --auto-compaction-retention (keep at least an hour of history). Otherwise the source keeps being replaced or restored (a new cluster or history each time): find what replaces it."
            );
        }
    }
}

/// Runs `attempt` to its end, counting the full syncs it starts and ending
/// a resync loop as soon as its watch has stayed up for the stable period.
///
/// # Cancel-Safety
/// On cancellation the attempt is still awaited: it stops on the same token
/// and finishes its in-flight txns.
async fn watch_stability(
    ctx: &JobContext,
    attempt: impl std::future::Future<Output = Result<(), JobError>>,
    cancel: &CancellationToken,
    resync_loop: &mut ResyncLoop,
) -> Result<(), JobError> {
    tokio::pin!(attempt);
    let mut stable = false;
    let mut poll = tokio::time::interval(stability_poll(ctx.tuning.resync_loop_stable_period));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stable_now = || {
        ctx.metrics
            .watching_for()
            .is_some_and(|up| up >= ctx.tuning.resync_loop_stable_period)
    };
    let result = loop {
        tokio::select! {
            biased;
            result = &mut attempt => break result,
            _ = cancel.cancelled() => break (&mut attempt).await,
            _ = poll.tick() => {
                resync_loop.observe(ctx);
                if !stable && stable_now() {
                    stable = true;
                    resync_loop.stable(ctx);
                }
            }
        }
    };
    resync_loop.observe(ctx);
    if !stable && stable_now() {
        resync_loop.stable(ctx);
    }
    result
}

async fn run_once(
    ctx: &JobContext,
    forced: Option<SlowPathReason>,
    cancel: &CancellationToken,
    leadership: &CancellationToken,
) -> Result<(), JobError> {
    ctx.metrics.set_state(JobState::Starting);
    let meta = read_job_meta(&ctx.dest, &ctx.keys).await?;
    if meta.promoted.is_some() {
        return Err(JobError::Promoted);
    }
    if let Some(book) = ctx.leases() {
        // A new leader renews the recorded leases at once, well within
        // their grace, before anything else.
        book.load(&meta.leases);
        book.ensure_keeper(ctx.writer.clone(), leadership);
    }
    let head = ctx.source.head(ctx.rewrite.source_prefix()).await?;
    if head.cluster_id != 0
        && head.cluster_id == meta.dest_cluster_id
        && prefixes_overlap(ctx.rewrite.source_prefix(), ctx.rewrite.dest_prefix())
    {
        return Err(JobError::Loop {
            cluster_id: head.cluster_id,
        });
    }
    ctx.metrics.set_progress(
        meta.checkpoint.as_ref().map_or(0, |c| c.last_synced_rev),
        head.revision,
    );

    // Whichever path: once the watch exists, `incremental::run` checks
    // that the source still has the checkpoint's history, and that it is
    // the history the destination reflects.
    let forced = forced.or_else(|| lease_mode_changed(&meta, ctx.leases().is_some()));
    let decision = decide(&meta, head, forced);
    let (guard, revision, last_event, cluster_id) = match decision {
        Decision::Resume(checkpoint) => {
            ctx.metrics.fast_path_total.inc();
            info!(
                job = %ctx.job.name,
                path = "fast",
                last_synced_revision = checkpoint.last_synced_rev,
                source_revision = head.revision,
                "Resuming from the checkpoint."
            );
            let raw = meta
                .checkpoint_raw
                .clone()
                .expect("a parsed checkpoint has raw bytes");
            (
                KeyGuard::Holds(raw),
                checkpoint.last_synced_rev,
                checkpoint.last_event,
                checkpoint.source_cluster_id,
            )
        }
        Decision::FullSync(reason) => {
            ctx.metrics.slow_path_total.inc();
            if reason.forced_by_source() {
                ctx.metrics.count_forced_full_sync();
            }
            ctx.metrics.set_state(JobState::FullSync);
            info!(job = %ctx.job.name, path = "slow", %reason, "Taking the slow path.");
            if let Some(book) = ctx.leases() {
                // Until it finishes the destination reflects no revision of
                // the history it copies: no retiring lease may be revoked
                // on an old checkpoint's word.
                book.resumed(head.cluster_id, 0);
            }
            let synced = full_sync::run(ctx, &meta, &reason, cancel).await?;
            if let Some(book) = ctx.leases() {
                book.full_sync_done(
                    synced.checkpoint.source_cluster_id,
                    synced.checkpoint.last_synced_rev,
                );
            }
            (
                KeyGuard::Holds(synced.checkpoint_bytes),
                synced.checkpoint.last_synced_rev,
                synced.checkpoint.last_event,
                synced.checkpoint.source_cluster_id,
            )
        }
    };
    ctx.metrics.set_progress(revision, head.revision);
    if let Some(book) = ctx.leases() {
        // A checkpoint from before cluster ids were recorded resumes on the
        // head's word (the resume check compares the rest).
        book.resumed(
            if cluster_id != 0 {
                cluster_id
            } else {
                head.cluster_id
            },
            revision,
        );
    }
    // `incremental::run` reports Watching once the resume is verified.
    incremental::run(ctx, guard, revision, last_event, cluster_id, cancel).await?;
    Ok(())
}

/// What the source and the destination say about a checkpoint's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeEvidence {
    /// Source keys in the prefix at the checkpoint revision (meta keys excluded).
    pub source_keys: i64,
    /// Destination keys in the mirrored prefix now (meta keys excluded).
    pub dest_keys: i64,
    /// The checkpoint's last event key on the source at that revision:
    /// its mod revision and value, or `None` when absent.
    pub last_event_key: Option<(i64, Vec<u8>)>,
    /// When the last event is a delete: whether the key existed on the
    /// source just before it (`None` when that revision is compacted).
    pub existed_before_delete: Option<bool>,
}

/// Reads the evidence: count-only ranges on both sides and, when the
/// checkpoint names its last event, that key at the checkpoint revision.
pub(crate) async fn read_resume_evidence(
    ctx: &JobContext,
    at: i64,
    last_event: Option<&EventStamp>,
) -> Result<ResumeEvidence, JobError> {
    let source_prefix = ctx.rewrite.source_prefix();
    let count_at = |prefix: &[u8], revision: i64| {
        RangeRequest::prefix(prefix)
            .count_only()
            .at_revision(revision)
    };
    // A compacted checkpoint revision fails here: the error's policy is a
    // full sync (etcd-io/etcd#18089: a watch from the next revision could
    // be accepted and still miss a DELETE).
    let mut source_keys = ctx
        .source
        .range(
            "count the prefix at the checkpoint",
            count_at(source_prefix, at),
        )
        .await?
        .count;
    if ctx.meta_prefix.starts_with(source_prefix) {
        source_keys -= ctx
            .source
            .range(
                "count meta keys at the checkpoint",
                count_at(&ctx.meta_prefix, at),
            )
            .await?
            .count;
    }
    // Excluded keys are not the job's: on the source they are not copied,
    // on the destination they may be the destination's own.
    for prefix in ctx.rewrite.excluded_source_prefixes() {
        source_keys -= ctx
            .source
            .range(
                "count excluded keys at the checkpoint",
                count_at(&prefix, at),
            )
            .await?
            .count;
    }
    let dest_prefix = ctx.rewrite.dest_prefix();
    let counted = ctx
        .dest
        .range("count the mirrored prefix", count_at(dest_prefix, 0))
        .await?;
    let mut dest_keys = counted.count;
    // Destination-local writers may be busy under an excluded prefix: count
    // it at the same revision.
    let dest_revision = counted.header.revision;
    if ctx.meta_prefix.starts_with(dest_prefix) {
        dest_keys -= ctx
            .dest
            .range("count meta keys", count_at(&ctx.meta_prefix, 0))
            .await?
            .count;
    }
    for prefix in ctx.rewrite.excluded_dest_prefixes() {
        dest_keys -= ctx
            .dest
            .range("count excluded keys", count_at(&prefix, dest_revision))
            .await?
            .count;
    }
    let mut last_event_key = None;
    if let Some(key) = last_event.and_then(|e| e.key()) {
        let response = ctx
            .source
            .range(
                "read the last event's key at the checkpoint",
                RangeRequest::key(key).at_revision(at),
            )
            .await?;
        last_event_key = response
            .kvs
            .into_iter()
            .next()
            .map(|kv| (kv.mod_revision, kv.value));
    }
    // A delete leaves no key to compare: a rebuilt history with the key
    // absent at the checkpoint would pass. The key must have existed just
    // before the deleting revision.
    let mut existed_before_delete = None;
    if let Some(event) = last_event.filter(|e| e.value_hash.is_none() && e.mod_revision > 1) {
        if let Some(key) = event.key() {
            let before = ctx
                .source
                .range(
                    "read the last deleted key before its delete",
                    RangeRequest::key(key)
                        .count_only()
                        .at_revision(event.mod_revision - 1),
                )
                .await;
            existed_before_delete = match before {
                Ok(response) => Some(response.count > 0),
                Err(error) if error.kind() == FailureKind::Compacted => None,
                Err(error) => return Err(error.into()),
            };
        }
    }
    Ok(ResumeEvidence {
        source_keys,
        dest_keys,
        last_event_key,
        existed_before_delete,
    })
}

/// Whether the fast path is still safe, from the evidence; `Some(reason)`
/// sends the job down the slow path (a diff-only full sync). Key counts
/// that differ, or a last event that is not where the checkpoint says,
/// mean the source's history is not the one the destination came from (a
/// source rebuilt or restored with the same cluster id).
pub fn verify_resume(
    revision: i64,
    last_event: Option<&EventStamp>,
    evidence: &ResumeEvidence,
) -> Option<SlowPathReason> {
    if evidence.source_keys != evidence.dest_keys {
        return Some(SlowPathReason::HistoryDiffers {
            detail: format!(
                "the source prefix held {} keys at revision {revision} but the destination holds {}",
                evidence.source_keys, evidence.dest_keys
            ),
        });
    }
    let event = last_event?;
    let found = evidence
        .last_event_key
        .as_ref()
        .map(|(r, v)| (*r, v.as_slice()));
    if event.matches(found) && evidence.existed_before_delete != Some(false) {
        None
    } else {
        Some(SlowPathReason::HistoryDiffers {
            detail: format!(
                "the last event the destination applied (revision {}) is not in the source's history",
                event.mod_revision
            ),
        })
    }
}

/// Leaves a reset request under the job's meta prefix. Whichever instance
/// leads the job next consumes it in the txn that starts the full sync (a
/// leader already replicating notices it within a progress interval), so
/// the reset happens exactly once, whichever instance was given the flag.
pub async fn request_reset(
    dest: &Cluster,
    keys: &MetaKeys,
    instance: &str,
) -> Result<(), JobError> {
    let value =
        serde_json::json!({ "requested_at": now_rfc3339(), "instance": instance }).to_string();
    let txn = TxnRequest::new()
        .when(Fence::new(keys, None).compares())
        .and_then(vec![Op::put(keys.reset_request(), value)]);
    let response = dest.txn("request reset", txn).await?;
    if response.succeeded {
        Ok(())
    } else {
        Err(JobError::Promoted)
    }
}

/// Reads the markers an operator may set while the job runs.
///
/// # Cancel-Safety
/// Cancel-safe: a single read.
pub async fn check_operator_markers(ctx: &JobContext) -> Result<(), JobError> {
    let txn = TxnRequest::new().and_then(vec![
        Op::Range(RangeRequest::key(ctx.keys.promoted()).count_only()),
        Op::Range(RangeRequest::key(ctx.keys.reset_request()).count_only()),
    ]);
    let response = ctx.dest.txn("read operator markers", txn).await?;
    let present: Vec<bool> = response.ranges().map(|r| r.count > 0).collect();
    match present.as_slice() {
        [true, _] => Err(JobError::Promoted),
        [_, true] => Err(JobError::ResetRequested),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::meta::FullSyncMarker;

    fn checkpoint(rev: i64, cluster: u64) -> Checkpoint {
        Checkpoint {
            last_synced_rev: rev,
            source_cluster_id: cluster,
            updated_at: now_rfc3339(),
            instance: "i".into(),
            source_prefix: "/app/".into(),
            dest_prefix: None,
            partial_revision: None,
            write_id: 1,
            last_event: None,
            leases_mirrored: false,
        }
    }

    fn meta_with(checkpoint: Option<Checkpoint>) -> JobMeta {
        JobMeta {
            checkpoint_raw: checkpoint.as_ref().map(Checkpoint::encode),
            checkpoint,
            ..JobMeta::default()
        }
    }

    const HEAD: ClusterHead = ClusterHead {
        cluster_id: 7,
        revision: 100,
    };

    #[test]
    fn resumes_from_a_usable_checkpoint() {
        let meta = meta_with(Some(checkpoint(90, 7)));
        assert_eq!(
            decide(&meta, HEAD, None),
            Decision::Resume(meta.checkpoint.clone().unwrap())
        );
        // The source at exactly the checkpoint revision is still resumable.
        let at_head = meta_with(Some(checkpoint(100, 7)));
        assert!(matches!(decide(&at_head, HEAD, None), Decision::Resume(_)));
    }

    #[test]
    fn resume_verification() {
        use crate::model::schema::EventStamp;
        let mut checkpoint = checkpoint(90, 7);
        let verify_resume = |c: &Checkpoint, e: &ResumeEvidence| {
            super::verify_resume(c.last_synced_rev, c.last_event.as_ref(), e)
        };
        let evidence = |source_keys, dest_keys, last: Option<(i64, &[u8])>| ResumeEvidence {
            source_keys,
            dest_keys,
            last_event_key: last.map(|(r, v)| (r, v.to_vec())),
            existed_before_delete: None,
        };
        assert_eq!(verify_resume(&checkpoint, &evidence(3, 3, None)), None);
        assert!(matches!(
            verify_resume(&checkpoint, &evidence(3, 4, None)),
            Some(SlowPathReason::HistoryDiffers { .. })
        ));
        checkpoint.last_event = Some(EventStamp::put(b"/app/k", b"v", 88));
        assert_eq!(
            verify_resume(&checkpoint, &evidence(3, 3, Some((88, b"v")))),
            None
        );
        for rebuilt in [
            None,
            Some((88, b"w".as_slice())),
            Some((89, b"v".as_slice())),
        ] {
            assert!(
                matches!(
                    verify_resume(&checkpoint, &evidence(3, 3, rebuilt)),
                    Some(SlowPathReason::HistoryDiffers { .. })
                ),
                "{rebuilt:?}"
            );
        }
        checkpoint.last_event = Some(EventStamp::delete(b"/app/k", 88));
        assert_eq!(verify_resume(&checkpoint, &evidence(3, 3, None)), None);
        assert!(verify_resume(&checkpoint, &evidence(3, 3, Some((80, b"v")))).is_some());
        // A rebuilt history where the deleted key never existed.
        let never_existed = ResumeEvidence {
            existed_before_delete: Some(false),
            ..evidence(3, 3, None)
        };
        assert!(verify_resume(&checkpoint, &never_existed).is_some());
        let existed = ResumeEvidence {
            existed_before_delete: Some(true),
            ..evidence(3, 3, None)
        };
        assert_eq!(verify_resume(&checkpoint, &existed), None);
    }

    #[test]
    fn only_the_source_forces_the_full_syncs_a_resync_loop_counts() {
        let forced = [
            SlowPathReason::Compacted,
            SlowPathReason::Interrupted { pinned_rev: None },
            SlowPathReason::SourceReplaced {
                checkpoint_cluster_id: 1,
                source_cluster_id: 2,
            },
            SlowPathReason::SourceBehind {
                checkpoint_rev: 9,
                source_rev: 3,
            },
            SlowPathReason::HistoryDiffers { detail: "x".into() },
        ];
        assert!(forced.iter().all(SlowPathReason::forced_by_source));
        let chosen = [
            SlowPathReason::NoCheckpoint,
            SlowPathReason::UnreadableCheckpoint,
            SlowPathReason::Reset,
            SlowPathReason::DestLeasesExpired { leases: 1 },
            SlowPathReason::LeaseModeChanged {
                leases_mirrored: true,
            },
        ];
        assert!(!chosen.iter().any(SlowPathReason::forced_by_source));
    }

    #[test]
    fn slow_path_reasons() {
        assert_eq!(
            decide(&meta_with(None), HEAD, None),
            Decision::FullSync(SlowPathReason::NoCheckpoint)
        );
        assert!(matches!(
            decide(&meta_with(Some(checkpoint(90, 8))), HEAD, None),
            Decision::FullSync(SlowPathReason::SourceReplaced { .. })
        ));
        assert!(matches!(
            decide(&meta_with(Some(checkpoint(120, 7))), HEAD, None),
            Decision::FullSync(SlowPathReason::SourceBehind { .. })
        ));
        assert_eq!(
            decide(
                &meta_with(Some(checkpoint(90, 7))),
                HEAD,
                Some(SlowPathReason::Compacted)
            ),
            Decision::FullSync(SlowPathReason::Compacted)
        );
        let mut reset = meta_with(Some(checkpoint(90, 7)));
        reset.reset_request = Some(b"{}".to_vec());
        assert_eq!(
            decide(&reset, HEAD, None),
            Decision::FullSync(SlowPathReason::Reset)
        );
        let mut interrupted = meta_with(None);
        let marker = FullSyncMarker {
            id: 1,
            pinned_rev: 50,
            source_cluster_id: 7,
            started_at: now_rfc3339(),
            instance: "i".into(),
            reason: "test".into(),
            baseline_dest_keys: None,
            baseline_revision: None,
            prune_blocked: None,
        };
        interrupted.full_sync_raw = Some(marker.encode());
        interrupted.full_sync = Some(marker);
        assert_eq!(
            decide(&interrupted, HEAD, None),
            Decision::FullSync(SlowPathReason::Interrupted {
                pinned_rev: Some(50)
            })
        );
        let mut garbled = meta_with(None);
        garbled.checkpoint_raw = Some(b"garbage".to_vec());
        assert_eq!(
            decide(&garbled, HEAD, None),
            Decision::FullSync(SlowPathReason::UnreadableCheckpoint)
        );
    }
}
