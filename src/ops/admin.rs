//! Operator commands that read or set a job's state on the destination:
//! `status` and `promote`.

use std::collections::BTreeMap;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use serde::Serialize;

use crate::etcd::api::{Compare, CompareOp, Op, RangeRequest, TxnRequest};
use crate::etcd::client::{ClientError, Cluster};
use crate::mirror::meta::{Checkpoint, FullSyncMarker};
use crate::model::keys::MetaKeys;
use crate::model::schema::{LeftBehind, LockValue, PromotionRecord, RevisionSample};
use crate::telemetry::clock::now_rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no job state under meta prefix {meta_prefix:?} on the destination; check --dst-endpoints and --meta-prefix")]
    NoJobs { meta_prefix: String },
    #[error("no job named {job:?} under the meta prefix; known jobs: {known}")]
    UnknownJob { job: String, known: String },
    #[error("job {job} is not promoted (or its promotion was undone meanwhile); leases are detached only on a promoted job")]
    NotPromoted { job: String },
    #[error(
        "job {job} has no checkpoint, so its destination prefix is unknown; no lease was detached"
    )]
    NoDestPrefix { job: String },
    #[error(transparent)]
    Page(#[from] crate::etcd::pager::PageError),
    /// A point-in-time promotion asked for a state the destination's
    /// history no longer holds (or never held).
    #[error("job {job}: {requested} is outside the destination's history window: the oldest state a point-in-time promotion can reach is {reachable}; nothing was written. Ask for a later point, or keep more history on the destination (raise its --auto-compaction-retention)")]
    OutsideWindow {
        job: String,
        requested: String,
        /// "source revision N (updated_at)", or why nothing is reachable.
        reachable: String,
    },
    /// A point-in-time promotion asked for a source revision the standby
    /// never reached.
    #[error("job {job}: the standby has reached source revision {reached}; what the source held at revision {requested} is not known here, so nothing was written. Ask for a revision at or before {reached}, or run `promote` without --at-source-revision for the newest state")]
    NotReached {
        job: String,
        requested: i64,
        reached: i64,
    },
    #[error("job {job}: the checkpoint reached revision {reached} but not the source revision {target} within {timeout:?}; nothing was promoted")]
    SyncTimeout {
        job: String,
        reached: i64,
        target: i64,
        timeout: Duration,
    },
}

/// One job as the destination's meta keys describe it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct JobStatus {
    pub job: String,
    /// The instance holding the job lock.
    pub leader: Option<String>,
    /// Instances queued for the lock, the leader included.
    pub instances: usize,
    pub last_synced_revision: Option<i64>,
    pub checkpoint_updated_at: Option<String>,
    pub source_prefix: Option<String>,
    pub dest_prefix: Option<String>,
    pub source_cluster_id: Option<String>,
    pub full_sync_in_progress: bool,
    pub full_sync_pinned_revision: Option<i64>,
    pub promoted: bool,
    pub promoted_at: Option<String>,
    /// The promoted marker's record (where the histories part).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionRecord>,
    /// The revision map's samples (source revision ↔ destination revision).
    pub revision_map: RevisionMapStatus,
    pub reset_pending: bool,
    /// The mass-delete guard stopped the full sync: keys it would delete.
    pub prune_blocked: Option<u64>,
    /// Source leases mirrored by a destination lease (lease records).
    pub mirrored_leases: usize,
    /// A revision too large for one txn is half applied.
    pub partial_revision: Option<i64>,
    /// With `--src-endpoints`: the source's current revision and the lag.
    pub source_revision: Option<i64>,
    pub lag_revisions: Option<i64>,
    /// With `--src-endpoints`: seconds since the checkpoint was written.
    pub checkpoint_age_seconds: Option<f64>,
    /// Destination prefixes the job mirrored to before `--dest-prefix`
    /// changed that still hold keys (no longer updated).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<LeftBehindStatus>,
    /// `--revision-exact` jobs: whether the destination is still the
    /// source's store at the checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision_exact: Option<ExactStatus>,
    /// A zk2etcd job (registered in the zk2etcd registry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zk2etcd: Option<ZkJobStatus>,
}

/// What `status` says of a zk2etcd job.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ZkJobStatus {
    /// The etcd prefixes it mirrors ZooKeeper into (its registration).
    pub dest_prefixes: Vec<String>,
    /// Keys it holds an ownership record for.
    pub keys_owned: i64,
}

/// The parity of a revision-exact standby, derived (never stored: a write
/// would move its revision): the destination's revision must be the one
/// its checkpoint was written at, and that the checkpoint's source revision.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ExactStatus {
    pub parity: bool,
    /// The destination's revision when status read it.
    pub dest_revision: i64,
    /// The destination revision the checkpoint was written at.
    pub checkpoint_written_at: i64,
    /// A replica holds the lease-only lock.
    pub lock_held: bool,
    /// Stretches written by a catch-up over compacted source history: the
    /// keys changed in them are metadata-inexact.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caught_up: Vec<crate::model::exact::CaughtUp>,
}

/// Copies a `--dest-prefix` change left where they were.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LeftBehindStatus {
    pub dest_prefix: String,
    pub source_prefix: String,
    /// Keys under `dest_prefix` now.
    pub keys: i64,
    pub last_synced_at: String,
    pub last_synced_rev: i64,
    /// A partial copy, left by an interrupted full sync.
    pub partial: bool,
}

/// A job behind the source whose checkpoint has not moved for this long is
/// stalled: a leader applies, or writes an idle checkpoint, every few
/// seconds while it can.
pub const STALLED_AFTER_SECONDS: f64 = 60.0;

impl JobStatus {
    /// What the destination's meta keys say the job is doing, most
    /// pressing first; "replicating" only when nothing else applies.
    pub fn state(&self) -> Vec<String> {
        let mut state = Vec::new();
        if self.promoted {
            state.push("promoted".to_string());
        }
        if let Some(would_delete) = self.prune_blocked {
            state.push(format!(
                "stopped by the mass-delete guard ({would_delete} deletes)"
            ));
        } else if self.full_sync_in_progress && self.leader.is_none() && !self.promoted {
            // The marker stays until a full sync finishes: nobody runs it now.
            state.push("full sync interrupted".to_string());
        } else if self.full_sync_in_progress {
            state.push("full sync".to_string());
        }
        match &self.revision_exact {
            // Promoted: its own revisions follow, by design.
            Some(exact) if !exact.parity && !self.promoted => state.push(format!(
                "parity lost (source revision {} written at destination revision {}, destination now at {})",
                self.last_synced_revision.unwrap_or_default(),
                exact.checkpoint_written_at,
                exact.dest_revision
            )),
            Some(exact) if !exact.lock_held && !self.promoted => state.push("no leader".to_string()),
            Some(_) => {}
            None if self.leader.is_none() && !self.promoted => state.push("no leader".to_string()),
            None => {}
        }
        if let (Some(lag), Some(age)) = (self.lag_revisions, self.checkpoint_age_seconds) {
            if lag > 0
                && age >= STALLED_AFTER_SECONDS
                && !self.promoted
                && !self.full_sync_in_progress
            {
                state.push(format!(
                    "stalled ({lag} revisions behind, checkpoint {}s old)",
                    age.round() as i64
                ));
            }
        }
        if let Some(revision) = self.partial_revision {
            state.push(format!("mid-revision {revision}"));
        }
        if self.reset_pending {
            state.push("reset pending".to_string());
        }
        // zk2etcd keeps no checkpoint: ZooKeeper is walked again on start.
        if self.last_synced_revision.is_none()
            && !self.full_sync_in_progress
            && self.zk2etcd.is_none()
        {
            state.push("no checkpoint".to_string());
        }
        if state.is_empty() && self.zk2etcd.is_some() {
            state.push("mirroring ZooKeeper".to_string());
        } else if state.is_empty() && self.revision_exact.is_some() {
            state.push("replicating, revision-exact".to_string());
        } else if state.is_empty() {
            state.push("replicating".to_string());
        }
        if let Some(gap) = self
            .revision_exact
            .as_ref()
            .and_then(|exact| exact.caught_up.last())
        {
            state.push(format!(
                "caught up over compacted history {}..{} (keys changed there are metadata-inexact)",
                gap.from + 1,
                gap.to
            ));
        }
        if self.mirrored_leases > 0 {
            state.push(format!("{} leases mirrored", self.mirrored_leases));
        }
        state
    }
}

/// One revision-map sample: the destination equalled the source at
/// `source_revision` at destination revision `dest_revision`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RevisionPoint {
    pub source_revision: i64,
    pub dest_revision: i64,
    pub at: String,
}

/// What the revision map holds: how many samples, the oldest and newest,
/// and (from `status`, which probes the destination) the oldest one whose
/// destination revision is not compacted yet: how far back a point-in-time
/// promotion can go.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RevisionMapStatus {
    pub samples: usize,
    pub oldest: Option<RevisionPoint>,
    pub newest: Option<RevisionPoint>,
    pub oldest_reachable: Option<RevisionPoint>,
    /// Seconds between `oldest_reachable` and now.
    pub window_seconds: Option<f64>,
    #[serde(skip)]
    points: Vec<RevisionPoint>,
}

impl RevisionMapStatus {
    fn add(&mut self, point: RevisionPoint) {
        self.samples += 1;
        // Samples arrive in key order: by source revision.
        if self.oldest.is_none() {
            self.oldest = Some(point.clone());
        }
        self.newest = Some(point.clone());
        self.points.push(point);
    }

    /// Every sample, oldest first.
    pub fn points(&self) -> &[RevisionPoint] {
        &self.points
    }
}

#[derive(Default)]
struct LockCandidate {
    create_revision: i64,
    instance: String,
}

/// Every meta key under `meta_prefix`, page by page at one revision,
/// but zk2etcd's ownership records (one per key it wrote: counted per job,
/// not read); with that revision and the counts by job.
async fn read_meta(
    dest: &Cluster,
    meta_prefix: &str,
) -> Result<(Vec<crate::etcd::api::KeyValue>, i64, BTreeMap<String, i64>), AdminError> {
    const PAGE: i64 = 1_000;
    let end = crate::model::keys::prefix_range_end(meta_prefix.as_bytes());
    let mut start = meta_prefix.as_bytes().to_vec();
    let (mut kvs, mut revision, mut owned) = (Vec::new(), 0, BTreeMap::new());
    loop {
        let page = dest
            .range(
                "read meta keys",
                RangeRequest {
                    key: start.clone(),
                    range_end: end.clone(),
                    revision,
                    limit: PAGE,
                    ..RangeRequest::default()
                },
            )
            .await?;
        if revision == 0 {
            revision = page.header.revision;
        }
        let more = page.more;
        let mut jump = None;
        for kv in page.kvs {
            let job = kv
                .key
                .strip_prefix(meta_prefix.as_bytes())
                .map(String::from_utf8_lossy)
                .and_then(|rest| rest.split_once('/').map(|(job, _)| job.to_string()));
            let records = job
                .as_ref()
                .map(|job| MetaKeys::new(meta_prefix, job).zk_owned_prefix())
                .filter(|records| kv.key.starts_with(records.as_bytes()));
            if let (Some(job), Some(records)) = (job, records) {
                // The records sort last in the job root: count them, go on after them.
                let records_end = crate::model::keys::prefix_range_end(records.as_bytes());
                let counted = dest
                    .range(
                        "count zk2etcd's ownership records",
                        RangeRequest {
                            key: records.into_bytes(),
                            range_end: records_end.clone(),
                            revision,
                            count_only: true,
                            ..RangeRequest::default()
                        },
                    )
                    .await?;
                owned.insert(job, counted.count);
                jump = Some(records_end);
                break;
            }
            kvs.push(kv);
        }
        start = match (jump, kvs.last()) {
            (Some(after_records), _) if after_records < end => after_records,
            (None, Some(last)) if more => crate::model::keys::key_successor(&last.key),
            _ => return Ok((kvs, revision, owned)),
        };
    }
}

/// The status being gathered for `job` (and its lock's oldest holder),
/// started on first sight.
fn job_entry<'a>(
    jobs: &'a mut BTreeMap<String, (JobStatus, Option<LockCandidate>)>,
    job: &str,
) -> &'a mut (JobStatus, Option<LockCandidate>) {
    jobs.entry(job.to_string()).or_insert_with(|| {
        (
            JobStatus {
                job: job.to_string(),
                ..JobStatus::default()
            },
            None,
        )
    })
}

/// Reads every job under `meta_prefix` (or only `job`).
pub async fn collect_status(
    dest: &Cluster,
    meta_prefix: &str,
    job: Option<&str>,
) -> Result<Vec<JobStatus>, AdminError> {
    let (kvs, revision, zk_owned) = read_meta(dest, meta_prefix).await?;
    let mut jobs: BTreeMap<String, (JobStatus, Option<LockCandidate>)> = BTreeMap::new();
    let registry = crate::model::keys::zk2etcd_registry(meta_prefix);
    for kv in &kvs {
        if let Some(job) = kv.key.strip_prefix(registry.as_bytes()) {
            let job = String::from_utf8_lossy(job).into_owned();
            let (status, _) = job_entry(&mut jobs, &job);
            let registration: serde_json::Value =
                serde_json::from_slice(&kv.value).unwrap_or_default();
            status.zk2etcd = Some(ZkJobStatus {
                dest_prefixes: registration["dest_prefixes"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter_map(|p| p.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                keys_owned: zk_owned.get(&job).copied().unwrap_or_default(),
            });
            continue;
        }
        let Some(rest) = kv.key.strip_prefix(meta_prefix.as_bytes()) else {
            continue;
        };
        let rest = String::from_utf8_lossy(rest);
        let Some((name, item)) = rest.split_once('/') else {
            continue;
        };
        let (status, leader) = job_entry(&mut jobs, name);
        match item {
            "checkpoint" => {
                if let Ok(checkpoint) = serde_json::from_slice::<Checkpoint>(&kv.value) {
                    status.last_synced_revision = Some(checkpoint.last_synced_rev);
                    status.checkpoint_updated_at = Some(checkpoint.updated_at);
                    status.source_cluster_id = Some(format!("{:x}", checkpoint.source_cluster_id));
                    status.dest_prefix = checkpoint
                        .dest_prefix
                        .or_else(|| Some(checkpoint.source_prefix.clone()));
                    status.source_prefix = Some(checkpoint.source_prefix);
                    status.partial_revision = checkpoint.partial_revision;
                    if checkpoint.revision_exact {
                        status.revision_exact = Some(ExactStatus {
                            parity: crate::model::exact::parity_at_resume(
                                checkpoint.last_synced_rev,
                                kv.mod_revision,
                                revision,
                            )
                            .is_ok(),
                            dest_revision: revision,
                            checkpoint_written_at: kv.mod_revision,
                            lock_held: false,
                            caught_up: checkpoint.exact_gaps.clone(),
                        });
                    }
                }
            }
            "full-sync" => {
                status.full_sync_in_progress = true;
                if let Ok(marker) = serde_json::from_slice::<FullSyncMarker>(&kv.value) {
                    status.full_sync_pinned_revision = Some(marker.pinned_rev);
                    status.source_cluster_id = Some(format!("{:x}", marker.source_cluster_id));
                    status.prune_blocked = marker.prune_blocked.map(|block| block.would_delete);
                }
            }
            "promoted" => {
                status.promoted = true;
                status.promotion = PromotionRecord::decode(&kv.value);
                status.promoted_at = status.promotion.as_ref().map(|r| r.promoted_at.clone());
            }
            sample if sample.starts_with("revision-map/") => {
                let keys = MetaKeys::new(meta_prefix, name);
                if let Some(source_revision) = keys.revision_of_sample(&kv.key) {
                    let at = serde_json::from_slice::<RevisionSample>(&kv.value)
                        .map(|s| s.at)
                        .unwrap_or_default();
                    status.revision_map.add(RevisionPoint {
                        source_revision,
                        dest_revision: kv.mod_revision,
                        at,
                    });
                }
            }
            "reset-request" => status.reset_pending = true,
            "left-behind" => {
                status.left_behind = LeftBehind::decode(&kv.value)
                    .into_iter()
                    .map(|l| LeftBehindStatus {
                        dest_prefix: l.dest_prefix,
                        source_prefix: l.source_prefix,
                        keys: 0,
                        last_synced_at: l.last_synced_at,
                        last_synced_rev: l.last_synced_rev,
                        partial: l.partial,
                    })
                    .collect();
            }
            record if record.starts_with("leases/") => status.mirrored_leases += 1,
            lock if lock.starts_with("lock/") => {
                status.instances += 1;
                let instance = serde_json::from_slice::<LockValue>(&kv.value)
                    .map(|v| v.instance)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&kv.value).into_owned());
                if leader
                    .as_ref()
                    .is_none_or(|l| kv.create_revision < l.create_revision)
                {
                    *leader = Some(LockCandidate {
                        create_revision: kv.create_revision,
                        instance,
                    });
                }
            }
            _ => {}
        }
    }
    if jobs.is_empty() {
        return Err(AdminError::NoJobs {
            meta_prefix: meta_prefix.to_string(),
        });
    }
    if let Some(job) = job {
        if !jobs.contains_key(job) {
            return Err(AdminError::UnknownJob {
                job: job.to_string(),
                known: jobs.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    let mut statuses: Vec<JobStatus> = jobs
        .into_values()
        .filter(|(status, _)| job.is_none_or(|j| j == status.job))
        .map(|(mut status, leader)| {
            status.leader = leader.map(|l| l.instance);
            status
        })
        .collect();
    for status in &mut statuses {
        if let Some(exact) = &mut status.revision_exact {
            let lock = crate::mirror::exact::lock_lease_id(
                MetaKeys::new(meta_prefix, &status.job).job_root(),
            );
            exact.lock_held = dest.lease_time_to_live(lock).await?.is_some();
        }
        // Only prefixes that still hold copies are worth a line; the one
        // mirrored to now is never "left behind" (changed back).
        let current = status.dest_prefix.clone();
        let mut left = Vec::new();
        for mut entry in std::mem::take(&mut status.left_behind) {
            if current.as_deref() == Some(entry.dest_prefix.as_str()) {
                continue;
            }
            let count = |prefix: String| async move {
                dest.range(
                    "count keys under a left-behind prefix",
                    RangeRequest::prefix(prefix.as_bytes()).count_only(),
                )
                .await
                .map(|r| r.count)
            };
            entry.keys = count(entry.dest_prefix.clone()).await?;
            // The prefix mirrored to now may lie inside the old one: its
            // keys are not left behind.
            if let Some(current) = current
                .as_ref()
                .filter(|c| c.starts_with(entry.dest_prefix.as_str()))
            {
                entry.keys -= count(current.clone()).await?;
            }
            if entry.keys > 0 {
                left.push(entry);
            }
        }
        status.left_behind = left;
    }
    Ok(statuses)
}

/// Adds the source's current revision and the lag in revisions.
pub async fn add_source_lag(
    source: &Cluster,
    statuses: &mut [JobStatus],
) -> Result<(), AdminError> {
    // A zk2etcd job's source is ZooKeeper: no revision to compare.
    for status in statuses.iter_mut().filter(|s| s.zk2etcd.is_none()) {
        let prefix = status.source_prefix.clone().unwrap_or_default();
        let head = source.head(prefix.as_bytes()).await?;
        status.source_revision = Some(head.revision);
        status.lag_revisions = status
            .last_synced_revision
            .map(|synced| (head.revision - synced).max(0));
        status.checkpoint_age_seconds = status
            .checkpoint_updated_at
            .as_deref()
            .and_then(crate::etcd::meta::age_seconds);
    }
    Ok(())
}

/// Fills each job's `oldest_reachable` sample and window: the oldest
/// revision-map sample whose destination revision is not compacted.
/// Readability only grows with the revision, so a binary search over the
/// samples takes about log2(samples) reads.
pub async fn add_history_window(
    dest: &Cluster,
    meta_prefix: &str,
    statuses: &mut [JobStatus],
) -> Result<(), AdminError> {
    for status in statuses {
        let probe = MetaKeys::new(meta_prefix, &status.job).checkpoint();
        let points = status.revision_map.points().to_vec();
        let revisions: Vec<i64> = points.iter().map(|p| p.dest_revision).collect();
        let oldest = crate::etcd::meta::oldest_readable_index(dest, &probe, &revisions).await?;
        if let Some(point) = oldest.and_then(|at| points.get(at)) {
            status.revision_map.window_seconds = crate::etcd::meta::age_seconds(&point.at);
            status.revision_map.oldest_reachable = Some(point.clone());
        }
    }
    Ok(())
}

/// Lines under the table: what the promoted marker records and how far
/// back a point-in-time promotion can go.
fn render_details(status: &JobStatus) -> String {
    let mut out = String::new();
    if let Some(zk) = &status.zk2etcd {
        out.push_str(&format!(
            "job {}: zk2etcd into {}: {} keys owned (its ownership records; an etcd mirror job on the same prefix leaves them alone)\n",
            status.job,
            zk.dest_prefixes.join(", "),
            zk.keys_owned
        ));
    }
    if let Some(record) = &status.promotion {
        let or_dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        out.push_str(&format!(
            "job {}: promoted at {} by {}: holds source revision {} (cluster {}), destination revision {} at that checkpoint, {} at the marker\n",
            status.job,
            record.promoted_at,
            record.by,
            or_dash(record.source_revision),
            record
                .source_cluster_id
                .map_or_else(|| "-".to_string(), |id| format!("{id:x}")),
            or_dash(record.base_dest_revision),
            or_dash(record.dest_revision),
        ));
        if let Some(pit) = &record.point_in_time {
            out.push_str(&format!(
                "job {}: point in time {}: restored source revision {} read at destination revision {} ({} puts, {} deletes, {} skipped)\n",
                status.job, pit.requested, pit.source_revision, pit.read_dest_revision, pit.puts, pit.deletes, pit.skipped
            ));
        }
        if let Some(fence) = &record.failback {
            out.push_str(&format!(
                "job {}: fenced by failback {:x} since {} ({}), copying from standby cluster {:x}\n",
                status.job, fence.id, fence.started_at, fence.by, fence.standby_cluster_id
            ));
        }
    }
    for left in &status.left_behind {
        let when = if left.partial {
            format!(
                "a partial copy (a full sync pinned at source revision {} from {} was interrupted: some keys, no deletions)",
                left.last_synced_rev, left.last_synced_at
            )
        } else {
            format!(
                "until {} (source revision {})",
                left.last_synced_at, left.last_synced_rev
            )
        };
        out.push_str(&format!(
            "job {}: left behind: {} holds {} keys mirrored from {} {when}, no longer updated since --dest-prefix changed; delete them (`etcdctl del --prefix {}`) once nothing reads them\n",
            status.job, left.dest_prefix, left.keys, left.source_prefix, left.dest_prefix
        ));
    }
    let map = &status.revision_map;
    if let (Some(oldest), Some(newest)) = (&map.oldest, &map.newest) {
        out.push_str(&format!(
            "job {}: revision map: {} samples, source revisions {}..{} ({} .. {})",
            status.job,
            map.samples,
            oldest.source_revision,
            newest.source_revision,
            oldest.at,
            newest.at
        ));
        match (&map.oldest_reachable, map.window_seconds) {
            (Some(point), Some(window)) => out.push_str(&format!(
                "; point in time reachable back to source revision {} ({}, {:.0} s ago)\n",
                point.source_revision, point.at, window
            )),
            (Some(point), None) => out.push_str(&format!(
                "; point in time reachable back to source revision {}\n",
                point.source_revision
            )),
            (None, _) => out.push_str("; every sample is compacted on the destination\n"),
        }
    }
    out
}

pub fn render_text(statuses: &[JobStatus]) -> String {
    let mut rows = vec![[
        "JOB".to_string(),
        "LEADER".to_string(),
        "INSTANCES".to_string(),
        "LAST SYNCED REV".to_string(),
        "CHECKPOINT AT".to_string(),
        "FULL SYNC".to_string(),
        "SOURCE CLUSTER".to_string(),
        "SOURCE REV".to_string(),
        "LAG".to_string(),
        "STATE".to_string(),
    ]];
    let dash = || "-".to_string();
    for status in statuses {
        let state = status.state().join(", ");
        rows.push([
            status.job.clone(),
            match &status.revision_exact {
                // The lock is a bare lease: it names no instance.
                Some(exact) if exact.lock_held => "(lease lock held)".into(),
                _ => status.leader.clone().unwrap_or_else(|| "(none)".into()),
            },
            status.instances.to_string(),
            status
                .last_synced_revision
                .map_or_else(dash, |r| r.to_string()),
            status.checkpoint_updated_at.clone().unwrap_or_else(dash),
            match (
                status.full_sync_in_progress,
                status.full_sync_pinned_revision,
            ) {
                (true, Some(rev)) => format!("yes (at {rev})"),
                (true, None) => "yes".into(),
                (false, _) => "no".into(),
            },
            status.source_cluster_id.clone().unwrap_or_else(dash),
            status.source_revision.map_or_else(dash, |r| r.to_string()),
            status.lag_revisions.map_or_else(dash, |r| r.to_string()),
            state,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for status in statuses {
        out.push_str(&render_details(status));
    }
    out
}

/// What `promote` did to one job.
#[derive(Debug, Clone, Serialize)]
pub struct PromoteOutcome {
    pub job: String,
    pub action: &'static str,
    pub final_checkpoint_revision: Option<i64>,
    /// What the promoted marker records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionRecord>,
    /// With a reachable source: the exact check at the final checkpoint.
    pub consistency: Option<crate::check::CheckReport>,
    /// With `--detach-leases`: what was detached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detached: Option<DetachOutcome>,
}

/// Waits until the job's checkpoint covers the source revision current at
/// the start, so a planned switchover loses nothing.
pub async fn wait_for_sync(
    dest: &Cluster,
    source: &Cluster,
    meta_prefix: &str,
    job: &str,
    timeout: Duration,
) -> Result<i64, AdminError> {
    let started = Instant::now();
    let status = collect_status(dest, meta_prefix, Some(job))
        .await?
        .remove(0);
    let target = source
        .head(status.source_prefix.unwrap_or_default().as_bytes())
        .await?
        .revision;
    loop {
        let status = collect_status(dest, meta_prefix, Some(job))
            .await?
            .remove(0);
        let reached = status.last_synced_revision.unwrap_or(0);
        if reached >= target && !status.full_sync_in_progress {
            return Ok(reached);
        }
        if started.elapsed() >= timeout {
            return Err(AdminError::SyncTimeout {
                job: job.to_string(),
                reached,
                target,
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes the promoted marker. From this txn on, every replicator's fence
/// fails for the job, so nothing more reaches its destination prefix.
///
/// The marker records where the standby's history parts from the
/// primary's: the checkpoint and the destination revision it was written
/// at, read in the marker's own txn (so no replicator txn can land between
/// the two), then written into the marker by a second txn guarded on the
/// first one's exact value.
pub async fn promote(
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
    by: &str,
) -> Result<PromoteOutcome, AdminError> {
    let keys = MetaKeys::new(meta_prefix, job);
    let mut record = PromotionRecord {
        promoted_at: now_rfc3339(),
        by: by.to_string(),
        ..PromotionRecord::default()
    };
    let first = record.encode();
    let txn = TxnRequest::new()
        .when(vec![Compare::version(keys.promoted(), CompareOp::Equal, 0)])
        .and_then(vec![
            Op::put(keys.promoted(), first.clone()),
            Op::get(keys.checkpoint()),
        ]);
    let response = dest.txn("write promoted marker", txn).await?;
    if response.succeeded {
        record.dest_revision = Some(response.header.revision);
        if let Some(kv) = response.ranges().next().and_then(|r| r.kvs.first()) {
            if let Ok(checkpoint) = serde_json::from_slice::<Checkpoint>(&kv.value) {
                record.source_revision = Some(checkpoint.last_synced_rev);
                record.base_dest_revision = Some(kv.mod_revision);
                record.source_cluster_id = Some(checkpoint.source_cluster_id);
                record.dest_prefix = Some(
                    checkpoint
                        .dest_prefix
                        .clone()
                        .unwrap_or_else(|| checkpoint.source_prefix.clone()),
                );
                record.source_prefix = Some(checkpoint.source_prefix);
            }
        }
        let update = TxnRequest::new()
            .when(vec![Compare::value(
                keys.promoted(),
                CompareOp::Equal,
                first,
            )])
            .and_then(vec![Op::put(keys.promoted(), record.encode())]);
        if !dest.txn("record the promotion", update).await?.succeeded {
            tracing::warn!(%job, "The promoted marker changed before its record was written (a concurrent undo?); the promotion record is incomplete.");
        }
    }
    // Read after the marker: no replicator can move the checkpoint any more.
    let status = collect_status(dest, meta_prefix, Some(job))
        .await?
        .remove(0);
    Ok(PromoteOutcome {
        job: job.to_string(),
        action: if response.succeeded {
            "promoted"
        } else {
            "already promoted"
        },
        final_checkpoint_revision: status.last_synced_revision,
        promotion: status.promotion.clone(),
        consistency: None,
        detached: None,
    })
}

/// Removes the promoted marker (failback): replicators resume on their next check.
pub async fn undo_promote(
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
) -> Result<PromoteOutcome, AdminError> {
    let keys = MetaKeys::new(meta_prefix, job);
    let key = keys.promoted();
    let response = dest
        .txn(
            "remove promoted marker",
            TxnRequest::new().and_then(vec![Op::delete(key)]),
        )
        .await?;
    let deleted = response
        .responses
        .iter()
        .map(|r| match r {
            crate::etcd::api::OpResponse::Delete { deleted } => *deleted,
            _ => 0,
        })
        .sum::<i64>();
    let status = collect_status(dest, meta_prefix, Some(job))
        .await?
        .remove(0);
    Ok(PromoteOutcome {
        job: job.to_string(),
        action: if deleted > 0 {
            "promotion undone"
        } else {
            "was not promoted"
        },
        final_checkpoint_revision: status.last_synced_revision,
        promotion: None,
        consistency: None,
        detached: None,
    })
}

/// What `promote --detach-leases` did to one job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DetachOutcome {
    pub job: String,
    /// Mirrored keys rewritten without a lease.
    pub detached: u64,
    /// Mirrored keys changed or deleted on the promoted cluster since they
    /// were read (its own write wins), left as they are.
    pub skipped: u64,
    /// Lease records removed from the job's meta keys.
    pub records_deleted: u64,
}

/// Ops per detach txn: well under etcd's default `--max-txn-ops` (128),
/// counting the compares too.
pub(crate) const DETACH_OPS_PER_TXN: usize = 64;
const DETACH_PAGE: i64 = 1000;

/// `promote --detach-leases`: on a promoted job, rewrites every key under
/// the job's destination prefix that is attached to one of the job's
/// mirrored leases as the same value without a lease, so the promoted
/// cluster keeps them although nothing renews those leases any more; then
/// deletes the job's lease records.
///
/// Only leases the job recorded are detached: a key on a lease the
/// promoted cluster's own clients granted stays on it. Each rewrite is
/// guarded by the key's `mod_revision` as read, so a client write on the
/// promoted cluster since then wins (the key is counted as skipped), and
/// by the promoted marker, so nothing is rewritten once a `promote --undo`
/// lets replicators write again. The destination leases are not revoked:
/// with no key left on them they expire on their own.
pub async fn detach_leases(
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
) -> Result<DetachOutcome, AdminError> {
    let keys = MetaKeys::new(meta_prefix, job);
    let meta = crate::mirror::meta::read_job_meta(dest, &keys).await?;
    if meta.promoted.is_none() {
        return Err(AdminError::NotPromoted {
            job: job.to_string(),
        });
    }
    let mut outcome = DetachOutcome {
        job: job.to_string(),
        ..DetachOutcome::default()
    };
    let mirrored: std::collections::HashSet<i64> = meta
        .leases
        .values()
        .map(|record| record.dest_lease)
        .collect();
    if !mirrored.is_empty() {
        let checkpoint = meta.checkpoint.as_ref().ok_or(AdminError::NoDestPrefix {
            job: job.to_string(),
        })?;
        let dest_prefix = checkpoint
            .dest_prefix
            .clone()
            .unwrap_or_else(|| checkpoint.source_prefix.clone());
        let end = crate::model::keys::prefix_range_end(dest_prefix.as_bytes());
        let mut start = crate::model::keys::prefix_range_start(dest_prefix.as_bytes());
        loop {
            let page = dest
                .range(
                    "read keys to detach",
                    RangeRequest {
                        key: start.clone(),
                        range_end: end.clone(),
                        limit: DETACH_PAGE,
                        ..RangeRequest::default()
                    },
                )
                .await?;
            let attached: Vec<_> = page
                .kvs
                .iter()
                // Meta keys (job locks are leased too) are never touched.
                .filter(|kv| !kv.key.starts_with(meta_prefix.as_bytes()))
                .filter(|kv| kv.lease != 0 && mirrored.contains(&kv.lease))
                .collect();
            for chunk in attached.chunks(DETACH_OPS_PER_TXN) {
                let (detached, skipped) = detach_chunk(dest, &keys, job, chunk).await?;
                outcome.detached += detached;
                outcome.skipped += skipped;
            }
            match page.kvs.last() {
                Some(last) if page.more => start = crate::model::keys::key_successor(&last.key),
                _ => break,
            }
        }
    }
    // The records go last, and only while the job is still promoted: an
    // undo in between leaves them for the replicator to find. The
    // checkpoint then says the keys are not on mirrored leases, so after
    // `promote --undo` a faithful replicator puts them back with a full sync.
    let records = keys.lease_records();
    let mut compares = vec![Compare::version(keys.promoted(), CompareOp::Greater, 0)];
    let mut ops = vec![Op::Delete {
        range_end: crate::model::keys::prefix_range_end(records.as_bytes()),
        key: records.into_bytes(),
    }];
    if let (Some(raw), Some(checkpoint)) = (&meta.checkpoint_raw, &meta.checkpoint) {
        let mut detached = checkpoint.clone();
        detached.leases_mirrored = false;
        compares.push(Compare::value(
            keys.checkpoint(),
            CompareOp::Equal,
            raw.clone(),
        ));
        ops.push(Op::put(keys.checkpoint(), detached.encode()));
    }
    let response = dest
        .txn(
            "delete lease records",
            TxnRequest::new().when(compares).and_then(ops),
        )
        .await?;
    if !response.succeeded {
        return Err(AdminError::NotPromoted {
            job: job.to_string(),
        });
    }
    outcome.records_deleted = response
        .responses
        .iter()
        .map(|r| match r {
            crate::etcd::api::OpResponse::Delete { deleted } => *deleted as u64,
            _ => 0,
        })
        .sum();
    Ok(outcome)
}

/// Detaches `chunk` in one txn; when any key changed since it was read,
/// key by key, so only the changed ones are skipped. Returns (detached, skipped).
async fn detach_chunk(
    dest: &Cluster,
    keys: &MetaKeys,
    job: &str,
    chunk: &[&crate::etcd::api::KeyValue],
) -> Result<(u64, u64), AdminError> {
    let writes: Vec<GuardedWrite> = chunk
        .iter()
        .map(|kv| GuardedWrite {
            key: kv.key.clone(),
            read_mod_revision: kv.mod_revision,
            op: Op::put(kv.key.clone(), kv.value.clone()),
        })
        .collect();
    guarded_chunk(dest, keys, job, "detach leases", &writes).await
}

/// One write on a promoted job's prefix, applied only while the key is as
/// it was read.
#[derive(Debug, Clone)]
pub(crate) struct GuardedWrite {
    pub key: Vec<u8>,
    /// The key's mod revision as read; 0 when it was absent.
    pub read_mod_revision: i64,
    pub op: Op,
}

/// Applies `writes` in one txn guarded by the promoted marker and each
/// key's mod revision as read; when any key changed since, key by key, so
/// only the changed ones are skipped (a client's write on the promoted
/// cluster wins). Returns (applied, skipped).
pub(crate) async fn guarded_chunk(
    dest: &Cluster,
    keys: &MetaKeys,
    job: &str,
    what: &'static str,
    writes: &[GuardedWrite],
) -> Result<(u64, u64), AdminError> {
    let attempt = |writes: &[GuardedWrite]| {
        let mut compare = vec![Compare::version(keys.promoted(), CompareOp::Greater, 0)];
        compare.extend(writes.iter().map(|w| match w.read_mod_revision {
            0 => Compare::version(w.key.clone(), CompareOp::Equal, 0),
            revision => Compare::mod_revision(w.key.clone(), CompareOp::Equal, revision),
        }));
        TxnRequest::new()
            .when(compare)
            .and_then(writes.iter().map(|w| w.op.clone()).collect())
            .or_else(vec![Op::get(keys.promoted())])
    };
    let still_promoted = |response: &crate::etcd::api::TxnResponse| {
        response.ranges().any(|range| !range.kvs.is_empty())
    };
    let not_promoted = || AdminError::NotPromoted {
        job: job.to_string(),
    };
    let response = dest.txn(what, attempt(writes)).await?;
    if response.succeeded {
        return Ok((writes.len() as u64, 0));
    }
    if !still_promoted(&response) {
        return Err(not_promoted());
    }
    let (mut applied, mut skipped) = (0, 0);
    for write in writes {
        let response = dest.txn(what, attempt(std::slice::from_ref(write))).await?;
        if response.succeeded {
            applied += 1;
        } else if still_promoted(&response) {
            skipped += 1;
        } else {
            return Err(not_promoted());
        }
    }
    Ok((applied, skipped))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::etcd::memory::{new_store, Link, MemoryEtcd};
    use crate::model::Side;

    /// `status` says what the meta keys show, not "replicating" whenever
    /// the job is not promoted.
    #[test]
    fn status_state_shows_what_stops_the_job() {
        let healthy = JobStatus {
            job: "app".into(),
            leader: Some("pod-0".into()),
            last_synced_revision: Some(10),
            ..JobStatus::default()
        };
        assert_eq!(healthy.state(), vec!["replicating"]);
        let leaderless = JobStatus {
            leader: None,
            ..healthy.clone()
        };
        assert_eq!(leaderless.state(), vec!["no leader"]);
        let guarded = JobStatus {
            full_sync_in_progress: true,
            prune_blocked: Some(653),
            mirrored_leases: 4,
            ..healthy.clone()
        };
        assert_eq!(
            guarded.state(),
            vec![
                "stopped by the mass-delete guard (653 deletes)",
                "4 leases mirrored"
            ]
        );
        let syncing = JobStatus {
            full_sync_in_progress: true,
            last_synced_revision: None,
            ..healthy.clone()
        };
        assert_eq!(syncing.state(), vec!["full sync"]);
        let interrupted = JobStatus {
            leader: None,
            ..syncing.clone()
        };
        assert_eq!(
            interrupted.state(),
            vec!["full sync interrupted", "no leader"]
        );
        let behind = |lag, age| JobStatus {
            lag_revisions: Some(lag),
            checkpoint_age_seconds: Some(age),
            ..healthy.clone()
        };
        assert_eq!(
            behind(12, 61.4).state(),
            vec!["stalled (12 revisions behind, checkpoint 61s old)"]
        );
        assert_eq!(behind(12, 59.0).state(), vec!["replicating"], "recent");
        assert_eq!(
            behind(0, 600.0).state(),
            vec!["replicating"],
            "caught up, idle"
        );
        let fresh = JobStatus {
            last_synced_revision: None,
            ..healthy.clone()
        };
        assert_eq!(fresh.state(), vec!["no checkpoint"]);
        let promoted = JobStatus {
            promoted: true,
            leader: None,
            ..healthy
        };
        assert_eq!(promoted.state(), vec!["promoted"]);
    }

    fn dest() -> Cluster {
        Cluster::with_backend(
            Side::Destination,
            "dest",
            Arc::new(MemoryEtcd::new(new_store(1), Link::new("dest", 7))),
            Duration::from_secs(2),
        )
    }

    async fn put(dest: &Cluster, op: Op) {
        let response = dest
            .txn("test put", TxnRequest::new().and_then(vec![op]))
            .await
            .expect("put");
        assert!(response.succeeded);
    }

    async fn get(dest: &Cluster, key: &str) -> Option<crate::etcd::api::KeyValue> {
        dest.range("test get", RangeRequest::key(key))
            .await
            .expect("get")
            .kvs
            .pop()
    }

    #[tokio::test]
    async fn a_key_written_since_it_was_read_is_skipped_and_the_rest_detached() {
        let dest = dest();
        let keys = MetaKeys::new("/meta/", "app");
        put(&dest, Op::put(keys.promoted(), "{}")).await;
        let lease = dest.lease_grant(60, 0).await.expect("grant");
        for key in ["/app/a", "/app/b", "/app/c"] {
            put(&dest, Op::put_with_lease(key, "v", lease)).await;
        }
        let read = dest
            .range("test read", RangeRequest::prefix(b"/app/"))
            .await
            .expect("read")
            .kvs;
        // A client of the promoted cluster rewrites one key meanwhile.
        put(&dest, Op::put("/app/b", "client")).await;
        let chunk: Vec<&crate::etcd::api::KeyValue> = read.iter().collect();
        let (detached, skipped) = detach_chunk(&dest, &keys, "app", &chunk)
            .await
            .expect("detach");
        assert_eq!((detached, skipped), (2, 1));
        for key in ["/app/a", "/app/c"] {
            let kv = get(&dest, key).await.expect("key kept");
            assert_eq!((kv.value.as_slice(), kv.lease), (&b"v"[..], 0));
        }
        let b = get(&dest, "/app/b").await.expect("b kept");
        assert_eq!(b.value, b"client", "the client's write wins");
    }

    /// A revision-exact standby's parity is read, never stored: the
    /// destination's revision against the one its checkpoint was written at.
    #[tokio::test]
    async fn status_derives_revision_exact_parity() {
        let dest = dest();
        let keys = MetaKeys::new("/meta/", "root");
        put(&dest, Op::put("/k", "v")).await;
        let revision = dest.head(b"").await.expect("head").revision + 1;
        let checkpoint = Checkpoint {
            last_synced_rev: revision,
            revision_exact: true,
            ..Checkpoint::default()
        };
        put(&dest, Op::put(keys.checkpoint(), checkpoint.encode())).await;
        let status = collect_status(&dest, "/meta/", Some("root"))
            .await
            .expect("status")
            .remove(0);
        let exact = status.revision_exact.clone().expect("an exact job");
        assert!(exact.parity && !exact.lock_held);
        assert_eq!(status.state(), ["no leader"]);
        // A replica holds the lease-only lock.
        dest.lease_grant(10, crate::mirror::exact::lock_lease_id(keys.job_root()))
            .await
            .expect("lock");
        let status = collect_status(&dest, "/meta/", Some("root"))
            .await
            .expect("status")
            .remove(0);
        assert_eq!(status.state(), ["replicating, revision-exact"]);
        // A write of the destination's own.
        put(&dest, Op::put("/stray", "x")).await;
        let status = collect_status(&dest, "/meta/", Some("root"))
            .await
            .expect("status")
            .remove(0);
        assert!(!status.revision_exact.clone().expect("exact").parity);
        assert!(
            status.state()[0].starts_with("parity lost"),
            "{:?}",
            status.state()
        );
    }

    /// zk2etcd's ownership records (one per key: many) are counted, not
    /// read; the jobs around them, and a mirror job after them, are read in
    /// full across pages.
    #[tokio::test]
    async fn status_counts_zk2etcd_records_and_reads_every_other_job() {
        let dest = dest();
        let zk = MetaKeys::new("/meta/", "b-zk");
        put(
            &dest,
            Op::put(zk.zk2etcd_registration(), r#"{"dest_prefixes":["/dubbo"]}"#),
        )
        .await;
        put(&dest, Op::put(zk.lock_prefix() + "1", "zk-replica")).await;
        for i in 0..2_500 {
            put(
                &dest,
                Op::put(zk.zk_owned(format!("/dubbo/{i:05}").as_bytes()), "{}"),
            )
            .await;
        }
        for (job, leases) in [("a-mirror", 3), ("c-mirror", 1_200)] {
            let keys = MetaKeys::new("/meta/", job);
            put(
                &dest,
                Op::put(keys.checkpoint(), Checkpoint::default().encode()),
            )
            .await;
            for lease in 0..leases {
                put(&dest, Op::put(keys.lease_record(lease + 1), "{}")).await;
            }
        }
        let statuses = collect_status(&dest, "/meta/", None).await.expect("status");
        let names: Vec<&str> = statuses.iter().map(|s| s.job.as_str()).collect();
        assert_eq!(names, ["a-mirror", "b-zk", "c-mirror"]);
        assert_eq!(
            statuses[1].zk2etcd,
            Some(ZkJobStatus {
                dest_prefixes: vec!["/dubbo".into()],
                keys_owned: 2_500
            })
        );
        assert_eq!(statuses[1].leader.as_deref(), Some("zk-replica"));
        assert_eq!(
            (statuses[0].mirrored_leases, statuses[2].mirrored_leases),
            (3, 1_200)
        );
        assert!(statuses[0].zk2etcd.is_none() && statuses[2].zk2etcd.is_none());
        assert_eq!(statuses[1].state(), ["mirroring ZooKeeper"]);
        let text = render_text(&statuses);
        assert!(
            text.contains("job b-zk: zk2etcd into /dubbo: 2500 keys owned"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn nothing_is_detached_once_the_promotion_is_undone() {
        let dest = dest();
        let keys = MetaKeys::new("/meta/", "app");
        let lease = dest.lease_grant(60, 0).await.expect("grant");
        put(&dest, Op::put_with_lease("/app/a", "v", lease)).await;
        let read = get(&dest, "/app/a").await.expect("a");
        let outcome = detach_chunk(&dest, &keys, "app", &[&read]).await;
        assert!(matches!(outcome, Err(AdminError::NotPromoted { .. })));
        assert_eq!(get(&dest, "/app/a").await.expect("a").lease, lease);
        assert!(matches!(
            detach_leases(&dest, "/meta/", "app").await,
            Err(AdminError::NotPromoted { .. })
        ));
    }
}
