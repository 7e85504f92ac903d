//! Incremental txns in flight, applied strictly in order through the
//! checkpoint chain.
//!
//! Each txn compares the checkpoint key with the exact value the previous
//! txn wrote. That lets several txns be in flight at once (one round trip
//! no longer caps throughput) while the destination still only moves
//! through states the source really had: if txns arrive out of order, the
//! early one fails its compare and nothing is applied. The same compare
//! stops a deposed leader from rolling the checkpoint back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio::task::JoinHandle;

use crate::etcd::api::{Compare, Op};
use crate::mirror::context::JobContext;
use crate::mirror::error::JobError;
use crate::mirror::fenced::TxnOutcome;
use crate::mirror::meta::{CheckpointOf, KeyGuard};
use crate::mirror::writer::DestWriter;
use crate::model::batch::{Batch, Mutation};
use crate::model::keys::MetaKeys;
use crate::model::schema::EventStamp;
use crate::telemetry::clock::now_rfc3339;

/// The widest gap between pipelined sends; at 25ms a busy pipeline still
/// sends 40 txns/s, over 5,000 ops/s.
pub const MAX_SEND_SPACING: Duration = Duration::from_millis(25);

/// Incremental txns in flight, applied strictly in order through the
/// checkpoint chain.
pub struct Pipeline {
    writer: Arc<DestWriter>,
    source_cluster_id: u64,
    checkpoint_of: CheckpointOf,
    max_inflight: usize,
    /// The configured gap; the floor of the adaptive one.
    min_spacing: Duration,
    send_spacing: Duration,
    last_send: Instant,
    next_write_id: u64,
    /// What the checkpoint key holds once every sent txn has committed.
    tail_guard: KeyGuard,
    /// The last source event the destination reflects once they have.
    tail_event: Option<EventStamp>,
    tail_revision: i64,
    committed_revision: i64,
    inflight: VecDeque<InFlight>,
    revision_map: RevisionMapWriter,
}

/// Adds a revision-map sample to a checkpoint txn now and then, and
/// deletes samples past the retention in the same txn. A sample rides in
/// the txn that writes its checkpoint, so its key's mod revision is the
/// destination revision at which the prefix equals the source at the
/// sample's revision: the map cannot disagree with the data.
struct RevisionMapWriter {
    interval: Duration,
    retention: Duration,
    /// Ops a txn may hold in all (etcd's `--max-txn-ops`).
    max_ops: usize,
    last_sample: Option<Instant>,
    /// Samples this writer made: when, and for which source revision.
    written: VecDeque<(Instant, i64)>,
}

impl RevisionMapWriter {
    /// The ops to add to a checkpoint txn of `data_ops` ops (checkpoint
    /// included) that completes `revision`. A half-applied revision is
    /// never sampled: the destination does not equal any source state then.
    fn ops(&mut self, keys: &MetaKeys, revision: i64, partial: bool, data_ops: usize) -> Vec<Op> {
        let due = self
            .last_sample
            .is_none_or(|at| at.elapsed() >= self.interval);
        if self.interval.is_zero() || partial || !due || data_ops + 2 > self.max_ops {
            return Vec::new();
        }
        let now = Instant::now();
        self.last_sample = Some(now);
        let sample = crate::model::schema::RevisionSample { at: now_rfc3339() };
        let mut ops = vec![Op::put(keys.revision_sample(revision), sample.encode())];
        // Everything at or below the newest expired sample goes, including
        // samples an earlier leader wrote.
        let mut expired = None;
        while let Some(&(at, old)) = self.written.front() {
            if now.duration_since(at) < self.retention || old >= revision {
                break;
            }
            expired = Some(old);
            self.written.pop_front();
        }
        if let Some(old) = expired {
            ops.push(Op::Delete {
                key: keys.revision_map().into_bytes(),
                range_end: keys.revision_sample(old + 1).into_bytes(),
            });
        }
        self.written.push_back((now, revision));
        ops
    }
}

struct InFlight {
    through_revision: i64,
    /// The source revision whose state the mutations reflect: the partial
    /// revision of a split one, else `through_revision`. A leased key's
    /// lease is wanted at it (a lease retired on a probe answered before it
    /// must not take the key).
    state_revision: i64,
    events: usize,
    /// Kept to re-send the txn unchanged if etcd evaluated it before its predecessor.
    guards: Vec<Compare>,
    mutations: Vec<Mutation>,
    tail: Vec<Op>,
    resent: bool,
    task: JoinHandle<Result<TxnOutcome, JobError>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // A txn already on the wire may still land; that is safe because its
        // guard only matches the state it was built on.
        for inflight in &self.inflight {
            inflight.task.abort();
        }
    }
}

/// What acknowledging the head of the pipeline found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    Committed(Committed),
    /// etcd applied the head after a later txn; see [`Pipeline::resend_window`].
    Reordered,
}

/// What the destination reflects after a txn committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub revision: i64,
    pub events: usize,
}

impl Pipeline {
    pub fn new(
        ctx: &JobContext,
        source_cluster_id: u64,
        committed_guard: KeyGuard,
        committed_revision: i64,
        committed_event: Option<EventStamp>,
    ) -> Self {
        let send_spacing = ctx.tuning.pipeline_send_spacing;
        Self {
            writer: ctx.writer.clone(),
            source_cluster_id,
            checkpoint_of: ctx.checkpoint_of(),
            max_inflight: ctx.tuning.max_inflight_txns.max(1),
            min_spacing: send_spacing,
            send_spacing,
            last_send: Instant::now(),
            next_write_id: ctx.ids.next(),
            tail_guard: committed_guard,
            tail_event: committed_event,
            tail_revision: committed_revision,
            committed_revision,
            inflight: VecDeque::new(),
            revision_map: RevisionMapWriter {
                interval: ctx.tuning.revision_map_interval,
                retention: ctx.tuning.revision_map_retention,
                max_ops: ctx.limits.max_ops,
                last_sample: None,
                written: VecDeque::new(),
            },
        }
    }

    /// When the next txn may be sent: `Ok` now, or `Err(at)` once the
    /// spacing since the previous send has passed. `None` when the pipeline is full.
    ///
    /// etcd's gRPC server starts a goroutine per request and Go runs the
    /// newest one first, so two txns arriving together are usually applied
    /// in reverse order and the later one fails its chain guard. A short gap
    /// between sends lets the earlier txn reach raft first. Bigger txns need
    /// a bigger gap, so it adapts: doubled on every reorder (up to
    /// [`MAX_SEND_SPACING`]), shrunk by 1/32 on every clean commit down to the
    /// configured minimum. An idle pipeline has nothing to overtake and sends at once.
    pub fn send_slot(&self) -> Option<Result<(), Instant>> {
        if self.inflight.len() >= self.max_inflight {
            return None;
        }
        let at = self.last_send + self.send_spacing;
        if self.inflight.is_empty() || Instant::now() >= at {
            Some(Ok(()))
        } else {
            Some(Err(at))
        }
    }

    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    pub fn committed_revision(&self) -> i64 {
        self.committed_revision
    }

    /// The revision the destination will reflect once everything sent commits.
    pub fn tail_revision(&self) -> i64 {
        self.tail_revision
    }

    /// Sends `batch` with the checkpoint it completes. An empty batch only
    /// advances the checkpoint (an idle prefix keeping up with compaction).
    ///
    /// `last_event` is the last source event `batch` completes (none for a
    /// batch that completes no new revision: the previous one stays).
    ///
    /// Refuses a batch whose revision is behind what was already sent: that
    /// txn would roll the checkpoint back.
    pub fn send(&mut self, batch: Batch, last_event: Option<EventStamp>) -> Result<(), JobError> {
        if batch.through_revision < self.tail_revision {
            return Err(JobError::Internal(format!(
                "refusing to move the checkpoint back from revision {} to {}",
                self.tail_revision, batch.through_revision
            )));
        }
        // A partial batch leaves the previous revision as the resume point:
        // on restart the whole oversized revision is applied again.
        let checkpoint = self.checkpoint_of.at(
            (batch.through_revision, self.source_cluster_id),
            self.next_write_id,
            last_event.or_else(|| self.tail_event.clone()),
            batch.partial_revision,
        );
        self.tail_event = checkpoint.last_event.clone();
        self.next_write_id = self.next_write_id.wrapping_add(1);
        let checkpoint_bytes = checkpoint.encode();
        let checkpoint_key = self.writer.keys().checkpoint();
        let guards = vec![self.tail_guard.compare(&checkpoint_key)];
        let events = batch.mutations.len();
        let mut tail = vec![Op::put(checkpoint_key, checkpoint_bytes.clone())];
        tail.extend(self.revision_map.ops(
            self.writer.keys(),
            batch.through_revision,
            batch.partial_revision.is_some(),
            events + 1,
        ));
        let state_revision = batch.partial_revision.unwrap_or(batch.through_revision);
        let task = self.spawn_commit(
            guards.clone(),
            batch.mutations.clone(),
            tail.clone(),
            state_revision,
        );
        self.last_send = Instant::now();
        self.tail_guard = KeyGuard::Holds(checkpoint_bytes);
        self.tail_revision = batch.through_revision;
        self.inflight.push_back(InFlight {
            through_revision: batch.through_revision,
            state_revision,
            events,
            guards,
            mutations: batch.mutations,
            tail,
            resent: false,
            task,
        });
        Ok(())
    }

    fn spawn_commit(
        &self,
        guards: Vec<Compare>,
        mutations: Vec<Mutation>,
        tail: Vec<Op>,
        state_revision: i64,
    ) -> JoinHandle<Result<TxnOutcome, JobError>> {
        let writer = self.writer.clone();
        tokio::spawn(async move {
            writer
                .commit_mutations("apply batch", guards, mutations, tail, state_revision)
                .await
        })
    }

    /// Waits for the oldest txn in flight. Any failure other than a reorder
    /// ends the pipeline: the job re-reads the checkpoint and resumes from
    /// exactly what committed.
    ///
    /// A reorder shows as the head failing its chain guard with the fence
    /// intact; the caller must then call [`Self::resend_window`] before
    /// anything else. The head is re-sent with all its predecessors
    /// committed, so if it fails again, something else wrote the checkpoint.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: the only await is on the head's task, which stays in the
    /// queue until its outcome has been handled.
    pub async fn next_committed(&mut self) -> Result<Acked, JobError> {
        let Some(head) = self.inflight.front_mut() else {
            return std::future::pending().await;
        };
        match Self::outcome(&mut head.task).await? {
            TxnOutcome::Committed(_) => {
                let head = self.inflight.pop_front().expect("head exists");
                if !head.resent {
                    self.send_spacing =
                        (self.send_spacing - self.send_spacing / 32).max(self.min_spacing);
                }
                self.committed_revision = head.through_revision;
                if let Some(book) = self.writer.leases() {
                    book.committed(head.through_revision);
                }
                Ok(Acked::Committed(Committed {
                    revision: head.through_revision,
                    events: head.events,
                }))
            }
            TxnOutcome::GuardFailed(failure)
                if failure.promoted || !failure.lock_held || head.resent =>
            {
                Err(self.writer.explain(&failure, "checkpoint"))
            }
            TxnOutcome::GuardFailed(_) => Ok(Acked::Reordered),
        }
    }

    async fn outcome(
        task: &mut JoinHandle<Result<TxnOutcome, JobError>>,
    ) -> Result<TxnOutcome, JobError> {
        match task.await {
            Ok(outcome) => outcome,
            Err(join_error) => Err(JobError::Internal(format!(
                "destination txn task failed: {join_error}"
            ))),
        }
    }

    /// Re-sends the whole window after the head was reordered. Every txn
    /// behind the head chains on the head's checkpoint bytes, so they all
    /// fail too; once they have, all are re-sent unchanged, in order and
    /// spaced, before anything new goes out.
    ///
    /// # Cancel-Safety
    /// Not cancel-safe: tasks already awaited are only replaced at the end.
    /// Call it outside `select!`; dropping it mid-way is only fine when the
    /// whole pipeline is dropped with it.
    pub async fn resend_window(&mut self) -> Result<(), JobError> {
        self.writer.metrics().txn_reorders_total.inc();
        self.send_spacing =
            (self.send_spacing * 2).clamp(Duration::from_millis(1), MAX_SEND_SPACING);
        for behind in self.inflight.iter_mut().skip(1) {
            if let TxnOutcome::Committed(_) = Self::outcome(&mut behind.task).await? {
                // Impossible unless the chain was broken by a foreign write.
                return Err(JobError::GuardMoved { what: "checkpoint" });
            }
        }
        for index in 0..self.inflight.len() {
            if index > 0 {
                tokio::time::sleep(self.send_spacing).await;
            }
            let entry = &self.inflight[index];
            let task = self.spawn_commit(
                entry.guards.clone(),
                entry.mutations.clone(),
                entry.tail.clone(),
                entry.state_revision,
            );
            let entry = &mut self.inflight[index];
            entry.task = task;
            // Only the head is re-sent with every predecessor committed.
            entry.resent = index == 0;
        }
        self.last_send = Instant::now();
        Ok(())
    }

    /// Lets every txn in flight finish, for a clean shutdown.
    pub async fn drain(&mut self) -> Result<Vec<Committed>, JobError> {
        let mut done = Vec::new();
        while !self.inflight.is_empty() {
            match self.next_committed().await? {
                Acked::Committed(committed) => done.push(committed),
                Acked::Reordered => self.resend_window().await?,
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_writer(interval: Duration, retention: Duration, max_ops: usize) -> RevisionMapWriter {
        RevisionMapWriter {
            interval,
            retention,
            max_ops,
            last_sample: None,
            written: VecDeque::new(),
        }
    }

    fn sampled(ops: &[Op], keys: &MetaKeys) -> Option<i64> {
        ops.iter().find_map(|op| match op {
            Op::Put { key, .. } => keys.revision_of_sample(key),
            _ => None,
        })
    }

    fn pruned_below(ops: &[Op], keys: &MetaKeys) -> Option<i64> {
        ops.iter().find_map(|op| match op {
            Op::Delete { key, range_end } => {
                assert_eq!(key, keys.revision_map().as_bytes(), "from the first sample");
                keys.revision_of_sample(range_end)
            }
            _ => None,
        })
    }

    /// One sample per interval, none for a half-applied revision or a txn
    /// without room for it, and samples past the retention deleted up to
    /// the newest expired one, never the new sample.
    #[tokio::test(start_paused = true)]
    async fn the_revision_map_samples_each_interval_and_prunes_past_the_retention() {
        let keys = MetaKeys::new("/m/", "job");
        let mut map = map_writer(Duration::from_secs(10), Duration::from_secs(25), 8);
        assert_eq!(sampled(&map.ops(&keys, 5, true, 1), &keys), None, "partial");
        assert_eq!(
            sampled(&map.ops(&keys, 5, false, 7), &keys),
            None,
            "no room for 2 more ops"
        );
        let first = map.ops(&keys, 5, false, 6);
        assert_eq!((sampled(&first, &keys), first.len()), (Some(5), 1));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(map.ops(&keys, 6, false, 1).is_empty(), "not due yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(sampled(&map.ops(&keys, 7, false, 1), &keys), Some(7));
        tokio::time::advance(Duration::from_secs(10)).await;
        let third = map.ops(&keys, 9, false, 1);
        assert_eq!(
            (sampled(&third, &keys), pruned_below(&third, &keys)),
            (Some(9), None)
        );
        // At 30 s only the sample taken at 0 s (revision 5) is older than 25 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        let fourth = map.ops(&keys, 12, false, 1);
        assert_eq!(sampled(&fourth, &keys), Some(12));
        assert_eq!(
            pruned_below(&fourth, &keys),
            Some(6),
            "deletes samples up to 5"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        let fifth = map.ops(&keys, 20, false, 1);
        assert_eq!(
            pruned_below(&fifth, &keys),
            Some(13),
            "up to 12, the newest expired"
        );
        // A sample exactly as old as the retention is past it.
        let mut edge = map_writer(Duration::from_secs(5), Duration::from_secs(10), 8);
        edge.ops(&keys, 1, false, 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pruned_below(&edge.ops(&keys, 2, false, 1), &keys), Some(2));
        let off = map_writer(Duration::ZERO, Duration::from_secs(1), 8).ops(&keys, 5, false, 1);
        assert!(off.is_empty(), "an interval of zero turns sampling off");
    }
}
