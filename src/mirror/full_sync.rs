//! The slow path: make the destination prefix equal to the source prefix at
//! one pinned revision, writing only the differences.
//!
//! 1. Pin revision R and write the full-sync marker (dropping the checkpoint:
//!    mid-sync the destination matches no single source revision).
//! 2. Pass one walks both prefixes side by side, puts what is missing or
//!    different, and only counts (and remembers, within a byte budget) what
//!    would be deleted.
//! 3. If the deletions stay within `--max-prune-ratio`, they are deleted:
//!    the remembered keys directly, or, when there were too many to
//!    remember, by a second walk of both prefixes; otherwise nothing is
//!    deleted and the job reports the guard.
//! 4. One last txn writes the checkpoint R and removes the marker.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::api::{Op, RangeRequest};
use crate::etcd::pager::{
    next_page, spawn_keys_pager, Merged, MergedPages, PagedRead, PagerTotals, Skipped,
};
use crate::mirror::context::JobContext;
use crate::mirror::error::{JobError, SlowPathReason};
use crate::mirror::leases::LeaseBook;
use crate::mirror::meta::{Checkpoint, FullSyncMarker, JobMeta, KeyGuard};
use crate::mirror::writer::{TxnOutcome, UnorderedWrites, WriteTrace};
use crate::model::batch::Mutation;
use crate::model::diff::{LeaseRule, SortedMerge};
use crate::model::keys::key_successor;
use crate::model::lease_book::Want;
use crate::model::schema::{prune_allowance, EventStamp, LeftBehind, PruneBlock};
use crate::model::Side;
use crate::telemetry::clock::now_rfc3339;

/// Where the destination stands once a full sync has committed.
#[derive(Debug, Clone)]
pub struct Synced {
    pub checkpoint: Checkpoint,
    pub checkpoint_bytes: Vec<u8>,
    pub counts: Counts,
}

/// What a full sync read and wrote (logged, and returned to the caller).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Source keys read at the pinned revision.
    pub scanned: u64,
    /// Destination keys read.
    pub dest_keys: u64,
    /// Keys written because they were missing or different.
    pub put: u64,
    pub deleted: u64,
    would_delete: u64,
    /// Keys already equal on both sides: not written.
    pub unchanged: u64,
    /// Destination keys a zk2etcd job holds: neither written nor pruned.
    pub held: u64,
    /// Of `would_delete`, the keys that predate this full sync.
    would_delete_guarded: u64,
    /// Destination keys that predate this full sync and are still there.
    guarded_present: u64,
    /// Destination keys created at or before this revision predate the full sync.
    baseline_revision: i64,
    /// Of `deleted`, the keys that predate this full sync (pass two).
    guarded_deleted: u64,
    /// The mirrored source key at R modified last (its mod revision, key
    /// and value): the checkpoint's last event, which a resume proves.
    newest: Option<(i64, Vec<u8>, Vec<u8>)>,
}

/// Where a full sync's time went, over both passes (logged with "Full sync
/// finished."): the merge task either waits for a source page, a
/// destination page or a free write slot, or works (diff and txn
/// building). The pagers' own read times and the writes' summed latencies
/// say whether a side, or the destination's apply, is the bottleneck.
/// Wall clock throughout: a measurement, never a deadline.
#[derive(Debug, Default, Clone, Copy)]
struct Trace {
    wall: Duration,
    source_wait: Duration,
    dest_wait: Duration,
    source: PagerTotals,
    dest: PagerTotals,
    writes: WriteTrace,
}

impl Trace {
    fn add(&mut self, pass: &Trace) {
        self.wall += pass.wall;
        self.source_wait += pass.source_wait;
        self.dest_wait += pass.dest_wait;
        for (total, pass) in [
            (&mut self.source, &pass.source),
            (&mut self.dest, &pass.dest),
        ] {
            total.pages += pass.pages;
            total.keys += pass.keys;
            total.bytes += pass.bytes;
            total.read_time += pass.read_time;
        }
        self.writes.txns += pass.writes.txns;
        self.writes.txn_time += pass.writes.txn_time;
        self.writes.slot_wait += pass.writes.slot_wait;
    }

    /// The merge task's own work: what it did not spend waiting.
    fn merge_work(&self) -> Duration {
        self.wall
            .saturating_sub(self.source_wait + self.dest_wait + self.writes.slot_wait)
    }

    /// Little's law: summed txn latency over wall time.
    fn mean_inflight(&self) -> f64 {
        self.writes.txn_time.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

pub async fn run(
    ctx: &JobContext,
    meta: &JobMeta,
    reason: &SlowPathReason,
    cancel: &CancellationToken,
) -> Result<Synced, JobError> {
    let started = Instant::now();
    // An interrupted or refused full sync hands its guard state on, when
    // it was for the same prefixes: its baseline counts another prefix.
    let prefixes = (
        String::from_utf8_lossy(ctx.rewrite.source_prefix()).into_owned(),
        String::from_utf8_lossy(ctx.rewrite.dest_prefix()).into_owned(),
    );
    let inherited = meta
        .full_sync
        .clone()
        .filter(|m| m.prefixes.as_ref().is_none_or(|p| *p == prefixes));
    if meta.full_sync.is_some() && inherited.is_none() {
        info!(job = %ctx.job.name, "The interrupted full sync was for other prefixes: its mass-delete baseline and decision do not apply; this one counts its own.");
    }
    if let Some(block) = inherited.as_ref().and_then(|m| m.prune_blocked.as_ref()) {
        // The decision stands until an operator overrides it: a higher
        // --max-prune-ratio, or an explicit reset. Until then nothing is
        // re-scanned.
        if !block.overridden_by(ctx.max_prune_ratio, *reason == SlowPathReason::Reset) {
            return Err(JobError::PruneGuard {
                would_delete: block.would_delete,
                dest_keys: block.baseline_dest_keys,
                max_prune_ratio: ctx.max_prune_ratio,
            });
        }
        info!(job = %ctx.job.name, previous_ratio = block.max_prune_ratio, max_prune_ratio = ctx.max_prune_ratio, %reason, "Mass-delete guard overridden by the operator; scanning again.");
    }
    let head = ctx.source.head(ctx.rewrite.source_prefix()).await?;
    let pinned_rev = head.revision;
    if let Some(book) = ctx.leases() {
        // The copy pass observes every source key again.
        book.forget_keys();
    }
    ctx.metrics
        .set_progress(ctx.metrics.last_synced_revision.get(), pinned_rev);
    let mut marker = FullSyncMarker {
        id: ctx.ids.next(),
        pinned_rev,
        source_cluster_id: head.cluster_id,
        started_at: now_rfc3339(),
        instance: ctx.instance_id.clone(),
        reason: reason.to_string(),
        baseline_dest_keys: inherited.as_ref().and_then(|m| m.baseline_dest_keys),
        baseline_revision: inherited.as_ref().and_then(|m| m.baseline_revision),
        prune_blocked: None,
        prefixes: Some(prefixes),
    };
    let pinned_fingerprint = source_fingerprint(ctx, (pinned_rev, head.cluster_id)).await?;
    let mut marker_guard = begin(ctx, meta, &mut marker).await?;
    info!(job = %ctx.job.name, pinned_revision = pinned_rev, %reason, baseline_dest_keys = marker.baseline_dest_keys, "Full sync started.");

    let mut counts = Counts {
        baseline_revision: marker.baseline_revision.unwrap_or(i64::MAX),
        ..Counts::default()
    };
    let mut trace = Trace::default();
    let mut pending = PendingDeletes::with_budget(ctx.tuning.full_sync_delete_memory);
    merge_pass(
        ctx,
        (pinned_rev, head.cluster_id),
        &marker_guard,
        Pass::PutsOnly(&mut pending),
        &mut counts,
        &mut trace,
        cancel,
    )
    .await?;

    if counts.would_delete > 0 {
        let baseline = marker.baseline_dest_keys.unwrap_or(counts.dest_keys);
        // Keys of the baseline that are gone were deleted by earlier attempts.
        let already_deleted = baseline.saturating_sub(counts.guarded_present);
        let allowance = prune_allowance(baseline, ctx.max_prune_ratio, already_deleted);
        // Only keys the destination held before this full sync count: the
        // ones an earlier attempt put (the source has since dropped them)
        // were never the destination's own data.
        if counts.would_delete_guarded > allowance {
            marker.prune_blocked = Some(PruneBlock {
                would_delete: counts.would_delete_guarded,
                baseline_dest_keys: baseline,
                max_prune_ratio: ctx.max_prune_ratio,
                at: now_rfc3339(),
            });
            update_marker(ctx, &mut marker_guard, &marker).await?;
            ctx.metrics.full_sync_in_progress.set(0);
            return Err(JobError::PruneGuard {
                would_delete: counts.would_delete_guarded,
                dest_keys: baseline,
                max_prune_ratio: ctx.max_prune_ratio,
            });
        }
        // Delete what pass one counted. While the source's history at R is
        // the same, a second walk cannot find more keys that predate the
        // sync (those only go away, or come back with a new create
        // revision); a source rebuilt under us could, so check before and
        // count during.
        if source_fingerprint(ctx, (pinned_rev, head.cluster_id)).await? != pinned_fingerprint {
            return Err(JobError::SourceChanged {
                pinned_rev,
                what:
                    "the key count or first key at the pinned revision changed before the deletions",
            });
        }
        match pending.into_complete() {
            // Only this leader writes the destination prefix (every write
            // carries the marker guard) and pass one's puts are all source
            // keys: the remembered keys are exactly what a second walk
            // would find to delete.
            Some(remembered) => {
                delete_remembered(
                    ctx,
                    pinned_rev,
                    &marker_guard,
                    remembered,
                    &mut counts,
                    &mut trace,
                    cancel,
                )
                .await?
            }
            None => {
                merge_pass(
                    ctx,
                    (pinned_rev, head.cluster_id),
                    &marker_guard,
                    Pass::All,
                    &mut counts,
                    &mut trace,
                    cancel,
                )
                .await?
            }
        }
    }

    // Every page was read "at R"; make sure R still means the same history
    // (a source rebuilt with the same cluster id mid-sync has another one,
    // and pages read before and after it mix the two): the same proof a
    // resume makes, against what this sync wrote.
    if source_fingerprint(ctx, (pinned_rev, head.cluster_id)).await? != pinned_fingerprint {
        return Err(JobError::SourceChanged {
            pinned_rev,
            what: "the key count or first key at the pinned revision changed during the full sync",
        });
    }
    let newest = counts
        .newest
        .as_ref()
        .map(|(mod_revision, key, value)| EventStamp::put(key, value, *mod_revision));
    let evidence =
        crate::mirror::resume::read_resume_evidence(ctx, pinned_rev, newest.as_ref(), true, cancel)
            .await?;
    if crate::mirror::resume::verify_resume(pinned_rev, newest.as_ref(), &evidence).is_some() {
        return Err(JobError::SourceChanged {
            pinned_rev,
            what: "the source at the pinned revision is not what the full sync copied",
        });
    }
    // An attempt cancelled meanwhile (a destination lease it wrote keys
    // on was found lost, a step-down) must not claim R: the destination
    // may no longer hold what the passes wrote.
    if cancel.is_cancelled() {
        return Err(JobError::Cancelled);
    }
    // The newest mirrored change at R is "the last event" until the watch
    // applies one: a resume can then tell this history from another.
    let last_event = counts
        .newest
        .as_ref()
        .map(|(mod_revision, key, value)| EventStamp::put(key, value, *mod_revision));
    let mut synced = finish(ctx, &marker_guard, pinned_rev, head.cluster_id, last_event).await?;
    let elapsed = started.elapsed();
    info!(
        job = %ctx.job.name,
        pinned_revision = pinned_rev,
        scanned = counts.scanned,
        put = counts.put,
        deleted = counts.deleted,
        unchanged = counts.unchanged,
        held_by_zk2etcd = counts.held,
        duration = %humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64)),
        keys_per_second = rate(counts.scanned, elapsed),
        merge_ms = ms(trace.wall),
        merge_work_ms = ms(trace.merge_work()),
        source_wait_ms = ms(trace.source_wait),
        dest_wait_ms = ms(trace.dest_wait),
        write_slot_wait_ms = ms(trace.writes.slot_wait),
        source_pages = trace.source.pages,
        source_read_ms = ms(trace.source.read_time),
        source_bytes = trace.source.bytes,
        dest_pages = trace.dest.pages,
        dest_read_ms = ms(trace.dest.read_time),
        dest_bytes = trace.dest.bytes,
        txns = trace.writes.txns,
        txn_latency_mean_ms = trace.writes.txn_time.as_secs_f64() * 1000.0 / trace.writes.txns.max(1) as f64,
        txns_in_flight_mean = trace.mean_inflight(),
        "Full sync finished."
    );
    synced.counts = counts;
    Ok(synced)
}

/// The source prefix at `revision`, cheaply: its key count and its first
/// key (with mod revision and value).
async fn source_fingerprint(
    ctx: &JobContext,
    (revision, cluster_id): (i64, u64),
) -> Result<(i64, Option<EventStamp>), JobError> {
    let first = ctx
        .source
        .range(
            "fingerprint the pinned revision",
            RangeRequest::prefix(ctx.rewrite.source_prefix())
                .at_revision(revision)
                .with_limit(1),
        )
        .await?;
    let answered = first.header.cluster_id;
    if answered != 0 && cluster_id != 0 && answered != cluster_id {
        // Replaced behind the same endpoints since the pin was read.
        return Err(JobError::HistoryDiffers(SlowPathReason::SourceReplaced {
            checkpoint_cluster_id: cluster_id,
            source_cluster_id: answered,
        }));
    }
    // A meta key (a source that is itself a mirror's destination) or an
    // excluded key is never applied, so later changes to it would not update the stamp: skip it.
    let stamp = first
        .kvs
        .first()
        .filter(|kv| {
            !kv.key.starts_with(&ctx.meta_prefix) && !ctx.rewrite.is_excluded_source(&kv.key)
        })
        .map(|kv| EventStamp::put(&kv.key, &kv.value, kv.mod_revision));
    Ok((first.count, stamp))
}

/// Pins the full sync: the marker goes in and the checkpoint goes out in one
/// txn, guarded on the meta we read, so two leaders cannot both start one.
/// The first attempt of a full sync counts the destination keys in the same
/// txn, before anything is written, and records that baseline in the marker.
async fn begin(
    ctx: &JobContext,
    meta: &JobMeta,
    marker: &mut FullSyncMarker,
) -> Result<KeyGuard, JobError> {
    let keys = ctx.writer.keys();
    let guards = vec![
        meta.checkpoint_guard().compare(&keys.checkpoint()),
        meta.full_sync_guard().compare(&keys.full_sync()),
        KeyGuard::of(meta.reset_request.as_deref()).compare(&keys.reset_request()),
    ];
    let dest_prefix = ctx.rewrite.dest_prefix();
    let meta_inside = ctx.meta_prefix.starts_with(dest_prefix);
    let mut ops = vec![Op::Range(RangeRequest::prefix(dest_prefix).count_only())];
    if meta_inside {
        ops.push(Op::Range(
            RangeRequest::prefix(&ctx.meta_prefix).count_only(),
        ));
    }
    // Excluded keys are not the job's: the prune guard's baseline leaves them out.
    let excluded: Vec<Vec<u8>> = ctx.rewrite.excluded_dest_prefixes().collect();
    for prefix in &excluded {
        ops.push(Op::Range(RangeRequest::prefix(prefix).count_only()));
    }
    // The copies under a destination prefix the job no longer mirrors to
    // stay where they are: recorded with the checkpoint that described
    // them (or the interrupted full sync that was writing them), in the
    // txn that drops it, so `status` names them.
    let left = match (&meta.checkpoint, &meta.full_sync) {
        (Some(checkpoint), _) => Some((
            checkpoint.prefix_change(ctx.rewrite.source_prefix(), dest_prefix),
            checkpoint.source_prefix.clone(),
            checkpoint.updated_at.clone(),
            checkpoint.last_synced_rev,
            false,
        )),
        (None, Some(interrupted)) => Some((
            interrupted.prefix_change(ctx.rewrite.source_prefix(), dest_prefix),
            interrupted
                .prefixes
                .as_ref()
                .map_or_else(String::new, |(source, _)| source.clone()),
            interrupted.started_at.clone(),
            interrupted.pinned_rev,
            true,
        )),
        (None, None) => None,
    };
    if let Some((change, source_prefix, last_synced_at, last_synced_rev, partial)) = left {
        // (A prefix inside the new one is the new full sync's to diff.)
        if let Some((was, now)) = change
            .dest
            .filter(|(was, now)| !was.starts_with(now.as_str()))
        {
            warn!(job = %ctx.job.name, old_dest_prefix = %was, dest_prefix = %now, "--dest-prefix changed: the copies under the old prefix stay there (no longer updated); delete them once nothing reads them. `status` lists them.");
            let entry = LeftBehind {
                dest_prefix: was,
                source_prefix,
                last_synced_at,
                last_synced_rev,
                partial,
            };
            ops.push(Op::put(
                keys.left_behind(),
                LeftBehind::append(&meta.left_behind, entry),
            ));
        }
    }
    let marker_bytes = marker.encode();
    ops.extend([
        Op::delete(keys.checkpoint()),
        Op::delete(keys.reset_request()),
        Op::put(keys.full_sync(), marker_bytes.clone()),
    ]);
    let response = match ctx.writer.commit("start full sync", guards, ops).await? {
        TxnOutcome::Committed(response) => response,
        TxnOutcome::GuardFailed(failure) => return Err(ctx.writer.explain(&failure, "job meta")),
    };
    ctx.metrics.full_sync_in_progress.set(1);
    let mut guard = KeyGuard::Holds(marker_bytes);
    if marker.baseline_dest_keys.is_none() {
        let counts: Vec<i64> = response.ranges().map(|r| r.count).collect();
        let in_prefix = counts.first().copied().unwrap_or(0);
        let meta_keys = if meta_inside {
            counts.get(1).copied().unwrap_or(0)
        } else {
            0
        };
        let first_excluded = if meta_inside { 2 } else { 1 };
        let excluded_keys: i64 = counts
            .iter()
            .skip(first_excluded)
            .take(excluded.len())
            .sum();
        marker.baseline_dest_keys = Some((in_prefix - meta_keys - excluded_keys).max(0) as u64);
        marker.baseline_revision = Some(response.header.revision);
        update_marker(ctx, &mut guard, marker).await?;
    }
    Ok(guard)
}

/// Rewrites the marker (guarded on its exact current value) and moves the
/// guard every later full-sync write carries to the new value.
async fn update_marker(
    ctx: &JobContext,
    guard: &mut KeyGuard,
    marker: &FullSyncMarker,
) -> Result<(), JobError> {
    let key = ctx.writer.keys().full_sync();
    let bytes = marker.encode();
    let outcome = ctx
        .writer
        .commit(
            "update full-sync marker",
            vec![guard.compare(&key)],
            vec![Op::put(key.as_bytes(), bytes.clone())],
        )
        .await?;
    match outcome {
        TxnOutcome::Committed(_) => {
            *guard = KeyGuard::Holds(bytes);
            Ok(())
        }
        TxnOutcome::GuardFailed(failure) => Err(ctx.writer.explain(&failure, "full-sync marker")),
    }
}

async fn finish(
    ctx: &JobContext,
    marker_guard: &KeyGuard,
    pinned_rev: i64,
    cluster_id: u64,
    last_event: Option<EventStamp>,
) -> Result<Synced, JobError> {
    let keys = ctx.writer.keys();
    let checkpoint =
        ctx.checkpoint_of()
            .at((pinned_rev, cluster_id), ctx.ids.next(), last_event, None);
    let checkpoint_bytes = checkpoint.encode();
    let mut ops = vec![
        Op::put(keys.checkpoint(), checkpoint_bytes.clone()),
        Op::delete(keys.full_sync()),
    ];
    // The pinned state is a whole source revision: a revision-map sample
    // belongs here too, when the txn has room for it.
    if !ctx.tuning.revision_map_interval.is_zero() && ctx.limits.max_ops >= 3 {
        let sample = crate::model::schema::RevisionSample { at: now_rfc3339() };
        ops.push(Op::put(keys.revision_sample(pinned_rev), sample.encode()));
    }
    match ctx
        .writer
        .commit(
            "finish full sync",
            vec![marker_guard.compare(&keys.full_sync())],
            ops,
        )
        .await?
    {
        TxnOutcome::Committed(_) => {
            ctx.metrics.full_sync_in_progress.set(0);
            Ok(Synced {
                checkpoint,
                checkpoint_bytes,
                counts: Counts::default(),
            })
        }
        TxnOutcome::GuardFailed(failure) => Err(ctx.writer.explain(&failure, "full-sync marker")),
    }
}

enum Pass<'a> {
    /// Put missing and changed keys, count (and remember) the deletions.
    PutsOnly(&'a mut PendingDeletes),
    /// Apply every difference.
    All,
}

impl Pass<'_> {
    fn is_copy(&self) -> bool {
        matches!(self, Pass::PutsOnly(_))
    }
}

/// What one remembered deletion costs beyond its key bytes (the Vec's
/// pointer, length and capacity, and the create revision).
const PENDING_DELETE_OVERHEAD: usize = 32;

/// The destination keys pass one found missing from the source, remembered
/// while they fit the budget (`Tuning::full_sync_delete_memory`), so the
/// deletions need no second walk of both prefixes. Past the budget nothing
/// is kept and the deletions take the second walk, so memory stays bounded
/// however much a destination holds that the source does not.
#[derive(Debug)]
struct PendingDeletes {
    /// Destination key and its create revision, in key order.
    keys: Vec<(Vec<u8>, i64)>,
    bytes: usize,
    budget: usize,
    overflowed: bool,
}

impl PendingDeletes {
    fn with_budget(budget: usize) -> Self {
        Self {
            keys: Vec::new(),
            bytes: 0,
            budget,
            overflowed: false,
        }
    }

    fn remember(&mut self, dest_key: Vec<u8>, create_revision: i64) {
        if self.overflowed {
            return;
        }
        let cost = dest_key.len() + PENDING_DELETE_OVERHEAD;
        if self.bytes + cost > self.budget {
            self.overflowed = true;
            self.keys = Vec::new();
            self.bytes = 0;
            return;
        }
        self.bytes += cost;
        self.keys.push((dest_key, create_revision));
    }

    /// Every key pass one would delete, or None if they did not all fit.
    fn into_complete(self) -> Option<Vec<(Vec<u8>, i64)>> {
        (!self.overflowed).then_some(self.keys)
    }
}

/// Counts one deletion the guard approved, refusing any beyond what it
/// approved among the keys that predate the full sync.
fn count_deletion(
    pinned_rev: i64,
    create_revision: i64,
    counts: &mut Counts,
) -> Result<(), JobError> {
    if create_revision <= counts.baseline_revision {
        if counts.guarded_deleted >= counts.would_delete_guarded {
            return Err(JobError::SourceChanged {
                pinned_rev,
                what: "more keys to delete than the mass-delete guard approved",
            });
        }
        counts.guarded_deleted += 1;
    }
    counts.deleted += 1;
    Ok(())
}

/// Mutations cut into txns within the destination's limits, one op and
/// some bytes kept free for the marker guard.
struct TxnBatcher {
    batch: Vec<Mutation>,
    bytes: usize,
    max_ops: usize,
    max_bytes: usize,
}

impl TxnBatcher {
    fn new(ctx: &JobContext) -> Self {
        let max_ops = ctx.limits.max_ops.saturating_sub(1).max(1);
        Self {
            batch: Vec::with_capacity(max_ops),
            bytes: 0,
            max_ops,
            max_bytes: ctx.limits.max_bytes.saturating_sub(4096).max(1024),
        }
    }

    /// Adds `mutation`; returns the full batch it did not fit in, to send.
    fn push(&mut self, mutation: Mutation) -> Option<Vec<Mutation>> {
        let len = mutation.encoded_len();
        let full = !self.batch.is_empty()
            && (self.batch.len() >= self.max_ops || self.bytes + len > self.max_bytes);
        let sealed = full.then(|| {
            self.bytes = 0;
            std::mem::replace(&mut self.batch, Vec::with_capacity(self.max_ops))
        });
        self.bytes += len;
        self.batch.push(mutation);
        sealed
    }

    /// The last, partly filled batch, if any.
    fn rest(self) -> Option<Vec<Mutation>> {
        (!self.batch.is_empty()).then_some(self.batch)
    }
}

/// Deletes the keys pass one remembered, in key order, with the marker
/// guard on every txn.
///
/// # Cancel-Safety
/// Stops between txns when `cancel` fires; txns already sent either commit
/// (each is a whole set of deletions the guard approved) or fail, and the
/// marker still says a full sync is under way, so the next attempt starts over.
async fn delete_remembered(
    ctx: &JobContext,
    pinned_rev: i64,
    marker_guard: &KeyGuard,
    remembered: Vec<(Vec<u8>, i64)>,
    counts: &mut Counts,
    trace: &mut Trace,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let started = std::time::Instant::now();
    let mut writes = UnorderedWrites::new(
        ctx.writer.clone(),
        pinned_rev,
        marker_guard.clone(),
        ctx.tuning.max_inflight_txns,
    );
    let mut batcher = TxnBatcher::new(ctx);
    for (key, create_revision) in remembered {
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        count_deletion(pinned_rev, create_revision, counts)?;
        ctx.metrics.full_sync_delete.inc();
        if let Some(sealed) = batcher.push(Mutation::Delete { key }) {
            writes.submit(sealed).await?;
        }
    }
    if let Some(rest) = batcher.rest() {
        writes.submit(rest).await?;
    }
    writes.finish().await?;
    trace.add(&Trace {
        wall: started.elapsed(),
        writes: writes.trace(),
        ..Trace::default()
    });
    Ok(())
}

/// Source leases the look-ahead keeps in progress (granted, not yet
/// recorded) ahead of the copy: enough to cover the grant-and-record
/// round trips at the copy's pace, few enough that the book's work per
/// answer stays small.
const LEASE_LOOKAHEAD: usize = 1_024;
/// Keys per page of the look-ahead's keys-only reads.
const LEASE_LOOKAHEAD_PAGE: usize = 2_000;

/// `--leases faithful`: reads the source's keys (not their values) at the
/// pinned revision ahead of the copy (from the first page that has a
/// leased key) and has the book grant and record
/// their leases, at most [`LEASE_LOOKAHEAD`] in progress at once. The
/// copy's txns then find their leases ready instead of each waiting for a
/// probe, a grant and a record (which made a leased full sync 5× slower
/// than `--leases strip`). Only an optimisation: a read error ends it, and
/// the copy resolves whatever it did not reach; every lease is still
/// recorded before a key is attached to it.
///
/// # Cancel-Safety
/// Its own task, until `cancel` (the pass's end); what it started
/// completes in the book.
async fn lease_lookahead(
    book: Arc<LeaseBook>,
    mut pages: tokio::sync::mpsc::Receiver<crate::etcd::pager::PageResult>,
    pinned_rev: i64,
    cancel: CancellationToken,
) {
    loop {
        let page = match next_page(&mut pages, &cancel).await {
            Ok(Some(page)) => page,
            Ok(None) | Err(_) => return,
        };
        let leases: BTreeSet<i64> = page.iter().map(|e| e.lease).filter(|l| *l != 0).collect();
        book.prefetch(
            leases
                .into_iter()
                .map(|lease| Want {
                    lease,
                    at: pinned_rev,
                })
                .collect(),
        );
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = book.prefetch_room(LEASE_LOOKAHEAD) => {}
        }
    }
}

async fn merge_pass(
    ctx: &JobContext,
    (pinned_rev, pinned_cluster): (i64, u64),
    marker_guard: &KeyGuard,
    mut pass: Pass<'_>,
    counts: &mut Counts,
    trace: &mut Trace,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let mut pass_trace = Trace::default();
    let pass_started = std::time::Instant::now();
    // The destination read marks the keys a zk2etcd job holds there.
    let skipped = |mark_held| Skipped {
        meta_prefix: ctx.meta_prefix.clone(),
        rewrite: ctx.rewrite.clone(),
        mark_held,
    };
    let mut source_read = PagedRead::new(
        &ctx.source,
        ctx.rewrite.source_prefix(),
        Some(pinned_rev),
        skipped(false),
    );
    source_read.pin.1 = Some(pinned_cluster);
    let dest_read = PagedRead::new(&ctx.dest, ctx.rewrite.dest_prefix(), None, skipped(true));
    let (source_stats, dest_stats) = (source_read.stats.clone(), dest_read.stats.clone());
    // Ends with the pass, however it ends. Started at the first source page
    // with a leased key, from the key after that page: a prefix without
    // leases costs no second read.
    let lookahead = cancel.child_token();
    let _stop_lookahead = lookahead.clone().drop_guard();
    let mut lookahead_started = false;
    let mut writes = UnorderedWrites::new(
        ctx.writer.clone(),
        pinned_rev,
        marker_guard.clone(),
        ctx.tuning.max_inflight_txns,
    );
    let mut batcher = TxnBatcher::new(ctx);
    let merge = match ctx.leases() {
        // A key is where it belongs when it sits on the lease its source
        // lease's key would be attached to now, for the source at R.
        Some(book) => {
            let book = book.clone();
            SortedMerge::with_leases(LeaseRule::Mapped(Box::new(move |lease| {
                book.target(Want {
                    lease,
                    at: pinned_rev,
                })
            })))
        }
        // `--leases strip`: every destination key on no lease, so keys a
        // faithful run left on (now unrenewed) leases are rewritten.
        None => SortedMerge::with_leases(LeaseRule::Unleased),
    };
    // Dropping it stops both pagers however this pass ends.
    let mut merged = MergedPages::start(
        &ctx.job.name,
        source_read,
        dest_read,
        ctx.tuning.page_size,
        merge,
        cancel,
    );
    let started = Instant::now();
    let mut last_log = Instant::now();

    loop {
        let copy = pass.is_copy();
        let next = merged
            .next(cancel, |side, page| match side {
                Side::Source => {
                    if copy {
                        counts.scanned += page.len() as u64;
                        for entry in page {
                            if counts
                                .newest
                                .as_ref()
                                .is_none_or(|(m, _, _)| entry.mod_revision > *m)
                            {
                                counts.newest = Some((
                                    entry.mod_revision,
                                    ctx.rewrite.suffix_to_source(&entry.suffix),
                                    entry.value.clone(),
                                ));
                            }
                        }
                        if let Some(book) = ctx.leases() {
                            for entry in page {
                                book.observe_key(&entry.suffix, Some(entry.lease));
                            }
                            if !lookahead_started && page.iter().any(|e| e.lease != 0) {
                                lookahead_started = true;
                                let last = &page.last().expect("a leased key").suffix;
                                let keys = spawn_keys_pager(
                                    ctx.job.name.clone(),
                                    ctx.source.clone(),
                                    ctx.rewrite.source_prefix().to_vec(),
                                    key_successor(&ctx.rewrite.suffix_to_source(last)),
                                    pinned_rev,
                                    LEASE_LOOKAHEAD_PAGE,
                                    skipped(false),
                                    lookahead.clone(),
                                );
                                tokio::spawn(lease_lookahead(
                                    book.clone(),
                                    keys,
                                    pinned_rev,
                                    lookahead.clone(),
                                ));
                            }
                        }
                    }
                    ctx.heartbeat();
                }
                Side::Destination => {
                    // Keys another writer holds are not the job's: the
                    // mass-delete guard counts without them.
                    if copy {
                        counts.dest_keys += page.iter().filter(|e| !e.held).count() as u64;
                        counts.guarded_present += page
                            .iter()
                            .filter(|e| !e.held && e.create_revision <= counts.baseline_revision)
                            .count() as u64;
                    }
                }
            })
            .await
            .map_err(|e| e.error)?;
        let mutation = match next {
            None => break,
            Some(Merged::Same) => {
                if pass.is_copy() {
                    counts.unchanged += 1;
                    ctx.metrics.full_sync_unchanged.inc();
                }
                None
            }
            Some(Merged::Held(_)) => {
                if pass.is_copy() {
                    counts.held += 1;
                }
                None
            }
            Some(Merged::Differ(difference)) => match difference.into_put() {
                Ok((suffix, value, lease)) => {
                    counts.put += 1;
                    ctx.metrics.full_sync_put.inc();
                    Some(Mutation::Put {
                        key: ctx.rewrite.suffix_to_dest(&suffix),
                        value,
                        lease,
                    })
                }
                Err((suffix, create_revision)) => match &mut pass {
                    Pass::PutsOnly(pending) => {
                        counts.would_delete += 1;
                        if create_revision <= counts.baseline_revision {
                            counts.would_delete_guarded += 1;
                        }
                        pending.remember(ctx.rewrite.suffix_to_dest(&suffix), create_revision);
                        None
                    }
                    Pass::All => {
                        count_deletion(pinned_rev, create_revision, counts)?;
                        ctx.metrics.full_sync_delete.inc();
                        Some(Mutation::Delete {
                            key: ctx.rewrite.suffix_to_dest(&suffix),
                        })
                    }
                },
            },
        };
        if let Some(sealed) = mutation.and_then(|m| batcher.push(m)) {
            writes.submit(sealed).await?;
        }
        if last_log.elapsed() >= ctx.tuning.progress_log_interval {
            last_log = Instant::now();
            info!(
                job = %ctx.job.name,
                pass = if pass.is_copy() { "copy" } else { "prune" },
                scanned = counts.scanned,
                put = counts.put,
                deleted = counts.deleted,
                pending_deletes = counts.would_delete,
                unchanged = counts.unchanged,
                keys_per_second = rate(counts.scanned, started.elapsed()),
                "Full sync in progress."
            );
        }
    }
    if let Some(rest) = batcher.rest() {
        writes.submit(rest).await?;
    }
    writes.finish().await?;
    pass_trace.source_wait = merged.source_wait;
    pass_trace.dest_wait = merged.dest_wait;
    pass_trace.wall = pass_started.elapsed();
    pass_trace.source = source_stats.totals();
    pass_trace.dest = dest_stats.totals();
    pass_trace.writes = writes.trace();
    trace.add(&pass_trace);
    Ok(())
}

fn rate(count: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (count as f64 / seconds) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard's approval is a hard limit on deletions of keys that
    /// predate the full sync; keys created since are not counted against it.
    #[test]
    fn deletions_beyond_the_guard_s_approval_are_refused() {
        let mut counts = Counts {
            baseline_revision: 10,
            would_delete_guarded: 2,
            ..Counts::default()
        };
        count_deletion(20, 9, &mut counts).unwrap();
        count_deletion(20, 11, &mut counts).unwrap();
        count_deletion(20, 10, &mut counts).unwrap();
        assert_eq!((counts.guarded_deleted, counts.deleted), (2, 3));
        let refused = count_deletion(20, 3, &mut counts);
        assert!(
            matches!(refused, Err(JobError::SourceChanged { pinned_rev: 20, .. })),
            "{refused:?}"
        );
        assert_eq!((counts.guarded_deleted, counts.deleted), (2, 3));
        // A key created after the baseline is still deleted.
        count_deletion(20, 12, &mut counts).unwrap();
        assert_eq!(counts.deleted, 4);
    }

    /// Keys are remembered up to the budget exactly; one byte past it and
    /// nothing is kept, so the deletions take the second walk.
    #[test]
    fn pending_deletes_fill_the_budget_exactly_then_give_up() {
        let cost = |key: &[u8]| key.len() + PENDING_DELETE_OVERHEAD;
        let budget = cost(b"a") + cost(b"bb");
        let mut pending = PendingDeletes::with_budget(budget);
        pending.remember(b"a".to_vec(), 1);
        pending.remember(b"bb".to_vec(), 2);
        assert_eq!(
            pending.into_complete(),
            Some(vec![(b"a".to_vec(), 1), (b"bb".to_vec(), 2)])
        );

        let mut pending = PendingDeletes::with_budget(budget - 1);
        pending.remember(b"a".to_vec(), 1);
        pending.remember(b"bb".to_vec(), 2);
        assert_eq!(pending.into_complete(), None);

        // Once over, later keys that would fit are not taken either: the
        // list must be all of them or nothing.
        let mut pending = PendingDeletes::with_budget(cost(b"a"));
        pending.remember(b"bb".to_vec(), 2);
        pending.remember(b"a".to_vec(), 1);
        assert_eq!(pending.into_complete(), None);
    }
}
