//! The fast path: watch the source prefix from the checkpoint and apply
//! events in revision order, coalesced into chained txns.
//!
//! One task drives everything with a single `select!`: reading the watch,
//! acknowledging txns, the progress tick that advances an idle checkpoint and
//! detects a stalled stream, and the results of the helper tasks that do
//! their own I/O (operator markers, the periodic check, repair reads), so no
//! arm ever waits on the destination or the source while acks and
//! cancellation queue up behind it.
//!
//! The [`Coalescer`] owns the revision bookkeeping: events, idle advances
//! (an empty batch) and repairs all go through it, so the checkpoint each
//! txn carries only ever moves forward.

use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::check::CheckReport;
use crate::etcd::api::WatchRequest;
use crate::etcd::periodic::{First, Rounds};
use crate::etcd::FailureKind;
use crate::mirror::context::JobContext;
use crate::mirror::error::JobError;
use crate::mirror::meta::KeyGuard;
use crate::mirror::pipeline::{Acked, Pipeline};
use crate::mirror::watch_state::{RepairRead, Tick, WatchState, WatchTiming, WatchView};
use crate::model::batch::{BatchLimits, Mutation};
use crate::model::keys::{prefix_range_end, prefix_range_start};
use crate::model::schema::EventStamp;

/// Room kept in every txn for the fence compares and the checkpoint put.
const CHECKPOINT_RESERVE_BYTES: usize = 4096;

/// Stop reading the watch while this many full batches wait to be sent, so a
/// slow destination pushes back on the stream instead of growing memory.
const MAX_SEALED_BACKLOG_FACTOR: usize = 2;

/// How the watch loop ended without an error.
#[derive(Debug)]
pub enum Stopped {
    Cancelled,
}

/// How a watch phase came to its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A resume from a checkpoint found on the destination: the source's
    /// history must be proved to be the one it reflects.
    Resume,
    /// Right after this attempt's full sync: only that the watch reads the
    /// same history is checked (the cheap proof; the sync just compared
    /// every key).
    AfterFullSync,
}

pub async fn run(
    ctx: &JobContext,
    committed_guard: KeyGuard,
    committed_revision: i64,
    committed_event: Option<EventStamp>,
    source_cluster_id: u64,
    start: Start,
    cancel: &CancellationToken,
) -> Result<Stopped, JobError> {
    let request = WatchRequest {
        key: prefix_range_start(ctx.rewrite.source_prefix()),
        range_end: prefix_range_end(ctx.rewrite.source_prefix()),
        start_revision: committed_revision + 1,
        progress_notify: true,
        fragment: true,
    };
    let mut stream = ctx.source.watch("create watch", request).await?;
    // Checked once the watch exists, so it is about the server the watch
    // reads from:
    // - etcd-io/etcd#18089 (before 3.4.36 / 3.5.18): a watch that starts at
    //   exactly the compaction revision misses a DELETE made at it. If the
    //   checkpoint revision is still readable now, the compaction revision
    //   was at or below it when the watch began. (A compacted read fails
    //   with a compaction error, whose policy is a full sync.)
    // - a source rebuilt or restored with the same cluster id has another
    //   history: the key counts and the last applied event must agree.
    let evidence = crate::mirror::resume::read_resume_evidence(
        ctx,
        committed_revision,
        committed_event.as_ref(),
        start == Start::Resume,
        cancel,
    )
    .await?;
    if let Some(reason) = crate::mirror::resume::verify_resume(
        committed_revision,
        committed_event.as_ref(),
        &evidence,
    ) {
        return Err(JobError::HistoryDiffers(reason));
    }
    // Only now: before, the job still reads both sides and may yet fall
    // back to a full sync, and `watching` tells operators (and tests) that
    // events flow straight to the destination.
    ctx.metrics
        .set_state(crate::telemetry::metrics::JobState::Watching);
    info!(job = %ctx.job.name, from_revision = committed_revision + 1, "Watching source.");

    // Everything this phase starts stops with it: checks and repairs belong
    // to the Watching phase only (never a full sync, never a promoted job).
    let phase = cancel.child_token();
    let _stop_phase = phase.clone().drop_guard();
    let mut markers = spawn_marker_watch(ctx.clone(), phase.clone());
    let mut checks = crate::mirror::periodic_check::spawn(ctx.clone(), phase.clone());
    crate::mirror::history_window::spawn(ctx.clone(), phase.clone());
    // Closed when periodic checks are off: then that arm must not spin.
    let mut checks_open = true;
    let mut repair_read: Option<JoinHandle<Result<Option<RepairRead>, JobError>>> = None;

    let limits = BatchLimits {
        // The checkpoint, and room for a revision-map sample and its
        // pruning once txns are big enough to spare it.
        max_ops: ctx
            .limits
            .max_ops
            .saturating_sub(if ctx.limits.max_ops >= 8 { 3 } else { 1 })
            .max(1),
        max_bytes: ctx
            .limits
            .max_bytes
            .saturating_sub(CHECKPOINT_RESERVE_BYTES)
            .max(1024),
    };
    let mut state = WatchState::new(
        WatchView {
            rewrite: ctx.rewrite.clone(),
            meta_prefix: ctx.meta_prefix.clone(),
            leases: ctx.leases().is_some(),
        },
        limits,
        committed_revision,
        WatchTiming {
            idle_checkpoint: ctx.tuning.idle_checkpoint_interval,
            confirm_progress: ctx.quirks.progress_may_overtake_events,
            idle_timeout: ctx.tuning.watch_idle_timeout,
            probe_silence: ctx.quirks.progress_may_never_come,
        },
        Instant::now(),
    );
    let mut pipeline = Pipeline::new(
        ctx,
        source_cluster_id,
        committed_guard,
        committed_revision,
        committed_event,
    );
    // etcd-io/etcd#17507: on old servers a silent watch may just be one that
    // never gets a progress answer. It is probed with a read (off the loop)
    // instead of being recreated over and over.
    let mut stall_probe: Option<JoinHandle<Result<(), JobError>>> = None;
    let mut lag = LagClock::resume(ctx.lag_origin.clone(), committed_revision);
    let mut progress_tick = tokio::time::interval(ctx.tuning.progress_interval);
    progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_backlog = ctx.tuning.max_inflight_txns * MAX_SEALED_BACKLOG_FACTOR;

    loop {
        let mut send_at = None;
        while state.has_batches() {
            match pipeline.send_slot() {
                Some(Ok(())) => {
                    let Some((batch, last_event)) = state.next_batch() else {
                        break;
                    };
                    pipeline.send(batch, last_event)?;
                }
                Some(Err(at)) => {
                    send_at = Some(at);
                    break;
                }
                None => break,
            }
        }
        if let Some((splits, revision)) = state.new_splits() {
            ctx.metrics.split_revisions_total.inc_by(splits);
            warn!(job = %ctx.job.name, revision, "A source revision exceeded the txn limits and was applied across several txns.");
        }
        let reading = state.reading(max_backlog);
        let mut resend = false;

        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                // Let txns already sent finish so the checkpoint covers them;
                // each one commits with its checkpoint or not at all.
                match tokio::time::timeout(Duration::from_secs(5), pipeline.drain()).await {
                    Ok(Ok(done)) => for committed in done { record_commit(ctx, committed.revision, committed.events, &mut lag) },
                    Ok(Err(error)) => debug!(job = %ctx.job.name, %error, "In-flight txn did not commit during shutdown."),
                    Err(_) => debug!(job = %ctx.job.name, "In-flight txns did not finish within the shutdown grace period."),
                }
                return Ok(Stopped::Cancelled);
            }
            marker = markers.recv() => {
                return Err(marker.unwrap_or_else(|| JobError::Internal("operator marker watch ended".into())));
            }
            acked = pipeline.next_committed(), if !pipeline.is_idle() => match acked? {
                Acked::Committed(committed) => record_commit(ctx, committed.revision, committed.events, &mut lag),
                Acked::Reordered => resend = true,
            },
            message = stream.message(), if reading => {
                let Some(response) = message.map_err(|source| JobError::Watch { source })? else {
                    return Err(JobError::WatchClosed);
                };
                ctx.heartbeat();
                // The watch may have reconnected to another cluster behind
                // the same endpoints (the source replaced between the full
                // sync and now): its revisions are not the checkpoint's.
                let cluster_id = response.header.cluster_id;
                if cluster_id != 0 && source_cluster_id != 0 && cluster_id != source_cluster_id {
                    return Err(JobError::HistoryDiffers(crate::mirror::error::SlowPathReason::SourceReplaced {
                        checkpoint_cluster_id: source_cluster_id,
                        source_cluster_id: cluster_id,
                    }));
                }
                let delivered = state.on_response(response, !pipeline.is_idle(), Instant::now())?;
                lag.saw_head(delivered.head);
                ctx.metrics.set_progress(pipeline.committed_revision(), delivered.head);
                if let Some(book) = ctx.leases() {
                    for (suffix, lease) in &delivered.observed {
                        book.observe_key(suffix, *lease);
                    }
                }
            }
            _ = tokio::time::sleep_until(send_at.unwrap_or_else(Instant::now)), if send_at.is_some() => {}
            report = checks.recv(), if checks_open => {
                if report.is_none() {
                    checks_open = false;
                }
                if let Some(report) = report {
                    if !state.repair_read_pending() {
                        let at = state.start_repair_read();
                        repair_read = Some(tokio::spawn(read_repair(ctx.clone(), report, at)));
                    }
                }
            }
            read = async { repair_read.as_mut().expect("guarded").await }, if repair_read.is_some() => {
                repair_read = None;
                let read = read.map_err(|e| JobError::Internal(format!("repair read task failed: {e}")))??;
                let at_revision = read.as_ref().map(|r| r.at_revision);
                let kinds = state.finish_repair_read(read);
                for kind in &kinds {
                    ctx.metrics.repaired(kind, 1);
                }
                if !kinds.is_empty() {
                    info!(job = %ctx.job.name, keys = kinds.len(), read_at_revision = at_revision, applied_at_revision = state.through_revision(), "Repairing keys the consistency check found different.");
                }
            }
            probed = async { stall_probe.as_mut().expect("guarded").await }, if stall_probe.is_some() => {
                stall_probe = None;
                let answered = matches!(probed, Ok(Ok(())));
                state.on_probe(answered, Instant::now())?;
                debug!(job = %ctx.job.name, "Watch silent but the source answers; keeping it (etcd-io/etcd#17507).");
            }
            _ = progress_tick.tick() => {
                ctx.heartbeat();
                lag.publish(ctx, pipeline.committed_revision());
                match state.on_tick(Instant::now()) {
                    Tick::Alive => {}
                    Tick::Stalled { idle } => return Err(JobError::WatchStalled { idle }),
                    Tick::Probe => {
                        let source = ctx.source.clone();
                        let prefix = ctx.rewrite.source_prefix().to_vec();
                        stall_probe = Some(tokio::spawn(async move {
                            source.head(&prefix).await.map(|_| ()).map_err(JobError::from)
                        }));
                    }
                }
                // Answers (progress or events) prove the stream is alive and
                // tell us the source head while the prefix is quiet. This
                // only queues a request on the open stream.
                stream.request_progress().await.map_err(|source| JobError::Watch { source })?;
            }
        }
        if resend {
            debug!(job = %ctx.job.name, "A pipelined txn was applied out of order; re-sending the window.");
            // Re-sending must not be interleaved with new sends; only
            // cancellation may interrupt it, and then the pipeline is dropped.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Stopped::Cancelled),
                resent = pipeline.resend_window() => resent?,
            }
        }
    }
}

/// Polls the operator markers (promoted, reset request) on the destination
/// every progress interval, in its own task; reports the first one seen.
fn spawn_marker_watch(ctx: JobContext, cancel: CancellationToken) -> mpsc::Receiver<JobError> {
    let (found, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut rounds = Rounds::new(ctx.tuning.progress_interval, First::Now, &cancel);
        while rounds.next().await {
            let Some(checked) = rounds
                .run(crate::mirror::meta::check_operator_markers(
                    &ctx.dest, &ctx.keys,
                ))
                .await
            else {
                return;
            };
            if let Err(error) = checked {
                let _ = found.send(error).await;
                return;
            }
        }
    });
    receiver
}

/// Reads the source values of the keys a check found different, at the
/// revision the coalescer had reached when the read started.
async fn read_repair(
    ctx: JobContext,
    report: CheckReport,
    at_revision: i64,
) -> Result<Option<RepairRead>, JobError> {
    if report.differences.is_empty() {
        return Ok(None);
    }
    let suffixes: Vec<Vec<u8>> = report.differences.iter().map(|(s, _)| s.clone()).collect();
    let to_source = |s: &[u8]| ctx.rewrite.suffix_to_source(s);
    let values = match crate::check::read_keys_at(
        &ctx.source,
        &suffixes,
        to_source,
        Some(at_revision),
    )
    .await
    {
        Ok(values) => values,
        // That history is gone; the watch is about to report the
        // compaction, and the next check will find what still differs.
        Err(error) if error.kind() == FailureKind::Compacted => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mutations = report
        .differences
        .iter()
        .zip(values)
        .map(|((suffix, kind), value)| {
            let key = ctx.rewrite.suffix_to_dest(suffix);
            let mutation = match value {
                Some(kv) => Mutation::Put {
                    key,
                    value: kv.value,
                    lease: kv.lease,
                },
                None => Mutation::Delete { key },
            };
            (mutation, kind.label())
        })
        .collect();
    Ok(Some(RepairRead {
        at_revision,
        mutations,
    }))
}

fn record_commit(ctx: &JobContext, revision: i64, events: usize, lag: &mut LagClock) {
    ctx.metrics.events_applied_total.inc_by(events as u64);
    lag.committed(revision);
    lag.publish(ctx, revision);
}

/// Tracks `etcd_syncer_lag_seconds`: how long ago the destination last
/// reflected the source head we knew of.
#[derive(Debug, Default)]
struct LagClock {
    /// Heads seen and when, oldest first; pruned as commits pass them.
    pending_heads: std::collections::VecDeque<(i64, Instant)>,
    /// Where the oldest pending head is kept between attempts, so a job
    /// that keeps failing to apply shows a lag that grows (it used to
    /// start again from zero with every retry).
    origin: LagOrigin,
}

pub use crate::mirror::context::LagOrigin;

impl Drop for LagClock {
    fn drop(&mut self) {
        if let Ok(mut origin) = self.origin.lock() {
            *origin = self.pending_heads.front().copied();
        }
    }
}

impl LagClock {
    fn resume(origin: LagOrigin, committed_revision: i64) -> Self {
        let oldest = origin.lock().ok().and_then(|mut o| o.take());
        let mut clock = Self {
            pending_heads: oldest.into_iter().collect(),
            origin,
        };
        clock.committed(committed_revision);
        clock
    }

    fn saw_head(&mut self, revision: i64) {
        if self.pending_heads.back().is_none_or(|(r, _)| *r < revision) {
            if self.pending_heads.len() >= 1024 {
                // Keep the oldest (what lag is measured from) and the newest.
                self.pending_heads.remove(1);
            }
            self.pending_heads.push_back((revision, Instant::now()));
        }
    }

    fn committed(&mut self, revision: i64) {
        while self
            .pending_heads
            .front()
            .is_some_and(|(r, _)| *r <= revision)
        {
            self.pending_heads.pop_front();
        }
    }

    fn publish(&self, ctx: &JobContext, committed_revision: i64) {
        let seconds = self
            .pending_heads
            .front()
            .filter(|(r, _)| *r > committed_revision)
            .map_or(0.0, |(_, seen)| seen.elapsed().as_secs_f64());
        ctx.metrics.lag_seconds.set(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_clock_measures_from_the_oldest_unreflected_head() {
        let mut lag = LagClock::default();
        lag.saw_head(10);
        lag.saw_head(20);
        lag.committed(15);
        assert_eq!(lag.pending_heads.front().map(|(r, _)| *r), Some(20));
        lag.committed(20);
        assert!(lag.pending_heads.is_empty());
    }

    /// A retry does not start the lag from zero: the oldest head the
    /// destination did not reflect carries over to the next attempt.
    #[tokio::test(start_paused = true)]
    async fn lag_carries_over_between_attempts() {
        let origin = LagOrigin::default();
        {
            let mut first = LagClock::resume(origin.clone(), 5);
            first.saw_head(10);
            tokio::time::sleep(Duration::from_secs(30)).await;
            first.saw_head(12);
        }
        let seen = origin.lock().unwrap().expect("kept").1;
        assert_eq!(origin.lock().unwrap().map(|(r, _)| r), Some(10));
        let second = LagClock::resume(origin.clone(), 5);
        assert_eq!(second.pending_heads.front(), Some(&(10, seen)));
        drop(second);
        // An attempt that reflects it prunes it.
        let third = LagClock::resume(origin.clone(), 11);
        assert!(third.pending_heads.is_empty());
    }
}
