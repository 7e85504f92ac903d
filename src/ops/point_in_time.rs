//! `promote --at-source-revision` / `--at-time`: promote the standby to the
//! job's state at an earlier source revision, read from the destination's
//! own MVCC history, to undo a replicated mistake (a mass delete on the
//! primary that the watch already applied).
//!
//! Every state a checkpoint txn wrote equals the source prefix at that
//! checkpoint, and the checkpoint never decreases along the destination's
//! history, so the newest state whose checkpoint is at or before the request
//! is found by a binary search over destination revisions.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::etcd::api::{Compare, CompareOp, Op, RangeRequest, TxnRequest};
use crate::etcd::client::{ClientError, Cluster};
use crate::etcd::meta::first_readable;
use crate::etcd::pager::{Merged, MergedPages, PagedRead};
use crate::mirror::meta::Checkpoint;
use crate::model::diff::SortedMerge;
use crate::model::keys::MetaKeys;
use crate::model::schema::{PointInTime, PromotionRecord};
use crate::model::Side;
use crate::ops::admin::{
    collect_status, guarded_chunk, promote, AdminError, GuardedWrite, PromoteOutcome,
    RevisionPoint, DETACH_OPS_PER_TXN,
};

/// Bytes of keys and values per restore txn, well under etcd's default
/// `--max-request-bytes` (1.5 MiB).
const RESTORE_BYTES_PER_TXN: usize = 1 << 20;

/// What the operator asked to go back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointTarget {
    SourceRevision(i64),
    /// A time, with the text it was given as.
    Time(SystemTime, String),
}

impl PointTarget {
    pub fn requested(&self) -> String {
        match self {
            PointTarget::SourceRevision(revision) => format!("source revision {revision}"),
            PointTarget::Time(_, text) => format!("time {text}"),
        }
    }

    /// Whether a state with this checkpoint is at or before the target.
    /// An unreadable `updated_at` counts as after it (never restored to).
    fn admits(&self, checkpoint: &Checkpoint) -> bool {
        match self {
            PointTarget::SourceRevision(revision) => checkpoint.last_synced_rev <= *revision,
            PointTarget::Time(at, _) => humantime::parse_rfc3339_weak(&checkpoint.updated_at)
                .is_ok_and(|updated| updated <= *at),
        }
    }
}

/// The state a point-in-time promotion restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundPoint {
    pub checkpoint: Checkpoint,
    /// The revision of the checkpoint txn that wrote the state.
    pub dest_revision: i64,
    /// The oldest destination revision still readable.
    pub oldest_readable: i64,
}

/// The job's checkpoint as the destination held it at `revision`, with the
/// revision of the txn that wrote it.
async fn checkpoint_at(
    dest: &Cluster,
    keys: &MetaKeys,
    revision: i64,
) -> Result<Option<(Checkpoint, i64)>, ClientError> {
    let response = dest
        .range(
            "read the checkpoint in the destination's history",
            RangeRequest::key(keys.checkpoint()).at_revision(revision),
        )
        .await?;
    Ok(response.kvs.first().and_then(|kv| {
        serde_json::from_slice::<Checkpoint>(&kv.value)
            .ok()
            .map(|checkpoint| (checkpoint, kv.mod_revision))
    }))
}

/// The oldest readable destination revision in `[1, high]` (readability
/// only grows with the revision): about log2(high) probes.
async fn oldest_readable(dest: &Cluster, probe: &str, high: i64) -> Result<i64, AdminError> {
    // Candidates 1 ..= high - 1 (index i is revision i + 1); none readable
    // leaves `high` itself.
    let below = usize::try_from(high.max(1) - 1).unwrap_or(0);
    let first = first_readable(dest, probe, below, |i| i as i64 + 1).await?;
    Ok(first as i64 + 1)
}

/// Guards the walk back over full syncs (each step goes to an earlier
/// full sync; more than a few in the readable history is not expected).
const MAX_FULL_SYNCS_BACK: usize = 64;

/// The state in effect at destination revision `revision`: the checkpoint
/// the destination held then, with the revision of the txn that wrote it.
/// A full sync deletes the checkpoint in the txn that puts its marker and
/// writes one back only when it finishes: between the two the data is
/// half copied and matches no source revision, so the state in effect is
/// the last checkpoint before the marker was created (at its create
/// revision minus one). `None` before the first checkpoint, or when that
/// state is compacted away (older than `oldest`).
async fn state_at(
    dest: &Cluster,
    keys: &MetaKeys,
    revision: i64,
    oldest: i64,
) -> Result<Option<(Checkpoint, i64)>, ClientError> {
    let mut at = revision;
    for _ in 0..MAX_FULL_SYNCS_BACK {
        if let Some(found) = checkpoint_at(dest, keys, at).await? {
            return Ok(Some(found));
        }
        let marker = dest
            .range(
                "read the full-sync marker in the destination's history",
                RangeRequest::key(keys.full_sync()).at_revision(at),
            )
            .await?;
        match marker.kvs.first() {
            Some(kv) if kv.create_revision > oldest && kv.create_revision <= at => {
                at = kv.create_revision - 1;
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Finds the newest destination state at or before `target` among the
/// destination revisions up to `newest` (the promotion's base revision),
/// or says how far back the history reaches. A source revision the
/// standby never reached is refused: what the source held there is not
/// known here.
///
/// `samples` (the revision map) narrow the search: a sample's destination
/// revision holds exactly its source revision.
pub async fn find_point(
    dest: &Cluster,
    keys: &MetaKeys,
    job: &str,
    target: &PointTarget,
    samples: &[RevisionPoint],
    newest: i64,
) -> Result<FoundPoint, AdminError> {
    let probe = keys.checkpoint();
    let oldest = oldest_readable(dest, &probe, newest).await?;
    let outside = |reachable: String| AdminError::OutsideWindow {
        job: job.to_string(),
        requested: target.requested(),
        reachable,
    };
    if let PointTarget::SourceRevision(revision) = target {
        let reached = state_at(dest, keys, newest, oldest)
            .await?
            .map_or(0, |(checkpoint, _)| checkpoint.last_synced_rev);
        if reached < *revision {
            return Err(AdminError::NotReached {
                job: job.to_string(),
                requested: *revision,
                reached,
            });
        }
    }
    let (mut low, mut high) = (oldest, newest);
    if let PointTarget::SourceRevision(revision) = target {
        for sample in samples
            .iter()
            .filter(|s| (oldest..=newest).contains(&s.dest_revision))
        {
            if sample.source_revision <= *revision {
                low = low.max(sample.dest_revision);
            } else {
                high = high.min(sample.dest_revision - 1);
            }
        }
    }
    // No checkpoint yet counts as "before": it precedes every checkpoint.
    let admitted = |found: &Option<(Checkpoint, i64)>| {
        found
            .as_ref()
            .is_none_or(|(checkpoint, _)| target.admits(checkpoint))
    };
    let at_low = state_at(dest, keys, low, oldest).await?;
    if !admitted(&at_low) || high < low {
        return Err(outside(oldest_reachable(dest, keys, oldest, newest).await?));
    }
    // The largest admitted revision in [low, high].
    while low < high {
        let mid = low + (high - low + 1) / 2;
        if admitted(&state_at(dest, keys, mid, oldest).await?) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    // A state mid-way through a revision too large for one txn matches no
    // source revision: step back to the checkpoint txn before it.
    let mut at = low;
    loop {
        match state_at(dest, keys, at, oldest).await? {
            Some((checkpoint, written)) if written >= oldest => {
                if checkpoint.partial_revision.is_none() {
                    return Ok(FoundPoint {
                        checkpoint,
                        dest_revision: written,
                        oldest_readable: oldest,
                    });
                }
                at = written - 1;
            }
            _ => return Err(outside(oldest_reachable(dest, keys, oldest, newest).await?)),
        }
        if at < oldest {
            return Err(outside(oldest_reachable(dest, keys, oldest, newest).await?));
        }
    }
}

/// The oldest checkpoint txn the history still holds, for the refusal:
/// the checkpoint at `oldest` if its txn is that revision, else the first
/// checkpoint written after it.
async fn oldest_reachable(
    dest: &Cluster,
    keys: &MetaKeys,
    oldest: i64,
    newest: i64,
) -> Result<String, AdminError> {
    let first = checkpoint_at(dest, keys, oldest).await?;
    let describe = |checkpoint: &Checkpoint, revision: i64| {
        format!(
            "source revision {} ({}, destination revision {revision})",
            checkpoint.last_synced_rev, checkpoint.updated_at
        )
    };
    if let Some((checkpoint, written)) = &first {
        if *written >= oldest {
            return Ok(describe(checkpoint, *written));
        }
    }
    let before = first.map(|(c, _)| c.last_synced_rev);
    let changed = |found: &Option<(Checkpoint, i64)>| {
        found
            .as_ref()
            .is_some_and(|(c, _)| before.is_none_or(|b| c.last_synced_rev > b))
    };
    let (mut low, mut high) = (oldest + 1, newest);
    if low > high || !changed(&checkpoint_at(dest, keys, high).await?) {
        return Ok(format!(
            "none: no checkpoint txn is left in the readable history (destination revisions {oldest}..{newest})"
        ));
    }
    while low < high {
        let mid = low + (high - low) / 2;
        if changed(&checkpoint_at(dest, keys, mid).await?) {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    match checkpoint_at(dest, keys, low).await? {
        Some((checkpoint, written)) => Ok(describe(&checkpoint, written)),
        None => Ok("none".to_string()),
    }
}

/// What the restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RestoreCounts {
    pub puts: u64,
    pub deletes: u64,
    pub skipped: u64,
    pub leases_dropped: u64,
}

/// Writes back the differences between the job's destination prefix at
/// `read_revision` and now: puts for keys changed or deleted since, deletes
/// for keys created since. Each write is guarded by the promoted marker and
/// the key's mod revision as read now, so a client's write since wins.
pub async fn restore(
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
    dest_prefix: &str,
    read_revision: i64,
    page_size: usize,
    cancel: &CancellationToken,
) -> Result<RestoreCounts, AdminError> {
    let keys = &MetaKeys::new(meta_prefix, job);
    let read = |revision| {
        PagedRead::new(
            dest,
            dest_prefix.as_bytes(),
            revision,
            // The whole destination prefix goes back: `promote` has no job
            // config, so `exclude-prefixes` ranges are restored too.
            crate::etcd::pager::Skipped {
                meta_prefix: meta_prefix.as_bytes().to_vec(),
                rewrite: crate::model::keys::KeyRewrite::new(dest_prefix, dest_prefix),
                mark_held: false,
            },
        )
    };
    // Then is what the prefix must become (the merge's source), now is
    // what it holds.
    let mut merged = MergedPages::start(
        job,
        read(Some(read_revision)),
        read(None),
        page_size,
        SortedMerge::new(),
        cancel,
    );
    // The current page's mod revisions, for the guards; the merge asks for
    // a page only once it consumed the previous one, so a page bounds it.
    let mut current: VecDeque<(Vec<u8>, i64)> = VecDeque::new();
    let mut lease_alive: HashMap<i64, bool> = HashMap::new();
    let mut leases_dropped = 0;
    let mut puts = Batch::new(dest, keys, job);
    let mut deletes = Batch::new(dest, keys, job);
    let key_of = |suffix: &[u8]| [dest_prefix.as_bytes(), suffix].concat();
    loop {
        let next = merged
            .next(cancel, |side, page| {
                if side == Side::Destination && !page.is_empty() {
                    current.clear();
                    current.extend(page.iter().map(|e| (e.suffix.clone(), e.mod_revision)));
                }
            })
            .await
            .map_err(|e| e.error)?;
        match next {
            None => break,
            // These reads mark nothing held.
            Some(Merged::Same | Merged::Held(_)) => {}
            Some(Merged::Differ(difference)) => match difference.into_put() {
                Err((suffix, _)) => {
                    let key = key_of(&suffix);
                    deletes
                        .push(GuardedWrite {
                            read_mod_revision: mod_revision_now(&mut current, &suffix),
                            op: Op::delete(key.clone()),
                            key,
                        })
                        .await?;
                }
                Ok((suffix, value, lease)) => {
                    let lease = if lease == 0 {
                        0
                    } else {
                        let alive = match lease_alive.get(&lease) {
                            Some(alive) => *alive,
                            None => {
                                let alive = dest.lease_time_to_live(lease).await?.is_some();
                                lease_alive.insert(lease, alive);
                                alive
                            }
                        };
                        if alive {
                            lease
                        } else {
                            leases_dropped += 1;
                            0
                        }
                    };
                    let key = key_of(&suffix);
                    puts.push(GuardedWrite {
                        read_mod_revision: mod_revision_now(&mut current, &suffix),
                        op: Op::put_with_lease(key.clone(), value, lease),
                        key,
                    })
                    .await?;
                }
            },
        }
    }
    puts.flush().await?;
    deletes.flush().await?;
    Ok(RestoreCounts {
        puts: puts.applied,
        deletes: deletes.applied,
        skipped: puts.skipped + deletes.skipped,
        leases_dropped,
    })
}

/// The mod revision `suffix` has now (0: absent), from the current page.
fn mod_revision_now(current: &mut VecDeque<(Vec<u8>, i64)>, suffix: &[u8]) -> i64 {
    while current.front().is_some_and(|(s, _)| s.as_slice() < suffix) {
        current.pop_front();
    }
    match current.front() {
        Some((s, revision)) if s.as_slice() == suffix => *revision,
        _ => 0,
    }
}

/// Guarded writes of one kind, sent in txns of at most
/// [`DETACH_OPS_PER_TXN`] ops and [`RESTORE_BYTES_PER_TXN`] bytes.
struct Batch<'a> {
    dest: &'a Cluster,
    keys: &'a MetaKeys,
    job: &'a str,
    writes: Vec<GuardedWrite>,
    bytes: usize,
    applied: u64,
    skipped: u64,
}

impl<'a> Batch<'a> {
    fn new(dest: &'a Cluster, keys: &'a MetaKeys, job: &'a str) -> Self {
        Self {
            dest,
            keys,
            job,
            writes: Vec::new(),
            bytes: 0,
            applied: 0,
            skipped: 0,
        }
    }

    async fn push(&mut self, write: GuardedWrite) -> Result<(), AdminError> {
        let len = write.op.encoded_len();
        if !self.writes.is_empty()
            && (self.writes.len() >= DETACH_OPS_PER_TXN || self.bytes + len > RESTORE_BYTES_PER_TXN)
        {
            self.flush().await?;
        }
        self.bytes += len;
        self.writes.push(write);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), AdminError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let (applied, skipped) = guarded_chunk(
            self.dest,
            self.keys,
            self.job,
            "restore a point in time",
            &self.writes,
        )
        .await?;
        self.applied += applied;
        self.skipped += skipped;
        self.writes.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// `promote --at-source-revision` / `--at-time`.
///
/// Reachability is checked before anything is written: a request outside
/// the destination's history window is refused and the job stays as it was
/// (not promoted). Then the promoted marker stops every replicator, the
/// search runs again up to the promotion's base revision (a replicator may
/// have written once more in between), the differences are written back,
/// and the marker records what was done.
pub async fn promote_at(
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
    by: &str,
    target: &PointTarget,
    page_size: usize,
    cancel: &CancellationToken,
) -> Result<PromoteOutcome, AdminError> {
    let keys = MetaKeys::new(meta_prefix, job);
    let status = collect_status(dest, meta_prefix, Some(job))
        .await?
        .remove(0);
    let samples = status.revision_map.points().to_vec();
    let no_prefix = || AdminError::NoDestPrefix {
        job: job.to_string(),
    };
    let (_, newest) = checkpoint_at(dest, &keys, 0).await?.ok_or_else(no_prefix)?;
    let newest = status
        .promotion
        .as_ref()
        .and_then(|record| record.base_dest_revision)
        .unwrap_or(newest);
    find_point(dest, &keys, job, target, &samples, newest).await?;

    let mut outcome = promote(dest, meta_prefix, job, by).await?;
    let record = outcome.promotion.clone().ok_or_else(no_prefix)?;
    let base = record.base_dest_revision.ok_or_else(no_prefix)?;
    let dest_prefix = record.dest_prefix.clone().ok_or_else(no_prefix)?;
    let found = find_point(dest, &keys, job, target, &samples, base).await?;
    let counts = restore(
        dest,
        meta_prefix,
        job,
        &dest_prefix,
        found.dest_revision,
        page_size,
        cancel,
    )
    .await?;
    let point = PointInTime {
        requested: target.requested(),
        source_revision: found.checkpoint.last_synced_rev,
        read_dest_revision: found.dest_revision,
        puts: counts.puts,
        deletes: counts.deletes,
        skipped: counts.skipped,
        leases_dropped: counts.leases_dropped,
    };
    record_point(dest, &keys, job, point).await?;
    outcome.action = "promoted to a point in time";
    outcome.promotion = collect_status(dest, meta_prefix, Some(job))
        .await?
        .remove(0)
        .promotion;
    Ok(outcome)
}

/// Writes `point` into the promoted marker, guarded on the marker's value
/// as read (an undo or another promotion in between wins).
async fn record_point(
    dest: &Cluster,
    keys: &MetaKeys,
    job: &str,
    point: PointInTime,
) -> Result<(), AdminError> {
    let marker = dest
        .range(
            "read the promoted marker",
            RangeRequest::key(keys.promoted()),
        )
        .await?;
    let Some(kv) = marker.kvs.first() else {
        return Err(AdminError::NotPromoted {
            job: job.to_string(),
        });
    };
    let mut record = PromotionRecord::decode(&kv.value).unwrap_or_default();
    record.source_revision = Some(point.source_revision);
    record.point_in_time = Some(point);
    let txn = TxnRequest::new()
        .when(vec![Compare::value(
            keys.promoted(),
            CompareOp::Equal,
            kv.value.clone(),
        )])
        .and_then(vec![Op::put(keys.promoted(), record.encode())]);
    if !dest.txn("record the point in time", txn).await?.succeeded {
        tracing::warn!(%job, "The promoted marker changed before the point in time was recorded; the record is incomplete.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::etcd::api::KeyValue;
    use crate::etcd::memory::{new_store, Link, MemoryEtcd, SharedStore};
    use crate::model::Side;

    const META: &str = "/meta/";

    fn dest() -> (Cluster, SharedStore) {
        let store = new_store(1);
        let cluster = Cluster::with_backend(
            Side::Destination,
            "dest",
            Arc::new(MemoryEtcd::new(store.clone(), Link::new("dest", 7))),
            Duration::from_secs(2),
        );
        (cluster, store)
    }

    fn keys() -> MetaKeys {
        MetaKeys::new(META, "app")
    }

    fn checkpoint(revision: i64, partial: Option<i64>) -> Checkpoint {
        Checkpoint {
            last_synced_rev: revision,
            source_cluster_id: 9,
            // One second per source revision, so times map to revisions.
            updated_at: humantime::format_rfc3339(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + revision as u64),
            )
            .to_string(),
            instance: "test".into(),
            source_prefix: "/app/".into(),
            dest_prefix: Some("/app/".into()),
            partial_revision: partial,
            write_id: revision as u64,
            last_event: None,
            leases_mirrored: false,
            excluded: None,
            revision_exact: false,
            exact_gaps: Vec::new(),
        }
    }

    /// One replicator txn: the data and the checkpoint together. Returns its revision.
    async fn checkpoint_txn(dest: &Cluster, checkpoint: Checkpoint, mut ops: Vec<Op>) -> i64 {
        ops.push(Op::put(keys().checkpoint(), checkpoint.encode()));
        let response = dest
            .txn("test checkpoint txn", TxnRequest::new().and_then(ops))
            .await
            .expect("txn");
        response.header.revision
    }

    async fn get(dest: &Cluster, key: &str) -> Option<KeyValue> {
        dest.range("test get", RangeRequest::key(key))
            .await
            .expect("get")
            .kvs
            .pop()
    }

    /// Checkpoints 10, 20, 30 (21..30 coalesced), 35 half applied, 40;
    /// returns their revisions.
    async fn history(dest: &Cluster) -> [i64; 5] {
        let r10 = checkpoint_txn(
            dest,
            checkpoint(10, None),
            vec![
                Op::put("/app/a", "1"),
                Op::put("/app/b", "1"),
                Op::put("/app/z", "1"),
            ],
        )
        .await;
        let r20 = checkpoint_txn(dest, checkpoint(20, None), vec![Op::put("/app/c", "1")]).await;
        let r30 = checkpoint_txn(
            dest,
            checkpoint(30, None),
            vec![Op::delete("/app/a"), Op::put("/app/b", "2")],
        )
        .await;
        let r35 = checkpoint_txn(dest, checkpoint(30, Some(35)), vec![Op::delete("/app/b")]).await;
        let r40 = checkpoint_txn(
            dest,
            checkpoint(40, None),
            vec![Op::delete("/app/c"), Op::put("/app/d", "1")],
        )
        .await;
        [r10, r20, r30, r35, r40]
    }

    fn sample(source_revision: i64, dest_revision: i64) -> RevisionPoint {
        RevisionPoint {
            source_revision,
            dest_revision,
            at: String::new(),
        }
    }

    async fn found(
        dest: &Cluster,
        target: PointTarget,
        samples: &[RevisionPoint],
        newest: i64,
    ) -> Result<(i64, i64), AdminError> {
        find_point(dest, &keys(), "app", &target, samples, newest)
            .await
            .map(|f| (f.checkpoint.last_synced_rev, f.dest_revision))
    }

    /// O6: a full sync deletes the checkpoint while it copies (the data
    /// matches no source revision until it finishes). The state in effect
    /// there is the checkpoint before it, so a point before the full sync
    /// is still found, and one inside it is the state before it.
    #[tokio::test]
    async fn a_point_before_a_full_sync_is_found_across_it() {
        let (dest, _store) = dest();
        let k = keys();
        let r101 = checkpoint_txn(&dest, checkpoint(101, None), vec![Op::put("/app/a", "1")]).await;
        let txn = |ops: Vec<Op>| TxnRequest::new().and_then(ops);
        // The full sync: marker in, checkpoint out; copies; marker out, checkpoint in.
        dest.txn(
            "begin",
            txn(vec![
                Op::delete(k.checkpoint()),
                Op::put(k.full_sync(), "m1"),
            ]),
        )
        .await
        .unwrap();
        for i in 0..20 {
            dest.txn(
                "copy",
                txn(vec![
                    Op::put(format!("/app/n{i:02}"), "x"),
                    Op::put(k.full_sync(), format!("m{i}")),
                ]),
            )
            .await
            .unwrap();
        }
        let r901 = checkpoint_txn(
            &dest,
            checkpoint(901, None),
            vec![Op::delete(k.full_sync())],
        )
        .await;
        let samples = [sample(101, r101), sample(901, r901)];
        for samples in [&samples[..], &[]] {
            let at = |r| found(&dest, PointTarget::SourceRevision(r), samples, r901);
            assert_eq!(at(101).await.expect("101"), (101, r101), "{samples:?}");
            assert_eq!(at(500).await.expect("500"), (101, r101));
            assert_eq!(at(901).await.expect("901"), (901, r901));
            assert!(matches!(
                at(902).await,
                Err(AdminError::NotReached { reached: 901, .. })
            ));
        }
        // Promoted mid full sync: the base is a revision inside it.
        assert_eq!(
            found(&dest, PointTarget::SourceRevision(101), &[], r901 - 5)
                .await
                .expect("mid"),
            (101, r101)
        );
        assert!(matches!(
            found(&dest, PointTarget::SourceRevision(901), &[], r901 - 5).await,
            Err(AdminError::NotReached { reached: 101, .. })
        ));
    }

    #[tokio::test]
    async fn the_search_finds_the_newest_state_at_or_before_the_request() {
        let (dest, _store) = dest();
        // Unrelated writes before the job, so revisions are not dense in it.
        for i in 0..5 {
            let put = TxnRequest::new().and_then(vec![Op::put(format!("/other/{i}"), "x")]);
            dest.txn("test put", put).await.expect("put");
        }
        let [r10, r20, r30, _r35, r40] = history(&dest).await;
        let samples_sets = [
            vec![],
            vec![sample(20, r20), sample(40, r40)],
            vec![sample(10, r10)],
        ];
        for samples in &samples_sets {
            let at = |r| found(&dest, PointTarget::SourceRevision(r), samples, r40);
            // Between checkpoints, and several source revisions coalesced: c < R.
            assert_eq!(at(25).await.expect("25"), (20, r20), "{samples:?}");
            assert_eq!(at(29).await.expect("29"), (20, r20));
            // Exactly at a checkpoint.
            assert_eq!(at(30).await.expect("30"), (30, r30));
            assert_eq!(at(10).await.expect("10"), (10, r10));
            // Past a half-applied revision: the state before it.
            assert_eq!(at(39).await.expect("39"), (30, r30));
            assert_eq!(at(40).await.expect("40"), (40, r40));
            // O6: a revision the standby never reached is refused, not
            // quietly the newest state.
            let beyond = at(1000).await;
            assert!(
                matches!(
                    beyond,
                    Err(AdminError::NotReached {
                        requested: 1000,
                        reached: 40,
                        ..
                    })
                ),
                "{beyond:?}"
            );
        }
        // Before the job's first checkpoint: refused.
        let early = found(&dest, PointTarget::SourceRevision(5), &[], r40).await;
        assert!(
            matches!(early, Err(AdminError::OutsideWindow { .. })),
            "{early:?}"
        );
        let time = |r: u64| {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + r);
            PointTarget::Time(at, humantime::format_rfc3339(at).to_string())
        };
        assert_eq!(
            found(&dest, time(25), &[], r40).await.expect("t25"),
            (20, r20)
        );
        assert_eq!(
            found(&dest, time(30), &[], r40).await.expect("t30"),
            (30, r30)
        );
    }

    /// Samples narrow the search: fewer reads for the same answer.
    #[tokio::test]
    async fn revision_map_samples_save_reads() {
        let (dest, store) = dest();
        let mut written = Vec::new();
        for i in 1..=512 {
            let ops = vec![Op::put(format!("/app/k{}", i % 7), i.to_string())];
            written.push((
                i * 10,
                checkpoint_txn(&dest, checkpoint(i * 10, None), ops).await,
            ));
        }
        let newest = written.last().expect("written").1;
        let samples: Vec<RevisionPoint> = written
            .iter()
            .step_by(32)
            .map(|&(source, dest)| sample(source, dest))
            .collect();
        let expected = written[122];
        let mut reads = Vec::new();
        for samples in [&[][..], &samples[..]] {
            let before = store.lock().expect("store").reads;
            let target = PointTarget::SourceRevision(expected.0 + 5);
            assert_eq!(
                found(&dest, target, samples, newest).await.expect("found"),
                expected
            );
            reads.push(store.lock().expect("store").reads - before);
        }
        println!("reads without samples {}, with {}", reads[0], reads[1]);
        assert!(reads[1] < reads[0], "{reads:?}");
    }

    #[tokio::test]
    async fn a_point_before_the_compacted_history_is_refused_naming_what_is_reachable() {
        let (dest, store) = dest();
        let [_r10, r20, r30, _r35, r40] = history(&dest).await;
        store.lock().expect("store").compact(r20 + 1);
        for samples in [
            vec![],
            vec![sample(10, r20 - 1), sample(20, r20), sample(40, r40)],
        ] {
            let refused = found(&dest, PointTarget::SourceRevision(25), &samples, r40).await;
            match refused {
                Err(AdminError::OutsideWindow { reachable, .. }) => {
                    assert!(reachable.starts_with("source revision 30 ("), "{reachable}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(
                found(&dest, PointTarget::SourceRevision(30), &samples, r40)
                    .await
                    .expect("30 is reachable"),
                (30, r30)
            );
        }
    }

    #[tokio::test]
    async fn a_refused_request_writes_nothing() {
        let (dest, store) = dest();
        let [_r10, r20, ..] = history(&dest).await;
        store.lock().expect("store").compact(r20 + 1);
        let before = store.lock().expect("store").revision();
        let refused = promote_at(
            &dest,
            META,
            "app",
            "test",
            &PointTarget::SourceRevision(25),
            100,
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(refused, Err(AdminError::OutsideWindow { .. })),
            "{refused:?}"
        );
        assert_eq!(store.lock().expect("store").revision(), before);
        assert!(get(&dest, &keys().promoted()).await.is_none());
    }

    #[tokio::test]
    async fn the_restore_writes_exactly_the_differences() {
        let (dest, store) = dest();
        // Keys on leases at checkpoint 22: one lease still alive, one gone since.
        let alive = dest.lease_grant(600, 0).await.expect("grant");
        let gone = dest.lease_grant(600, 0).await.expect("grant");
        let data = [
            vec![
                Op::put("/app/a", "1"),
                Op::put("/app/b", "1"),
                Op::put("/app/z", "1"),
            ],
            vec![Op::put("/app/c", "1")],
            vec![
                Op::put_with_lease("/app/e", "1", alive),
                Op::put_with_lease("/app/f", "1", gone),
            ],
            vec![Op::delete("/app/a"), Op::put("/app/b", "2")],
            vec![
                Op::delete("/app/b"),
                Op::delete("/app/c"),
                Op::put("/app/d", "1"),
            ],
            vec![Op::delete("/app/e"), Op::put("/app/g", "1")],
        ];
        let mut r22 = 0;
        for (source_revision, ops) in [10, 20, 22, 30, 40, 50].into_iter().zip(data) {
            let revision = checkpoint_txn(&dest, checkpoint(source_revision, None), ops).await;
            if source_revision == 22 {
                r22 = revision;
            }
        }
        dest.lease_revoke(gone).await.expect("revoke");
        let z_before = get(&dest, "/app/z").await.expect("z");
        let outcome = promote_at(
            &dest,
            META,
            "app",
            "test",
            &PointTarget::SourceRevision(22),
            2,
            &CancellationToken::new(),
        )
        .await
        .expect("promote");
        let point = outcome
            .promotion
            .and_then(|r| r.point_in_time)
            .expect("recorded");
        assert_eq!((point.source_revision, point.read_dest_revision), (22, r22));
        // a, b (deleted since), c (deleted), e (deleted), f (lease gone): puts;
        // d and g (created since): deletes; z never changed: untouched.
        assert_eq!(
            (
                point.puts,
                point.deletes,
                point.skipped,
                point.leases_dropped
            ),
            (5, 2, 0, 1)
        );
        let state = store.lock().expect("store").current();
        let data: Vec<(String, String, i64)> = state
            .values()
            .filter(|kv| kv.key.starts_with(b"/app/"))
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.lease,
                )
            })
            .collect();
        let expected: Vec<(String, String, i64)> = [
            ("/app/a", "1", 0),
            ("/app/b", "1", 0),
            ("/app/c", "1", 0),
            ("/app/e", "1", alive),
            ("/app/f", "1", 0),
            ("/app/z", "1", 0),
        ]
        .iter()
        .map(|(k, v, l)| (k.to_string(), v.to_string(), *l))
        .collect();
        assert_eq!(data, expected);
        assert_eq!(get(&dest, "/app/z").await.expect("z"), z_before);
    }

    /// In the whole restore: a key a client changes between the restore's
    /// read and its write keeps the client's value and counts as skipped;
    /// the rest is restored. Each request takes 1 s each way on the
    /// restore's link, so the client's write (no delay) lands in between.
    #[tokio::test(start_paused = true)]
    async fn the_restore_skips_a_key_a_client_changed_after_its_read() {
        let (client, store) = dest();
        let keys = keys();
        let read = checkpoint_txn(
            &client,
            checkpoint(10, None),
            vec![Op::put("/app/a", "1"), Op::put("/app/b", "1")],
        )
        .await;
        checkpoint_txn(
            &client,
            checkpoint(20, None),
            vec![
                Op::put("/app/a", "2"),
                Op::delete("/app/b"),
                Op::put("/app/c", "1"),
            ],
        )
        .await;
        let marker = TxnRequest::new().and_then(vec![Op::put(keys.promoted(), "{}")]);
        client.txn("marker", marker).await.expect("marker");
        let link = Link::new("slow", 7);
        link.set_faults(crate::etcd::memory::Faults {
            delay: (Duration::from_secs(1), Duration::from_secs(1)),
            ..Default::default()
        });
        let slow = Cluster::with_backend(
            Side::Destination,
            "dest",
            Arc::new(MemoryEtcd::new(store.clone(), link)),
            Duration::from_secs(30),
        );
        let restore = tokio::spawn(async move {
            restore(
                &slow,
                META,
                "app",
                "/app/",
                read,
                100,
                &CancellationToken::new(),
            )
            .await
        });
        // Pages read at 1 s, answered at 2 s; the first write arrives at 3 s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let write = TxnRequest::new().and_then(vec![Op::put("/app/a", "client")]);
        client.txn("client", write).await.expect("client write");
        let counts = restore.await.expect("joined").expect("restore");
        assert_eq!((counts.puts, counts.deletes, counts.skipped), (1, 1, 1));
        assert_eq!(get(&client, "/app/a").await.expect("a").value, b"client");
        assert_eq!(get(&client, "/app/b").await.expect("b").value, b"1");
        assert!(get(&client, "/app/c").await.is_none());
    }

    /// The restore's writes skip a key a client wrote since it was read:
    /// a put over a changed key and a delete of a key read as absent that
    /// a client created meanwhile.
    #[tokio::test]
    async fn a_key_a_client_changed_after_the_read_is_skipped() {
        let (dest, _store) = dest();
        let keys = keys();
        checkpoint_txn(&dest, checkpoint(1, None), vec![Op::put("/app/a", "1")]).await;
        dest.txn(
            "marker",
            TxnRequest::new().and_then(vec![Op::put(keys.promoted(), "{}")]),
        )
        .await
        .expect("marker");
        let read_a = get(&dest, "/app/a").await.expect("a");
        // Clients of the promoted cluster, after the restore read.
        dest.txn(
            "client",
            TxnRequest::new().and_then(vec![
                Op::put("/app/a", "client"),
                Op::put("/app/new", "client"),
            ]),
        )
        .await
        .expect("client");
        let writes = [
            GuardedWrite {
                key: b"/app/a".to_vec(),
                read_mod_revision: read_a.mod_revision,
                op: Op::put("/app/a", "restored"),
            },
            GuardedWrite {
                key: b"/app/new".to_vec(),
                read_mod_revision: 0,
                op: Op::put("/app/new", "restored"),
            },
            GuardedWrite {
                key: b"/app/b".to_vec(),
                read_mod_revision: 0,
                op: Op::put("/app/b", "restored"),
            },
        ];
        let (applied, skipped) = guarded_chunk(&dest, &keys, "app", "test", &writes)
            .await
            .expect("restore writes");
        assert_eq!((applied, skipped), (1, 2));
        assert_eq!(get(&dest, "/app/a").await.expect("a").value, b"client");
        assert_eq!(get(&dest, "/app/new").await.expect("new").value, b"client");
        assert_eq!(get(&dest, "/app/b").await.expect("b").value, b"restored");
    }
}
