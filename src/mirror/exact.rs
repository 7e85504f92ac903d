//! `--revision-exact`: the shell around [`crate::model::exact`].
//!
//! ```text
//!   Campaign (lease-only lock) ─▶ Resolve ─┬─ checkpoint, parity holds ─────────▶ Replay ◀──┐
//!        ▲                                 └─ none: seed check at dest revision ─▶ Replay    │
//!        │                          source compacted past the checkpoint: Catch-up ──────────┘
//!        └──── error: retry, or park (parity lost, blocked, promoted) ◀────────────┘
//! ```
//!
//! Nothing here writes a destination revision except a replay txn: the lock
//! is a lease with a fixed ID (a grant fails while another replica holds it,
//! and leases move no revision), the checkpoint travels inside each replay
//! txn, and the parity state is derived (the destination's revision against
//! the checkpoint's), never stored.
//!
//! Fencing: every replay txn compares the checkpoint's `mod_revision` with
//! the revision it continues from and the promoted marker's absence. Any
//! writer can only ever write the one next source revision, and only once;
//! after a promotion, nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::check::exact::read_store;
use crate::config::ExactGap;
use crate::etcd::api::{Compare, CompareOp, Op, RangeRequest, TxnRequest, WatchRequest};
use crate::etcd::client::{Cluster, FailureKind};
use crate::mirror::context::JobContext;
use crate::mirror::error::{Action, JobError};
use crate::mirror::watch_state::{Liveness, Tick};
use crate::model::exact::{
    catch_up, compare_states, parity, parity_at_resume, plan, record_gap, CaughtUp, ExactEvent,
    Grouper, ParityLost, PutOf, ReplayLimits, ReplayOp, Revision,
};
use crate::model::schema::Checkpoint;
use crate::telemetry::metrics::JobState;

/// A parked job (parity lost, blocked) looks again this often: an operator
/// who re-seeded the standby needs no restart.
const PARKED_POLL: Duration = Duration::from_secs(30);
/// Room for the fence compares and the checkpoint put in every txn.
const RESERVE_BYTES: usize = 4096;
/// Leases read or renewed at once.
const LEASE_CONCURRENCY: usize = 64;
/// How often the standby's compaction is brought to the primary's
/// (Kubernetes compacts every 5 minutes).
pub const COMPACTION_FOLLOW_EVERY: Duration = Duration::from_secs(20);

/// The lock's lease ID: fixed per meta prefix and job, so a grant with it
/// fails while any replica holds it. Kept in the upper half of the ID
/// space with bit 62 set, away from etcd's own IDs (member-ID bits over a
/// time-based counter), and checked against the source's leases anyway.
pub fn lock_lease_id(job_root: &str) -> i64 {
    // FNV-1a: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in job_root.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ((hash & 0x3fff_ffff_ffff_ffff) | 0x4000_0000_0000_0000) as i64
}

/// The settings only a revision-exact job reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactOptions {
    /// The lease-only lock's TTL (`--lock-ttl`).
    pub lock_ttl: Duration,
    /// What to do when the source compacted history not yet replayed.
    pub gap: ExactGap,
}

/// Runs the job until cancelled: campaign, lead, and decide what each end
/// of a leadership means.
pub async fn run(
    ctx: JobContext,
    options: ExactOptions,
    cancel: CancellationToken,
) -> Result<(), JobError> {
    let lock_ttl = options.lock_ttl;
    let mut backoff = crate::etcd::retry::Policy::JOB.backoff();
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        ctx.metrics.set_state(JobState::Standby);
        let lock = match campaign(&ctx, lock_ttl, &cancel).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(error) => {
                ctx.metrics.error(error.kind());
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(job = %ctx.job.name, %error, retry_in = ?delay, "Campaign for the revision-exact lock failed; retrying.");
                if !ctx.pause(delay, &cancel).await {
                    return Ok(());
                }
                continue;
            }
        };
        info!(job = %ctx.job.name, lock_lease = lock.id, "Leading the revision-exact replay.");
        let started = Instant::now();
        ctx.metrics.is_leader.set(1);
        let result = lead(&ctx, options.gap, &lock.held, &cancel).await;
        ctx.metrics.is_leader.set(0);
        lock.release().await;
        let Err(error) = result else {
            return Ok(());
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff = crate::etcd::retry::Policy::JOB.backoff();
        }
        let policy = error.policy();
        if policy.action == Action::Stop {
            return Ok(());
        }
        ctx.metrics.error(policy.label);
        let delay = match (&error, policy.action) {
            (JobError::ParityLost(_), _) => {
                ctx.metrics.set_state(JobState::ParityLost);
                error!(job = %ctx.job.name, %error, "Revision parity lost; writes stopped.");
                PARKED_POLL
            }
            (_, Action::Promoted) => {
                ctx.metrics.set_state(JobState::Promoted);
                info!(job = %ctx.job.name, "The standby is promoted; replay stays stopped.");
                PARKED_POLL
            }
            (_, Action::NeedsOperator | Action::Resync | Action::Exit) => {
                ctx.metrics.set_state(JobState::Error);
                error!(job = %ctx.job.name, %error, "Revision-exact replay needs an operator; the standby stays at its checkpoint.");
                PARKED_POLL
            }
            _ => {
                ctx.metrics.set_state(JobState::Error);
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(job = %ctx.job.name, %error, retry_in = ?delay, "Revision-exact replay failed; retrying.");
                delay
            }
        };
        if !ctx.pause(delay, &cancel).await {
            return Ok(());
        }
    }
}

/// The lease-only lock this replica holds, and its keeper.
struct ExactLock {
    dest: Cluster,
    id: i64,
    /// Cancelled when the lock is lost (or released).
    held: CancellationToken,
    _keeper: tokio_util::sync::DropGuard,
}

impl ExactLock {
    /// Revokes the lock's lease (it has no keys: no revision moves), so a
    /// standby replica takes over at its next try.
    async fn release(self) {
        self.held.cancel();
        if let Err(error) = self.dest.lease_revoke(self.id).await {
            debug!(%error, "Could not revoke the revision-exact lock lease; it expires on its own.");
        }
    }
}

/// Tries for the lock every quarter TTL until granted (`None` when cancelled).
async fn campaign(
    ctx: &JobContext,
    ttl: Duration,
    cancel: &CancellationToken,
) -> Result<Option<ExactLock>, JobError> {
    let id = lock_lease_id(ctx.keys.job_root());
    let ttl_seconds = ttl.as_secs().max(2) as i64;
    let mut tries = tokio::time::interval(ttl / 4);
    tries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(None),
            _ = tries.tick() => {}
        }
        ctx.heartbeat();
        match ctx.dest.lease_grant(ttl_seconds, id).await {
            Ok(_) => break,
            Err(error) if error.is_lease_exists() => continue,
            Err(error) => return Err(error.into()),
        }
    }
    let held = cancel.child_token();
    let keeper = held.clone();
    let dest = ctx.dest.clone();
    let name = ctx.job.name.clone();
    tokio::spawn(async move {
        // Renew every third of the TTL; the lock is lost when the lease is
        // gone, or when no renewal got through for most of the TTL (the
        // lease may be expiring on the server this very moment).
        let mut last_renewed = Instant::now();
        let mut rounds = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                biased;
                _ = keeper.cancelled() => return,
                _ = rounds.tick() => {}
            }
            match dest.lease_renew(id).await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    warn!(job = %name, "The revision-exact lock lease is gone; stepping down.");
                    keeper.cancel();
                    return;
                }
                Err(error) if last_renewed.elapsed() > ttl * 2 / 3 => {
                    warn!(job = %name, %error, "The revision-exact lock could not be renewed in time; stepping down.");
                    keeper.cancel();
                    return;
                }
                Err(error) => debug!(job = %name, %error, "Lock renewal failed; trying again."),
            }
        }
    });
    Ok(Some(ExactLock {
        dest: ctx.dest.clone(),
        id,
        _keeper: held.clone().drop_guard(),
        held,
    }))
}

/// Where a leadership starts replaying from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    /// The source revision the destination holds (and its own revision).
    applied: i64,
    /// The checkpoint's bytes as read (`None`: the first replay txn
    /// creates it); the first txn is chained on them.
    checkpoint: Option<Vec<u8>>,
    source_cluster_id: u64,
    /// The catch-ups the checkpoint records; every replay txn carries them
    /// on. The last one is unfinished while its end is past `applied`.
    gaps: Vec<CaughtUp>,
}

impl Resolved {
    /// A catch-up was cut short: the destination holds part of a
    /// difference, which no source revision may be replayed onto.
    fn catching_up(&self) -> bool {
        self.gaps.last().is_some_and(|gap| gap.to > self.applied)
    }
}

async fn lead(
    ctx: &JobContext,
    gap: ExactGap,
    held: &CancellationToken,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    ctx.metrics.set_state(JobState::Starting);
    let mut resolved = resolve(ctx).await?;
    let leases = ExactLeases::new(ctx.clone(), lock_lease_id(ctx.keys.job_root()));
    leases.mirror_all().await?;
    let keeper_stop = held.child_token();
    let _stop_keeper = keeper_stop.clone().drop_guard();
    let keeper = tokio::spawn(leases.clone().keep(keeper_stop.clone()));
    let applied = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(resolved.applied));
    tokio::spawn(follow_compaction(
        ctx.clone(),
        applied.clone(),
        keeper_stop.clone(),
    ));
    let replayed = loop {
        if resolved.catching_up() {
            resolved = catch_up_over(ctx, &leases, resolved, &applied, held).await?;
        }
        if let Some(last) = resolved.gaps.last() {
            // Again at every leadership: the one that caught up may have
            // died before it compacted.
            compact_at(ctx, last.to).await?;
        }
        match replay(ctx, &leases, resolved.clone(), &applied, held).await {
            Err(JobError::Compacted { compact_revision }) => {
                let at = applied.load(std::sync::atomic::Ordering::SeqCst);
                if gap == ExactGap::Stop {
                    break Err(JobError::ExactBlocked(format!(
                        "the source compacted its history to revision {compact_revision} past the standby's {at}: \
                         the revisions in between cannot be replayed; re-seed the standby from a new snapshot \
                         (or let it catch up: --exact-gap catch-up)"
                    )));
                }
                info!(job = %ctx.job.name, compact_revision, applied = at, "The source compacted history not yet replayed; catching up.");
                // Txns the replay left in flight may have applied since:
                // start from the checkpoint as it is now, and catch up
                // only if the watch still cannot start after it.
                let now = resolve(ctx).await?;
                resolved = if now.applied + 1 >= compact_revision {
                    now
                } else {
                    catch_up_over(ctx, &leases, now, &applied, held).await?
                };
            }
            other => break other,
        }
    };
    keeper_stop.cancel();
    let _ = keeper.await;
    match replayed {
        // Lost the lock (not cancelled): campaign again.
        Ok(()) if !cancel.is_cancelled() => Err(JobError::Fenced {
            reason: "the revision-exact lock was lost",
        }),
        other => other,
    }
}

/// Reads the checkpoint and proves the destination is the source's store
/// at it; without a checkpoint, proves the seed (a snapshot restore, or an
/// empty history) equal to the source at the destination's revision.
async fn resolve(ctx: &JobContext) -> Result<Resolved, JobError> {
    let read = ctx
        .dest
        .range(
            "read checkpoint",
            RangeRequest::key(ctx.keys.checkpoint().into_bytes()),
        )
        .await?;
    let promoted = ctx
        .dest
        .range(
            "read promoted marker",
            RangeRequest::key(ctx.keys.promoted().into_bytes()).count_only(),
        )
        .await?;
    if promoted.count > 0 {
        return Err(JobError::Promoted);
    }
    let source = ctx.source.head(b"").await?;
    let dest_revision = read.header.revision;
    if let Some(kv) = read.kvs.first() {
        let checkpoint: Checkpoint = serde_json::from_slice(&kv.value).map_err(|e| {
            JobError::ExactBlocked(format!(
                "the checkpoint at {} is unreadable ({e}); re-seed the standby",
                ctx.keys.checkpoint()
            ))
        })?;
        if !checkpoint.revision_exact {
            return Err(JobError::ExactBlocked(format!(
                "the destination's checkpoint at {} was written by a prefix mirror, not a revision-exact replay; \
                 seed a new standby from a snapshot (or use another --meta-prefix)",
                ctx.keys.checkpoint()
            )));
        }
        if checkpoint.source_cluster_id != source.cluster_id {
            return Err(JobError::ExactBlocked(format!(
                "the source answers as cluster {:x}, but the standby holds cluster {:x}'s history; \
                 check --src-endpoints, or re-seed from a snapshot of this source",
                source.cluster_id, checkpoint.source_cluster_id
            )));
        }
        parity_at_resume(checkpoint.last_synced_rev, kv.mod_revision, dest_revision)
            .map_err(JobError::ParityLost)?;
        if source.revision < checkpoint.last_synced_rev {
            return Err(JobError::ExactBlocked(format!(
                "the source is at revision {} but the standby at {}: the source lost history \
                 (restored from an older backup?); re-seed the standby",
                source.revision, checkpoint.last_synced_rev
            )));
        }
        return Ok(Resolved {
            applied: checkpoint.last_synced_rev,
            checkpoint: Some(kv.value.clone()),
            source_cluster_id: source.cluster_id,
            gaps: checkpoint.exact_gaps,
        });
    }
    if source.revision < dest_revision {
        return Err(JobError::ExactBlocked(format!(
            "the destination is at revision {dest_revision}, past the source's {}: it is not a copy of this source; \
             seed it from a snapshot of the source",
            source.revision
        )));
    }
    ctx.metrics.set_state(JobState::FullSync);
    info!(job = %ctx.job.name, revision = dest_revision, "No checkpoint: checking the seed against the source at the destination's revision.");
    let source_keys = read_store(&ctx.source, dest_revision, &ctx.meta_prefix)
        .await
        .map_err(|error| match error {
            e if e.kind() == FailureKind::Compacted => {
                JobError::ExactBlocked(format!(
                    "the source's history at the seed's revision {dest_revision} is compacted: \
                     replay cannot start there; take a new snapshot of the source and restore the standby from it"
                ))
            }
            other => JobError::from(other),
        })?;
    let dest_keys = read_store(&ctx.dest, dest_revision, &ctx.meta_prefix).await?;
    let report = compare_states(&source_keys, &dest_keys, &[]);
    if !report.is_equal() {
        return Err(JobError::ParityLost(ParityLost::Differs {
            revision: dest_revision,
            report,
        }));
    }
    info!(job = %ctx.job.name, revision = dest_revision, keys = source_keys.len(), "The seed equals the source; replaying from here.");
    Ok(Resolved {
        applied: dest_revision,
        checkpoint: None,
        source_cluster_id: source.cluster_id,
        gaps: Vec::new(),
    })
}

/// Revisions whose txns are sent and not yet answered, oldest first; each
/// future answers with its revision.
type InFlight<'a> = futures::stream::FuturesOrdered<
    futures::future::BoxFuture<
        'a,
        (
            Revision,
            Vec<u8>,
            Result<crate::etcd::api::TxnResponse, crate::etcd::client::ClientError>,
        ),
    >,
>;

/// Watches the whole source keyspace from the revision after `applied`
/// and replays each revision as one txn, until the lock is lost.
///
/// Txns are pipelined: up to `--max-inflight-txns` are in flight, each
/// chained on the checkpoint the txn before it writes (its exact bytes,
/// and its `mod_revision` being the revision before), so etcd applies them
/// only in order, and none after a txn that did not apply. (The revision
/// alone would not do: after a write from elsewhere a later txn's revision
/// can match a checkpoint written one revision late.) One the server
/// reordered fails its compare, as does every later one; the checkpoint is
/// then read back, and if it is what the last answered txn wrote, the
/// failed ones are sent again.
async fn replay(
    ctx: &JobContext,
    leases: &ExactLeases,
    resolved: Resolved,
    published: &std::sync::atomic::AtomicI64,
    held: &CancellationToken,
) -> Result<(), JobError> {
    let mut stream = ctx
        .source
        .watch(
            "create watch",
            WatchRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: resolved.applied + 1,
                progress_notify: true,
                fragment: true,
            },
        )
        .await?;
    ctx.metrics.set_state(JobState::Watching);
    ctx.metrics.set_progress(resolved.applied, resolved.applied);
    info!(job = %ctx.job.name, from_revision = resolved.applied + 1, "Replaying source revisions one txn each.");
    let limits = replay_limits(ctx);
    let window = ctx.tuning.max_inflight_txns.max(1);
    let mut grouper = Grouper::new(resolved.applied);
    // Answered and in parity: the destination's revision.
    let mut applied = resolved.applied;
    // What the last applied txn wrote (`None`: the first txn of a seed
    // creates the checkpoint), and what the next one sent is chained on.
    let mut committed = resolved.checkpoint.clone();
    let mut chain = committed.clone();
    let mut waiting: std::collections::VecDeque<Revision> = Default::default();
    let mut inflight: InFlight<'_> = Default::default();
    let mut head = resolved.applied;
    let mut progress_tick = tokio::time::interval(ctx.tuning.progress_interval);
    progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = Liveness::new(
        ctx.tuning.watch_idle_timeout,
        ctx.quirks.progress_may_never_come,
        Instant::now(),
    );
    // etcd-io/etcd#17507: a silent watch on such a server is probed with a
    // read (off the loop) instead of being recreated over and over.
    let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
    loop {
        // Fill the window, in revision order.
        while inflight.len() < window && !held.is_cancelled() {
            let Some(revision) = waiting.pop_front() else {
                break;
            };
            let (txn, written) = prepare(
                ctx,
                leases,
                &revision,
                chain.as_deref(),
                limits,
                (resolved.source_cluster_id, &resolved.gaps),
            )
            .await?;
            chain = Some(written.clone());
            let dest = ctx.dest.clone();
            inflight.push_back(Box::pin(async move {
                let response = dest.txn("replay a source revision", txn).await;
                (revision, written, response)
            }));
        }
        let reading = waiting.len() < window * 4;
        tokio::select! {
            biased;
            // Txns already sent may still apply: each is the one right
            // revision, compared on the one before.
            _ = held.cancelled() => return Ok(()),
            answered = inflight.next(), if !inflight.is_empty() => {
                let (revision, written, response) = answered.expect("guarded: not empty");
                let response = response?;
                if response.succeeded {
                    parity(revision.revision, response.header.revision).map_err(JobError::ParityLost)?;
                    committed = Some(written);
                    applied = revision.revision;
                    published.store(applied, std::sync::atomic::Ordering::SeqCst);
                    ctx.metrics.txns_total.inc();
                    ctx.metrics.events_applied_total.inc_by(revision.events.len() as u64);
                    ctx.metrics.set_progress(applied, head.max(applied));
                    if head <= applied {
                        ctx.metrics.lag_seconds.set(0.0);
                    }
                    continue;
                }
                // Not applied: the rest fail too. Collect them (each is
                // answered within the request timeout), then read where
                // the checkpoint is; losing the lock meanwhile ends it.
                let settle = async {
                    let mut again = vec![revision];
                    while let Some((revision, _, response)) = inflight.next().await {
                        if response.is_ok_and(|r| r.succeeded) {
                            // Only a writer that applied the one before
                            // could make it apply: re-resolve.
                            return Err(JobError::GuardMoved { what: "revision-exact checkpoint" });
                        }
                        again.push(revision);
                    }
                    resend_or_stop(ctx, committed.as_deref()).await.map(|()| again)
                };
                let again = tokio::select! {
                    biased;
                    _ = held.cancelled() => return Ok(()),
                    settled = settle => settled?,
                };
                ctx.metrics.txn_reorders_total.inc();
                debug!(job = %ctx.job.name, revisions = again.len(), from = again[0].revision, "A replay txn was applied out of order; sending again.");
                for revision in again.into_iter().rev() {
                    waiting.push_front(revision);
                }
                chain = committed.clone();
            }
            probed = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                probe = None;
                liveness.on_probe(matches!(probed, Ok(true)), Instant::now())?;
            }
            _ = progress_tick.tick() => {
                ctx.heartbeat();
                match liveness.on_tick(Instant::now()) {
                    Tick::Alive => {}
                    Tick::Stalled { idle } => return Err(JobError::WatchStalled { idle }),
                    Tick::Probe => {
                        let source = ctx.source.clone();
                        probe = Some(tokio::spawn(async move { source.head(b"").await.is_ok() }));
                    }
                }
                // Only queues a request on the open stream.
                stream.request_progress().await.map_err(|source| JobError::Watch { source })?;
            }
            message = stream.message(), if reading => {
                let Some(response) = message.map_err(|source| JobError::Watch { source })? else {
                    return Err(JobError::WatchClosed);
                };
                liveness.answered(Instant::now());
                ctx.heartbeat();
                if response.canceled {
                    if response.compact_revision > 0 {
                        // Txns in flight may still apply; `lead` re-reads
                        // the checkpoint before it catches up.
                        return Err(JobError::Compacted {
                            compact_revision: response.compact_revision,
                        });
                    }
                    return Err(JobError::WatchCanceled {
                        reason: response.cancel_reason,
                    });
                }
                let cluster_id = response.header.cluster_id;
                if cluster_id != 0 && cluster_id != resolved.source_cluster_id {
                    return Err(JobError::ExactBlocked(format!(
                        "the source watch answers as cluster {cluster_id:x}, not {:x}; check --src-endpoints",
                        resolved.source_cluster_id
                    )));
                }
                head = head.max(response.header.revision);
                let events = response.events.into_iter().map(|event| ExactEvent {
                    revision: event.kv.mod_revision,
                    put: (event.kind == crate::etcd::api::EventType::Put).then(|| PutOf {
                        value: event.kv.value.clone(),
                        lease: event.kv.lease,
                    }),
                    key: event.kv.key,
                });
                let revisions = grouper
                    .push(events, response.fragment)
                    .map_err(|gap| JobError::ExactBlocked(gap.to_string()))?;
                waiting.extend(revisions);
                ctx.metrics.set_progress(applied, head.max(applied));
                if head <= applied {
                    ctx.metrics.lag_seconds.set(0.0);
                }
            }
        }
    }
}

/// What one replay txn may carry besides its fence compares and checkpoint.
fn replay_limits(ctx: &JobContext) -> ReplayLimits {
    ReplayLimits {
        max_ops: ctx.limits.max_ops.saturating_sub(1).max(1),
        max_bytes: ctx.limits.max_bytes.saturating_sub(RESERVE_BYTES).max(1024),
    }
}

/// Brings the standby over history the source compacted before it was
/// replayed (`--exact-gap catch-up`): reads the source's store at its head
/// `S` and the standby's at its checkpoint `C`, and writes the difference
/// as exactly `S - C` revisions (checkpoint-only ones fill the rest), each
/// chained on the one before like a replay txn, so the standby's revision
/// is the source's again at `S` and replay goes on from there. The
/// checkpoint records the stretch ([`CaughtUp`]); `lead` then compacts the
/// standby at `S`, so nobody reads the revisions in between: they are not
/// the source's. A catch-up cut short is finished the same way, from
/// wherever it got to, before any source revision is replayed.
async fn catch_up_over(
    ctx: &JobContext,
    leases: &ExactLeases,
    resolved: Resolved,
    published: &std::sync::atomic::AtomicI64,
    held: &CancellationToken,
) -> Result<Resolved, JobError> {
    ctx.metrics.set_state(JobState::FullSync);
    let from = resolved.applied;
    let head = ctx.source.head(b"").await?.revision;
    if head == from && !resolved.catching_up() {
        return Ok(resolved);
    }
    let (to, source_keys) = source_at_head(ctx, head).await?;
    let mut gaps = resolved.gaps.clone();
    match gaps.last_mut() {
        // Cut short: the same stretch, to the source's revision now.
        Some(last) if last.to > from => {
            if to < last.to {
                return Err(JobError::ExactBlocked(format!(
                    "the source is at revision {to}, before the {} an earlier catch-up reached: \
                     the source lost history (restored from an older backup?); re-seed the standby",
                    last.to
                )));
            }
            last.to = to;
        }
        _ => record_gap(&mut gaps, CaughtUp { from, to }),
    }
    let dest_keys = read_store(&ctx.dest, from, &ctx.meta_prefix).await?;
    let limits = replay_limits(ctx);
    let revisions = catch_up(from, to, &source_keys, &dest_keys, limits)
        .map_err(|error| JobError::ExactBlocked(error.to_string()))?;
    let written: usize = revisions.iter().map(|r| r.events.len()).sum();
    info!(job = %ctx.job.name, from, to, keys = written, "Catching up over compacted source history: the difference as exactly the missing revisions.");
    ctx.metrics.exact_catch_ups_total.inc();
    let mut chain = resolved.checkpoint.clone();
    for revision in revisions {
        if held.is_cancelled() {
            return Err(JobError::Fenced {
                reason: "the revision-exact lock was lost",
            });
        }
        let puts = revision.events.iter().filter(|e| e.put.is_some()).count() as u64;
        let deletes = revision.events.len() as u64 - puts;
        let (txn, written) = prepare(
            ctx,
            leases,
            &revision,
            chain.as_deref(),
            limits,
            (resolved.source_cluster_id, &gaps),
        )
        .await?;
        let response = ctx.dest.txn("catch up over compacted history", txn).await?;
        if !response.succeeded {
            // Promoted, or written by another writer (or a retry of this
            // very txn): re-resolve.
            resend_or_stop(ctx, chain.as_deref()).await?;
            return Err(JobError::GuardMoved {
                what: "revision-exact checkpoint",
            });
        }
        parity(revision.revision, response.header.revision).map_err(JobError::ParityLost)?;
        chain = Some(written);
        published.store(revision.revision, std::sync::atomic::Ordering::SeqCst);
        ctx.metrics.txns_total.inc();
        ctx.metrics.full_sync_put.inc_by(puts);
        ctx.metrics.full_sync_delete.inc_by(deletes);
        ctx.metrics.set_progress(revision.revision, to);
        ctx.heartbeat();
    }
    info!(job = %ctx.job.name, from, to, "Caught up; keys changed in between keep their values and leases, not their revisions and versions.");
    Ok(Resolved {
        applied: to,
        checkpoint: chain,
        source_cluster_id: resolved.source_cluster_id,
        gaps,
    })
}

/// The source's store at `head`; if a compaction overtakes the read (a
/// Kubernetes source compacts close to its head), at its head again, a
/// few times before giving up to the job's retry.
async fn source_at_head(
    ctx: &JobContext,
    head: i64,
) -> Result<(i64, Vec<crate::model::kv::KeyValue>), JobError> {
    let mut head = head;
    for _ in 0..3 {
        match read_store(&ctx.source, head, &ctx.meta_prefix).await {
            Ok(keys) => return Ok((head, keys)),
            Err(error) if error.kind() == FailureKind::Compacted => {
                head = ctx.source.head(b"").await?.revision;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok((head, read_store(&ctx.source, head, &ctx.meta_prefix).await?))
}

/// Compacts the standby at `revision` (already compacted there or past it
/// is as good).
async fn compact_at(ctx: &JobContext, revision: i64) -> Result<(), JobError> {
    match ctx.dest.compact(revision).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == FailureKind::Compacted => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// After a replay txn failed its compare: `Ok` when the checkpoint is what
/// the last applied txn wrote (`committed`; `None` when none was yet) (the
/// server reordered the pipeline: send again), else promoted, or moved by
/// another writer.
async fn resend_or_stop(ctx: &JobContext, committed: Option<&[u8]>) -> Result<(), JobError> {
    let read = ctx
        .dest
        .txn(
            "read checkpoint and promoted marker",
            TxnRequest::new().and_then(vec![
                Op::get(ctx.keys.checkpoint().into_bytes()),
                Op::Range(RangeRequest::key(ctx.keys.promoted().into_bytes()).count_only()),
            ]),
        )
        .await?;
    let mut ranges = read.ranges();
    let checkpoint = ranges.next().and_then(|r| r.kvs.first().cloned());
    if ranges.next().is_some_and(|r| r.count > 0) {
        return Err(JobError::Promoted);
    }
    if checkpoint.as_ref().map(|kv| kv.value.as_slice()) == committed {
        Ok(())
    } else {
        Err(JobError::GuardMoved {
            what: "revision-exact checkpoint",
        })
    }
}

/// The one destination txn that replays `revision`, and the checkpoint it
/// writes: its ops (deletes folded into range deletes when it is bigger
/// than one txn), the checkpoint put, and the compares that let it apply
/// only right after the txn that wrote `previous` (`None`: no checkpoint
/// yet), and never after a promotion. Leases its keys go on are granted
/// first.
async fn prepare(
    ctx: &JobContext,
    leases: &ExactLeases,
    revision: &Revision,
    previous: Option<&[u8]>,
    limits: ReplayLimits,
    (source_cluster_id, gaps): (u64, &[CaughtUp]),
) -> Result<(TxnRequest, Vec<u8>), JobError> {
    leases.ensure(&revision.leases()).await?;
    // Only a revision over the op limit needs the keys between its deleted
    // keys, read from the source at the revision before (the destination
    // holds the same there, and may not have reached it yet).
    let deleted: BTreeSet<&[u8]> = revision
        .events
        .iter()
        .filter(|e| e.put.is_none())
        .map(|e| e.key.as_slice())
        .collect();
    let span = match (
        revision.events.len() > limits.max_ops,
        deleted.first(),
        deleted.last(),
    ) {
        (true, Some(first), Some(last)) => {
            let held = ctx
                .source
                .range(
                    "read keys to fold a large delete",
                    RangeRequest {
                        key: first.to_vec(),
                        range_end: crate::model::keys::key_successor(last),
                        revision: revision.revision - 1,
                        keys_only: true,
                        ..RangeRequest::default()
                    },
                )
                .await
                .map_err(|error| match error.kind() {
                    // Compacted since the watch delivered it: the revision
                    // can no longer be replayed as one txn, so it is caught
                    // up over (`lead` does when history up to and including
                    // it is behind the checkpoint).
                    FailureKind::Compacted => JobError::Compacted {
                        compact_revision: revision.revision + 1,
                    },
                    _ => error.into(),
                })?;
            held.kvs.into_iter().map(|kv| kv.key).collect()
        }
        _ => Vec::new(),
    };
    let ops = plan(revision, &ctx.meta_prefix, limits, |_, _| span)
        .map_err(|too_big| JobError::ExactBlocked(too_big.to_string()))?;
    let mut checkpoint = ctx.checkpoint_of().at(
        (revision.revision, source_cluster_id),
        ctx.ids.next(),
        None,
        None,
    );
    checkpoint.revision_exact = true;
    checkpoint.exact_gaps = gaps.to_vec();
    let checkpoint_key = ctx.keys.checkpoint();
    let mut compares = vec![Compare::version(
        ctx.keys.promoted().into_bytes(),
        CompareOp::Equal,
        0,
    )];
    match previous {
        None => compares.push(Compare::version(
            checkpoint_key.as_bytes(),
            CompareOp::Equal,
            0,
        )),
        Some(previous) => {
            compares.push(Compare::value(
                checkpoint_key.as_bytes(),
                CompareOp::Equal,
                previous,
            ));
            compares.push(Compare::mod_revision(
                checkpoint_key.as_bytes(),
                CompareOp::Equal,
                revision.revision - 1,
            ));
        }
    }
    let written = checkpoint.encode();
    let mut success: Vec<Op> = ops.into_iter().map(to_op).collect();
    success.push(Op::put(checkpoint_key.as_bytes(), written.clone()));
    Ok((TxnRequest::new().when(compares).and_then(success), written))
}

/// Brings the standby's compaction to the primary's, so both keep the same
/// history window: each round finds the source's compaction revision
/// between the last one applied and the replayed checkpoint (a binary
/// search of one-key reads) and compacts the standby there. Compaction
/// moves no revision.
async fn follow_compaction(
    ctx: JobContext,
    applied: std::sync::Arc<std::sync::atomic::AtomicI64>,
    stop: CancellationToken,
) {
    use crate::etcd::periodic::{First, Rounds};
    let mut known = 1;
    let mut rounds = Rounds::new(COMPACTION_FOLLOW_EVERY, First::Now, &stop);
    while rounds.next().await {
        let upper = applied.load(std::sync::atomic::Ordering::SeqCst);
        let found = match rounds.run(ctx.source.compaction_in(known, upper)).await {
            None => return,
            Some(Ok(found)) => found,
            Some(Err(error)) => {
                debug!(job = %ctx.job.name, %error, "Could not read the source's compaction; trying next round.");
                continue;
            }
        };
        let Some(revision) = found else {
            continue;
        };
        match rounds.run(ctx.dest.compact(revision)).await {
            None => return,
            Some(Ok(())) => {
                info!(job = %ctx.job.name, revision, "Compacted the standby where the primary is compacted.");
                known = revision;
            }
            // Already compacted there (by an earlier leader).
            Some(Err(error)) if error.kind() == FailureKind::Compacted => known = revision,
            Some(Err(error)) => {
                warn!(job = %ctx.job.name, %error, revision, "Could not compact the standby; trying next round.")
            }
        }
    }
}

fn to_op(op: ReplayOp) -> Op {
    match op {
        ReplayOp::Put { key, value, lease } => Op::put_with_lease(key, value, lease),
        ReplayOp::Delete { key } => Op::delete(key),
        ReplayOp::DeleteRange { from, to } => Op::Delete {
            key: from,
            range_end: to,
        },
    }
}

/// The source's leases, granted on the destination under the same IDs and
/// kept alive while the source's live.
#[derive(Clone)]
struct ExactLeases {
    ctx: JobContext,
    lock_id: i64,
    /// Granted (or found) on the destination: ID to the TTL it was given.
    granted: std::sync::Arc<tokio::sync::Mutex<BTreeMap<i64, i64>>>,
}

impl ExactLeases {
    fn new(ctx: JobContext, lock_id: i64) -> Self {
        Self {
            ctx,
            lock_id,
            granted: Default::default(),
        }
    }

    fn grace(&self) -> i64 {
        self.ctx.lease_settings.grace.as_secs() as i64
    }

    /// Grants every live source lease missing on the destination.
    async fn mirror_all(&self) -> Result<(), JobError> {
        let (_, source) = self.ctx.source.lease_list().await?;
        let source: BTreeSet<i64> = source.into_iter().collect();
        self.ensure(&source).await?;
        Ok(())
    }

    /// Makes sure each lease exists on the destination before a txn puts
    /// a key on it: granted with the source's ID and TTL plus the grace
    /// (a lease the source already revoked gets the grace alone: the
    /// source's deletes of its keys follow in later revisions).
    async fn ensure(&self, leases: &BTreeSet<i64>) -> Result<(), JobError> {
        let missing: Vec<i64> = {
            let granted = self.granted.lock().await;
            leases
                .iter()
                .copied()
                .filter(|id| !granted.contains_key(id))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        if missing.contains(&self.lock_id) {
            return Err(JobError::ExactBlocked(format!(
                "the source has a lease with the ID of the syncer's lock ({:x}); use another --meta-prefix or --job-name",
                self.lock_id
            )));
        }
        let results: Vec<Result<(i64, i64), JobError>> = futures::stream::iter(missing)
            .map(|id| async move {
                let ttl = match self.ctx.source.lease_time_to_live(id).await? {
                    Some(ttl) => ttl.granted + self.grace(),
                    None => self.grace(),
                };
                match self.ctx.dest.lease_grant(ttl, id).await {
                    Ok(_) => Ok((id, ttl)),
                    // Restored with the snapshot (with the source's TTL, no
                    // grace), or granted by a replica before: renewed at a
                    // third of the TTL it really has.
                    Err(error) if error.is_lease_exists() => {
                        let held = self.ctx.dest.lease_time_to_live(id).await?;
                        Ok((id, held.map_or(ttl, |held| held.granted)))
                    }
                    Err(error) => Err(error.into()),
                }
            })
            .buffer_unordered(LEASE_CONCURRENCY)
            .collect()
            .await;
        let mut granted = self.granted.lock().await;
        for result in results {
            let (id, ttl) = result?;
            granted.insert(id, ttl);
        }
        Ok(())
    }

    /// Renews, every third of the shortest TTL (at most every 10 s), each
    /// destination lease whose source lease lives; grants the source's new
    /// ones. A lease the source no longer has is left to expire: its keys'
    /// deletes arrive as source revisions first, and a lease without keys
    /// expires without moving the destination's revision.
    async fn keep(self, stop: CancellationToken) {
        // The first round at once: leases restored with a snapshot may be
        // a third of their TTL from expiring already.
        let mut every = Duration::ZERO;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let round = Instant::now();
            let live = match self.ctx.source.lease_list().await {
                Ok((_, live)) => live.into_iter().collect::<BTreeSet<i64>>(),
                Err(error) => {
                    warn!(job = %self.ctx.job.name, %error, "Could not list the source's leases; renewing the destination's as they are.");
                    self.granted.lock().await.keys().copied().collect()
                }
            };
            if let Err(error) = self.ensure(&live).await {
                warn!(job = %self.ctx.job.name, %error, "Could not grant a source lease on the destination; trying again.");
            }
            let dest = &self.ctx.dest;
            let renewals: Vec<(i64, bool)> = futures::stream::iter(live)
                .map(|id| async move {
                    let renewed = dest.lease_renew(id).await.unwrap_or(true);
                    (id, renewed)
                })
                .buffer_unordered(LEASE_CONCURRENCY)
                .collect()
                .await;
            let gone: Vec<i64> = renewals
                .iter()
                .filter(|(_, renewed)| !renewed)
                .map(|(id, _)| *id)
                .collect();
            if !gone.is_empty() {
                warn!(job = %self.ctx.job.name, leases = gone.len(), "Destination leases expired while their source leases live; if they had keys, parity is lost (the next replay txn will tell).");
                let mut granted = self.granted.lock().await;
                for id in gone {
                    granted.remove(&id);
                }
            }
            // A third of the shortest TTL between the starts of two rounds
            // (the shortest etcd grants is about 2 s).
            let shortest = self
                .granted
                .lock()
                .await
                .values()
                .copied()
                .min()
                .unwrap_or(30);
            let period = Duration::from_millis((shortest * 1000 / 3).clamp(500, 10_000) as u64);
            every = period.saturating_sub(round.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_lease_id_is_stable_positive_and_per_job() {
        let a = lock_lease_id("/meta/jobs/exact");
        assert_eq!(a, lock_lease_id("/meta/jobs/exact"));
        assert!(a > 0);
        assert_ne!(a, lock_lease_id("/other/jobs/exact"));
        // Pinned: replicas of different builds must campaign for one lease.
        assert_eq!(
            lock_lease_id("/-etcd-syncer-meta-/root/"),
            8_389_795_588_916_225_769
        );
    }
}
