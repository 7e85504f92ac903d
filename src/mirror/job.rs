//! One job's loop (one prefix): resolve the path, run it, decide what an
//! error means, and go round again.
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
//! Every txn that moves the checkpoint carries the data it completes, so
//! whatever point this loop is interrupted at, the next Resolve finds the
//! destination equal to the source at the checkpoint revision (a full sync
//! removes the checkpoint first, and writes it back only when it is true).

use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::etcd::client::ClusterHead;
use crate::mirror::context::JobContext;
use crate::mirror::error::{Action, JobError, SlowPathReason};
use crate::mirror::meta::{read_job_meta, Checkpoint, JobMeta, KeyGuard};
use crate::mirror::{full_sync, incremental};
use crate::model::keys::{prefixes_overlap, KeyRewrite};
use crate::telemetry::metrics::JobState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Watch from the checkpoint; copy nothing.
    Resume(Checkpoint),
    FullSync(SlowPathReason),
}

/// Chooses the fast or the slow path from what the destination and source say.
pub fn decide(
    meta: &JobMeta,
    source: ClusterHead,
    rewrite: &KeyRewrite,
    forced: Option<SlowPathReason>,
) -> Decision {
    // Before anything the last attempt asked for: whatever that was, the
    // destination holds another prefix's copy.
    if let Some(reason) = meta
        .checkpoint
        .as_ref()
        .and_then(|c| prefix_changed(c, rewrite))
    {
        return Decision::FullSync(reason);
    }
    // Or a full sync for other prefixes was interrupted (its checkpoint
    // already dropped): the destination holds part of that copy.
    if let Some(change) = meta
        .full_sync
        .as_ref()
        .map(|m| m.prefix_change(rewrite.source_prefix(), rewrite.dest_prefix()))
        .filter(|change| !change.is_none())
    {
        return Decision::FullSync(SlowPathReason::PrefixChanged {
            source: change.source,
            dest: change.dest,
        });
    }
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

/// The checkpoint was written for other prefixes than the job's, or left
/// out a prefix the job copies now.
pub fn prefix_changed(checkpoint: &Checkpoint, rewrite: &KeyRewrite) -> Option<SlowPathReason> {
    let change = checkpoint.prefix_change(rewrite.source_prefix(), rewrite.dest_prefix());
    if !change.is_none() {
        return Some(SlowPathReason::PrefixChanged {
            source: change.source,
            dest: change.dest,
        });
    }
    let removed = checkpoint.excludes_removed(&rewrite.excluded_source_strings());
    (!removed.is_empty()).then_some(SlowPathReason::ExcludeRemoved { prefixes: removed })
}

/// A checkpoint written under the other `--leases` mode: the destination's
/// keys sit on leases they should not (or not on those they should), which
/// only a full sync's diff can put right.
pub fn lease_mode_changed(meta: &JobMeta, leases_mirrored: bool) -> Option<SlowPathReason> {
    let checkpoint = meta.checkpoint.as_ref()?;
    (checkpoint.leases_mirrored != leases_mirrored)
        .then_some(SlowPathReason::LeaseModeChanged { leases_mirrored })
}

fn job_backoff() -> impl Iterator<Item = Duration> {
    crate::etcd::retry::Policy::JOB.backoff()
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

/// How the last attempt ended, as the job loop sees it.
#[derive(Debug)]
pub enum AttemptEnd<'a> {
    /// The lease book found mirrored leases lost on the destination while
    /// it ran (whatever the attempt itself returned).
    LeasesLost {
        leases: usize,
    },
    /// It returned: cancelled, or the job is over.
    Done,
    Failed(&'a JobError),
}

/// What the loop does after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go round again (after the effects, pauses included).
    Again,
    /// Return `Ok(())`.
    Stop,
    /// Return the attempt's error (step down, or exit).
    Fail,
}

/// How long a pause is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// The next delay of the job's capped, jittered backoff.
    Backoff,
    Fixed(Duration),
}

/// What the shell logs (with the attempt's error and the pause it takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    ResyncsKeepFailing,
    ResetWhileReplicating,
    Compacted,
    Promoted,
    NeedsOperator,
    Retrying,
}

/// One thing the shell does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start the backoff again from its minimum.
    ResetBackoff,
    CountError(&'static str),
    SetState(JobState),
    /// Promoted: nothing renews the job's leases any more (mirrored keys
    /// expire after TTL + grace, as they would have on the primary).
    ReleaseLeases,
    Log(Note),
    /// Sleep (ending the job if cancelled meanwhile), logging `note` with
    /// the delay first.
    Pause {
        delay: Delay,
        note: Option<Note>,
    },
}

/// The job loop's state between attempts: what the next attempt must do,
/// how many full syncs in a row were forced, whether the promotion was
/// already reported. [`JobLoop::step`] decides; [`run_job`] performs.
#[derive(Debug, Default)]
pub struct JobLoop {
    /// The slow path the next attempt must take.
    pub forced: Option<SlowPathReason>,
    consecutive_resyncs: u32,
    promoted_logged: bool,
}

impl JobLoop {
    /// The attempt ended as `end` after running for `ran_for`.
    pub fn step(&mut self, end: AttemptEnd<'_>, ran_for: Duration) -> (Next, Vec<Effect>) {
        let mut effects = Vec::new();
        let error = match end {
            AttemptEnd::LeasesLost { leases } => {
                effects.push(Effect::CountError("dest_lease_expired"));
                self.forced = Some(SlowPathReason::DestLeasesExpired { leases });
                self.resync_backoff(&mut effects, None);
                return (Next::Again, effects);
            }
            AttemptEnd::Done => return (Next::Stop, effects),
            AttemptEnd::Failed(error) => error,
        };
        let policy = error.policy();
        // An attempt that ran this long made progress.
        if ran_for >= BACKOFF_RESET_AFTER {
            effects.push(Effect::ResetBackoff);
            self.consecutive_resyncs = 0;
        }
        match policy.action {
            Action::Stop => return (Next::Stop, effects),
            Action::StepDown | Action::Exit => {
                effects.push(Effect::CountError(policy.label));
                effects.push(Effect::SetState(JobState::Error));
                return (Next::Fail, effects);
            }
            Action::Resync => {
                self.resync_backoff(&mut effects, Some(Note::ResyncsKeepFailing));
                if let JobError::ResetRequested = error {
                    effects.push(Effect::Log(Note::ResetWhileReplicating));
                } else {
                    effects.push(Effect::CountError(policy.label));
                    self.forced = Some(match error {
                        JobError::HistoryDiffers(reason) => reason.clone(),
                        JobError::DestLeaseLost { leases } => {
                            SlowPathReason::DestLeasesExpired { leases: *leases }
                        }
                        _ => {
                            effects.push(Effect::Log(Note::Compacted));
                            SlowPathReason::Compacted
                        }
                    });
                }
            }
            Action::Promoted => {
                effects.push(Effect::CountError(policy.label));
                effects.push(Effect::SetState(JobState::Promoted));
                effects.push(Effect::ReleaseLeases);
                if !self.promoted_logged {
                    effects.push(Effect::Log(Note::Promoted));
                    self.promoted_logged = true;
                }
                effects.push(Effect::Pause {
                    delay: Delay::Fixed(PROMOTED_POLL),
                    note: None,
                });
            }
            Action::Retry | Action::NeedsOperator => {
                effects.push(Effect::CountError(policy.label));
                self.promoted_logged = false;
                let (state, delay) = if matches!(error, JobError::PruneGuard { .. }) {
                    (JobState::PruneGuard, Delay::Fixed(PRUNE_GUARD_POLL))
                } else if error.is_dest_out_of_space() {
                    // Nothing will apply until an operator compacts,
                    // defragments and disarms the alarm: park, and look
                    // again now and then.
                    (JobState::NoSpace, Delay::Fixed(NO_SPACE_POLL))
                } else {
                    (JobState::Error, Delay::Backoff)
                };
                effects.push(Effect::SetState(state));
                let note = if policy.level == tracing::Level::ERROR {
                    Note::NeedsOperator
                } else {
                    Note::Retrying
                };
                effects.push(Effect::Pause {
                    delay,
                    note: Some(note),
                });
            }
        }
        (Next::Again, effects)
    }

    /// A full sync that keeps failing the same way right away must not
    /// spin: from the third in a row, back off.
    fn resync_backoff(&mut self, effects: &mut Vec<Effect>, note: Option<Note>) {
        self.consecutive_resyncs += 1;
        if self.consecutive_resyncs > 2 {
            effects.push(Effect::Pause {
                delay: Delay::Backoff,
                note,
            });
        }
    }
}

/// Runs one job until cancelled, retrying every transient fault with capped,
/// jittered backoff and resuming from the checkpoint each time: the shell
/// of [`JobLoop`], which runs attempts and performs the effects.
///
/// # Cancel-Safety
/// Returns promptly once `cancel` fires; an in-flight txn either commits with
/// its checkpoint or not at all.
pub async fn run_job(ctx: JobContext, cancel: CancellationToken) -> Result<(), JobError> {
    // Whatever this leadership starts (the lease keepalives) ends with it.
    let leadership = cancel.child_token();
    let _end_leadership = leadership.clone().drop_guard();
    let mut state = JobLoop::default();
    let mut backoff = job_backoff();
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
        let once = run_once(&ctx, state.forced.take(), &attempt, &leadership);
        let result = watch_stability(&ctx, once, &cancel, &mut resync_loop).await;
        let lost = ctx
            .leases()
            .filter(|_| !cancel.is_cancelled())
            .map_or(0, |book| book.take_lost().len());
        let end = match &result {
            _ if lost > 0 => AttemptEnd::LeasesLost { leases: lost },
            Ok(()) => AttemptEnd::Done,
            Err(error) => {
                ctx.heartbeat();
                AttemptEnd::Failed(error)
            }
        };
        let (next, effects) = state.step(end, attempt_started.elapsed());
        let error = result.as_ref().err();
        for effect in effects {
            match effect {
                Effect::ResetBackoff => backoff = job_backoff(),
                Effect::CountError(label) => ctx.metrics.error(label),
                Effect::SetState(job_state) => ctx.metrics.set_state(job_state),
                Effect::ReleaseLeases => {
                    if let Some(book) = ctx.leases() {
                        book.stop_keeper();
                        book.clear();
                    }
                }
                Effect::Log(note) => log_note(&ctx, note, error, None),
                Effect::Pause { delay, note } => {
                    let delay = match delay {
                        Delay::Backoff => backoff.next().unwrap_or(Duration::from_secs(30)),
                        Delay::Fixed(delay) => delay,
                    };
                    if let Some(note) = note {
                        log_note(&ctx, note, error, Some(delay));
                    }
                    if !ctx.pause(delay, &cancel).await {
                        return Ok(());
                    }
                }
            }
        }
        match (next, result) {
            (Next::Again, _) => {}
            (Next::Stop, _) | (Next::Fail, Ok(())) => return Ok(()),
            (Next::Fail, Err(error)) => return Err(error),
        }
    }
}

fn log_note(ctx: &JobContext, note: Note, error: Option<&JobError>, retry_in: Option<Duration>) {
    let job = &ctx.job.name;
    let error = error.map(tracing::field::display);
    // Only the notes of a pause are logged with one.
    let retry_in = retry_in.unwrap_or_default();
    match note {
        Note::ResyncsKeepFailing => {
            warn!(%job, error, retry_in = ?retry_in, "Full syncs keep being interrupted; backing off.")
        }
        Note::ResetWhileReplicating => {
            info!(%job, "Reset requested while replicating; taking the slow path.")
        }
        Note::Compacted => {
            info!(%job, error, "Source history is compacted past the checkpoint; starting a full sync.")
        }
        Note::Promoted => {
            warn!(%job, "Job is promoted; replication is stopped until the marker is removed with `promote --undo`.")
        }
        Note::NeedsOperator => {
            error!(%job, error, retry_in = ?retry_in, "Replication failed; operator action needed.")
        }
        Note::Retrying => {
            warn!(%job, error, retry_in = ?retry_in, "Replication interrupted; retrying from the checkpoint.")
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
        book.ensure_keeper(leadership);
    }
    // The source cluster the destination's state belongs to: the
    // checkpoint's, or an interrupted full sync's. Endpoint groups are
    // matched against it while the preferred group has not answered (down
    // at start): learnt before the source is read.
    let known_source = meta
        .checkpoint
        .as_ref()
        .map(|c| c.source_cluster_id)
        .or(meta.full_sync.as_ref().map(|m| m.source_cluster_id))
        .filter(|id| *id != 0);
    if let Some(cluster_id) = known_source {
        ctx.source.learn_cluster_id(cluster_id);
    }
    // A reload may not move the destination to another cluster.
    ctx.dest.learn_cluster_id(meta.dest_cluster_id);
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
    let decision = decide(&meta, head, &ctx.rewrite, forced);
    if let Some(known) = known_source {
        // Another cluster behind a fallback group is a misconfiguration,
        // not a replaced source: copying it would overwrite the standby. A
        // replaced source is followed only through the preferred group.
        if ctx.source.on_fallback() && head.cluster_id != 0 && head.cluster_id != known {
            return Err(JobError::FallbackIsAnotherCluster {
                endpoints: ctx.source.endpoints(),
                answered: head.cluster_id,
                checkpoint_cluster_id: known,
            });
        }
    }
    let (guard, revision, last_event, cluster_id, start) = match decision {
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
                incremental::Start::Resume,
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
                // on an old checkpoint's word, and none takes keys.
                book.full_sync_started(head.cluster_id);
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
                incremental::Start::AfterFullSync,
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
    incremental::run(ctx, guard, revision, last_event, cluster_id, start, cancel).await?;
    Ok(())
}

#[cfg(test)]
mod loop_tests {
    //! The job loop's transitions, without I/O or timers.
    use super::*;

    const QUICK: Duration = Duration::from_secs(1);

    fn pauses(effects: &[Effect]) -> Vec<Delay> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Pause { delay, .. } => Some(*delay),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn full_syncs_that_keep_failing_back_off_from_the_third_until_one_makes_progress() {
        let mut state = JobLoop::default();
        let compacted = JobError::Compacted {
            compact_revision: 9,
        };
        for round in 1..=4 {
            let (next, effects) = state.step(AttemptEnd::Failed(&compacted), QUICK);
            assert_eq!(next, Next::Again);
            assert_eq!(state.forced.take(), Some(SlowPathReason::Compacted));
            let expected = if round > 2 {
                vec![Delay::Backoff]
            } else {
                vec![]
            };
            assert_eq!(pauses(&effects), expected, "round {round}");
            assert!(effects.contains(&Effect::CountError("compacted")));
        }
        // Lost leases count as a forced full sync in the same row.
        let (_, effects) = state.step(AttemptEnd::LeasesLost { leases: 2 }, QUICK);
        assert_eq!(pauses(&effects), vec![Delay::Backoff]);
        assert_eq!(
            state.forced.take(),
            Some(SlowPathReason::DestLeasesExpired { leases: 2 })
        );
        // An attempt that ran a minute made progress: the row starts again.
        let (_, effects) = state.step(AttemptEnd::Failed(&compacted), BACKOFF_RESET_AFTER);
        assert_eq!(effects.first(), Some(&Effect::ResetBackoff));
        assert!(pauses(&effects).is_empty());
    }

    #[test]
    fn a_resync_forces_the_slow_path_it_names() {
        let mut state = JobLoop::default();
        let reason = SlowPathReason::SourceReplaced {
            checkpoint_cluster_id: 1,
            source_cluster_id: 2,
        };
        state.step(
            AttemptEnd::Failed(&JobError::HistoryDiffers(reason.clone())),
            QUICK,
        );
        assert_eq!(state.forced.take(), Some(reason));
        state.step(
            AttemptEnd::Failed(&JobError::DestLeaseLost { leases: 3 }),
            QUICK,
        );
        assert_eq!(
            state.forced.take(),
            Some(SlowPathReason::DestLeasesExpired { leases: 3 })
        );
        // A reset request is read from the destination by the next attempt.
        let mut state = JobLoop::default();
        let (next, effects) = state.step(AttemptEnd::Failed(&JobError::ResetRequested), QUICK);
        assert_eq!(next, Next::Again);
        assert_eq!(state.forced, None);
        assert_eq!(effects, vec![Effect::Log(Note::ResetWhileReplicating)]);
    }

    #[test]
    fn a_promoted_job_releases_its_leases_polls_and_says_so_once() {
        let mut state = JobLoop::default();
        let poll = Effect::Pause {
            delay: Delay::Fixed(PROMOTED_POLL),
            note: None,
        };
        let (next, first) = state.step(AttemptEnd::Failed(&JobError::Promoted), QUICK);
        assert_eq!(next, Next::Again);
        assert_eq!(
            first,
            vec![
                Effect::CountError("promoted"),
                Effect::SetState(JobState::Promoted),
                Effect::ReleaseLeases,
                Effect::Log(Note::Promoted),
                poll.clone(),
            ]
        );
        let (_, again) = state.step(AttemptEnd::Failed(&JobError::Promoted), QUICK);
        assert!(!again.contains(&Effect::Log(Note::Promoted)), "said once");
        assert!(again.contains(&poll));
        // Any other error in between: the next promotion is reported again.
        state.step(AttemptEnd::Failed(&JobError::WatchClosed), QUICK);
        let (_, after) = state.step(AttemptEnd::Failed(&JobError::Promoted), QUICK);
        assert!(after.contains(&Effect::Log(Note::Promoted)));
    }

    #[test]
    fn errors_park_retry_step_down_or_stop() {
        let mut state = JobLoop::default();
        let guard = JobError::PruneGuard {
            would_delete: 5,
            dest_keys: 10,
            max_prune_ratio: 0.1,
        };
        let (next, effects) = state.step(AttemptEnd::Failed(&guard), QUICK);
        assert_eq!(next, Next::Again);
        assert!(effects.contains(&Effect::SetState(JobState::PruneGuard)));
        assert!(effects.contains(&Effect::Pause {
            delay: Delay::Fixed(PRUNE_GUARD_POLL),
            note: Some(Note::NeedsOperator),
        }));
        let (_, effects) = state.step(AttemptEnd::Failed(&JobError::WatchClosed), QUICK);
        assert!(effects.contains(&Effect::SetState(JobState::Error)));
        assert!(effects.contains(&Effect::Pause {
            delay: Delay::Backoff,
            note: Some(Note::Retrying),
        }));
        let fenced = JobError::Fenced { reason: "test" };
        let (next, effects) = state.step(AttemptEnd::Failed(&fenced), QUICK);
        assert_eq!(next, Next::Fail);
        assert_eq!(
            effects,
            vec![
                Effect::CountError("fenced"),
                Effect::SetState(JobState::Error)
            ]
        );
        assert_eq!(
            state
                .step(AttemptEnd::Failed(&JobError::Cancelled), QUICK)
                .0,
            Next::Stop
        );
        assert_eq!(state.step(AttemptEnd::Done, QUICK), (Next::Stop, vec![]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::meta::FullSyncMarker;
    use crate::mirror::resume::ResumeEvidence;
    use crate::telemetry::clock::now_rfc3339;

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
            excluded: None,
            revision_exact: false,
            exact_gaps: Vec::new(),
        }
    }

    fn meta_with(checkpoint: Option<Checkpoint>) -> JobMeta {
        JobMeta {
            checkpoint_raw: checkpoint.as_ref().map(Checkpoint::encode),
            checkpoint,
            ..JobMeta::default()
        }
    }

    fn app() -> KeyRewrite {
        KeyRewrite::new("/app/", "/app/")
    }

    const HEAD: ClusterHead = ClusterHead {
        cluster_id: 7,
        revision: 100,
    };

    #[test]
    fn resumes_from_a_usable_checkpoint() {
        let meta = meta_with(Some(checkpoint(90, 7)));
        assert_eq!(
            decide(&meta, HEAD, &app(), None),
            Decision::Resume(meta.checkpoint.clone().unwrap())
        );
        // The source at exactly the checkpoint revision is still resumable.
        let at_head = meta_with(Some(checkpoint(100, 7)));
        assert!(matches!(
            decide(&at_head, HEAD, &app(), None),
            Decision::Resume(_)
        ));
    }

    #[test]
    fn resume_verification() {
        use crate::model::schema::EventStamp;
        let mut checkpoint = checkpoint(90, 7);
        let verify_resume = |c: &Checkpoint, e: &ResumeEvidence| {
            crate::mirror::resume::verify_resume(c.last_synced_rev, c.last_event.as_ref(), e)
        };
        let evidence = |source_keys, dest_keys, last: Option<(i64, &[u8])>| ResumeEvidence {
            source_keys,
            dest_keys,
            last_event_key: last.map(|(r, v)| (r, v.to_vec())),
            ..ResumeEvidence::default()
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
        // Deleted at another revision of another history: present at it.
        let present_at_delete = ResumeEvidence {
            existed_before_delete: Some(true),
            absent_at_delete: Some(false),
            ..evidence(3, 3, None)
        };
        assert!(verify_resume(&checkpoint, &present_at_delete).is_some());
        // A mirrored key changed after the newest event: another history.
        let newer = ResumeEvidence {
            newer_than_last_event: Some(1),
            ..evidence(3, 3, None)
        };
        assert!(verify_resume(&checkpoint, &newer).is_some());
        let none_newer = ResumeEvidence {
            newer_than_last_event: Some(0),
            ..evidence(3, 3, None)
        };
        assert_eq!(verify_resume(&checkpoint, &none_newer), None);
    }

    /// A small prefix is compared key by key: equal is proof enough (even
    /// without a last event), one differing key is another history, and
    /// counts that differ say so first.
    #[test]
    fn a_key_by_key_comparison_decides_the_resume() {
        let checkpoint = checkpoint(90, 7);
        let compared = |source_keys, dest_keys, differing| ResumeEvidence {
            source_keys,
            dest_keys,
            differing_keys: Some(differing),
            ..ResumeEvidence::default()
        };
        assert_eq!(
            crate::mirror::resume::verify_resume(
                90,
                checkpoint.last_event.as_ref(),
                &compared(5, 5, 0)
            ),
            None
        );
        let stamp = crate::model::schema::EventStamp::put(b"/app/k", b"v", 88);
        // Equal key by key: the stamp is not needed (it may be stale).
        assert_eq!(
            crate::mirror::resume::verify_resume(90, Some(&stamp), &compared(5, 5, 0)),
            None
        );
        assert!(matches!(
            crate::mirror::resume::verify_resume(90, Some(&stamp), &compared(5, 5, 1)),
            Some(SlowPathReason::HistoryDiffers { detail }) if detail.contains("1 keys")
        ));
        assert!(matches!(
            crate::mirror::resume::verify_resume(90, Some(&stamp), &compared(5, 6, 0)),
            Some(SlowPathReason::HistoryDiffers { detail }) if detail.contains("held 5 keys")
        ));
        // Beside zk2etcd the destination holds its keys too: the counts
        // are no evidence, the comparison (which leaves them out) is.
        let beside = |differing| ResumeEvidence {
            co_writers: true,
            ..compared(5, 9, differing)
        };
        assert_eq!(
            crate::mirror::resume::verify_resume(90, Some(&stamp), &beside(0)),
            None
        );
        assert!(crate::mirror::resume::verify_resume(90, Some(&stamp), &beside(1)).is_some());
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
            SlowPathReason::PrefixChanged {
                source: None,
                dest: Some(("/a/".into(), "/b/".into())),
            },
        ];
        assert!(!chosen.iter().any(SlowPathReason::forced_by_source));
    }

    #[test]
    fn slow_path_reasons() {
        assert_eq!(
            decide(&meta_with(None), HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::NoCheckpoint)
        );
        assert!(matches!(
            decide(&meta_with(Some(checkpoint(90, 8))), HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::SourceReplaced { .. })
        ));
        assert!(matches!(
            decide(&meta_with(Some(checkpoint(120, 7))), HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::SourceBehind { .. })
        ));
        assert_eq!(
            decide(
                &meta_with(Some(checkpoint(90, 7))),
                HEAD,
                &app(),
                Some(SlowPathReason::Compacted)
            ),
            Decision::FullSync(SlowPathReason::Compacted)
        );
        let mut reset = meta_with(Some(checkpoint(90, 7)));
        reset.reset_request = Some(b"{}".to_vec());
        assert_eq!(
            decide(&reset, HEAD, &app(), None),
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
            prefixes: None,
        };
        interrupted.full_sync_raw = Some(marker.encode());
        interrupted.full_sync = Some(marker);
        assert_eq!(
            decide(&interrupted, HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::Interrupted {
                pinned_rev: Some(50)
            })
        );
        // Interrupted while copying to other prefixes (the checkpoint was
        // dropped when it began): the change is named, not the interruption.
        let mut moved = interrupted.clone();
        if let Some(marker) = moved.full_sync.as_mut() {
            marker.prefixes = Some(("/app/".into(), "/copy/".into()));
        }
        assert_eq!(
            decide(&moved, HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::PrefixChanged {
                source: None,
                dest: Some(("/copy/".into(), "/app/".into())),
            })
        );
        if let Some(marker) = moved.full_sync.as_mut() {
            marker.prefixes = Some(("/app/".into(), "/app/".into()));
        }
        assert!(matches!(
            decide(&moved, HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::Interrupted { .. })
        ));
        let mut garbled = meta_with(None);
        garbled.checkpoint_raw = Some(b"garbage".to_vec());
        assert_eq!(
            decide(&garbled, HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::UnreadableCheckpoint)
        );
    }

    /// A prefix no longer excluded was never copied: a full sync, naming it.
    #[test]
    fn a_removed_exclude_takes_the_slow_path_and_an_added_one_does_not() {
        let mut excluding = checkpoint(90, 7);
        excluding.excluded = Some(vec!["/app/private/".into()]);
        let meta = meta_with(Some(excluding));
        let still = app().excluding(["/app/private/"]);
        assert!(matches!(
            decide(&meta, HEAD, &still, None),
            Decision::Resume(_)
        ));
        let reason = match decide(&meta, HEAD, &app(), None) {
            Decision::FullSync(reason) => reason,
            resumed => panic!("resumed a copy that never held /app/private/: {resumed:?}"),
        };
        assert_eq!(
            reason,
            SlowPathReason::ExcludeRemoved {
                prefixes: vec!["/app/private/".into()]
            }
        );
        assert!(reason.to_string().contains("/app/private/"), "{reason}");
        // Excluding more (another prefix, or a wider one) leaves keys
        // behind, loses none: no full sync.
        for more in [
            app().excluding(["/app/private/", "/app/tmp/"]),
            app().excluding(["/app/priv"]),
        ] {
            assert!(matches!(
                decide(&meta, HEAD, &more, None),
                Decision::Resume(_)
            ));
        }
        // A narrower one copies what the rest held: a full sync.
        assert!(matches!(
            decide(&meta, HEAD, &app().excluding(["/app/private/x/"]), None),
            Decision::FullSync(SlowPathReason::ExcludeRemoved { .. })
        ));
        // A checkpoint that does not say what it left out is not judged.
        assert!(matches!(
            decide(&meta_with(Some(checkpoint(90, 7))), HEAD, &app(), None),
            Decision::Resume(_)
        ));
    }

    /// O1: a checkpoint written for other prefixes is never resumed from,
    /// whatever the counts say, and the reason names the change.
    #[test]
    fn a_changed_prefix_takes_the_slow_path_and_says_so() {
        let meta = meta_with(Some(checkpoint(90, 7)));
        let other_source = KeyRewrite::new("/other/", "/app/");
        let reason = match decide(&meta, HEAD, &other_source, Some(SlowPathReason::Compacted)) {
            Decision::FullSync(reason) => reason,
            resumed => panic!("resumed from another prefix's checkpoint: {resumed:?}"),
        };
        assert_eq!(
            reason,
            SlowPathReason::PrefixChanged {
                source: Some(("/app/".into(), "/other/".into())),
                dest: None
            }
        );
        let text = reason.to_string();
        assert!(text.contains("--prefix /app/ -> /other/"), "{text}");
        assert!(!text.contains("rebuilt"), "{text}");
        let moved = KeyRewrite::new("/app/", "/copy/");
        let reason = match decide(&meta, HEAD, &moved, None) {
            Decision::FullSync(reason) => reason,
            resumed => panic!("{resumed:?}"),
        };
        assert!(
            reason
                .to_string()
                .contains("the copies under /app/ stay there"),
            "{reason}"
        );
        // A checkpoint that names its destination prefix is held to it.
        let mut copied = checkpoint(90, 7);
        copied.dest_prefix = Some("/copy/".into());
        assert!(matches!(
            decide(&meta_with(Some(copied.clone())), HEAD, &moved, None),
            Decision::Resume(_)
        ));
        assert!(matches!(
            decide(&meta_with(Some(copied)), HEAD, &app(), None),
            Decision::FullSync(SlowPathReason::PrefixChanged {
                source: None,
                dest: Some(_)
            })
        ));
        // A checkpoint from before prefixes were recorded is the job's.
        let mut old = checkpoint(90, 7);
        old.source_prefix = String::new();
        assert!(matches!(
            decide(&meta_with(Some(old)), HEAD, &other_source, None),
            Decision::Resume(_)
        ));
    }
}
