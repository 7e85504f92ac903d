//! `failback`: make the old primary equal the promoted standby by writing
//! only the keys that can differ, save the old primary's lost writes first,
//! and leave a checkpoint there so that reverse replication (standby →
//! old primary) resumes on the fast path.
//!
//! The steps, each before the next:
//! 1. Read the promotion record on the standby: the checkpoint `c` (the
//!    old primary's revision the standby held) and the destination
//!    revision of that checkpoint.
//! 2. Fence the old primary: the job's promoted marker there holds this
//!    run's record, so no replicator writes to the job's keys on it, and
//!    every write of this run is guarded on that exact record.
//! 3. The dirty set: what the old primary changed after `c`, and what the
//!    standby changed since the checkpoint's destination revision
//!    ([`changes_since`]). A compacted history on either side falls back to
//!    the full diff of both prefixes.
//! 4. Compare both sides' state of each dirty key; write the old primary's
//!    lost writes to the file (fsynced) before anything is overwritten.
//! 5. Write the standby's state of each differing key to the old primary,
//!    guarded on the key's mod revision as read: a write there since makes
//!    the txn fail, nothing is overwritten unseen.
//! 6. Check the key counts, then one txn replaces the fence by the reverse
//!    job's checkpoint (and drops what an earlier run of the job left there).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::api::{Compare, CompareOp, KeyValue, Op, RangeRequest, TxnRequest, WatchRequest};
use crate::etcd::client::{ClientError, Cluster, ClusterHead, FailureKind};
use crate::etcd::meta::read_job_meta;
use crate::etcd::pager::{Merged, MergedPages, PageError, PagedRead, Skipped};
use crate::mirror::meta::CheckpointOf;
use crate::model::diff::SortedMerge;
use crate::model::failback::{
    dirty_set, divergences, Bytes, Changes, Divergence, Held, Knowledge, Loss, LostWrite, SideState,
};
use crate::model::keys::{
    key_successor, prefix_range_end, prefix_range_start, KeyRewrite, MetaKeys,
};
use crate::model::schema::{EventStamp, FailbackFence, PromotionRecord};
use crate::model::Side as Role;
use crate::telemetry::clock::now_rfc3339;

/// Keys read per txn of point reads, and written per txn: well under
/// etcd's default `--max-txn-ops` (128), compares included.
const KEYS_PER_TXN: usize = 64;
/// A history watch that delivers nothing for this long while deletes are
/// still missing is given up.
const WATCH_SILENCE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FailbackError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("job {job}: the destination (--dst-endpoints) is not promoted; failback copies a promoted standby back to the old primary: run `promote` first, or check --dst-endpoints and --meta-prefix")]
    NotPromoted { job: String },
    #[error("job {job}: the destination (--dst-endpoints) is an old primary being failed back to, not a promoted standby; swap --src-endpoints and --dst-endpoints")]
    WrongDirection { job: String },
    #[error("job {job}: the standby's checkpoint mirrors {found:?} but {field} says {expected:?}; run failback with the job's own flags or config")]
    PrefixMismatch {
        job: String,
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("job {job}: the old primary and the standby are the same cluster (id {cluster_id:x}); check --src-endpoints and --dst-endpoints")]
    SameCluster { job: String, cluster_id: u64 },
    #[error("--lost-writes-file {path}: the file exists (it may hold an earlier run's lost writes); move it away or name another file")]
    LostWritesFileExists { path: PathBuf },
    #[error("--lost-writes-file {path}: {source}; nothing was changed on the old primary. Name a file in a writable directory")]
    LostWritesFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--lost-writes-file {path}: {what}; the old primary is fenced by this run but nothing else was written to it. Fix the file and run failback again (it replaces its fence)")]
    LostWritesFileAfterFence { path: PathBuf, what: String },
    #[error("job {job}: the fence on the old primary changed (another failback, or a promotion of the old primary); this run stops and writes nothing more")]
    Fenced { job: String },
    #[error("job {job}: key {key:?} changed on the old primary while failback ran; its writers are not stopped. Stop every client writing to the old primary, then run failback again")]
    Conflict { job: String, key: String },
    #[error("job {job}: after failback the old primary holds {old_primary} keys but the standby held {standby}; something wrote to the old primary meanwhile. Stop its writers and run failback again (the checkpoint was not written)")]
    CountMismatch {
        job: String,
        old_primary: i64,
        standby: i64,
    },
    #[error("job {job}: the {side} history watch {what}")]
    History {
        job: String,
        side: &'static str,
        what: String,
    },
    #[error("job {job}: reading the {side} prefix stopped: {what}")]
    Pager {
        job: String,
        side: &'static str,
        what: String,
    },
    #[error("cancelled")]
    Cancelled,
}

impl FailbackError {
    /// Exit code 2 for what the operator fixes in the invocation.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            FailbackError::NotPromoted { .. }
                | FailbackError::WrongDirection { .. }
                | FailbackError::PrefixMismatch { .. }
                | FailbackError::SameCluster { .. }
                | FailbackError::LostWritesFileExists { .. }
                | FailbackError::LostWritesFile { .. }
        )
    }
}

/// The job as `mirror-plus` runs it: the old primary's prefix (the
/// source) and the standby's (the destination).
#[derive(Debug, Clone)]
pub struct FailbackJob {
    pub name: String,
    pub prefix: String,
    pub dest_prefix: String,
    pub meta_prefix: String,
    /// `exclude-prefixes`, as source prefixes.
    pub exclude_prefixes: Vec<String>,
    pub page_size: usize,
    /// The job's `--max-txn-ops` and `--max-txn-bytes`, for the writes.
    pub max_txn_ops: usize,
    pub max_txn_bytes: usize,
    /// `--leases faithful`: the reverse job's checkpoint says the keys sit
    /// on mirrored leases (no key failback wrote was on a lease).
    pub leases_faithful: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FailbackOptions {
    pub dry_run: bool,
    pub lost_writes_file: Option<PathBuf>,
    /// Append to the lost-writes file (a later job of the same run).
    pub append_lost_writes: bool,
    pub instance: String,
}

/// How the keys that can differ were found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// From both histories: work proportional to the changed keys.
    History,
    /// The full diff of both prefixes, because a history was not usable.
    Diff { reason: String },
}

/// What failback did (or, with `--dry-run`, would do) for one job.
#[derive(Debug, Clone, Serialize)]
pub struct FailbackReport {
    pub job: String,
    pub dry_run: bool,
    pub method: Method,
    /// The old primary's revision the standby held at promotion.
    pub checkpoint: i64,
    /// The old primary's revision the dirty set was read at.
    pub old_primary_revision: i64,
    /// The standby's revision whose state the old primary now holds; the
    /// reverse job resumes from it.
    pub standby_revision: i64,
    /// Keys the old primary changed after the checkpoint (None: unknown).
    pub old_primary_changed: Option<usize>,
    /// Keys the standby changed since promotion (None: unknown).
    pub standby_changed: Option<usize>,
    /// Keys compared on both sides.
    pub candidates: usize,
    pub puts: usize,
    pub deletes: usize,
    pub lost_writes: usize,
    /// Lost writes the compacted histories cannot confirm (see the file).
    pub possible_lost_writes: usize,
    /// Keys written without the lease they have on the standby.
    pub written_without_lease: usize,
    pub bytes_read_old_primary: u64,
    pub bytes_read_standby: u64,
    /// The old primary's revision after the checkpoint txn.
    pub final_old_primary_revision: Option<i64>,
    pub lost_writes_file: Option<PathBuf>,
    #[serde(skip)]
    pub lost: Vec<LostWrite>,
}

/// Bytes of keys and values read from one side.
#[derive(Debug, Default)]
struct Traffic(AtomicU64);

impl Traffic {
    fn add_kvs<'a>(&self, kvs: impl IntoIterator<Item = &'a KeyValue>) {
        let bytes: usize = kvs
            .into_iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum();
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One side of the failback: a cluster, the job's prefix there and the
/// meta prefix to leave out.
struct SideView<'a> {
    name: &'static str,
    cluster: &'a Cluster,
    prefix: &'a [u8],
    meta_prefix: &'a [u8],
    /// The job's `exclude-prefixes` (by suffix): local to each side, never
    /// compared or written.
    rewrite: &'a KeyRewrite,
    /// The same ranges as this side's key prefixes.
    excluded: Vec<Vec<u8>>,
    /// Keys per page of the written-since read (`--page-size`; etcd
    /// filters by mod revision after reading the range, so bigger pages
    /// mean fewer scans on the server).
    page: i64,
    traffic: Traffic,
}

impl SideView<'_> {
    fn is_data(&self, key: &[u8]) -> bool {
        key.starts_with(self.prefix)
            && !key.starts_with(self.meta_prefix)
            && !self.rewrite.is_excluded_suffix(self.suffix(key))
    }

    fn suffix<'k>(&self, key: &'k [u8]) -> &'k [u8] {
        &key[self.prefix.len()..]
    }

    fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut key = self.prefix.to_vec();
        key.extend_from_slice(suffix);
        key
    }

    /// Compares that hold while no data key of the prefix (meta and
    /// excluded ranges left out) was written after `revision`.
    fn unchanged_since(&self, revision: i64) -> Vec<Compare> {
        let mut holes: Vec<(Vec<u8>, Vec<u8>)> = self
            .excluded
            .iter()
            .map(|p| (prefix_range_start(p), prefix_range_end(p)))
            .collect();
        if self.meta_prefix.starts_with(self.prefix) {
            holes.push((
                prefix_range_start(self.meta_prefix),
                prefix_range_end(self.meta_prefix),
            ));
        }
        holes.sort();
        let end = prefix_range_end(self.prefix);
        // "\0" as a range end is "to the end of the keyspace".
        let before_end = |key: &[u8]| end == [0] || key < end.as_slice();
        let unchanged = |from: Vec<u8>, to: Vec<u8>| {
            Compare::mod_revision(from, CompareOp::Less, revision + 1).over_range(to)
        };
        let mut compares = Vec::new();
        let mut start = prefix_range_start(self.prefix);
        for (hole_start, hole_end) in holes {
            if hole_start > start {
                compares.push(unchanged(start.clone(), hole_start));
            }
            if hole_end > start || hole_end == [0] {
                start = hole_end;
            }
            if start == [0] {
                return compares;
            }
        }
        if before_end(&start) {
            compares.push(unchanged(start, end));
        }
        compares
    }

    /// A data key of the prefix written after `revision`, by name.
    async fn changed_after(&self, revision: i64) -> Result<String, ClientError> {
        let changed = self
            .cluster
            .range(
                "find the key written meanwhile",
                RangeRequest::prefix(self.prefix)
                    .keys_only()
                    .with_min_mod_revision(revision + 1),
            )
            .await?;
        Ok(changed
            .kvs
            .iter()
            .find(|kv| self.is_data(&kv.key))
            .map_or_else(
                || "(unknown)".to_string(),
                |kv| String::from_utf8_lossy(&kv.key).into_owned(),
            ))
    }

    /// Keys in the prefix at `revision` (meta keys left out).
    async fn count_at(&self, revision: i64) -> Result<i64, ClientError> {
        let count = |prefix: &[u8]| {
            RangeRequest::prefix(prefix)
                .count_only()
                .at_revision(revision)
        };
        let mut keys = self
            .cluster
            .range("count the prefix", count(self.prefix))
            .await?
            .count;
        if self.meta_prefix.starts_with(self.prefix) {
            keys -= self
                .cluster
                .range("count meta keys", count(self.meta_prefix))
                .await?
                .count;
        }
        for excluded in &self.excluded {
            keys -= self
                .cluster
                .range("count excluded keys", count(excluded))
                .await?
                .count;
        }
        Ok(keys)
    }

    /// Point reads of `suffixes` at `revision`, a txn of gets at a time.
    async fn read_at(
        &self,
        suffixes: &[Vec<u8>],
        revision: i64,
    ) -> Result<BTreeMap<Vec<u8>, Held>, ClientError> {
        let mut held = BTreeMap::new();
        for chunk in suffixes.chunks(KEYS_PER_TXN) {
            let gets = chunk
                .iter()
                .map(|suffix| Op::Range(RangeRequest::key(self.key(suffix)).at_revision(revision)))
                .collect();
            let response = self
                .cluster
                .txn("read keys at a revision", TxnRequest::new().and_then(gets))
                .await?;
            for range in response.ranges() {
                self.traffic.add_kvs(&range.kvs);
                for kv in &range.kvs {
                    held.insert(self.suffix(&kv.key).to_vec(), held_of(kv));
                }
            }
        }
        Ok(held)
    }
}

fn held_of(kv: &KeyValue) -> Held {
    Held {
        value: kv.value.clone(),
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        lease: kv.lease,
    }
}

/// What `side` changed in its prefix after `base`, as of `at`: the keys
/// written since (read with a `min_mod_revision` range, so only they cross
/// the network) and the keys of `base`'s state that are gone (from a watch
/// of the history from `base + 1`, which also yields deletes). `None` when
/// `base` is compacted: the history is not there to read.
///
/// The watch stops once it has seen as many deletes of `base`'s keys as the
/// key counts say there were ([`Changes::base_keys_deleted`]), so it never
/// relies on progress notifications (etcd-io/etcd#15220, #17507), and it is
/// not opened at all when nothing was deleted. The revision `base` must be
/// readable, so the watch starts past the compaction revision
/// (etcd-io/etcd#18089 loses a delete on a watch from exactly there).
async fn changes_since(
    job: &str,
    side: &SideView<'_>,
    base: i64,
    at: i64,
    cancel: &CancellationToken,
) -> Result<Option<Changes>, FailbackError> {
    if base > at {
        return Ok(None);
    }
    let keys_at_base = match side.count_at(base).await {
        Ok(count) => count,
        Err(error) if error.kind() == FailureKind::Compacted => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mut changes = Changes::default();
    let end = prefix_range_end(side.prefix);
    let mut start = prefix_range_start(side.prefix);
    loop {
        let page = side
            .cluster
            .range(
                "read keys written since",
                RangeRequest {
                    key: start.clone(),
                    range_end: end.clone(),
                    revision: at,
                    limit: side.page,
                    min_mod_revision: base + 1,
                    ..RangeRequest::default()
                },
            )
            .await?;
        side.traffic.add_kvs(&page.kvs);
        for kv in page.kvs.iter().filter(|kv| side.is_data(&kv.key)) {
            changes
                .written
                .insert(side.suffix(&kv.key).to_vec(), held_of(kv));
        }
        match page.kvs.last() {
            Some(last) if page.more => start = key_successor(&last.key),
            _ => break,
        }
    }
    let keys_now = side.count_at(at).await?;
    let created_since = changes
        .written
        .values()
        .filter(|held| held.create_revision > base)
        .count() as i64;
    let expected = Changes::base_keys_deleted(keys_at_base, keys_now, created_since);
    if expected <= 0 {
        return Ok(Some(changes));
    }
    // Keys written since that were created again after the base: those
    // that existed at the base count among its deleted keys too.
    let recreated: Vec<Vec<u8>> = changes
        .written
        .iter()
        .filter(|(_, held)| held.create_revision > base)
        .map(|(suffix, _)| suffix.clone())
        .collect();
    let mut seen_deleted = side.read_at(&recreated, base).await?.len() as i64;
    if seen_deleted >= expected {
        return Ok(Some(changes));
    }
    let mut watch = side
        .cluster
        .watch(
            "watch the history",
            WatchRequest {
                key: prefix_range_start(side.prefix),
                range_end: end,
                start_revision: base + 1,
                progress_notify: false,
                fragment: false,
            },
        )
        .await?;
    let history_error = |what: String| FailbackError::History {
        job: job.to_string(),
        side: side.name,
        what,
    };
    let mut checked: BTreeSet<Vec<u8>> = BTreeSet::new();
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Err(FailbackError::Cancelled),
            message = tokio::time::timeout(WATCH_SILENCE, watch.message()) => message,
        };
        let response = match message {
            Err(_) => {
                return Err(history_error(format!(
                    "delivered nothing for {WATCH_SILENCE:?} with {} of {expected} deletes still unseen",
                    expected - seen_deleted
                )))
            }
            Ok(Err(error)) => return Err(history_error(format!("failed: {error}"))),
            Ok(Ok(None)) => return Err(history_error("was closed by the server".into())),
            Ok(Ok(Some(response))) => response,
        };
        if response.canceled {
            if response.compact_revision > 0 {
                return Ok(None);
            }
            return Err(history_error(format!(
                "was canceled: {}",
                response.cancel_reason
            )));
        }
        let mut candidates: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        for event in &response.events {
            side.traffic.add(event.kv.key.len() + event.kv.value.len());
            if event.kv.mod_revision > at || !side.is_data(&event.kv.key) {
                continue;
            }
            if event.kind == crate::etcd::api::EventType::Delete {
                let suffix = side.suffix(&event.kv.key).to_vec();
                // A key written again later is in `written`; its last
                // delete is no longer its state.
                if !changes.written.contains_key(&suffix) {
                    candidates.insert(suffix, event.kv.mod_revision);
                }
            }
        }
        // Which of them were keys of the base (a key created and deleted
        // again after it changed nothing).
        let fresh: Vec<Vec<u8>> = candidates
            .keys()
            .filter(|s| !checked.contains(*s))
            .cloned()
            .collect();
        let at_base = side.read_at(&fresh, base).await?;
        checked.extend(fresh);
        for (suffix, revision) in candidates {
            if at_base.contains_key(&suffix) {
                seen_deleted += 1;
            }
            if at_base.contains_key(&suffix) || changes.deleted.contains_key(&suffix) {
                changes.deleted.insert(suffix, revision);
            }
        }
        if seen_deleted >= expected {
            return Ok(Some(changes));
        }
        if response.events.iter().any(|e| e.kv.mod_revision > at) {
            return Err(history_error(format!(
                "passed revision {at} with {} of {expected} deletes unseen",
                expected - seen_deleted
            )));
        }
    }
}

/// The keys on which the two prefixes differ, from the full diff of both
/// (old primary at `old_revision`, standby at `standby_revision`).
async fn diff_candidates(
    job: &str,
    old_primary: &SideView<'_>,
    old_revision: i64,
    standby: &SideView<'_>,
    standby_revision: i64,
    page_size: usize,
    cancel: &CancellationToken,
) -> Result<Vec<Vec<u8>>, FailbackError> {
    let read = |side: &SideView<'_>, revision| {
        PagedRead::new(
            side.cluster,
            side.prefix,
            Some(revision),
            Skipped {
                meta_prefix: side.meta_prefix.to_vec(),
                rewrite: side.rewrite.clone(),
                mark_held: false,
            },
        )
    };
    // The standby is what the old primary must become: the merge's source.
    let mut merged = MergedPages::start(
        job,
        read(standby, standby_revision),
        read(old_primary, old_revision),
        page_size,
        SortedMerge::new(),
        cancel,
    );
    let entries_bytes = |page: &[crate::model::diff::Entry], prefix: usize| -> usize {
        page.iter()
            .map(|e| prefix + e.suffix.len() + e.value.len())
            .sum()
    };
    // The merge's source is the standby, its destination the old primary.
    let view = |role: Role| match role {
        Role::Source => standby,
        Role::Destination => old_primary,
    };
    let mut differing = Vec::new();
    loop {
        let next = merged
            .next(cancel, |role, page| {
                let side = view(role);
                side.traffic.add(entries_bytes(page, side.prefix.len()));
            })
            .await
            .map_err(|e| {
                let side = view(e.side);
                match e.error {
                    PageError::Client(error) => FailbackError::Client(error),
                    PageError::Cancelled => FailbackError::Cancelled,
                    other => FailbackError::Pager {
                        job: job.to_string(),
                        side: side.name,
                        what: other.to_string(),
                    },
                }
            })?;
        match next {
            // These reads mark nothing held.
            Some(Merged::Same | Merged::Held(_)) => {}
            Some(Merged::Differ(difference)) => differing.push(difference.suffix().to_vec()),
            None => return Ok(differing),
        }
    }
}

/// Phase 1: where the histories part (what the standby mirrored, up to
/// which revision, and whether the old primary still has that history).
struct Parting {
    record: PromotionRecord,
    /// The source revision the standby had applied (0: unknown).
    checkpoint_revision: i64,
    mirrored_cluster: Option<u64>,
    /// The old primary is the cluster the standby mirrored, not behind it.
    same_history: bool,
    old_head: ClusterHead,
    standby_head: ClusterHead,
}

/// Phase 3: every key either side changed since the histories parted.
struct Dirty {
    old_revision: i64,
    old_changes: Option<Changes>,
    standby_base: Option<i64>,
    standby_changes: Option<Changes>,
    method: Method,
    candidates: Vec<Vec<u8>>,
}

/// Phase 4: what to write, and what would be lost.
struct Plan {
    found: Vec<Divergence>,
    standby_state: BTreeMap<Vec<u8>, Held>,
    report: FailbackReport,
}

/// The whole failback of one job, phase by phase (see the module docs):
/// where the histories part, the fence, the dirty set, the plan, the
/// writes, the handover. A dry run stops after the plan, unfenced.
pub async fn failback(
    old_primary_cluster: &Cluster,
    standby_cluster: &Cluster,
    job: &FailbackJob,
    options: &FailbackOptions,
    cancel: &CancellationToken,
) -> Result<FailbackReport, FailbackError> {
    let name = job.name.as_str();
    let keys = MetaKeys::new(&job.meta_prefix, name);
    let rewrite = KeyRewrite::new(job.prefix.as_bytes(), job.dest_prefix.as_bytes())
        .excluding(&job.exclude_prefixes);
    let old_primary = SideView {
        name: "old primary",
        cluster: old_primary_cluster,
        prefix: job.prefix.as_bytes(),
        meta_prefix: job.meta_prefix.as_bytes(),
        rewrite: &rewrite,
        excluded: rewrite.excluded_source_prefixes().collect(),
        page: job.page_size.max(1) as i64,
        traffic: Traffic::default(),
    };
    let standby = SideView {
        name: "standby",
        cluster: standby_cluster,
        prefix: job.dest_prefix.as_bytes(),
        meta_prefix: job.meta_prefix.as_bytes(),
        rewrite: &rewrite,
        excluded: rewrite.excluded_dest_prefixes().collect(),
        page: job.page_size.max(1) as i64,
        traffic: Traffic::default(),
    };
    let parting = where_histories_part(job, &keys, &old_primary, &standby).await?;
    // Everything that can be checked is, before the first write.
    if let (Some(path), false) = (&options.lost_writes_file, options.dry_run) {
        check_lost_writes_file(path, options.append_lost_writes)?;
    }
    // Phase 2, the fence: nothing writes the old primary's prefix behind
    // it but this run (a dry run plans unfenced and writes nothing).
    let fence_bytes = if options.dry_run {
        None
    } else {
        Some(
            fence(
                old_primary_cluster,
                &keys,
                name,
                parting.standby_head.cluster_id,
                &options.instance,
            )
            .await?,
        )
    };
    let dirty = dirty_keys(
        name,
        &parting,
        &old_primary,
        &standby,
        job.page_size,
        cancel,
    )
    .await?;
    let mut plan = plan(name, options, &parting, dirty, &old_primary, &standby).await?;
    let Some(fence_bytes) = fence_bytes else {
        plan.report.bytes_read_old_primary = old_primary.traffic.get();
        plan.report.bytes_read_standby = standby.traffic.get();
        return Ok(plan.report);
    };
    if let Some(path) = &options.lost_writes_file {
        save_lost_writes(path, &plan.report.lost, options.append_lost_writes).map_err(|error| {
            FailbackError::LostWritesFileAfterFence {
                path: path.clone(),
                what: match error {
                    FailbackError::LostWritesFile { source, .. } => source.to_string(),
                    other => other.to_string(),
                },
            }
        })?;
        plan.report.lost_writes_file = Some(path.clone());
    }
    // Phase 5, the writes.
    let fence_compare = Compare::value(keys.promoted(), CompareOp::Equal, fence_bytes.clone());
    for chunk in txn_chunks(&plan.found, job.max_txn_ops, job.max_txn_bytes) {
        write_chunk(
            old_primary_cluster,
            &old_primary,
            &keys,
            &fence_compare,
            name,
            chunk,
        )
        .await?;
    }
    let handed_over = hand_over(
        job,
        options,
        &keys,
        &parting,
        &plan,
        &old_primary,
        &standby,
        &fence_bytes,
        cancel,
    )
    .await?;
    let mut report = plan.report;
    report.final_old_primary_revision = Some(handed_over);
    report.bytes_read_old_primary = old_primary.traffic.get();
    report.bytes_read_standby = standby.traffic.get();
    info!(
        job = %name,
        puts = report.puts,
        deletes = report.deletes,
        lost_writes = report.lost_writes,
        checkpoint = parting.standby_head.revision,
        "Failback done: the old primary equals the standby; reverse replication can resume from the checkpoint."
    );
    Ok(report)
}

/// Phase 1, where the histories part: the promotion record and the checkpoint on
/// the standby, both heads, and the refusals (not promoted, the wrong
/// direction, other prefixes, the same cluster).
async fn where_histories_part(
    job: &FailbackJob,
    keys: &MetaKeys,
    old_primary: &SideView<'_>,
    standby: &SideView<'_>,
) -> Result<Parting, FailbackError> {
    let name = job.name.as_str();
    let meta = read_job_meta(standby.cluster, keys).await?;
    let record = match &meta.promoted {
        None => {
            return Err(FailbackError::NotPromoted {
                job: name.to_string(),
            })
        }
        Some(raw) => PromotionRecord::decode(raw).unwrap_or_default(),
    };
    if record.failback.is_some() {
        return Err(FailbackError::WrongDirection {
            job: name.to_string(),
        });
    }
    let checkpoint = meta.checkpoint.clone();
    if let Some(checkpoint) = &checkpoint {
        let dest_prefix = checkpoint
            .dest_prefix
            .clone()
            .unwrap_or_else(|| checkpoint.source_prefix.clone());
        for (field, expected, found) in [
            ("--prefix", &job.prefix, &checkpoint.source_prefix),
            ("--dest-prefix", &job.dest_prefix, &dest_prefix),
        ] {
            if expected != found {
                return Err(FailbackError::PrefixMismatch {
                    job: name.to_string(),
                    field,
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
    }
    let synced = record
        .source_revision
        .or(checkpoint.as_ref().map(|c| c.last_synced_rev));
    let mirrored_cluster = record
        .source_cluster_id
        .or(checkpoint.as_ref().map(|c| c.source_cluster_id));
    let old_head = old_primary.cluster.head(old_primary.prefix).await?;
    let standby_head: ClusterHead = standby.cluster.head(standby.prefix).await?;
    if old_head.cluster_id == standby_head.cluster_id {
        return Err(FailbackError::SameCluster {
            job: name.to_string(),
            cluster_id: old_head.cluster_id,
        });
    }
    let checkpoint_revision = synced.unwrap_or(0);
    let same_history = mirrored_cluster == Some(old_head.cluster_id)
        && synced.is_some_and(|c| c <= old_head.revision);
    Ok(Parting {
        record,
        checkpoint_revision,
        mirrored_cluster,
        same_history,
        old_head,
        standby_head,
    })
}

/// Phase 3, the dirty set: the keys either side changed since the histories
/// parted, from both histories when both still have them, else from a full
/// diff of both prefixes (and why).
async fn dirty_keys(
    name: &str,
    parting: &Parting,
    old_primary: &SideView<'_>,
    standby: &SideView<'_>,
    page_size: usize,
    cancel: &CancellationToken,
) -> Result<Dirty, FailbackError> {
    let Parting {
        record,
        checkpoint_revision,
        mirrored_cluster,
        same_history,
        old_head,
        standby_head,
        ..
    } = parting;
    let (checkpoint_revision, same_history) = (*checkpoint_revision, *same_history);
    let standby_revision = standby_head.revision;
    let old_revision = old_primary.cluster.head(old_primary.prefix).await?.revision;
    let old_changes = if same_history {
        changes_since(name, old_primary, checkpoint_revision, old_revision, cancel).await?
    } else {
        None
    };
    // Where the standby equalled the old primary at `synced`: after a
    // point-in-time promotion, the state it went back to.
    let standby_base = record
        .point_in_time
        .as_ref()
        .map(|pit| pit.read_dest_revision)
        .or(record.base_dest_revision);
    let standby_changes = match standby_base {
        Some(base) => changes_since(name, standby, base, standby_revision, cancel).await?,
        None => None,
    };
    let method = match (&old_changes, &standby_changes) {
        (Some(_), Some(_)) => Method::History,
        _ => Method::Diff {
            reason: if !same_history {
                match *mirrored_cluster {
                    Some(id) if id != old_head.cluster_id => format!(
                        "the old primary is cluster {:x}, not {id:x} that the standby mirrored (rebuilt or restored?)",
                        old_head.cluster_id
                    ),
                    Some(_) => format!(
                        "the old primary's revision {} is behind the checkpoint {checkpoint_revision} (restored from a backup?)",
                        old_head.revision
                    ),
                    None => "the standby has no checkpoint".to_string(),
                }
            } else if old_changes.is_none() {
                format!("the old primary's history is compacted past the checkpoint {checkpoint_revision}")
            } else if standby_base.is_none() {
                "the promotion record does not say where the standby's history starts (promoted by an older version)".to_string()
            } else {
                format!(
                    "the standby's history is compacted past revision {}",
                    standby_base.unwrap_or(0)
                )
            },
        },
    };
    let candidates = match &method {
        Method::History => dirty_set(old_changes.as_ref(), standby_changes.as_ref()),
        Method::Diff { reason } => {
            warn!(job = %name, %reason, "Failback falls back to the full diff of both prefixes.");
            diff_candidates(
                name,
                old_primary,
                old_revision,
                standby,
                standby_revision,
                page_size,
                cancel,
            )
            .await?
        }
    };
    Ok(Dirty {
        old_revision,
        old_changes,
        standby_base,
        standby_changes,
        method,
        candidates,
    })
}

/// Phase 4, the plan: both sides' state of every candidate, the writes that make
/// the old primary equal the standby, and the lost writes.
async fn plan(
    name: &str,
    options: &FailbackOptions,
    parting: &Parting,
    dirty: Dirty,
    old_primary: &SideView<'_>,
    standby: &SideView<'_>,
) -> Result<Plan, FailbackError> {
    let Dirty {
        old_revision,
        old_changes,
        standby_base,
        standby_changes,
        method,
        candidates,
    } = dirty;
    let (checkpoint_revision, same_history) = (parting.checkpoint_revision, parting.same_history);
    let standby_revision = parting.standby_head.revision;
    let old_state = old_primary.read_at(&candidates, old_revision).await?;
    let standby_state = standby.read_at(&candidates, standby_revision).await?;
    // Without the old primary's history, the standby's state at its base
    // (the old primary's at the checkpoint) tells a lost delete.
    let standby_at_base = match (&old_changes, &standby_changes, standby_base) {
        (None, Some(_), Some(base)) => Some(standby.read_at(&candidates, base).await?),
        _ => None,
    };
    let knowledge = Knowledge {
        old_primary: old_changes.as_ref(),
        standby_at_base: standby_at_base.as_ref(),
        checkpoint: checkpoint_revision,
        same_history,
    };
    let found = divergences(&candidates, &old_state, &standby_state, &knowledge);
    let lost: Vec<LostWrite> = found
        .iter()
        .filter(|d| d.loss != Loss::None)
        .map(|d| LostWrite {
            job: name.to_string(),
            loss: d.loss,
            key: Bytes::new(&old_primary.key(&d.suffix)),
            old_primary: SideState::of(
                d.old_primary.as_ref(),
                old_changes
                    .as_ref()
                    .and_then(|c| c.deleted.get(&d.suffix).copied())
                    .or(Some(0)),
            ),
            standby: SideState::of(d.standby.as_ref(), None),
        })
        .collect();
    let report = FailbackReport {
        job: name.to_string(),
        dry_run: options.dry_run,
        method,
        checkpoint: checkpoint_revision,
        old_primary_revision: old_revision,
        standby_revision,
        old_primary_changed: old_changes.as_ref().map(Changes::len),
        standby_changed: standby_changes.as_ref().map(Changes::len),
        candidates: candidates.len(),
        puts: found.iter().filter(|d| d.standby.is_some()).count(),
        deletes: found.iter().filter(|d| d.standby.is_none()).count(),
        lost_writes: lost.iter().filter(|l| l.loss == Loss::Certain).count(),
        possible_lost_writes: lost.iter().filter(|l| l.loss == Loss::Possible).count(),
        written_without_lease: found
            .iter()
            .filter(|d| d.standby.as_ref().is_some_and(|h| h.lease != 0))
            .count(),
        bytes_read_old_primary: 0,
        bytes_read_standby: 0,
        final_old_primary_revision: None,
        lost_writes_file: None,
        lost,
    };
    Ok(Plan {
        found,
        standby_state,
        report,
    })
}

/// Phase 6, the handover to the reverse job, once proved: the old primary's prefix
/// changed only by this run's writes since it was read (a client still
/// writing to it is not stopped by the fence), and the handover itself
/// applies only if nothing changed it since that proof. Returns the
/// handover's revision.
#[allow(clippy::too_many_arguments)]
async fn hand_over(
    job: &FailbackJob,
    options: &FailbackOptions,
    keys: &MetaKeys,
    parting: &Parting,
    plan: &Plan,
    old_primary: &SideView<'_>,
    standby: &SideView<'_>,
    fence_bytes: &[u8],
    cancel: &CancellationToken,
) -> Result<i64, FailbackError> {
    let name = job.name.as_str();
    let old_revision = plan.report.old_primary_revision;
    let standby_revision = parting.standby_head.revision;
    let standby_head = &parting.standby_head;
    let rewrite = old_primary.rewrite;
    let old_primary_cluster = old_primary.cluster;
    let fence_compare = Compare::value(keys.promoted(), CompareOp::Equal, fence_bytes.to_vec());
    let verified_at = old_primary_cluster.head(old_primary.prefix).await?.revision;
    verify_only_ours(
        name,
        old_primary,
        old_revision,
        verified_at,
        &plan.found,
        cancel,
    )
    .await?;
    let old_keys = old_primary.count_at(verified_at).await?;
    let standby_keys = standby.count_at(standby_revision).await?;
    if old_keys != standby_keys {
        return Err(FailbackError::CountMismatch {
            job: name.to_string(),
            old_primary: old_keys,
            standby: standby_keys,
        });
    }
    let last_event = plan
        .standby_state
        .iter()
        .max_by_key(|(_, held)| held.mod_revision)
        .map(|(suffix, held)| {
            EventStamp::put(&standby.key(suffix), &held.value, held.mod_revision)
        });
    let reverse = CheckpointOf {
        instance: options.instance.clone(),
        source_prefix: job.dest_prefix.clone(),
        dest_prefix: job.prefix.clone(),
        // The reverse job's source is the standby: the same ranges, as its
        // prefixes (left out here, so a reverse job that copies them
        // takes a full sync).
        excluded: rewrite
            .excluded_dest_prefixes()
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .collect(),
        leases_mirrored: job.leases_faithful && plan.report.written_without_lease == 0,
    }
    .at(
        (standby_revision, standby_head.cluster_id),
        rand::random(),
        last_event,
        None,
    );
    let range_delete = |prefix: String| Op::Delete {
        range_end: prefix_range_end(prefix.as_bytes()),
        key: prefix.into_bytes(),
    };
    let mut compares = vec![fence_compare.clone()];
    compares.extend(old_primary.unchanged_since(verified_at));
    let reverse_bytes = reverse.encode();
    let handover = TxnRequest::new()
        .when(compares)
        .and_then(vec![
            Op::put(keys.checkpoint(), reverse_bytes.clone()),
            Op::delete(keys.full_sync()),
            Op::delete(keys.reset_request()),
            range_delete(keys.lease_records()),
            range_delete(keys.revision_map()),
            Op::delete(keys.promoted()),
        ])
        .or_else(vec![Op::get(keys.promoted())]);
    let response = old_primary_cluster
        .txn("write the reverse job's checkpoint", handover)
        .await?;
    if !response.succeeded {
        let fence_holds = response
            .ranges()
            .next()
            .and_then(|r| r.kvs.first())
            .is_some_and(|kv| kv.value == fence_bytes);
        if !fence_holds {
            return Err(FailbackError::Fenced {
                job: name.to_string(),
            });
        }
        return Err(FailbackError::Conflict {
            job: name.to_string(),
            key: old_primary.changed_after(verified_at).await?,
        });
    }
    // A delete leaves no mod revision to compare: the count just before
    // the handover says whether one happened after the proof. If so, the
    // fence goes back up (the reverse job must not start from a checkpoint
    // the old primary does not match) and the key is named.
    let handed_over = response.header.revision;
    if old_primary.count_at(handed_over - 1).await? != old_keys {
        let refence = TxnRequest::new()
            .when(vec![Compare::value(
                keys.checkpoint(),
                CompareOp::Equal,
                reverse_bytes,
            )])
            .and_then(vec![
                Op::put(keys.promoted(), fence_bytes.to_vec()),
                Op::delete(keys.checkpoint()),
            ]);
        old_primary_cluster
            .txn("fence the old primary again", refence)
            .await?;
        let deleted = changes_since(name, old_primary, verified_at, handed_over - 1, cancel)
            .await?
            .and_then(|changes| changes.deleted.keys().next().cloned())
            .map_or_else(
                || "(a key deleted meanwhile)".to_string(),
                |suffix| String::from_utf8_lossy(&old_primary.key(&suffix)).into_owned(),
            );
        return Err(FailbackError::Conflict {
            job: name.to_string(),
            key: deleted,
        });
    }
    Ok(response.header.revision)
}

/// Proves the old primary's prefix changed only by this run's writes
/// between `read_at` (when its state was read) and `verified_at`: every key
/// changed since is one this run wrote, and holds what it wrote.
async fn verify_only_ours(
    job: &str,
    old_primary: &SideView<'_>,
    read_at: i64,
    verified_at: i64,
    written: &[Divergence],
    cancel: &CancellationToken,
) -> Result<(), FailbackError> {
    let Some(changes) = changes_since(job, old_primary, read_at, verified_at, cancel).await? else {
        return Err(FailbackError::History {
            job: job.to_string(),
            side: "old primary",
            what: format!(
                "since revision {read_at} is compacted: failback cannot prove nothing else wrote there while it ran; raise the old primary's compaction retention and run failback again"
            ),
        });
    };
    let ours: BTreeMap<&[u8], Option<&Held>> = written
        .iter()
        .map(|d| (d.suffix.as_slice(), d.standby.as_ref()))
        .collect();
    let foreign = changes
        .written
        .iter()
        .find(|(suffix, now)| {
            !matches!(ours.get(suffix.as_slice()), Some(Some(held)) if held.value == now.value)
        })
        .map(|(suffix, _)| suffix)
        .or_else(|| {
            changes
                .deleted
                .keys()
                .find(|suffix| !matches!(ours.get(suffix.as_slice()), Some(None)))
        });
    match foreign {
        None => Ok(()),
        Some(suffix) => Err(FailbackError::Conflict {
            job: job.to_string(),
            key: String::from_utf8_lossy(&old_primary.key(suffix)).into_owned(),
        }),
    }
}

/// Splits the writes into txns within the job's `--max-txn-ops` (one op
/// and one compare per key, plus the fence) and `--max-txn-bytes`; a key
/// larger than the byte limit goes alone, as the replicator sends it.
fn txn_chunks(writes: &[Divergence], max_ops: usize, max_bytes: usize) -> Vec<&[Divergence]> {
    let max_keys = max_ops.saturating_sub(1).clamp(1, KEYS_PER_TXN);
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, write) in writes.iter().enumerate() {
        let size = write.suffix.len() + write.standby.as_ref().map_or(0, |h| h.value.len());
        if index > start && (index - start >= max_keys || bytes + size > max_bytes) {
            chunks.push(&writes[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < writes.len() {
        chunks.push(&writes[start..]);
    }
    chunks
}

/// Puts this run's record in the job's promoted marker on the old
/// primary, replacing whatever marker was there (a stale one from an
/// earlier promotion of that cluster) only if it is still what was read.
async fn fence(
    cluster: &Cluster,
    keys: &MetaKeys,
    job: &str,
    standby_cluster_id: u64,
    by: &str,
) -> Result<Vec<u8>, FailbackError> {
    let current = cluster
        .range(
            "read the old primary's marker",
            RangeRequest::key(keys.promoted()),
        )
        .await?
        .kvs
        .pop();
    let record = PromotionRecord {
        promoted_at: now_rfc3339(),
        by: by.to_string(),
        failback: Some(FailbackFence {
            id: rand::random(),
            started_at: now_rfc3339(),
            by: by.to_string(),
            standby_cluster_id,
        }),
        ..PromotionRecord::default()
    };
    let bytes = record.encode();
    let unchanged = match &current {
        Some(kv) => Compare::value(keys.promoted(), CompareOp::Equal, kv.value.clone()),
        None => Compare::version(keys.promoted(), CompareOp::Equal, 0),
    };
    let txn = TxnRequest::new()
        .when(vec![unchanged])
        .and_then(vec![Op::put(keys.promoted(), bytes.clone())]);
    if !cluster.txn("fence the old primary", txn).await?.succeeded {
        return Err(FailbackError::Fenced {
            job: job.to_string(),
        });
    }
    Ok(bytes)
}

/// One txn of writes to the old primary, each guarded on its key as read.
async fn write_chunk(
    cluster: &Cluster,
    side: &SideView<'_>,
    keys: &MetaKeys,
    fence_compare: &Compare,
    job: &str,
    chunk: &[Divergence],
) -> Result<(), FailbackError> {
    let mut compares = vec![fence_compare.clone()];
    let mut ops = Vec::with_capacity(chunk.len());
    for divergence in chunk {
        let key = side.key(&divergence.suffix);
        compares.push(match &divergence.old_primary {
            Some(held) => Compare::mod_revision(key.clone(), CompareOp::Equal, held.mod_revision),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        });
        // Written without a lease: the standby's leases do not exist here.
        ops.push(match &divergence.standby {
            Some(held) => Op::put(key, held.value.clone()),
            None => Op::delete(key),
        });
    }
    let txn = TxnRequest::new()
        .when(compares)
        .and_then(ops)
        .or_else(vec![Op::get(keys.promoted())]);
    let response = cluster.txn("copy the standby's keys back", txn).await?;
    if response.succeeded {
        return Ok(());
    }
    let fence_holds = response
        .ranges()
        .next()
        .and_then(|r| r.kvs.first())
        .is_some_and(|kv| match &fence_compare.target {
            crate::etcd::api::CompareTarget::Value(v) => &kv.value == v,
            _ => false,
        });
    if !fence_holds {
        return Err(FailbackError::Fenced {
            job: job.to_string(),
        });
    }
    // Name the key that moved: read them again.
    let suffixes: Vec<Vec<u8>> = chunk.iter().map(|d| d.suffix.clone()).collect();
    let now = side.read_at(&suffixes, 0).await?;
    let moved = chunk
        .iter()
        .find(|d| {
            now.get(&d.suffix).map(|h| h.mod_revision)
                != d.old_primary.as_ref().map(|h| h.mod_revision)
        })
        .map(|d| String::from_utf8_lossy(&side.key(&d.suffix)).into_owned())
        .unwrap_or_else(|| "(unknown)".to_string());
    Err(FailbackError::Conflict {
        job: job.to_string(),
        key: moved,
    })
}

/// Writes the lost writes as JSON lines to a new file and syncs it to
/// disk, so they are saved before the first overwrite.
/// The first job of a run creates the file (never over an existing one);
/// later jobs of the same run append to it.
/// Whether the lost writes can be saved to `path`: a new file (or, with
/// `append`, an existing one) that can be written. Creates nothing that
/// stays: a probe file is created and removed.
pub fn check_lost_writes_file(path: &Path, append: bool) -> Result<(), FailbackError> {
    let file_error = |source: std::io::Error| FailbackError::LostWritesFile {
        path: path.to_path_buf(),
        source,
    };
    if append {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(file_error);
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(FailbackError::LostWritesFileExists {
            path: path.to_path_buf(),
        });
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => {
            drop(file);
            std::fs::remove_file(path).map_err(file_error)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(FailbackError::LostWritesFileExists {
                path: path.to_path_buf(),
            })
        }
        Err(error) => Err(file_error(error)),
    }
}

fn save_lost_writes(path: &Path, lost: &[LostWrite], append: bool) -> Result<(), FailbackError> {
    let file_error = |source: std::io::Error| FailbackError::LostWritesFile {
        path: path.to_path_buf(),
        source,
    };
    let mut open = std::fs::OpenOptions::new();
    if append {
        open.append(true);
    } else {
        open.write(true).create_new(true);
    }
    let mut file = match open.open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(FailbackError::LostWritesFileExists {
                path: path.to_path_buf(),
            })
        }
        Err(error) => return Err(file_error(error)),
    };
    let mut text = String::new();
    for line in lost {
        text.push_str(&serde_json::to_string(line).expect("a lost write serializes"));
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(file_error)?;
    file.sync_all().map_err(file_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::etcd::memory::{new_store, Link, MemoryEtcd, SharedStore};
    use crate::model::schema::Checkpoint;

    const META: &str = "/meta/";

    fn cluster(store: &SharedStore, role: Role, name: &str) -> Cluster {
        Cluster::with_backend(
            role,
            name,
            Arc::new(MemoryEtcd::new(store.clone(), Link::new(name, 7))),
            Duration::from_secs(5),
        )
    }

    async fn apply(cluster: &Cluster, ops: Vec<Op>) {
        for op in ops {
            let response = cluster
                .txn("test write", TxnRequest::new().and_then(vec![op]))
                .await
                .expect("write");
            assert!(response.succeeded);
        }
    }

    fn state(store: &SharedStore, prefix: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
        store
            .lock()
            .unwrap()
            .current()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, kv)| (k[prefix.len()..].to_vec(), kv.value))
            .collect()
    }

    /// The standby's checkpoint at the old primary's current revision (its
    /// copy is complete), then the promotion.
    async fn checkpoint_and_promote(a: &SharedStore, standby: &Cluster) {
        let checkpoint = Checkpoint {
            last_synced_rev: a.lock().unwrap().revision(),
            source_cluster_id: 1,
            updated_at: now_rfc3339(),
            instance: "r0".into(),
            source_prefix: "/app/".into(),
            dest_prefix: Some("/copy/".into()),
            partial_revision: None,
            write_id: 1,
            last_event: None,
            leases_mirrored: false,
            excluded: None,
            revision_exact: false,
            exact_gaps: Vec::new(),
        };
        let meta = MetaKeys::new(META, "app");
        apply(
            standby,
            vec![Op::put(meta.checkpoint(), checkpoint.encode())],
        )
        .await;
        crate::ops::admin::promote(standby, META, "app", "test")
            .await
            .expect("promote");
    }

    struct World {
        a: SharedStore,
        b: SharedStore,
        old_primary: Cluster,
        standby: Cluster,
        job: FailbackJob,
        dir: tempfile::TempDir,
    }

    /// A mirrored into B (as `/copy/`), B promoted at A's revision; then
    /// A changes 10 keys the standby never sees and B changes 4 of its own.
    async fn diverged() -> World {
        let (a, b) = (new_store(1), new_store(2));
        let old_primary = cluster(&a, Role::Source, "a");
        let standby = cluster(&b, Role::Destination, "b");
        let keys: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
        apply(
            &old_primary,
            keys.iter()
                .map(|k| Op::put(format!("/app/{k}"), "v0"))
                .collect(),
        )
        .await;
        apply(
            &standby,
            keys.iter()
                .map(|k| Op::put(format!("/copy/{k}"), "v0"))
                .collect(),
        )
        .await;
        checkpoint_and_promote(&a, &standby).await;
        // The old primary's writes that never reached the standby.
        apply(
            &old_primary,
            vec![
                Op::put("/app/n0", "new"),
                Op::put("/app/n1", "new"),
                Op::put("/app/n2", "new"),
                Op::put("/app/k00", "a"),
                Op::put("/app/k01", "a"),
                Op::put("/app/k02", "a"),
                Op::delete("/app/k03"),
                Op::delete("/app/k04"),
                Op::delete("/app/k05"),
                Op::delete("/app/k06"),
                Op::put("/app/k06", "again"),
                // Created and deleted again: no change at all.
                Op::put("/app/t0", "x"),
                Op::delete("/app/t0"),
            ],
        )
        .await;
        // The promoted standby's own writes.
        apply(
            &standby,
            vec![
                Op::put("/copy/b0", "b"),
                Op::put("/copy/k10", "b"),
                Op::delete("/copy/k11"),
                Op::put("/copy/k00", "b"),
            ],
        )
        .await;
        World {
            a,
            b,
            old_primary,
            standby,
            job: FailbackJob {
                name: "app".into(),
                prefix: "/app/".into(),
                dest_prefix: "/copy/".into(),
                meta_prefix: META.into(),
                exclude_prefixes: Vec::new(),
                page_size: 7,
                max_txn_ops: 128,
                max_txn_bytes: 1 << 20,
                leases_faithful: true,
            },
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    impl World {
        async fn run(&self, dry_run: bool) -> Result<FailbackReport, FailbackError> {
            let options = FailbackOptions {
                dry_run,
                lost_writes_file: Some(self.dir.path().join("lost.jsonl")),
                append_lost_writes: false,
                instance: "ops".into(),
            };
            failback(
                &self.old_primary,
                &self.standby,
                &self.job,
                &options,
                &CancellationToken::new(),
            )
            .await
        }

        fn lost_keys(&self) -> Vec<(String, String)> {
            let text = std::fs::read_to_string(self.dir.path().join("lost.jsonl")).expect("file");
            text.lines()
                .map(|line| {
                    let v: serde_json::Value = serde_json::from_str(line).expect("json");
                    (
                        v["key"].as_str().unwrap().to_string(),
                        v["loss"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        }
    }

    const LOST: [&str; 10] = [
        "/app/k00", "/app/k01", "/app/k02", "/app/k03", "/app/k04", "/app/k05", "/app/k06",
        "/app/n0", "/app/n1", "/app/n2",
    ];

    #[tokio::test]
    async fn failback_copies_only_the_changed_keys_and_saves_every_lost_write() {
        let world = diverged().await;
        let before = world.a.lock().unwrap().revision();
        let report = world.run(false).await.expect("failback");
        assert_eq!(report.method, Method::History);
        assert_eq!(state(&world.a, "/app/"), state(&world.b, "/copy/"));
        assert_eq!(
            (report.old_primary_changed, report.standby_changed),
            (Some(10), Some(4))
        );
        assert_eq!(report.candidates, 13, "k00 changed on both sides");
        let lost = world.lost_keys();
        assert_eq!(
            lost.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            LOST
        );
        assert!(lost.iter().all(|(_, loss)| loss == "certain"));
        // The fence, one txn of writes, the handover.
        assert_eq!(world.a.lock().unwrap().revision(), before + 3);
        let meta = MetaKeys::new(META, "app");
        let a_now = world.a.lock().unwrap().current();
        assert!(
            !a_now.contains_key(meta.promoted().as_bytes()),
            "the fence is gone"
        );
        let reverse: Checkpoint =
            serde_json::from_slice(&a_now[meta.checkpoint().as_bytes()].value).expect("checkpoint");
        assert_eq!(reverse.last_synced_rev, report.standby_revision);
        assert_eq!(reverse.source_cluster_id, 2);
        assert_eq!(
            (
                reverse.source_prefix.as_str(),
                reverse.dest_prefix.as_deref()
            ),
            ("/copy/", Some("/app/"))
        );
        let stamp = reverse
            .last_event
            .expect("a last event for the resume check");
        assert_eq!(stamp.key(), Some(b"/copy/k00".to_vec()));
        // A second run finds no promoted standby... the standby is still
        // promoted, and the old primary now equals it: nothing to do, but
        // the file must not be replaced.
        assert!(matches!(
            world.run(false).await,
            Err(FailbackError::LostWritesFileExists { .. })
        ));
    }

    /// O8: a lost-writes file that exists, or cannot be created, is
    /// refused before the fence: the old primary is not written at all.
    #[tokio::test]
    async fn a_bad_lost_writes_file_is_refused_before_the_fence() {
        let world = diverged().await;
        let before = world.a.lock().unwrap().revision();
        std::fs::write(world.dir.path().join("lost.jsonl"), "earlier run\n").unwrap();
        assert!(matches!(
            world.run(false).await,
            Err(FailbackError::LostWritesFileExists { .. })
        ));
        assert_eq!(
            world.a.lock().unwrap().revision(),
            before,
            "nothing written"
        );
        std::fs::remove_file(world.dir.path().join("lost.jsonl")).unwrap();
        let unwritable = FailbackOptions {
            dry_run: false,
            lost_writes_file: Some(world.dir.path().join("no-such-dir/lost.jsonl")),
            append_lost_writes: false,
            instance: "ops".into(),
        };
        let refused = failback(
            &world.old_primary,
            &world.standby,
            &world.job,
            &unwritable,
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(&refused, Err(error @ FailbackError::LostWritesFile { .. }) if error.is_usage()),
            "{refused:?}"
        );
        assert_eq!(
            world.a.lock().unwrap().revision(),
            before,
            "nothing written"
        );
        assert!(
            !world.dir.path().join("lost.jsonl").exists(),
            "the probe leaves no file"
        );
        world
            .run(false)
            .await
            .expect("a good file: the failback runs");
    }

    #[tokio::test]
    async fn a_dry_run_changes_nothing() {
        let world = diverged().await;
        let before = world.a.lock().unwrap().current();
        let report = world.run(true).await.expect("dry run");
        assert_eq!(world.a.lock().unwrap().current(), before);
        assert_eq!(
            (report.puts, report.deletes, report.lost_writes),
            (9, 4, 10)
        );
        assert!(!world.dir.path().join("lost.jsonl").exists());
    }

    #[tokio::test]
    async fn a_compacted_old_primary_falls_back_to_the_diff_and_still_names_the_losses() {
        let world = diverged().await;
        let head = world.a.lock().unwrap().revision();
        world.a.lock().unwrap().compact(head);
        let report = world.run(false).await.expect("failback");
        assert!(
            matches!(report.method, Method::Diff { .. }),
            "{:?}",
            report.method
        );
        assert_eq!(state(&world.a, "/app/"), state(&world.b, "/copy/"));
        let lost = world.lost_keys();
        // Puts by their mod revision, deletes because the standby's history
        // shows it never touched those keys: all certain.
        assert_eq!(
            lost.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            LOST
        );
        assert!(lost.iter().all(|(_, loss)| loss == "certain"), "{lost:?}");
    }

    #[tokio::test]
    async fn with_both_histories_compacted_a_delete_is_only_possible() {
        let world = diverged().await;
        for store in [&world.a, &world.b] {
            let head = store.lock().unwrap().revision();
            store.lock().unwrap().compact(head);
        }
        let report = world.run(false).await.expect("failback");
        assert_eq!(state(&world.a, "/app/"), state(&world.b, "/copy/"));
        let lost = world.lost_keys();
        let possible: Vec<&str> = lost
            .iter()
            .filter(|(_, l)| l == "possible")
            .map(|(k, _)| k.as_str())
            .collect();
        // Deleted on the old primary, or created on the standby: no
        // history left says which. k11, deleted by the standby, is not a
        // loss: the old primary's copy predates the checkpoint.
        assert_eq!(possible, ["/app/b0", "/app/k03", "/app/k04", "/app/k05"]);
        assert_eq!(report.possible_lost_writes, 4);
        assert_eq!(report.lost_writes, 7);
    }

    #[tokio::test]
    async fn a_write_on_the_old_primary_during_failback_is_never_overwritten() {
        let world = diverged().await;
        // A client still writing to the old primary: the dirty key it
        // changes must fail its guard, not be overwritten.
        let fence_keys = MetaKeys::new(META, "app");
        let fence_bytes = fence(&world.old_primary, &fence_keys, "app", 2, "ops")
            .await
            .expect("fence");
        let rewrite = KeyRewrite::new("/app/", "/copy/");
        let old_primary = SideView {
            name: "old primary",
            cluster: &world.old_primary,
            prefix: b"/app/",
            meta_prefix: META.as_bytes(),
            rewrite: &rewrite,
            excluded: Vec::new(),
            page: 2,
            traffic: Traffic::default(),
        };
        let read = old_primary
            .read_at(&[b"n0".to_vec()], 0)
            .await
            .expect("read");
        apply(&world.old_primary, vec![Op::put("/app/n0", "client")]).await;
        let divergence = Divergence {
            suffix: b"n0".to_vec(),
            old_primary: read.get(b"n0".as_slice()).cloned(),
            standby: None,
            loss: Loss::Certain,
        };
        let compare = Compare::value(fence_keys.promoted(), CompareOp::Equal, fence_bytes);
        let outcome = write_chunk(
            &world.old_primary,
            &old_primary,
            &fence_keys,
            &compare,
            "app",
            &[divergence],
        )
        .await;
        assert!(
            matches!(outcome, Err(FailbackError::Conflict { ref key, .. }) if key == "/app/n0"),
            "{outcome:?}"
        );
        assert_eq!(state(&world.a, "/app/")[b"n0".as_slice()], b"client");
    }

    proptest::proptest! {
        /// Every write lands in exactly one txn, in order, within the op
        /// limit, and within the byte limit unless it is alone.
        #[test]
        fn txn_chunks_cover_every_write_within_the_limits(sizes in proptest::collection::vec(0usize..300, 0..200),
                                                          max_ops in 2usize..140, max_bytes in 1usize..2000) {
            let writes: Vec<Divergence> = sizes.iter().enumerate().map(|(i, size)| Divergence {
                suffix: format!("{i:04}").into_bytes(),
                old_primary: None,
                standby: Some(Held { value: vec![0; *size], mod_revision: 1, create_revision: 1, lease: 0 }),
                loss: Loss::None,
            }).collect();
            let chunks = txn_chunks(&writes, max_ops, max_bytes);
            let flat: Vec<&Divergence> = chunks.iter().flat_map(|c| c.iter()).collect();
            proptest::prop_assert_eq!(flat.len(), writes.len());
            for (a, b) in flat.iter().zip(&writes) {
                proptest::prop_assert_eq!(&a.suffix, &b.suffix);
            }
            for chunk in chunks {
                proptest::prop_assert!(!chunk.is_empty());
                proptest::prop_assert!(chunk.len() < max_ops.max(2) && chunk.len() <= KEYS_PER_TXN);
                let bytes: usize = chunk.iter().map(|d| d.suffix.len() + d.standby.as_ref().unwrap().value.len()).sum();
                proptest::prop_assert!(bytes <= max_bytes || chunk.len() == 1);
            }
        }
    }

    #[tokio::test]
    async fn the_wrong_direction_or_the_wrong_prefix_is_refused_before_any_write() {
        let world = diverged().await;
        // A fenced old primary given as the standby: the operator swapped the sides.
        let keys = MetaKeys::new(META, "app");
        fence(&world.old_primary, &keys, "app", 2, "ops")
            .await
            .expect("fence");
        let options = FailbackOptions::default();
        let swapped = FailbackJob {
            prefix: "/copy/".into(),
            dest_prefix: "/app/".into(),
            ..world.job.clone()
        };
        let before = world.b.lock().unwrap().revision();
        let outcome = failback(
            &world.standby,
            &world.old_primary,
            &swapped,
            &options,
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(outcome, Err(FailbackError::WrongDirection { .. })),
            "{outcome:?}"
        );
        let wrong_prefix = FailbackJob {
            dest_prefix: "/elsewhere/".into(),
            ..world.job.clone()
        };
        let outcome = failback(
            &world.old_primary,
            &world.standby,
            &wrong_prefix,
            &options,
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(
                outcome,
                Err(FailbackError::PrefixMismatch {
                    field: "--dest-prefix",
                    ..
                })
            ),
            "{outcome:?}"
        );
        assert!(outcome.unwrap_err().is_usage());
        assert_eq!(
            world.b.lock().unwrap().revision(),
            before,
            "nothing written"
        );
    }

    /// The old primary as a failback side, reading written keys 2 a page.
    fn side_of<'a>(cluster: &'a Cluster, rewrite: &'a KeyRewrite) -> SideView<'a> {
        SideView {
            name: "old primary",
            cluster,
            prefix: b"/app/",
            meta_prefix: META.as_bytes(),
            rewrite,
            excluded: Vec::new(),
            page: 2,
            traffic: Traffic::default(),
        }
    }

    /// The history read at `at` sees nothing written after it, reads only
    /// the prefix's written keys (over several pages), and a base equal
    /// to `at` is an empty history, not an unknown one.
    #[tokio::test]
    async fn the_written_since_read_is_pinned_paged_and_bounded_to_the_prefix() {
        let store = new_store(1);
        let old_primary = cluster(&store, Role::Source, "a");
        apply(
            &old_primary,
            vec![Op::put("/app/k1", "v"), Op::put("/app/k2", "v")],
        )
        .await;
        let base = store.lock().unwrap().revision();
        let token = CancellationToken::new();
        let rewrite = KeyRewrite::new("/app/", "/app/");
        let side = side_of(&old_primary, &rewrite);
        let empty = changes_since("app", &side, base, base, &token)
            .await
            .expect("read");
        assert_eq!(empty, Some(Changes::default()));
        apply(
            &old_primary,
            vec![
                Op::put("/aaa", "before the prefix"),
                Op::put("/app/k1", "w"),
                Op::put("/app/n1", "new"),
                Op::put("/app/n2", "new"),
                Op::put("/zzz", "after the prefix"),
            ],
        )
        .await;
        let at = store.lock().unwrap().revision();
        apply(&old_primary, vec![Op::put("/app/n3", "after at")]).await;
        let side = side_of(&old_primary, &rewrite);
        let changes = changes_since("app", &side, base, at, &token)
            .await
            .expect("read")
            .expect("history");
        let written: Vec<&[u8]> = changes.written.keys().map(Vec::as_slice).collect();
        assert_eq!(written, [b"k1".as_slice(), b"n1", b"n2"]);
        assert!(changes.deleted.is_empty());
        let bytes: usize = ["/app/k1w", "/app/n1new", "/app/n2new"]
            .iter()
            .map(|s| s.len())
            .sum();
        assert_eq!(
            side.traffic.get(),
            bytes as u64,
            "only the prefix's written keys are read"
        );
    }

    #[tokio::test]
    async fn an_unreachable_side_is_an_error_not_a_compacted_history() {
        let world = diverged().await;
        let rewrite = KeyRewrite::new("/app/", "/copy/");
        let link = Link::new("cut", 9);
        link.set_faults(crate::etcd::memory::Faults {
            partitioned: true,
            ..Default::default()
        });
        let cut = Cluster::with_backend(
            Role::Source,
            "cut",
            Arc::new(MemoryEtcd::new(world.a.clone(), link)),
            Duration::from_millis(200),
        );
        let side = side_of(&cut, &rewrite);
        let outcome = changes_since("app", &side, 1, 5, &CancellationToken::new()).await;
        assert!(
            matches!(outcome, Err(FailbackError::Client(_))),
            "{outcome:?}"
        );
    }

    /// k0..k3 written one revision each (k3 at the checkpoint itself),
    /// mirrored, the standby promoted, then `a_ops` on the old primary.
    async fn seeded(a_ops: Vec<Op>) -> World {
        let (a, b) = (new_store(1), new_store(2));
        let old_primary = cluster(&a, Role::Source, "a");
        let standby = cluster(&b, Role::Destination, "b");
        for k in ["k0", "k1", "k2", "k3"] {
            apply(&old_primary, vec![Op::put(format!("/app/{k}"), "v0")]).await;
            apply(&standby, vec![Op::put(format!("/copy/{k}"), "v0")]).await;
        }
        checkpoint_and_promote(&a, &standby).await;
        apply(&old_primary, a_ops).await;
        let mut world = diverged().await;
        (world.a, world.b, world.old_primary, world.standby) = (a, b, old_primary, standby);
        world
    }

    /// The delete watch stops on the count, never on a timeout: a delete at
    /// exactly the revision read (a dry run reads at the head), a key
    /// deleted and created again, a key created at the checkpoint itself.
    /// On paused time a watch left waiting would end in its silence error.
    #[tokio::test(start_paused = true)]
    async fn every_delete_up_to_the_read_revision_is_counted() {
        let world = seeded(vec![
            Op::put("/app/k3", "a"),
            Op::delete("/app/k0"),
            Op::delete("/app/k2"),
            Op::put("/app/k2", "again"),
            Op::delete("/app/k1"),
        ])
        .await;
        let report = world.run(true).await.expect("dry run");
        assert_eq!(report.method, Method::History);
        assert_eq!(report.old_primary_changed, Some(4));
        let lost: Vec<String> = report
            .lost
            .iter()
            .map(|l| {
                serde_json::to_value(l).unwrap()["key"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(lost, ["/app/k0", "/app/k1", "/app/k2", "/app/k3"]);
        // Only deletes of keys created again: the count is met without a watch.
        let recreated = seeded(vec![Op::delete("/app/k2"), Op::put("/app/k2", "again")]).await;
        let report = recreated.run(true).await.expect("dry run");
        assert_eq!(
            (report.old_primary_changed, report.lost_writes),
            (Some(1), 1)
        );
    }

    #[tokio::test]
    async fn an_unpromoted_standby_is_refused() {
        let world = diverged().await;
        let meta = MetaKeys::new(META, "app");
        apply(&world.standby, vec![Op::delete(meta.promoted())]).await;
        assert!(matches!(
            world.run(false).await,
            Err(FailbackError::NotPromoted { .. })
        ));
    }
}
