//! The consistency checker: is the destination exactly the source?
//!
//! Exact by construction: the destination prefix and its checkpoint are read
//! in one snapshot (every page pinned to one destination revision), which
//! says the source revision R the destination must equal. The source prefix
//! is then read *at R*. In-flight writes cannot cause false differences, so
//! anything reported is a real divergence.
//!
//! If R has been compacted on the source, the check falls back to comparing
//! with the current source, re-checks only the differing keys after a short
//! delay, and reports the result as approximate.

pub mod exact;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::etcd::api::{KeyValue, Op, RangeRequest, TxnRequest};
use crate::etcd::client::{ClientError, Cluster, FailureKind};
use crate::etcd::meta::read_job_meta;
use crate::etcd::pager::{Merged, MergedPages, PageError, PagedRead, Skipped};
use crate::model::diff::{Difference, LeaseRule, SortedMerge};
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::model::Side;

/// Differing keys kept for repair and re-checking; counts stay exact beyond it.
pub const MAX_KEPT_DIFFERENCES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("job {job} has no checkpoint on the destination yet (first full sync not finished); nothing to compare against")]
    NoCheckpoint { job: String },
    #[error("job {job} is in a full sync (pinned at revision {pinned:?}); the destination matches no single source revision until it finishes")]
    FullSyncInProgress { job: String, pinned: Option<i64> },
    #[error("job {job} is half-way through revision {revision}, too large for one txn; check again in a moment")]
    PartialRevision { job: String, revision: i64 },
    #[error("job {job}: the destination compacted the snapshot being checked {attempts} times in a row; check again, or lower the destination's compaction frequency")]
    DestCompacted { job: String, attempts: usize },
    #[error("range reader stopped before the end of the prefix")]
    StoppedEarly,
    #[error("{0}; the cluster was replaced behind its endpoints: check again")]
    OtherCluster(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<PageError> for CheckError {
    fn from(error: PageError) -> Self {
        match error {
            PageError::Client(error) => CheckError::Client(error),
            PageError::StoppedEarly => CheckError::StoppedEarly,
            other @ PageError::OtherCluster { .. } => CheckError::OtherCluster(other.to_string()),
            PageError::Cancelled => CheckError::Cancelled,
        }
    }
}

/// Which side lacks a key, or whether the values differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// At the source, not at the destination.
    DstMiss,
    /// At the destination only.
    SrcMiss,
    /// On both sides with different values.
    Mismatch,
    /// The same value, but not on the destination lease that mirrors the
    /// source key's lease (or leased on one side only).
    LeaseMismatch,
}

impl DifferenceKind {
    pub fn label(self) -> &'static str {
        match self {
            DifferenceKind::DstMiss => "dst_miss",
            DifferenceKind::SrcMiss => "src_miss",
            DifferenceKind::Mismatch => "mismatch",
            DifferenceKind::LeaseMismatch => "lease_mismatch",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Samples {
    pub dst_miss: Vec<String>,
    pub src_miss: Vec<String>,
    pub mismatch: Vec<String>,
    pub lease_mismatch: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub job: String,
    /// The source revision compared against: the checkpoint, or the source's
    /// current revision when the check is approximate.
    pub source_revision: i64,
    /// The destination revision the snapshot was read at.
    pub dest_revision: i64,
    /// False when the checkpoint revision was compacted on the source.
    pub exact: bool,
    pub source_keys: u64,
    pub dest_keys: u64,
    pub dst_miss: u64,
    pub src_miss: u64,
    pub mismatch: u64,
    pub lease_mismatch: u64,
    /// Destination keys a zk2etcd job holds: not the job's, not compared.
    pub held: u64,
    pub samples: Samples,
    pub duration_seconds: f64,
    /// Keys plus values read from each side by the compare (the check's
    /// cost across the link; `check --output json` reports them).
    pub source_bytes_read: u64,
    pub dest_bytes_read: u64,
    /// Differing keys (suffixes below the job prefix), up to [`MAX_KEPT_DIFFERENCES`].
    #[serde(skip)]
    pub differences: Vec<(Vec<u8>, DifferenceKind)>,
}

impl CheckReport {
    pub fn is_consistent(&self) -> bool {
        self.dst_miss == 0 && self.src_miss == 0 && self.mismatch == 0 && self.lease_mismatch == 0
    }

    /// Every difference found, of whatever kind.
    pub fn total_differences(&self) -> u64 {
        self.dst_miss + self.src_miss + self.mismatch + self.lease_mismatch
    }

    fn record(&mut self, suffix: &[u8], kind: DifferenceKind, sample_limit: usize) {
        let (count, samples) = match kind {
            DifferenceKind::DstMiss => (&mut self.dst_miss, &mut self.samples.dst_miss),
            DifferenceKind::SrcMiss => (&mut self.src_miss, &mut self.samples.src_miss),
            DifferenceKind::Mismatch => (&mut self.mismatch, &mut self.samples.mismatch),
            DifferenceKind::LeaseMismatch => {
                (&mut self.lease_mismatch, &mut self.samples.lease_mismatch)
            }
        };
        *count += 1;
        if samples.len() < sample_limit {
            samples.push(crate::model::redact::key(suffix).to_string());
        }
        if self.differences.len() < MAX_KEPT_DIFFERENCES {
            self.differences.push((suffix.to_vec(), kind));
        }
    }
}

/// What to compare: one job's prefixes and meta keys.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    pub job: String,
    pub rewrite: KeyRewrite,
    pub keys: MetaKeys,
    pub meta_prefix: Vec<u8>,
    pub leases: LeaseCheck,
}

/// How a check compares lease attachments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCheck {
    /// Through the job's lease records (`--leases faithful`).
    Mirrored,
    /// Every destination key on no lease (`--leases strip`).
    Unleased,
    /// Not at all (a promoted cluster's leases are its own).
    Ignore,
}

#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    pub page_size: usize,
    pub sample_limit: usize,
    /// The approximate fallback re-checks differing keys after this delay.
    pub recheck_delay: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            page_size: 2000,
            sample_limit: 10,
            recheck_delay: Duration::from_secs(2),
        }
    }
}

/// A destination compacted while we read it gets this many fresh snapshots.
const DEST_COMPACTED_ATTEMPTS: usize = 3;

pub async fn check(
    source: &Cluster,
    dest: &Cluster,
    target: &CheckTarget,
    options: CheckOptions,
    cancel: &CancellationToken,
) -> Result<CheckReport, CheckError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match check_once(source, dest, target, options, cancel).await {
            // Our snapshot of the destination was compacted under us (its own
            // auto-compaction): take a fresh one. The source is fine.
            Err(CheckError::Client(error))
                if error.kind() == FailureKind::Compacted
                    && error.side() == Some(Side::Destination)
                    && attempt < DEST_COMPACTED_ATTEMPTS =>
            {
                tracing::debug!(job = %target.job, %error, "Destination compacted during the check; reading a fresh snapshot.");
            }
            Err(CheckError::Client(error))
                if error.kind() == FailureKind::Compacted
                    && error.side() == Some(Side::Destination) =>
            {
                return Err(CheckError::DestCompacted {
                    job: target.job.clone(),
                    attempts: attempt,
                });
            }
            Ok(mut report) => {
                report.duration_seconds = started.elapsed().as_secs_f64();
                return Ok(report);
            }
            Err(error) => return Err(error),
        }
    }
}

async fn check_once(
    source: &Cluster,
    dest: &Cluster,
    target: &CheckTarget,
    options: CheckOptions,
    cancel: &CancellationToken,
) -> Result<CheckReport, CheckError> {
    let meta = read_job_meta(dest, &target.keys).await?;
    if meta.full_sync_raw.is_some() {
        return Err(CheckError::FullSyncInProgress {
            job: target.job.clone(),
            pinned: meta.full_sync.as_ref().map(|m| m.pinned_rev),
        });
    }
    let Some(checkpoint) = meta.checkpoint else {
        return Err(CheckError::NoCheckpoint {
            job: target.job.clone(),
        });
    };
    if let Some(revision) = checkpoint.partial_revision {
        return Err(CheckError::PartialRevision {
            job: target.job.clone(),
            revision,
        });
    }
    let mapping = match target.leases {
        LeaseCheck::Mirrored => LeaseMapping::Records(
            meta.leases
                .iter()
                .map(|(source, record)| (*source, record.dest_lease))
                .collect(),
        ),
        LeaseCheck::Unleased => LeaseMapping::Unleased,
        LeaseCheck::Ignore => LeaseMapping::Ignore,
    };
    // The meta read and every destination page share one destination revision.
    let exact = compare(
        source,
        dest,
        target,
        Some((checkpoint.last_synced_rev, meta.dest_revision)),
        mapping.clone(),
        options,
        cancel,
    )
    .await;
    match exact {
        Ok(report) => Ok(report),
        // Only the source's history decides exactness: the checkpoint
        // revision is gone there, so compare with its present and re-check.
        Err(CheckError::Client(error))
            if error.kind() == FailureKind::Compacted && error.side() == Some(Side::Source) =>
        {
            let mut report =
                compare(source, dest, target, None, mapping.clone(), options, cancel).await?;
            report.exact = false;
            recheck(source, dest, target, &mut report, &mapping, options, cancel).await?;
            Ok(report)
        }
        Err(error) => Err(error),
    }
}

/// Compares the source prefix at `source_revision` with the destination
/// prefix now, key by key (`target.leases` says how leases count). The
/// resume proof: a destination that is exactly the source at its
/// checkpoint continues that history, whatever happened to the source.
pub async fn compare_at(
    source: &Cluster,
    dest: &Cluster,
    target: &CheckTarget,
    source_revision: i64,
    options: CheckOptions,
    cancel: &CancellationToken,
) -> Result<CheckReport, CheckError> {
    let dest_revision = dest.head(target.rewrite.dest_prefix()).await?.revision;
    let mapping = match target.leases {
        LeaseCheck::Ignore => LeaseMapping::Ignore,
        LeaseCheck::Unleased => LeaseMapping::Unleased,
        LeaseCheck::Mirrored => {
            let meta = read_job_meta(dest, &target.keys).await?;
            LeaseMapping::Records(
                meta.leases
                    .iter()
                    .map(|(source, record)| (*source, record.dest_lease))
                    .collect(),
            )
        }
    };
    compare(
        source,
        dest,
        target,
        Some((source_revision, dest_revision)),
        mapping,
        options,
        cancel,
    )
    .await
}

async fn compare(
    source: &Cluster,
    dest: &Cluster,
    target: &CheckTarget,
    // (source revision, destination revision); `None`: both sides' present.
    revisions: Option<(i64, i64)>,
    leases: LeaseMapping,
    options: CheckOptions,
    cancel: &CancellationToken,
) -> Result<CheckReport, CheckError> {
    let (source_revision, dest_revision) = match revisions {
        Some(pinned) => pinned,
        None => (
            source.head(target.rewrite.source_prefix()).await?.revision,
            dest.head(target.rewrite.dest_prefix()).await?.revision,
        ),
    };
    let skipped = |mark_held| Skipped {
        meta_prefix: target.meta_prefix.clone(),
        rewrite: target.rewrite.clone(),
        mark_held,
    };
    let source_read = PagedRead::new(
        source,
        target.rewrite.source_prefix(),
        Some(source_revision),
        skipped(false),
    );
    let dest_read = PagedRead::new(
        dest,
        target.rewrite.dest_prefix(),
        Some(dest_revision),
        skipped(true),
    );
    let (source_stats, dest_stats) = (source_read.stats.clone(), dest_read.stats.clone());
    let mut merged = MergedPages::start(
        &target.job,
        source_read,
        dest_read,
        options.page_size,
        SortedMerge::with_leases(lease_rule(leases)),
        cancel,
    );
    let mut report = CheckReport {
        job: target.job.clone(),
        source_revision,
        dest_revision,
        exact: true,
        ..CheckReport::default()
    };
    loop {
        let mut pages = (0, 0);
        let next = merged
            .next(cancel, |side, page| match side {
                Side::Source => pages.0 += page.len() as u64,
                Side::Destination => pages.1 += page.len() as u64,
            })
            .await
            .map_err(|e| e.error)?;
        report.source_keys += pages.0;
        report.dest_keys += pages.1;
        match next {
            Some(Merged::Same) => {}
            Some(Merged::Held(_)) => report.held += 1,
            Some(Merged::Differ(difference)) => {
                let kind = match &difference {
                    Difference::MissingAtDest { .. } => DifferenceKind::DstMiss,
                    Difference::ExtraAtDest { .. } => DifferenceKind::SrcMiss,
                    Difference::ValueDiffers { .. } => DifferenceKind::Mismatch,
                    Difference::LeaseDiffers { .. } => DifferenceKind::LeaseMismatch,
                };
                report.record(difference.suffix(), kind, options.sample_limit);
            }
            None => {
                report.source_bytes_read = source_stats.totals().bytes;
                report.dest_bytes_read = dest_stats.totals().bytes;
                return Ok(report);
            }
        }
    }
}

/// What a check compares leases with, read with the job's meta.
#[derive(Debug, Clone)]
enum LeaseMapping {
    /// Source lease → destination lease, from the records.
    Records(HashMap<i64, i64>),
    Unleased,
    Ignore,
}

fn lease_rule(mapping: LeaseMapping) -> LeaseRule {
    match mapping {
        LeaseMapping::Ignore => LeaseRule::Ignore,
        LeaseMapping::Unleased => LeaseRule::Unleased,
        LeaseMapping::Records(mapping) => {
            LeaseRule::Mapped(Box::new(move |lease| mapping.get(&lease).copied()))
        }
    }
}

/// The approximate path: differences against a moving source may be writes
/// in flight, so look at each differing key again after a pause and keep
/// only those that still differ.
async fn recheck(
    source: &Cluster,
    dest: &Cluster,
    target: &CheckTarget,
    report: &mut CheckReport,
    leases: &LeaseMapping,
    options: CheckOptions,
    cancel: &CancellationToken,
) -> Result<(), CheckError> {
    if report.is_consistent() {
        return Ok(());
    }
    if report.differences.len() as u64 != report.total_differences() {
        // Too many to re-check one by one: keep the counts of the first pass.
        return Ok(());
    }
    tokio::select! {
        _ = cancel.cancelled() => return Err(CheckError::Cancelled),
        _ = tokio::time::sleep(options.recheck_delay) => {}
    }
    let suffixes: Vec<Vec<u8>> = report.differences.iter().map(|(s, _)| s.clone()).collect();
    let source_values =
        read_keys(source, &suffixes, |s| target.rewrite.suffix_to_source(s)).await?;
    let dest_values = read_keys(dest, &suffixes, |s| target.rewrite.suffix_to_dest(s)).await?;
    let mut rechecked = CheckReport {
        job: report.job.clone(),
        source_revision: report.source_revision,
        dest_revision: report.dest_revision,
        exact: false,
        source_keys: report.source_keys,
        dest_keys: report.dest_keys,
        held: report.held,
        ..CheckReport::default()
    };
    let rule = lease_rule(leases.clone());
    for ((suffix, source_kv), dest_kv) in suffixes.iter().zip(source_values).zip(dest_values) {
        let kind = match (source_kv, dest_kv) {
            (Some(_), None) => DifferenceKind::DstMiss,
            (None, Some(_)) => DifferenceKind::SrcMiss,
            (Some(s), Some(d)) if s.value != d.value => DifferenceKind::Mismatch,
            (Some(s), Some(d)) if !rule.same(s.lease, d.lease) => DifferenceKind::LeaseMismatch,
            _ => continue,
        };
        rechecked.record(suffix, kind, options.sample_limit);
    }
    *report = rechecked;
    Ok(())
}

/// Current values of many keys, 64 per txn.
pub async fn read_keys(
    cluster: &Cluster,
    suffixes: &[Vec<u8>],
    key_of: impl Fn(&[u8]) -> Vec<u8>,
) -> Result<Vec<Option<KeyValue>>, ClientError> {
    read_keys_at(cluster, suffixes, key_of, None).await
}

/// Many keys (value and lease) at one revision (or the latest), 64 per txn.
pub async fn read_keys_at(
    cluster: &Cluster,
    suffixes: &[Vec<u8>],
    key_of: impl Fn(&[u8]) -> Vec<u8>,
    revision: Option<i64>,
) -> Result<Vec<Option<KeyValue>>, ClientError> {
    let mut values = Vec::with_capacity(suffixes.len());
    for chunk in suffixes.chunks(64) {
        let ops: Vec<Op> = chunk
            .iter()
            .map(|suffix| {
                Op::Range(RangeRequest::key(key_of(suffix)).at_revision(revision.unwrap_or(0)))
            })
            .collect();
        let response = cluster
            .txn("read keys", TxnRequest::new().and_then(ops))
            .await?;
        values.extend(response.ranges().map(|range| range.kvs.first().cloned()));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_keeps_bounded_samples_and_exact_counts() {
        let mut report = CheckReport::default();
        for i in 0..25u32 {
            report.record(format!("k{i}").as_bytes(), DifferenceKind::DstMiss, 3);
        }
        report.record(b"x", DifferenceKind::Mismatch, 3);
        assert_eq!(report.dst_miss, 25);
        assert_eq!(report.samples.dst_miss, vec!["k0", "k1", "k2"]);
        assert_eq!(report.mismatch, 1);
        assert!(!report.is_consistent());
        assert_eq!(report.differences.len(), 26);
    }
}
