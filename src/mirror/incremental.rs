//! The fast path: watch the source prefix from the checkpoint and apply
//! events in revision order, coalesced into chained txns.
//!
//! One task drives everything with a single `select!`: reading the watch,
//! acknowledging txns, and the progress tick that both advances an idle
//! checkpoint and detects a stalled stream.

use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::batch::{Batch, BatchLimits, Coalescer, Mutation, SourceRevision};
use crate::model::keys::{prefix_range_end, prefix_range_start};
use crate::mirror::meta::KeyGuard;
use crate::mirror::writer::{Acked, Pipeline};
use crate::mirror::{JobContext, JobError};

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

pub async fn run(
    ctx: &JobContext,
    committed_guard: KeyGuard,
    committed_revision: i64,
    source_cluster_id: u64,
    cancel: &CancellationToken,
) -> Result<Stopped, JobError> {
    let prefix = prefix_range_start(ctx.rewrite.source_prefix());
    let options = WatchOptions::new()
        .with_range(prefix_range_end(ctx.rewrite.source_prefix()))
        .with_start_revision(committed_revision + 1)
        .with_progress_notify()
        .with_fragment();
    let mut watch_client = ctx.source.watch_client();
    let mut stream = ctx
        .source
        .call("create watch", async move {
            watch_client.watch(prefix, Some(options)).await
        })
        .await?;
    info!(job = %ctx.job.name, from_revision = committed_revision + 1, "Watching source.");

    let limits = BatchLimits {
        max_ops: ctx.limits.max_ops.saturating_sub(1).max(1),
        max_bytes: ctx
            .limits
            .max_bytes
            .saturating_sub(CHECKPOINT_RESERVE_BYTES)
            .max(1024),
    };
    let mut coalescer = Coalescer::new(limits, committed_revision);
    let mut pipeline = Pipeline::new(ctx, source_cluster_id, committed_guard, committed_revision);
    let mut assembling: Option<SourceRevision> = None;
    let mut reported_splits = 0u64;
    let mut idle = IdleCheckpoint::new(ctx.tuning.idle_checkpoint_interval);
    let mut lag = LagClock::default();
    let mut progress_tick = tokio::time::interval(ctx.tuning.progress_interval);
    progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_message = Instant::now();
    let max_backlog = ctx.tuning.max_inflight_txns * MAX_SEALED_BACKLOG_FACTOR;

    loop {
        let mut send_at = None;
        while !coalescer.is_empty() {
            match pipeline.send_slot() {
                Some(Ok(())) => {
                    let Some(batch) = coalescer.next_batch() else {
                        break;
                    };
                    pipeline.send(batch);
                }
                Some(Err(at)) => {
                    send_at = Some(at);
                    break;
                }
                None => break,
            }
        }
        let splits = coalescer.split_revisions();
        if splits > reported_splits {
            ctx.metrics
                .split_revisions_total
                .inc_by(splits - reported_splits);
            warn!(job = %ctx.job.name, revision = coalescer.through_revision(), "A source revision exceeded the txn limits and was applied across several txns.");
            reported_splits = splits;
        }
        let reading = coalescer.sealed_len() < max_backlog;

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
            acked = pipeline.next_committed(), if !pipeline.is_idle() => match acked? {
                Acked::Committed(committed) => record_commit(ctx, committed.revision, committed.events, &mut lag),
                // Outside the select: re-sending must not be interrupted by another branch.
                Acked::Reordered => {
                    debug!(job = %ctx.job.name, "A pipelined txn was applied out of order; re-sending the window.");
                    pipeline.resend_window().await?;
                }
            },
            message = stream.message(), if reading => {
                let Some(response) = message.map_err(|source| JobError::Watch { source })? else {
                    return Err(JobError::WatchClosed);
                };
                last_message = Instant::now();
                ctx.heartbeat();
                handle_response(ctx, response, &mut assembling, &mut coalescer, &mut idle, &mut lag, &mut pipeline)?;
            }
            _ = tokio::time::sleep_until(send_at.unwrap_or_else(Instant::now).into()), if send_at.is_some() => {}
            _ = ctx.repairs.requested() => {
                let differences = ctx.repairs.take();
                queue_repair(ctx, &mut coalescer, differences).await?;
            }
            _ = progress_tick.tick() => {
                ctx.heartbeat();
                lag.publish(ctx, pipeline.committed_revision());
                if last_message.elapsed() > ctx.tuning.watch_idle_timeout {
                    return Err(JobError::WatchStalled { idle: last_message.elapsed() });
                }
                // Answers (progress or events) prove the stream is alive and
                // tell us the source head while the prefix is quiet.
                stream.request_progress().await.map_err(|source| JobError::Watch { source })?;
                crate::mirror::check_operator_markers(ctx).await?;
            }
        }
    }
}

/// Reads the source values of the differing keys at the revision the
/// coalescer has reached, and queues them behind everything already pushed:
/// once that batch commits, those keys hold exactly what the checkpoint it
/// carries says.
async fn queue_repair(
    ctx: &JobContext,
    coalescer: &mut Coalescer,
    differences: Vec<(Vec<u8>, crate::check::DifferenceKind)>,
) -> Result<(), JobError> {
    if differences.is_empty() {
        return Ok(());
    }
    let suffixes: Vec<Vec<u8>> = differences.iter().map(|(s, _)| s.clone()).collect();
    let at = coalescer.through_revision();
    let to_source = |s: &[u8]| ctx.rewrite.suffix_to_source(s);
    let values = match crate::check::read_keys_at(&ctx.source, &suffixes, to_source, Some(at)).await
    {
        Ok(values) => values,
        // History that young compacted already: the watch carries any later change.
        Err(error) if error.kind() == crate::etcd::client::FailureKind::Compacted => {
            crate::check::read_keys(&ctx.source, &suffixes, to_source).await?
        }
        Err(error) => return Err(error.into()),
    };
    let mut mutations = Vec::with_capacity(values.len());
    for ((suffix, kind), value) in differences.iter().zip(values) {
        let key = ctx.rewrite.suffix_to_dest(suffix);
        mutations.push(match value {
            Some(value) => Mutation::Put { key, value },
            None => Mutation::Delete { key },
        });
        ctx.metrics.repaired(kind.label(), 1);
    }
    info!(job = %ctx.job.name, keys = mutations.len(), at_revision = at, "Repairing keys the consistency check found different.");
    coalescer.push_repair(mutations);
    Ok(())
}

fn record_commit(ctx: &JobContext, revision: i64, events: usize, lag: &mut LagClock) {
    ctx.metrics.events_applied_total.inc_by(events as u64);
    lag.committed(revision);
    lag.publish(ctx, revision);
}

fn handle_response(
    ctx: &JobContext,
    response: WatchResponse,
    assembling: &mut Option<SourceRevision>,
    coalescer: &mut Coalescer,
    idle: &mut IdleCheckpoint,
    lag: &mut LagClock,
    pipeline: &mut Pipeline,
) -> Result<(), JobError> {
    if response.canceled() {
        if response.compact_revision() > 0 {
            return Err(JobError::Compacted {
                compact_revision: response.compact_revision(),
            });
        }
        return Err(JobError::WatchCanceled {
            reason: response.cancel_reason().to_string(),
        });
    }
    let header_revision = response.header().map_or(0, |h| h.revision());
    lag.saw_head(header_revision);
    ctx.metrics
        .set_progress(pipeline.committed_revision(), header_revision);
    let events = response.events();
    if events.is_empty() {
        if !response.created() && header_revision > 0 {
            let quiet = assembling.is_none() && coalescer.is_empty() && pipeline.is_idle();
            if let Some(revision) =
                idle.on_progress(header_revision, quiet, pipeline.tail_revision())
            {
                pipeline.send(Batch {
                    mutations: Vec::new(),
                    through_revision: revision,
                    partial_revision: None,
                });
            }
        }
        return Ok(());
    }
    idle.on_events();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let revision = kv.mod_revision();
        if assembling.as_ref().is_some_and(|r| r.revision != revision) {
            coalescer.push(assembling.take().expect("checked"));
        }
        let current = assembling.get_or_insert_with(|| SourceRevision {
            revision,
            mutations: Vec::new(),
        });
        if kv.key().starts_with(&ctx.meta_prefix) {
            // The source may itself be a mirror's destination: its meta keys stay there.
            continue;
        }
        let Some(dest_key) = ctx.rewrite.to_dest(kv.key()) else {
            continue;
        };
        current.mutations.push(match event.event_type() {
            EventType::Put => Mutation::Put {
                key: dest_key,
                value: kv.value().to_vec(),
            },
            EventType::Delete => Mutation::Delete { key: dest_key },
        });
    }
    // A revision is only known complete once its response is not a fragment:
    // etcd never splits one revision across unfragmented responses.
    if !response.0.fragment {
        if let Some(revision) = assembling.take() {
            coalescer.push(revision);
        }
    }
    Ok(())
}

/// Decides when a quiet prefix may move its checkpoint to the source head.
///
/// etcd 3.4 before 3.4.24 answers a progress request from a side channel
/// with the store's current revision, which can be ahead of events still
/// queued for this watcher (etcd-io/etcd#15220). So a head revision is only
/// used after a *later* progress answer arrived with no event in between: by
/// then anything queued at the first answer has been delivered.
#[derive(Debug)]
struct IdleCheckpoint {
    interval: Duration,
    candidate: Option<i64>,
    last_advanced: Instant,
}

impl IdleCheckpoint {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            candidate: None,
            last_advanced: Instant::now(),
        }
    }

    fn on_events(&mut self) {
        self.candidate = None;
    }

    /// Returns the revision to checkpoint now, if any.
    fn on_progress(&mut self, head: i64, quiet: bool, tail_revision: i64) -> Option<i64> {
        if !quiet {
            self.candidate = None;
            return None;
        }
        let confirmed = self.candidate.filter(|c| *c > tail_revision && *c <= head);
        self.candidate = Some(head);
        match confirmed {
            Some(revision) if self.last_advanced.elapsed() >= self.interval => {
                self.last_advanced = Instant::now();
                Some(revision)
            }
            _ => None,
        }
    }
}

/// Tracks `etcd_syncer_lag_seconds`: how long ago the destination last
/// reflected the source head we knew of.
#[derive(Debug, Default)]
struct LagClock {
    /// Heads seen and when, oldest first; pruned as commits pass them.
    pending_heads: std::collections::VecDeque<(i64, Instant)>,
}

impl LagClock {
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
    fn idle_checkpoint_needs_a_confirming_second_answer() {
        let mut idle = IdleCheckpoint::new(Duration::ZERO);
        assert_eq!(
            idle.on_progress(100, true, 50),
            None,
            "first answer is only a candidate"
        );
        assert_eq!(idle.on_progress(120, true, 50), Some(100));
        idle.on_events();
        assert_eq!(
            idle.on_progress(130, true, 120),
            None,
            "events reset the candidate"
        );
        assert_eq!(
            idle.on_progress(140, false, 120),
            None,
            "busy pipeline never advances"
        );
        assert_eq!(idle.on_progress(150, true, 120), None);
        assert_eq!(idle.on_progress(150, true, 120), Some(150));
        assert_eq!(
            idle.on_progress(150, true, 150),
            None,
            "nothing new to advance to"
        );
    }

    #[test]
    fn idle_checkpoint_respects_its_interval() {
        let mut idle = IdleCheckpoint::new(Duration::from_secs(3600));
        idle.on_progress(10, true, 1);
        assert_eq!(idle.on_progress(20, true, 1), None);
    }

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
}
